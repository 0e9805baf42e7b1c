"""Collections: ``any``/``all``/``count``/``sum``/``min``/``max`` of ``E for t in KIND if C``."""

from __future__ import annotations

import ast
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.expr import (
    CollectionSeen,
    ExpressionError,
    FactRef,
    Item,
    compile_condition,
    next_change_at,
)
from tests.test_expressions import DictFacts
from tests.test_expressions_compiled import (
    DIFFERENTIAL,
    FIELDS,
    IDS,
    KINDS,
    both,
    constants,
    extend,
    json_values,
)

NOW = datetime(2026, 11, 9, 9, 0, tzinfo=UTC)

FACTS: dict[str, dict[str, dict[str, Any]]] = {
    "task": {
        "T-1": {"status": "done", "milestone": "structure", "hours": 2},
        "T-2": {"status": "open", "milestone": "structure", "hours": 1.5},
        "T-3": {"status": "done", "milestone": "roof"},
        "T-4": {"status": "done", "milestone": "structure", "hours": 0.1},
        "T-5": {"milestone": "structure", "hours": 0.2},
    },
    "milestone": {"structure": {"budget": 10}, "roof": {}, "empty": {}},
    "policy": {"min": {"done": 2}},
}
STRUCTURE = Item("milestone", "structure", FACTS["milestone"]["structure"])


def run(text: str, item: Item | None = None, facts: Any = None) -> Any:
    evaluation = both(text, FACTS if facts is None else facts, NOW, item)
    assert evaluation is not None, f"does not compile: {text}"
    return evaluation


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('count(t for t in task if t.data.status == "done") == 3', True),
        ('count(t.data.status == "done" for t in task) == 3', True),
        ("count(t for t in task) == 5 and count(m for m in milestone) == 3", True),
        ('any(t.data.status == "open" for t in task)', True),
        ('any(t.data.status == "late" for t in task)', False),
        ('all(t.data.status == "done" for t in task if t.data.milestone == "roof")', True),
        ('all(t.data.status == "done" for t in task if t.data.milestone == "structure")', False),
        ('all(t.data.status == "done" for t in task if t.data.milestone == "none")', False),
        ("sum(t.data.hours for t in task if t.data.milestone == item.id) == 3.8", True),
        ("sum(t.data.hours for t in task if t.data.milestone == 'none') == 0", True),
        ("min(t.data.hours for t in task if 'hours' in t.data) == 0.1", True),
        ("max(t.data.hours for t in task if 'hours' in t.data) == 2", True),
        ("max(t.id for t in task) == 'T-5' and min(t.id for t in task) == 'T-1'", True),
        ("min(3, 2) == 2 and max(1, 5, 2) == 5", True),
        (
            "count(t for t in task if t.data.milestone == item.id and t.data.status == 'done')"
            " >= policy.min.done",
            True,
        ),
        ("sum(1 for t in task if t.data.milestone == item.id) == 4", True),
        ("count(t for t in task if t.data.milestone == item.id if t.data.hours > 1) == 2", True),
    ],
)
def test_collection_values(text: str, value: bool) -> None:
    evaluation = run(text, STRUCTURE)
    assert evaluation.value is value, evaluation
    assert evaluation.error is None


def test_the_explanation_counts_and_names_what_was_false() -> None:
    text = 'all(t.data.status == "done" for t in task if t.data.milestone == item.id)'
    evaluation = run(text, STRUCTURE)
    assert evaluation.collections == (
        CollectionSeen(text, "all", "task", 4, 2, ("T-2", "T-5"), False),
    )
    # the facts gone over are not copied into seen: only the item is
    assert evaluation.seen == {"milestone.structure": {"budget": 10}}


def test_false_ids_are_sorted_and_at_most_twenty() -> None:
    facts = {"task": {f"T-{n:03d}": {"ok": n % 3 == 0} for n in range(100)}}
    evaluation = run("all(t.data.ok for t in task)", facts=facts)
    [seen] = evaluation.collections
    assert (seen.items, seen.true) == (100, 34)
    assert seen.false_ids == tuple(f"T-{n:03d}" for n in range(100) if n % 3)[:20]


def test_collections_are_listed_in_source_order() -> None:
    evaluation = run(
        "count(t for t in task) > 1 and any(m for m in milestone) or max(t.id for t in task)"
    )
    assert [c.function for c in evaluation.collections] == ["count", "any", "max"]


def test_missing_data_in_a_filter_or_a_truth_element_counts_as_false() -> None:
    evaluation = run(
        "count(t for t in task if t.data.hours > 1) == 2"
        " and count(t.data.status for t in task) == 4"
    )
    assert evaluation.value is True
    assert evaluation.missing == ()
    evaluation = run("any(milestone[t.data.milestone].budget > 5 for t in task)")
    assert evaluation.value is True
    assert evaluation.seen["milestone.structure"] == {"budget": 10}


