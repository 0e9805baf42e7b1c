"""Per-item rules (``for_each``) in the engine: one instance per fact of the kind, each with
its own state, firing ids ``<rule>[<item>]#<n>``, ``once`` per instance, ``each_time`` edges
per instance, which instances a fact re-evaluates, reloads and admin acts over every
instance, deadlines per instance, and the item in every action body."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gatekeeper.engine.deadlines import DeadlineSchedule, instances_of, schedule_rules
from gatekeeper.engine.evaluate import Engine, apply_transition, instance_paused, rule_paused
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import AdminAct, FactInput, InstanceKey, RuleState, Stand, Transition
from gatekeeper.rules.loader import load_rule_texts, ruleset_version
from gatekeeper.rules.model import Ruleset

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def engine_of(text: str, **options: Any) -> Engine:
    result = load_rule_texts({"rules.yaml": text}, config=None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    counter = iter(range(1, 1_000_000))
    return Engine(result.ruleset, new_action_id=lambda: f"act-{next(counter)}", **options)


def engine_unchecked(*texts: str, **options: Any) -> Engine:
    """An engine over ``texts``, each loaded on its own (as ``rules-<n>.yaml``), so the
    checks that span a ruleset (loops across rules) never see them together: rules
    ``gatekeeper check`` refuses, as a database's last good ruleset might hold them."""
    rules = []
    files = {}
    for n, text in enumerate(texts):
        name = f"rules-{n}.yaml"
        result = load_rule_texts({name: text}, config=None)
        assert result.ruleset is not None, [str(p) for p in result.problems]
        rules += result.ruleset.rules
        files[name] = text
    ruleset = Ruleset(tuple(rules), files, ruleset_version(files))
    counter = iter(range(1, 1_000_000))
    return Engine(ruleset, new_action_id=lambda: f"act-{next(counter)}", **options)


class World:
    """An engine with its facts and states, each planned transition applied at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.facts = FactTable()
        self.states: dict[InstanceKey, RuleState] = {}
        self.approvals: dict[str, dict[str, Stand]] = {}
        self.book = EscrowBook({})

    def post(self, *facts: FactInput, now: datetime = NOW) -> Transition:
        t = self.engine.plan_ingest(self.facts, self.states, list(facts), now, self.book.copy())
        return self.apply(t)

    def apply(self, t: Transition) -> Transition:
        apply_transition(t, self.facts, self.states, self.approvals, self.book)
        return t


def build(build_id: str, status: str, **data: Any) -> FactInput:
    return FactInput("dev", "build", build_id, {"status": status, **data})


FAILED = """
- id: dev/build-failed
  project: dev
  for_each: build
  when: item.data.status == "failed"
  fire: once
  actions:
    - notify: {target: chat, message: "build ${item.id} failed at ${item.data.commit}"}
"""


def test_each_item_is_an_instance_that_fires_once() -> None:
    world = World(engine_of(FAILED))
    first = world.post(build("b1", "failed", commit="abc"))
    [decision] = first.decisions
    assert (decision.instance, decision.outcome) == ("b1", "fired")
    assert decision.firing_id == "dev/build-failed[b1]#1"
    [action] = first.actions
    assert action.instance == "b1"
    assert action.payload["message"] == "build b1 failed at abc"
    assert action.payload["item"] == {
        "kind": "build",
        "id": "b1",
        "data": {"status": "failed", "commit": "abc"},
    }
    second = world.post(build("b2", "failed", commit="def"))
    assert [(d.instance, d.outcome, d.firing_id) for d in second.decisions] == [
        ("b2", "fired", "dev/build-failed[b2]#1")
    ]  # a fact of the for_each kind re-evaluates its own instance only
    again = world.post(build("b1", "failed", commit="abc"))
    assert [(d.instance, d.outcome) for d in again.decisions] == [("b1", "already_fired")]
    assert world.states[("dev/build-failed", "b1")].fired_count == 1
    assert world.states[("dev/build-failed", "b2")].fired_count == 1
    assert ("dev/build-failed", "") not in world.states


EACH_TIME = """
- id: dev/red
  project: dev
  for_each: build
  when: item.data.status == "failed"
  fire: each_time
  actions:
    - notify: {target: chat, message: "red ${item.id}"}
