"""StateStore's state version (``StateFence``), on both backends: a checked deciding write
moves the database's version one up and the fence with it; one planned on memory behind
the database is refused (``StateBehind``) and writes nothing; ``state_changes`` gives what
was committed after a cursor, each part the current truth; an unchecked write (a SQLite
file's one daemon) reads and writes nothing of it."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from gatekeeper.engine.model import ApprovalInput, Consumption, RuleState, SignOff, Transition
from gatekeeper.store import Store
from gatekeeper.store.errors import StateBehind
from gatekeeper.store.records import (
    Attempt,
    AttemptRecord,
    CancelRequest,
    SettlementCallback,
    StateCursor,
    StateFence,
)

from . import build
from .conftest import Backend


async def _fence(store: Store) -> StateFence:
    return StateFence(await store.state_cursor())


async def test_a_new_database_is_at_version_zero_and_an_unchecked_write_keeps_it(
    store: Store,
) -> None:
    assert await store.state_cursor() == StateCursor()
    await store.commit_transition(build.firing("tower-a/pay", 1, build.T0))
    cursor = await store.state_cursor()
    assert cursor.version == 0  # unchecked: no version taken
    assert (cursor.fact_seq, cursor.decision_id) == (1, 1)


async def test_a_checked_write_moves_the_version_and_the_fence(store: Store) -> None:
    fence = await _fence(store)
    seqs = await store.commit_transitions(
        [build.firing("tower-a/pay", 1, build.T0, release=("esc", "10.00"))], fence=fence
    )
    assert seqs == [[1]]
    assert fence.cursor == StateCursor(1, 1, 1, 0, 1) == await store.state_cursor()
    await store.commit_transitions([build.facts(build.at(1), ("p", "k", "a", {}))], fence=fence)
    assert fence.cursor == StateCursor(2, 2, 1, 0, 1) == await store.state_cursor()


async def test_a_write_behind_the_database_is_refused_and_writes_nothing(store: Store) -> None:
    first, second = await _fence(store), await _fence(store)
    await store.commit_transitions([build.facts(build.T0, ("p", "k", "a", {}))], fence=first)
    before = second.cursor
    with pytest.raises(StateBehind) as refused:
        await store.commit_transitions(
            [build.firing("tower-a/pay", 1, build.at(1), release=("esc", "10.00"))],
            fence=second,
        )
    assert (refused.value.expected, refused.value.current) == (0, 1)
    assert second.cursor == before  # the fence stays where it was
    assert await store.state_cursor() == first.cursor  # nothing written
    assert await store.load_rule_states() == {}
    assert await store.escrow_totals() == {}
    with pytest.raises(StateBehind):  # however often it is tried
        await store.commit_transitions(
            [build.facts(build.at(2), ("p", "k", "b", {}))], fence=second
        )
    second.cursor = (await store.state_changes(second.cursor)).cursor  # caught up
    await store.commit_transitions([build.facts(build.at(3), ("p", "k", "b", {}))], fence=second)
    assert second.cursor.version == 2


async def test_writes_checked_at_once_at_one_version_commit_one(backend: Backend) -> None:
    """Two writers planned at the same version (two daemons, or here two fences of one
    store: SQLite has one daemon per file) commit concurrently: one wins, the other is
    refused as behind."""
    store = await backend.open()
    other = await backend.open() if backend.name == "postgresql" else store
    fences = [await _fence(store), await _fence(store)]
    results = await asyncio.gather(
        store.commit_transitions([build.firing("tower-a/once", 1, build.T0)], fence=fences[0]),
        other.commit_transitions([build.firing("tower-a/once", 1, build.T0)], fence=fences[1]),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["StateBehind", "list"], results
    assert len(await store.list_decisions("tower-a/once")) == 1  # fired once
    assert (await store.state_cursor()).version == 1


async def test_a_daemon_holding_the_turn_commits_first_and_the_others_wait(
    backend: Backend,
) -> None:
    """A writer refused as behind takes the decision turn, catches up and commits: another
    daemon's checked write begun meanwhile waits for the turn to end instead of moving the
    version under it (so a daemon under contention is not refused again and again); on
    SQLite, one daemon per file, the turn is nothing."""
    store = await backend.open()
    if backend.name != "postgresql":
        await store.take_turn()
        await store.end_turn()
        return
    other = await backend.open()
    mine, theirs = await _fence(store), await _fence(other)
    await store.take_turn()
    await store.take_turn()  # held already: the writer asks once per write, this is harmless
    waiting = asyncio.create_task(
        other.commit_transitions([build.facts(build.T0, ("p", "k", "b", {}))], fence=theirs)
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()  # the other daemon waits for the turn
    await store.commit_transitions([build.facts(build.T0, ("p", "k", "a", {}))], fence=mine)
    assert mine.cursor.version == 1  # the holder's write passed (the turn is its own)
    assert not waiting.done()
    await store.end_turn()
    with pytest.raises(StateBehind):  # it waited, then found the version moved
        await asyncio.wait_for(waiting, 10)
    await store.end_turn()  # none held: nothing happens


async def test_the_changes_since_a_cursor_are_the_current_truth(store: Store) -> None:
    writer = await _fence(store)
    await store.commit_transitions(
        [
            build.facts(build.T0, ("tower-a", "task", "a", {"n": 1})),
            build.approval("tower-a/gate", "alice", "approve", build.T0),
            build.approval("tower-a/gate", "bob", "approve", build.T0),
        ],
        fence=writer,
    )
    reader = StateFence(writer.cursor)  # a daemon whose memory is at this point
    await store.commit_transitions(
        [
            build.facts(build.at(1), ("tower-a", "task", "a", {"n": 2})),
            build.facts(build.at(1), ("tower-a", "task", "b", {"n": 1})),
            build.firing("tower-a/pay", 1, build.at(2), release=("esc", "10.00")),
            build.approval("tower-a/gate", "bob", "withdraw", build.at(3)),
            Transition(  # the gate fires, using up alice's approval
                rule_states={("tower-a/gate", ""): RuleState("tower-a/gate", True, 1)},
                consumed=[Consumption("tower-a/gate", "", ("alice",), "tower-a/gate#1")],
                planned_at=build.at(4),
            ),
            Transition(
                signoffs=[SignOff("hash-1", "tower-a/pay", "admin", "ok", "tower-a")],
                planned_at=build.at(5),
            ),
        ],
        fence=writer,
    )
    changes = await store.state_changes(reader.cursor)
    assert changes.cursor == writer.cursor == await store.state_cursor()
    assert changes.facts == [
        (("tower-a", "task", "a"), {"n": 2}),
        (("tower-a", "task", "b"), {"n": 1}),
        (("tower-a", "task", "tower-a/pay-1"), {"n": 1}),
    ]
    assert set(changes.rule_states) == {("tower-a/pay", ""), ("tower-a/gate", "")}
    assert changes.rule_states[("tower-a/gate", "")].fired_count == 1
    # every instance that may have changed, whole: bob withdrew, alice's was used up
    assert changes.approvals == {"tower-a/gate": {}, "tower-a/pay": {}}
    assert [(s.content_hash, s.actor) for s in changes.signoffs] == [("hash-1", "admin")]
    assert changes.escrows == {"esc": Decimal("10.00")}
    assert [(d.rule_id, d.outcome, d.decided_at) for d in changes.decisions] == [
        ("tower-a/pay", "fired", build.iso(2))
    ]
    assert not changes.empty
    again = await store.state_changes(changes.cursor)
    assert again.empty and again.cursor == changes.cursor


async def test_an_approval_standing_after_the_cursor_comes_whole(store: Store) -> None:
    writer = await _fence(store)
    await store.commit_transitions(
        [build.approval("tower-a/gate", "alice", "approve", build.T0)], fence=writer
    )
    reader = StateFence(writer.cursor)
    await store.commit_transitions(
        [
            Transition(
                approvals=[ApprovalInput("tower-a/gate", "tower-a", "bob", "reject", None, "i-1")],
                planned_at=build.at(1),
            )
        ],
        fence=writer,
    )
    changes = await store.state_changes(reader.cursor)
    assert list(changes.approvals) == ["tower-a/gate[i-1]"]
    assert {s: stand.decision for s, stand in changes.approvals["tower-a/gate[i-1]"].items()} == {
        "bob": "reject"
    }


async def test_ledger_writes_are_checked_and_their_returns_caught_up(store: Store) -> None:
    writer = await _fence(store)
    release = build.action_id("tower-a/pay", 1)
    await store.commit_transitions(
        [
            build.firing("tower-a/pay", 1, build.T0, target="bank", release=("esc", "10.00")),
            build.firing("tower-a/pay", 2, build.T0, target="bank", release=("esc", "5.00")),
        ],
        fence=writer,
    )
    stale = StateFence(StateCursor())
    cancel = CancelRequest(release, build.at(1), "ops", "wrong payee")
    with pytest.raises(StateBehind):
        await store.cancel_release(cancel, fence=stale)
    assert (await store.get_action(release)).status == "pending"  # type: ignore[union-attr]
    reader = StateFence(writer.cursor)
    await store.cancel_release(cancel, fence=writer)
    changes = await store.state_changes(reader.cursor)
    assert changes.escrows == {"esc": Decimal("5.00")}  # 10.00 returned
    assert changes.cursor == writer.cursor

    sent = build.action_id("tower-a/pay", 2)
    assert await store.begin_attempt(sent, build.at(2))
    attempt = Attempt(sent, 1, build.at(2), 5.0, 200, None)
    await store.record_attempt(AttemptRecord(attempt, "delivered", None))  # unchecked
    assert (await store.state_cursor()).version == writer.cursor.version
    failed = SettlementCallback(
        "bank", sent, "failed", "ref-1", "no funds", "msg-1", "b1", build.at(3)
    )
    with pytest.raises(StateBehind):
        await store.settle_release(failed, fence=stale)
    reader = StateFence(writer.cursor)
    await store.settle_release(failed, fence=writer)
    changes = await store.state_changes(reader.cursor)
    assert changes.escrows == {"esc": Decimal("0.00")}
