"""Deadlines: ``CompiledCondition.next_change_at`` and ``gatekeeper.engine.deadlines``.

Every "now" comes from an injected ``FixedClock``; facts are real ``FactTable`` rows seen
through ``ProjectFacts``, as the engine sees them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.clock import FixedClock, format_rfc3339
from gatekeeper.engine.deadlines import (
    DeadlineSchedule,
    instances_of,
    mark_due,
    schedule_rules,
)
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.model import InstanceKey, RuleState
from gatekeeper.expr import (
    TIME_RECHECK,
    CompiledCondition,
    Evaluation,
    FactLookup,
    FactRef,
    compile_condition,
    next_change_at,
)
from gatekeeper.expr.compiler import _lowered_leaves, _variables
from gatekeeper.expr.language import Item, _item_value, _Source
from gatekeeper.expr.reference import _Evaluator
from gatekeeper.expr.timing import _find_time_sites
from gatekeeper.rules.model import NotifyAction, Rule, Ruleset
from tests.test_expressions import DictFacts

PROJECT = "tower-a"
START = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)
APPROVED_AT = "2026-11-01T09:00:00+05:30"  # = 2026-11-01T03:30:00Z
APPROVED_UTC = datetime(2026, 11, 1, 3, 30, tzinfo=UTC)
US = timedelta(microseconds=1)
UNITS = {"days_since": timedelta(days=1), "hours_since": timedelta(hours=1)}
UNITS["minutes_since"] = timedelta(minutes=1)


def table(
    facts: Mapping[str, Mapping[str, Mapping[str, Any]]], project: str = PROJECT
) -> FactTable:
    """A FactTable of ``{kind: {id: data}}`` in ``project``."""
    return FactTable(
        {
            (project, kind, fact_id): data
            for kind, by_id in facts.items()
            for fact_id, data in by_id.items()
        }
    )


def lookup(facts: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> FactLookup:
    return ProjectFacts(PROJECT, table(facts))


DESIGN = lookup(
    {
        "milestone": {"design": {"status": "approved", "approved_at": APPROVED_AT, "hold": 7}},
        "quality_gate": {"qg1": {"passed": True}, "qg2": {"passed": False}},
        "task": {"T-1": {"started_at": "2026-11-05T06:00:00-08:00", "note": "not a time"}},
    }
)


def compiled(text: str) -> CompiledCondition:
    condition = compile_condition(text)
    assert isinstance(condition, CompiledCondition)
    return condition


def value(condition: CompiledCondition, facts: FactLookup, at: datetime) -> bool:
    return condition.evaluate(facts, at).value


def assert_changes_exactly_at(
    condition: CompiledCondition, facts: FactLookup, now: datetime, at: datetime
) -> None:
    """``at`` is the first instant after ``now`` whose evaluation differs from now's."""
    before = value(condition, facts, now)
    assert value(condition, facts, at - US) == before
    assert value(condition, facts, at) != before


# --------------------------------------------------------------------------------------
# Thresholds, per operator and unit


@pytest.mark.parametrize("function", sorted(UNITS))
@pytest.mark.parametrize(
    ("template", "strict"),
    [
        ("{f}(milestone.design.approved_at) >= 7", False),
        ("{f}(milestone.design.approved_at) > 7", True),
        ("{f}(milestone.design.approved_at) < 7", False),
        ("{f}(milestone.design.approved_at) <= 7", True),
        ("{f}(milestone.design.approved_at) == 7", False),
        ("{f}(milestone.design.approved_at) != 7", False),
        ("7 <= {f}(milestone.design.approved_at)", False),
        ("7 < {f}(milestone.design.approved_at)", True),
        ("7 > {f}(milestone.design.approved_at)", False),
        ("7 >= {f}(milestone.design.approved_at)", True),
        ("7 == {f}(milestone.design.approved_at)", False),
        ("7 != {f}(milestone.design.approved_at)", False),
    ],
)
def test_threshold_per_operator_and_unit(function: str, template: str, strict: bool) -> None:
    condition = compiled(template.format(f=function))
    threshold = APPROVED_UTC + 7 * UNITS[function]
    clock = FixedClock(threshold - UNITS[function] / 2)  # before the threshold
    expected = threshold + US if strict else threshold  # strict: just after it
    at = condition.next_change_at(DESIGN, clock.now())
    assert at == expected
    assert at is not None and at.tzinfo == UTC
    assert_changes_exactly_at(condition, DESIGN, clock.now(), at)


