"""The backtest's diff, as the pure functions it is over plain records: matching firings by
rule instance and instant, what counts as a change in releases, shadowed releases (recorded
only, never sent: never money), escrow totals, and the self-check's comparison."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from gatekeeper.clock import parse_rfc3339
from gatekeeper.engine.backtest import (
    ActionRecord,
    DecisionRecord,
    FiringRecord,
    action_record,
    compare_decisions,
    diff_firings,
)

AT = "2026-11-02T09:00:00.000Z"
LATER = "2026-11-03T09:00:00.000Z"


def release(amount: str, status: str = "queued") -> ActionRecord:
    payload = {
        "project": "p",
        "escrow": "e",
        "amount": amount,
        "currency": "USD",
        "payee": "acme",
        "release_id": "act_random",
    }
    return action_record("release", "bank", payload, status)


def firing(
    rule: str, at: str, *actions: object, outcome: str = "fired", n: int = 1
) -> FiringRecord:
    return FiringRecord(rule, "", f"{rule}#{n}", at, outcome, None, tuple(actions))  # type: ignore[arg-type]


def test_release_ids_are_left_out_and_payloads_are_plain_json() -> None:
    a = action_record("release", "bank", {"amount": "1.00", "release_id": "act_1", "t": (1, 2)})
    assert a.payload == {"amount": "1.00", "t": [1, 2]}


def test_firings_match_by_rule_instance_and_instant() -> None:
    recorded = [firing("p/pay", AT, release("10.00")), firing("p/gone", AT, release("5.00"))]
    replayed = [firing("p/pay", AT, release("12.00")), firing("p/new", LATER)]
    diff = diff_firings(recorded, replayed, {"e": "USD"})
    assert [f.firing_id for f in diff.added] == ["p/new#1"]
    assert [f.firing_id for f in diff.gone] == ["p/gone#1"]
    [changed] = diff.changed
    assert [(c.field, c.old, c.new) for c in changed.changes] == [
        ("release actions[0].payload.amount", "10.00", "12.00")
    ]
    assert diff.trips("release") and diff.trips("any") and not diff.trips("none")
    [escrow] = diff.escrows
    assert (escrow.recorded, escrow.replayed, escrow.delta) == (
        Decimal("15.00"),
        Decimal("12.00"),
        Decimal("-3.00"),
    )
    assert escrow.to_json()["delta"] == "-3.00"
    blocks = {"now_blocked": 0, "no_longer_blocked": 0}
    assert diff.by_rule() == {
        "p/gone": {"added": 0, "gone": 1, "changed": 0, **blocks},
        "p/new": {"added": 1, "gone": 0, "changed": 0, **blocks},
        "p/pay": {"added": 0, "gone": 0, "changed": 1, **blocks},
    }


def test_a_firing_that_moved_is_gone_and_added_and_the_window_bounds_both_sides() -> None:
    recorded = [firing("p/pay", LATER, release("10.00"))]
    replayed = [firing("p/pay", AT, release("10.00"))]
    diff = diff_firings(recorded, replayed, {"e": "USD"})
    assert len(diff.added) == len(diff.gone) == 1 and diff.trips("release")
    assert diff.escrows[0].delta == 0
    only_later = diff_firings(recorded, replayed, {"e": "USD"}, since=parse_rfc3339(LATER))
    assert only_later.added == [] and len(only_later.gone) == 1


def test_a_change_without_money_does_not_trip_release() -> None:
    notify = action_record("notify", "chat", {"message": "a"})
    other = action_record("notify", "chat", {"message": "b"})
    diff = diff_firings([firing("p/n", AT, notify)], [firing("p/n", AT, other)], {})
    assert len(diff.changed) == 1 and not diff.trips("release") and diff.trips("any")
    gone = diff_firings([firing("p/n", AT, notify)], [], {})
    assert not gone.trips("release") and gone.trips("any")


def test_a_shadowed_release_is_shadowed_not_a_release() -> None:
    recorded = [firing("p/pay", AT, release("10.00", "shadowed"))]
    same = diff_firings(recorded, [firing("p/pay", AT, release("10.00", "shadowed"))], {})
    assert same.empty and same.escrows == []  # nothing released on either side
    live = diff_firings(recorded, [firing("p/pay", AT, release("10.00"))], {"e": "USD"})
    [changed] = live.changed
    assert [(c.field, c.old, c.new) for c in changed.changes] == [
        ("release actions[0].status", "shadowed", "queued")
    ]
    assert live.trips("release") and live.escrows[0].delta == Decimal("10.00")
    # a gone shadowed firing moves no money: it does not fail --fail-on release
    assert not diff_firings(recorded, [], {}).trips("release")


def test_blocked_firings_release_nothing() -> None:
    blocked = firing("p/pay", AT, outcome="blocked")
    fired = firing("p/pay", AT, release("10.00"))
    diff = diff_firings([blocked], [fired], {"e": "USD"})
    [block] = diff.blocks
    assert block.what == "release no longer blocked" and diff.trips("release")
    assert diff.escrows[0].recorded == 0 and diff.escrows[0].replayed == Decimal("10.00")


def record(rule: str, outcome: str, firing_id: str | None = None) -> DecisionRecord:
    return DecisionRecord(AT, rule, "", "fact", outcome, True, firing_id, None, "h", "v", 1, None)


def test_the_self_check_counts_what_it_reproduced_and_shows_what_it_did_not() -> None:
    recorded = [record("p/a", "not_met"), record("p/a", "not_met"), record("p/b", "fired", "p/b#1")]
    firings = [firing("p/b", AT, release("1.00"))]
    ok = compare_decisions(recorded, iter(list(reversed(recorded))), firings, firings)
    assert ok.ok and (ok.reproduced, ok.total) == (3, 3)
    replayed = [record("p/a", "not_met"), record("p/b", "fired", "p/b#1"), record("p/c", "fired")]
    bad = compare_decisions(recorded, iter(replayed), firings, [firing("p/b", AT, release("2.00"))])
    assert not bad.ok and (bad.reproduced, bad.total) == (1, 3)
    assert bad.differences[0].startswith("recorded, not reproduced: 2026-11-02T09:00:00.000Z p/a")
    assert bad.differences[1].startswith("reproduced, not recorded: 2026-11-02T09:00:00.000Z p/c")
    assert 'p/b#1: release actions[0].payload.amount: recorded "1.00", replayed "2.00"' in (
        bad.differences
    )


def alert(reason: str) -> ActionRecord:
    payload = {"project": "p", "alert": "release_blocked", "reason": reason}
    return action_record("notify", "chat", payload)


def test_fired_to_blocked_is_one_block_change_releasing_nothing() -> None:
    recorded = [
        firing("p/pay", AT, release("10.00"), action_record("notify", "ci", {"m": "paid"})),
        firing("p/bill", LATER, alert("over"), outcome="blocked"),
    ]
    blocked = replace(firing("p/pay", AT, alert("too much"), outcome="blocked"), reason="too much")
    replayed = [blocked, firing("p/bill", LATER, release("4.00"))]
    diff = diff_firings(recorded, replayed, {"e": "USD"})
    assert diff.added == diff.gone == diff.changed == []
    now, no_longer = diff.blocks
    assert (now.now_blocked, now.what) == (True, "release now blocked: too much")
    assert now.fired is recorded[0] and now.money
    assert (no_longer.now_blocked, no_longer.what) == (False, "release no longer blocked")
    assert no_longer.fired is replayed[1]
    assert diff.counts() == "0 added, 0 gone, 0 changed, 1 now blocked, 1 no longer blocked"
    assert diff.trips("release") and not diff.empty
    [escrow] = diff.escrows
    assert (escrow.recorded, escrow.replayed) == (Decimal("10.00"), Decimal("4.00"))


def test_a_firing_without_a_release_now_blocked_is_no_money() -> None:
    recorded = [firing("p/set", AT, action_record("set_fact", "", {"kind": "k"}))]
    replayed = [replace(firing("p/set", AT, outcome="blocked"), reason="a loop")]
    diff = diff_firings(recorded, replayed, {})
    [block] = diff.blocks
    assert block.what == "firing now blocked: a loop" and not block.money
    assert not diff.trips("release") and diff.trips("any")
