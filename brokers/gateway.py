"""What every gateway-backed broker shares before it speaks its own protocol: is the port there at all."""

from __future__ import annotations

import socket

from config.errors import BrokerUnavailable


def check_reachable(name: str, host: str, port: int, timeout_s: float, hint: str) -> None:
    """Raise ``BrokerUnavailable`` unless something accepts TCP connections at ``host:port`` within ``timeout_s``.

    ``name`` says which gateway (``OpenD``, ``IB Gateway``) and ``hint`` how to start it, for the message.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except TimeoutError as exc:
        reason, cause = f"no answer within {timeout_s:g} s", exc
    except ConnectionRefusedError as exc:
        reason, cause = "connection refused", exc
    except OSError as exc:
        reason, cause = exc.strerror or str(exc), exc
    raise BrokerUnavailable(
        f"{name} is not reachable at {host}:{port} ({reason}). {hint} No order was sent."
    ) from cause