def test_equality_that_holds_now_changes_one_microsecond_later() -> None:
    condition = compiled("days_since(milestone.design.approved_at) == 7")
    now = APPROVED_UTC + timedelta(days=7)
    assert condition.evaluate(DESIGN, now).value is True
    assert condition.next_change_at(DESIGN, now) == now + US
    assert condition.next_change_at(DESIGN, now + US) is None  # never equal again


def test_equality_no_microsecond_reaches_is_never_a_change() -> None:
    # 1e-9 minutes is 0.06 µs: the elapsed value steps from 0 straight past it
    for op in ("==", "!="):
        condition = compiled(f"minutes_since(milestone.design.approved_at) {op} 0.000000001")
        assert condition.next_change_at(DESIGN, APPROVED_UTC - timedelta(hours=1)) is None


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("hours_since(milestone.design.approved_at) >= 1.5", timedelta(minutes=90)),
        ("days_since(milestone.design.approved_at) >= 0.1", timedelta(hours=2.4)),
        ("minutes_since(milestone.design.approved_at) > 0.7", timedelta(seconds=42) + US),
        ("days_since(milestone.design.approved_at) >= 1 / 3", timedelta(hours=8)),
        ("hours_since(milestone.design.approved_at) >= 0.0000001", timedelta(microseconds=360)),
    ],
)
def test_fractional_thresholds_follow_the_evaluators_float_arithmetic(
    text: str, offset: timedelta
) -> None:
    condition = compiled(text)
    now = APPROVED_UTC - timedelta(seconds=1)
    at = condition.next_change_at(DESIGN, now)
    assert at == APPROVED_UTC + offset
    assert_changes_exactly_at(condition, DESIGN, now, at)


def test_threshold_read_from_a_fact() -> None:
    condition = compiled("days_since(milestone.design.approved_at) >= milestone.design.hold")
    assert condition.next_change_at(DESIGN, START) == APPROVED_UTC + timedelta(days=7)


def test_negative_threshold_for_a_timestamp_in_the_future() -> None:
    condition = compiled('hours_since(task["T-1"].started_at) >= -2')  # 14:00Z
    assert condition.next_change_at(DESIGN, START - timedelta(hours=1)) == START  # 12:00Z
    assert condition.next_change_at(DESIGN, START - US) == START
    assert condition.next_change_at(DESIGN, START) is None  # in effect from now on


# --------------------------------------------------------------------------------------
# Zones


def test_zone_offsets_of_timestamps_and_of_now() -> None:
    condition = compiled(
        'days_since(milestone.design.approved_at) >= 7 or hours_since(task["T-1"].started_at) >= 1'
    )
    # approved 2026-11-01T09:00+05:30 = 03:30Z -> 2026-11-08T03:30Z;
    # started 2026-11-05T06:00-08:00 = 14:00Z -> 2026-11-05T15:00Z (earlier)
    expected = datetime(2026, 11, 5, 15, tzinfo=UTC)
    kolkata = timezone(timedelta(hours=5, minutes=30))
    for now in (START, START.astimezone(kolkata), START.astimezone(timezone(timedelta(hours=-8)))):
        at = condition.next_change_at(DESIGN, now)
        assert at == expected
        assert at is not None and at.utcoffset() == timedelta(0)


