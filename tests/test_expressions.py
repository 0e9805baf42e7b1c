"""Tests of the ``when`` language: static checks, reads, evaluation, clauses and the sandbox."""

from __future__ import annotations

import ast
import copy
import pickle
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.expr import (
    FUNCTIONS,
    MAX_EXPRESSION_CHARS,
    Clause,
    CompiledCondition,
    Condition,
    Evaluation,
    ExpressionError,
    ExpressionProblem,
    FactRef,
    compile_condition,
)

NOW = datetime(2026, 11, 9, 9, 0, tzinfo=UTC)


class DictFacts:
    """A FactLookup over {kind: {id: data}}."""

    def __init__(self, facts: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
        self.facts = facts
        self.calls: list[tuple[str, str | None]] = []

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        self.calls.append((kind, id))
        return self.facts.get(kind, {}).get(id)

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        self.calls.append((kind, None))
        return self.facts.get(kind, {})


FACTS = DictFacts(
    {
        "milestone": {
            "design": {
                "status": "approved",
                "approved_at": "2026-11-01T09:00:00Z",
                "reviewers": ["alice", "bob"],
                "items": 3,
                "meta": {"phase": 2, "note": ""},
            },
            "build": {"status": "open", "approved_at": "2026-11-08T09:00:00+02:00"},
        },
        "quality_gate": {"qg1": {"passed": True}, "qg2": {"passed": False}},
        "task": {
            "T-17": {"status": "completed", "count": 3, "reviewers": ["carol"]},
            "v1.2": {"status": "open"},
            "t1": {"status": "open", "next": "T-17"},
        },
    }
)


def run(text: str, facts: DictFacts = FACTS, now: datetime = NOW) -> Evaluation:
    return compile_condition(text).evaluate(facts, now)


def compiled(text: str) -> CompiledCondition:
    condition = compile_condition(text)
    assert isinstance(condition, CompiledCondition)
    return condition


def problems(text: str) -> list[ExpressionProblem]:
    with pytest.raises(ExpressionError) as info:
        compile_condition(text)
    return info.value.problems


# --------------------------------------------------------------------------------------
# Compiling and reads


def test_compiled_condition_shape() -> None:
    text = 'milestone.design.status == "approved" and days_since(milestone.design.approved_at) > 1'
    condition: Condition = compile_condition(text)
    assert isinstance(condition, CompiledCondition)
    assert condition.text == text
    assert condition.reads == frozenset({FactRef("milestone", "design")})
    assert condition.uses_time is True
    assert condition.clause_texts == (
        'milestone.design.status == "approved"',
        "days_since(milestone.design.approved_at) > 1",
    )


def test_compiled_condition_is_immutable() -> None:
    condition = compile_condition("task.t1.status")
    with pytest.raises(AttributeError):
        condition.text = "true"
    assert repr(condition) == "CompiledCondition('task.t1.status')"
    assert copy.copy(condition) is condition
    assert copy.deepcopy(condition) is condition
    clone = pickle.loads(pickle.dumps(condition))
    assert clone.text == condition.text
    assert clone.evaluate(FACTS, NOW) == condition.evaluate(FACTS, NOW)


@pytest.mark.parametrize(
    ("text", "reads"),
    [
        ("milestone.design.status", {("milestone", "design")}),
        ('milestone["design"]["status"]', {("milestone", "design")}),
        ('task["T-17"].status == "completed"', {("task", "T-17")}),
        ('task["v1.2"].status', {("task", "v1.2")}),
        ("len(task) > 2", {("task", None)}),
        ('"T-17" in task', {("task", None)}),
        ("task[milestone.design.items]", {("task", None), ("milestone", "design")}),
        ("task[task.t1.next].status", {("task", None), ("task", "t1")}),
        (
            "quality_gate.qg1.passed and quality_gate.qg2.passed",
            {("quality_gate", n) for n in ("qg1", "qg2")},
        ),
        ("milestone.design.meta.phase + 1 > 2", {("milestone", "design")}),
        ("true and not false and null == None", set()),
        ("abs(-3) == 3", set()),
        ("max(task.t1.count, 3) if x.y else min([1, 2])", {("task", "t1"), ("x", "y")}),
    ],
)
def test_reads(text: str, reads: set[tuple[str, str | None]]) -> None:
    assert compile_condition(text).reads == {FactRef(kind, id) for kind, id in reads}


@pytest.mark.parametrize(
    ("text", "uses_time"),
    [
        ("days_since(a.b.c) > 1", True),
        ("hours_since(a.b.c) > 1", True),
        ("minutes_since(a.b.c) > 1", True),
        ('now() > "2026"', True),
        ("len(a.b.c) > 1", False),
        ("a.b.now", False),
    ],
)
def test_uses_time(text: str, uses_time: bool) -> None:
    assert compile_condition(text).uses_time is uses_time


def test_multiline_text_from_yaml_block_scalars() -> None:
    text = (
        'milestone.design.status == "approved"\n'
        "  and quality_gate.qg1.passed\r\n"
        "  and days_since(milestone.design.approved_at) >= 7  # a week\n"
    )
    evaluation = run(text)
    assert evaluation.value is True
    assert [c.text for c in evaluation.clauses] == [
        'milestone.design.status == "approved"',
        "quality_gate.qg1.passed",
        "days_since(milestone.design.approved_at) >= 7",
    ]


def test_leading_whitespace_and_parentheses_are_fine() -> None:
    assert run("   (milestone.design.items == 3)\n").value is True
    assert run('(\n  task["T-17"].count\n  == 3\n)').value is True


def test_a_constant_condition_is_allowed() -> None:
    assert run("true").value is True
    assert run("false").value is False
    assert run("null").value is False
    assert run("1").value is True


# --------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('milestone.design.status == "approved"', True),
        ('milestone.design.status != "approved"', False),
        ('milestone["design"]["status"] == "approved"', True),
        ('task["T-17"].status == "completed"', True),
        ('task["v1.2"].status == "open"', True),
        ("quality_gate.qg1.passed and not quality_gate.qg2.passed", True),
        ("quality_gate.qg1.passed and quality_gate.qg2.passed", False),
        ("quality_gate.qg2.passed or quality_gate.qg1.passed", True),
        ("len(task) == 3", True),
        ('"T-17" in task', True),
        ('"T-99" not in task', True),
        ('"approved_at" in milestone.design', True),
        ('"alice" in milestone.design.reviewers', True),
        ("milestone.design.reviewers[0] == 'alice'", True),
        ("milestone.design.reviewers[-1] == 'bob'", True),
        ("len(milestone.design.reviewers) >= 2", True),
        ("1 <= milestone.design.meta.phase < 3", True),
        ("1 <= milestone.design.meta.phase < 2", False),
        ("milestone.design.items * 2 + 1 == 7", True),
        ("milestone.design.items / 2 == 1.5", True),
        ("milestone.design.items // 2 == 1 and milestone.design.items % 2 == 1", True),
        ("milestone.design.items ** 2 == 9 and 2 ** -1 == 0.5", True),
        ("-milestone.design.items == -3 and +1 == 1", True),
        ("max(1, milestone.design.items) == 3 and min([4, 5]) == 4", True),
        ("abs(-2.5) == 2.5 and round(2.567, 2) == 2.57 and round(2.5) == 2", True),
        ("task[task.t1.next].status == 'completed'", True),
        ("('yes' if milestone.design.items > 2 else 'no') == 'yes'", True),
        ("{'a': 1}['a'] == 1 and [1, 2][1] == 2 and (1, 2) == (1, 2)", True),
        ("'ab' + 'cd' == 'abcd' and [1] + [2] == [1, 2] and 'ab' * 2 == 'abab'", True),
        ("milestone.design.status == 'approved' and true and null == None", True),
        ("True and not False and None == null", True),
    ],
)
def test_typical_gates(text: str, value: bool) -> None:
    evaluation = run(text)
    assert evaluation.error is None
    assert evaluation.missing == ()
    assert evaluation.value is value


