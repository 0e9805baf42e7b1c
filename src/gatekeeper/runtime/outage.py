"""The database's run-time condition: when it cannot take writes (disk full, locked by
another process, an I/O error), every write and request that meets it reports here, and
the log gets one line per condition per interval instead of a traceback per request.
``/healthz`` shows the condition until a write succeeds again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.store.errors import StoreUnavailable

log = logging.getLogger("gatekeeper.runtime.outage")

LOG_INTERVAL_S = 60.0
"""At most one log line per condition in this many seconds (monotonic)."""

RETRY_AFTER_S = 5
"""What ``Retry-After`` tells a client a write refused for the database's condition."""


@dataclass
class _Current:
    condition: str
    message: str
    since: datetime
    failures: int = 0
    logged_at: float = 0.0
    unlogged: int = 0


class StoreOutage:
    """The current condition of the database, if it has one (``current()``).

    ``failed(exc)`` records a ``StoreUnavailable`` (logging it at most once per condition
    per ``interval_s``, with how many more happened meanwhile); ``recovered()`` clears it
    after a write succeeded (logged once). ``now`` gives the wall-clock time shown as
    ``since``; ``monotonic`` times the log interval."""

    def __init__(
        self,
        now: Callable[[], datetime],
        *,
        interval_s: float = LOG_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now
        self._interval_s = interval_s
        self._monotonic = monotonic
        self._current: _Current | None = None

    def failed(self, exc: StoreUnavailable) -> None:
        """A database operation failed with ``exc``: record and maybe log it."""
        at = self._monotonic()
        current = self._current
        if current is None or current.condition != exc.condition:
            current = self._current = _Current(exc.condition, str(exc), self._now())
            current.logged_at = at - self._interval_s  # a new condition: logged now
        current.failures += 1
        current.message = str(exc)
        if at - current.logged_at >= self._interval_s:
            more = (
                f" ({current.unlogged} more reports since the last line)"
                if current.unlogged
                else ""
            )
            log.error(
                "database unavailable (%s): %s; writes answer 503 until it clears%s",
                current.condition,
                current.message,
                more,
                extra={"condition": current.condition, "failures": current.failures},
            )
            current.logged_at = at
            current.unlogged = 0
        else:
            current.unlogged += 1

    def recovered(self) -> None:
        """A write succeeded: the condition, if any, is over."""
        current = self._current
        if current is None:
            return
        self._current = None
        log.warning(
            "database writes succeed again after %s since %s",
            current.condition,
            format_rfc3339(current.since),
            extra={"condition": current.condition, "failures": current.failures},
        )

    def current(self) -> dict[str, Any] | None:
        """The condition as ``/healthz`` shows it (None: none): ``condition``, ``since``
        (RFC 3339) and ``message`` (the database's own words)."""
        current = self._current
        if current is None:
            return None
        return {
            "condition": current.condition,
            "since": format_rfc3339(current.since),
            "message": current.message,
        }