"""


def test_each_time_edges_are_per_instance() -> None:
    world = World(engine_of(EACH_TIME))
    outcomes = []
    for fact in [
        build("b1", "failed"),
        build("b2", "failed"),
        build("b1", "failed"),  # still failed: no edge for b1
        build("b1", "passed"),
        build("b2", "failed"),
        build("b1", "failed"),  # a new edge for b1
    ]:
        [d] = world.post(fact).decisions
        outcomes.append((d.instance, d.outcome, d.firing_id))
    assert outcomes == [
        ("b1", "fired", "dev/red[b1]#1"),
        ("b2", "fired", "dev/red[b2]#1"),
        ("b1", "still_met", None),
        ("b1", "not_met", None),
        ("b2", "still_met", None),
        ("b1", "fired", "dev/red[b1]#2"),
    ]


FREEZE = """
- id: dev/deploy-when-open
  project: dev
  for_each: build
  when: item.data.status == "passed" and freeze.main.on == false
  actions:
    - pipeline: {target: ci, ref: "${item.data.commit}", inputs: {build: "${item.id}"}}
"""


def test_a_fact_read_otherwise_re_evaluates_every_instance() -> None:
    world = World(engine_of(FREEZE))
    world.post(FactInput("dev", "freeze", "main", {"on": True}))
    world.post(build("b2", "passed", commit="c2"), build("b1", "passed", commit="c1"))
    assert world.states[("dev/deploy-when-open", "b1")].gate_open is False
    opened = world.post(FactInput("dev", "freeze", "main", {"on": False}))
    assert [(d.instance, d.outcome) for d in opened.decisions] == [
        ("b1", "fired"),
        ("b2", "fired"),
    ]  # every instance, in item id order
    by_build = {a.payload["inputs"]["build"]: a.payload for a in opened.actions}
    assert by_build["b1"]["ref"] == "c1" and by_build["b2"]["ref"] == "c2"
    assert by_build["b1"]["facts"] == {"freeze.main": {"on": False}}
    assert "build.b1" not in by_build["b1"]["facts"]  # the item is under item, not facts


def test_a_batch_decides_each_instance_once_with_the_whole_batch() -> None:
    world = World(engine_of(FAILED))
    t = world.post(build("b1", "running", commit="x"), build("b1", "failed", commit="y"))
    [decision] = t.decisions
    assert (decision.instance, decision.fact_index, decision.outcome) == ("b1", 1, "fired")
    assert t.actions[0].payload["message"] == "build b1 failed at y"


def test_a_missing_template_name_blocks_the_firing_and_tells_the_alert_target() -> None:
    world = World(engine_of(FAILED, alert_target="ops"))
    t = world.post(build("b9", "failed"))  # no commit
    [decision] = t.decisions
    assert decision.outcome == "blocked"
    assert decision.reason == "template name item.data.commit has no value (notify action 1)"
    assert decision.firing_id == "dev/build-failed[b9]#1"  # a blocked firing counts
    [alert] = t.actions
    assert alert.target == "ops" and alert.instance == "b9"
    assert alert.payload["alert"] == "firing_blocked"
    assert alert.payload["reason"] == decision.reason
    assert "dev/build-failed[b9]#1" in alert.payload["message"]


def test_slack_targets_get_substituted_values_escaped() -> None:
    text = FAILED.replace("build ${item.id} failed", "<b>${item.id}</b> failed")
    world = World(engine_of(text, target_formats={"chat": "slack"}))
    t = world.post(build("b1", "failed", commit="a<b>&c"))
    assert t.actions[0].payload["message"] == "<b>b1</b> failed at a&lt;b&gt;&amp;c"


def test_reload_evaluates_every_instance() -> None:
    engine = engine_of(FAILED)
    facts = FactTable(
        {
            ("dev", "build", "b2"): {"status": "failed", "commit": "2"},
            ("dev", "build", "b1"): {"status": "passed", "commit": "1"},
            ("other", "build", "b3"): {"status": "failed", "commit": "3"},
        }
    )
    t = engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, "reload")
    assert [(d.instance, d.outcome) for d in t.decisions] == [("b1", "not_met"), ("b2", "fired")]
    assert set(t.rule_states) == {("dev/build-failed", "b1"), ("dev/build-failed", "b2")}


def test_admin_acts_take_one_instance_or_every_one() -> None:
    world = World(engine_of(EACH_TIME))
    world.post(build("b1", "failed"), build("b2", "passed"))
    engine = world.engine
    act = AdminAct("pause", "dev/red", "ops", "noisy", "dev", instance="b2")
    world.apply(engine.plan_admin(world.facts, world.states, {}, act, NOW))
    assert world.states[("dev/red", "b2")].paused
    assert not world.states[("dev/red", "b1")].paused
    [paused] = world.post(build("b2", "failed")).decisions
    assert paused.outcome == "paused"
    with pytest.raises(KeyError):
        engine.plan_admin(
            world.facts, world.states, {}, AdminAct("pause", "dev/red", "o", "r", instance="x"), NOW
        )
    # without an item: the rule as a whole; every instance is held (b2 was paused already,
    # so only b1 changes), and so are the instances whose item comes later
    everyone = AdminAct("pause", "dev/red", "ops", "all of them", "dev")
    t = world.apply(engine.plan_admin(world.facts, world.states, {}, everyone, NOW))
    assert [d.instance for d in t.decisions] == ["b1"]
    assert [a.instances for a in t.admin_acts] == [1]
    assert rule_paused(world.states, "dev/red")
    assert not world.states[("dev/red", "b1")].paused  # held by its rule, not by its item
    assert all(instance_paused(world.states, "dev/red", item) for item in ("b1", "b2", "b3"))
    with pytest.raises(ValueError, match="already paused"):
        engine.plan_admin(world.facts, world.states, {}, everyone, NOW)
    later = world.post(build("b3", "failed"))
    assert [(d.instance, d.outcome, d.firing_id) for d in later.decisions] == [
        ("b3", "paused", None)
    ]
    assert later.actions == []
    only_b1 = AdminAct("resume", "dev/red", "ops", "b1 only", "dev", instance="b1")
    with pytest.raises(ValueError, match="paused as a whole"):
        engine.plan_admin(world.facts, world.states, {}, only_b1, NOW)

    # resuming the rule lifts its pause; b2, paused by its item, stays paused
    resume = AdminAct("resume", "dev/red", "ops", "incident over", "dev")
    t = world.apply(engine.plan_admin(world.facts, world.states, {}, resume, NOW))
    assert [d.instance for d in t.decisions] == ["b1", "b3"]
    assert [a.instances for a in t.admin_acts] == [2]
    assert not rule_paused(world.states, "dev/red")
    assert [instance_paused(world.states, "dev/red", i) for i in ("b1", "b2", "b3")] == [
        False,
        True,
        False,
    ]
    world.post(build("b1", "passed"))
    [red] = world.post(build("b1", "failed")).decisions
    assert (red.outcome, red.firing_id) == ("fired", "dev/red[b1]#2")
    # with the rule not paused as a whole, resume resumes the instances paused by item
    t = world.apply(engine.plan_admin(world.facts, world.states, {}, resume, NOW))
    assert [d.instance for d in t.decisions] == ["b2"]
    assert not any(s.paused for s in world.states.values())
    with pytest.raises(ValueError, match="not paused, nor any of its instances"):
        engine.plan_admin(world.facts, world.states, {}, resume, NOW)


def test_a_per_item_rule_is_paused_before_it_has_any_instance() -> None:
    world = World(engine_of(FAILED))
    engine = world.engine
    pause = AdminAct("pause", "dev/build-failed", "ops", "bank incident", "dev")
    t = world.apply(engine.plan_admin(world.facts, world.states, {}, pause, NOW))
    assert t.decisions == [] and [a.instances for a in t.admin_acts] == [0]
    assert t.rule_states == {("dev/build-failed", ""): RuleState("dev/build-failed", paused=True)}
    held = world.post(build("b1", "failed", commit="c1"))
    assert [(d.outcome, d.firing_id) for d in held.decisions] == [("paused", None)]
    assert held.actions == []
    resume = AdminAct("resume", "dev/build-failed", "ops", "bank back", "dev")
    t = world.apply(engine.plan_admin(world.facts, world.states, {}, resume, NOW))
    [fired] = t.decisions  # a once instance whose gate opened while paused fires now
    assert (fired.instance, fired.outcome, fired.firing_id) == (
        "b1",
        "fired",
        "dev/build-failed[b1]#1",
    )
    assert [a.payload["message"] for a in t.actions] == ["build b1 failed at c1"]


HELD = """
- id: dev/stale
  project: dev
  for_each: ticket
  when: days_since(item.data.opened_at) >= 3
  actions:
    - notify: {target: chat, message: "${item.id} open for 3 days"}
