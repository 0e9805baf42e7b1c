"""Retry timing: exponential backoff with full jitter, capped; Retry-After parsing."""

from __future__ import annotations

import random

from gatekeeper.config import DeliveryPolicy
from gatekeeper.delivery.dispatcher import backoff_delay_s, parse_retry_after


def test_backoff_grows_exponentially_within_cap() -> None:
    policy = DeliveryPolicy(backoff_base_s=5, backoff_cap_s=60)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (9, 60)]:
        delays = [backoff_delay_s(policy, attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the whole range


def test_retry_after_seconds() -> None:
    assert parse_retry_after("30") == 30
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-4") is None
