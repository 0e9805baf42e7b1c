"""AuditReads and RulesetReads: current facts, the fact log, decisions, the audit log with
its filters, cursors and visibility, the ledger, stored rulesets."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import replace
from pathlib import Path

from gatekeeper.engine.model import FactInput, Transition
from gatekeeper.store import Store
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import Attempt, AttemptRecord, AuditEntry

from . import build
from .conftest import Backend


async def test_current_facts_by_project_and_visible_projects(store: Store) -> None:
    await store.commit_transition(
        build.facts(
            build.T0,
            ("tower-b", "task", "b", {}),
            ("tower-a", "task", "z", {"v": 1}),
            ("tower-a", "milestone", "m", {}),
        )
    )
    keys = [(f.project, f.kind, f.id) for f in await store.list_facts()]
    assert keys == [
        ("tower-a", "milestone", "m"),
        ("tower-a", "task", "z"),
        ("tower-b", "task", "b"),
    ]
    assert [f.id for f in await store.list_facts("tower-b")] == ["b"]
    assert [f.id for f in await store.list_facts(projects=frozenset({"tower-a"}))] == ["m", "z"]
    assert await store.list_facts("tower-b", projects=frozenset({"tower-a"})) == []
    assert await store.list_facts(projects=frozenset()) == []
    [z] = [f for f in await store.list_facts() if f.id == "z"]
    assert z.to_json() == {
        "project": "tower-a",
        "kind": "task",
        "id": "z",
        "data": {"v": 1},
        "seq": 2,
        "updated_at": "2026-11-01T09:00:00.000Z",
    }


async def test_current_facts_page_by_key(store: Store) -> None:
    items = [
        (project, kind, fact_id, {})
        for project in ("tower-a", "tower-b", "tower-c")
        for kind in ("milestone", "task")
        for fact_id in ("a", "a-1", "b")
    ]
    await store.commit_transition(build.facts(build.T0, *reversed(items)))
    everything = [(f.project, f.kind, f.id) for f in await store.list_facts()]
    assert everything == [item[:3] for item in items]
    pages = []
    after = None
    while page := await store.list_facts(after=after, limit=4):
        assert len(page) <= 4
        pages.append([(f.project, f.kind, f.id) for f in page])
        last = page[-1]
        after = (last.project, last.kind, last.id)
    assert [key for page in pages for key in page] == everything and len(pages) == 5
    visible = frozenset({"tower-a", "tower-c"})
    page = await store.list_facts(projects=visible, after=("tower-a", "task", "b"), limit=2)
    assert [(f.project, f.kind, f.id) for f in page] == [
        ("tower-c", "milestone", "a"),
        ("tower-c", "milestone", "a-1"),
    ]
    page = await store.list_facts("tower-b", after=("tower-b", "task", "a"))
    assert [(f.kind, f.id) for f in page] == [("task", "a-1"), ("task", "b")]


async def test_the_fact_log_pages_by_sequence_number(store: Store) -> None:
    for n in range(5):
        await store.commit_transition(build.facts(build.at(n), ("p", "task", "t", {"n": n})))
    assert [f.seq for f in await store.fact_log(limit=2)] == [1, 2]
    assert [f.seq for f in await store.fact_log(after_seq=2, limit=2)] == [3, 4]
    assert [f.data["n"] for f in await store.fact_log(after_seq=4)] == [4]
    assert await store.fact_log(after_seq=5) == []
    third = await store.fact_at(3)
    assert third is not None and (third.seq, third.data, third.received_at) == (
        3,
        {"n": 2},
        build.at(2),
    )
    assert await store.fact_at(6) is None
    assert await store.fact_at(0) is None


async def test_decisions_newest_first_by_rule_and_by_firing(store: Store) -> None:
    blocked = build.firing("tower-a/s", 1, build.at(1))
    blocked.decisions = [
        build.decision("tower-a/s", build.at(1), outcome="blocked", reason="r", fact_index=0)
    ]
    first = build.firing("tower-a/r", 1, build.T0, request_id="req-7")
    first.facts.append(FactInput("tower-a", "task", "T-1", {"done": True}))  # what it saw
    await store.commit_transitions([first, blocked])
    not_met = build.decision("tower-a/r", build.at(2), outcome="not_met", firing=None)
    await store.commit_transition(Transition(decisions=[not_met], planned_at=build.at(2)))
    decisions = await store.list_decisions()
    assert [(d.rule_id, d.outcome) for d in decisions] == [
        ("tower-a/r", "not_met"),
        ("tower-a/s", "blocked"),
        ("tower-a/r", "fired"),
    ]
    assert [d.outcome for d in await store.list_decisions("tower-a/r", limit=1)] == ["not_met"]
    fired = await store.decision_of_firing("tower-a/r#1")
    assert fired is not None
    assert (fired.fact_seq, fired.request_id, fired.decided_at, fired.gate_open) == (
        1,
        "req-7",
        build.T0,
        True,
    )
    assert fired.evaluation["seen"] == {"task.T-1": {"done": True}}
    assert fired.approvals == {"required": 1}
    assert fired.to_json()["decided_at"] == "2026-11-01T09:00:00.000Z"
    blocked_decision = await store.decision_of_firing("tower-a/s#1")
    assert blocked_decision is not None and blocked_decision.reason == "r"
    assert await store.decision_of_firing("tower-a/r#9") is None
    assert decisions[0].fact_seq is None and decisions[0].approvals is None


async def test_release_records(store: Store) -> None:
    await store.commit_transition(build.firing("tower-a/r", 1, build.T0, release=("esc", "12.50")))
    release_id = build.action_id("tower-a/r", 1)
    record = await store.release_record(release_id)
    assert record is not None
    assert record.to_json() == {
        "release_id": release_id,
        "escrow": "esc",
        "amount": "12.50",
        "currency": "USD",
        "payee": "acme",
        "rule_id": "tower-a/r",
        "firing_id": "tower-a/r#1",
        "recorded_at": "2026-11-01T09:00:00.000Z",
    }
    assert await store.release_record("act-nope") is None


async def _history(store: Store) -> None:
    """Decisions, approvals and admin acts of two projects, one entry a second, and a retry
    of a tower-b action (an admin act stored without a project)."""
    await store.commit_transition(build.firing("tower-a/r", 1, build.at(1)))
    await store.commit_transition(
        build.firing("tower-b/r", 1, build.at(2), project="tower-b", with_fact=False)
    )
    await store.commit_transition(build.approval("tower-a/r", "alice", "approve", build.at(3)))
    await store.commit_transition(
        build.admin_act("pause", "tower-b/r", build.at(4), project="tower-b")
    )
    not_met = build.decision("tower-a/r", build.at(5), outcome="not_met", firing=None)
    await store.commit_transition(Transition(decisions=[not_met], planned_at=build.at(5)))
    b1 = build.action_id("tower-b/r", 1)
    attempt = Attempt(b1, 1, build.at(6), 1.0, 410, "HTTP 410")
    await store.record_attempt(AttemptRecord(attempt, "dead", None, "refused"))
    await store.requeue_action(b1, build.at(7), "ops", "retry it")


async def test_the_audit_log_newest_first_in_one_shape(store: Store) -> None:
    await _history(store)
    entries = await store.audit(AuditQuery())
    assert [(e.kind, e.rule_id, e.what, e.project) for e in entries] == [
        ("admin_act", build.action_id("tower-b/r", 1), "retry_action", None),
        ("decision", "tower-a/r", "not_met", "tower-a"),
        ("admin_act", "tower-b/r", "pause", "tower-b"),
        ("approval", "tower-a/r", "approve", "tower-a"),
        ("decision", "tower-b/r", "fired", "tower-b"),
        ("decision", "tower-a/r", "fired", "tower-a"),
    ]
    assert [e.at for e in entries] == [build.at(s) for s in (7, 5, 4, 3, 2, 1)]
    approval = entries[3]
    assert (approval.actor, approval.reason, approval.fact_seq) == (
        "alice",
        "alice says approve",
        2,
    )
    fired = entries[5]
    assert (fired.firing_id, fired.fact_seq, fired.trigger) == ("tower-a/r#1", 1, "fact")
    assert entries[0].to_json()["at"] == "2026-11-01T09:00:07.000Z"


async def test_audit_filters(store: Store) -> None:
    await _history(store)

    async def shown(**query: object) -> list[tuple[str, object]]:
        return [(e.kind, e.what) for e in await store.audit(AuditQuery(**query))]  # type: ignore[arg-type]

    assert await shown(project="tower-b") == [
        ("admin_act", "pause"),
        ("decision", "fired"),
    ]
    assert await shown(rule_id="tower-a/r", kinds=("decision",)) == [
        ("decision", "not_met"),
        ("decision", "fired"),
    ]
    assert await shown(outcome="fired", kinds=("decision", "approval")) == [
        ("approval", "approve"),
        ("decision", "fired"),
        ("decision", "fired"),
    ]
    assert await shown(since=build.at(3), until=build.at(5)) == [
        ("admin_act", "pause"),
        ("approval", "approve"),
    ]


async def test_audit_visibility_sees_acts_on_actions_through_their_project(
    store: Store,
) -> None:
    await _history(store)

    async def seen(projects: frozenset[str]) -> list[tuple[str, object]]:
        entries = await store.audit(AuditQuery(projects=projects))
        return [(e.kind, e.what) for e in entries]

    assert await seen(frozenset({"tower-a"})) == [
        ("decision", "not_met"),
        ("approval", "approve"),
        ("decision", "fired"),
    ]
    assert await seen(frozenset({"tower-b"})) == [
        ("admin_act", "retry_action"),  # of a tower-b action
        ("admin_act", "pause"),
        ("decision", "fired"),
    ]
    assert await seen(frozenset()) == []
    # visibility is applied before the limit: full pages
    page = await store.audit(AuditQuery(projects=frozenset({"tower-a"}), limit=2))
    assert [e.what for e in page] == ["not_met", "approve"]


async def test_audit_cursor_pages_through_everything_once(store: Store) -> None:
    await _history(store)
    # two entries at the same instant: the cursor orders them by kind, then id
    same = build.decision("tower-a/r", build.at(3), outcome="not_met", firing=None)
    await store.commit_transition(Transition(decisions=[same], planned_at=build.at(3)))
    everything = await store.audit(AuditQuery(limit=1000))
    pages: list[AuditEntry] = []
    query = AuditQuery(limit=2)
    while True:
        page = await store.audit(query)
        pages += page
        if len(page) < query.limit:
            break
        query = replace(query, after=page[-1].cursor)
    assert pages == everything
    assert len(everything) == 7


async def test_rulesets_most_recently_activated_first(backend: Backend) -> None:
    store = await backend.open()
    assert await store.list_rulesets() == []
    await store.commit_transition(build.ruleset("v1", build.T0))
    await store.commit_transition(build.ruleset("v2", build.at(10), {"x.yaml": "- id: x\n"}))
    await store.commit_transition(build.ruleset("v1", build.at(20)))
    await store.close()
    store = await backend.open()
    summaries = await store.list_rulesets()
    assert [(r.version, r.first_activated_at, r.last_activated_at) for r in summaries] == [
        ("v1", build.T0, build.at(20)),
        ("v2", build.at(10), build.at(10)),
    ]
    assert list(summaries[0].files) == ["a.yaml", "b.yaml"]
    assert [r.version for r in await store.list_rulesets(limit=1)] == ["v1"]
    v2 = await store.get_ruleset("v2")
    assert v2 is not None
    assert v2.to_json() == {
        "version": "v2",
        "git_commit": "c0ffee",
        "first_activated_at": "2026-11-01T09:00:10.000Z",
        "last_activated_at": "2026-11-01T09:00:10.000Z",
        "files": {"x.yaml": "- id: x\n"},
    }
    assert await store.get_ruleset("v9") is None


async def test_rulesets_page_by_cursor(store: Store) -> None:
    for n in range(5):
        await store.commit_transition(build.ruleset(f"v{n}", build.at(n), {"a.yaml": f"{n}\n"}))
    await store.commit_transition(build.ruleset("v5", build.at(4), {"a.yaml": "5\n"}))  # a tie
    pages: list[list[str]] = []
    after = None
    while page := await store.list_rulesets(limit=2, after=after):
        pages.append([r.version for r in page])
        after = page[-1].cursor
    assert pages == [["v5", "v4"], ["v3", "v2"], ["v1", "v0"]]


async def test_a_file_text_is_stored_once_whatever_the_versions_holding_it(
    backend: Backend,
) -> None:
    store = await backend.open()
    big = "# a large rule file\n" + "- id: big/r\n  when: x.y\n" * 40_000  # about 1 MB
    for n in range(10):
        files = {"big.yaml": big, "small.yaml": f"# edit {n}\n"}
        await store.commit_transition(build.ruleset(f"v{n}", build.at(n), files))
    again = await store.get_ruleset("v3")
    assert again is not None and again.files == {"big.yaml": big, "small.yaml": "# edit 3\n"}
    assert [list(r.files) for r in await store.list_rulesets(limit=1)] == [
        ["big.yaml", "small.yaml"]
    ]
    if backend.name == "sqlite":
        path = Path(backend.url.removeprefix("sqlite:///"))
        with contextlib.closing(sqlite3.connect(path)) as db:
            [(count, chars)] = db.execute("SELECT COUNT(*), SUM(length(text)) FROM ruleset_files")
            assert count == 11  # the big file once, each edit of the small one
            assert chars < len(big) + 100
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            size = pages * db.execute("PRAGMA page_size").fetchone()[0]
        print(f"\ndatabase {size:,} bytes for a {len(big):,}-character file in 10 versions")
        assert size < 2 * len(big)
