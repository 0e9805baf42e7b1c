"""Shadowed actions and sign-offs: a shadowed action is stored with status ``shadowed``,
never due, outside the ledger and the escrow totals, and summed per rule version; sign-offs
are admin acts ``signoff`` of a content hash, audited, loaded with their time, and one per
admin and hash."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from gatekeeper.engine.model import RuleState, SignOff, Transition
from gatekeeper.store import Store
from gatekeeper.store.errors import Conflict
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import EscrowFigures, ShadowedReleases

from . import build


def shadowed_release(rule_id: str, n: int, seconds: float, amount: str) -> Transition:
    """``rule_id``'s ``n``th firing, in shadow: its release is shadowed, nothing in the
    ledger; its decision is ``shadowed`` (mode ``awaiting_signoff``)."""
    transition = build.firing(
        rule_id, n, build.at(seconds), release=("tower-a-escrow", amount), with_fact=False
    )
    [decision] = transition.decisions
    transition.decisions = [replace(decision, outcome="shadowed", mode="awaiting_signoff")]
    transition.actions = [
        replace(a, shadowed=True, payload={**a.payload, "currency": "USD"})
        for a in transition.actions
    ]
    transition.ledger = []
    return transition


async def test_shadowed_actions_are_kept_never_due_and_never_counted(store: Store) -> None:
    await store.commit_transitions(
        [
            shadowed_release("tower-a/pay", 1, 0, "10.00"),
            shadowed_release("tower-a/pay", 2, 1, "2.50"),
            build.firing("tower-a/live", 1, build.at(2), release=("tower-a-escrow", "7.00")),
        ]
    )
    assert await store.due_actions(build.at(60), 10) != []
    assert {a.rule_id for a in await store.due_actions(build.at(60), 10)} == {"tower-a/live"}
    assert await store.next_attempt_at() == build.at(2)
    shadowed = await store.list_actions("shadowed")
    assert [(a.action_id, a.status) for a in shadowed] == [
        (build.action_id("tower-a/pay", 2), "shadowed"),
        (build.action_id("tower-a/pay", 1), "shadowed"),
    ]
    assert await store.escrow_totals() == {
        "tower-a-escrow": EscrowFigures(reserved=Decimal("7.00"))
    }
    assert await store.release_record(build.action_id("tower-a/pay", 1)) is None
    with pytest.raises(Conflict):  # a retry never sends a shadowed action
        await store.requeue_action(build.action_id("tower-a/pay", 1), build.at(60), "ops", None)
    assert {a.rule_id for a in await store.due_actions(build.at(60), 10)} == {"tower-a/live"}
    assert (await store.count_actions())["shadowed"] == 2
    assert await store.shadowed_releases() == [
        ShadowedReleases(
            "tower-a/pay",
            "h-tower-a/pay",
            "tower-a-escrow",
            "USD",
            2,
            Decimal("12.50"),
            build.action_id("tower-a/pay", 1),
        )
    ]
    [decision] = await store.list_decisions("tower-a/pay", 1)
    assert (decision.outcome, decision.mode) == ("shadowed", "awaiting_signoff")
    assert decision.to_json()["mode"] == "awaiting_signoff"
    [live] = await store.list_decisions("tower-a/live", 1)
    assert live.mode == "live" and "mode" not in live.to_json()


async def test_signoffs_are_audited_admin_acts_one_per_admin_and_hash(store: Store) -> None:
    first = SignOff("a" * 64, "tower-a/pay", "ops", "checked", "tower-a")
    await store.commit_transition(Transition(signoffs=[first], planned_at=build.at(5)))
    second = SignOff("a" * 64, "tower-a/pay", "dana", None, "tower-a")
    await store.commit_transition(Transition(signoffs=[second], planned_at=build.at(6)))
    assert await store.load_signoffs() == {
        "a" * 64: {
            "ops": replace(first, at=build.at(5)),
            "dana": replace(second, at=build.at(6)),
        }
    }
    with pytest.raises(Conflict):
        twice = SignOff("a" * 64, "tower-a/pay", "ops", "again", "tower-a")
        await store.commit_transition(Transition(signoffs=[twice], planned_at=build.at(7)))
    entries = await store.audit(AuditQuery(kinds=("admin_act",), rule_id="tower-a/pay"))
    assert [(e.what, e.actor, e.reason, e.rule_hash) for e in entries] == [
        ("signoff", "dana", None, "a" * 64),
        ("signoff", "ops", "checked", "a" * 64),
    ]
    assert entries[0].to_json()["rule_hash"] == "a" * 64
    assert len(await store.load_signoffs()) == 1


async def test_the_hash_a_signoff_alert_told_is_kept_in_the_rule_state(store: Store) -> None:
    state = RuleState("tower-a/pay", True, 1, None, "h", signoff_alerted="b" * 64)
    await store.commit_transition(
        Transition(rule_states={("tower-a/pay", ""): state}, planned_at=build.T0)
    )
    assert (await store.load_rule_states())[("tower-a/pay", "")].signoff_alerted == "b" * 64