@pytest.mark.parametrize(
    ("text", "value", "raw"),
    [
        ("milestone.design.status", True, "approved"),
        ("milestone.design.meta.note", False, ""),
        ("len(task)", True, 3),
        ("milestone.design.items - 3", False, 0),
        ("milestone.design.reviewers", True, ["alice", "bob"]),
        ("null", False, None),
        ("(1, 2)", True, [1, 2]),
    ],
)
def test_non_bool_results_use_truthiness_and_show_the_raw_value(
    text: str, value: bool, raw: Any
) -> None:
    evaluation = run(text)
    assert evaluation.value is value
    assert evaluation.clauses == (Clause(text=text, value=raw),)


def test_evaluation_does_not_mutate_or_depend_on_call_order() -> None:
    condition = compile_condition("task.t1.status == 'open' and len(task) == 3")
    first = condition.evaluate(FACTS, NOW)
    second = condition.evaluate(FACTS, NOW)
    assert first == second
    assert first.value is True


def test_non_mapping_fact_data_is_accepted() -> None:
    class ProxyFacts:
        def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
            from types import MappingProxyType

            return MappingProxyType({"status": "ok"}) if id == "a" else None

        def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
            return {}

    evaluation = compile_condition("x.a.status == 'ok'").evaluate(ProxyFacts(), NOW)
    assert evaluation.value is True
    assert evaluation.seen == {"x.a": {"status": "ok"}}
    assert type(evaluation.seen["x.a"]) is dict


# --------------------------------------------------------------------------------------
# Missing facts and fields


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        ("milestone.nope.status == 'approved'", "milestone.nope"),
        ("milestone.design.approved_by == 'x'", "milestone.design.approved_by"),
        ('milestone["design"]["approved_by"]', "milestone.design.approved_by"),
        ('task["T-99"].status', 'task["T-99"]'),
        ('task["T-17"].owner', 'task["T-17"].owner'),
        ('task["T-17"].reviewers[5]', 'task["T-17"].reviewers[5]'),
        ("milestone.design.meta.x.y", "milestone.design.meta.x"),
        ('milestone.design.meta["a b"]', 'milestone.design.meta["a b"]'),
        ("nokind.x", "nokind.x"),
        ("task[milestone.design.status].status", "task.approved"),
        ("task[task.t1.status].x", "task.open"),
        ("task[task.t1.next].x", 'task["T-17"].x'),
        ("days_since(milestone.build.closed_at) > 1", "milestone.build.closed_at"),
        ("not milestone.nope.ok", "milestone.nope"),
    ],
)
def test_missing_fact_or_field_makes_the_condition_false(text: str, missing: str) -> None:
    evaluation = run(text)
    assert evaluation.value is False
    assert evaluation.error is None
    assert evaluation.missing == (missing,)
    assert evaluation.clauses[0].missing == (missing,)
    assert evaluation.clauses[0].value is None


