"""The compiled ``when`` evaluator against its reference, the simpleeval ``_Evaluator``.

``CompiledCondition.evaluate`` runs each condition as one generated Python function;
``_evaluate_reference`` runs the same checked, lowered tree with simpleeval. Whatever the
expression and the facts, both must give the very same ``Evaluation`` (value, clauses,
missing names, error text, facts seen) and read the facts alike.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import pickle
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatekeeper.expr.compiler as expressions
from gatekeeper.expr import (
    Clause,
    CompiledCondition,
    Evaluation,
    ExpressionError,
    Item,
    compile_condition,
)
from gatekeeper.expr.compiler import _evaluate_reference
from tests.test_expressions import ESCAPE_FACTS, ESCAPES, FACTS, DictFacts

NOW = datetime(2026, 11, 9, 9, 0, tzinfo=UTC)

DIFFERENTIAL = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def compiled(text: str, item_kind: str | None = None) -> CompiledCondition:
    condition = compile_condition(text, item_kind=item_kind)
    assert isinstance(condition, CompiledCondition)
    assert condition._run is not None, f"not compiled: {text!r}"
    return condition


def same(left: Evaluation, right: Evaluation) -> None:
    """Equal, and equal in type too (``True == 1``, ``1.0 == 1``, ``-0.0 == 0.0``)."""
    assert left == right
    assert repr(left) == repr(right)


def both(
    text: str,
    facts: Mapping[str, Mapping[str, Mapping[str, Any]]],
    now: datetime = NOW,
    item: Item | None = None,
) -> Evaluation | None:
    """Evaluate ``text`` with the compiled form and with the reference over fresh fact
    lookups; check that they agree (and read the same facts in the same order); return
    the evaluation, or None when ``text`` does not compile. With an ``item``, the text is
    compiled for its kind and evaluated for it."""
    try:
        condition = compiled(text, None if item is None else item.kind)
    except ExpressionError:
        return None
    fast_facts, reference_facts = DictFacts(facts), DictFacts(facts)
    fast = condition.evaluate(fast_facts, now, item)
    reference = _evaluate_reference(condition, reference_facts, now, item)
    same(fast, reference)
    assert fast_facts.calls == reference_facts.calls
    return fast


# --------------------------------------------------------------------------------------
# A grammar of the language, and fact tables to run it on

KINDS = ["milestone", "task", "qg"]
IDS = ["design", "T-1", "a.b", "x", "nope"]
FIELDS = ["status", "n", "at", "list", "obj", "a-b", "items", "nope"]
TIMESTAMPS = [
    "2026-11-01T09:00:00Z",
    "2026-11-09T08:30:00+01:00",
    "2026-11-10T09:00:00.250-05:00",
    "2026-11-01T09:00:00",
    "yesterday",
]
NOWS = [
    NOW,
    datetime(2026, 11, 9, 9, 0),  # naive: taken as UTC
    datetime(2026, 11, 16, 11, 0, 0, 500, tzinfo=timezone(timedelta(hours=2))),
]


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-3, max_value=3),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([0.5, -0.0, 2.5, 1e308]),
        st.sampled_from(TIMESTAMPS + FIELDS + IDS + ["", "approved"]),
        st.text(max_size=4),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.sampled_from(FIELDS), children, max_size=3),
        ),
        max_leaves=6,
    )


def fact_tables() -> st.SearchStrategy[dict[str, dict[str, dict[str, Any]]]]:
    data = st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=5)
    by_id = st.dictionaries(st.sampled_from(IDS[:-1]), data, max_size=4)
    return st.dictionaries(st.sampled_from(KINDS), by_id, max_size=3)


def constants() -> st.SearchStrategy[ast.expr]:
    values = st.one_of(
        st.integers(min_value=-3, max_value=10),
        st.integers(min_value=0, max_value=2**90),
        st.floats(min_value=0, allow_nan=False),  # 1e309 and beyond: inf
        st.sampled_from([0.5, 2.5, 1e308, 1e309, 3.0]),
        st.text(max_size=5),
        st.sampled_from(TIMESTAMPS + FIELDS + IDS),
    )
    literal_names = st.sampled_from(["true", "false", "null", "True", "False", "None"])
    return st.one_of(
        values.map(lambda value: ast.Constant(value=value)),
        literal_names.map(lambda name: ast.Name(id=name)),
    )


def fact_reads() -> st.SearchStrategy[ast.expr]:
    """``kind.id`` / ``kind["T-1"]``, or a whole kind."""

    def read(kind: str, fact_id: str) -> ast.expr:
        if fact_id.isidentifier():
            return ast.Attribute(value=ast.Name(id=kind), attr=fact_id)
        return ast.Subscript(value=ast.Name(id=kind), slice=ast.Constant(fact_id))

    kinds = st.sampled_from(KINDS)
    return st.one_of(
        st.builds(read, kinds, st.sampled_from(IDS)),
        kinds.map(lambda kind: ast.Name(id=kind)),
    )


KNOWN_PATHS = [
    "milestone.design.status",
    "milestone.design.n",
    "milestone.design.at",
    "milestone.design.list",
    "milestone.design.list[1]",
    "milestone.design.list[-1].n",
    "milestone.design.obj['a-b']",
    "milestone.design.obj.n",
    "milestone.x",
    "task['T-1'].n",
    "task['T-1'].at",
    "qg.x.status",
    "qg.x.n",
    "qg['a.b'].obj",
]
"""Fields of ``GATE_FACTS`` (and of some generated tables), so that many reads succeed."""


def known_paths() -> st.SearchStrategy[ast.expr]:
    return st.sampled_from(KNOWN_PATHS).map(lambda text: ast.parse(text, mode="eval").body)


def leaves() -> st.SearchStrategy[ast.expr]:
    return st.one_of(constants(), fact_reads(), known_paths(), known_paths())


def extend(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    field = st.sampled_from([f for f in FIELDS if f.isidentifier()])
    key = st.one_of(
        st.sampled_from(FIELDS).map(lambda k: ast.Constant(k)),
        st.integers(min_value=0, max_value=3).map(lambda i: ast.Constant(i)),
        st.integers(min_value=1, max_value=3).map(
            lambda i: ast.UnaryOp(op=ast.USub(), operand=ast.Constant(i))
        ),
        children,
    )
    arithmetic = st.sampled_from([ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod])
    exponent = st.one_of(
        st.integers(min_value=-64, max_value=64).map(lambda n: ast.Constant(n)),
        st.sampled_from([0.5, 2.0, -1.5]).map(lambda x: ast.Constant(x)),
        st.integers(min_value=1, max_value=64).map(
            lambda n: ast.UnaryOp(op=ast.USub(), operand=ast.Constant(n))
        ),
    )
    comparisons = st.sampled_from(
        [ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn]
    )
    unary = st.sampled_from([ast.Not, ast.USub, ast.UAdd])
    one_argument = st.sampled_from(
        ["days_since", "hours_since", "minutes_since", "len", "abs", "round"]
    )
    some = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        st.builds(lambda v, f: ast.Attribute(value=v, attr=f), children, field),
        st.builds(lambda v, k: ast.Subscript(value=v, slice=k), children, key),
        st.builds(
            lambda kind, k: ast.Subscript(value=ast.Name(id=kind), slice=k),
            st.sampled_from(KINDS),
            children,
        ),
        st.builds(
            lambda o, a, b: ast.BinOp(left=a, op=o(), right=b), arithmetic, children, children
        ),
        st.builds(lambda a, e: ast.BinOp(left=a, op=ast.Pow(), right=e), children, exponent),
        st.builds(lambda o, a: ast.UnaryOp(op=o(), operand=a), unary, children),
        st.builds(
            lambda o, values: ast.BoolOp(op=o(), values=values),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(children, min_size=2, max_size=3),
        ),
        st.builds(
            lambda first, rest: ast.Compare(
                left=first, ops=[o() for o, _ in rest], comparators=[c for _, c in rest]
            ),
            children,
            st.lists(st.tuples(comparisons, children), min_size=1, max_size=3),
        ),
        st.builds(
            lambda t, b, e: ast.IfExp(test=t, body=b, orelse=e), children, children, children
        ),
        st.builds(
            lambda f, a: ast.Call(func=ast.Name(id=f), args=[a], keywords=[]),
            one_argument,
            children,
        ),
        st.builds(
            lambda a, n: ast.Call(func=ast.Name(id="round"), args=[a, n], keywords=[]),
            children,
            children,
        ),
        st.builds(
            lambda f, args: ast.Call(func=ast.Name(id=f), args=args, keywords=[]),
            st.sampled_from(["min", "max"]),
            some,
        ),
        st.just(ast.Call(func=ast.Name(id="now"), args=[], keywords=[])),
        st.lists(children, max_size=3).map(lambda items: ast.List(elts=items)),
        st.lists(children, max_size=3).map(lambda items: ast.Tuple(elts=items)),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda pairs: ast.Dict(keys=[k for k, _ in pairs], values=[v for _, v in pairs])
        ),
    )


def conditions(trees: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    """A tree, or (most often) a top-level and/or tree of them: several clauses."""
    return st.recursive(
        trees,
        lambda children: st.builds(
            lambda o, values: ast.BoolOp(op=o(), values=values),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(children, min_size=2, max_size=3),
        ),
        max_leaves=4,
    )


def expressions_text() -> st.SearchStrategy[str]:
    trees = st.recursive(leaves(), extend, max_leaves=8)
    return conditions(trees).map(lambda tree: ast.unparse(ast.fix_missing_locations(tree)))


NUMERIC_PATHS = ["milestone.design.n", "milestone.design.items", "qg.x.n", "task['T-1'].n"]


def numeric_leaves() -> st.SearchStrategy[ast.expr]:
    numbers = st.one_of(
        st.integers(min_value=-3, max_value=10),
        st.integers(min_value=0, max_value=2**70),
        st.sampled_from([0.5, 2.5, 0.1, 1e308, 3.0]),
        st.booleans(),
    )
    return st.one_of(
        numbers.map(lambda value: ast.Constant(value=value)),
        st.sampled_from(NUMERIC_PATHS).map(lambda text: ast.parse(text, mode="eval").body),
    )


def numeric_extend(children: st.SearchStrategy[ast.expr]) -> st.SearchStrategy[ast.expr]:
    """Numbers and truth values, so that operations mostly succeed: the compiled form then
    decides alone, with no help from the reference."""
    arithmetic = st.sampled_from([ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod])
    comparisons = st.sampled_from(
        [ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn]
    )
    membership = st.sampled_from([ast.In, ast.NotIn])
    exponent = st.integers(min_value=-4, max_value=4).map(lambda n: ast.Constant(n))
    return st.one_of(
        st.builds(
            lambda o, a, b: ast.BinOp(left=a, op=o(), right=b), arithmetic, children, children
        ),
        st.builds(lambda a, e: ast.BinOp(left=a, op=ast.Pow(), right=e), children, exponent),
        st.builds(
            lambda o, a: ast.UnaryOp(op=o(), operand=a),
            st.sampled_from([ast.Not, ast.USub, ast.UAdd]),
            children,
        ),
        st.builds(
            lambda first, rest: ast.Compare(
                left=first, ops=[o() for o, _ in rest], comparators=[c for _, c in rest]
            ),
            children,
            st.lists(
                st.tuples(comparisons.filter(lambda o: o not in (ast.In, ast.NotIn)), children),
                min_size=1,
                max_size=3,
            ),
        ),
        st.builds(
            lambda a, o, items: ast.Compare(left=a, ops=[o()], comparators=[ast.List(elts=items)]),
            children,
            membership,
            st.lists(children, max_size=3),
        ),
        st.builds(
            lambda o, values: ast.BoolOp(op=o(), values=values),
            st.sampled_from([ast.And, ast.Or]),
            st.lists(children, min_size=2, max_size=3),
        ),
        st.builds(
            lambda t, b, e: ast.IfExp(test=t, body=b, orelse=e), children, children, children
        ),
        st.builds(
            lambda f, a: ast.Call(func=ast.Name(id=f), args=[a], keywords=[]),
            st.sampled_from(["abs", "round"]),
            children,
        ),
        st.builds(
            lambda a, n: ast.Call(
                func=ast.Name(id="round"), args=[a, ast.Constant(n)], keywords=[]
            ),
            children,
            st.integers(min_value=-3, max_value=3),
        ),
        st.builds(
            lambda f, args: ast.Call(func=ast.Name(id=f), args=args, keywords=[]),
            st.sampled_from(["min", "max"]),
            st.lists(children, min_size=1, max_size=3),
        ),
    )


def numeric_text() -> st.SearchStrategy[str]:
    trees = st.recursive(numeric_leaves(), numeric_extend, max_leaves=8)
    return conditions(trees).map(lambda tree: ast.unparse(ast.fix_missing_locations(tree)))


# --------------------------------------------------------------------------------------
# Differential tests


@DIFFERENTIAL
@given(expressions_text(), fact_tables(), st.sampled_from(NOWS))
def test_compiled_equals_reference_on_generated_expressions(
    text: str, facts: dict[str, dict[str, dict[str, Any]]], now: datetime
) -> None:
    both(text, facts, now)


GATE_FACTS = {
    "milestone": {
        "design": {
            "status": "approved",
            "at": "2026-11-01T09:00:00Z",
            "list": [1, 2.5, "x", None, True, {"n": 1}],
            "obj": {"a-b": 1, "n": -0.0, "list": [], "obj": {}},
            "n": 3,
            "items": 0,
        },
        "x": {},
    },
    "task": {"T-1": {"status": "open", "n": 2**65, "at": "2026-11-09T08:30:00+01:00"}},
    "qg": {"x": {"status": True, "n": 0.5}, "a.b": {"obj": None}},
}


@DIFFERENTIAL
@given(expressions_text())
def test_compiled_equals_reference_on_a_fixed_fact_table(text: str) -> None:
    both(text, GATE_FACTS)


@DIFFERENTIAL
@given(numeric_text())
def test_compiled_equals_reference_on_arithmetic_and_logic(text: str) -> None:
    both(text, GATE_FACTS)


ITEM_PATHS = [
    "item",
    "item.id",
    "item.kind",
    "item.data",
    "item.data.status",
    "item.data.n",
    "item.data.at",
    "item.data.list",
    "item.data.list[0]",
    "item.data['a-b']",
    "item.data.obj.n",
    "item.data.nope",
    "item['data']['status']",
    "task[item.id]",
    "task[item.id].status",
]


def item_leaves() -> st.SearchStrategy[ast.expr]:
    paths = st.sampled_from(ITEM_PATHS).map(lambda text: ast.parse(text, mode="eval").body)
    return st.one_of(constants(), fact_reads(), known_paths(), paths, paths)


def item_text() -> st.SearchStrategy[str]:
    trees = st.recursive(item_leaves(), extend, max_leaves=8)
    return conditions(trees).map(lambda tree: ast.unparse(ast.fix_missing_locations(tree)))


def items() -> st.SearchStrategy[Item | None]:
    data = st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=5)
    return st.one_of(
        st.none(),
        st.builds(Item, st.sampled_from(KINDS), st.sampled_from(IDS[:-1]), data),
    )


@DIFFERENTIAL
@given(item_text(), fact_tables(), items(), st.sampled_from(NOWS))
def test_compiled_equals_reference_on_item_expressions(
    text: str, facts: dict[str, dict[str, dict[str, Any]]], item: Item | None, now: datetime
) -> None:
    if item is None:  # compiled for an item kind, evaluated without an item
        try:
            condition = compiled(text, "task")
        except ExpressionError:
            return
        fast = condition.evaluate(DictFacts(facts), now)
        same(fast, _evaluate_reference(condition, DictFacts(facts), now))
        return
    both(text, facts, now, item)


ITEM = Item("task", "T-1", dict(GATE_FACTS["milestone"]["design"]))


@DIFFERENTIAL
@given(item_text())
def test_compiled_equals_reference_on_item_expressions_over_a_fixed_item(text: str) -> None:
    both(text, GATE_FACTS, NOW, ITEM)


@pytest.mark.parametrize(
    "text",
    [
        # truthiness, short-circuit, chained comparisons, and/or values
        "1 < milestone.design.n < 2",
        "0 < milestone.design.n <= 3 != 4",
        "1 < milestone.nope.n < 2",
        "milestone.design.n < 2 < milestone.nope.n",
        "milestone.design.list and milestone.design.obj.list or milestone.design.items",
        "(milestone.design.items or milestone.design.obj.obj) == {}",
        "milestone.design.nope if milestone.design.items else milestone.design.n",
        "(milestone.design.n if milestone.design.items else milestone.design.nope) == 3",
        "not milestone.design.items and not milestone.x",
        # True == 1, int/float mixing, -True, bool results of in
        "True == 1 and 1.0 == 1 and -True == -1 and +True",
        "-True",
        "[True == 1, 1 == 1.0, 2 ** 0.5, 7 // 2.0, -7 // 2, -7 % 3, 7.5 % -2]",
        "milestone.design.list[4] + 1",
        "('x' in milestone.design.list) + 1",
        "'status' in milestone.design and 'nope' not in milestone.design",
        "1 in [True] and 0.0 in [False] and [1] == [True]",
        # comparisons between lists and tuples, dict literals with duplicate keys
        "[1, 2] == (1, 2)",
        "[1, 2] < (1, 2)",
        "(1, 2) < (1, 3) and [1] < [1, 0]",
        "{'a': 1, 'a': 2}",
        "{1: 'a', True: 'b', 1.0: 'c'}",
        "{[1]: 2, milestone.nope.n: 3}",
        "{milestone.nope.n: 3, [1]: 2}",
        "{'a': milestone.design.n, 'b': [milestone.design.list[0]]}['b']",
        # round half to even, len of a kind, min/max
        "[round(0.5), round(1.5), round(2.5), round(-0.5), round(2.675, 2), round(25, -1)]",
        "round(2.5) == 2 and round(3.5) == 4",
        "len(task) == 1 and len(milestone) == 2 and len(nokind) == 0",
        "min(task) == 'T-1' and max(milestone) == 'x' and 'T-1' in task",
        "max(milestone.design.list)",
        "min([2, 1.0, True]) == 1",
        "min(milestone.design.list[0], milestone.design.list[1]) == 1",
        # bounds raise, division by zero, missing
        "'ab' * 5001",
        "task['T-1'].n * task['T-1'].n",
        "task['T-1'].n ** 64",
        "(2 ** 64) ** 64 > 0",
        "'%s' % 1",
        "milestone.design.n / 0",
        "milestone.design.n // 0 or true",
        "milestone.design.n % 0.0",
        "milestone.nope.n / 0",
        "milestone.design.n / milestone.design.items",
        "milestone.design.list[6]",
        "milestone.design.list[-7]",
        "milestone.design.list[-6].n",
        "milestone.design.list[1.0]",
        "milestone.design.list[true]",
        "milestone.design.obj['a-b'] == 1 and milestone.design.obj.nope",
        'milestone.design.obj["a-b"].x',
        "milestone.design.obj[1]",
        "milestone.design.status.x",
        "task[milestone.design.status]",
        "task[milestone.design.n]",
        "task['T-' + '1'].n > 0 and task['T-' + '2'].n",
        "task[task['T-1'].status].x",
        "qg['a.b'].obj.x",
        "qg['a.b'].nope",
        "[milestone.design][0].status.x",
        "(milestone.design.list + [1])[9]",
        "[milestone.design.list, 1][0][7]",
        "{'k': milestone.design}['k'].nope",
        "milestone[milestone.design.status].x",
        # time
        "days_since(milestone.design.at) >= 7 and hours_since(task['T-1'].at) < 1",
        "minutes_since(task['T-1'].at) == 30",
        "days_since(milestone.design.n)",
        "days_since('2026-11-01T09:00:00')",
        "days_since('yesterday') or true",
        "days_since([1])",
        "days_since({})",
        "now() > '2026' and now()",
        "abs(days_since('2026-11-10T09:00:00Z'))",
        # errors inside nested operands: the innermost failing node is named
        "[1, 2, milestone.design.status + 1]",
        "len(milestone.design.n) > 1 and qg.x.status",
        "qg.x.status and len(milestone.design.n) > 1",
        "qg.x.nope or (1 < 'a')",
        "(1 < 'a') or qg.x.nope",
        "abs('a')",
        "round(1.5, 'a')",
        "round(1.5, 1000)",
        "min([])",
        "1e308 * 10 and (1, [2, (3,)]) and {'a': (1,)} and 2 ** 64",
        "1e309 - 1e309",
        "-(2 ** 64) + 1",
        "'é' * 3 + '\\x00'",
    ],
)
def test_compiled_equals_reference_on_edge_cases(text: str) -> None:
    both(text, GATE_FACTS)


@pytest.mark.parametrize("now", NOWS)
def test_compiled_equals_reference_on_the_gate(now: datetime) -> None:
    gate = (
        'milestone.design.status == "approved" and qg.x.status'
        " and days_since(milestone.design.at) >= 7 and len(milestone.design.list) >= 1"
    )
    evaluation = both(gate, GATE_FACTS, now)
    assert evaluation is not None
    assert evaluation.value is True  # every one of NOWS is at least 7 days after "at"
    early = both(gate, GATE_FACTS, datetime(2026, 11, 8, 8, 59, 59, 999999, tzinfo=UTC))
    assert early is not None
    assert early.value is False


def test_typical_gates_do_not_use_the_reference() -> None:
    """Values and missing facts/fields come from the compiled form alone."""

    class NoReference:
        def __init__(self, *args: Any) -> None:
            raise AssertionError("the reference evaluator was used")

    texts = [
        'milestone.design.status == "approved" and len(milestone.design.reviewers) >= 2',
        "days_since(milestone.design.approved_at) >= 7 or milestone.nope.x",
        "task[task.t1.next].status == 'completed' and '2026' < now()",
        "milestone.design.meta.x.y",
        "task['T-17'].reviewers[5]",
        "{'a': [1, (2,)], 'b': 2 ** 10 % 7}['a'][1][0] + -1 // 2 == 0",
        "not quality_gate.qg2.passed and 1 <= milestone.design.meta.phase < 3",
    ]
    conditions = [compiled(text) for text in texts]
    expected = [_evaluate_reference(c, FACTS, NOW) for c in conditions]
    saved = expressions._Evaluator
    expressions._Evaluator = NoReference  # type: ignore[misc]
    try:
        for condition, reference in zip(conditions, expected, strict=True):
            same(condition.evaluate(FACTS, NOW), reference)
    finally:
        expressions._Evaluator = saved  # type: ignore[misc]


def test_failing_clauses_get_the_reference_message() -> None:
    evaluation = both("qg.x.status and task['T-1'].n < 'a' and milestone.design.nope", GATE_FACTS)
    assert evaluation is not None
    assert evaluation.error == (
        "TypeError: '<' not supported between instances of 'number' and 'string'"
        " (in `task['T-1'].n < 'a'`)"
    )
    assert evaluation.clauses[2].missing == ("milestone.design.nope",)


def test_a_failing_fact_lookup_is_read_again_by_the_reference() -> None:
    class Broken:
        def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
            raise OSError("database is gone")

        def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
            raise OSError("database is gone")

    condition = compiled("a.b.c and len(a) > 0")
    same(condition.evaluate(Broken(), NOW), _evaluate_reference(condition, Broken(), NOW))


# --------------------------------------------------------------------------------------
# The sandbox


@pytest.mark.parametrize("text", ESCAPES)
def test_sandbox_escape_corpus_on_both_paths(text: str) -> None:
    try:
        condition = compiled(text)
    except ExpressionError as error:
        assert error.problems  # refused before either evaluator runs
        return
    fast = condition.evaluate(ESCAPE_FACTS, NOW)
    same(fast, _evaluate_reference(condition, ESCAPE_FACTS, NOW))
    assert fast.value is False
    assert fast.error is not None or fast.missing


@pytest.mark.parametrize(
    "text",
    [
        "'a' * (milestone.design.n * 10**9)",
        "[milestone.design.n] * 10**9",
        "10**9 * (milestone.design.n, 2)",
        "(milestone.design.status * 1000) + ('y' * 6000)",
        "((milestone.design.n * 2**64)**64)**64 > 0",
        "(milestone.design.n * 2**64)**64 * (2**64)**64 * (2**64)**64 > 0",
        "'%999999999d' % 1",
        "(-8) ** 0.5",
        "1e300 ** 64 > 0",
        "round(1.5, 1000)",
        "milestone.design.list * 10 ** 9",
    ],
)
def test_bounds_hold_on_both_paths(text: str) -> None:
    evaluation = both(text, GATE_FACTS)
    assert evaluation is not None
    assert evaluation.value is False
    assert evaluation.error is not None


def test_compiled_code_cannot_reach_builtins() -> None:
    condition = compiled(
        "len(task) > 0 and max(1, 2) and days_since(a.b.c) > round(1.5) and {1: [2]}[1][0]"
    )
    run = condition._run
    assert run is not None
    namespace = run.__globals__
    assert namespace["__builtins__"] == {}
    assert namespace is not expressions.__dict__
    # Every global name the code loads is in its namespace; the only attributes it takes
    # are the ``get`` of its fact cache and of the (dict) data of a fact.
    names = set(run.__code__.co_names)
    assert names - set(namespace) == {"get"}
    assert set(run.__code__.co_varnames) >= {"_fd", "_kd", "_facts", "_now"}
    for name in names & set(namespace):
        assert name.startswith("_"), name
    assert not any(name in namespace for name in ("getattr", "__import__", "eval", "open"))
    # The values taken from the text are passed in a tuple, never in the code.
    values = list(condition._values)  # type: ignore[attr-defined]
    assert "a.b" in values and "c" in values and "task" in values
    assert not {"a.b", "c", "task"} & set(run.__code__.co_consts)


def test_conditions_of_one_shape_share_their_code() -> None:
    first = compiled("milestone.design.status == 'approved' and days_since(x.y.at) >= 7")
    second = compiled("task['T-1'].n == 3 and days_since(qg.x.status) >= 1.5")
    assert first._run is not None and second._run is not None
    assert first._run.__code__ is second._run.__code__
    evaluation = both("milestone.design.status == 'approved' and qg.x.n == 0.5", GATE_FACTS)
    assert evaluation is not None and evaluation.value is True
    evaluation = both("milestone.design.status == 'open' and qg.x.n == 0.5", GATE_FACTS)
    assert evaluation is not None and evaluation.value is False


def test_clause_texts_are_read_from_the_condition_text() -> None:
    text = "milestone.design.status == 'approved' and\n  qg.x.n >= 1"
    fresh = compile_condition(text)  # not evaluated yet: its texts come from the text
    assert fresh.clause_texts == ("milestone.design.status == 'approved'", "qg.x.n >= 1")
    assert compiled(text).clause_texts == fresh.clause_texts
    first = compiled("milestone.design.status == 'approved' and qg.x.n >= 1")
    second = compiled("milestone.design.status == 'approved' and qg.x.n >= 2")
    assert first.clause_texts[0] == second.clause_texts[0]
    values = first._values  # type: ignore[attr-defined]
    assert values[:5] == (first.text, 0, 37, 42, 53)  # offsets, no string of its own
    assert compiled(text)._values[1:5] == (0, 37, 44, 55)  # type: ignore[attr-defined]
    split = compiled("qg.x.n >= 1 and milestone.design.status ==\n  'approved'")
    values = split._values  # type: ignore[attr-defined]
    assert values[1:5] == (0, 11, "milestone.design.status == 'approved'", None)
    assert split.clause_texts == ("qg.x.n >= 1", "milestone.design.status == 'approved'")
    assert [c.text for c in split.evaluate(DictFacts(GATE_FACTS), NOW).clauses] == list(
        split.clause_texts
    )
    assert first.clause_texts[1] != second.clause_texts[1]
    one = first.evaluate(DictFacts(GATE_FACTS), NOW)
    other = second.evaluate(DictFacts(GATE_FACTS), NOW)
    assert one.clauses[0] == Clause("milestone.design.status == 'approved'", True)
    assert one.clauses is one.clauses  # made once, when first read
    assert [c.text for c in one.clauses] == list(first.clause_texts)
    assert [c.text for c in other.clauses] == list(second.clause_texts)
    assert both("milestone.design.status == 'approved' and qg.x.n >= 2", GATE_FACTS) == other


def test_generated_source_holds_only_literals_from_the_text() -> None:
    """Kind names, ids, keys and strings reach the generated source as literals only."""
    text = (
        "task['\\'); __import__(\"os\") #'].x == '\\n\\\")' and "
        "m.d['x\\' + y'] == 1e309 and m.d[0] == -1"
    )
    condition = compiled(text)
    facts = {
        "task": {'\'); __import__("os") #': {"x": '\n")'}},
        "m": {"d": {"x' + y": math.inf}},
    }
    evaluation = both(text, facts)
    assert evaluation is not None
    assert evaluation.clauses[0].value is True
    assert evaluation.clauses[1].value is True
    assert evaluation.error is not None  # m.d[0]: object keys are strings
    assert condition._run is not None


def test_data_is_never_reached_through_getattr() -> None:
    """Fact data that is a dict subclass with poisoned attributes: ``.items``, ``.get``
    and ``.values`` are fields, looked up as keys by both paths; no attribute of the
    data is taken (the copy of a fact's data asks for ``keys``, and isinstance for
    ``__class__``: Python's own protocols, not names from the expression)."""
    touched: list[str] = []

    class Poisoned(dict[str, Any]):
        def __getattribute__(self, name: str) -> Any:
            touched.append(name)
            if name in ("items", "get", "values", "x", "status"):
                raise AssertionError(f"attribute {name!r} of fact data was read")
            return super().__getattribute__(name)

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"attribute {name!r} of fact data was read")

    class PoisonedFacts:
        def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
            if id != "d":
                return None
            nested = Poisoned({"x": 2, "status": "deep"})
            return Poisoned({"items": 1, "get": {"x": 2}, "values": [1, 2], "nested": nested})

        def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
            return {"d": self.get(kind, "d") or {}}

    text = (
        "m.d.items == 1 and m.d.get.x == 2 and m.d.values[1] == 2 and m['d'].get['x'] == 2"
        " and m.d.nested.x == 2 and m.d.nested.status == 'deep' and len(m) == 1"
        " and 'x' in m.d.nested"
    )
    condition = compiled(text)
    fast = condition.evaluate(PoisonedFacts(), NOW)
    assert fast.value is True, fast
    same(fast, _evaluate_reference(condition, PoisonedFacts(), NOW))
    assert set(touched) <= {"keys", "__class__"}, touched
    missing = condition.evaluate(PoisonedFacts(), NOW)
    assert missing.value is True


