"""StateStore: a group of transitions committed together writes exactly the rows (ids and
sequence numbers included) the same transitions write committed one at a time, in
however many statements its tables' rows take."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.engine.model import Transition
from gatekeeper.store import open_store
from gatekeeper.store.copy import connect
from gatekeeper.store.errors import Conflict

from .. import pg
from . import build
from .conftest import Backend


def _another_database(backend: Backend, tmp_path: Path, cleanup: ExitStack) -> str:
    """A second fresh database of ``backend``'s kind."""
    if backend.name == "sqlite":
        return f"sqlite:///{tmp_path / 'singly' / 'gatekeeper.db'}"
    return cleanup.enter_context(pg.scratch_database())


async def _commit(url: str, groups: Sequence[Sequence[Transition]]) -> list[list[int]]:
    """Commit each of ``groups`` as one group on a store opened on ``url`` (closed after);
    the sequence numbers of every transition, in order."""
    store = await open_store(url)
    try:
        seqs: list[list[int]] = []
        for group in groups:
            seqs.extend(await store.commit_transitions(group))
        return seqs
    finally:
        await store.close()


def _rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of ``url`` (every column, ids included), sorted."""
    side = connect(url, read_only=True)
    try:
        return {
            table: sorted(
                (row for batch in side.read(table, side.columns(table)) for row in batch),
                key=repr,
            )
            for table in side.tables()
        }
    finally:
        side.close()


async def _same_rows(
    backend: Backend, tmp_path: Path, transitions: Sequence[Transition], *, groups: int = 1
) -> dict[str, list[tuple[Any, ...]]]:
    """Commit ``transitions`` in ``groups`` groups on ``backend``'s database and one at a
    time on another; assert both return the same sequence numbers and hold the same rows;
    return the rows."""
    with ExitStack() as cleanup:
        singly = _another_database(backend, tmp_path, cleanup)
        size = -(-len(transitions) // groups)
        grouped_seqs = await _commit(
            backend.url,
            [transitions[start : start + size] for start in range(0, len(transitions), size)],
        )
        single_seqs = await _commit(singly, [[t] for t in transitions])
        assert grouped_seqs == single_seqs
        grouped, single = _rows(backend.url), _rows(singly)
    assert grouped.keys() == single.keys()
    for table in grouped:
        assert grouped[table] == single[table], table
    return grouped


def _ingest_mix() -> list[Transition]:
    """Transitions of every kind an ingest group holds, reading and overwriting what the
    ones before them wrote: the fact a later decision reads (``task.T-1``), a fact key and
    a rule state written twice, releases with their ledger rows, idempotency keys, an
    approval, an admin act."""
    t1 = build.facts(build.T0, ("tower-a", "task", "T-1", {"done": True}), request_id="r-1")
    return [
        t1,
        build.firing("tower-a/r", 1, build.at(1), request_id="r-2"),
        build.firing("tower-a/r", 2, build.at(2), release=("esc", "0.10")),
        build.idempotent("k-1", build.at(3), ("tower-b", "task", "x", {"v": 1})),
        build.approval("tower-a/r", "alice", "approve", build.at(4)),
        build.facts(build.at(5), ("tower-a", "task", "T-1", {"done": False})),
        build.admin_act("pause", "tower-a/s", build.at(6)),
        build.firing("tower-a/s", 1, build.at(7), release=("esc", "0.20")),
        build.idempotent(
            "k-2", build.at(8), ("tower-b", "task", "x", {"v": 2}), ("tower-b", "task", "y", {})
        ),
        build.firing("tower-a/r", 3, build.at(9), project="tower-a"),
    ]


async def test_a_group_writes_the_rows_its_transitions_write_one_at_a_time(
    backend: Backend, tmp_path: Path
) -> None:
    rows = await _same_rows(backend, tmp_path, _ingest_mix())
    assert len(rows["fact_log"]) == 10  # 9 facts and the approval
    assert len(rows["decisions"]) == len(rows["outbox"]) == 4
    assert len(rows["ledger"]) == 2
    assert len(rows["idempotency_keys"]) == 2


async def test_facts_and_decisions_name_fact_log_entries_of_their_transaction(
    backend: Backend, tmp_path: Path
) -> None:
    """What the foreign keys to ``fact_log`` guaranteed, kept by the writer (PostgreSQL has
    none since its migration 16): a current fact's ``seq`` and a decision's ``fact_seq``
    are entries of the log, the ones written with them."""
    await _same_rows(backend, tmp_path, _ingest_mix(), groups=2)
    store = await backend.open()
    log = {f.seq: f for f in await store.fact_log()}
    for fact in await store.list_facts():
        logged = log[fact.seq]
        assert (logged.project, logged.kind, logged.id, logged.data) == (
            fact.project,
            fact.kind,
            fact.id,
            fact.data,
        )
    decisions = await store.list_decisions()
    assert sorted(d.fact_seq or 0 for d in decisions) == [2, 3, 7, 10]
    for d in decisions:
        assert d.fact_seq is not None and log[d.fact_seq].id == f"{d.rule_id}-{d.firing_id[-1]}"


async def test_groups_after_groups_write_the_same_rows(backend: Backend, tmp_path: Path) -> None:
    await _same_rows(backend, tmp_path, _ingest_mix(), groups=3)


async def test_a_group_beyond_one_statements_parameters_is_written_whole(
    backend: Backend, tmp_path: Path
) -> None:
    """8,200 facts (8 fact log parameters each: more than one statement holds on either
    backend, 32,766 on SQLite, 65,535 on PostgreSQL) beside firings."""
    many = [
        build.facts(build.at(n), *[("p", "task", f"{n}-{i}", {"i": i}) for i in range(4_100)])
        for n in range(2)
    ]
    firings = [build.firing("p/r", n, build.at(3)) for n in range(1, 301)]
    rows = await _same_rows(backend, tmp_path, [*many, *firings])
    assert len(rows["fact_log"]) == 8_200 + 300
    assert len(rows["decisions"]) == 300


async def test_a_failing_transition_rolls_its_whole_group_back(backend: Backend) -> None:
    """A group whose rows fail at the end (a firing written twice) writes nothing; each of
    its transitions can then be committed alone (what ingest falls back to)."""
    store = await backend.open()
    group = [
        build.firing("tower-a/r", 1, build.T0),
        build.idempotent("k-1", build.at(1), ("p", "task", "a", {})),
        build.firing("tower-a/r", 1, build.at(2)),
    ]
    with pytest.raises(Conflict):
        await store.commit_transitions(group)
    assert await store.fact_log() == []
    assert await store.list_decisions() == []
    assert await store.find_idempotency_key("k-1") is None
    assert await store.commit_transition(group[0]) == [1]
    assert await store.commit_transition(group[1]) == [2]
    with pytest.raises(Conflict):
        await store.commit_transition(group[2])
    assert [f.seq for f in await store.fact_log()] == [1, 2]