def test_missing_reached_by_or_makes_the_whole_condition_false() -> None:
    evaluation = run("milestone.nope.ok or quality_gate.qg1.passed")
    assert evaluation.value is False
    assert evaluation.missing == ("milestone.nope",)
    assert [c.value for c in evaluation.clauses] == [None, True]


def test_missing_not_reached_by_short_circuit_does_not_matter() -> None:
    evaluation = run("quality_gate.qg1.passed or milestone.nope.ok")
    assert evaluation.value is True
    assert evaluation.missing == ()
    assert evaluation.clauses[1].missing == ("milestone.nope",)

    evaluation = run("quality_gate.qg2.passed and milestone.nope.ok")
    assert evaluation.value is False
    assert evaluation.missing == ()
    assert evaluation.clauses[1].missing == ("milestone.nope",)

    assert run("milestone.nope.ok if false else true").value is True


def test_every_missing_name_is_listed_when_missing_decides() -> None:
    evaluation = run("milestone.nope.ok and task.nope.ok and milestone.design.zzz")
    assert evaluation.value is False
    assert evaluation.missing == ("milestone.nope", "task.nope", "milestone.design.zzz")


def test_existence_tests_do_not_count_as_missing() -> None:
    evaluation = run('"T-99" in task or "zzz" in milestone.design')
    assert evaluation.value is False
    assert evaluation.missing == ()


def test_empty_kind_is_an_empty_object_not_missing() -> None:
    evaluation = run("len(nokind) == 0")
    assert evaluation.value is True
    assert evaluation.seen == {"nokind": {}}


# --------------------------------------------------------------------------------------
# Run-time errors


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("task['T-17'].count < 'a'", "TypeError"),
        ("milestone.design.status + 1", "TypeError"),
        ("milestone.design.items / 0", "ZeroDivisionError"),
        ("len(milestone.design.items)", "TypeError"),
        ("milestone.design.status.x", "cannot look up .x in a string"),
        ("milestone.design.status[0]", "cannot look up [0] in a string"),
        ("milestone.design.reviewers['a']", "array indexes are integers"),
        ("milestone.design.reviewers[true]", "array indexes are integers"),
        ("milestone.design.meta[1]", "object keys are strings"),
        ("task[milestone.design.items]", "a fact id must be a string, not number"),
        ("min([])", "ValueError"),
        ("'a' * (milestone.design.items * 10**9)", "the limit is 10000"),
        ("[milestone.design.items] * 10**9", "the limit is 10000"),
        ("10**9 * (milestone.design.items, 2)", "the limit is 10000"),
        ("milestone.design.status * 5001", "the limit is 10000"),
        ("(milestone.design.status * 1000) + ('y' * 6000)", "the limit is 10000"),
        ("((milestone.design.items * 2**64)**64)**64 > 0", "exceed 10000 bits"),
        (
            "(milestone.design.items * 2**64)**64 * (2**64)**64 * (2**64)**64 > 0",
            "exceed 10000 bits",
        ),
        ("'%s' % 1", "formatting of strings"),
        ("'%999999999d' % 1", "formatting of strings"),
        ("(-8) ** 0.5", "not a real number"),
        ("1e300 ** 64 > 0", "OverflowError"),
        ("round(1.5, 1000)", "ndigits must be between"),
        ("round(1.5, 'a')", "ndigits must be an integer"),
        ("{[1]: 2}", "TypeError"),
        ("days_since('2026-11-01T09:00:00') > 1", "has no zone offset"),
        ("days_since('yesterday') > 1", "ValueError"),
        ("days_since(milestone.design.items) > 1", "expected an RFC 3339 timestamp string"),
    ],
)
def test_runtime_errors_make_the_condition_false(text: str, error: str) -> None:
    evaluation = run(text)
    assert evaluation.value is False
    assert evaluation.missing == ()
    assert evaluation.error is not None
    assert error in evaluation.error
    assert any(clause.error for clause in evaluation.clauses)


def test_runtime_error_names_the_failing_part() -> None:
    evaluation = run("quality_gate.qg1.passed and task['T-17'].count < 'a'")
    assert evaluation.error is not None
    assert evaluation.error.endswith("(in `task['T-17'].count < 'a'`)")
    assert evaluation.clauses[0] == Clause(text="quality_gate.qg1.passed", value=True)
    assert evaluation.clauses[1].error == evaluation.error


def test_error_in_a_branch_not_taken_does_not_matter() -> None:
    evaluation = run("quality_gate.qg1.passed or 1 / 0")
    assert evaluation.value is True
    assert evaluation.error is None
    assert evaluation.clauses[1].error is not None


def test_a_failing_fact_lookup_is_an_error_not_an_exception() -> None:
    class Broken:
        def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
            raise OSError("database is gone")

        def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
            raise OSError("database is gone")

    evaluation = compile_condition("a.b.c and len(a) > 0").evaluate(Broken(), NOW)
    assert evaluation.value is False
    assert evaluation.error is not None
    assert "database is gone" in evaluation.error


def test_values_within_bounds_are_fine() -> None:
    assert run("len('a' * 10000) == 10000").value is True
    assert run("len([0] * 100 + [1] * 100) == 200").value is True
    assert run("2 ** 64 == 18446744073709551616").value is True
    assert run("7 % 3 == 1 and 7.5 % 2 == 1.5").value is True


