"""Approvals that mean one thing, through a real daemon, its HTTP API, its SQLite file and a
real receiver: an approval of a per-item rule names its item (and only then); a firing of
an each_time or each_fact rule uses up the approvals that allowed it unless they are
standing; approvals lapse after ``expires_after``; ``approvals.notify`` tells its target once
per wait, and not again after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gatekeeper.clock import FixedClock

from .conftest import ENV, Project, Receiver, Running, fact
from .test_auth import TOKENS, call, tokens_yaml

SHIP = """\
id: tower-a/ship
project: tower-a
for_each: build
when: item.data.status == "passed"
fire: each_fact
approvals: {required: 1, from: [alice, bob]}
actions:
  - notify: {target: ci, message: "ship ${item.id}"}
"""

NIGHTLY = """\
id: tower-a/nightly
project: tower-a
for_each: nightly
when: item.data.status == "passed"
fire: each_fact
approvals: {required: 1, from: [alice, bob], standing: true}
actions:
  - notify: {target: ci, message: "nightly ${item.id}"}
"""

PUBLISH = """\
id: tower-a/publish
project: tower-a
when: doc.guide.status == "ready"
fire: each_time
approvals: {required: 1, from: [alice, bob], expires_after: 1h}
actions:
  - notify: {target: ci, message: "publish the guide"}
"""

MILESTONE = """\
id: tower-a/milestone-release
project: tower-a
for_each: milestone_status
when: item.data.status == "complete"
approvals: {required: 2, from: [alice, bob, carol], notify: ci}
actions:
  - notify: {target: ci, message: "milestone ${item.id} released"}
"""

WINDOW = """\
id: tower-a/deploy-window
project: tower-a
when: window.prod.open
fire: each_time
approvals: {required: 1, from: [alice, bob], standing: true, expires_after: 30m}
actions:
  - notify: {target: ci, message: "deploy window open"}
