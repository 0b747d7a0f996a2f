"""Read-only checks against a real OpenD gateway: opt-in, never run by default.

Set ``CATALYST_LIVE_OPEND=host:port`` (e.g. ``127.0.0.1:11111``) to run them:

    CATALYST_LIVE_OPEND=127.0.0.1:11111 .venv/bin/python -m pytest -m live

They only read: the gateway's global state, the accounts it sees, and one quote. No trade context is
unlocked, no order is placed, modified or cancelled, and no trading password is read. Without the variable
every test here is skipped (and ``-m "not live"`` deselects them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from brokers.futu import FutuClient
from config.settings import FutuSettings

LIVE_OPEND = os.environ.get("CATALYST_LIVE_OPEND", "")  # read at import: the autouse fixture clears OPEND_*

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not LIVE_OPEND, reason="set CATALYST_LIVE_OPEND=host:port to run the live OpenD checks"),
]


def live_endpoint() -> tuple[str, int]:
    host, sep, port = LIVE_OPEND.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise pytest.UsageError(f"CATALYST_LIVE_OPEND must be host:port (e.g. 127.0.0.1:11111), got {LIVE_OPEND!r}")
    return host, int(port)


@pytest.fixture(scope="module")
def client() -> Iterator[FutuClient]:
    host, port = live_endpoint()
    # Paper environment: a read of a REAL account needs no unlock, and nothing here trades.
    futu = FutuClient(FutuSettings(host=host, port=port, trd_env="SIMULATE", connect_timeout_s=15))
    try:
        yield futu
    finally:
        futu.close()


def test_the_gateway_answers_and_is_logged_in(client: FutuClient) -> None:
    state = client.gateway_state()
    assert state, "get_global_state returned nothing"
    assert state.get("qot_logined") in ("True", "true", "1"), state
    assert state.get("server_ver"), state


def test_the_gateway_sees_an_hk_account(client: FutuClient) -> None:
    accounts = client.accounts()
    assert accounts, "OpenD lists no trading account"
    assert any(a["trd_env"] in ("SIMULATE", "REAL") for a in accounts), accounts
    assert any("HK" in a["markets"] or "1" in a["markets"].split(",") for a in accounts), accounts


def test_one_quote_has_a_price_and_a_board_lot(client: FutuClient) -> None:
    (quote,) = client.snapshots(["HK.00700"])
    assert quote.symbol == "HK.00700"
    assert quote.last_price > 0 and quote.lot_size > 0
    assert quote.updated_at is not None