def test_naive_now_is_utc() -> None:
    condition = compiled("days_since(milestone.design.approved_at) >= 7")
    assert condition.next_change_at(DESIGN, START.replace(tzinfo=None)) == datetime(
        2026, 11, 8, 3, 30, tzinfo=UTC
    )


# --------------------------------------------------------------------------------------
# Nothing to wait for


@pytest.mark.parametrize(
    "text",
    [
        "days_since(milestone.build.approved_at) >= 7",  # no such fact
        "days_since(milestone.design.signed_at) >= 7",  # no such field
        'days_since(task["T-1"].note) >= 7',  # not a timestamp
        "days_since(milestone.design.status) > 1",  # not a timestamp either
        "days_since(milestone.design.approved_at) >= milestone.design.missing",
        "days_since(milestone.design.approved_at) >= milestone.design.status",  # not a number
        "days_since(milestone.design.approved_at) >= 1e300",  # after datetime.max
        'days_since(milestone.design.approved_at) == "7"',  # never equal
        "days_since(milestone.build.approved_at) * 24 >= 7",  # unsolved, but no timestamp
        'milestone.design.status == "approved" and quality_gate.qg1.passed',  # no time at all
        "true",
    ],
)
def test_no_next_change(text: str) -> None:
    assert compiled(text).next_change_at(DESIGN, START) is None


def test_timestamp_without_a_zone_is_no_deadline() -> None:
    facts = lookup({"milestone": {"design": {"approved_at": "2026-11-01T09:00:00"}}})
    condition = compiled("days_since(milestone.design.approved_at) >= 7")
    assert condition.next_change_at(facts, START) is None


def test_thresholds_already_past_are_not_returned_unless_another_is_upcoming() -> None:
    past = compiled("days_since(milestone.design.approved_at) >= 1")  # 2026-11-02
    assert past.next_change_at(DESIGN, START) is None
    assert value(past, DESIGN, START) is True
    both = compiled(
        "days_since(milestone.design.approved_at) >= 1"
        " and days_since(milestone.design.approved_at) < 10"
    )
    assert both.next_change_at(DESIGN, START) == APPROVED_UTC + timedelta(days=10)


def test_earliest_of_several_thresholds() -> None:
    condition = compiled(
        "days_since(milestone.design.approved_at) >= 7"
        ' or hours_since(task["T-1"].started_at) > 30'
        ' or 2 <= minutes_since(task["T-1"].started_at) < 90'
    )
    # started 14:00Z: 14:02Z (>= 2 minutes) comes first
    assert condition.next_change_at(DESIGN, START) == datetime(2026, 11, 5, 14, 2, tzinfo=UTC)
    # in the middle of the chain, its upper end comes next
    at = condition.next_change_at(DESIGN, datetime(2026, 11, 5, 14, 30, tzinfo=UTC))
    assert at == datetime(2026, 11, 5, 15, 30, tzinfo=UTC)


def test_threshold_is_returned_even_when_another_clause_is_false() -> None:
    # Conservative: the analysis does not look at the other clauses; an early wake-up only
    # confirms that the value did not change.
    condition = compiled(
        "quality_gate.qg2.passed and days_since(milestone.design.approved_at) >= 7"
    )
    at = condition.next_change_at(DESIGN, START)
    assert at == APPROVED_UTC + timedelta(days=7)
    assert value(condition, DESIGN, at) is False


# --------------------------------------------------------------------------------------
# The 1-second fallback


@pytest.mark.parametrize(
    "text",
    [
        'now() > "2026-11-05"',
        "days_since(milestone.design.approved_at) * 24 >= 7",
        "round(days_since(milestone.design.approved_at)) == 4",
        'days_since(milestone.design.approved_at) > days_since(task["T-1"].started_at)',
        "days_since(milestone.design.approved_at) in [1, 2, 3]",
        "days_since(milestone.design.approved_at)",
        "not hours_since(milestone.design.approved_at)",
        "days_since(now()) > 1",
        'milestone.design.status == "approved" and now() >= milestone.design.approved_at',
    ],
)
def test_unsolvable_uses_of_time_fall_back_to_one_second(text: str) -> None:
    clock = FixedClock(START)
    assert compiled(text).next_change_at(DESIGN, clock.now()) == START + timedelta(seconds=1)
    assert timedelta(seconds=1) == TIME_RECHECK