def test_missing_data_in_an_aggregate_element_makes_it_missing() -> None:
    evaluation = run("sum(t.data.hours for t in task) > 0")
    assert evaluation.value is False
    assert evaluation.missing == ('task["T-3"].hours',)
    [seen] = evaluation.collections
    assert seen.value is None and seen.false_ids == ("T-3",)
    evaluation = run("max(t.data.status for t in task) == 'open'")
    assert evaluation.missing == ('task["T-5"].status',)


def test_min_and_max_over_nothing_are_missing() -> None:
    evaluation = run("min(t.data.hours for t in task if t.data.milestone == 'none') < 1")
    assert evaluation.value is False
    assert evaluation.missing == ("min(... for t in task)",)
    evaluation = run("max(x.data.n for x in nokind) > 0")
    assert evaluation.missing == ("max(... for x in nokind)",)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "sum(t.data.status for t in task if 'status' in t.data)",
            "sum() adds numbers, not string",
        ),
        ("sum(t.data for t in task)", "sum() adds numbers, not object"),
        ("min(t.data for t in task)", "min() compares numbers or strings, not object"),
        (
            "max(t.data.hours if t.id > 'T-3' else t.id for t in task if 'hours' in t.data)",
            "max() cannot compare numbers with strings",
        ),
        ("count(t.data.status + 1 for t in task)", "TypeError"),
        ("any(t for t in task if t.data.hours + 'x')", "TypeError"),
    ],
)
def test_run_time_errors_in_collections(text: str, error: str) -> None:
    evaluation = run(text)
    assert evaluation.value is False
    assert evaluation.error is not None and error in evaluation.error, evaluation.error
    assert evaluation.collections == ()


def test_sum_is_exact_whatever_the_order() -> None:
    facts = {
        "n": {
            "a": {"v": 0.1},
            "b": {"v": 0.2},
            "c": {"v": 0.3},
            "d": {"v": 10**20},
            "e": {"v": -(10**20)},
        }
    }
    evaluation = run("sum(x.data.v for x in n)", facts=facts)
    assert evaluation.clauses[0].value == math.fsum([0.1, 0.2, 0.3]) == 0.6
    evaluation = run(
        "sum(x.data.v for x in n if x.id < 'd')", facts={"n": {"a": {"v": True}, "b": {"v": 2}}}
    )
    assert evaluation.clauses[0].value == 3
    assert type(evaluation.clauses[0].value) is int
    big = {"n": {"a": {"v": 1e308}, "b": {"v": 1e308}}}
    assert run("sum(x.data.v for x in n)", facts=big).clauses[0].value == "inf"


def test_min_and_max_ties_give_the_first_by_id() -> None:
    facts = {"n": {"a": {"v": 1.0}, "b": {"v": 1}, "c": {"v": True}}}
    assert repr(run("[min(x.data.v for x in n)]", facts=facts).clauses[0].value) == "[1.0]"
    assert repr(run("[max(x.data.v for x in n)]", facts=facts).clauses[0].value) == "[1.0]"


def test_reads_and_flags() -> None:
    condition = compile_condition(
        "all(t.data.ok for t in task if milestone[t.data.m].open) and policy.x.y",
        item_kind="milestone",
    )
    assert condition.reads == frozenset(
        {FactRef("task", None), FactRef("milestone", None), FactRef("policy", "x")}
    )
    assert condition.uses_collections is True  # type: ignore[attr-defined]
    assert condition.uses_item is False
    assert compile_condition(
        "count(t for t in task if t.data.m == item.id)", item_kind="m"
    ).uses_item


def test_loop_variables_shadow_kinds_and_count_stays_a_kind_name() -> None:
    facts = {"task": {"a": {"task": 1}}, "count": {"x": {"n": 2}}}
    evaluation = run("all(task.data.task == 1 for task in task) and count.x.n == 2", facts=facts)
    assert evaluation.value is True
    assert compile_condition("count.x.n").reads == frozenset({FactRef("count", "x")})


