#!/usr/bin/env python3
"""Check the broker gateway end to end: the first thing to run after starting the container.

Prints one line per check, each OK or FAIL with the reason: the gateway's global state, the accounts it sees
(paper/real, markets), funds, positions and one quote. Exit 0 only if every check passes.

    python scripts/test_connection.py            # uses config/settings.yaml and OPEND_HOST / OPEND_PORT
    python scripts/test_connection.py --quick    # global state only (the health check's API call)
    python scripts/test_connection.py --broker ibkr   # IB Gateway (IB_HOST / IB_PORT), never --live
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="PATH", help="settings file (default: $CATALYST_CONFIG or config/settings.yaml)"
    )
    parser.add_argument("--symbol", default="700", help="the stock to quote (default 700)")
    parser.add_argument("--quick", action="store_true", help="only connect and read the global state")
    parser.add_argument("--broker", choices=["futu", "ibkr"], default="futu", help="the gateway to check")
    args = parser.parse_args(argv)

    from config.errors import AgentError
    from config.settings import load_settings

    failures = 0

    def check(name: str, step: Callable[[], str]) -> Any:
        nonlocal failures
        try:
            detail = step()
        except (AgentError, ValueError, OSError) as exc:
            failures += 1
            print(f"FAIL  {name:<10} {type(exc).__name__}: {exc}", flush=True)
            return None
        print(f"OK    {name:<10} {detail}", flush=True)
        return detail

    try:
        settings = load_settings(args.config)
    except AgentError as exc:
        print(f"FAIL  settings   {exc}")
        return 2
    if args.broker == "ibkr":
        return _check_ibkr(settings.broker.ibkr, args, check, lambda: failures)
    futu = settings.broker.futu
    print(f"OpenD at {futu.host}:{futu.port}, trd_env {futu.trd_env}, security firm {futu.security_firm}", flush=True)

    from brokers.futu import FutuClient
    from brokers.hkex import normalize_symbol

    holder: dict[str, FutuClient] = {}

    def connect() -> str:
        # Paper unless REAL is configured; the connection test never unlocks trading.
        holder["client"] = FutuClient(futu, live_confirmed=futu.trd_env == "REAL", trade_password=None)
        return f"connected (account {holder['client'].account_id}, {holder['client'].trd_env})"

    check("connect", connect)
    client = holder.get("client")
    if client is None:
        return 1
    try:
        check("gateway", lambda: ", ".join(f"{k}={v}" for k, v in client.gateway_state().items()))
        if not args.quick:
            check("accounts", lambda: "; ".join(_account_line(a) for a in client.accounts()) or "none")
            check("funds", lambda: _funds_line(client.account()))
            check("positions", lambda: _positions_line(client.positions()))
            check("quote", lambda: _quote_line(client.snapshots([normalize_symbol(args.symbol)])))
    finally:
        client.close()
    print("all checks passed" if failures == 0 else f"{failures} check(s) failed", flush=True)
    return 0 if failures == 0 else 1


def _check_ibkr(ibkr: Any, args: argparse.Namespace, check: Callable[..., Any], failed: Callable[[], int]) -> int:
    """The same checks through IB Gateway. A live account is only connected to with trading_mode: live (the
    test never places an order either way)."""
    print(f"IB Gateway at {ibkr.host}:{ibkr.port}, trading_mode {ibkr.trading_mode}", flush=True)
    if ibkr.client_id >= 2**31 - 1:
        print("FAIL  settings   broker.ibkr.client_id must leave room for the connection test's id (+1)")
        return 2
    from brokers.hkex import normalize_symbol
    from brokers.ibkr import IbkrClient

    holder: dict[str, IbkrClient] = {}

    # Its own client id: IB refuses a second connection with the agent's id (code 326), and the health check runs
    # this while a cycle may be connected.
    ibkr = ibkr.model_copy(update={"client_id": ibkr.client_id + 1})

    def connect() -> str:
        holder["client"] = IbkrClient(ibkr, live_confirmed=ibkr.trading_mode == "live")
        kind = "paper" if holder["client"].is_paper else "LIVE"
        return f"connected (account {holder['client'].account_id}, {kind})"

    check("connect", connect)
    client = holder.get("client")
    if client is None:
        return 1
    try:
        check("gateway", lambda: ", ".join(f"{k}={v}" for k, v in client.gateway_state().items()))
        if not args.quick:
            check("accounts", lambda: "; ".join(f"{a['account']} {a['kind']} {a['in_use']}" for a in client.accounts()))
            check("funds", lambda: _funds_line(client.account()))
            check("positions", lambda: _positions_line(client.positions()))
            check("quote", lambda: _quote_line(client.snapshots([normalize_symbol(args.symbol)])))
    finally:
        client.close()
    print("all checks passed" if failed() == 0 else f"{failed()} check(s) failed", flush=True)
    return 0 if failed() == 0 else 1


def _account_line(a: dict[str, str]) -> str:
    kind = "paper" if a["trd_env"] == "SIMULATE" else "REAL"
    used = " (used)" if a.get("in_use") else ""
    return f"{a['acc_id']} {kind} markets={a['markets']} {a['status']}{used}"


def _funds_line(account: Any) -> str:
    return f"cash HK${account.cash:,.2f}, equity HK${account.equity:,.2f}, buying power HK${account.buying_power:,.2f}"


def _positions_line(positions: list[Any]) -> str:
    if not positions:
        return "none"
    return "; ".join(f"{p.symbol} {p.quantity} @ {p.avg_cost}" for p in positions)


def _quote_line(quotes: list[Any]) -> str:
    if not quotes:
        raise ValueError("the gateway returned no quote for that symbol")
    q = quotes[0]
    delayed = " (DELAYED data)" if q.delayed else ""
    return (
        f"{q.symbol} {q.name} last {q.last_price} lot {q.lot_size} tick {q.price_spread} "
        f"at {q.updated_at:%H:%M:%S}{delayed}"
    )


if __name__ == "__main__":
    sys.exit(main())