def test_fallback_does_not_hide_an_earlier_threshold() -> None:
    condition = compiled(
        'now() > "2027" or hours_since(task["T-1"].started_at) >= -2.0001'  # 11:59:59.64Z
    )
    at = condition.next_change_at(DESIGN, START - timedelta(seconds=1))
    assert at == datetime(2026, 11, 5, 11, 59, 59, 640000, tzinfo=UTC)


def test_public_function_for_any_condition() -> None:
    assert next_change_at(
        compiled("days_since(milestone.design.approved_at) >= 7"), DESIGN, START
    ) == (datetime(2026, 11, 8, 3, 30, tzinfo=UTC))

    class Opaque:
        text = "opaque"
        reads: frozenset[FactRef] = frozenset()

        def __init__(self, uses_time: bool) -> None:
            self.uses_time = uses_time

        def evaluate(self, facts: FactLookup, now: datetime) -> Evaluation:
            return Evaluation(value=False, clauses=())

    assert next_change_at(Opaque(True), DESIGN, START) == START + timedelta(seconds=1)
    assert next_change_at(Opaque(False), DESIGN, START) is None


# --------------------------------------------------------------------------------------
# The compiled time sites answer what the reference answers

_SOLVED_TEXTS = [
    "days_since(milestone.design.approved_at) >= 7",
    "days_since(milestone.design.approved_at) >= milestone.design.hold",
    'hours_since(task["T-1"].started_at) > 30 or 2 <= minutes_since(task[x.y.id].at) < 90',
    "days_since(milestone.build.approved_at) >= 7",  # no such fact
    'days_since(task["T-1"].note) >= 7',  # not a timestamp
    "days_since(milestone.design.approved_at) >= milestone.design.status",  # not a number
    "days_since(milestone.design.approved_at) * 24 >= 7",  # unsolved
    'now() > "2027" or hours_since(task["T-1"].started_at) >= -2.0001',
    "days_since(milestone.design.odd) >= 1",  # data that is not JSON: the reference decides
    "days_since(milestone.design.approved_at) >= milestone.design.odd",
    "days_since(item.data.opened_at) >= 3",
    "days_since(milestone.design.approved_at) >= count(t.data.at for t in task)",
    "days_since(max(t.data.at for t in task)) >= 1",  # a collection in the timestamp
]


class _NotJson:
    """A value no JSON document holds."""


@pytest.mark.parametrize("text", _SOLVED_TEXTS)
def test_compiled_time_sites_answer_as_the_reference(text: str) -> None:
    facts = DictFacts(
        {
            "milestone": {
                "design": {
                    "approved_at": APPROVED_AT,
                    "hold": 7,
                    "status": "approved",
                    "odd": _NotJson(),
                }
            },
            "task": {
                "T-1": {"started_at": "2026-11-05T06:00:00-08:00", "note": "x"},
                "T-2": {"at": "2026-11-05T14:00:00Z"},
            },
            "x": {"y": {"id": "T-2"}},
        }
    )
    item_kind = "case" if "item." in text else None
    condition = compile_condition(text, item_kind=item_kind)
    assert isinstance(condition, CompiledCondition)
    item = None if item_kind is None else Item("case", "c-1", {"opened_at": APPROVED_AT})
    leaves = _lowered_leaves(text, item_kind)
    for now in [START, START + timedelta(hours=3), START + timedelta(days=30)]:
        evaluator = _Evaluator(_Source(text), facts, now, variables=_variables(_item_value(item)))
        expected = _find_time_sites(leaves).next_change(evaluator, now)
        assert condition.next_change_at(facts, now, item) == expected
        assert condition.next_change_at(facts, now, item) == expected  # compiled by now
    compiled_form = type(condition._time).__name__
    solved_by_reference = " for t in task" in text
    assert compiled_form == ("_Pending" if solved_by_reference else "_TimeCode")