def test_clause_values_are_json_ready() -> None:
    evaluation = run("1e308 * 10 and (1, [2, (3,)]) and {'a': (1,)} and 2 ** 64")
    assert [c.value for c in evaluation.clauses] == [
        "inf",
        [1, [2, [3]]],
        {"a": [1]},
        18446744073709551616,
    ]


# --------------------------------------------------------------------------------------
# Time functions


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("days_since(milestone.design.approved_at)", 8.0),
        ("hours_since(milestone.design.approved_at)", 192.0),
        ("minutes_since(milestone.design.approved_at)", 11520.0),
        # +02:00: 07:00 UTC on the 8th, 26 hours before NOW
        ("hours_since(milestone.build.approved_at)", 26.0),
        ("hours_since('2026-11-09T04:00:00-05:00')", 0.0),
        ("hours_since('2026-11-09t09:30:00z')", -0.5),
        ("days_since('2026-11-10T09:00:00Z')", -1.0),
    ],
)
def test_time_functions(text: str, value: Any) -> None:
    evaluation = run(text)
    assert evaluation.error is None
    assert evaluation.clauses[0].value == value


def test_now_is_the_evaluation_time_as_rfc3339_utc() -> None:
    evaluation = run("now()", now=datetime(2026, 11, 9, 11, 0, tzinfo=timezone(timedelta(hours=2))))
    assert evaluation.clauses[0].value == format_rfc3339(NOW)
    assert parse_rfc3339(evaluation.clauses[0].value) == NOW


def test_time_functions_follow_the_given_now() -> None:
    condition = compile_condition("days_since(milestone.design.approved_at) >= 7")
    assert condition.evaluate(FACTS, datetime(2026, 11, 8, 8, 59, tzinfo=UTC)).value is False
    assert condition.evaluate(FACTS, datetime(2026, 11, 8, 9, 0, tzinfo=UTC)).value is True
    plus_two = datetime(2026, 11, 8, 11, 0, tzinfo=timezone(timedelta(hours=2)))
    assert condition.evaluate(FACTS, plus_two).value is True


def test_naive_now_is_taken_as_utc() -> None:
    evaluation = run("hours_since('2026-11-09T08:00:00Z')", now=datetime(2026, 11, 9, 9, 0))
    assert evaluation.clauses[0].value == 1.0


def test_timestamp_without_zone_is_an_error() -> None:
    evaluation = run("days_since('2026-11-01T09:00:00') >= 7")
    assert evaluation.value is False
    assert evaluation.error is not None
    assert "no zone offset" in evaluation.error


# --------------------------------------------------------------------------------------
# Clauses


def test_clauses_flatten_nested_and_or() -> None:
    text = "a.x.p and (b.y.q or (c.z.r and d.w.s)) and not (e.v.t or f.u.o)"
    assert compiled(text).clause_texts == (
        "a.x.p",
        "b.y.q",
        "c.z.r",
        "d.w.s",
        "not (e.v.t or f.u.o)",
    )


def test_single_clause_when_not_a_boolop() -> None:
    evaluation = run("len(task) == 3")
    assert evaluation.clauses == (Clause(text="len(task) == 3", value=True),)


def test_every_clause_is_evaluated_and_value_follows_short_circuit() -> None:
    evaluation = run(
        "quality_gate.qg2.passed and (task.t1.status == 'open' or 1 / 0) and milestone.zz.q"
    )
    assert evaluation.value is False
    assert evaluation.missing == ()
    assert evaluation.error is None
    assert [c.value for c in evaluation.clauses] == [False, True, None, None]
    assert evaluation.clauses[2].error is not None
    assert evaluation.clauses[3].missing == ("milestone.zz",)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0 or 2", True),
        ("2 and 0", False),
        ("1 and 2 and 3", True),
        ("0 or 0 or ''", False),
        ("(0 or 1) and (1 and 0)", False),
        ("(0 or 1) and (1 and 2)", True),
        ("0 and 1 / 0", False),
        ("1 or 1 / 0", True),
    ],
)
def test_combined_value_matches_python(text: str, value: bool) -> None:
    assert run(text).value is value


def test_clause_text_is_normalised_source() -> None:
    text = "  task.t1.status  ==  'open'\n      and\n  len(\n    task\n  ) > 1\n"
    assert compiled(text).clause_texts == ("task.t1.status  ==  'open'", "len( task ) > 1")


def test_seen_records_every_fact_read() -> None:
    evaluation = run(
        "milestone.design.items > 1 and milestone.nope.x or len(quality_gate) > 0 "
        "or task[task.t1.next].status"
    )
    assert evaluation.seen == {
        "milestone.design": FACTS.facts["milestone"]["design"],
        "milestone.nope": None,
        "quality_gate": FACTS.facts["quality_gate"],
        "task.t1": FACTS.facts["task"]["t1"],
        "task.T-17": FACTS.facts["task"]["T-17"],
    }


def test_facts_are_looked_up_once_per_evaluation() -> None:
    facts = DictFacts(FACTS.facts)
    compile_condition(
        "milestone.design.items > 1 and milestone.design.status and len(task) > 0 and task.t1"
    ).evaluate(facts, NOW)
    assert sorted(facts.calls, key=str) == [("milestone", "design"), ("task", None)]


# --------------------------------------------------------------------------------------
# Static rejections


