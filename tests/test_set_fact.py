"""Rules that set facts (``set_fact``): the fact goes into the same transition as the firing,
with ``caused_by``, and is evaluated like a posted fact (rules chain, level by level, in a
deterministic order); a chain deeper than ``max_chain_depth`` is cut: the firing is
``blocked`` with a reason and the alert target told. Through the daemon: the fact log and the
fact views show ``caused_by``, and a chain is committed as one transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatekeeper.engine.model import CausedBy, FactInput

from .conftest import Project, fact
from .test_instances import NOW, World, engine_of, engine_unchecked

CHAIN = """
- id: site/milestone-complete
  project: site
  for_each: milestone
  when: task["T-1"].status == "done" and task["T-2"].status == "done"
  fire: once
  actions:
    - set_fact:
        kind: milestone_status
        id: "${item.id}"
        data: {status: complete, by: "${rule_id}"}

- id: site/release
  project: site
  for_each: milestone_status
  when: item.data.status == "complete"
  actions:
    - notify: {target: chat, message: "milestone ${item.id} complete"}
"""


def task(task_id: str, status: str, milestone: str = "m1") -> FactInput:
    return FactInput("site", "task", task_id, {"status": status, "milestone": milestone})


def test_a_fact_set_by_a_rule_is_evaluated_in_the_same_transition() -> None:
    world = World(engine_of(CHAIN))
    world.post(FactInput("site", "milestone", "m1", {"title": "structure"}))
    world.post(task("T-1", "done"), task("T-2", "open"))
    t = world.post(task("T-2", "done"))
    assert [f.key for f in t.facts] == [
        ("site", "task", "T-2"),
        ("site", "milestone_status", "m1"),
    ]
    set_fact = t.facts[1]
    assert set_fact.data == {"status": "complete", "by": "site/milestone-complete"}
    assert set_fact.caused_by == CausedBy(
        "site/milestone-complete", "m1", "site/milestone-complete[m1]#1", 1
    )
    assert [(d.rule_id, d.instance, d.outcome, d.fact_index) for d in t.decisions] == [
        ("site/milestone-complete", "m1", "fired", 0),
        ("site/release", "m1", "fired", 1),
    ]
    [notify] = t.actions  # set_fact is recorded, not sent
    assert notify.payload["message"] == "milestone m1 complete"
    assert world.facts.get(("site", "milestone_status", "m1")) == set_fact.data


PING = """
- id: p/ping
  project: p
  for_each: ping
  when: item.data.n < 100
  fire: each_fact
  actions:
    - set_fact: {kind: pong, id: "${item.id}", data: {n: "${item.data.n}"}}
"""

PONG_NEW_ID = """
- id: p/pong
  project: p
  for_each: pong
  when: item.data.n != "x"
  fire: each_fact
  actions:
    - set_fact: {kind: ping, id: "${item.id}1", data: {n: 1}}
"""
"""With ``PING``, each round pings a new item (a, a1, a11...): no rule instance fires twice
in the chain, only the depth bound stops it (``gatekeeper check`` refuses the two rules
together: a loop; see ``test_loops``)."""


def test_a_chain_deeper_than_the_bound_is_blocked_and_alerted() -> None:
    world = World(engine_unchecked(PING, PONG_NEW_ID, max_chain_depth=3, alert_target="ops"))
    t = world.post(FactInput("p", "ping", "a", {"n": 0}))
    assert [(f.kind, f.caused_by.depth if f.caused_by else 0) for f in t.facts] == [
        ("ping", 0),
        ("pong", 1),
        ("ping", 2),
        ("pong", 3),
    ]
    assert [(d.rule_id, d.outcome) for d in t.decisions] == [
        ("p/ping", "fired"),
        ("p/pong", "fired"),
        ("p/ping", "fired"),
        ("p/pong", "blocked"),
    ]
    blocked = t.decisions[-1]
    assert blocked.reason == (
        "set_fact chain deeper than max_chain_depth 3: ping would be set at depth 4"
    )
    [alert] = t.actions
    assert alert.target == "ops" and alert.firing_id == blocked.firing_id
    assert alert.payload["alert"] == "firing_blocked"
    assert alert.payload["reason"] == blocked.reason


def test_the_default_bound_is_sixteen() -> None:
    world = World(engine_unchecked(PING, PONG_NEW_ID))
    t = world.post(FactInput("p", "ping", "a", {"n": 0}))
    assert len(t.facts) == 17  # the posted fact and 16 set by rules
    assert t.decisions[-1].outcome == "blocked"


def test_a_set_fact_template_without_a_value_blocks_the_firing() -> None:
    text = CHAIN.replace('id: "${item.id}"', 'id: "${item.data.code}"')
    world = World(engine_of(text, alert_target="ops"))
    world.post(FactInput("site", "milestone", "m1", {"title": "structure"}))
    t = world.post(task("T-1", "done"), task("T-2", "done"))
    [decision] = t.decisions
    assert decision.outcome == "blocked"
    assert decision.reason == "template name item.data.code has no value (set_fact action 1)"
    assert [f.kind for f in t.facts] == ["task", "task"]  # nothing set


INVOICES = """
- id: site/invoice
  project: site
  for_each: order
  when: item.data.ok == "yes"
  actions:
    - set_fact: {kind: invoice, id: "${item.data.ref}", data: {status: due}}