"""


def test_deadlines_are_per_instance() -> None:
    engine = engine_of(HELD)
    world = World(engine)
    world.post(
        FactInput("dev", "ticket", "t1", {"opened_at": "2026-11-22T00:00:00Z"}),
        FactInput("dev", "ticket", "t2", {"opened_at": "2026-11-23T06:00:00Z"}),
    )
    schedule: DeadlineSchedule[InstanceKey] = DeadlineSchedule()
    schedule_rules(schedule, engine.time_dependent, world.facts, NOW)
    assert schedule.due_at(("dev/stale", "t1")) == datetime(2026, 11, 25, tzinfo=UTC)
    assert schedule.due_at(("dev/stale", "t2")) == datetime(2026, 11, 26, 6, tzinfo=UTC)
    at = datetime(2026, 11, 25, tzinfo=UTC)
    due = schedule.pop_due(at)
    assert due == [("dev/stale", "t1")]
    t = world.apply(
        engine.plan_instances(world.facts, world.states, due, at, "time", record_unchanged=False)
    )
    assert [(d.instance, d.outcome) for d in t.decisions] == [("t1", "fired")]
    assert instances_of(engine.time_dependent, world.facts) == [
        ("dev/stale", "t1"),
        ("dev/stale", "t2"),
    ]
    later = at + timedelta(days=2)
    assert schedule.pop_due(later) == [("dev/stale", "t2")]


def test_explain_names_the_instance() -> None:
    world = World(engine_of(FAILED))
    world.post(build("b1", "failed", commit="abc"))
    rule = world.engine.rules["dev/build-failed"]
    explained = world.engine.explain(
        rule, world.facts, world.states.get(("dev/build-failed", "b1")), NOW, item="b1"
    )
    assert explained["item"] == {
        "kind": "build",
        "id": "b1",
        "data": {"status": "failed", "commit": "abc"},
    }
    assert explained["fired_count"] == 1 and explained["gate_open"] is True
    with pytest.raises(KeyError):
        world.engine.explain(rule, world.facts, None, NOW, item="nope")


DAEMON_RULE = """
- id: tower-a/build-failed
  project: tower-a
  for_each: build
  when: item.data.status == "failed"
  fire: each_time
  actions:
    - notify: {target: ci, message: "build ${item.id} failed at ${item.data.commit}"}
