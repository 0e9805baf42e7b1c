"""Rules over many things in the store: decisions, outbox entries and rule states of rule
instances ``(rule id, item id)``, a per-item decision's item kept by reference (its fact log
``seq``), and facts recorded by rules (``caused_by``) in the fact log and current facts."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    CausedBy,
    FactInput,
    QueuedAction,
    RuleState,
    Stand,
    Transition,
)
from gatekeeper.expr import Evaluation
from gatekeeper.store import Store
from gatekeeper.store.queries import AuditQuery

from . import build
from .conftest import Backend

RULE = "dev/build-failed"


def _instance_firing(item: str, n: int, seconds: int, data: dict[str, object]) -> Transition:
    """A build fact ``item`` posted and the firing of the rule's instance on it."""
    when = build.at(seconds)
    firing_id = f"{RULE}[{item}]#{n}"
    decision = replace(
        build.decision(RULE, when, project="dev", fact_index=0),
        firing_id=firing_id,
        instance=item,
        item_kind="build",
        evaluation=Evaluation(True, (), seen={}),
    )
    action = QueuedAction(
        f"act-{item}-{n}",
        "notify",
        "chat",
        RULE,
        firing_id,
        {"project": "dev", "item": {"kind": "build", "id": item, "data": data}},
        format_rfc3339(when),
        instance=item,
    )
    return Transition(
        facts=[FactInput("dev", "build", item, data)],
        decisions=[decision],
        rule_states={
            (RULE, item): RuleState(RULE, True, n, decision.decided_at, "h", instance=item)
        },
        actions=[action],
        planned_at=when,
    )


async def test_instances_keep_their_own_decisions_actions_and_states(store: Store) -> None:
    await store.commit_transition(_instance_firing("b1", 1, 0, {"status": "failed"}))
    await store.commit_transition(_instance_firing("b2", 1, 1, {"status": "failed"}))
    await store.commit_transition(_instance_firing("b1", 2, 2, {"status": "failed", "n": 2}))
    states = await store.load_rule_states()
    assert {key: s.fired_count for key, s in states.items()} == {(RULE, "b1"): 2, (RULE, "b2"): 1}
    b1 = await store.list_decisions(RULE, instance="b1")
    assert [d.firing_id for d in b1] == [f"{RULE}[b1]#2", f"{RULE}[b1]#1"]
    assert [d.instance for d in await store.list_decisions(RULE)] == ["b1", "b2", "b1"]
    assert b1[0].to_json()["instance"] == "b1"
    # the decision keeps its item by reference and shows the data it had then
    assert b1[0].evaluation["item"] == {
        "kind": "build",
        "id": "b1",
        "seq": 3,
        "data": {"status": "failed", "n": 2},
    }
    assert b1[1].evaluation["item"]["data"] == {"status": "failed"}
    actions = {a.action_id: a for a in await store.list_actions()}
    assert actions["act-b2-1"].instance == "b2"
    assert actions["act-b2-1"].to_json()["instance"] == "b2"


async def test_an_item_not_written_with_the_decision_is_looked_up(store: Store) -> None:
    await store.commit_transition(build.facts(build.T0, ("dev", "build", "b7", {"s": 1})))
    decision = replace(
        build.decision(RULE, build.at(1), project="dev", firing=None, outcome="not_met"),
        instance="b7",
        item_kind="build",
    )
    await store.commit_transition(Transition(decisions=[decision], planned_at=build.at(1)))
    [shown] = await store.list_decisions(RULE, instance="b7")
    assert shown.evaluation["item"] == {"kind": "build", "id": "b7", "seq": 1, "data": {"s": 1}}


async def test_the_stored_decision_holds_the_items_seq_not_its_data(backend: Backend) -> None:
    store = await backend.open()
    big = {"log": "x" * 5000}
    await store.commit_transition(_instance_firing("b1", 1, 0, big))
    if backend.name == "sqlite":
        path = Path(backend.url.removeprefix("sqlite:///"))
        with sqlite3.connect(path) as db:
            (text,) = db.execute("SELECT evaluation FROM decisions").fetchone()
        stored = json.loads(text)
        assert stored["reads"]["item"] == {"kind": "build", "id": "b1", "seq": 1}
        assert len(text) < 500


async def test_facts_set_by_rules_keep_caused_by(store: Store) -> None:
    caused = CausedBy("site/milestone-complete", "m1", "site/milestone-complete[m1]#1", 1)
    await store.commit_transition(
        Transition(
            facts=[
                FactInput("site", "task", "T-1", {"status": "done"}),
                FactInput("site", "milestone_status", "m1", {"status": "complete"}, caused),
            ],
            planned_at=build.T0,
        )
    )
    posted, set_by_rule = await store.fact_log()
    assert posted.caused_by is None and "caused_by" not in posted.to_json()
    expected = {
        "rule_id": "site/milestone-complete",
        "instance": "m1",
        "firing_id": "site/milestone-complete[m1]#1",
        "depth": 1,
    }
    assert set_by_rule.caused_by == expected
    assert set_by_rule.to_json()["caused_by"] == expected
    current = {f.kind: f for f in await store.list_facts("site")}
    assert current["milestone_status"].caused_by == expected
    assert current["task"].caused_by is None and "caused_by" not in current["task"].to_json()
    # posted again, the current fact is no longer one a rule set
    await store.commit_transition(
        build.facts(build.at(1), ("site", "milestone_status", "m1", {"status": "open"}))
    )
    current = {f.kind: f for f in await store.list_facts("site")}
    assert current["milestone_status"].caused_by is None


