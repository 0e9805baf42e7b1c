"""Injectable clocks: the daemon uses the system clock, tests and dry runs set "now".

``JumpDetector`` measures, against the monotonic clock, how far the wall clock has jumped
inside this process, so durations (a delivery's age, how long an idempotency key has been
kept, a retry's wait) are not stretched or shrunk by a jump while timestamps that are
stored stay in wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class JumpDetector:
    """The wall clock ``clock`` watched against ``monotonic`` (seconds) for jumps.

    The *offset* is how far the wall clock has moved beyond the monotonic clock since the
    detector was made: 0 at first, +3600 after the wall clock jumped an hour forward. Each
    ``now()`` looks at both clocks; a change of the offset by more than ``tolerance_s``
    since the last jump seen starts a new *segment* (the wall time it was seen at, and the
    offset from then on). A wall timestamp taken in this process belongs to the last
    segment that started at or before it: a forward jump is attributed exactly, a backward
    one (where wall times repeat) in the way that makes durations shorter, never longer.
    Timestamps from before the detector was made belong to the first segment (offset 0):
    a jump while the process was not running cannot be seen.
    """

    def __init__(
        self,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        tolerance_s: float = 1.0,
        max_segments: int = 64,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._tolerance_s = tolerance_s
        self._max_segments = max(2, max_segments)
        self._wall0 = clock.now()
        self._mono0 = monotonic()
        self._mono_last = self._mono0
        self._offset_s = 0.0
        self._segments: list[tuple[datetime, float]] = [(self._wall0, 0.0)]
        self._min_offset_s = 0.0
        self._max_offset_s = 0.0

    def now(self) -> datetime:
        """The wall clock's time (aware UTC), noting a jump when there was one."""
        wall = self._clock.now()
        mono = self._monotonic()
        offset = (wall - self._wall0).total_seconds() - (mono - self._mono0)
        self._offset_s = offset
        previous = self._segments[-1][1]
        if abs(offset - previous) > self._tolerance_s:
            start = wall
            if offset < previous:
                # backward: the jump happened somewhere since the last look, and what was
                # stamped meanwhile may be on its new side; counting it there (the smaller
                # offset) makes its age shorter, never longer
                start = wall - timedelta(seconds=mono - self._mono_last)
            self._segments.append((start, offset))
            self._min_offset_s = min(self._min_offset_s, offset)
            self._max_offset_s = max(self._max_offset_s, offset)
            if len(self._segments) > self._max_segments:
                self._merge_oldest()
        self._mono_last = mono
        return wall

    def elapsed_s(self, since: datetime, now: datetime) -> float:
        """Seconds that passed from the wall timestamp ``since`` to ``now`` (a value of
        ``now()``), without the jumps of the wall clock in between that this process saw:
        after a forward jump of an hour, an action stamped just before it is seconds old,
        not an hour."""
        return (now - since).total_seconds() - (self._offset_s - self._offset_at(since))

    def due_now(self, now: datetime) -> datetime:
        """The time to compare stored due times with: ``now`` (a value of ``now()``), moved
        forward by a backward jump seen in this process (so a retry due in a minute when
        the clock went back an hour is still due in a minute, not in an hour and a
        minute). A forward jump is not undone: what was stored before it is due early."""
        return now + timedelta(seconds=self._max_offset_s - self._offset_s)

    def keep_since(self, now: datetime, window_s: float) -> datetime:
        """The oldest wall timestamp still within ``window_s`` seconds of ``now`` (a value
        of ``now()``) whatever jumps this process saw: after a forward jump of an hour, a
        window of a day ends an hour further back, so nothing is forgotten early."""
        extra_s = max(0.0, self._offset_s - self._min_offset_s)
        return now - timedelta(seconds=window_s + extra_s)

    def _offset_at(self, when: datetime) -> float:
        for start, offset in reversed(self._segments):
            if start <= when:
                return offset
        return self._segments[0][1]

    def _merge_oldest(self) -> None:
        """Keep at most ``max_segments``: the two oldest after the first become one, with
        the smaller offset (which makes durations across it shorter, never longer)."""
        (start, first), (_, second) = self._segments[1], self._segments[2]
        self._segments[1:3] = [(start, min(first, second))]


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
