"""A wall-clock jump inside the process (an NTP step, an operator's ``date -s``) must not
dead-letter pending actions early, make a retry early or late, or forget idempotency keys
early: durations inside the process follow the monotonic clock (``JumpDetector``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from gatekeeper.clock import FixedClock, JumpDetector

from . import test_receiver_faults as faults
from .conftest import DEPLOY_RULE, Project, fact
from .test_receiver_faults import (
    FAST,
    Answer,
    Hit,
    deploy,
    eventually,
    fail_first,
    fire,
    notify,
    pipeline,
    wait_actions,
)

receivers = faults.receivers  # the fixture: scripted receivers

START = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
HOUR_S = 3600.0


class JumpingClock:
    """The system clock, plus an offset that ``jump`` moves at once."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


class FakeMonotonic:
    def __init__(self) -> None:
        self.value = 100.0

    def __call__(self) -> float:
        return self.value


def detector() -> tuple[JumpDetector, FixedClock, FakeMonotonic]:
    clock, mono = FixedClock(START), FakeMonotonic()
    return JumpDetector(clock, mono), clock, mono


def let_pass(clock: FixedClock, mono: FakeMonotonic, seconds: float) -> None:
    clock.advance(timedelta(seconds=seconds))
    mono.value += seconds


# -- the detector ------------------------------------------------------------------------------


def test_a_forward_jump_is_not_counted_as_elapsed_time() -> None:
    jumps, clock, mono = detector()
    let_pass(clock, mono, 10)
    before = jumps.now()
    clock.advance(timedelta(hours=1))  # the jump: the wall moves, the monotonic clock not
    let_pass(clock, mono, 5)
    after_jump = jumps.now()
    let_pass(clock, mono, 5)
    now = jumps.now()
    assert jumps.elapsed_s(before, now) == 10  # not 3,610
    assert jumps.elapsed_s(after_jump, now) == 5
    assert jumps.elapsed_s(START - timedelta(seconds=30), now) == 50  # stamped before start
    assert jumps.due_now(now) == now  # what was stored before a forward jump is due early
    assert jumps.keep_since(now, 60) == now - timedelta(seconds=60 + HOUR_S)


def test_a_backward_jump_neither_delays_due_times_nor_ages_anything() -> None:
    jumps, clock, mono = detector()
    let_pass(clock, mono, 10)
    stamped = jumps.now()
    due = stamped + timedelta(seconds=30)
    clock.advance(timedelta(hours=-1))
    let_pass(clock, mono, 30)
    now = jumps.now()
    assert jumps.due_now(now) == due  # due now, not in an hour
    assert jumps.elapsed_s(stamped, now) <= 30  # never more than really passed
    assert jumps.keep_since(now, 60) == now - timedelta(seconds=60)


def test_what_was_stamped_after_a_backward_jump_before_it_was_seen_is_not_aged_by_it() -> None:
    """The detector sees a jump at its next look (the dispatcher looks every few seconds):
    an action stamped by the clock in between is on the new side of the jump, and its age
    must not include the hour the clock went back."""
    jumps, clock, mono = detector()
    let_pass(clock, mono, 10)
    jumps.now()  # the last look before the jump
    clock.advance(timedelta(hours=-1))
    let_pass(clock, mono, 1.9)
    stamped = clock.now()  # an action created after the jump, not yet seen by the detector
    let_pass(clock, mono, 0.1)
    jumps.now()  # the jump is seen now
    let_pass(clock, mono, 2)
    now = jumps.now()
    assert jumps.elapsed_s(stamped, now) <= 2.1  # was 3,602.1


def test_small_drift_is_not_a_jump_and_segments_stay_bounded() -> None:
    clock, mono = FixedClock(START), FakeMonotonic()
    jumps = JumpDetector(clock, mono, max_segments=4)
    for _ in range(10):
        clock.advance(timedelta(seconds=1.5))  # the wall runs 0.5 s/step fast
        mono.value += 1.0
        jumps.now()
    assert len(jumps._segments) <= 4
    now = jumps.now()
    assert jumps.elapsed_s(START, now) <= 15.0


# -- the dispatcher and the daemon -------------------------------------------------------------


async def test_forward_jump_does_not_dead_letter_a_pending_action(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    clock = JumpingClock()

    def script(_hit: Hit, n: int) -> Answer:
        if n == 1:
            clock.jump(HOUR_S)  # while the first attempt is in flight
            return Answer(503, "busy")
        return Answer()

    recv = await receivers(script)
    project = project_factory()
    deploy(project, {"ci": (recv.url, FAST | {"max_age_s": 5})}, {"T-1": [pipeline("ci")]})
    gk = await start_daemon(project, clock=clock)
    await fire(gk, "T-1")
    [action] = await wait_actions(gk, "delivered", 1, timeout_s=5)
    assert action["attempts"] == 2


async def test_forward_jump_does_not_make_a_retry_early(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    clock = JumpingClock()
    slow = await receivers(fail_first(1, Answer(429, "slow down", {"Retry-After": "1"})))
    other = await receivers()
    project = project_factory()
    targets = {"bank": (slow.url, FAST | {"backoff_cap_s": 5}), "chat": (other.url, FAST)}
    deploy(project, targets, {"T-1": [pipeline("bank")], "T-2": [notify("chat")]})
    gk = await start_daemon(project, clock=clock)
    await fire(gk, "T-1")
    await eventually(lambda: len(slow.hits) == 1 and slow.hits[0].status == 429, "429", 5)
    await asyncio.sleep(0.2)  # the retry is scheduled, due in about 1 s
    clock.jump(HOUR_S)
    await fire(gk, "T-2")  # wakes the dispatcher, which looks at the outbox
    await wait_actions(gk, "delivered", 1, timeout_s=5, target="chat")
    await wait_actions(gk, "delivered", 1, timeout_s=5, target="bank")
    first, second = slow.hits
    assert second.arrived_at - first.arrived_at >= 0.95  # Retry-After: 1, not at once


async def test_backward_jump_does_not_delay_a_retry(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    clock = JumpingClock()
    slow = await receivers(fail_first(1, Answer(429, "slow down", {"Retry-After": "1"})))
    project = project_factory()
    deploy(project, {"bank": (slow.url, FAST | {"backoff_cap_s": 5})}, {"T-1": [pipeline("bank")]})
    gk = await start_daemon(project, clock=clock)
    await fire(gk, "T-1")
    await eventually(lambda: len(slow.hits) == 1 and slow.hits[0].status == 429, "429", 5)
    await asyncio.sleep(0.2)
    clock.jump(-HOUR_S)
    await wait_actions(gk, "delivered", 1, timeout_s=6)  # not in an hour
    first, second = slow.hits
    assert 0.95 <= second.arrived_at - first.arrived_at < 4.0


async def test_forward_jump_does_not_forget_idempotency_keys_early(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    clock = JumpingClock()
    project = project_factory(idempotency_window_s=2)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project, clock=clock)
    headers = {"Idempotency-Key": "k-1"}
    body = fact("task", "T-1", status="completed")
    async with gk.session.post(gk.url + "/v1/facts", json=body, headers=headers) as response:
        assert response.status == 200
    clock.jump(2 * 24 * HOUR_S)
    assert await gk.daemon.purge_idempotency_keys() == 0  # kept: 0 s passed, not 2 days
    async with gk.session.post(gk.url + "/v1/facts", json=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers.get("Idempotent-Replayed") == "true"
    await asyncio.sleep(2.2)
    assert await gk.daemon.purge_idempotency_keys() == 1  # the window still ends