async def test_the_audit_log_names_instances(store: Store) -> None:
    await store.commit_transition(_instance_firing("b1", 1, 0, {"status": "failed"}))
    await store.commit_transition(build.firing("dev/plain", 1, build.at(1), project="dev"))
    act = AdminAct("pause", RULE, "ops", "flaky", "dev", instance="b1")
    await store.commit_transition(Transition(admin_acts=[act], planned_at=build.at(2)))
    approval = ApprovalInput(RULE, "dev", "alice", "approve", "ok", instance="b1")
    await store.commit_transition(Transition(approvals=[approval], planned_at=build.at(3)))
    entries = await store.audit(AuditQuery(project="dev"))
    assert [(e.kind, e.rule_id, e.instance) for e in entries] == [
        ("approval", RULE, "b1"),
        ("admin_act", RULE, "b1"),
        ("decision", "dev/plain", ""),
        ("decision", RULE, "b1"),
    ]
    assert entries[0].to_json()["instance"] == "b1"
    assert "instance" not in entries[2].to_json()
    only = await store.audit(AuditQuery(rule_id=RULE, instance="b1", kinds=("decision",)))
    assert [e.firing_id for e in only] == [f"{RULE}[b1]#1"]
    assert await store.audit(AuditQuery(instance="b2")) == []


async def test_an_act_on_a_rule_as_a_whole_keeps_how_many_instances_it_changed(
    store: Store,
) -> None:
    whole = RuleState(RULE, paused=True)  # a per-item rule paused as a whole: instance ""
    act = AdminAct("pause", RULE, "ops", "bank incident", "dev", instances=3)
    await store.commit_transition(
        Transition(admin_acts=[act], rule_states={(RULE, ""): whole}, planned_at=build.at(1))
    )
    one = AdminAct("resume", RULE, "ops", "b1 is fine", "dev", instance="b1")
    await store.commit_transition(Transition(admin_acts=[one], planned_at=build.at(2)))
    entries = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert [(e.what, e.instance, e.instances) for e in entries] == [
        ("resume", "b1", None),
        ("pause", "", 3),
    ]
    assert entries[1].to_json()["instances"] == 3
    assert "instances" not in entries[0].to_json()
    assert (await store.load_rule_states())[(RULE, "")] == whole


async def test_approvals_of_an_instance_are_kept_apart(store: Store) -> None:
    plain = ApprovalInput("dev/plain", "dev", "alice", "approve")
    one = ApprovalInput(RULE, "dev", "alice", "approve", instance="b1")
    other = ApprovalInput(RULE, "dev", "alice", "reject", instance="b2")
    await store.commit_transition(Transition(approvals=[plain, one, other], planned_at=build.T0))
    withdrawn = ApprovalInput(RULE, "dev", "alice", "withdraw", instance="b2")
    await store.commit_transition(Transition(approvals=[withdrawn], planned_at=build.at(1)))
    # the standing approvals of rules as a whole are loaded as before, an instance's apart
    assert await store.load_approvals() == {
        "dev/plain": {"alice": Stand("approve", build.T0)},
        f"{RULE}[b1]": {"alice": Stand("approve", build.T0)},
    }
    logged = [f.data for f in await store.fact_log() if f.kind == "approval"]
    assert [d.get("instance") for d in logged] == [None, "b1", "b2", "b2"]


async def test_collections_are_stored_as_counts_and_ids(backend: Backend) -> None:
    from gatekeeper.expr import CollectionSeen

    store = await backend.open()
    tasks = [("site", "task", f"T-{i}", {"status": "open", "note": "x" * 200}) for i in range(300)]
    await store.commit_transition(build.facts(build.T0, *tasks))
    seen = CollectionSeen(
        'all(t.data.status == "done" for t in task)',
        "all",
        "task",
        300,
        0,
        tuple(sorted(f"T-{i}" for i in range(300)))[:20],
        False,
    )
    decision = replace(
        build.decision("site/done", build.at(1), project="site", outcome="not_met", firing=None),
        evaluation=Evaluation(False, (), seen={}, collections=(seen,)),
    )
    await store.commit_transition(Transition(decisions=[decision], planned_at=build.at(1)))
    [shown] = await store.list_decisions("site/done")
    [collection] = shown.evaluation["collections"]
    assert collection == {
        "text": 'all(t.data.status == "done" for t in task)',
        "function": "all",
        "kind": "task",
        "items": 300,
        "true": 0,
        "false_ids": list(seen.false_ids),
        "value": False,
        "as_of_seq": 300,
    }
    if backend.name == "sqlite":
        path = Path(backend.url.removeprefix("sqlite:///"))
        with sqlite3.connect(path) as db:
            (text,) = db.execute("SELECT evaluation FROM decisions").fetchone()
        assert len(text) < 1000  # 300 facts of 200+ characters each: none copied