def test_time_in_a_collection_is_rechecked_every_second() -> None:
    condition = compile_condition("all(days_since(t.data.at) > 3 for t in task)")
    facts = DictFacts({"task": {"a": {"at": "2026-11-01T00:00:00Z"}}})
    assert next_change_at(condition, facts, NOW) == NOW + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("text", "message", "fragment"),
    [
        (
            "[t for t in task]",
            "comprehensions are not allowed; a collection is any, all",
            "[t for t in task]",
        ),
        ("len(t for t in task)", "generator expressions are not allowed here", "(t for t in task)"),
        (
            "count(t for t in task for u in task)",
            "a collection has exactly one 'for'",
            "(t for t in task for u in task)",
        ),
        ("count(1 for (a, b) in task)", "the loop variable must be a plain name", "(a, b)"),
        ("count(1 for t in task.x)", "a collection goes over the facts of a kind", "task.x"),
        ("count(1 for t in [1, 2])", "a collection goes over the facts of a kind", "[1, 2]"),
        ("count(1 for len in task)", "'len' cannot name a loop variable", "len"),
        ("count(1 for _t in task)", "'_t' cannot name a loop variable", "_t"),
        (
            "any(any(u for u in task) for t in task)",
            "collections cannot be nested",
            "any(u for u in task)",
        ),
        ("count([1])", "count() takes one collection: count(E for x in KIND if C)", "count([1])"),
        ("all(task)", "all() takes one collection", "all(task)"),
        ("avg(t for t in task)", "unknown function 'avg'; a collection is any, all, count", "avg"),
        ("sum(t for t in task if t.data._x)", "names starting with '_' are not allowed", "_x"),
        ("count(t.lower() for t in task)", "method calls are not allowed", "t.lower()"),
    ],
)
def test_rejected_collection_forms(text: str, message: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as error:
        compile_condition(text)
    [problem] = error.value.problems
    assert message in problem.message, problem.message
    assert problem.fragment == fragment


def test_the_current_item_cannot_name_a_loop_variable() -> None:
    with pytest.raises(ExpressionError, match="'item' is the current item"):
        compile_condition("count(1 for item in task)", item_kind="milestone")
    with pytest.raises(ExpressionError, match="a collection goes over the facts of a kind"):
        compile_condition("count(1 for t in item)", item_kind="milestone")
    # in a plain rule, item is a kind and may name a loop variable
    assert compile_condition("count(1 for item in task) >= 0").reads == frozenset(
        {FactRef("task", None)}
    )


# --------------------------------------------------------------------------------------
# Both evaluators agree on generated collections


LOOP_PATHS = [
    "t",
    "t.id",
    "t.kind",
    "t.data",
    "t.data.status",
    "t.data.n",
    "t.data.list[0]",
    "t.data['a-b']",
    "t.data.obj.n",
    "t.data.nope",
    "item.id",
    "item.data.n",
    "task[t.id].n",
    "qg[t.id].status",
]


def loop_leaves() -> st.SearchStrategy[ast.expr]:
    paths = st.sampled_from(LOOP_PATHS).map(lambda text: ast.parse(text, mode="eval").body)
    return st.one_of(constants(), paths, paths)


def collections_text() -> st.SearchStrategy[str]:
    inner = st.recursive(loop_leaves(), extend, max_leaves=4)

    def collection(
        function: str, element: ast.expr, kind: str, filters: list[ast.expr]
    ) -> ast.expr:
        loop = ast.comprehension(
            target=ast.Name(id="t"), iter=ast.Name(id=kind), ifs=filters, is_async=0
        )
        generator = ast.GeneratorExp(elt=element, generators=[loop])
        return ast.Call(func=ast.Name(id=function), args=[generator], keywords=[])

    collections = st.builds(
        collection,
        st.sampled_from(["any", "all", "count", "sum", "min", "max"]),
        inner,
        st.sampled_from(KINDS),
        st.lists(inner, max_size=2),
    )
    outer = st.recursive(st.one_of(collections, constants()), extend, max_leaves=3)
    return outer.map(lambda tree: ast.unparse(ast.fix_missing_locations(tree)))


def fact_tables() -> st.SearchStrategy[dict[str, dict[str, dict[str, Any]]]]:
    simple = st.one_of(
        st.integers(min_value=-3, max_value=3),
        st.sampled_from([0.5, 0.1, -0.0, 2.5]),
        st.booleans(),
        st.sampled_from(["done", "open", "T-1", ""]),
    )
    value = st.one_of(simple, simple, json_values())
    data = st.dictionaries(st.sampled_from(FIELDS), value, max_size=4)
    by_id = st.dictionaries(st.sampled_from([*IDS[:-1], "a", "b", "c"]), data, max_size=6)
    return st.dictionaries(st.sampled_from(KINDS), by_id, max_size=3)


@DIFFERENTIAL
@given(
    collections_text(), fact_tables(), st.one_of(st.none(), st.just(Item("task", "x", {"n": 1})))
)
def test_compiled_equals_reference_on_generated_collections(
    text: str, facts: dict[str, dict[str, dict[str, Any]]], item: Item | None
) -> None:
    both(text, facts, NOW, item)


# --------------------------------------------------------------------------------------
# Incremental evaluation: the same as a full pass, whatever the puts and dropped plans

INCREMENTAL = [
    "count(t for t in task if t.data.s == 'done')",
    "all(t.data.s == 'done' for t in task if t.data.m == item.id)",
    "any(t.data.n > 2 for t in task if 'n' in t.data)",
    "sum(t.data.n for t in task if t.data.m == item.id)",
    "sum(t.data.n for t in task if 'n' in t.data) > 1",
    "min(t.data.n for t in task)",
    "max(t.data.n for t in task if 'n' in t.data)",
    "max(t.data.s for t in task) == 'open' or count(t.data.n for t in task) > 3",
    "count(t.data.n + 1 > 2 for t in task)",
    "all(t.data.s for t in task) and min(t.id for t in task if t.data.m == item.id)",
    "count(t for t in task if t.data.n == item.data.k) + sum(1 for t in task if t.data.m)",
]

TASK_IDS = ["a", "b", "c", "d", "e", "f"]


def task_data() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "s": st.sampled_from(["done", "open", ""]),
            "m": st.sampled_from(["x", "y"]),
            "n": st.one_of(
                st.integers(min_value=-2, max_value=4),
                st.sampled_from([0.5, 0.1, 1e308, -0.0, 1.0, True, "3", None]),
            ),
        },
    )


