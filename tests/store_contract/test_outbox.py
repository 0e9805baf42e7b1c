"""DeliveryQueue and OutboxAdmin: due actions, recording attempts, dead letters and their
reasons, requeuing, listing."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from gatekeeper.store import Store
from gatekeeper.store.errors import Conflict
from gatekeeper.store.queries import AuditQuery, OutboxFilter
from gatekeeper.store.records import Attempt, AttemptRecord, AuditEntry, outbox_entry_of

from . import build
from .conftest import Backend

A1, A2, B1 = (
    build.action_id("tower-a/r", 1),
    build.action_id("tower-a/r", 2),
    build.action_id("tower-b/r", 1),
)


async def _three(store: Store) -> None:
    """tower-a/r#1 to ci at T0, tower-b/r#1 to chat at +1 s, tower-a/r#2 to ci at +2 s."""
    await store.commit_transitions(
        [
            build.firing("tower-a/r", 1, build.T0, request_id="req-1"),
            build.firing("tower-b/r", 1, build.at(1), project="tower-b", target="chat"),
            build.firing("tower-a/r", 2, build.at(2)),
        ]
    )


def _attempt(action_id: str, n: int, when: float, status: int | None, error: str | None) -> Attempt:
    return Attempt(action_id, n, build.at(when), 12.5, status, error)


async def test_a_queued_action_reads_back_as_it_was_handed_over(store: Store) -> None:
    transition = build.firing("tower-a/r", 1, build.T0, request_id="req-1")
    await store.commit_transition(transition)
    entry = await store.get_action(A1)
    assert entry is not None
    handed = outbox_entry_of(transition.actions[0], "req-1")
    assert entry.decision_id is not None
    assert entry == replace(handed, decision_id=entry.decision_id)
    assert (entry.created_at, entry.next_attempt_at) == (build.T0, build.T0)
    assert (entry.attempts, entry.last_error, entry.delivered_at) == (0, None, None)
    assert (entry.request_id, entry.project) == ("req-1", "tower-a")
    assert (entry.dead_reason, entry.dead_status, entry.requeued_at) == (None, None, None)
    assert await store.get_action("act-nope") is None


async def test_due_actions_are_the_earliest_due_first_and_filtered(store: Store) -> None:
    await _three(store)
    assert [e.action_id for e in await store.due_actions(build.at(1), 10)] == [A1, B1]
    assert [e.action_id for e in await store.due_actions(build.at(5), 2)] == [A1, B1]
    assert await store.due_actions(build.T0 - timedelta(seconds=1), 10) == []
    only_ci = OutboxFilter(target="ci")
    assert [e.action_id for e in await store.due_actions(build.at(5), 10, only=only_ci)] == [
        A1,
        A2,
    ]
    not_ci = OutboxFilter(not_targets=["ci"])
    assert [e.action_id for e in await store.due_actions(build.at(5), 10, only=not_ci)] == [B1]
    skip = OutboxFilter(exclude_ids=[A1, B1])
    assert [e.action_id for e in await store.due_actions(build.at(5), 10, only=skip)] == [A2]
    assert await store.next_attempt_at() == build.T0
    assert await store.next_attempt_at(only=OutboxFilter(not_targets=["ci"])) == build.at(1)
    assert await store.next_attempt_at(only=OutboxFilter(target="nowhere")) is None


async def test_attempts_move_an_action_to_retry_delivered_or_dead(store: Store) -> None:
    await _three(store)
    retry = AttemptRecord(_attempt(A1, 1, 3, 503, "HTTP 503"), "pending", build.at(30))
    await store.record_attempt(retry)
    a1 = await store.get_action(A1)
    assert a1 is not None
    assert (a1.status, a1.attempts, a1.last_error, a1.next_attempt_at) == (
        "pending",
        1,
        "HTTP 503",
        build.at(30),
    )
    assert [e.action_id for e in await store.due_actions(build.at(10), 10)] == [B1, A2]
    assert await store.next_attempt_at(only=OutboxFilter(target="ci")) == build.at(2)

    await store.record_attempts(
        [
            AttemptRecord(_attempt(A1, 2, 31, 200, None), "delivered", None),
            AttemptRecord(_attempt(B1, 1, 4, 422, "HTTP 422: no"), "dead", None, "refused"),
            AttemptRecord(_attempt(A2, 1, 5, None, "timed out"), "dead", None, "too_old"),
        ]
    )
    a1, b1, a2 = [await store.get_action(i) for i in (A1, B1, A2)]
    assert a1 is not None and b1 is not None and a2 is not None
    assert (a1.status, a1.attempts, a1.delivered_at, a1.last_error) == (
        "delivered",
        2,
        build.at(31),
        None,
    )
    assert (b1.status, b1.dead_reason, b1.dead_status) == ("dead", "refused", 422)
    assert (a2.status, a2.dead_reason, a2.dead_status) == ("dead", "too_old", None)
    assert await store.due_actions(build.at(100), 10) == []
    assert await store.next_attempt_at() is None
    attempts = await store.list_attempts(A1)
    assert [(a.attempt, a.started_at, a.status_code, a.error) for a in attempts] == [
        (1, build.at(3), 503, "HTTP 503"),
        (2, build.at(31), 200, None),
    ]
    assert attempts[0].latency_ms == 12.5
    assert await store.list_attempts("act-nope") == []
    assert await store.count_actions() == {"delivered": 1, "dead": 2}