def test_conditions_of_one_shape_share_their_compiled_time_sites() -> None:
    first = compiled('days_since(task["T-1"].started_at) >= 7 and task["T-1"].n > 1')
    second = compiled('days_since(task["T-9"].started_at) >= 3 and task["T-9"].n > 2')
    first.next_change_at(DESIGN, START)
    second.next_change_at(DESIGN, START)
    assert first._time is second._time


# --------------------------------------------------------------------------------------
# The guarantee, for random thresholds

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@settings(max_examples=300, deadline=None)
@given(
    function=st.sampled_from(sorted(UNITS)),
    op=st.sampled_from(sorted(_OPS)),
    bound=st.one_of(
        st.integers(-1000, 1000),
        st.floats(-1000, 1000, allow_nan=False, allow_infinity=False),
        st.integers(-100_000, 100_000).map(lambda n: n / 1000),
    ),
    start_us=st.integers(-(10**14), 10**14),
    offset_minutes=st.integers(-14 * 60, 14 * 60),
    now_us=st.integers(-(10**14), 10**14),
    mirrored=st.booleans(),
)
def test_value_is_constant_until_the_answer_and_changes_there(
    function: str,
    op: str,
    bound: float,
    start_us: int,
    offset_minutes: int,
    now_us: int,
    mirrored: bool,
) -> None:
    zone = timezone(timedelta(minutes=offset_minutes))
    started = (START + start_us * US).astimezone(zone)
    facts = lookup({"task": {"t": {"at": started.isoformat()}}})
    text = (
        f"{bound!r} {op} {function}(task.t.at)"
        if mirrored
        else f"{function}(task.t.at) {op} {bound!r}"
    )
    condition = compiled(text)
    now = START + now_us * US
    at = condition.next_change_at(facts, now)
    before = value(condition, facts, now)
    if at is None:
        later = [now + US, now + timedelta(days=10_000), datetime(9999, 12, 31, tzinfo=UTC)]
        assert all(value(condition, facts, t) == before for t in later)
        return
    assert at > now
    assert value(condition, facts, at - US) == before
    assert value(condition, facts, at) != before


# --------------------------------------------------------------------------------------
# DeadlineSchedule


def test_schedule_set_replace_remove_and_pop_each_once_in_order() -> None:
    schedule = DeadlineSchedule()
    assert schedule.next_due() is None and len(schedule) == 0
    schedule.set("a", START + timedelta(seconds=30))
    schedule.set("b", START + timedelta(seconds=10))
    schedule.set("c", START + timedelta(seconds=20))
    schedule.set("b", START + timedelta(seconds=40))  # replaces b's earlier entry
    schedule.set("c", None)  # removes c
    schedule.set("d", START + timedelta(seconds=30))
    assert len(schedule) == 3 and "c" not in schedule and "b" in schedule
    assert schedule.due_at("b") == START + timedelta(seconds=40)
    assert schedule.next_due() == START + timedelta(seconds=30)  # stale b@10 and c@20 skipped
    assert schedule.pop_due(START + timedelta(seconds=29)) == []
    assert schedule.pop_due(START + timedelta(seconds=30)) == ["a", "d"]
    assert schedule.pop_due(START + timedelta(seconds=30)) == []
    assert schedule.pop_due(START + timedelta(days=1)) == ["b"]
    assert len(schedule) == 0 and schedule.next_due() is None


def test_schedule_same_time_twice_is_one_entry_and_removed_rules_stay_removed() -> None:
    schedule = DeadlineSchedule()
    schedule.set("a", START)
    schedule.set("a", START)
    schedule.set("b", START)
    schedule.set("b", None)
    schedule.set("b", START + timedelta(hours=1))
    assert schedule.pop_due(START) == ["a"]
    assert schedule.pop_due(START + timedelta(hours=2)) == ["b"]