"""


async def test_the_daemon_keeps_instances_across_a_restart_and_shows_them(
    project_factory: Any, start_daemon: Any, receiver: Any
) -> None:
    from .conftest import fact

    project = project_factory(receiver.url)
    project.write_rule("builds.yaml", DAEMON_RULE)
    gk = await start_daemon(project)
    await gk.post(
        "/v1/facts",
        {
            "facts": [
                fact("build", "b1", status="failed", commit="c1"),
                fact("build", "b2", status="passed", commit="c2"),
            ]
        },
    )
    [sent] = await receiver.wait_for(1)
    assert sent.body["message"] == "build b1 failed at c1"
    assert sent.body["item"] == {
        "kind": "build",
        "id": "b1",
        "data": {"status": "failed", "commit": "c1"},
    }
    status, rules = await gk.get("/v1/rules")
    assert status == 200
    [listed] = rules["rules"]
    assert (listed["for_each"], listed["instances"], listed["fired_count"]) == ("build", 2, 1)
    status, detail = await gk.get("/v1/rules/tower-a/build-failed")
    assert status == 200 and detail["explanation"]["item"] is None
    one = await gk.daemon.rule_detail("tower-a/build-failed", 5, "b1")
    assert one["item"] == "b1" and one["explanation"]["gate_open"] is True
    assert {d["instance"] for d in one["recent_decisions"]} == {"b1"}
    page = gk.daemon.rule_instances(gk.daemon.rule("tower-a/build-failed"), limit=1)
    assert [i["item"] for i in page["instances"]] == ["b1"] and page["next_cursor"] == "b1"
    await gk.daemon.administer(
        AdminAct("pause", "tower-a/build-failed", "ops", "flaky", "tower-a", instance="b2")
    )
    [action] = await gk.daemon.store.list_actions()
    assert (action.instance, action.firing_id) == ("b1", "tower-a/build-failed[b1]#1")
    status, snapshot = await gk.get("/v1/export")
    assert status == 200
    assert {(s["rule_id"], s.get("instance")) for s in snapshot["rule_states"]} == {
        ("tower-a/build-failed", "b1"),
        ("tower-a/build-failed", "b2"),
    }
    await gk.stop()

    gk = await start_daemon(project)
    states = gk.daemon.writer.states
    assert states[("tower-a/build-failed", "b1")].fired_count == 1
    assert states[("tower-a/build-failed", "b2")].paused
    await gk.post("/v1/facts", fact("build", "b2", status="failed", commit="c3"))
    [paused] = await gk.daemon.store.list_decisions("tower-a/build-failed", 1, instance="b2")
    assert paused.outcome == "paused"
    assert len(receiver.received) == 1


def test_a_reload_records_only_the_instances_it_changes() -> None:
    world = World(engine_of(FAILED))
    world.post(build("b1", "failed", commit="1"), build("b2", "passed", commit="2"))
    engine = world.engine
    again = engine.plan_rules(world.facts, world.states, engine.ruleset.rules, NOW, "reload")
    assert again.decisions == [] and again.rule_states == {}  # nothing changed
    world.facts.put(("dev", "build", "b2"), {"status": "failed", "commit": "2"})  # unseen
    changed = engine.plan_rules(world.facts, world.states, engine.ruleset.rules, NOW, "reload")
    assert [(d.instance, d.outcome) for d in changed.decisions] == [("b2", "fired")]
    other = engine_of(FAILED.replace("failed at", "broke at"))  # another version of the rule
    t = other.plan_rules(world.facts, world.states, other.ruleset.rules, NOW, "reload")
    assert [(d.instance, d.outcome) for d in t.decisions] == [
        ("b1", "already_fired"),
        ("b2", "fired"),
    ]
    # as the daemon reloads: b1 decides nothing new (it fired already), its state records
    # the new version without a decision; b2 fires
    t = other.plan_rules(
        world.facts, world.states, other.ruleset.rules, NOW, "reload", record_first=False
    )
    assert [(d.instance, d.outcome) for d in t.decisions] == [("b2", "fired")]
    assert (
        t.rule_states[("dev/build-failed", "b1")].rule_hash
        == other.rules["dev/build-failed"].content_hash
    )


def test_a_new_per_item_rule_over_many_items_keeps_states_not_decisions() -> None:
    """A per-item rule loaded over existing items: an instance whose condition does not hold
    gets a state (recording the rule version, so the next reload skips it) and no decision:
    a rule over 100,000 items does not write 100,000 decisions."""
    world = World(engine_of(FAILED))
    world.post(*[build(f"b{n}", "passed", commit=str(n)) for n in range(50)])
    world.post(build("b50", "failed", commit="50"))
    other = engine_of(FAILED.replace("failed at", "broke at"))
    states = {k: v for k, v in world.states.items() if k[1] == "b50"}  # b0..b49: never seen
    t = other.plan_rules(
        world.facts, states, other.ruleset.rules, NOW, "reload", record_first=False
    )
    assert [(d.instance, d.outcome) for d in t.decisions] == []  # b50 fired already
    assert len(t.rule_states) == 51
    world.states.clear()
    world.states.update(states)
    world.apply(t)
    again = other.plan_rules(
        world.facts, world.states, other.ruleset.rules, NOW, "reload", record_first=False
    )
    assert again.decisions == [] and again.rule_states == {}


GATED = """
- id: dev/ship
  project: dev
  for_each: build
  when: item.data.status == "passed"
  approvals: {required: 1, from: [alice]}
  actions:
    - pipeline: {target: ci, ref: "${item.data.commit}"}
