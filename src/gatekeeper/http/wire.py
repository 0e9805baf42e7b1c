"""Bodies and parameters in, JSON answers out: decoding with the wire models, the error
answer, and the small parsers of query strings and headers every handler shares.

Errors are always JSON, ``{"error": {"status": 400, "message": ..., "problems": [...]}}``,
raised as ``ApiError`` and answered by the error middleware; a request that is refused
changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import jsonschema
import msgspec
from aiohttp import web
from msgspec import UnsetType

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.engine.model import FactInput, FactKey, IdempotencyRecord
from gatekeeper.http.models import (
    BodyProblem,
    Error,
    ErrorDetail,
    FactsBody,
    encode,
    facts_of,
)
from gatekeeper.jsonwire import MAX_FACT_DEPTH, json_path, loads_strict, too_deep
from gatekeeper.runtime.hooks import RESERVED_KINDS
from gatekeeper.schemas import load_schema
from gatekeeper.store.records import AuditCursor, RulesetCursor, RulesetSummary, StoredFact

MAX_LIST_LIMIT = 1000
FACTS_PAGE = 1000
"""The default (and largest) page of ``GET /v1/facts`` and ``/v1/export``, in facts."""
MAX_IDEMPOTENCY_KEY_CHARS = 255
FACTS_SCHEMA = "facts-request.schema.json"

M = TypeVar("M")


class ApiError(web.HTTPException):
    """An error answered as JSON: ``status``, a message and optional located problems
    (``[{"path": "$.facts[1].kind", "message": ...}]``)."""

    def __init__(
        self,
        status: int,
        message: str,
        problems: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status_code = status
        self.message = message
        super().__init__(
            text=error_body(status, message, problems).decode(),
            content_type="application/json",
            headers=headers,
        )


def error_body(
    status: int, message: str, problems: Iterable[dict[str, Any]] | None = None
) -> bytes:
    """The JSON bytes of an error answer (``problems`` left out when empty)."""
    listed = [BodyProblem(p["path"], p["message"]) for p in problems or ()]
    detail = ErrorDetail(status, message, listed) if listed else ErrorDetail(status, message)
    return encode(Error(detail))


def respond(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer: ``body`` is a response model (or JSON-ready builtins), encoded once."""
    return web.Response(
        body=encode(body),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error answer for ``status`` as a plain response (for the error middleware)."""
    return web.Response(
        body=error_body(status, message),
        status=status,
        headers=headers,
        content_type="application/json",
        charset="utf-8",
    )


# ---------------------------------------------------------------------------------------------
# Request bodies


def check_json_content_type(request: web.Request) -> None:
    """Raise ``ApiError`` 415 unless the body is declared ``application/json``."""
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type!r}")


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed as strict JSON (``jsonwire.loads_strict``); ``ApiError`` 400 otherwise."""
    try:
        return loads_strict(raw)
    except ValueError as exc:  # bad UTF-8, NaN, 1e400, a 5,000-digit number, deep nesting
        raise ApiError(400, f"malformed JSON: {exc}"[:300]) from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; 415 for another content type, 400 for malformed JSON."""
    check_json_content_type(request)
    return parse_json(await request.read())


class BodyShapeError(Exception):
    """A body that is JSON but not of the model's shape: msgspec's message and JSON path."""

    def __init__(self, message: str, path: str, body: Any) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.body = body


async def read_model(request: web.Request, decoder: msgspec.json.Decoder[M]) -> tuple[M, bytes]:
    """The request's body decoded and validated by ``decoder`` (a ``Decoder`` of a request
    model), with its bytes. 415 for another content type, 400 for malformed JSON; a body of
    the wrong shape raises ``BodyShapeError`` for the handler to word."""
    check_json_content_type(request)
    raw = await request.read()
    return decode_model(raw, decoder), raw


def decode_model(raw: bytes, decoder: msgspec.json.Decoder[M]) -> M:
    """``raw`` decoded and validated by ``decoder``; ``ApiError`` 400 for malformed JSON,
    ``BodyShapeError`` for JSON of the wrong shape."""
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        body = parse_json(raw)  # malformed JSON is 400 "malformed JSON", as everywhere
        message, _, where = str(exc).partition(" - at `")
        raise BodyShapeError(message, where.rstrip("`") or "$", body) from None


def shape_problems(
    model: type[msgspec.Struct], body: Any, messages: dict[str, str]
) -> list[dict[str, str]]:
    """Every problem of ``body`` (parsed JSON) against request model ``model``, as located
    problems: ``$`` when it is not an object, then each unknown key (when the model forbids
    them), then each field that is missing or does not convert, in field order, worded by
    ``messages[field]`` (msgspec's own message for a field not in ``messages``)."""
    if not isinstance(body, dict):
        return [{"path": "$", "message": "must be an object"}]
    fields = msgspec.structs.fields(model)
    names = {f.encode_name for f in fields}
    problems = []
    if model.__struct_config__.forbid_unknown_fields:
        for key in sorted(set(body) - names):
            problems.append({"path": f"$.{key}", "message": f"unknown key {key!r}"})
    for f in fields:
        if f.encode_name not in body:
            if f.required:
                problems.append({"path": f"$.{f.encode_name}", "message": messages[f.name]})
            continue
        try:
            msgspec.convert(body[f.encode_name], f.type)
        except msgspec.ValidationError as exc:
            message = messages.get(f.name, str(exc))
            problems.append({"path": f"$.{f.encode_name}", "message": message})
    return problems


_FACTS_DECODER = msgspec.json.Decoder(FactsBody)


def _fact_validators() -> tuple[jsonschema.Draft202012Validator, jsonschema.Draft202012Validator]:
    schema = load_schema(FACTS_SCHEMA)
    defs = schema["$defs"]
    single = {"$defs": defs, "$ref": "#/$defs/fact"}
    batch = {"$defs": defs, **schema["oneOf"][1]}
    return jsonschema.Draft202012Validator(single), jsonschema.Draft202012Validator(batch)


_SINGLE_FACT, _FACT_BATCH = _fact_validators()


def decode_facts(raw: bytes) -> tuple[list[FactInput], Any]:
    """A ``POST /v1/facts`` body: its facts, and the body for ``idempotency_record`` (JSON
    builtins, or a ``_LazyBody`` that builds them only when an Idempotency-Key is given).

    The wire model (``FactsBody``) decides the usual bodies in one pass. Anything it refuses
    — and any body with a fact's data nested deeper than ``MAX_FACT_DEPTH`` — is parsed
    again with ``loads_strict`` and checked with the published JSON Schema, which decides
    and words the errors exactly as the API always has: 400 for malformed JSON, 400 listing
    each problem with its JSON path for a body of the wrong shape, 400 for a reserved kind,
    400 naming the depth limit for data nested too deeply.
    """
    facts = None
    try:
        body = _FACTS_DECODER.decode(raw)
        facts = facts_of(body)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
        pass
    if facts is not None and (
        # fewer brackets in the whole body than the limit: no fact's data can be too deep
        raw.count(b"[") + raw.count(b"{") <= MAX_FACT_DEPTH
        or not any(too_deep(f.data) for f in facts)
    ):
        batch = not isinstance(body.facts, UnsetType)
        reserved = [
            {"path": f"$.facts[{i}].kind" if batch else "$.kind", "message": "is reserved"}
            for i, f in enumerate(facts)
            if f.kind in RESERVED_KINDS
        ]
        if reserved:
            raise ApiError(
                400, "kind 'approval' is reserved: post approvals to /v1/approvals", reserved
            )
        inputs = [FactInput(f.project, f.kind, f.id, f.data) for f in facts]
        return inputs, _LazyBody(facts, batch)
    parsed = parse_json(raw)
    return parse_facts(parsed), parsed


class _LazyBody:
    """The JSON builtins of a decoded facts body, built only when asked (idempotency)."""

    __slots__ = ("batch", "facts")

    def __init__(self, facts: list[Any], batch: bool) -> None:
        self.facts = facts
        self.batch = batch

    def builtins(self) -> Any:
        items = [
            {"project": f.project, "kind": f.kind, "id": f.id, "data": f.data} for f in self.facts
        ]
        return {"facts": items} if self.batch else items[0]


def parse_facts(body: Any) -> list[FactInput]:
    """Validate a parsed ``POST /v1/facts`` body against ``facts-request.schema.json``;
    raise ``ApiError`` 400 listing every problem (or naming a reserved kind)."""
    is_batch = isinstance(body, dict) and "facts" in body
    validator = _FACT_BATCH if is_batch else _SINGLE_FACT
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        problems = [{"path": json_path(e.absolute_path), "message": e.message} for e in errors]
        raise ApiError(400, "the request body is not a valid fact or batch of facts", problems)
    items = body["facts"] if is_batch else [body]
    reserved = [
        {"path": f"$.facts[{i}].kind" if is_batch else "$.kind", "message": "is reserved"}
        for i, f in enumerate(items)
        if f["kind"] in RESERVED_KINDS
    ]
    if reserved:
        raise ApiError(
            400, "kind 'approval' is reserved: post approvals to /v1/approvals", reserved
        )
    deep = [
        {"path": f"$.facts[{i}].data" if is_batch else "$.data", "message": _TOO_DEEP}
        for i, f in enumerate(items)
        if too_deep(f["data"])
    ]
    if deep:  # accept only what every read endpoint can serve back
        raise ApiError(400, f"fact data is limited to {MAX_FACT_DEPTH} levels of nesting", deep)
    return [FactInput(f["project"], f["kind"], f["id"], f["data"]) for f in items]


_TOO_DEEP = f"is nested more than {MAX_FACT_DEPTH} levels deep (the limit is {MAX_FACT_DEPTH})"


# ---------------------------------------------------------------------------------------------
# Headers and query parameters


def request_id_of(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is 1 to 128 printable characters, else a new
    one (``new_request_id``)."""
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return new_request_id()


def new_request_id() -> str:
    """A random UUID (version 4) as 32 lower-case hex digits: what ``uuid.uuid4().hex``
    gives, in 2 µs instead of 7 (``uuid.UUID`` validates and stores its int in Python)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return raw.hex()


def idempotency_record(request: web.Request, body: Any) -> IdempotencyRecord | None:
    """The request's ``Idempotency-Key`` with the SHA-256 of its canonical JSON body
    (``json.dumps`` with sorted keys, compact); 400 for a key that is empty, longer than 255
    characters or not printable ASCII. ``body`` is JSON builtins, a ``decode_facts`` body,
    or the raw bytes of a JSON body (parsed only when the header is present)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " < c <= "~" for c in key):
        raise ApiError(
            400,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII "
            "characters without spaces",
        )
    if isinstance(body, _LazyBody):
        body = body.builtins()
    elif isinstance(body, bytes):
        body = parse_json(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return IdempotencyRecord(key, hashlib.sha256(canonical.encode()).hexdigest())


def limit_param(request: web.Request, default: int = 100, name: str = "limit") -> int:
    """The ``limit`` query parameter (or another named ``name``), 1 to ``MAX_LIST_LIMIT``;
    400 otherwise."""
    text = request.query.get(name, str(default))
    if not (len(text) <= 6 and text.isascii() and text.isdigit()) or not (
        1 <= int(text) <= MAX_LIST_LIMIT
    ):
        raise ApiError(400, f"{name} must be an integer from 1 to {MAX_LIST_LIMIT}")
    return int(text)


def after_param(request: web.Request) -> int:
    """The ``after`` query parameter (a position in a log: a fact log seq or a decision
    id; 0, the start, by default), a whole number; 400 otherwise."""
    text = request.query.get("after", "0")
    if not (len(text) <= 18 and text.isascii() and text.isdigit()):
        raise ApiError(400, "after must be a whole number (a position in the log)")
    return int(text)


def item_param(request: web.Request) -> str | None:
    """The ``item`` query parameter (the item id of an instance of a per-item rule), or
    None; 400 for an empty one."""
    item = request.query.get("item")
    if item is not None and not item:
        raise ApiError(
            400, "item must be an item id (the id of a fact of the rule's for_each kind)"
        )
    return item


def fact_page_param(request: web.Request) -> tuple[FactKey | None, int]:
    """The ``cursor`` (the fact key of the previous page's last fact) and ``limit`` (1 to
    ``FACTS_PAGE``, default ``FACTS_PAGE``) of a page of facts; 400 for anything else."""
    text = request.query.get("cursor")
    after = None
    if text is not None:
        project, kind, id_ = decode_key(text, 3)
        after = (project, kind, id_)
    return after, limit_param(request, FACTS_PAGE)


def next_fact_cursor(facts: Sequence[StoredFact], limit: int) -> str | None:
    """The cursor of the page after ``facts`` (a full page of ``limit``), else None."""
    last = facts[-1] if len(facts) == limit else None
    return encode_key([last.project, last.kind, last.id]) if last else None


def ruleset_cursor_param(request: web.Request) -> RulesetCursor | None:
    """The ``cursor`` of a page of ruleset versions; 400 for one this API did not give."""
    text = request.query.get("cursor")
    if text is None:
        return None
    at, version = decode_key(text, 2)
    try:
        return RulesetCursor(parse_rfc3339(at), version)
    except ValueError:
        raise ApiError(400, "cursor is not a next_cursor this API gave out") from None


def next_ruleset_cursor(rulesets: Sequence[RulesetSummary], limit: int) -> str | None:
    """The cursor of the page after ``rulesets`` (a full page of ``limit``), else None."""
    last = rulesets[-1] if len(rulesets) == limit else None
    return encode_key([format_rfc3339(last.last_activated_at), last.version]) if last else None


def encode_key(fields: list[str]) -> str:
    """An opaque page cursor: URL-safe base64 of a JSON list of strings."""
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


def decode_key(text: str, size: int) -> tuple[str, ...]:
    """The ``size`` strings of a cursor ``encode_key`` gave out; 400 for anything else."""
    try:
        fields = json.loads(base64.urlsafe_b64decode(text.encode()))
        if (
            isinstance(fields, list)
            and len(fields) == size
            and all(isinstance(field, str) for field in fields)
        ):
            return tuple(fields)
    except (ValueError, TypeError, UnicodeError):
        pass
    raise ApiError(400, "cursor is not a next_cursor this API gave out")


def time_param(request: web.Request, name: str) -> datetime | None:
    """Query parameter ``name`` as an RFC 3339 time with a zone (aware ``datetime``); 400
    for anything else."""
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise ApiError(
            400, f"{name} must be an RFC 3339 time with a zone, got {text[:40]!r}"
        ) from None


def encode_cursor(cursor: AuditCursor) -> str:
    """An opaque audit page cursor (URL-safe base64 of ``[at, kind, id]``, ``at`` in
    RFC 3339)."""
    fields = [format_rfc3339(cursor.at), cursor.kind, cursor.id]
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


def decode_cursor(text: str | None) -> AuditCursor | None:
    """The audit position of a cursor ``encode_cursor`` made; 400 for anything else."""
    if text is None:
        return None
    try:
        at, kind, id_ = json.loads(base64.urlsafe_b64decode(text.encode()))
        if (
            isinstance(at, str)
            and isinstance(kind, str)
            and type(id_) is int
            and 0 <= id_ < 2**63  # a row id the database can hold (SQLite INTEGER)
        ):
            return AuditCursor(parse_rfc3339(at), kind, id_)
    except (ValueError, TypeError, UnicodeError):
        pass
    raise ApiError(400, "cursor is not a next_cursor this API gave out")