"""


def test_a_rendered_set_fact_id_must_be_a_fact_id() -> None:
    world = World(engine_of(INVOICES, alert_target="ops"))
    odd = ["", "A B]#1", "x" * 5000, "ü\u0000", "inv-1\n"]
    for n, ref in enumerate(odd):
        t = world.post(FactInput("site", "order", f"o{n}", {"ok": "yes", "ref": ref}))
        [decision] = t.decisions
        assert decision.outcome == "blocked", ref
        assert decision.reason is not None
        assert decision.reason.startswith("set_fact id ")
        assert decision.reason.endswith(
            "is not a valid fact id (letters, digits and _ . -, starting with a letter or "
            "digit, at most 128 characters) (set_fact action 1)"
        )
        assert [f.kind for f in t.facts] == ["order"]  # nothing set
        [alert] = t.actions
        assert alert.target == "ops" and alert.payload["reason"] == decision.reason
    long = world.post(FactInput("site", "order", "o9", {"ok": "yes", "ref": "y" * 5000}))
    assert "y" * 63 + "…' is not" in (long.decisions[0].reason or "")  # shown cut
    t = world.post(FactInput("site", "order", "o10", {"ok": "yes", "ref": "inv-10"}))
    assert [(f.kind, f.id) for f in t.facts] == [("order", "o10"), ("invoice", "inv-10")]


async def test_the_daemon_commits_the_chain_and_shows_caused_by(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule(
        "chain.yaml",
        CHAIN.replace("site/", "tower-a/")
        .replace("project: site", "project: tower-a")
        .replace("target: chat", "target: ci"),
    )
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("milestone", "m1", title="structure"))
    body = {
        "facts": [
            fact("task", "T-1", status="done", milestone="m1"),
            fact("task", "T-2", status="done", milestone="m1"),
        ]
    }
    answers = []
    for _ in range(2):  # the second time, a repeat answered from the Idempotency-Key
        async with gk.session.post(
            gk.url + "/v1/facts", json=body, headers={"Idempotency-Key": "tasks-1"}
        ) as response:
            assert response.status in (200, 201)
            answers.append(await response.json())
    # the answer counts the posted facts, not the one their rules set
    assert answers[0]["accepted"] == 2 and answers[0]["seqs"] == [2, 3]
    assert answers[1]["seqs"] == answers[0]["seqs"]
    [sent] = await receiver.wait_for(1)
    assert sent.body["message"] == "milestone m1 complete"
    assert sent.body["item"] == {
        "kind": "milestone_status",
        "id": "m1",
        "data": {"status": "complete", "by": "tower-a/milestone-complete"},
    }
    logged = await gk.daemon.store.fact_log()
    assert [(f.kind, f.caused_by) for f in logged] == [
        ("milestone", None),
        ("task", None),
        ("task", None),
        (
            "milestone_status",
            {
                "rule_id": "tower-a/milestone-complete",
                "instance": "m1",
                "firing_id": "tower-a/milestone-complete[m1]#1",
                "depth": 1,
            },
        ),
    ]
    status, page = await gk.get("/v1/facts")
    assert status == 200
    shown = {f["kind"]: f for f in page["facts"]}
    assert shown["milestone_status"]["caused_by"]["firing_id"] == (
        "tower-a/milestone-complete[m1]#1"
    )
    assert "caused_by" not in shown["task"]
    status, rules = await gk.get("/v1/rules")
    assert status == 200
    listed = {r["id"]: r for r in rules["rules"]}
    assert listed["tower-a/milestone-complete"]["actions"] == [
        {"set_fact": {"kind": "milestone_status"}}
    ]
    status, _ = await gk.get("/v1/rules/tower-a/release")
    assert status == 200
    assert gk.daemon.writer.facts.get(("tower-a", "milestone_status", "m1")) is not None
    # a restart loads the set fact and fires nothing again
    await gk.stop()
    gk = await start_daemon(project)
    decisions = await gk.daemon.store.list_decisions("tower-a/release")
    assert [d.firing_id for d in decisions if d.firing_id] == ["tower-a/release[m1]#1"]


APPROVED = """
- id: site/sign-off
  project: site
  when: milestone.m1.ready == true
  approvals: {required: 1, from: [alice]}
  actions:
    - set_fact: {kind: milestone_status, id: m1, data: {status: complete}}