async def test_recording_an_attempt_of_no_action_is_a_conflict_and_writes_nothing(
    store: Store,
) -> None:
    await _three(store)
    group = [
        AttemptRecord(_attempt(A1, 1, 3, 200, None), "delivered", None),
        AttemptRecord(_attempt("act-nope", 1, 3, 200, None), "delivered", None),
    ]
    with pytest.raises(Conflict):
        await store.record_attempts(group)
    assert await store.list_attempts(A1) == []
    a1 = await store.get_action(A1)
    assert a1 is not None and a1.status == "pending"
    await store.record_attempts([])  # nothing to do


async def test_a_dead_letter_is_requeued_with_a_fresh_allowance(store: Store) -> None:
    await _three(store)
    with pytest.raises(Conflict, match="not dead"):
        await store.requeue_action(A1, build.at(10), "ops", "why")
    assert await store.requeue_action("act-nope", build.at(10), "ops", None) is None
    dead = AttemptRecord(_attempt(A1, 1, 3, 503, "HTTP 503"), "dead", None, "attempts_exhausted")
    await store.record_attempt(dead)
    entry = await store.requeue_action(A1, build.at(10), "ops", "receiver fixed")
    assert entry is not None
    assert (entry.status, entry.next_attempt_at, entry.requeued_at) == (
        "pending",
        build.at(10),
        build.at(10),
    )
    assert (entry.attempts, entry.attempts_at_requeue) == (1, 1)
    assert (entry.dead_reason, entry.dead_status) == (None, None)
    acts = [e for e in await _audit(store) if e.kind == "admin_act"]
    assert [(e.what, e.rule_id, e.actor, e.reason, e.at) for e in acts] == [
        ("retry_action", A1, "ops", "receiver fixed", build.at(10))
    ]


async def _audit(store: Store) -> list[AuditEntry]:
    return await store.audit(AuditQuery(limit=1000))


async def test_list_actions_newest_first_by_status_and_visible_projects(store: Store) -> None:
    await _three(store)
    await store.record_attempt(
        AttemptRecord(_attempt(A1, 1, 3, 422, "no"), "dead", None, "refused")
    )
    assert [e.action_id for e in await store.list_actions()] == [A2, B1, A1]
    assert [e.action_id for e in await store.list_actions(limit=2)] == [A2, B1]
    assert [e.action_id for e in await store.list_actions("dead")] == [A1]
    assert [e.action_id for e in await store.list_actions("pending")] == [A2, B1]
    only_b = frozenset({"tower-b"})
    assert [e.action_id for e in await store.list_actions(limit=1, projects=only_b)] == [B1]
    only_a = frozenset({"tower-a"})
    assert [e.action_id for e in await store.list_actions("pending", projects=only_a)] == [A2]
    assert await store.list_actions(projects=frozenset()) == []
    assert await store.count_actions() == {"pending": 2, "dead": 1}


async def test_outbox_state_survives_reopening(backend: Backend) -> None:
    store = await backend.open()
    await _three(store)
    await store.record_attempt(
        AttemptRecord(_attempt(B1, 1, 4, 410, "HTTP 410"), "dead", None, "refused")
    )
    before = await store.list_actions()
    await store.close()
    again = await backend.open()
    assert await again.list_actions() == before
    assert [a.status_code for a in await again.list_attempts(B1)] == [410]
