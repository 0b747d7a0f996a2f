"""Replay: run the agent's own cycle and guard over past trading days, with no look-ahead, and score it.

``clock`` (the replay clock), ``feed`` (market data that cannot be read past the clock), ``broker`` (fills
against bars after each decision), ``journal`` (the separate replay database), ``runner`` (the XHKG schedule),
``score`` (metrics, trades, the table and the ``--json`` file).
"""
