"""Deadlines on the real clock, through the running daemon: a rule that becomes true by the
passing of time alone fires at that instant (never before it, and no later than the event
loop itself can run anything then), with no fact posted; an idle daemon does no work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from gatekeeper.clock import SystemClock, format_rfc3339, parse_rfc3339

from .conftest import Project, Receiver, fact

HOLD_RULE = """\
id: tower-a/one-minute-hold
project: tower-a
when: task["T-1"].status == "done" and minutes_since(task["T-1"].done_at) >= 1
actions:
  - pipeline: {target: ci, ref: main}
"""


class CountingClock(SystemClock):
    """The system clock, counting its reads: the daemon reads it whenever it wakes up to look
    at deadlines, evaluate or deliver anything."""

    def __init__(self) -> None:
        self.reads = 0

    def now(self) -> datetime:
        self.reads += 1
        return super().now()


async def test_rule_due_in_three_seconds_fires_at_its_deadline(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("hold.yaml", HOLD_RULE)
    gk = await start_daemon(project, tick_s=60.0)  # no polling: the deadline wakes the loop
    done_at = parse_rfc3339(format_rfc3339(datetime.now(UTC) + timedelta(seconds=3)))
    done_at -= timedelta(minutes=1)
    due = done_at + timedelta(minutes=1)
    # A timer of our own at the deadline, on the daemon's event loop: when the loop itself
    # got round to it. On a loaded machine the loop can be late; the daemon must not be
    # later than the loop.
    loop = asyncio.get_running_loop()
    loop_woke: list[datetime] = []
    in_s = (due - datetime.now(UTC)).total_seconds()
    loop.call_later(in_s, lambda: loop_woke.append(datetime.now(UTC)))
    done = fact("task", "T-1", status="done", done_at=format_rfc3339(done_at))
    status, _ = await gk.post("/v1/facts", done)
    assert status == 200
    [pipeline] = await receiver.wait_for(1, timeout_s=30)
    # fired_at is the instant the daemon decided (its clock, to the millisecond; the
    # deadline is a whole millisecond): never before its time, ...
    fired_at = parse_rfc3339(pipeline.body["fired_at"])
    assert fired_at >= due, f"fired {(due - fired_at).total_seconds():.3f} s early"
    # ... and as soon as the event loop could run anything at that instant: woken by the
    # deadline, not by the 60 s tick nor a poll.
    [woke] = loop_woke
    lag_s = (fired_at - woke).total_seconds()
    assert lag_s < 1.0, f"fired {lag_s:.3f} s after the event loop reached its deadline"


async def test_idle_daemon_with_deadlines_far_away_does_no_work(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    for n in range(200):
        project.write_rule(
            f"hold{n}.yaml",
            HOLD_RULE.replace("one-minute-hold", f"hold-{n}").replace('"T-1"', f'"T-{n}"'),
        )
    clock = CountingClock()
    gk = await start_daemon(project, clock=clock, tick_s=60.0)
    calls = 0
    real = gk.daemon.writer.engine.plan_instances

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    gk.daemon.writer.engine.plan_instances = counting
    soon = format_rfc3339(datetime.now(UTC))
    await gk.post(
        "/v1/facts",
        {"facts": [fact("task", f"T-{n}", status="done", done_at=soon) for n in range(200)]},
    )
    # the ingest, then one pass of the deadline loop (the facts moved its next deadline)
    assert await wait_until(lambda: calls >= 2, timeout_s=30)
    await asyncio.sleep(0.2)
    calls, reads = 0, clock.reads
    await asyncio.sleep(1.5)
    assert calls == 0  # nothing is due for a minute: no evaluation at all
    # nor any other work: nothing woke up to as much as look at the clock (a daemon that
    # polled anything, even without evaluating, would)
    assert clock.reads == reads, f"{clock.reads - reads} clock reads while idle"
    assert len(gk.daemon.ticker.deadlines) == 200


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``condition`` came true within ``timeout_s`` seconds (looked at every 10 ms)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not condition():
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_deadline_that_passed_while_down_fires_at_start(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    from gatekeeper.clock import FixedClock

    project = project_factory(receiver.url)
    project.write_rule("hold.yaml", HOLD_RULE)
    clock = FixedClock(datetime(2026, 11, 1, 9, 0, tzinfo=UTC))
    gk = await start_daemon(project, clock=clock)
    await gk.post("/v1/facts", fact("task", "T-1", status="done", done_at="2026-11-01T09:00:00Z"))
    await gk.stop()
    assert receiver.received == []
    clock.set(datetime(2026, 11, 1, 9, 5, tzinfo=UTC))  # the deadline (09:01) passed while down
    await start_daemon(project, clock=clock)
    await receiver.wait_for(1, timeout_s=5)
