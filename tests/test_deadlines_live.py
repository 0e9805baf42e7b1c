"""Deadlines on the real clock, through the running daemon: a rule that becomes true by the
passing of time alone fires within 1 s of that instant, with no fact posted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from gatekeeper.clock import format_rfc3339

from .conftest import Project, Receiver, fact

HOLD_RULE = """\
id: tower-a/one-minute-hold
project: tower-a
when: task["T-1"].status == "done" and minutes_since(task["T-1"].done_at) >= 1
actions:
  - pipeline: {target: ci, ref: main}
"""


async def test_rule_due_in_two_seconds_fires_within_one_second_of_it(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("hold.yaml", HOLD_RULE)
    gk = await start_daemon(project, tick_s=60.0)  # no polling: the deadline wakes the loop
    due = datetime.now(UTC) + timedelta(seconds=2)
    done_at = due - timedelta(minutes=1)
    done = fact("task", "T-1", status="done", done_at=format_rfc3339(done_at))
    status, _ = await gk.post("/v1/facts", done)
    assert status == 200
    await asyncio.sleep(0.5)
    assert receiver.received == []  # not before its time
    await receiver.wait_for(1, timeout_s=5)
    arrived = datetime.now(UTC)
    lag_s = (arrived - due).total_seconds()
    assert 0 <= lag_s < 1.0, f"fired {lag_s:.3f} s after its deadline"


async def test_idle_daemon_with_deadlines_far_away_does_no_work(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    for n in range(200):
        project.write_rule(
            f"hold{n}.yaml",
            HOLD_RULE.replace("one-minute-hold", f"hold-{n}").replace('"T-1"', f'"T-{n}"'),
        )
    gk = await start_daemon(project, tick_s=60.0)
    soon = format_rfc3339(datetime.now(UTC))
    await gk.post(
        "/v1/facts",
        {"facts": [fact("task", f"T-{n}", status="done", done_at=soon) for n in range(200)]},
    )
    await asyncio.sleep(0.2)
    calls = 0
    real = gk.daemon.writer.engine.plan_rules

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    gk.daemon.writer.engine.plan_rules = counting
    cpu = time.process_time()
    await asyncio.sleep(1.5)
    assert calls == 0  # nothing is due for a minute: no evaluation at all
    assert time.process_time() - cpu < 0.2
    assert len(gk.daemon.ticker.deadlines) == 200


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
