"""Retry timing: exponential backoff with jitter, capped; Retry-After parsing (both forms)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

from gatekeeper.delivery.retry import (
    backoff_ceiling_s,
    backoff_delay_s,
    parse_retry_after,
    retry_delay_s,
)

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


def test_backoff_grows_exponentially_within_cap() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (9, 60)]:
        delays = [backoff_delay_s(attempt, base_s=5, cap_s=60, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the whole range


def test_the_ceiling_doubles_up_to_the_cap_and_never_overflows() -> None:
    got = [backoff_ceiling_s(n, base_s=5, cap_s=300) for n in (0, 1, 2, 3, 7, 8, 10**6)]
    assert got == [5, 5, 10, 20, 300, 300, 300]
    assert backoff_ceiling_s(10**6, base_s=1, cap_s=math.inf) == 2.0**1000


def test_partial_jitter_keeps_the_lower_part_of_the_ceiling() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (4, 4.0)]:
        delays = [
            backoff_delay_s(attempt, base_s=0.5, cap_s=math.inf, rng=rng, jitter=0.5)
            for _ in range(200)
        ]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert min(delays) < ceiling * 0.6 and max(delays) > ceiling * 0.9


def test_backoff_is_the_same_draw_as_before() -> None:
    # full jitter is rng.uniform(0, ceiling); emit's is ceiling * rng.uniform(0.5, 1)
    assert backoff_delay_s(3, base_s=5, cap_s=60, rng=random.Random(1)) == random.Random(1).uniform(
        0, 20
    )
    assert backoff_delay_s(
        3, base_s=0.5, cap_s=math.inf, rng=random.Random(1), jitter=0.5
    ) == 0.5 * 2**2 * random.Random(1).uniform(0.5, 1.0)


def test_backoff_of_a_huge_attempt_number_is_the_cap() -> None:
    delay = backoff_delay_s(10**6, base_s=1, cap_s=60, rng=random.Random(3), jitter=0)
    assert delay == 60


def test_retry_after_seconds() -> None:
    assert parse_retry_after("30", NOW) == 30
    assert parse_retry_after(" 1.5 ", NOW) == 1.5
    assert parse_retry_after("0", NOW) == 0
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("-4", NOW) is None


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", NOW) == 30
    assert parse_retry_after("  Wed, 21 Oct 2015 08:28:00 GMT ", NOW) == 3600
    # a date in the past (or now) means: retry now
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0
    assert parse_retry_after("Tue, 20 Oct 2015 07:28:00 GMT", NOW) == 0
    # the obsolete forms RFC 9110 still asks recipients to accept
    assert parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", NOW) == 60
    assert parse_retry_after("Wed Oct 21 07:28:10 2015", NOW) == 10
    # measured from the "now" given (the caller's clock), naive taken as UTC
    later = NOW + timedelta(seconds=20)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", later) == 10
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", later.replace(tzinfo=None)) == 10


def test_retry_after_garbage_is_none() -> None:
    for garbage in ["", "soon", "Wed, 32 Oct 2015 07:28:00 GMT", "nan", "30 s", "Wed, 21 Oct"]:
        assert parse_retry_after(garbage, NOW) is None, garbage


def test_retry_delay_takes_the_longer_wait_up_to_the_limit() -> None:
    assert retry_delay_s(2.0, None, 60) == 2.0
    assert retry_delay_s(2.0, 1.0, 60) == 2.0
    assert retry_delay_s(2.0, 30.0, 60) == 30.0
    assert retry_delay_s(2.0, 3600.0, 60) == 60
