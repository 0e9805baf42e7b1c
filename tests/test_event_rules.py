"""Event rules (``fire: each_fact``): decided once per triggering fact of a batch, each seeing
the batch applied up to and including it; firing every time the condition holds (the same
status posted twice fires twice); never on reloads, ticks or admin acts; exactly once per
(rule, instance, fact seq), the decision committed with its fact, across a restart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.model import FactInput

from .conftest import Project
from .test_instances import NOW, World, build, engine_of

TESTS = """
- id: dev/test-failed
  project: dev
  when: test_run.latest.status == "failed"
  fire: each_fact
  actions:
    - notify: {target: chat, message: "test ${test_run.latest.name} failed"}
"""

PER_ITEM = """
- id: dev/build-failed
  project: dev
  for_each: build
  when: item.data.status == "failed"
  fire: each_fact
  actions:
    - notify: {target: chat, message: "build ${item.id} failed"}
"""


def run(status: str, name: str = "t") -> FactInput:
    return FactInput("dev", "test_run", "latest", {"status": status, "name": name})


def test_the_same_status_posted_twice_fires_twice() -> None:
    world = World(engine_of(TESTS))
    firings = []
    for fact in [run("failed", "a"), run("failed", "b"), run("passed"), run("failed", "c")]:
        [d] = world.post(fact).decisions
        firings.append((d.outcome, d.firing_id))
    assert firings == [
        ("fired", "dev/test-failed#1"),
        ("fired", "dev/test-failed#2"),
        ("not_met", None),
        ("fired", "dev/test-failed#3"),
    ]


def test_each_fact_of_a_batch_is_decided_on_the_batch_up_to_it() -> None:
    world = World(engine_of(TESTS))
    t = world.post(run("failed", "a"), run("passed"), run("failed", "b"), run("failed", "c"))
    assert [(d.fact_index, d.outcome) for d in t.decisions] == [
        (0, "fired"),
        (1, "not_met"),
        (2, "fired"),
        (3, "fired"),
    ]
    assert [a.payload["message"] for a in t.actions] == [
        "test a failed",
        "test b failed",
        "test c failed",
    ]
    assert world.states[("dev/test-failed", "")].fired_count == 3


def test_a_per_item_event_rule_is_triggered_by_its_own_item_only() -> None:
    text = PER_ITEM.replace(
        'item.data.status == "failed"', 'item.data.status == "failed" and alerts.dev.on'
    )
    world = World(engine_of(text))
    world.post(FactInput("dev", "alerts", "dev", {"on": False}))
    world.post(build("b1", "failed"))
    # another fact the rule reads does not trigger an event rule
    t = world.post(FactInput("dev", "alerts", "dev", {"on": True}))
    assert t.decisions == [] and t.actions == []
    t = world.post(build("b1", "failed"), build("b2", "failed"), build("b1", "failed"))
    assert [(d.instance, d.fact_index, d.firing_id) for d in t.decisions] == [
        ("b1", 0, "dev/build-failed[b1]#1"),
        ("b2", 1, "dev/build-failed[b2]#1"),
        ("b1", 2, "dev/build-failed[b1]#2"),
    ]


def test_reloads_and_ticks_do_not_fire_an_event_rule() -> None:
    engine = engine_of(TESTS)
    facts = FactTable({("dev", "test_run", "latest"): {"status": "failed", "name": "a"}})
    for trigger in ("reload", "time"):
        t = engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, trigger)  # type: ignore[arg-type]
        assert [(d.outcome, d.firing_id) for d in t.decisions] == [("still_met", None)]
        assert t.actions == []


async def test_exactly_once_per_fact_across_a_restart(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule(
        "tests.yaml",
        TESTS.replace("dev/", "tower-a/")
        .replace("project: dev", "project: tower-a")
        .replace("target: chat", "target: ci"),
    )
    gk = await start_daemon(project)
    body = {
        "facts": [
            {"project": "tower-a", "kind": "test_run", "id": "latest", "data": d}
            for d in ({"status": "failed", "name": "a"}, {"status": "failed", "name": "b"})
        ]
    }
    status, _ = await gk.post("/v1/facts", body)
    assert status in (200, 201)
    await receiver.wait_for(2)
    await gk.stop()
    gk = await start_daemon(project)  # a restart evaluates the rule, but fires nothing
    status, _ = await gk.post(
        "/v1/facts",
        {"project": "tower-a", "kind": "test_run", "id": "latest", "data": {"status": "passed"}},
    )
    decisions = await gk.daemon.store.list_decisions("tower-a/test-failed")
    fired = sorted(d.firing_id for d in decisions if d.firing_id)
    assert fired == ["tower-a/test-failed#1", "tower-a/test-failed#2"]
    assert [d.fact_seq for d in decisions if d.firing_id] == [2, 1]
    assert [(d.trigger, d.outcome) for d in decisions] == [
        ("fact", "not_met"),
        ("reload", "still_met"),  # the restart: met, but no fact, so no firing
        ("fact", "fired"),
        ("fact", "fired"),
        ("reload", "not_met"),
    ]
    messages = sorted(r.body["message"] for r in receiver.received)
    assert messages == ["test a failed", "test b failed"]
