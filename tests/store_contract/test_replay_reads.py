"""What a replay of the history reads (``gatekeeper backtest``): the decision log oldest
first, the actions of a range of decisions, and a store opened read-only (nothing created,
migrated, locked or written; a daemon may hold the database meanwhile)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from gatekeeper.engine.model import FactInput, Transition
from gatekeeper.store import open_store
from gatekeeper.store.errors import SchemaTooNew, StoreUnavailable

from . import build
from .conftest import Backend


async def test_the_decision_log_pages_oldest_first(backend: Backend) -> None:
    store = await backend.open()
    for n in range(1, 6):
        await store.commit_transition(build.firing("tower-a/r", n, build.at(n)))
    first = await store.decision_log(limit=2)
    assert [d.firing_id for d in first] == ["tower-a/r#1", "tower-a/r#2"]
    rest = await store.decision_log(first[-1].id, limit=10)
    assert [d.firing_id for d in rest] == ["tower-a/r#3", "tower-a/r#4", "tower-a/r#5"]
    assert "task.T-1" in rest[0].evaluation["seen"]  # rebuilt from the fact log
    light = await store.decision_log(evaluations=False)
    assert [d.id for d in light] == [d.id for d in [*first, *rest]]
    assert all(d.evaluation == {} for d in light)
    assert light[0].ruleset_version == "v1" and light[0].rule_hash == "h-tower-a/r"


async def test_actions_of_a_range_of_decisions_in_the_order_queued(backend: Backend) -> None:
    store = await backend.open()
    for n in range(1, 4):
        await store.commit_transition(build.firing("tower-a/r", n, build.at(n)))
    await store.commit_transition(
        build.firing("tower-a/pay", 1, build.at(4), release=("tower-a-escrow", "10.00"))
    )
    ids = [d.id for d in await store.decision_log()]
    middle = await store.actions_of_decisions(ids[1], ids[3])
    assert [a.firing_id for a in middle] == ["tower-a/r#2", "tower-a/r#3", "tower-a/pay#1"]
    assert [a.decision_id for a in middle] == ids[1:4]
    assert middle[-1].payload["amount"] == "10.00"
    assert await store.actions_of_decisions(ids[-1] + 1, ids[-1] + 10) == []


async def test_a_read_only_store_reads_what_a_running_daemon_committed(
    backend: Backend, tmp_path: Path
) -> None:
    writer = await backend.open()  # holds the database's lock, as a daemon does
    await writer.commit_transition(build.firing("tower-a/r", 1, build.at(1)))
    reader = await open_store(backend.url, read_only=True)
    try:
        assert reader.is_open
        assert [d.firing_id for d in await reader.decision_log()] == ["tower-a/r#1"]
        await writer.commit_transition(build.firing("tower-a/r", 2, build.at(2)))
        assert len(await reader.decision_log()) == 2  # sees later commits
        with pytest.raises(StoreUnavailable, match="read-only"):
            await reader.commit_transition(build.firing("tower-a/r", 3, build.at(3)))
    finally:
        await reader.close()
    assert len(await writer.decision_log()) == 2


async def test_read_only_creates_nothing_and_refuses_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "none" / "gatekeeper.db"
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await open_store(missing, read_only=True)
    assert not missing.parent.exists()
    newer = tmp_path / "newer.db"
    store = await open_store(newer)
    await store.close()
    with sqlite3.connect(newer) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute(f"PRAGMA user_version={version + 1}")
    before = newer.read_bytes()
    with pytest.raises(SchemaTooNew, match="newer than this gatekeeper"):
        await open_store(newer, read_only=True)
    assert newer.read_bytes() == before
    older = tmp_path / "older.db"
    store = await open_store(older)
    await store.close()
    with sqlite3.connect(older) as db:
        db.execute(f"PRAGMA user_version={version - 1}")
    with pytest.raises(StoreUnavailable, match="older than this gatekeeper"):
        await open_store(older, read_only=True)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreUnavailable, match="empty file"):
        await open_store(empty, read_only=True)


async def test_the_decision_log_without_quiet_decisions_and_where_decisions_fall(
    backend: Backend,
) -> None:
    store = await backend.open()
    quiet = build.decision("tower-a/q", build.at(1), outcome="not_met", firing=None, fact_index=0)
    await store.commit_transition(
        Transition(
            facts=[FactInput("tower-a", "task", "a", {})], decisions=[quiet], planned_at=build.at(1)
        )
    )  # seq 1, decision 1: quiet
    await store.commit_transition(build.firing("tower-a/r", 1, build.at(2)))  # seq 2, decision 2
    tick = replace(quiet, trigger="time", fact_index=None, decided_at="2026-11-01T09:00:03.000Z")
    await store.commit_transition(Transition(decisions=[tick], planned_at=build.at(3)))
    await store.commit_transition(
        Transition(
            facts=[FactInput("tower-a", "task", "b", {})], decisions=[quiet], planned_at=build.at(4)
        )
    )  # seq 3, decision 4: quiet
    everything = await store.decision_log(evaluations=False)
    assert [d.trigger for d in everything] == ["fact", "fact", "time", "fact"]
    marked = await store.decision_log(evaluations=False, quiet=False)
    assert [(d.firing_id, d.trigger) for d in marked] == [("tower-a/r#1", "fact"), (None, "time")]
    ids = [d.id for d in everything]
    assert await store.fact_log_positions([ids[0], ids[2], ids[3], ids[3] + 5]) == {
        ids[0]: 0,  # nothing before it
        ids[2]: 2,  # the tick came after the fact at seq 2
        ids[3]: 2,
    }
    assert await store.fact_log_positions([]) == {}
