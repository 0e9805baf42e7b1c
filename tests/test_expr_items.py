"""The current item of a per-item rule: ``item`` in a condition compiled with an item kind."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import gatekeeper.expr.compiler as expressions
from gatekeeper.expr import (
    CompiledCondition,
    ExpressionError,
    FactRef,
    Item,
    compile_condition,
    next_change_at,
)
from gatekeeper.expr.compiler import _evaluate_reference
from tests.test_expressions import DictFacts
from tests.test_expressions_compiled import both

NOW = datetime(2026, 11, 9, 9, 0, tzinfo=UTC)

BUILD = Item(
    "build",
    "b9",
    {
        "status": "failed",
        "branch": "main",
        "commit": "abc123",
        "x-y": 7,
        "opened_at": "2026-11-08T09:00:00Z",
        "tags": ["slow", "flaky"],
    },
)
FACTS = {
    "build": {"b9": dict(BUILD.data), "b1": {"status": "passed"}},
    "policy": {"hold": {"days": 3}},
    "item": {"x": {"status": "a kind called item"}},
}


def per_item(text: str, kind: str = "build") -> CompiledCondition:
    condition = compile_condition(text, item_kind=kind)
    assert isinstance(condition, CompiledCondition)
    return condition


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('item.data.status == "failed" and item.data.branch == "main"', True),
        ('item.id == "b9" and item.kind == "build"', True),
        ('item.data["x-y"] == 7', True),
        ('"commit" in item.data and "nope" not in item.data', True),
        ('item["data"]["tags"][-1] == "flaky"', True),
        ("len(item.data.tags) == 2 and len(item) == 3", True),
        ('build[item.id].commit == item.data.commit and build.b1.status == "passed"', True),
        ("item.data.status == 'passed'", False),
        ("days_since(item.data.opened_at) >= policy.hold.days", False),
        ("days_since(item.data.opened_at) >= 1", True),
    ],
)
def test_item_reads_the_current_item(text: str, value: bool) -> None:
    evaluation = both(text, FACTS, NOW, BUILD)
    assert evaluation is not None
    assert evaluation.value is value, evaluation
    assert evaluation.error is None


def test_a_missing_item_field_is_named_from_item() -> None:
    evaluation = both(
        'item.data.nope == 1 or item.data["a-b"].c or item.data.tags[5]', FACTS, NOW, BUILD
    )
    assert evaluation is not None
    assert evaluation.value is False
    assert evaluation.missing == ("item.data.nope", 'item.data["a-b"]', "item.data.tags[5]")


def test_without_an_item_the_item_is_missing() -> None:
    condition = per_item('item.data.status == "failed"')
    evaluation = condition.evaluate(DictFacts(FACTS), NOW)
    assert evaluation.value is False
    assert evaluation.missing == ("item",)
    assert evaluation == _evaluate_reference(condition, DictFacts(FACTS), NOW)


def test_seen_records_the_item_as_the_fact_it_is() -> None:
    evaluation = both('item.data.status == "failed" and policy.hold.days > 1', FACTS, NOW, BUILD)
    assert evaluation is not None
    assert evaluation.seen == {"policy.hold": {"days": 3}, "build.b9": dict(BUILD.data)}
    # read by id as well: recorded once
    evaluation = both("build.b9.status == item.data.status", FACTS, NOW, BUILD)
    assert evaluation is not None
    assert list(evaluation.seen) == ["build.b9"]


def test_item_is_not_a_kind_in_per_item_rules() -> None:
    condition = per_item('item.data.status == "failed" and build.b1.status')
    assert condition.uses_item is True
    assert condition.item_kind == "build"
    assert condition.reads == frozenset({FactRef("build", "b1")})
    plain = compile_condition('item.x.status == "a kind called item"')
    assert plain.uses_item is False  # type: ignore[attr-defined]
    assert plain.reads == frozenset({FactRef("item", "x")})
    assert plain.evaluate(DictFacts(FACTS), NOW).value is True
    # the same text in a per-item rule reads the item's field "x", which builds lack
    evaluation = per_item('item.x.status == "a kind called item"').evaluate(
        DictFacts(FACTS), NOW, BUILD
    )
    assert evaluation.missing == ("item.x",)


def test_a_per_item_condition_that_does_not_use_the_item() -> None:
    condition = per_item("policy.hold.days == 3")
    assert condition.uses_item is False
    evaluation = condition.evaluate(DictFacts(FACTS), NOW, BUILD)
    assert evaluation.value is True
    assert evaluation.seen == {"policy.hold": {"days": 3}, "build.b9": dict(BUILD.data)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("item._secret", "names starting with '_' are not allowed: '_secret'"),
        ('item.data["_x"]', "keys starting with '_' are not allowed: '_x'"),
        ("item.data.lower()", "method calls are not allowed"),
    ],
)
def test_item_keeps_the_sandbox(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as error:
        per_item(text)
    assert message in str(error.value)


@pytest.mark.parametrize("kind", ["Build", "", "a-b", "1x"])
def test_a_malformed_item_kind_is_refused(kind: str) -> None:
    with pytest.raises(ExpressionError, match="is not a fact kind"):
        compile_condition("true", item_kind=kind)


def test_time_gates_on_item_fields_are_solved_per_item() -> None:
    condition = per_item("days_since(item.data.opened_at) >= 3")
    facts = DictFacts(FACTS)
    at = condition.next_change_at(facts, NOW, BUILD)
    assert at == datetime(2026, 11, 11, 9, 0, tzinfo=UTC)
    assert condition.evaluate(facts, at - timedelta(microseconds=1), BUILD).value is False
    assert condition.evaluate(facts, at, BUILD).value is True
    other = Item("build", "b2", {"opened_at": "2026-11-09T08:00:00+01:00"})
    assert next_change_at(condition, facts, NOW, other) == datetime(2026, 11, 12, 7, 0, tzinfo=UTC)
    assert next_change_at(condition, facts, NOW) is None  # no item: no timestamp
    assert condition.next_change_at(facts, NOW, Item("build", "b3", {})) is None


def test_item_is_immutable_and_conditions_pickle_with_their_kind() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BUILD.id = "other"  # type: ignore[misc]
    condition = per_item("item.data.status == 'failed'")
    copy = pickle.loads(pickle.dumps(condition))
    assert copy.item_kind == "build" and copy.uses_item is True
    assert copy.evaluate(DictFacts(FACTS), NOW, BUILD).value is True


def test_typical_item_gates_do_not_use_the_reference() -> None:
    class NoReference:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the reference evaluator was used")

    texts = [
        'item.data.status == "failed" and item.data.branch == "main"',
        'item.data.nope == 1 or item.data["x-y"] > 2',
        "days_since(item.data.opened_at) >= 1 and 'slow' in item.data.tags",
    ]
    conditions = [per_item(text) for text in texts]
    expected = [_evaluate_reference(c, DictFacts(FACTS), NOW, BUILD) for c in conditions]
    saved = expressions._Evaluator
    expressions._Evaluator = NoReference  # type: ignore[misc]
    try:
        for condition, reference in zip(conditions, expected, strict=True):
            assert condition.evaluate(DictFacts(FACTS), NOW, BUILD) == reference
    finally:
        expressions._Evaluator = saved  # type: ignore[misc]
