"""Decisions keep what they saw by reference (``gatekeeper.store.evidence``): each fact read
by id as its fact log ``seq``, a kind read whole as a count and the fact log's last ``seq``;
shown, ``seen`` is rebuilt from the fact log, as the engine made it."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

from gatekeeper.engine.model import FactInput, Transition
from gatekeeper.expr import Clause, Evaluation
from gatekeeper.store import Store
from gatekeeper.store.evidence import MAX_STORED_VALUE_CHARS

from . import build
from .conftest import Backend

TASKS = {f"T-{i}": {"n": i, "note": "x" * 50} for i in range(40)}


def _saw(when: int, seen: dict[str, object], *clauses: Clause) -> Transition:
    decision = replace(
        build.decision("tower-a/r", build.at(when), outcome="not_met", firing=None),
        evaluation=Evaluation(False, clauses, seen=seen),
    )
    return Transition(decisions=[decision], planned_at=build.at(when))


async def test_facts_read_by_id_are_shown_as_they_were_then(store: Store) -> None:
    await store.commit_transition(
        build.facts(build.T0, ("tower-a", "task", "T-1", {"done": False}))
    )
    # the fact changes in the same transition as the decision that reads it
    changed = Transition(
        facts=[FactInput("tower-a", "task", "T-1", {"done": True})],
        decisions=[
            replace(
                build.decision("tower-a/r", build.at(1), firing=None, fact_index=0),
                evaluation=Evaluation(
                    True,
                    (Clause("task.T-1.done", True),),
                    seen={"task.T-1": {"done": True}, "task.T-9": None},
                ),
            )
        ],
        planned_at=build.at(1),
    )
    await store.commit_transition(changed)
    await store.commit_transition(_saw(2, {"task.T-1": {"done": True}}))
    await store.commit_transition(build.facts(build.at(3), ("tower-a", "task", "T-1", {})))
    newest, oldest = await store.list_decisions("tower-a/r")
    assert oldest.evaluation == {
        "value": True,
        "clauses": [{"text": "task.T-1.done", "value": True}],
        "missing": [],
        "error": None,
        "seen": {"task.T-1": {"done": True}, "task.T-9": None},
    }
    assert newest.evaluation["seen"] == {"task.T-1": {"done": True}}  # not {}, the data now


async def test_a_kind_read_whole_is_a_count_and_a_position_in_the_fact_log(
    store: Store,
) -> None:
    await store.commit_transition(
        build.facts(build.T0, *[("tower-a", "task", i, d) for i, d in TASKS.items()])
    )
    await store.commit_transition(
        _saw(1, {"task": TASKS, "task.T-3": TASKS["T-3"]}, Clause("len(task) >= 100", False))
    )
    [decision] = await store.list_decisions("tower-a/r")
    assert decision.evaluation["seen"] == {"task.T-3": TASKS["T-3"]}
    assert decision.evaluation["seen_kinds"] == {"task": {"facts": 40, "as_of_seq": 40}}


async def test_a_big_clause_value_is_stored_as_its_size(store: Store) -> None:
    await store.commit_transition(_saw(1, {"task": TASKS}, Clause("task", TASKS)))
    [decision] = await store.list_decisions()
    [clause] = decision.evaluation["clauses"]
    assert clause["value"] is None and clause["value_omitted"] > MAX_STORED_VALUE_CHARS
    small = {"T-1": {"n": 1}}
    await store.commit_transition(_saw(2, {"task": small}, Clause("task", small)))
    assert (await store.list_decisions())[0].evaluation["clauses"][0]["value"] == small


async def test_the_stored_decision_does_not_grow_with_what_it_read(backend: Backend) -> None:
    store = await backend.open()
    await store.commit_transition(
        build.facts(build.T0, *[("tower-a", "task", i, d) for i, d in TASKS.items()])
    )
    await store.commit_transition(_saw(1, {"task": TASKS}, Clause("len(task) >= 100", False)))
    await store.commit_transition(_saw(2, {"task": {}}, Clause("len(task) >= 100", False)))
    if backend.name == "sqlite":
        path = Path(backend.url.removeprefix("sqlite:///"))
        with sqlite3.connect(path) as db:
            sizes = [len(text) for (text,) in db.execute("SELECT evaluation FROM decisions")]
        assert sizes[0] - sizes[1] < 10  # 40 tasks or none: the same size, give or take digits


async def test_a_decision_stored_with_copies_reads_back_as_stored(backend: Backend) -> None:
    if backend.name != "sqlite":
        return
    store = await backend.open()
    await store.commit_transition(_saw(1, {"task.T-1": None}))
    await store.close()
    old = {
        "value": True,
        "clauses": [{"text": "len(task) >= 1", "value": True}],
        "missing": [],
        "error": None,
        "seen": {"task": {"T-1": {"n": 1}}, "task.T-1": {"n": 1}},
    }
    path = Path(backend.url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE decisions SET evaluation = ?", (json.dumps(old),))
    store = await backend.open()
    [decision] = await store.list_decisions()
    assert decision.evaluation == old
