"""The wire model of ``POST /v1/facts`` (``http.models.FactsBody``) and the published
contract (``schemas/facts-request.schema.json``) agree: on bodies generated from the schema's
own patterns and limits, on arbitrary JSON, and on the known edge cases (sizes, identifier
patterns, trailing newlines, nesting depth). The model says yes to the usual valid bodies,
so the one-pass decode is the path taken; whatever it refuses is worded by the schema."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.http.models import FactsBody, facts_of
from gatekeeper.http.wire import ApiError, decode_facts, parse_facts
from gatekeeper.jsonwire import MAX_FACT_DEPTH
from gatekeeper.schemas import load_schema

SCHEMA = load_schema("facts-request.schema.json")
FACT_SCHEMA = SCHEMA["$defs"]["fact"]
BATCH_SCHEMA = SCHEMA["oneOf"][1]["properties"]["facts"]
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
DECODER = msgspec.json.Decoder(FactsBody)
FACT = {"project": "tower-a", "kind": "milestone", "id": "design", "data": {"status": "ok"}}


def schema_accepts(body: Any) -> bool:
    return VALIDATOR.is_valid(body)


def model_accepts(body: Any) -> bool:
    """Whether the wire model alone (the fast path) takes ``body`` as it comes on the wire."""
    try:
        return facts_of(DECODER.decode(json.dumps(body).encode())) is not None
    except msgspec.DecodeError:
        return False


def test_the_model_reads_its_limits_from_the_schema() -> None:
    generated = msgspec.json.schema(FactsBody)["$defs"]
    fact = generated["FactIn"]
    assert set(fact["properties"]) == set(FACT_SCHEMA["properties"])
    assert fact["required"] == FACT_SCHEMA["required"]
    assert fact["additionalProperties"] is FACT_SCHEMA["additionalProperties"] is False
    for name, prop in FACT_SCHEMA["properties"].items():
        assert fact["properties"][name]["type"] == prop["type"]
        assert fact["properties"][name].get("pattern") == prop.get("pattern")
    batch = generated["FactsBody"]["properties"]["facts"]
    assert (batch["minItems"], batch["maxItems"]) == (
        BATCH_SCHEMA["minItems"],
        BATCH_SCHEMA["maxItems"],
    )


@pytest.mark.parametrize(
    "body",
    [
        FACT,
        {"facts": [FACT]},
        {"facts": [FACT] * 1000},
        {**FACT, "project": "a" * 64, "id": "A" * 128, "kind": "k" + "_" * 63},
        {**FACT, "data": {}},
        {**FACT, "id": "T-1.2_x"},
        {**FACT, "data": {"deep": json.loads("[" * 400 + "]" * 400)}},
    ],
)
def test_usual_valid_bodies_take_the_fast_path(body: Any) -> None:
    assert model_accepts(body)
    assert schema_accepts(body)


@pytest.mark.parametrize(
    "body",
    [
        {**FACT, "id": "design\n"},  # $ alone would match before a final newline
        {**FACT, "project": "tower-a\n"},
        {**FACT, "kind": "milestone\n"},
        {**FACT, "project": "a" * 65},
        {**FACT, "id": "A" * 129},
        {**FACT, "kind": "k" * 65},
        {**FACT, "kind": "Milestone"},
        {**FACT, "id": ""},
        {**FACT, "id": "-a"},
        {**FACT, "data": []},
        {**FACT, "data": None},
        {**FACT, "extra": 1},
        {k: v for k, v in FACT.items() if k != "data"},
        {**FACT, "project": 7},
        {"facts": []},
        {"facts": [FACT] * 1001},
        {"facts": [FACT], "more": 1},
        {"facts": [FACT], **FACT},
        {"facts": FACT},
        {"facts": [{**FACT, "kind": "Bad"}]},
        [FACT],
        "fact",
        None,
    ],
)
def test_invalid_bodies_are_refused_by_both_and_worded_by_the_schema(body: Any) -> None:
    assert not model_accepts(body)
    assert not schema_accepts(body)
    with pytest.raises(ApiError) as refused:
        decode_facts(json.dumps(body).encode())
    with pytest.raises(ApiError) as worded:
        parse_facts(body)
    assert refused.value.status == worded.value.status == 400
    assert refused.value.text == worded.value.text


def test_nesting_the_stdlib_refuses_is_refused_as_before() -> None:
    """msgspec's own depth limit differs from ``json``'s by a few levels: deep bodies are
    parsed again by ``loads_strict`` before they are trusted, so the API's limit is as it
    was (400 ``malformed JSON: nested too deeply``)."""
    for depth in (980, 990, 995, 1000, 5000):
        raw = (
            b'{"project":"p","kind":"k","id":"i","data":{"x":' + b"[" * depth + b"]" * depth + b"}}"
        )
        try:
            json.loads(raw)
            expected = None
        except RecursionError:
            expected = 400
        if expected is None:
            facts, _ = decode_facts(raw)
            assert len(facts) == 1
        else:
            with pytest.raises(ApiError) as refused:
                decode_facts(raw)
            assert refused.value.status == 400
            assert b"nested too deeply" in refused.value.body


def test_a_batch_of_deep_facts_is_checked_fact_by_fact() -> None:
    # more brackets in the body than MAX_FACT_DEPTH, but each fact's data within it
    deep = json.loads("[" * (MAX_FACT_DEPTH - 1) + "]" * (MAX_FACT_DEPTH - 1))
    facts, _ = decode_facts(json.dumps({"facts": [{**FACT, "data": {"x": deep}}] * 3}).encode())
    assert len(facts) == 3
    too_deep = json.loads("[" * MAX_FACT_DEPTH + "]" * MAX_FACT_DEPTH)
    body = {"facts": [{**FACT, "data": {"x": deep}}, {**FACT, "data": {"x": too_deep}}]}
    with pytest.raises(ApiError) as refused:
        decode_facts(json.dumps(body).encode())
    assert refused.value.status == 400
    assert b"$.facts[1].data" in refused.value.body
    assert b"$.facts[0]" not in refused.value.body


def _matching(pattern: str) -> st.SearchStrategy[str]:
    """Strings matching a schema pattern ``^...$(?!\\n)`` (drawn from its body)."""
    body = pattern.removeprefix("^").removesuffix("$(?!\\n)")
    return st.from_regex(re.compile(body), fullmatch=True)


def _near(pattern: str) -> st.SearchStrategy[str]:
    """Strings matching the pattern, and near misses: a trailing newline, a character more,
    an upper-case or foreign character, a leading dash, the empty string."""
    good = _matching(pattern)
    return st.one_of(
        good,
        good.map(lambda s: s + "\n"),
        good.map(lambda s: s + "x" * 70),
        good.map(str.upper),
        good.map(lambda s: "-" + s),
        good.map(lambda s: s + "é"),
        st.just(""),
    )


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
PROPS = FACT_SCHEMA["properties"]
SCHEMA_FACTS = st.fixed_dictionaries(
    {name: _near(PROPS[name]["pattern"]) for name in ("project", "kind", "id")}
    | {"data": st.one_of(st.dictionaries(st.text(), JSON_VALUES, max_size=3), JSON_VALUES)},
    optional={"extra": JSON_VALUES},
)
SCHEMA_BODIES = st.one_of(
    SCHEMA_FACTS,
    st.fixed_dictionaries({"facts": st.lists(SCHEMA_FACTS, max_size=4)}),
    st.fixed_dictionaries(
        {"facts": st.lists(SCHEMA_FACTS, max_size=2)}, optional={"project": st.text()}
    ),
)

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
ANY_BODIES = st.one_of(
    FACTS,
    st.fixed_dictionaries({"project": TEXT, "kind": TEXT, "id": TEXT, "data": VALUES}),
    st.fixed_dictionaries({"facts": st.lists(FACTS, max_size=3)}),
    VALUES,
)


@settings(max_examples=600, deadline=None)
@given(SCHEMA_BODIES)
def test_model_and_schema_agree_on_bodies_drawn_from_the_schema(body: Any) -> None:
    assert model_accepts(body) == schema_accepts(body), body


@settings(max_examples=600, deadline=None)
@given(ANY_BODIES)
def test_model_and_schema_agree_on_arbitrary_bodies(body: Any) -> None:
    assert model_accepts(body) == schema_accepts(body), body