def test_a_fact_read_several_times_keeps_its_names_once_and_literals_stay_apart() -> None:
    text = 'task["T-3"].status == "T-3" and task["T-3"].n >= 1 and task["T-3"].m >= 1'
    condition = compiled(text)
    assert condition._run is not None
    values = list(condition._values)  # type: ignore[attr-defined]
    constants = values[1 + 2 * 3 + 1 :]  # after the text, the clauses and a constant
    # the fact's name, kind, id and its prefix once each; the literals each time
    assert constants.count("task.T-3") == 1
    assert constants.count("task") == 1
    assert constants.count("T-3") == 2  # the fact's id, and the literal "T-3"
    assert constants.count(1) == 2
    evaluation = both(text, {"task": {"T-3": {"status": "T-3", "n": 1, "m": 0}}})
    assert evaluation is not None and evaluation.value is False
    assert [c.value for c in evaluation.clauses] == [True, True, False]
    other = compiled('task["T-3"].status == "x" and task["T-3"].n >= 2 and task["T-3"].m >= 3')
    assert other._run is not None
    assert other._run.__code__ is condition._run.__code__


def test_a_compiled_condition_keeps_no_clause_objects() -> None:
    condition = compiled("milestone.design.status == 'approved' and qg.x.n >= 1")
    condition.evaluate(DictFacts(GATE_FACTS), NOW)
    assert not any(isinstance(value, Clause) for value in condition._values)
    evaluation = condition.evaluate(DictFacts(GATE_FACTS), NOW)
    assert evaluation._texts is condition._values  # the clause values, beside the texts
    values = evaluation._clauses
    assert values == (True, False)  # qg.x.n is 0.5
    built = Evaluation(
        evaluation.value,
        tuple(Clause(t, v) for t, v in zip(condition.clause_texts, values, strict=True)),
        seen=dict(evaluation.seen),
    )
    assert evaluation == built and built == evaluation
    assert repr(evaluation) == repr(built)
    assert evaluation.clauses == built.clauses
    with pytest.raises(dataclasses.FrozenInstanceError):
        evaluation.value = True  # type: ignore[misc]
    with pytest.raises(TypeError):  # its seen is a dict, as a frozen dataclass's would be
        hash(evaluation)
    assert pickle.loads(pickle.dumps(evaluation)) == evaluation