def test_schedule_normalises_zones_and_naive_times() -> None:
    schedule = DeadlineSchedule()
    kolkata = timezone(timedelta(hours=5, minutes=30))
    schedule.set("a", datetime(2026, 11, 5, 17, 30, tzinfo=kolkata))  # 12:00Z
    schedule.set("b", datetime(2026, 11, 5, 11, 59))  # naive: UTC
    assert schedule.next_due() == datetime(2026, 11, 5, 11, 59, tzinfo=UTC)
    assert schedule.pop_due(START.replace(tzinfo=None)) == ["b", "a"]


def test_schedule_rebuilds_its_heap_when_stale_entries_pile_up() -> None:
    schedule = DeadlineSchedule()
    for n in range(20_000):
        schedule.set(f"r{n % 10}", START + n * US)
    assert len(schedule) == 10
    assert len(schedule._heap) <= 2 * 10 + 1024 + 1
    assert schedule.pop_due(START + timedelta(days=1)) == [f"r{n}" for n in range(10)]


def test_seconds_until_next() -> None:
    schedule = DeadlineSchedule()
    assert schedule.seconds_until_next(START) is None
    assert schedule.seconds_until_next(START, cap=60) == 60
    schedule.set("a", START + timedelta(seconds=90))
    assert schedule.seconds_until_next(START) == 90
    assert schedule.seconds_until_next(START, cap=60) == 60
    assert schedule.seconds_until_next(START + timedelta(seconds=100)) == 0
    schedule.clear()
    assert len(schedule) == 0 and schedule.next_due() is None


# --------------------------------------------------------------------------------------
# With rules and the engine


def make_rule(rule_id: str, when: str, project: str = PROJECT, fire: str = "once") -> Rule:
    return Rule(
        id=rule_id,
        project=project,
        description=rule_id,
        condition=compile_condition(when),
        fire="once" if fire == "once" else "each_time",
        actions=(NotifyAction(target="finance-chat", message="${rule_id} fired"),),
        approvals=None,
        content_hash=f"hash-of-{rule_id}",
        file="rules/test.yaml",
        line=1,
    )


HOLD = (
    'milestone.design.status == "approved" and quality_gate.qg_design.passed'
    " and days_since(milestone.design.approved_at) >= 7"
)


def design_facts(project: str = PROJECT, approved_at: str = APPROVED_AT) -> FactTable:
    return FactTable(
        {
            (project, "milestone", "design"): {"status": "approved", "approved_at": approved_at},
            (project, "quality_gate", "qg_design"): {"passed": True},
        }
    )


def test_schedule_rules_uses_each_rules_project_and_drops_timeless_rules() -> None:
    facts = design_facts()
    facts.put(
        ("tower-b", "milestone", "design"),
        {"status": "approved", "approved_at": "2026-11-03T00:00:00Z"},
    )
    facts.put(("tower-b", "quality_gate", "qg_design"), {"passed": True})
    a = make_rule("tower-a/hold", HOLD)
    b = make_rule("tower-b/hold", HOLD, project="tower-b")
    timeless = make_rule("tower-a/plain", "quality_gate.qg_design.passed")
    schedule = DeadlineSchedule()
    schedule.set((timeless.id, ""), START)  # scheduled earlier; no longer time-dependent
    earliest = schedule_rules(schedule, [a, b, timeless], facts, START)
    assert schedule.due_at((a.id, "")) == datetime(2026, 11, 8, 3, 30, tzinfo=UTC)
    assert schedule.due_at((b.id, "")) == datetime(2026, 11, 10, tzinfo=UTC)
    assert (timeless.id, "") not in schedule
    assert earliest == datetime(2026, 11, 8, 3, 30, tzinfo=UTC)