@pytest.mark.parametrize(
    ("text", "message", "offset", "fragment"),
    [
        ("open('x')", "unknown function 'open'; available: days_since,", 0, "open"),
        ("a.b and getattr(task, 'x')", "unknown function 'getattr'", 8, "getattr"),
        ("x.lower()", "method calls are not allowed ('.lower(...)')", 0, "x.lower()"),
        ("task.get('a')", "method calls are not allowed", 0, "task.get('a')"),
        ("a.b[0](1)", "only these functions can be called", 0, "a.b[0](1)"),
        ("len", "function 'len' must be called", 0, "len"),
        ("now > 1", "function 'now' must be called", 0, "now"),
        ("len(x=1)", "keyword arguments are not allowed", 4, "x=1"),
        ("len(*x)", "unpacking with '*' is not allowed", 4, "*x"),
        ("len(1, 2)", "len() takes 1 argument, 2 given", 0, "len(1, 2)"),
        ("now(1)", "now() takes 0 arguments, 1 given", 0, "now(1)"),
        ("min()", "min() takes at least 1 argument, 0 given", 0, "min()"),
        ("round()", "round() takes 1 to 2 arguments, 0 given", 0, "round()"),
        ("days_since()", "days_since() takes 1 argument", 0, "days_since()"),
        ("a.__class__", "names starting with '_' are not allowed: '__class__'", 2, "__class__"),
        ("a.b._c", "names starting with '_' are not allowed: '_c'", 4, "_c"),
        ("a.b['_c']", "keys starting with '_' are not allowed: '_c'", 4, "'_c'"),
        ("task['_x']", "keys starting with '_' are not allowed", 5, "'_x'"),
        ("_x", "names starting with '_' are not allowed: '_x'", 0, "_x"),
        ("Task.x", "'Task' is not a fact kind", 0, "Task"),
        ("a.b == café", "'café' is not a fact kind", 7, "café"),
        ("task[0]", 'fact ids are strings: write task["0"]', 5, "0"),
        ("lambda: 1", "lambda functions are not allowed", 0, "lambda: 1"),
        ("[x for x in y]", "comprehensions are not allowed", 0, "[x for x in y]"),
        ("{x: 1 for x in y}", "comprehensions are not allowed", 0, "{x: 1 for x in y}"),
        ("len(x for x in y)", "generator expressions are not allowed", 3, "(x for x in y)"),
        ('f"{x}" == "1"', "f-strings are not allowed", 0, 'f"{x}"'),
        ("(y := 1)", "assignment expressions (':=') are not allowed", 1, "y := 1"),
        ("[*a.b.c]", "unpacking with '*' is not allowed", 1, "*a.b.c"),
        ("{**a.b}", "unpacking with '**' is not allowed", 3, "a.b"),
        ("{1, 2}", "set literals are not supported", 0, "{1, 2}"),
        ("a.b.c[1:2]", "slices are not supported", 6, "1:2"),
        ("a.b.c is None", "'is' / 'is not' are not allowed", 0, "a.b.c is None"),
        ("a.b.c is not None", "'is' / 'is not' are not allowed", 0, "a.b.c is not None"),
        ("a.b.c << 2", "operator '<<' is not allowed", 0, "a.b.c << 2"),
        ("a.b.c & 1", "operator '&' is not allowed", 0, "a.b.c & 1"),
        ("~a.b.c", "operator '~' is not allowed", 0, "~a.b.c"),
        ("a.b.c @ 1", "operator '@' is not allowed", 0, "a.b.c @ 1"),
        ("b'x'", "bytes literals are not allowed", 0, "b'x'"),
        ("1j", "complex numbers are not allowed", 0, "1j"),
        ("...", "'...' is not allowed", 0, "..."),
        ("2 ** a.b.c", "exponent of '**' must be a number literal", 5, "a.b.c"),
        ("2 ** 65", "exponent of '**' must be a number literal between -64 and 64", 5, "65"),
        ("2 ** -65", "exponent of '**'", 5, "-65"),
        ("2 ** True", "exponent of '**'", 5, "True"),
        ("9**9**9", "exponent of '**'", 3, "9**9"),
        ("a) or (b", "unmatched ')'", 1, ")"),
        ("a.b] or [c", "unmatched ']'", 3, "]"),
        ("a.b or c)", "unmatched ')'", 8, ")"),
        ("a, b", "a top-level ',' makes a tuple", 0, "a, b"),
        ("", "expression is empty", 0, ""),
        ("  \n ", "expression is empty", 0, "  \n "),
        ("# only a comment", "expression is empty", 0, "# only a comment"),
        ("a.b ==", "syntax error: expression ends too early", 6, ""),
        (
            "a.b = 1",
            "syntax error: cannot assign to attribute here. Maybe you meant '=='",
            0,
            "a.b",
        ),
        ("a.b === 1", "syntax error", 6, "="),
        ("import os", "syntax error", 0, "import"),
        ("a\0", "syntax error", 1, "\0"),
        ("\ud800", "invalid text", 0, ""),
    ],
)
def test_static_rejections(text: str, message: str, offset: int, fragment: str) -> None:
    found = problems(text)
    assert len(found) == 1, found
    problem = found[0]
    assert message in problem.message
    assert (problem.offset, problem.fragment) == (offset, fragment)
    assert text[offset : offset + len(fragment)] == fragment


