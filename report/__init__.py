"""The HTML report and the daily digest: what the agent did, read from the journal (live or replay).

``data`` computes every figure from the journal tables (SQL plus pure Python), ``charts`` draws them as inline
SVG with matplotlib, ``render`` fills Jinja2 templates (autoescaped: model text, news and names are shown as
text, never as markup), ``cli`` is what ``agent.py --report`` and ``--digest`` call.
"""