def test_seven_day_hold_fires_exactly_at_approval_plus_seven_days() -> None:
    clock = FixedClock(START)
    rule = make_rule("tower-a/design-release", HOLD)
    engine = Engine(Ruleset(rules=(rule,), files={}, version="v1"))
    facts = design_facts()
    states: dict[InstanceKey, RuleState] = {}
    first = engine.plan_rules(facts, states, [rule], clock.now(), "reload")
    assert first.decisions[0].outcome == "not_met"
    states.update(first.rule_states)

    schedule = DeadlineSchedule()
    schedule_rules(schedule, engine.time_dependent, facts, clock.now())
    due = schedule.next_due()
    assert due == datetime(2026, 11, 8, 3, 30, tzinfo=UTC)  # 2026-11-01T09:00+05:30 + 7 d

    clock.set(due - US)
    assert schedule.pop_due(clock.now()) == []
    early = engine.plan_rules(facts, states, [rule], clock.now(), "time")
    assert early.decisions[0].outcome == "not_met" and not early.fired

    clock.set(due)
    popped = [engine.rules[i] for i, _ in schedule.pop_due(clock.now())]
    assert [r.id for r in popped] == [rule.id]
    transition = engine.plan_rules(
        facts, states, popped, clock.now(), "time", record_unchanged=False
    )
    assert [d.outcome for d in transition.decisions] == ["fired"]
    assert transition.decisions[0].decided_at == format_rfc3339(due)
    states.update(transition.rule_states)
    schedule_rules(schedule, popped, facts, clock.now())
    assert len(schedule) == 0  # >= 7 days stays true: nothing more to wait for


def test_deadline_that_passed_while_down_fires_at_start() -> None:
    rule = make_rule("tower-a/design-release", HOLD)
    engine = Engine(Ruleset(rules=(rule,), files={}, version="v1"))
    facts = design_facts()
    states = {(rule.id, ""): RuleState(rule.id, gate_open=False, rule_hash=rule.content_hash)}
    clock = FixedClock(datetime(2026, 12, 1, tzinfo=UTC))  # restarted weeks later
    schedule = DeadlineSchedule()
    schedule_rules(schedule, engine.time_dependent, facts, clock.now())
    assert len(schedule) == 0  # the threshold is past: scheduling alone would miss it
    mark_due(schedule, instances_of(engine.time_dependent, facts), clock.now())  # what a start does
    due = [engine.rules[i] for i, _ in schedule.pop_due(clock.now())]
    transition = engine.plan_rules(facts, states, due, clock.now(), "time", record_unchanged=False)
    assert [d.outcome for d in transition.decisions] == ["fired"]


def test_deadline_loop_with_an_injected_clock_follows_a_window() -> None:
    """Simulates the daemon's loop: jump to ``next_due``, plan what is due, reschedule."""
    rule = make_rule(
        "tower-a/window",
        "1 <= hours_since(milestone.design.approved_at) < 2",
        fire="each_time",
    )
    engine = Engine(Ruleset(rules=(rule,), files={}, version="v1"))
    facts = design_facts(approved_at="2026-11-05T12:00:00Z")
    clock = FixedClock(START)
    states: dict[InstanceKey, RuleState] = {}
    schedule = DeadlineSchedule()
    mark_due(schedule, instances_of(engine.time_dependent, facts), clock.now())
    seen: list[tuple[datetime, str]] = []
    for _ in range(5):
        due_at = schedule.next_due()
        if due_at is None:
            break
        clock.set(due_at)
        now = clock.now()
        due = [engine.rules[i] for i, _ in schedule.pop_due(now)]
        transition = engine.plan_rules(facts, states, due, now, "time")
        states.update(transition.rule_states)
        seen += [(now, d.outcome) for d in transition.decisions]
        schedule_rules(schedule, due, facts, now)
    assert seen == [
        (START, "not_met"),
        (START + timedelta(hours=1), "fired"),
        (START + timedelta(hours=2), "not_met"),
    ]
    assert len(schedule) == 0
