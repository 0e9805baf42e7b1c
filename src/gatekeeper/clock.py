"""Injectable clocks: the daemon uses the system clock, tests and dry runs set "now"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Anything with ``now()`` returning an aware UTC ``datetime``."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that only moves when told to (``set`` or ``advance``)."""

    def __init__(self, start: datetime) -> None:
        self._now = start.astimezone(UTC)

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        self._now = when.astimezone(UTC)

    def advance(self, delta: timedelta) -> None:
        self._now += delta


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp that carries a zone (``Z`` or ``+hh:mm``) into UTC.

    Raises ``ValueError`` when the text is not such a timestamp (a missing zone included).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 timestamp string, got {type(text).__name__}")
    value = datetime.fromisoformat(text.replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no zone offset (RFC 3339 needs Z or +hh:mm)")
    return value.astimezone(UTC)


def format_rfc3339(when: datetime) -> str:
    """Format an aware datetime as RFC 3339 in UTC, milliseconds and ``Z``:
    ``2026-11-01T09:00:00.000Z``. The width is fixed, so the text sorts as the time does."""
    text = when.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
