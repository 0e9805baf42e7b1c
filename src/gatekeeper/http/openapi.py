"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``: generated,
not written by hand.

``build_openapi()`` returns the document: ``paths`` from the route table
(``routes.ROUTES``: every operation the app serves, its parameters, request body, answers
and error statuses), ``components/schemas`` from the wire models (``models``, through
``msgspec.json.schema_components``: field names, types, nullability, constraints;
decimal amounts are strings, times RFC 3339 strings in UTC). Schemas use the JSON Schema
2020-12 dialect (OpenAPI 3.1's own).

Two published schemas are embedded rather than generated: the request body of
``POST /v1/facts`` is ``schemas/facts-request.schema.json`` (its ``$defs`` go under
``components/schemas`` with their ``$ref``s rewritten; ``tests/test_facts_model.py`` keeps
it and ``models.FactsBody`` in agreement), and the ``source`` of a rule is described by
``schemas/rules.schema.json`` the same way, its ``$defs`` under
``components/schemas/RuleFile.<name>``.

The document is built once; ``tests/test_openapi.py`` checks that it lists exactly the
server's routes and fuzzes the live daemon against it (schemathesis).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from typing import Any

import msgspec

from gatekeeper import __version__
from gatekeeper.http import models
from gatekeeper.http.routes import FACTS_REQUEST, OPENAPI_DOCUMENT, ROUTES, Route
from gatekeeper.http.wire import MAX_IDEMPOTENCY_KEY_CHARS
from gatekeeper.schemas import load_schema

JsonObject = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
FACTS_REQUEST_SCHEMA = "facts-request.schema.json"
RULES_SCHEMA = "rules.schema.json"
RULE_FILE_PREFIX = "RuleFile."

COMPONENT_REF = "#/components/schemas/{name}"
ERROR_STATUSES: Mapping[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "The request is malformed: bad JSON, a body or parameter of the wrong shape.",
    ),
    401: (
        "Unauthorized",
        "No or an unknown API token (when tokens are configured), or, for a hook, a bad "
        "signature or token. Comes with `WWW-Authenticate: Bearer` for API tokens.",
    ),
    403: ("Forbidden", "The token lacks the scope, or may not act on the project."),
    404: ("NotFound", "No such resource (also the answer to any path the API does not have)."),
    405: ("MethodNotAllowed", "The path exists but not with this method."),
    408: (
        "RequestTimeout",
        "The body did not arrive within the config's `body_read_timeout_s` (default 30 s); "
        "the connection is closed.",
    ),
    409: ("Conflict", "The request conflicts with the resource's state."),
    413: ("PayloadTooLarge", "The body is over the config's `max_body_bytes` (default 1 MiB)."),
    415: ("UnsupportedMediaType", "The body's Content-Type is not `application/json`."),
    422: ("UnprocessableContent", "The request is well formed but cannot be processed."),
    429: (
        "TooManyRequests",
        "The token is over its `rate_limit` (requests per second); `Retry-After` says in how "
        "many seconds to try again.",
    ),
    500: ("InternalError", "An unexpected error (a bug): logged by the daemon, never shown."),
    503: (
        "ServiceUnavailable",
        "The daemon is shutting down, or its database cannot take writes right now (disk "
        "full, locked by another process): nothing was applied; retry after `Retry-After` "
        "seconds.",
    ),
}

DESCRIPTION = """\
gatekeeper gates escrow releases, notifications and CI/CD pipelines on **facts**, following
**rules** written in YAML. This API takes facts in and shows the rules, the facts and the
outbox of actions.

Conventions:

- JSON everywhere, request and response (`application/json`).
- Every error (4xx, 5xx) has the body `{"error": {"status", "message", "problems"?}}`;
  `problems` lists, for a body of the wrong shape, each problem with its JSON path
  (`$.facts[1].kind`). A refused request changes nothing.
- Any path not listed here answers 404 and a listed path asked with another method answers
  405, both with that error body. Every `GET` also answers `HEAD` (no body).
- Times are RFC 3339 strings in UTC with milliseconds (`2026-11-01T09:00:00.000Z`); money
  amounts are decimal strings (`"5000.00"`), never numbers.
"""


