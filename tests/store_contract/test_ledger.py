"""LedgerBook and the ledger's movements: reserve with the decision, send with the 2xx
attempt record, cancel and return, settle, fail and return, a dead letter or a cancelled
release the bank settled or failed after all (reclaim), a settlement during an attempt,
the figures they sum to, the alerts queued with a dead letter and a settlement, and paging
the movements."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from gatekeeper.engine.model import QueuedAction
from gatekeeper.store import Store
from gatekeeper.store.errors import AttemptInFlight, Conflict, KeyReused
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import (
    Attempt,
    AttemptRecord,
    CancelRequest,
    EscrowFigures,
    LedgerMovement,
    SettlementCallback,
)

from . import build

R1, R2, R3 = (build.action_id("tower-a/pay", n) for n in (1, 2, 3))
OTHER = build.action_id("tower-b/pay", 1)
PIPELINE = build.action_id("tower-a/ci", 1)


async def _releases(store: Store) -> None:
    """Three releases from ``esc`` (1.10, 2.20, 3.30 to bank), one from ``other`` (tower-b),
    and a pipeline action."""
    await store.commit_transitions(
        [
            build.firing("tower-a/pay", 1, build.T0, target="bank", release=("esc", "1.10")),
            build.firing("tower-a/pay", 2, build.at(1), target="bank", release=("esc", "2.20")),
            build.firing("tower-a/pay", 3, build.at(2), target="bank", release=("esc", "3.30")),
            build.firing(
                "tower-b/pay",
                1,
                build.at(3),
                project="tower-b",
                target="bank",
                release=("other", "100.00"),
            ),
            build.firing("tower-a/ci", 1, build.at(4)),
        ]
    )


def _record(action_id: str, when: float, status: str, code: int | None) -> AttemptRecord:
    attempt = Attempt(action_id, 1, build.at(when), 5.0, code, None if code == 200 else "boom")
    dead = "refused" if status == "dead" else None
    return AttemptRecord(attempt, status, None, dead)  # type: ignore[arg-type]


async def _send(store: Store, action_id: str, when: float) -> None:
    assert await store.begin_attempt(action_id, build.at(when))
    await store.record_attempt(_record(action_id, when, "delivered", 200))


def _alert(action_id: str, about: str, when: float) -> QueuedAction:
    return QueuedAction(
        action_id,
        "notify",
        "chat",
        "tower-a/pay",
        "tower-a/pay#1",
        {"project": "tower-a", "message": f"about {about}", "alert": "dead_letter"},
        build.iso(when),
    )


def _settlement(
    release_id: str,
    outcome: str,
    when: float,
    *,
    webhook_id: str = "msg-1",
    body: str = "b1",
    target: str = "bank",
    alert: QueuedAction | None = None,
) -> SettlementCallback:
    return SettlementCallback(
        target,
        release_id,
        outcome,
        "ref-" + webhook_id,
        "no funds"
        if outcome == "failed"  # type: ignore[arg-type]
        else None,
        webhook_id,
        body,
        build.at(when),
        alert,
    )


def _kinds(movements: list[LedgerMovement]) -> list[tuple[str, str, str]]:
    return [(m.release_id, m.movement, m.amount) for m in movements]


async def test_a_release_is_reserved_in_its_decisions_transaction(store: Store) -> None:
    await _releases(store)
    movements = await store.ledger_movements()
    assert _kinds(movements) == [
        (R1, "reserve", "1.10"),
        (R2, "reserve", "2.20"),
        (R3, "reserve", "3.30"),
        (OTHER, "reserve", "100.00"),
    ]
    first = movements[0]
    assert (first.escrow, first.currency, first.at, first.actor) == (
        "esc",
        "USD",
        build.T0,
        "tower-a/pay",
    )
    assert [m.id for m in movements] == sorted({m.id for m in movements})
    assert await store.escrow_totals() == {
        "esc": EscrowFigures(reserved=Decimal("6.60")),
        "other": EscrowFigures(reserved=Decimal("100.00")),
    }


async def test_a_delivered_release_is_sent_once_with_its_attempt(store: Store) -> None:
    await _releases(store)
    await _send(store, R1, 10)
    await store.record_attempt(_record(PIPELINE, 11, "delivered", 200))  # no money: no movement
    sends = [m for m in await store.ledger_movements("esc") if m.movement == "send"]
    assert _kinds(sends) == [(R1, "send", "1.10")]
    assert (sends[0].at, sends[0].actor) == (build.at(10), "bank")
    figures = (await store.escrow_totals())["esc"]
    assert (figures.reserved, figures.sent, figures.committed) == (
        Decimal("5.50"),
        Decimal("1.10"),
        Decimal("6.60"),
    )


async def test_a_dead_release_stays_reserved_and_unconfirmed(store: Store) -> None:
    await _releases(store)
    await store.record_attempt(_record(R2, 10, "dead", 422))
    figures = (await store.escrow_totals())["esc"]
    assert (figures.reserved, figures.unconfirmed, figures.committed) == (
        Decimal("6.60"),
        Decimal("2.20"),
        Decimal("6.60"),
    )


async def test_a_cancel_returns_the_amount_and_is_audited(store: Store) -> None:
    await _releases(store)
    cancelled = await store.cancel_release(CancelRequest(R2, build.at(10), "ops", "wrong payee"))
    assert cancelled is not None
    entry, movements = cancelled
    assert (entry.action_id, entry.status) == (R2, "cancelled")
    assert _kinds(movements) == [(R2, "cancel", "2.20"), (R2, "return", "2.20")]
    assert [(m.actor, m.reason, m.at) for m in movements] == [
        ("ops", "wrong payee", build.at(10)),
        ("ops", "cancelled", build.at(10)),
    ]
    figures = (await store.escrow_totals())["esc"]
    assert (figures.reserved, figures.returned, figures.committed) == (
        Decimal("4.40"),
        Decimal("2.20"),
        Decimal("4.40"),
    )
    # never due again, whatever the time
    assert R2 not in [e.action_id for e in await store.due_actions(build.at(99999), 100)]
    [act] = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert (act.what, act.rule_id, act.actor, act.reason, act.project) == (
        "cancel_action",
        R2,
        "ops",
        "wrong payee",
        "tower-a",
    )
    assert [e.action_id for e in await store.list_actions("cancelled")] == [R2]
    assert (await store.count_actions())["cancelled"] == 1


async def test_a_dead_release_can_be_cancelled(store: Store) -> None:
    await _releases(store)
    await store.record_attempt(_record(R1, 10, "dead", 422))
    assert await store.cancel_release(CancelRequest(R1, build.at(11), "ops", "stop")) is not None
    figures = (await store.escrow_totals())["esc"]
    assert (figures.unconfirmed, figures.returned) == (Decimal("0.00"), Decimal("1.10"))


async def test_a_cancel_is_refused_unless_the_release_was_not_sent(store: Store) -> None:
    await _releases(store)
    await _send(store, R1, 10)
    before = await store.ledger_movements()
    with pytest.raises(Conflict, match="delivered"):
        await store.cancel_release(CancelRequest(R1, build.at(11), "ops", "too late"))
    with pytest.raises(Conflict, match="not a release"):
        await store.cancel_release(CancelRequest(PIPELINE, build.at(11), "ops", "no money"))
    assert await store.cancel_release(CancelRequest("act-nope", build.at(11), "ops", "x")) is None
    assert await store.cancel_release(CancelRequest(R2, build.at(12), "ops", "once"))
    with pytest.raises(Conflict, match="cancelled"):
        await store.cancel_release(CancelRequest(R2, build.at(13), "ops", "twice"))
    assert len(await store.ledger_movements()) == len(before) + 2
    assert len(await store.audit(AuditQuery(kinds=("admin_act",)))) == 1


async def test_an_attempt_in_flight_holds_off_a_cancel_until_its_outcome(store: Store) -> None:
    await _releases(store)
    assert await store.begin_attempt(R1, build.at(10))
    with pytest.raises(AttemptInFlight, match="in flight"):
        await store.cancel_release(CancelRequest(R1, build.at(11), "ops", "stop"))
    assert (await store.get_action(R1)).status == "pending"  # type: ignore[union-attr]
    retry = replace(_record(R1, 10, "pending", 503), next_attempt_at=build.at(60))
    await store.record_attempt(retry)  # the outcome: a retry, so it can be cancelled now
    assert await store.cancel_release(CancelRequest(R1, build.at(12), "ops", "stop"))
    # a cancelled release is never begun (so never sent), nor an unknown one
    assert not await store.begin_attempt(R1, build.at(13))
    assert not await store.begin_attempt("act-nope", build.at(13))
    # an attempt recorded anyway leaves it cancelled
    await store.record_attempt(_record(R1, 14, "pending", 503))
    assert (await store.get_action(R1)).status == "cancelled"  # type: ignore[union-attr]


async def test_a_settlement_settles_a_sent_release_once(store: Store) -> None:
    await _releases(store)
    with pytest.raises(Conflict, match="has not been sent"):
        await store.settle_release(_settlement(R1, "settled", 5))
    await _send(store, R1, 10)
    result = await store.settle_release(_settlement(R1, "settled", 20))
    assert result is not None
    assert (result.outcome, result.reference, result.at, result.replayed) == (
        "settled",
        "ref-msg-1",
        build.at(20),
        False,
    )
    assert _kinds(list(result.movements)) == [(R1, "settle", "1.10")]
    assert (result.movements[0].actor, result.movements[0].reference) == ("bank", "ref-msg-1")
    # the same outcome again (another message): nothing new
    again = await store.settle_release(_settlement(R1, "settled", 21, webhook_id="msg-2"))
    assert again is not None and again.movements == () and again.reference == "ref-msg-1"
    # the same message again: replayed, nothing new; with another body: refused
    replayed = await store.settle_release(_settlement(R1, "settled", 22))
    assert replayed is not None and replayed.replayed and replayed.movements == ()
    with pytest.raises(KeyReused):
        await store.settle_release(_settlement(R1, "failed", 23, body="b2"))
    with pytest.raises(Conflict, match="already settled"):
        await store.settle_release(_settlement(R1, "failed", 24, webhook_id="msg-3"))
    figures = (await store.escrow_totals())["esc"]
    assert (figures.sent, figures.settled, figures.committed) == (
        Decimal("0.00"),
        Decimal("1.10"),
        Decimal("6.60"),
    )


async def test_a_failed_settlement_returns_the_amount_and_queues_its_alert(store: Store) -> None:
    await _releases(store)
    await _send(store, R3, 10)
    alert = _alert("act-alert-1", R3, 20)
    result = await store.settle_release(_settlement(R3, "failed", 20, alert=alert))
    assert result is not None and result.outcome == "failed"
    assert _kinds(list(result.movements)) == [(R3, "fail", "3.30"), (R3, "return", "3.30")]
    assert result.movements[0].reason == "no funds"
    queued = await store.get_action("act-alert-1")
    release = await store.get_action(R3)
    assert queued is not None and release is not None
    assert (queued.status, queued.target, queued.decision_id) == (
        "pending",
        "chat",
        release.decision_id,
    )
    # the same failure again: nothing new, no second alert
    other = _alert("act-alert-2", R3, 21)
    again = await store.settle_release(
        _settlement(R3, "failed", 21, webhook_id="msg-2", alert=other)
    )
    assert again is not None and again.movements == ()
    assert await store.get_action("act-alert-2") is None
    figures = (await store.escrow_totals())["esc"]
    assert (figures.sent, figures.returned, figures.committed) == (
        Decimal("0.00"),
        Decimal("3.30"),
        Decimal("3.30"),
    )


async def test_a_settlement_names_a_release_sent_to_its_target(store: Store) -> None:
    await _releases(store)
    await _send(store, R1, 10)
    assert await store.settle_release(_settlement(R1, "settled", 20, target="ci")) is None
    assert await store.settle_release(_settlement("act-nope", "settled", 20)) is None
    assert await store.settle_release(_settlement(PIPELINE, "settled", 20)) is None
    with pytest.raises(Conflict, match="it is pending"):  # never sent
        await store.settle_release(_settlement(R2, "settled", 21, webhook_id="m-9"))
    assert await store.settle_release(_settlement(R2, "settled", 21, target="ci")) is None


async def test_a_dead_letter_queues_its_alert_with_its_record(store: Store) -> None:
    await _releases(store)
    alert = _alert("act-dead-alert", PIPELINE, 10)
    await store.record_attempt(replace(_record(PIPELINE, 10, "dead", 422), alert=alert))
    queued = await store.get_action("act-dead-alert")
    dead = await store.get_action(PIPELINE)
    assert queued is not None and dead is not None
    assert (dead.status, queued.status, queued.decision_id) == ("dead", "pending", dead.decision_id)
    assert queued.payload["alert"] == "dead_letter"
    # what the decision queued is what it queued then: not the alert filed under it later
    of_decision = await store.actions_of_decisions(dead.decision_id, dead.decision_id)  # type: ignore[arg-type]
    assert [a.action_id for a in of_decision] == [PIPELINE]


async def test_movements_page_by_id_and_filter(store: Store) -> None:
    await _releases(store)
    await _send(store, R1, 10)
    await store.cancel_release(CancelRequest(R2, build.at(11), "ops", "stop"))
    everything = await store.ledger_movements()
    assert len(everything) == 7
    first = await store.ledger_movements("esc", limit=2)
    rest = await store.ledger_movements("esc", after=first[-1].id, limit=100)
    assert [m.id for m in first + rest] == [m.id for m in everything if m.escrow == "esc"]
    assert _kinds(await store.ledger_movements(release_id=R2)) == [
        (R2, "reserve", "2.20"),
        (R2, "cancel", "2.20"),
        (R2, "return", "2.20"),
    ]
    assert {
        m.release_id for m in await store.ledger_movements(projects=frozenset({"tower-b"}))
    } == {OTHER}
    assert await store.ledger_movements("nowhere") == []


async def test_the_figures_are_the_movements_summed(store: Store) -> None:
    """Whatever happened, reserved + sent + settled + returned = every reserve."""
    await _releases(store)
    await _send(store, R1, 10)
    await _send(store, R3, 11)
    await store.settle_release(_settlement(R1, "settled", 20))
    await store.settle_release(_settlement(R3, "failed", 21, webhook_id="m-2"))
    await store.cancel_release(CancelRequest(R2, build.at(22), "ops", "stop"))
    # a cancelled release the bank settled anyway (reclaim), a dead letter it failed
    await store.settle_release(_settlement(R2, "settled", 23, webhook_id="m-3"))
    await store.commit_transition(
        build.firing("tower-a/pay", 4, build.at(24), target="bank", release=("esc", "4.40"))
    )
    r4 = build.action_id("tower-a/pay", 4)
    await store.record_attempt(_record(r4, 25, "dead", 422))
    await store.settle_release(_settlement(r4, "failed", 26, webhook_id="m-4"))
    sums: dict[str, Decimal] = {}
    for m in await store.ledger_movements("esc"):
        sums[m.movement] = sums.get(m.movement, Decimal(0)) + Decimal(m.amount)
    unsent_fail = Decimal("4.40")  # r4's: it was never sent
    figures = (await store.escrow_totals())["esc"]
    assert figures == EscrowFigures(
        reserved=sums["reserve"] + sums["reclaim"] - sums["send"] - sums["cancel"] - unsent_fail,
        sent=sums["send"] - sums["settle"] - (sums["fail"] - unsent_fail),
        settled=sums["settle"],
        returned=sums["return"] - sums["reclaim"],
    )
    assert figures.reserved + figures.sent + figures.settled + figures.returned == sums["reserve"]
    assert figures.committed == Decimal("3.30")


async def test_a_dead_letter_the_bank_settled_is_sent_settled_and_delivered(
    store: Store,
) -> None:
    await _releases(store)
    await store.record_attempt(_record(R1, 10, "dead", 422))
    result = await store.settle_release(_settlement(R1, "settled", 20))
    assert result is not None and result.outcome == "settled"
    assert _kinds(list(result.movements)) == [(R1, "send", "1.10"), (R1, "settle", "1.10")]
    assert [(m.actor, m.at) for m in result.movements] == [("bank", build.at(20))] * 2
    entry = await store.get_action(R1)
    assert entry is not None
    assert (entry.status, entry.delivered_at, entry.dead_reason) == (
        "delivered",
        build.at(20),
        None,
    )
    [act] = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert (act.what, act.rule_id, act.actor, act.project) == (
        "dead_letter_settlement",
        R1,
        "bank",
        "tower-a",
    )
    assert act.reason == "settled (reference ref-msg-1); it was a dead letter: refused, HTTP 422"
    assert (await store.escrow_totals())["esc"] == EscrowFigures(  # nothing unconfirmed
        reserved=Decimal("5.50"), settled=Decimal("1.10")
    )
    with pytest.raises(Conflict, match="not dead"):  # settled: never requeued, never resent
        await store.requeue_action(R1, build.at(21), "ops", None)


async def test_a_dead_letter_the_bank_failed_returns_its_amount_unsent(store: Store) -> None:
    await _releases(store)
    await store.record_attempt(_record(R1, 10, "dead", 422))
    result = await store.settle_release(
        _settlement(R1, "failed", 20, alert=_alert("alert-1", R1, 20))
    )
    assert result is not None and result.outcome == "failed"
    assert _kinds(list(result.movements)) == [(R1, "fail", "1.10"), (R1, "return", "1.10")]
    assert (await store.get_action(R1)).status == "delivered"  # type: ignore[union-attr]
    assert await store.get_action("alert-1") is not None
    [act] = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert act.what == "dead_letter_settlement" and act.reason is not None
    assert act.reason.startswith("failed (reference ref-msg-1)")
    # never sent: the fail comes off reserved, not sent
    assert (await store.escrow_totals())["esc"] == EscrowFigures(
        reserved=Decimal("5.50"), returned=Decimal("1.10")
    )


async def test_a_cancelled_release_the_bank_settled_is_reclaimed_and_alerted(
    store: Store,
) -> None:
    await _releases(store)
    await store.record_attempt(replace(_record(R2, 10, "pending", 503), next_attempt_at=None))
    assert await store.cancel_release(CancelRequest(R2, build.at(11), "ops", "stop"))
    alert = _alert("alert-1", R2, 20)
    result = await store.settle_release(_settlement(R2, "settled", 20, alert=alert))
    assert result is not None and (result.outcome, result.reference) == ("settled", "ref-msg-1")
    assert _kinds(list(result.movements)) == [
        (R2, "reclaim", "2.20"),
        (R2, "send", "2.20"),
        (R2, "settle", "2.20"),
    ]
    assert result.movements[0].reason == "settled after its cancel"
    assert (await store.get_action(R2)).status == "cancelled"  # type: ignore[union-attr]
    assert await store.get_action("alert-1") is not None
    acts = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert [(a.what, a.actor, a.reason) for a in acts] == [
        ("settlement_after_cancel", "bank", "settled (reference ref-msg-1) after its cancel"),
        ("cancel_action", "ops", "stop"),
    ]
    figures = (await store.escrow_totals())["esc"]
    assert figures == EscrowFigures(reserved=Decimal("4.40"), settled=Decimal("2.20"))
    # the alert is the release's follow-up, not its decision's action
    assert "alert-1" not in [a.action_id for a in await store.actions_of_decisions(1, 99)]
    with pytest.raises(Conflict, match="already settled"):
        await store.settle_release(_settlement(R2, "failed", 21, webhook_id="msg-2"))


async def test_a_cancelled_release_the_bank_failed_is_recorded_and_moves_nothing(
    store: Store,
) -> None:
    await _releases(store)
    assert await store.cancel_release(CancelRequest(R2, build.at(11), "ops", "stop"))
    before = await store.escrow_totals()
    result = await store.settle_release(
        _settlement(R2, "failed", 20, alert=_alert("alert-1", R2, 20))
    )
    assert result is not None
    assert (result.outcome, result.reference, result.at, result.movements) == (
        "failed",
        "ref-msg-1",
        build.at(20),
        (),
    )
    assert await store.escrow_totals() == before
    assert await store.get_action("alert-1") is None  # nothing moved: nothing to alert
    acts = await store.audit(AuditQuery(kinds=("admin_act",)))
    assert acts[0].what == "settlement_after_cancel"
    assert acts[0].reason == "failed (reference ref-msg-1) after its cancel"
    replayed = await store.settle_release(_settlement(R2, "failed", 21))
    assert replayed is not None and replayed.replayed and replayed.outcome == "failed"
    again = await store.settle_release(_settlement(R2, "failed", 22, webhook_id="msg-2"))
    assert again is not None and again.movements == () and not again.replayed
    with pytest.raises(Conflict, match="already failed"):
        await store.settle_release(_settlement(R2, "settled", 23, webhook_id="msg-3"))


async def test_a_settlement_during_an_attempt_waits_for_its_outcome(store: Store) -> None:
    await _releases(store)
    assert await store.begin_attempt(R1, build.at(10))
    with pytest.raises(AttemptInFlight, match="in flight"):
        await store.settle_release(_settlement(R1, "settled", 11))
    assert await store.ledger_movements(release_id=R1, after=1) == []
    await store.record_attempt(_record(R1, 10, "delivered", 200))
    result = await store.settle_release(_settlement(R1, "settled", 12))  # the same message
    assert result is not None and _kinds(list(result.movements)) == [(R1, "settle", "1.10")]