"""

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def project(project_factory: Callable[..., Project], receiver: Receiver) -> Project:
    made = project_factory(receiver.url, tokens=tokens_yaml())
    for name, text in (
        ("ship.yaml", SHIP),
        ("nightly.yaml", NIGHTLY),
        ("publish.yaml", PUBLISH),
        ("milestone.yaml", MILESTONE),
        ("window.yaml", WINDOW),
    ):
        made.write_rule(name, text)
    return made


async def approve(gk: Running, who: str, rule: str, item: str | None = None) -> dict[str, Any]:
    body = {"rule": rule, "decision": "approve", **({"item": item} if item else {})}
    status, answer = await call(gk, "POST", "/v1/approvals", who, body)
    assert status == 200, answer
    return answer  # type: ignore[no-any-return]


async def post(gk: Running, *facts: dict[str, Any]) -> None:
    status, answer = await call(gk, "POST", "/v1/facts", "ci", {"facts": list(facts)})
    assert status == 200, answer


async def outcomes(gk: Running, rule: str, item: str = "", n: int = 1) -> list[str]:
    found = await gk.daemon.store.list_decisions(rule, n, instance=item or None)
    return [d.outcome for d in found]


async def delivered(gk: Running, prefix: str, count: int) -> list[Any]:
    """The delivered outbox entries whose firing id starts with ``prefix``, once there are
    ``count`` of them (newest first)."""
    for _ in range(200):
        found = [
            a
            for a in await gk.daemon.store.list_actions(status="delivered")
            if a.firing_id.startswith(prefix)
        ]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} delivered actions of {prefix}")


async def settle() -> None:
    await asyncio.sleep(0.3)


async def test_an_approval_names_its_item_exactly_when_the_rule_is_per_item(
    project: Project, start_daemon: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    gk = await start_daemon(project, env=ENV)
    await post(gk, fact("build", "b1", status="passed", commit="c1"))
    refusals = [
        ({"rule": "tower-a/ship", "decision": "approve"}, 400, "rule 'tower-a/ship' is per item"),
        (
            {"rule": "tower-a/publish", "decision": "approve", "item": "b1"},
            400,
            "rule 'tower-a/publish' has no for_each",
        ),
        (
            {"rule": "tower-a/ship", "decision": "approve", "item": "b9"},
            404,
            "rule 'tower-a/ship' has no instance 'b9': there is no build fact 'b9'",
        ),
        ({"rule": "tower-a/ship", "decision": "approve", "item": ""}, 400, "item"),
    ]
    for body, expected, message in refusals:
        headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
        async with gk.session.post(gk.url + "/v1/approvals", json=body, headers=headers) as r:
            answer = await r.json()
            assert r.status == expected, answer
            assert r.content_type == "application/json"  # the API's one error shape
        assert answer["error"]["status"] == expected
        assert message in answer["error"]["message"] or message in str(answer), answer
    # nothing of the refused approvals was recorded
    log = await gk.daemon.store.fact_log()
    assert [e.kind for e in log] == ["build"]
    assert gk.daemon.writer.approvals == {}
    status, audit = await call(gk, "GET", "/v1/audit?kind=approval", "alice")
    assert status == 200 and audit["entries"] == []

    with caplog.at_level("INFO", logger="gatekeeper"):
        answer = await approve(gk, "alice", "tower-a/ship", "b1")
    assert answer["item"] == "b1"
    [logged] = [r for r in caplog.records if r.getMessage().startswith("approval: ")]
    assert logged.getMessage().startswith("approval: alice approves rule tower-a/ship item b1 ")
    assert logged.item == "b1"  # type: ignore[attr-defined]  # a field of JSON logs
    assert answer["approvals"]["approved_by"] == ["alice"]
    assert answer["approvals"]["satisfied"] is True
    status, audit = await call(gk, "GET", "/v1/audit?kind=approval", "alice")
    [entry] = audit["entries"]
    assert (entry["rule_id"], entry["instance"], entry["actor"]) == ("tower-a/ship", "b1", "alice")
    # a plain rule still takes approvals without an item
    answer = await approve(gk, "bob", "tower-a/publish")
    assert "item" not in answer and answer["approvals"]["approved_by"] == ["bob"]


async def test_a_firing_uses_up_its_approvals_even_across_a_restart(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await start_daemon(project, env=ENV)
    passed = fact("build", "b1", status="passed", commit="c1")
    await post(gk, passed)
    assert await outcomes(gk, "tower-a/ship", "b1") == ["awaiting_approvals"]
    await approve(gk, "alice", "tower-a/ship", "b1")
    await post(gk, passed)  # fires, and uses alice's approval up
    [sent] = await receiver.wait_for(1)
    assert sent.body["message"] == "ship b1"
    [fired] = await gk.daemon.store.list_decisions("tower-a/ship", 1, instance="b1")
    assert fired.outcome == "fired" and fired.approvals is not None
    assert fired.approvals["approved_by"] == ["alice"] and fired.approvals["consumed"] == ["alice"]
    await post(gk, passed)
    assert await outcomes(gk, "tower-a/ship", "b1") == ["awaiting_approvals"]
    view = await gk.daemon.rule_detail("tower-a/ship", 1, "b1")
    assert view["explanation"]["approvals"]["approved_by"] == []
    assert view["explanation"]["gate_open"] is False
    # the consumption is in the database: a restart does not bring the approval back
    await gk.stop()
    gk = await start_daemon(project, env=ENV)
    await post(gk, passed)
    assert await outcomes(gk, "tower-a/ship", "b1") == ["awaiting_approvals"]
    await approve(gk, "bob", "tower-a/ship", "b1")
    await post(gk, passed)
    assert await outcomes(gk, "tower-a/ship", "b1") == ["fired"]
    await receiver.wait_for(2)

    # standing approvals are not used up
    nightly = fact("nightly", "n1", status="passed")
    await post(gk, nightly)
    await approve(gk, "alice", "tower-a/nightly", "n1")
    await post(gk, nightly)
    await post(gk, nightly)
    assert await outcomes(gk, "tower-a/nightly", "n1", 2) == ["fired", "fired"]
    view = await gk.daemon.rule_detail("tower-a/nightly", 1, "n1")
    assert view["explanation"]["approvals"]["approved_by"] == ["alice"]
    await receiver.wait_for(4)
    await settle()
    assert [r.body["message"] for r in receiver.received] == [
        "ship b1",
        "ship b1",
        "nightly n1",
        "nightly n1",
    ]


async def test_an_each_time_rule_needs_new_approvals_for_each_opening(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await start_daemon(project, env=ENV)
    ready, draft = fact("doc", "guide", status="ready"), fact("doc", "guide", status="draft")
    await post(gk, ready)
    answer = await approve(gk, "alice", "tower-a/publish")
    assert answer["approvals"]["approved_by"] == []  # used up by the firing it allowed
    assert await outcomes(gk, "tower-a/publish") == ["fired"]
    status, view = await call(gk, "GET", "/v1/rules/tower-a/publish", "alice")
    assert status == 200 and view["gate_open"] is False
    assert view["recent_decisions"][0]["approvals"]["consumed"] == ["alice"]
    await post(gk, draft)
    await post(gk, ready)  # the condition opens again, but nobody approved this time
    assert await outcomes(gk, "tower-a/publish") == ["awaiting_approvals"]
    await gk.stop()
    gk = await start_daemon(project, env=ENV)
    await approve(gk, "bob", "tower-a/publish")
    assert await outcomes(gk, "tower-a/publish") == ["fired"]
    await receiver.wait_for(2)
    await settle()
    assert len(receiver.received) == 2


async def test_an_approval_lapses_after_expires_after(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    clock = FixedClock(T0)
    gk = await start_daemon(project, env=ENV, clock=clock)
    await approve(gk, "alice", "tower-a/publish")  # the guide is not ready yet
    clock.advance(timedelta(minutes=59, seconds=59))
    status, view = await call(gk, "GET", "/v1/rules/tower-a/publish", "alice")
    assert view["explanation"]["approvals"]["approved_by"] == ["alice"]
    assert "lapsed" not in view["explanation"]["approvals"]
    clock.advance(timedelta(seconds=1))  # an hour after it was given: it no longer counts
    status, view = await call(gk, "GET", "/v1/rules/tower-a/publish", "alice")
    approvals = view["explanation"]["approvals"]
    assert approvals["approved_by"] == [] and approvals["lapsed"] == ["alice"]
    assert approvals["satisfied"] is False
    await post(gk, fact("doc", "guide", status="ready"))
    assert await outcomes(gk, "tower-a/publish") == ["awaiting_approvals"]
    [decision] = await gk.daemon.store.list_decisions("tower-a/publish", 1)
    assert decision.approvals is not None and decision.approvals["lapsed"] == ["alice"]
    # the time an approval was given is kept: after a restart it has still lapsed
    await gk.stop()
    gk = await start_daemon(project, env=ENV, clock=clock)
    status, view = await call(gk, "GET", "/v1/rules/tower-a/publish", "alice")
    assert status == 200 and view["explanation"]["approvals"]["lapsed"] == ["alice"]
    answer = await approve(gk, "alice", "tower-a/publish")  # a fresh approval counts
    assert "lapsed" not in answer["approvals"]
    assert await outcomes(gk, "tower-a/publish") == ["fired"]
    [sent] = await receiver.wait_for(1)
    assert sent.body["message"] == "publish the guide"


async def test_an_approval_lapses_at_the_same_instant_before_and_after_a_restart(
    project: Project, start_daemon: Any
) -> None:
    clock = FixedClock(T0 + timedelta(microseconds=999))  # the store keeps milliseconds
    gk = await start_daemon(project, env=ENV, clock=clock)
    await approve(gk, "alice", "tower-a/publish")
    clock.advance(timedelta(hours=1, microseconds=-499))  # T0 + 1 h + 0.5 ms
    for restart in (False, True):
        if restart:
            await gk.stop()
            gk = await start_daemon(project, env=ENV, clock=clock)
        status, view = await call(gk, "GET", "/v1/rules/tower-a/publish", "alice")
        assert status == 200
        assert view["explanation"]["approvals"].get("lapsed") == ["alice"], restart


async def test_the_notify_target_is_told_once_per_wait(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await start_daemon(project, env=ENV)
    complete = fact("milestone_status", "m1", status="complete")
    await post(gk, complete)
    [notice] = await receiver.wait_for(1)
    assert notice.path == "/ci"
    assert notice.body["message"] == (
        "rule tower-a/milestone-release (milestone_status m1) waits for approvals: "
        "2 needed from alice, bob, carol; 0 given"
    )
    assert notice.body["firing_id"] == "tower-a/milestone-release[m1]~approvals-1"
    assert notice.body["awaiting_approvals"] == {
        "required": 2,
        "from": ["alice", "bob", "carol"],
        "approved_by": [],
        "rejected_by": [],
    }
    assert notice.body["item"] == {
        "kind": "milestone_status",
        "id": "m1",
        "data": {"status": "complete"},
    }
    # still waiting: the same fact again, an approval short of the two: nobody is told again
    await post(gk, fact("milestone_status", "m1", status="complete", note="again"))
    await approve(gk, "alice", "tower-a/milestone-release", "m1")
    await gk.stop()
    gk = await start_daemon(project, env=ENV)  # nor after a restart
    await post(gk, complete)
    await settle()
    assert len(receiver.received) == 1
    assert gk.daemon.writer.states[("tower-a/milestone-release", "m1")].notified
    # the condition goes false and true again: a new wait, told once
    await post(gk, fact("milestone_status", "m1", status="reopened"))
    await post(gk, complete)
    _, second = await receiver.wait_for(2)
    assert second.body["message"].endswith("2 needed from alice, bob, carol; 1 given (alice)")
    assert second.body["firing_id"] == "tower-a/milestone-release[m1]~approvals-2"
    # the notices are outbox actions of the decisions that waited, delivered once
    notices = await delivered(gk, "tower-a/milestone-release[m1]~", 2)
    assert [a.firing_id for a in notices] == [
        "tower-a/milestone-release[m1]~approvals-2",
        "tower-a/milestone-release[m1]~approvals-1",
    ]
    await approve(gk, "bob", "tower-a/milestone-release", "m1")
    *_, released = await receiver.wait_for(3)
    assert released.body["message"] == "milestone m1 released"
    await post(gk, fact("milestone_status", "m1", status="complete", note="after"))
    await settle()
    assert len(receiver.received) == 3  # fired once: nothing more to wait for


def test_a_batch_fires_an_event_rule_once_per_approval() -> None:
    from gatekeeper.engine.evaluate import Engine, apply_transition
    from gatekeeper.engine.facts import FactTable
    from gatekeeper.engine.model import FactInput, RuleState, Stand
    from gatekeeper.rules.loader import load_rule_texts

    loaded = load_rule_texts({"ship.yaml": SHIP}, config=None)
    assert loaded.ruleset is not None
    engine = Engine(loaded.ruleset)
    facts = FactTable()
    states: dict[tuple[str, str], RuleState] = {}
    approvals = {"tower-a/ship[b1]": {"alice": Stand("approve", T0)}}
    passed = FactInput("tower-a", "build", "b1", {"status": "passed"})
    t = engine.plan_ingest(facts, states, [passed, passed], T0, approvals=approvals)
    assert [d.outcome for d in t.decisions] == ["fired", "awaiting_approvals"]
    assert [(c.instance, c.subjects, c.firing_id) for c in t.consumed] == [
        ("b1", ("alice",), "tower-a/ship[b1]#1")
    ]
    assert approvals["tower-a/ship[b1]"]  # planning changes nothing
    apply_transition(t, facts, states, approvals, engine_book())
    assert approvals == {"tower-a/ship[b1]": {}}


def engine_book() -> Any:
    from gatekeeper.engine.ledger import EscrowBook

    return EscrowBook({})


async def test_batches_committed_together_share_one_approval(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await start_daemon(project, env=ENV)
    passed = fact("build", "b1", status="passed", commit="c1")
    await post(gk, passed)
    await approve(gk, "alice", "tower-a/ship", "b1")
    # six batches queued together, planned one on top of the other and committed as one group
    from gatekeeper.engine.model import FactInput

    again = FactInput("tower-a", "build", "b1", {"status": "passed", "commit": "c1"})
    await asyncio.gather(*(gk.daemon.ingest([again]) for _ in range(6)))
    found = await outcomes(gk, "tower-a/ship", "b1", 6)
    assert sorted(found) == ["awaiting_approvals"] * 5 + ["fired"]
    await receiver.wait_for(1)
    await settle()
    assert len(receiver.received) == 1


async def test_a_lapse_closes_the_gate_when_it_comes_so_a_new_approval_opens_it_again(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    clock = FixedClock(T0)
    gk = await start_daemon(project, env=ENV, clock=clock)
    rule = "tower-a/deploy-window"
    await post(gk, fact("window", "prod", open=True))
    await approve(gk, "alice", rule)  # standing: not used up by the firing
    assert await outcomes(gk, rule) == ["fired"]
    assert gk.daemon.ticker.deadlines.due_at((rule, "")) == T0 + timedelta(minutes=30)
    clock.advance(timedelta(minutes=30))
    await gk.daemon.tick()  # the deadline loop looks at it when the approval lapses
    [closed] = await gk.daemon.store.list_decisions(rule, 1)
    assert (closed.trigger, closed.outcome, closed.gate_open) == (
        "time",
        "awaiting_approvals",
        False,
    )
    assert gk.daemon.ticker.deadlines.due_at((rule, "")) is None
    await approve(gk, "alice", rule)  # a new opening of the gate: it fires again
    assert await outcomes(gk, rule, n=2) == ["fired", "awaiting_approvals"]
    await receiver.wait_for(2)
