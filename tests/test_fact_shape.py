"""The fast check of ``POST /v1/facts`` bodies (``gatekeeper.http.app.FactShape``) never
says yes to a body the JSON Schema refuses, and says yes to the usual valid bodies (so the
fast path is the one taken)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.http.app import _FACT_SHAPE, ApiError, FactShape, parse_facts
from gatekeeper.schemas import load_schema

SCHEMA = load_schema("facts-request.schema.json")
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
FACT = {"project": "tower-a", "kind": "milestone", "id": "design", "data": {"status": "ok"}}


def _schema_valid(body: Any) -> bool:
    return VALIDATOR.is_valid(body)


def test_the_fast_path_is_built_from_the_shipped_schema() -> None:
    assert _FACT_SHAPE is not None


@pytest.mark.parametrize(
    "body",
    [
        FACT,
        {"facts": [FACT]},
        {"facts": [FACT] * 1000},
        {**FACT, "project": "a" * 64, "id": "A" * 128, "kind": "k" + "_" * 63},
        {**FACT, "data": {}},
        {**FACT, "id": "T-1.2_x"},
    ],
)
def test_usual_valid_bodies_take_the_fast_path(body: Any) -> None:
    assert _FACT_SHAPE is not None and _FACT_SHAPE.accepts(body)
    assert _schema_valid(body)


@pytest.mark.parametrize(
    "body",
    [
        {**FACT, "id": "design\n"},  # $ alone would match before a final newline
        {**FACT, "project": "a" * 65},
        {**FACT, "kind": "Milestone"},
        {**FACT, "id": ""},
        {**FACT, "data": []},
        {**FACT, "data": None},
        {**FACT, "extra": 1},
        {k: v for k, v in FACT.items() if k != "data"},
        {**FACT, "project": 7},
        {"facts": []},
        {"facts": [FACT] * 1001},
        {"facts": [FACT], "more": 1},
        {"facts": FACT},
        [FACT],
        "fact",
        None,
    ],
)
def test_invalid_bodies_are_left_to_the_schema_validator(body: Any) -> None:
    assert _FACT_SHAPE is not None and not _FACT_SHAPE.accepts(body)
    assert not _schema_valid(body)
    with pytest.raises(ApiError):
        parse_facts(body)


TEXT = st.one_of(
    st.sampled_from(["tower-a", "design", "T-1", "a", "milestone", "x_y", "A.b-c", ""]),
    st.text(alphabet="aZ09_.-\n /é", max_size=130),
)
VALUES = st.one_of(
    TEXT, st.integers(), st.none(), st.booleans(), st.just({}), st.just([]), st.just({"a": 1})
)
FACTS = st.dictionaries(
    st.sampled_from(["project", "kind", "id", "data", "facts", "other"]), VALUES, max_size=6
)
BODIES = st.one_of(
    FACTS,
    st.fixed_dictionaries({"project": TEXT, "kind": TEXT, "id": TEXT, "data": VALUES}),
    st.fixed_dictionaries({"facts": st.lists(FACTS, max_size=3)}),
    st.fixed_dictionaries(
        {
            "facts": st.lists(
                st.fixed_dictionaries(
                    {"project": TEXT, "kind": TEXT, "id": TEXT, "data": st.just({})}
                ),
                max_size=3,
            )
        }
    ),
    VALUES,
)


@settings(max_examples=600, deadline=None)
@given(BODIES)
def test_the_fast_path_never_accepts_what_the_schema_refuses(body: Any) -> None:
    assert _FACT_SHAPE is not None
    if _FACT_SHAPE.accepts(body):
        assert _schema_valid(body), body


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["$defs"]["fact"]["properties"]["id"].update(maxLength=10),
        lambda s: s["$defs"]["fact"].pop("additionalProperties"),
        lambda s: s["$defs"]["fact"]["required"].remove("data"),
        lambda s: s["oneOf"][1]["properties"]["facts"].update(uniqueItems=True),
        lambda s: s["$defs"]["fact"]["properties"]["data"].update(minProperties=1),
        lambda s: s["oneOf"].append({"type": "array"}),
    ],
)
def test_a_schema_it_cannot_check_exactly_gets_no_fast_path(change: Any) -> None:
    schema = copy.deepcopy(SCHEMA)
    change(schema)
    assert FactShape.from_schema(schema) is None