"""


def test_an_approval_counts_for_the_instance_it_names() -> None:
    from gatekeeper.engine.model import ApprovalInput

    world = World(engine_of(GATED))
    t = world.post(build("b1", "passed", commit="c1"), build("b2", "passed", commit="c2"))
    assert [d.outcome for d in t.decisions] == ["awaiting_approvals", "awaiting_approvals"]
    approval = ApprovalInput("dev/ship", "dev", "alice", "approve", instance="b2")
    t = world.apply(
        world.engine.plan_approval(world.facts, world.states, world.approvals, approval, NOW)
    )
    assert [(d.instance, d.outcome, d.firing_id) for d in t.decisions] == [
        ("b2", "fired", "dev/ship[b2]#1")
    ]
    assert t.actions[0].payload["ref"] == "c2"
    assert world.approvals == {"dev/ship[b2]": {"alice": Stand("approve", NOW)}}
    [still] = world.post(build("b1", "passed", commit="c1")).decisions
    assert still.outcome == "awaiting_approvals"  # b2's approval is not b1's
    rule = world.engine.rules["dev/ship"]
    explained = world.engine.explain(rule, world.facts, None, NOW, world.approvals, item="b2")
    assert explained["approvals"]["approved_by"] == ["alice"]


async def test_a_daemon_loading_a_per_item_rule_over_many_items_writes_states_not_decisions(
    project_factory: Any, start_daemon: Any, receiver: Any
) -> None:
    from .conftest import DEPLOY_RULE, fact

    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    builds = [fact("build", f"b{n}", status="passed", commit=f"c{n}") for n in range(40)]
    builds.append(fact("build", "b40", status="failed", commit="c40"))
    status, _ = await gk.post("/v1/facts", {"facts": builds})
    assert status == 200
    project.write_rule("builds.yaml", DAEMON_RULE)  # a new rule over 41 existing items
    assert await gk.daemon.reload()
    [sent] = await receiver.wait_for(1)
    assert sent.body["item"]["id"] == "b40"
    decisions = await gk.daemon.store.list_decisions("tower-a/build-failed", 1000)
    assert [(d.instance, d.outcome) for d in decisions] == [("b40", "fired")]
    states = gk.daemon.writer.states
    assert len([k for k in states if k[0] == "tower-a/build-failed"]) == 41
    await gk.stop()

    gk = await start_daemon(project)  # the states were stored: nothing to decide again
    assert await gk.daemon.store.list_decisions("tower-a/build-failed", 1000) == decisions
    await gk.post("/v1/facts", fact("build", "b7", status="failed", commit="c7"))
    [fired] = await gk.daemon.store.list_decisions("tower-a/build-failed", 1, instance="b7")
    assert fired.outcome == "fired"
