"""The project's exceptions: one shallow tree, each saying what the caller should do.

A safety refusal is not an exception: it is a returned verdict (see ``safety.py``).
``agent.py`` maps each class to an exit code (DESIGN.md §2).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class. Unexpected: the run stops with exit code 1 and a ``run_failed`` log line."""

    exit_code = 1


class ConfigError(AgentError):
    """Settings or command line are wrong. Needs a human to fix the file or flag; retrying will not help."""

    exit_code = 2


class BrokerUnavailable(AgentError):
    """The gateway (OpenD) cannot be reached at all. Start it or wait; nothing was sent."""

    exit_code = 3


class BrokerTemporaryError(AgentError):
    """A read or cancel failed for a reason that usually resolves itself (timeout, rate limit). Retry later."""

    exit_code = 3

    def __init__(self, message: str, *, code: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code


class BrokerRequestRefused(AgentError):
    """The gateway answered a read or cancel with a refusal that asking again will not change: a request it
    does not support, an invalid parameter, no permission or quota for that market, an unknown security.

    Raised at once, never retried. Fix the request (the symbol, the parameter) or the account's market rights
    and quotas in OpenD; the same call in two seconds gets the same answer.
    """

    exit_code = 3

    def __init__(self, message: str, *, code: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code


class OrderRejected(AgentError):
    """The broker refused an order. Nothing is open for it; read the message and change the order."""

    exit_code = 1

    def __init__(self, message: str, *, code: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code


class OrderStateUnknown(AgentError):
    """An order may or may not have reached the broker. Needs reconciliation before any new entry."""

    exit_code = 1


class ModelUnavailable(AgentError):
    """The Claude API could not be reached or kept failing after the SDK's own retries. Try the next cycle."""

    exit_code = 1


class ModelAPIError(AgentError):
    """The Claude API refused the request (unknown model, bad request, auth). Fix settings or key; exit 1."""

    exit_code = 1


class JournalError(AgentError):
    """The PostgreSQL journal is unreachable or refused a write. Nothing is traded without a journal."""

    exit_code = 1


class Halted(AgentError):
    """A risk limit or the kill switch stopped the run. Exits still happen; entries wait for a human."""

    exit_code = 4


class LockHeld(AgentError):
    """Another agent instance holds the account lock. Try again after it finishes."""

    exit_code = 5