- id: site/release
  project: site
  for_each: milestone_status
  when: item.data.status == "complete"
  actions:
    - notify: {target: chat, message: "milestone ${item.id} complete"}
"""


def test_an_approval_that_fires_a_set_fact_points_at_the_approval() -> None:
    from gatekeeper.engine.model import ApprovalInput

    world = World(engine_of(APPROVED))
    world.post(FactInput("site", "milestone", "m1", {"ready": True}))
    approval = ApprovalInput("site/sign-off", "site", "alice", "approve")
    t = world.apply(
        world.engine.plan_approval(world.facts, world.states, world.approvals, approval, NOW)
    )
    assert [f.kind for f in t.facts] == ["milestone_status"]
    assert [(d.rule_id, d.trigger, d.outcome, d.fact_index) for d in t.decisions] == [
        ("site/sign-off", "approval", "fired", 1),  # seqs: the set fact's, then the approval's
        ("site/release", "fact", "fired", 0),
    ]


MILESTONES = """
- id: site/milestone-complete
  project: site
  for_each: milestone
  when: all(t.data.status == "done" for t in task if t.data.milestone == item.id)
  fire: once
  actions:
    - set_fact: {kind: milestone_status, id: "${item.id}", data: {status: complete}}

- id: site/release
  project: site
  for_each: milestone_status
  when: item.data.status == "complete"
  actions:
    - notify: {target: chat, message: "milestone ${item.id} complete"}
"""


def test_the_last_task_done_completes_its_milestone_and_fires_the_release() -> None:
    world = World(engine_of(MILESTONES))
    world.post(
        FactInput("site", "milestone", "m1", {}),
        FactInput("site", "milestone", "m2", {}),
    )
    world.post(task("T-1", "done"), task("T-2", "open"), task("T-3", "open", milestone="m2"))
    assert world.states[("site/milestone-complete", "m1")].fired_count == 0
    t = world.post(task("T-2", "done"))
    assert [(d.rule_id, d.instance, d.outcome) for d in t.decisions] == [
        ("site/milestone-complete", "m1", "fired"),
        ("site/milestone-complete", "m2", "not_met"),
        ("site/release", "m1", "fired"),
    ]
    [m2] = [d for d in t.decisions if d.instance == "m2"]
    [collection] = m2.evaluation.collections
    assert (collection.items, collection.true, collection.false_ids) == (1, 0, ("T-3",))
    assert [a.payload["message"] for a in t.actions] == ["milestone m1 complete"]


async def test_the_api_shows_what_a_collection_saw(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule(
        "milestones.yaml",
        MILESTONES.replace("site/", "tower-a/")
        .replace("project: site", "project: tower-a")
        .replace("target: chat", "target: ci"),
    )
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("milestone", "m1"))
    await gk.post(
        "/v1/facts",
        {
            "facts": [
                fact("task", f"T-{n}", status="done" if n < 7 else "open", milestone="m1")
                for n in range(9)
            ]
        },
    )
    status, rule = await gk.get("/v1/rules/tower-a/milestone-complete")
    assert status == 200
    latest = rule["recent_decisions"][0]
    assert latest["instance"] == "m1" and latest["outcome"] == "not_met"
    [collection] = latest["evaluation"]["collections"]
    assert (collection["items"], collection["true"], collection["false_ids"]) == (
        9,
        7,
        ["T-7", "T-8"],
    )
    assert collection["as_of_seq"] == 10
    assert latest["evaluation"]["item"]["data"] == {}
    status, audit = await gk.get("/v1/audit?rule=tower-a/milestone-complete&kind=decision")
    assert status == 200 and {e.get("instance") for e in audit["entries"]} == {"m1"}
