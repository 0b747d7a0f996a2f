"""How a Futu failure is judged: futu-api hands us only a text (OpenD's retMsg or its own transport error).

``classify_failure`` sorts that text into a ``Failure``; ``TEMPORARY`` failures can get better by themselves and are
retried (reads and cancels) or waited out, the rest are raised at once with the ``HINTS`` of what to do.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Failure(StrEnum):
    # Can get better by itself: retried (reads and cancels), waited out (rate limits).
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    BUSY = "busy"
    # The broker answered and will answer the same again: raised at once, never retried.
    UNKNOWN_SECURITY = "unknown_security"
    NO_PERMISSION = "no_permission"  # no market right, or a quota (e.g. history K-line stocks) used up
    UNSUPPORTED = "unsupported"
    INVALID_PARAMETER = "invalid_parameter"
    REFUSED = "refused"  # any other answer: the broker said no


# futu-api hands us only OpenD's ``retMsg`` text (its ``retType``/``errCode`` are dropped in ``unpack_rsp``) or its
# own transport texts (``PacketErr.Timeout``, ``Connect timeout``, ``Connection closed``). OpenD answers in English
# or Chinese depending on its language setting, so both are matched. The first matching row wins: what can get
# better is checked first, so a text that names both (a timeout while checking a right) is retried.
_PATTERNS: tuple[tuple[Failure, re.Pattern[str]], ...] = (
    (Failure.RATE_LIMITED, re.compile(r"frequen|too many|rate.?limit|频率|频繁|太快", re.IGNORECASE)),
    (Failure.TIMEOUT, re.compile(r"time.?out|超时", re.IGNORECASE)),
    (
        Failure.DISCONNECTED,
        re.compile(
            r"disconnect|connection (lost|closed)|not connected|context status bad|packeterr|send fail|broken pipe|"
            r"connection reset|连接",
            re.IGNORECASE,
        ),
    ),
    (Failure.BUSY, re.compile(r"\bbusy\b|繁忙|try again later|稍后(再|重)试", re.IGNORECASE)),
    (
        Failure.UNKNOWN_SECURITY,
        re.compile(
            r"unknown? (stock|security|code)|(stock|security) (does not|doesn't|not) exist|no such (stock|security)|"
            r"未知股票|股票不存在|不存在的股票|未知证券",
            re.IGNORECASE,
        ),
    ),
    (
        Failure.NO_PERMISSION,
        re.compile(
            r"no (right|permission|authority)|permission denied|not (authori[sz]ed|entitled)|\bquota\b|权限|无权|额度",
            re.IGNORECASE,
        ),
    ),
    (
        Failure.UNSUPPORTED,
        re.compile(r"not supported|unsupported|does not support|不支持|unknown proto", re.IGNORECASE),
    ),
    (
        Failure.INVALID_PARAMETER,
        re.compile(
            r"param(eter)? error|invalid (param|argument|value)|wrong (type|value)|format of code|参数|非法",
            re.IGNORECASE,
        ),
    ),
)


def classify_failure(text: str) -> Failure:
    """Which kind of failure a futu error text describes. A text no pattern knows counts as a refusal."""
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return Failure.REFUSED


TEMPORARY = frozenset({Failure.RATE_LIMITED, Failure.TIMEOUT, Failure.DISCONNECTED, Failure.BUSY})
# Outcomes after which a sent order may exist at the broker even though the call failed.
UNCERTAIN = frozenset({Failure.TIMEOUT, Failure.DISCONNECTED})
# What the message says about each failure: why it happened and what happens next.
HINTS: dict[Failure, str] = {
    Failure.RATE_LIMITED: "OpenD's rate limit was hit; the next call waits for the 30 s window",
    Failure.TIMEOUT: "no reply within {timeout_s:g} s",
    Failure.DISCONNECTED: "the connection to OpenD dropped; it is reopened on the next call",
    Failure.BUSY: "OpenD or Futu's servers are busy; try again shortly",
    Failure.UNKNOWN_SECURITY: "OpenD does not know this security: check the symbol",
    Failure.NO_PERMISSION: "the account has no right or quota for this: check its market rights and quotas in OpenD",
    Failure.UNSUPPORTED: "OpenD does not support this request: update OpenD or use another call",
    Failure.INVALID_PARAMETER: "OpenD found a parameter invalid: fix the request",
    Failure.REFUSED: "OpenD refused the request",
}