def build_openapi() -> JsonObject:
    """The OpenAPI 3.1 document of the HTTP API (``info.version`` is gatekeeper's version).

    It is built once per process; each call returns a deep copy, which the caller may change.
    Raises ``FileNotFoundError`` when a JSON Schema it embeds (``schemas/``) is missing.
    """
    return copy.deepcopy(_document())


def openapi_bytes() -> bytes:
    """The document as the JSON bytes ``GET /openapi.json`` answers (encoded once)."""
    return _document_bytes()


@cache
def _document_bytes() -> bytes:
    return models.encode(_document())


@cache
def _document() -> JsonObject:
    schemas: JsonObject = {}
    facts_request = _import_schema(FACTS_REQUEST_SCHEMA, "", schemas)
    schemas[FACTS_REQUEST] = facts_request
    _import_schema(RULES_SCHEMA, RULE_FILE_PREFIX, schemas)  # for a rule's source
    schemas.update(_model_schemas())
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": JSON_SCHEMA_DIALECT,
        "info": {
            "title": "gatekeeper",
            "version": __version__,
            "summary": "Gate money, pipelines and notifications on facts, by rules kept in git.",
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "facts", "description": "What is known about the work."},
            {"name": "rules", "description": "The active ruleset and each rule's state."},
            {"name": "actions", "description": "The outbox: queued, delivered, dead actions."},
            {"name": "escrows", "description": "Escrow accounts and what was released."},
            {"name": "meta", "description": "Liveness and this description."},
        ],
        "paths": _paths(ROUTES),
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from `gatekeeper token new`; the config holds "
                    "its SHA-256. With no tokens configured (loopback only) none is needed. "
                    "Scopes: `facts:write` (post facts), `approve` (post approvals), `read` "
                    "(every other GET), `admin` (the admin acts, and the history), `history` "
                    "(only `GET /v1/history/facts` and `/v1/history/decisions`, of the "
                    "token's projects).",
                }
            },
            "schemas": schemas,
            "responses": _error_responses(),
            "parameters": _parameters(),
        },
    }


# ---------------------------------------------------------------------------------------------
# Embedding the repository's JSON Schemas


def _import_schema(name: str, prefix: str, into: JsonObject) -> JsonObject:
    """Put the ``$defs`` of schema file ``name`` into ``into`` as ``<prefix><def>``; return
    the schema's root (without ``$defs``, ``$schema``, ``$id``), ``$ref``s rewritten."""
    schema = copy.deepcopy(load_schema(name))
    defs = schema.pop("$defs", {})
    for key in ("$schema", "$id"):
        schema.pop(key, None)
    for def_name, definition in defs.items():
        into[prefix + def_name] = _rewrite_refs(definition, prefix)
    root: JsonObject = _rewrite_refs(schema, prefix)
    return root


def _rewrite_refs(node: Any, prefix: str) -> Any:
    """``node`` with each ``#/$defs/X`` reference turned into ``#/components/schemas/<prefix>X``."""
    if isinstance(node, dict):
        out = {key: _rewrite_refs(value, prefix) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            out["$ref"] = "#/components/schemas/" + prefix + ref.removeprefix("#/$defs/")
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item, prefix) for item in node]
    return node


# ---------------------------------------------------------------------------------------------
# Schemas of the models


MODELS: tuple[type[Any], ...] = (
    models.Error,
    models.ReleasePayload,
    models.NotifyPayload,
    models.PipelinePayload,
    models.SetFactPayload,
)
"""Models every document has beyond those the routes name (the error body, the payloads an
action's ``payload`` may take)."""


