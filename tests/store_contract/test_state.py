"""StateStore: committing transitions (alone and in groups), idempotency keys, and the state
loaded at start."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from gatekeeper.engine.model import RuleState, Stand, Transition
from gatekeeper.store import Store
from gatekeeper.store.errors import Conflict
from gatekeeper.store.records import EscrowFigures, IdempotencyOutcome

from . import build
from .conftest import Backend


async def test_a_fact_twice_in_one_transition_keeps_both_in_the_log_and_the_last(
    store: Store,
) -> None:
    twice = build.facts(
        build.T0,
        ("tower-a", "task", "a", {"v": 1}),
        ("tower-a", "task", "b", {}),
        ("tower-a", "task", "a", {"v": 2}),
    )
    assert await store.commit_transition(twice) == [1, 2, 3]
    current = {(f.id, f.seq): f.data for f in await store.list_facts()}
    assert current == {("a", 3): {"v": 2}, ("b", 2): {}}
    assert [f.data for f in await store.fact_log()] == [{"v": 1}, {}, {"v": 2}]


async def test_commit_returns_the_sequence_numbers_of_facts_then_approvals(store: Store) -> None:
    first = build.facts(build.T0, ("tower-a", "task", "a", {"v": 1}))
    first.approvals = build.approval("tower-a/r", "alice", "approve", build.T0).approvals
    assert await store.commit_transition(first) == [1, 2]
    group = [
        build.facts(build.at(1), ("tower-a", "task", "a", {"v": 2})),
        Transition(planned_at=build.at(1)),  # nothing to write: fine
        build.facts(build.at(1), ("tower-b", "task", "x", {}), ("tower-b", "task", "y", {})),
    ]
    assert await store.commit_transitions(group) == [[3], [], [4, 5]]
    assert await store.commit_transitions([]) == []


async def test_facts_are_upserted_and_logged_with_their_time(store: Store) -> None:
    await store.commit_transition(build.facts(build.T0, ("tower-a", "task", "a", {"v": 1})))
    await store.commit_transition(
        build.facts(build.at(5), ("tower-a", "task", "a", {"v": 2}), request_id="req-1")
    )
    assert await store.load_facts() == {("tower-a", "task", "a"): {"v": 2}}
    [current] = await store.list_facts()
    assert (current.data, current.seq, current.updated_at) == ({"v": 2}, 2, build.at(5))
    log = await store.fact_log()
    assert [(f.seq, f.data, f.received_at, f.request_id) for f in log] == [
        (1, {"v": 1}, build.T0, None),
        (2, {"v": 2}, build.at(5), "req-1"),
    ]


async def test_rows_take_the_decisions_time_over_planned_at(store: Store) -> None:
    transition = build.firing("tower-a/r", 1, build.at(7))
    transition.planned_at = build.at(99)  # the decisions' time wins (as it always has)
    await store.commit_transition(transition)
    [logged] = await store.fact_log()
    assert logged.received_at == build.at(7)


async def test_a_transition_needing_a_time_and_having_none_is_refused(store: Store) -> None:
    no_time = build.facts(build.T0, ("tower-a", "task", "a", {}))
    no_time.planned_at = None
    with pytest.raises(ValueError, match="planned_at"):
        await store.commit_transition(no_time)
    assert await store.fact_log() == []
    assert await store.commit_transition(Transition()) == []  # nothing needs a time


async def test_a_double_firing_is_a_conflict_and_the_whole_group_rolls_back(
    store: Store,
) -> None:
    fired = build.firing("tower-a/r", 1, build.T0)
    await store.commit_transition(fired)
    group = [
        build.facts(build.at(1), ("tower-a", "task", "z", {})),
        build.firing("tower-a/r", 1, build.at(1)),  # the same firing id again
    ]
    with pytest.raises(Conflict):
        await store.commit_transitions(group)
    assert [f.seq for f in await store.fact_log()] == [1]
    assert len(await store.list_actions()) == 1
    # the store is usable afterwards
    assert await store.commit_transition(build.facts(build.at(2), ("p", "k", "i", {}))) == [2]


async def test_rule_states_are_upserted(store: Store) -> None:
    await store.commit_transition(build.firing("tower-a/r", 1, build.T0))
    paused = RuleState("tower-a/r", False, 1, build.at(0).isoformat(), "h2", True, 1)
    other = RuleState("tower-a/s")
    first = RuleState("tower-a/i", True, 1, build.at(0).isoformat(), "h3", instance="b-1")
    second = RuleState("tower-a/i", False, 0, None, "h3", instance="b-2")
    await store.commit_transition(
        Transition(
            rule_states={
                ("tower-a/r", ""): paused,
                ("tower-a/s", ""): other,
                ("tower-a/i", "b-1"): first,
                ("tower-a/i", "b-2"): second,
            },
            planned_at=build.at(1),
        )
    )
    assert await store.load_rule_states() == {
        ("tower-a/r", ""): paused,
        ("tower-a/s", ""): other,
        ("tower-a/i", "b-1"): first,
        ("tower-a/i", "b-2"): second,
    }
    second_fired = replace(second, gate_open=True, fired_count=1, paused=True)
    await store.commit_transition(
        Transition(rule_states={("tower-a/i", "b-2"): second_fired}, planned_at=build.at(2))
    )
    states = await store.load_rule_states()
    assert states[("tower-a/i", "b-2")] == second_fired  # one instance's row, upserted
    assert states[("tower-a/i", "b-1")] == first


async def test_standing_approvals_follow_approve_reject_and_withdraw(store: Store) -> None:
    for subject, choice in (("alice", "approve"), ("bob", "reject"), ("carol", "approve")):
        await store.commit_transition(build.approval("tower-a/r", subject, choice, build.T0))
    await store.commit_transition(build.approval("tower-a/r", "carol", "withdraw", build.at(1)))
    await store.commit_transition(build.approval("tower-a/r", "bob", "approve", build.at(2)))
    assert await store.load_approvals() == {
        "tower-a/r": {"alice": Stand("approve", build.T0), "bob": Stand("approve", build.at(2))}
    }
    log = await store.fact_log()
    assert [(f.kind, f.id, f.data["decision"]) for f in log][-2:] == [
        ("approval", "carol", "withdraw"),
        ("approval", "bob", "approve"),
    ]


async def test_escrow_totals_sum_the_reserved_releases_as_decimals(store: Store) -> None:
    assert await store.escrow_totals() == {}
    await store.commit_transitions(
        [
            build.firing("tower-a/r", 1, build.T0, release=("esc", "0.10")),
            build.firing("tower-a/r", 2, build.at(1), release=("esc", "0.20")),
            build.firing("tower-a/s", 1, build.at(2), release=("other", "1000.00")),
        ]
    )
    totals = await store.escrow_totals()
    assert totals == {
        "esc": EscrowFigures(reserved=Decimal("0.30")),
        "other": EscrowFigures(reserved=Decimal("1000.00")),
    }
    assert str(totals["esc"].reserved) == "0.30"  # exact, never a float
    assert totals["esc"].committed == Decimal("0.30")


async def test_idempotency_keys_are_found_and_purged_by_age(store: Store) -> None:
    assert await store.find_idempotency_key("k1") is None
    await store.commit_transition(build.idempotent("k1", build.T0, ("p", "task", "a", {})))
    await store.commit_transition(
        build.idempotent("k2", build.at(60), ("p", "task", "b", {}), ("p", "task", "c", {}))
    )
    assert await store.find_idempotency_key("k2") == IdempotencyOutcome(
        "hash-k2", [2, 3], None, build.at(60)
    )
    with pytest.raises(Conflict):  # a key is stored once
        await store.commit_transition(build.idempotent("k1", build.at(61), ("p", "task", "d", {})))
    assert await store.purge_idempotency_keys(build.at(60)) == 1  # strictly before
    assert await store.find_idempotency_key("k1") is None
    assert await store.find_idempotency_key("k2") is not None
    assert await store.purge_idempotency_keys(build.at(60)) == 0


async def test_the_last_activated_ruleset_is_remembered_across_reopening(
    backend: Backend,
) -> None:
    store = await backend.open()
    assert await store.last_ruleset() is None
    await store.commit_transition(build.ruleset("v1", build.T0))
    await store.commit_transition(build.ruleset("v2", build.at(10), {"x.yaml": "- id: x\n"}))
    await store.commit_transition(build.ruleset("v1", build.at(20)))  # back to v1
    await store.close()

    again = await backend.open()
    last = await again.last_ruleset()
    assert last is not None
    assert (last.version, last.git_commit) == ("v1", "c0ffee")
    assert (last.first_activated_at, last.last_activated_at) == (build.T0, build.at(20))
    assert dict(last.files) == {"a.yaml": "[]\n", "b.yaml": "[]\n"}
