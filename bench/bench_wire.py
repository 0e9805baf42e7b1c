"""The wire model's cost: decode + validate ``POST /v1/facts`` bodies, encode a list answer.

Run: ``python bench/bench_wire.py`` (about 20 s); ``--runs`` and ``--seconds`` for longer.

Cases, each timed in the same run and interleaved, median of ``--runs`` (CPU µs per call,
``time.process_time_ns``):

- **decode + validate** a one-fact body and a 100-fact batch, from the request's bytes to
  the validated facts:
  - baseline: what the server did before the wire model, ``jsonwire.loads_strict`` (the
    stdlib ``json`` with strict number handling) then the ``FactShape`` fast check built from
    ``facts-request.schema.json`` and the facts picked out of the dicts;
  - the stdlib path with the jsonschema validator alone (what a body the fast check
    refuses costs, and what the server would cost without ``FactShape``);
  - msgspec: ``msgspec.json.Decoder(FactsBody)`` (``http.models``) and ``facts_of``;
  - pydantic v2: the same model as ``pydantic.BaseModel``s, ``TypeAdapter.validate_json``.
- **encode** a list answer of 100 fact rows (``GET /v1/facts``): ``json.dumps`` (what
  ``web.json_response`` does) as the baseline; ``msgspec.convert`` into the response model
  then ``msgspec.json.encode``; ``msgspec.json.encode`` of the dicts alone; ``orjson.dumps``
  of the dicts; pydantic ``TypeAdapter(FactList).dump_json`` after ``validate_python``.

pydantic and orjson are optional: their rows are left out when they are not installed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jsonschema
import msgspec

from gatekeeper.http.models import Fact, FactList, FactsBody, convert, facts_of
from gatekeeper.jsonwire import loads_strict
from gatekeeper.schemas import load_schema


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="interleaved runs per case")
    parser.add_argument("--seconds", type=float, default=0.3, help="CPU seconds per run")
    return parser.parse_args(argv)


def fact(n: int) -> dict[str, Any]:
    return {
        "project": "bench",
        "kind": "task",
        "id": f"T-{n}",
        "data": {"status": "open", "priority": n % 5, "owner": "ana", "labels": ["a", "b"]},
    }


def row(n: int) -> dict[str, Any]:
    return {**fact(n), "seq": n + 1, "updated_at": "2026-11-01T09:00:00.000Z"}


# ---------------------------------------------------------------------------------------------
# The baseline: loads_strict + FactShape (the server's path before the wire model)

SCHEMA = load_schema("facts-request.schema.json")
FACT_DEF = SCHEMA["$defs"]["fact"]
PATTERNS = {
    name: re.compile(prop["pattern"]).search
    for name, prop in FACT_DEF["properties"].items()
    if "pattern" in prop
}
KEYS = frozenset(FACT_DEF["properties"])
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def shape_accepts_fact(item: Any) -> bool:
    if type(item) is not dict or item.keys() != KEYS:
        return False
    for name, matches in PATTERNS.items():
        value = item[name]
        if type(value) is not str or not matches(value):
            return False
    return type(item["data"]) is dict


def baseline_fast(raw: bytes) -> list[tuple[str, str, str, Any]]:
    body = loads_strict(raw)
    if len(body) == 1 and "facts" in body:
        items = body["facts"]
        assert type(items) is list and 1 <= len(items) <= 1000
    else:
        items = [body]
    assert all(shape_accepts_fact(item) for item in items)
    return [(f["project"], f["kind"], f["id"], f["data"]) for f in items]


def baseline_jsonschema(raw: bytes) -> list[tuple[str, str, str, Any]]:
    body = loads_strict(raw)
    assert VALIDATOR.is_valid(body)
    items = body.get("facts", [body])
    return [(f["project"], f["kind"], f["id"], f["data"]) for f in items]


DECODER = msgspec.json.Decoder(FactsBody)


def with_msgspec(raw: bytes) -> Any:
    facts = facts_of(DECODER.decode(raw))
    assert facts is not None
    return facts


def pydantic_cases() -> (
    tuple[Callable[[bytes], Any], Callable[[list[dict[str, Any]]], bytes]] | None
):
    try:
        import pydantic
    except ImportError:
        return None
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    def text(pattern: str) -> Any:
        return Annotated[str, StringConstraints(pattern=pattern, strict=True)]

    props = FACT_DEF["properties"]

    class PFact(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")
        project: text(props["project"]["pattern"])  # type: ignore[valid-type]
        kind: text(props["kind"]["pattern"])  # type: ignore[valid-type]
        id: text(props["id"]["pattern"])  # type: ignore[valid-type]
        data: dict[str, Any]

    class PBatch(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")
        facts: Annotated[list[PFact], Field(min_length=1, max_length=1000)]

    request = pydantic.TypeAdapter(PFact | PBatch)

    class PRow(PFact):
        seq: int
        updated_at: str

    class PList(BaseModel):
        model_config = ConfigDict(extra="forbid")
        facts: list[PRow]

    listing = pydantic.TypeAdapter(PList)

    def decode(raw: bytes) -> Any:
        body = request.validate_json(raw)
        return body.facts if isinstance(body, PBatch) else [body]

    def encode(rows: list[dict[str, Any]]) -> bytes:
        return listing.dump_json(listing.validate_python({"facts": rows}))

    return decode, encode


def timed(fn: Callable[[Any], Any], arg: Any, seconds: float) -> float:
    """CPU µs per call of ``fn(arg)`` over about ``seconds`` of CPU time."""
    calls = 1
    while True:
        start = time.process_time_ns()
        for _ in range(calls):
            fn(arg)
        elapsed = time.process_time_ns() - start
        if elapsed >= seconds * 1e9:
            return elapsed / calls / 1000
        calls *= 2 if elapsed < seconds * 1e8 else max(2, int(seconds * 1e9 / max(elapsed, 1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one = json.dumps(fact(1)).encode()
    hundred = json.dumps({"facts": [fact(n) for n in range(100)]}).encode()
    rows = [row(n) for n in range(100)]
    encoder = msgspec.json.Encoder()
    cases: list[tuple[str, str, Callable[[Any], Any], Any]] = []
    for label, raw in (("1 fact", one), ("100 facts", hundred)):
        cases += [
            (f"decode+validate {label}", "baseline: loads_strict + FactShape", baseline_fast, raw),
            (f"decode+validate {label}", "loads_strict + jsonschema", baseline_jsonschema, raw),
            (f"decode+validate {label}", "msgspec Decoder(FactsBody)", with_msgspec, raw),
        ]
    encode_label = "encode 100 fact rows"
    cases += [
        (
            encode_label,
            "baseline: json.dumps (web.json_response)",
            lambda r: json.dumps({"facts": r}).encode(),
            rows,
        ),
        (
            encode_label,
            "msgspec convert(FactList) + encode",
            lambda r: encoder.encode(convert({"facts": r}, FactList)),
            rows,
        ),
        (encode_label, "msgspec encode of the dicts", lambda r: encoder.encode({"facts": r}), rows),
    ]
    try:
        import orjson

        cases.append(
            (encode_label, "orjson.dumps of the dicts", lambda r: orjson.dumps({"facts": r}), rows)
        )
    except ImportError:
        pass
    pyd = pydantic_cases()
    if pyd is not None:
        decode, encode = pyd
        cases.insert(
            3, ("decode+validate 1 fact", "pydantic TypeAdapter.validate_json", decode, one)
        )
        cases.insert(
            7, ("decode+validate 100 facts", "pydantic TypeAdapter.validate_json", decode, hundred)
        )
        cases.append((encode_label, "pydantic validate_python + dump_json", encode, rows))
    # every case answers the same facts
    assert [f.id for f in with_msgspec(hundred)] == [f[2] for f in baseline_fast(hundred)]
    assert Fact(**rows[0]).seq == 1
    results: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(args.runs):
        for i, (_, _, fn, arg) in enumerate(cases):
            results[i].append(timed(fn, arg, args.seconds))
    print(
        f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}; "
        f"median of {args.runs} interleaved runs, CPU µs per call"
    )
    print(f"{'case':28}  {'how':44}  {'µs':>8}  {'min..max':>15}  {'÷ baseline':>10}")
    baseline = 0.0
    for i, (what, how, _, _) in enumerate(cases):
        value = statistics.median(results[i])
        if how.startswith("baseline"):
            baseline = value
        spread = f"{min(results[i]):.1f}..{max(results[i]):.1f}"
        print(f"{what:28}  {how:44}  {value:8.1f}  {spread:>15}  {value / baseline:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