def _model_schemas() -> JsonObject:
    """The components of every model the routes name (and ``MODELS``), by class name."""
    types: list[Any] = list(MODELS)
    for route in ROUTES:
        for model in (
            route.request,
            route.response,
            *(t for t, _ in route.extra_responses.values()),
        ):
            if isinstance(model, type) and issubclass(model, msgspec.Struct) and model not in types:
                types.append(model)
    _, components = msgspec.json.schema_components(types, ref_template=COMPONENT_REF)
    # an action's payload is shaped by its kind (msgspec has no conditional schemas)
    for name in ("Action", "ActionWithAttempts"):
        components[name]["allOf"] = [
            {
                "if": {"properties": {"kind": {"const": kind}}},
                "then": {"properties": {"payload": _ref(payload.__name__)}},
            }
            for kind, payload in (
                ("release", models.ReleasePayload),
                ("notify", models.NotifyPayload),
                ("pipeline", models.PipelinePayload),
            )
        ]
    components[OPENAPI_DOCUMENT] = {
        "type": "object",
        "required": ["openapi", "info", "paths"],
        "description": "This document.",
    }
    return components


def _ref(name: str) -> JsonObject:
    return {"$ref": COMPONENT_REF.format(name=name)}


def _schema_of(model: type[Any] | str | None) -> JsonObject:
    if model is dict:
        return {"type": "object"}
    if model is None:
        return {"type": "string"}
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": COMPONENT_REF.format(name=name)}


# ---------------------------------------------------------------------------------------------
# Responses, parameters, paths


def _error_responses() -> JsonObject:
    """One response per error status, its body the common error with that ``status``."""
    return {
        name: {
            "description": description,
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [_ref("Error")],
                        "properties": {"error": {"properties": {"status": {"const": status}}}},
                    }
                }
            },
        }
        for status, (name, description) in ERROR_STATUSES.items()
    }


def _parameters() -> JsonObject:
    return {
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "Makes the post idempotent: a repeat with the same key and body "
            "applies nothing and gets the first answer (with `Idempotent-Replayed: true`); "
            "the same key with another body is refused (422). Printable ASCII without spaces; "
            "keys starting with `hook:` or `approval:` are the daemon's own (400).",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
                "pattern": "^[!-~]+$",
            },
        },
        "RequestId": {
            "name": "X-Request-Id",
            "in": "header",
            "required": False,
            "description": "The caller's id of the request, recorded with the facts and "
            "echoed back; one is made up when it is absent, empty, longer than 128 "
            "characters or not printable.",
            "schema": {"type": "string"},
        },
    }


def _json(schema: JsonObject, description: str, **extra: Any) -> JsonObject:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _errors(*statuses: int, secured: bool = True, body: bool = False) -> JsonObject:
    """Error responses: ``statuses``, 400 (every operation refuses a query parameter it does
    not declare), 500, for a secured operation 401, 403 and 429 (its token's rate limit),
    and for one with a request ``body`` 408 (the body read timeout)."""
    extra: tuple[int, ...] = (400, 401, 403, 429) if secured else (400,)
    if body:
        extra += (408,)
    return {
        str(status): {"$ref": f"#/components/responses/{ERROR_STATUSES[status][0]}"}
        for status in sorted({*statuses, *extra, 500})
    }


def _operation(route: Route) -> JsonObject:
    operation: JsonObject = {
        "operationId": route.operation_id,
        "tags": [route.tag],
        "summary": route.summary,
    }
    if route.description:
        operation["description"] = route.description
    if route.scope is None:
        operation["security"] = []
    if route.parameters:
        operation["parameters"] = [dict(p) for p in route.parameters]
    if route.request is not None:
        schema = _schema_of(route.request)
        operation["requestBody"] = {
            "required": route.request_required,
            "content": {media: {"schema": schema} for media in route.request_media_types},
        }
    if route.response is None:
        ok: JsonObject = {
            "description": route.response_description,
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    else:
        ok = _json(_schema_of(route.response), route.response_description)
    if route.headers:
        ok["headers"] = {name: dict(header) for name, header in route.headers.items()}
    responses: JsonObject = {"200": ok}
    for status, (model, description) in sorted(route.extra_responses.items()):
        responses[str(status)] = _json(_schema_of(model), description)
    responses.update(
        _errors(*route.errors, secured=route.scope is not None, body=route.request is not None)
    )
    operation["responses"] = responses
    return operation


def _paths(routes: tuple[Route, ...]) -> JsonObject:
    """The ``paths`` object: each route's operation under its OpenAPI path."""
    paths: JsonObject = {}
    for route in routes:
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(route)
    return paths