def test_unknown_function_message_lists_the_functions() -> None:
    [problem] = problems("foo(1)")
    assert problem.message == (
        "unknown function 'foo'; available: days_since, hours_since, minutes_since, now, "
        "len, min, max, abs, round"
    )


def test_every_problem_is_listed_in_order() -> None:
    text = "open(1) and a.__b\n  and Foo.c and x.y()\n  and 2 ** q.r.s and (lambda: 1)"
    found = problems(text)
    assert [(p.offset, p.fragment) for p in found] == [
        (0, "open"),
        (14, "__b"),
        (24, "Foo"),
        (34, "x.y()"),
        (51, "q.r.s"),
        (62, "lambda: 1"),
    ]
    assert all(text.index(p.fragment) == p.offset for p in found)
    with pytest.raises(ExpressionError) as info:
        compile_condition(text)
    assert str(info.value) == "; ".join(p.message for p in found)


def test_offsets_are_characters_not_bytes() -> None:
    text = "'éèà' == a.b and\n  'ü' == c.__d"
    [problem] = problems(text)
    assert problem.fragment == "__d"
    assert problem.offset == text.index("__d")


def test_offsets_with_crlf_line_ends() -> None:
    text = "a.b == 1\r\n  and c._d"
    [problem] = problems(text)
    assert problem.offset == text.index("_d")
    assert problem.fragment == "_d"


def test_syntax_error_offsets_are_characters() -> None:
    text = "'é' == a.b c"
    [problem] = problems(text)
    assert problem.message.startswith("syntax error")
    assert text[problem.offset : problem.offset + len(problem.fragment)] == problem.fragment


def test_expression_length_limit() -> None:
    ok = "a.b == '" + "x" * (MAX_EXPRESSION_CHARS - 10) + "'"
    assert len(ok) < MAX_EXPRESSION_CHARS
    found = problems(ok)  # the string literal is still over 1,000 characters
    assert found[0].message.startswith("string literal is")

    too_long = "a.b and " * 600
    [problem] = problems(too_long)
    assert problem.message == f"expression is {len(too_long)} characters long; the limit is 4096"
    assert problem.offset == MAX_EXPRESSION_CHARS


def test_string_literal_limit() -> None:
    assert run("len('" + "x" * 1000 + "') == 1000").value is True
    [problem] = problems("a.b == '" + "x" * 1001 + "'")
    assert problem.message == "string literal is 1001 characters long; the limit is 1000"
    assert problem.offset == 7


def test_depth_limit() -> None:
    assert run("[" * 31 + "1" + "]" * 31).value is True
    [problem] = problems("[" * 33 + "]" * 33)
    assert problem.message == "expression is nested more than 32 levels deep"
    assert problem.offset == 32


def test_node_limit() -> None:
    assert run("[" + ", ".join(["1"] * 399) + "]").value is True
    [problem] = problems("[" + ", ".join(["1"] * 400) + "]")
    assert problem.message == "expression is too large: more than 400 AST nodes"
    assert problem.offset == 0


def test_exponent_limit() -> None:
    assert run("2 ** 64 > 0 and 2 ** -64 > 0 and 2.0 ** 0.5 > 1").value is True


def test_non_string_text_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_condition(True)  # type: ignore[arg-type]
    assert info.value.problems[0].message == "expression must be a string, not boolean"


def test_reserved_names() -> None:
    # true/false/null are literals and the function names are not kinds
    assert compile_condition("true and false == null").reads == frozenset()
    [problem] = problems("round.x")
    assert problem.message.startswith("function 'round' must be called")


# --------------------------------------------------------------------------------------
# Sandbox escapes: rejected statically, or False with an error / missing name at run time

ESCAPES = [
    "().__class__.__bases__[0].__subclasses__()",
    "().__class__",
    "x.__globals__",
    "milestone.design.__dict__",
    "milestone['design']['__class__']",
    '"{0.__class__}".format(1)',
    "'{}'.format(milestone.design)",
    'f"{x}"',
    'f"{x.__class__}"',
    '__import__("os")',
    '__import__("os").system("true")',
    'open("/etc/passwd")',
    'eval("1")',
    'exec("1")',
    'compile("1", "", "eval")',
    "getattr(task, 'x')",
    "globals()",
    "type(1)",
    "9**9**9",
    "10**100000",
    '"a"*10**9',
    "[1]*10**9",
    "2 ** 64 ** 64",
    "(" * 200 + "1" + ")" * 200,
    "[" * 200 + "]" * 200,
    "-" * 4000 + "1",
    "not " * 1000 + "1",
    "[x for x in range(10**9)]",
    "(x for x in task)",
    "lambda: 1",
    "(y:=1)",
    "milestone.design.items",
    "milestone.design.keys()",
    "milestone.design.values",
    "task.get('a')",
    "task.keys",
    "_x",
    "__builtins__",
    "a.b._private",
    "a.b['__class__']",
    "len.__self__",
    "now.__globals__",
    "[].append(1)",
    "'a'.join(['b'])",
    "'%s%s' % (1, 2)",
    "(1).__class__",
    "{}.__class__.__subclasses__",
    "task[milestone.design.__class__]",
    "max.__call__(1)",
    "x if y else __import__('os')",
    "a.b.c[::-1]",
    "*a",
    "await x",
    "(yield)",
]


ESCAPE_FACTS = DictFacts(
    {"milestone": {"design": {"status": "approved"}}, "task": {"a": {"status": "open"}}}
)


