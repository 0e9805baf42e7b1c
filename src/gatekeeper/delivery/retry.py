"""Retry timing, one policy for every gatekeeper client that retries an HTTP request.

- ``backoff_delay_s``: exponential backoff with jitter, capped (AWS Architecture Blog,
  "Exponential Backoff And Jitter"). With ``jitter=1`` ("full jitter", the dispatcher's)
  the delay is uniform in ``[0, ceiling]``; with ``jitter=0.5`` (``gatekeeper emit``'s) in
  ``[ceiling / 2, ceiling]``, where ``ceiling = min(cap_s, base_s * 2**(attempt - 1))``
  (``backoff_ceiling_s``, also the dispatcher's hold when an outcome cannot be recorded).
- ``parse_retry_after``: the server's ``Retry-After`` (RFC 9110 section 10.2.3) in either
  form, delay-seconds or an HTTP-date, as seconds from ``now``.
- ``retry_delay_s``: the delay to wait: the backoff, or the server's ``Retry-After`` when
  that is longer, up to a limit.

Imports only the standard library: the CLI uses it, and ``gatekeeper.cli`` must not load
aiohttp.
"""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime

MAX_EXPONENT = 1000
"""Attempts beyond this many double the ceiling no further (``2.0 ** 1024`` overflows)."""


def backoff_delay_s(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random, jitter: float = 1.0
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The ceiling is ``min(cap_s, base_s * 2**(attempt - 1))`` (``cap_s`` may be ``inf``);
    the delay is ``ceiling * ((1 - jitter) + jitter * u)`` with ``u`` drawn uniformly from
    ``[0, 1)`` by ``rng``: ``jitter`` is the share of the ceiling that is random, 1 for
    full jitter (uniform in ``[0, ceiling]``), 0 for none. ``jitter`` must be in [0, 1].
    """
    ceiling = backoff_ceiling_s(attempt, base_s=base_s, cap_s=cap_s)
    if jitter == 1.0:
        return rng.uniform(0, ceiling)
    return ceiling * rng.uniform(1.0 - jitter, 1.0)


def backoff_ceiling_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """The longest wait after failed attempt number ``attempt`` (1-based), in seconds:
    ``min(cap_s, base_s * 2**(attempt - 1))``, doubling no further after ``MAX_EXPONENT``
    attempts. With no jitter, this is the wait itself."""
    exponent = min(max(attempt - 1, 0), MAX_EXPONENT)
    return min(cap_s, base_s * 2.0**exponent)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """The ``Retry-After`` header ``value`` as seconds to wait from ``now``; None when there
    is no header or it says nothing usable.

    Both forms of RFC 9110 are honoured: delay-seconds (``"120"``; a decimal such as
    ``"1.5"`` is accepted too; negative is None) and an HTTP-date (``"Wed, 21 Oct 2015
    07:28:00 GMT"``, read with ``email.utils.parsedate_to_datetime``; a date without a zone
    is taken as UTC), which gives the seconds from ``now`` to that date, 0 when the date is
    not after ``now``. Anything else is None. A naive ``now`` is taken as UTC. Never
    raises.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until(text, now)
    return seconds if seconds >= 0 else None


def _seconds_until(http_date: str, now: datetime) -> float | None:
    """Seconds from ``now`` to ``http_date`` (0 when it is past); None when it is no date."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        return max(0.0, (when - now).total_seconds())
    except OverflowError:  # defensive: subtracting aware datetimes far apart
        return None


def retry_delay_s(backoff_s: float, retry_after_s: float | None, limit_s: float) -> float:
    """The delay before the next attempt: ``backoff_s``, or the server's ``retry_after_s``
    when it is longer, but never more of it than ``limit_s`` (all seconds)."""
    if retry_after_s is None:
        return backoff_s
    return max(backoff_s, min(retry_after_s, limit_s))
