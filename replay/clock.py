"""The replay clock: time moves only when the runner moves it, and never backwards."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

HKT = ZoneInfo("Asia/Hong_Kong")


class ClockError(ValueError):
    """The runner tried to move the replay clock backwards or gave it a naive time: a bug in the runner."""


class ReplayClock:
    """A ``brokers.base.Clock`` (call it for the time) that the replay runner advances step by step."""

    def __init__(self, start: datetime) -> None:
        self._now = self._checked(start)

    def __call__(self) -> datetime:
        return self._now

    def advance_to(self, when: datetime) -> None:
        """Move to ``when`` (at or after the current time). Raises ClockError when it would go back."""
        when = self._checked(when)
        if when < self._now:
            raise ClockError(
                f"The replay clock cannot go back from {self._now.isoformat()} to {when.isoformat()}: "
                "a replay only moves forward."
            )
        self._now = when

    @staticmethod
    def _checked(when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ClockError(f"The replay clock needs a timezone-aware time, got {when!r}.")
        return when.astimezone(HKT)