@pytest.mark.parametrize("text", ESCAPES)
def test_sandbox_escape_corpus(text: str) -> None:
    try:
        condition = compile_condition(text)
    except ExpressionError as error:
        assert error.problems
        return
    evaluation = condition.evaluate(ESCAPE_FACTS, NOW)
    assert evaluation.value is False
    assert evaluation.error is not None or evaluation.missing, evaluation


def test_dot_access_is_key_lookup_never_getattr() -> None:
    facts = DictFacts({"m": {"d": {"items": "the field", "keys": [1, 2], "get": {"x": 1}}}})
    evaluation = run("m.d.items == 'the field' and m.d.keys[1] == 2 and m.d.get.x == 1", facts)
    assert evaluation.value is True
    evaluation = run("m.d.values", facts)
    assert evaluation.missing == ("m.d.values",)
    assert evaluation.value is False


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("milestone.design.status.upper", "cannot look up .upper in a string"),
        ("milestone.design.items.real", "cannot look up .real in a number"),
        ("milestone.design.reviewers.append", "array indexes are integers, not string"),
        ("now().split", "cannot look up .split in a string"),
    ],
)
def test_methods_of_values_are_unreachable(text: str, error: str) -> None:
    evaluation = run(text)
    assert evaluation.value is False
    assert evaluation.error is not None
    assert error in evaluation.error


# --------------------------------------------------------------------------------------
# Properties

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def check_never_raises_unexpectedly(text: str) -> None:
    try:
        condition = compile_condition(text)
    except ExpressionError as error:
        assert error.problems
        for problem in error.problems:
            assert 0 <= problem.offset <= len(text)
            end = problem.offset + len(problem.fragment)
            assert text[problem.offset : end] == problem.fragment
        return
    evaluation = condition.evaluate(FACTS, NOW)
    assert isinstance(evaluation.value, bool)
    assert isinstance(condition, CompiledCondition)
    assert len(evaluation.clauses) == len(condition.clause_texts)
    if evaluation.value:
        assert evaluation.error is None and evaluation.missing == ()


@PROPERTY_SETTINGS
@given(st.text(max_size=80))
def test_arbitrary_text_never_raises_anything_but_expression_error(text: str) -> None:
    check_never_raises_unexpectedly(text)


@PROPERTY_SETTINGS
@given(
    st.lists(
        st.sampled_from(
            [
                "milestone",
                ".",
                "design",
                "status",
                "task",
                "[",
                "]",
                "(",
                ")",
                "'T-17'",
                " and ",
                " or ",
                " not ",
                "==",
                "<",
                " in ",
                "+",
                "*",
                "**",
                "-",
                "/",
                "%",
                "1",
                "0",
                "64",
                "1e308",
                "true",
                "null",
                "len",
                "days_since",
                "now",
                "min",
                "'2026-11-01T09:00:00Z'",
                ",",
                "__class__",
                "_x",
                "items",
                "reviewers",
                "\n",
                " if ",
                " else ",
                "{",
                "}",
                ":",
                "lambda",
                "'a'",
                "9",
            ]
        ),
        max_size=25,
    )
)
def test_arbitrary_token_soup_never_raises(tokens: list[str]) -> None:
    check_never_raises_unexpectedly("".join(tokens))


def ast_names() -> st.SearchStrategy[ast.expr]:
    names = ["milestone", "task", "quality_gate", "nokind", "true", "null", "len", "now"]
    names += ["_x", "Foo", "x"]
    return st.sampled_from(names).map(lambda name: ast.Name(id=name))


def ast_constants() -> st.SearchStrategy[ast.expr]:
    values = st.one_of(
        st.integers(min_value=-(10**20), max_value=10**20),
        st.floats(),
        st.text(max_size=6),
        st.booleans(),
        st.none(),
        st.sampled_from(["design", "T-17", "status", "2026-11-01T09:00:00+01:00", "items"]),
    )
    return values.map(lambda value: ast.Constant(value=value))


def ast_extend(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    attrs = st.sampled_from(["design", "status", "items", "count", "__class__", "reviewers"])
    binops = st.sampled_from(
        [ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift]
    )
    unops = st.sampled_from([ast.Not, ast.USub, ast.UAdd, ast.Invert])
    cmpops = st.sampled_from([ast.Eq, ast.NotEq, ast.Lt, ast.GtE, ast.In, ast.NotIn, ast.Is])
    funcs = st.sampled_from([*FUNCTIONS, "open", "getattr"])
    no_args = ast.arguments(
        posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], defaults=[]
    )
    small = st.lists(children, max_size=3)
    return st.one_of(
        st.builds(lambda v, a: ast.Attribute(value=v, attr=a), children, attrs),
        st.builds(lambda v, k: ast.Subscript(value=v, slice=k), children, children),
        st.builds(lambda o, a, b: ast.BinOp(left=a, op=o(), right=b), binops, children, children),
        st.builds(lambda o, a: ast.UnaryOp(op=o(), operand=a), unops, children),
        st.builds(
            lambda o, vs: ast.BoolOp(op=o(), values=vs),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(children, min_size=2, max_size=3),
        ),
        st.builds(
            lambda o, a, b: ast.Compare(left=a, ops=[o()], comparators=[b]),
            cmpops,
            children,
            children,
        ),
        st.builds(
            lambda t, b, e: ast.IfExp(test=t, body=b, orelse=e), children, children, children
        ),
        st.builds(lambda f, a: ast.Call(func=ast.Name(id=f), args=a, keywords=[]), funcs, small),
        st.builds(
            lambda v, a: ast.Call(func=ast.Attribute(value=v, attr="keys"), args=a, keywords=[]),
            children,
            small,
        ),
        small.map(lambda items: ast.List(elts=items)),
        small.map(lambda items: ast.Tuple(elts=items)),
        st.builds(lambda k, v: ast.Dict(keys=[k], values=[v]), children, children),
        children.map(lambda body: ast.Lambda(args=no_args, body=body)),
        children.map(lambda v: ast.JoinedStr(values=[ast.FormattedValue(value=v, conversion=-1)])),
        children.map(lambda v: ast.Subscript(value=v, slice=ast.Slice())),
        children.map(lambda v: ast.Starred(value=v)),
    )