puts = st.lists(st.tuples(st.sampled_from(TASK_IDS), task_data()), min_size=1, max_size=3)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), puts),  # planned on an overlay, then committed
        st.tuples(st.just("drop"), puts),  # planned on an overlay, then dropped
        st.tuples(st.just("put"), puts),  # put straight into the table
    ),
    min_size=1,
    max_size=12,
)


@DIFFERENTIAL
@given(st.sampled_from(INCREMENTAL), operations)
def test_incremental_collections_equal_a_full_pass(text: str, steps: list[Any]) -> None:
    from gatekeeper.engine.facts import FactTable, ProjectFacts
    from gatekeeper.expr.compiler import _evaluate_reference

    condition = compile_condition(text, item_kind="milestone")
    items = [
        Item("milestone", "x", {}),
        Item("milestone", "y", {"k": 1}),
        None,
        Item("milestone", "y", {"k": 2}),  # the same item, its data changed
    ]
    table = FactTable({("p", "other", "o"): {"n": 1}})
    table.CHANGE_LOG = 2  # a short change log: states often start over  # type: ignore[misc]

    def check(view: FactTable) -> None:
        for item in items:
            fast = condition.evaluate(ProjectFacts("p", view), NOW, item)
            full = _evaluate_reference(condition, ProjectFacts("p", view), NOW, item)  # type: ignore[arg-type]
            assert fast == full and repr(fast) == repr(full), (fast, full)

    for action, batch in steps:
        if action == "put":
            for fact_id, data in batch:
                table.put(("p", "task", fact_id), data)
            check(table)
            continue
        group = table.overlay()
        view = group.overlay()  # planned as the daemon does: an overlay over a group's
        for fact_id, data in batch:
            view.put(("p", "task", fact_id), data)
            check(view)
        if action == "commit":
            for fact_id, data in batch:
                table.put(("p", "task", fact_id), data)
        check(table)


def test_a_posted_fact_does_not_go_over_the_kind_again() -> None:
    from collections.abc import Iterator, Mapping

    from gatekeeper.engine.facts import FactTable, ProjectFacts

    passes: list[str] = []

    class Watched(Mapping[str, Any]):
        """A kind's facts that count the passes over them."""

        def __init__(self, facts: Mapping[str, Any]) -> None:
            self.facts = facts

        def __getitem__(self, key: str) -> Any:
            return self.facts[key]

        def __iter__(self) -> Iterator[str]:
            passes.append("pass")
            return iter(self.facts)

        def __len__(self) -> int:
            return len(self.facts)

    class Counting(ProjectFacts):
        def of_kind(self, kind: str) -> Any:
            return Watched(super().of_kind(kind))

        def committed_of_kind(self, kind: str) -> Any:
            return Watched(super().committed_of_kind(kind))

    condition = compile_condition("count(t for t in task if t.data.done) >= 2")
    table = FactTable({("p", "task", f"t{n}"): {"done": n % 2 == 0} for n in range(100)})
    assert condition.evaluate(Counting("p", table), NOW).value is True
    assert len(passes) == 1  # the state is built once
    for n in range(5):
        view = table.overlay()
        view.put(("p", "task", f"new{n}"), {"done": True})
        evaluation = condition.evaluate(Counting("p", view), NOW)
        assert evaluation.collections[0].true == 51 + n
        table.put(("p", "task", f"new{n}"), {"done": True})
    dropped = table.overlay()
    dropped.put(("p", "task", "t1"), {"done": True})
    assert condition.evaluate(Counting("p", dropped), NOW).collections[0].true == 56
    assert condition.evaluate(Counting("p", table), NOW).collections[0].true == 55
    assert len(passes) == 1  # puts and plans were followed by deltas