def fact_reads() -> st.SearchStrategy[ast.expr]:
    """``kind.id`` / ``kind["id"]`` and a few steps into the data, mostly of existing facts."""
    kinds = st.sampled_from(["milestone", "task", "quality_gate", "nokind"])
    ids = st.sampled_from(["design", "build", "T-17", "t1", "qg1", "nope"])
    keys = st.lists(
        st.one_of(
            st.sampled_from(["status", "items", "reviewers", "meta", "phase", "approved_at"]),
            st.integers(min_value=-3, max_value=3),
        ),
        max_size=3,
    )

    def build(kind: str, fact_id: str, path: list[str | int]) -> ast.expr:
        node: ast.expr = ast.Subscript(value=ast.Name(id=kind), slice=ast.Constant(fact_id))
        for key in path:
            node = ast.Subscript(value=node, slice=ast.Constant(key))
        return node

    return st.builds(build, kinds, ids, keys)


def valid_extend(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    """Only constructs the language allows, so that evaluation gets exercised."""
    binops = st.sampled_from([ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod])
    cmpops = st.sampled_from([ast.Eq, ast.NotEq, ast.Lt, ast.GtE, ast.In, ast.NotIn])
    unary = st.sampled_from([ast.Not, ast.USub, ast.UAdd])
    exponent = st.integers(min_value=-64, max_value=64).map(lambda n: ast.Constant(n))
    one_arg = st.sampled_from(["days_since", "hours_since", "len", "abs", "round", "min", "max"])
    return st.one_of(
        st.builds(lambda o, a, b: ast.BinOp(left=a, op=o(), right=b), binops, children, children),
        st.builds(lambda a, e: ast.BinOp(left=a, op=ast.Pow(), right=e), children, exponent),
        st.builds(lambda o, a: ast.UnaryOp(op=o(), operand=a), unary, children),
        st.builds(
            lambda o, vs: ast.BoolOp(op=o(), values=vs),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(children, min_size=2, max_size=3),
        ),
        st.builds(
            lambda o, a, b: ast.Compare(left=a, ops=[o()], comparators=[b]),
            cmpops,
            children,
            children,
        ),
        st.builds(
            lambda t, b, e: ast.IfExp(test=t, body=b, orelse=e), children, children, children
        ),
        st.builds(
            lambda f, a: ast.Call(func=ast.Name(id=f), args=[a], keywords=[]), one_arg, children
        ),
        st.builds(
            lambda a, b: ast.Call(func=ast.Name(id="max"), args=[a, b], keywords=[]),
            children,
            children,
        ),
        st.just(ast.Call(func=ast.Name(id="now"), args=[], keywords=[])),
        st.builds(lambda v, k: ast.Subscript(value=v, slice=k), children, children),
        st.lists(children, max_size=3).map(lambda items: ast.List(elts=items)),
        st.builds(lambda k, v: ast.Dict(keys=[k], values=[v]), children, children),
    )


@PROPERTY_SETTINGS
@given(
    st.recursive(
        st.one_of(
            fact_reads(),
            ast_constants(),
            st.sampled_from(["task", "true", "null"]).map(lambda name: ast.Name(id=name)),
        ),
        valid_extend,
        max_leaves=10,
    )
)
def test_arbitrary_valid_asts_evaluate_without_raising(tree: ast.expr) -> None:
    text = ast.unparse(ast.fix_missing_locations(tree))
    check_never_raises_unexpectedly(text)


@PROPERTY_SETTINGS
@given(st.recursive(st.one_of(ast_names(), ast_constants()), ast_extend, max_leaves=12))
def test_arbitrary_small_asts_never_raise(tree: ast.expr) -> None:
    try:
        text = ast.unparse(ast.fix_missing_locations(tree))
    except Exception:  # pragma: no cover - a node the unparser cannot render
        return
    check_never_raises_unexpectedly(text)


_BRACKETY = st.lists(
    st.sampled_from(["a", "a.b", "1", " or ", " + ", "(", ")", "[", "]", "{", "}", '")"', "#)\n"]),
    max_size=12,
).map("".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_BRACKETY)
def test_the_bracket_shortcut_never_hides_an_unmatched_closer(text: str) -> None:
    """The cheap square-bracket parse may only say "no early closer" when tokenizing the
    text agrees, on any text the parenthesised parse accepts."""
    from gatekeeper.expr.language import _brackets_hold, _Source, _unmatched_closer

    source = _Source(text)
    try:
        ast.parse(source.parsed, mode="eval")
    except (SyntaxError, ValueError):
        return
    if _brackets_hold(source):
        assert _unmatched_closer(source) is None
