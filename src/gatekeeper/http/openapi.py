"""The OpenAPI 3.1 description of the HTTP API, served at ``GET /openapi.json``.

``build_openapi()`` returns the document: every route of ``server.create_app``, its
parameters, request bodies and the exact JSON bodies of its answers (field names, types,
nullability; decimal amounts are strings, times RFC 3339 strings in UTC). Schemas use the
JSON Schema 2020-12 dialect (OpenAPI 3.1's own).

The request body of ``POST /v1/facts`` is not written twice: it is read from
``schemas/facts-request.schema.json`` (the schema the server validates with) and its
``$defs`` go under ``components/schemas`` with their ``$ref``s rewritten. The ``source`` of a
rule (``GET /v1/rules/{rule_id}``) is described by ``schemas/rules.schema.json`` the same
way, its ``$defs`` under ``components/schemas/RuleFile.<name>``.

The document is built once; ``tests/test_openapi.py`` checks that it lists exactly the
server's routes and fuzzes the live daemon against it (schemathesis), so a route or a field
added without being documented fails the tests.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from typing import Any

from gatekeeper import __version__
from gatekeeper.schemas import load_schema

JsonObject = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
FACTS_REQUEST_SCHEMA = "facts-request.schema.json"
RULES_SCHEMA = "rules.schema.json"
RULE_FILE_PREFIX = "RuleFile."

MAX_LIST_LIMIT = 1000  # server.MAX_LIST_LIMIT (not imported: server imports this module)
MAX_IDEMPOTENCY_KEY_CHARS = 255  # server.MAX_IDEMPOTENCY_KEY_CHARS
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
    409: ("Conflict", "The request conflicts with the resource's state."),
    413: ("PayloadTooLarge", "The body is over the config's `max_body_bytes` (default 1 MiB)."),
    415: ("UnsupportedMediaType", "The body's Content-Type is not `application/json`."),
    422: ("UnprocessableContent", "The request is well formed but cannot be processed."),
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


@cache
def _document() -> JsonObject:
    schemas: JsonObject = {}
    facts_request = _import_schema(FACTS_REQUEST_SCHEMA, "", schemas)
    schemas["FactsRequest"] = facts_request
    _import_schema(RULES_SCHEMA, RULE_FILE_PREFIX, schemas)  # for a rule's source
    schemas.update(_response_schemas(rule_source=_ref(RULE_FILE_PREFIX + "rule")))
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
        "paths": _paths(),
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from `gatekeeper token new`; the config holds "
                    "its SHA-256. With no tokens configured (loopback only) none is needed.",
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
# Schemas of the answers


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: JsonObject) -> JsonObject:
    """``schema`` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(
    properties: JsonObject, *, optional: tuple[str, ...] = (), description: str | None = None
) -> JsonObject:
    """A closed object: every property required except ``optional``, no others allowed."""
    schema: JsonObject = {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }
    if description:
        schema = {"description": description, **schema}
    return schema


STRING: JsonObject = {"type": "string"}
NULLABLE_STRING: JsonObject = {"type": ["string", "null"]}
COUNT: JsonObject = {"type": "integer", "minimum": 0}
SEQ: JsonObject = {"type": "integer", "minimum": 1}
SHA256_HEX: JsonObject = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
STRING_LIST: JsonObject = {"type": "array", "items": {"type": "string"}}
ANY_OBJECT: JsonObject = {"type": "object"}


def _response_schemas(rule_source: JsonObject) -> JsonObject:
    timestamp = _ref("Timestamp")
    nullable_timestamp = _nullable(timestamp)
    decimal = _ref("DecimalString")
    return {
        "Timestamp": {
            "type": "string",
            "format": "date-time",
            "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
            "description": "An RFC 3339 time in UTC with milliseconds: 2026-11-01T09:00:00.000Z.",
        },
        "DecimalString": {
            "type": "string",
            "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
            "description": 'A decimal amount as a string, e.g. "5000.00"; never a number.',
        },
        "Error": _obj(
            {
                "error": _obj(
                    {
                        "status": {
                            "type": "integer",
                            "minimum": 400,
                            "maximum": 599,
                            "description": "The HTTP status, repeated.",
                        },
                        "message": {"type": "string", "description": "What is wrong."},
                        "problems": {
                            "type": "array",
                            "minItems": 1,
                            "description": "Each problem of a body of the wrong shape.",
                            "items": _ref("BodyProblem"),
                        },
                    },
                    optional=("problems",),
                )
            },
            description='Every error: {"error": {"status", "message", "problems"?}}.',
        ),
        "BodyProblem": _obj(
            {
                "path": {
                    "type": "string",
                    "pattern": r"^\$",
                    "description": "The JSON path of the bad value, e.g. $.facts[1].kind.",
                },
                "message": STRING,
            },
            description="One problem of a request body.",
        ),
        "FactsAccepted": _obj(
            {
                "accepted": {**SEQ, "description": "How many facts were applied."},
                "seqs": {
                    "type": "array",
                    "minItems": 1,
                    "items": SEQ,
                    "description": "The sequence numbers of the facts, in the order posted.",
                },
                "request_id": {
                    **NULLABLE_STRING,
                    "description": "The id of the request that applied the facts (the first "
                    "one, for a repeat answered from its Idempotency-Key).",
                },
            },
            description="The facts are committed (fsynced), with the decisions and actions "
            "they caused.",
        ),
        "Fact": _obj(
            {
                "project": _ref("fact/properties/project"),
                "kind": _ref("fact/properties/kind"),
                "id": _ref("fact/properties/id"),
                "data": {**ANY_OBJECT, "description": "The fact's data as last posted."},
                "seq": {**SEQ, "description": "The sequence number of the last update."},
                "updated_at": timestamp,
            },
            description="The current state of one fact.",
        ),
        "FactList": _obj({"facts": {"type": "array", "items": _ref("Fact")}}),
        "Problem": _obj(
            {
                "file": STRING,
                "line": {**COUNT, "description": "1-based; 0 when unknown."},
                "column": {**COUNT, "description": "1-based; 0 when unknown."},
                "message": STRING,
                "path": {"type": "string", "description": "Key path in the file, or empty."},
                "rule_id": NULLABLE_STRING,
            },
            description="A problem found in a rule file or in gatekeeper.yaml.",
        ),
        "RulesetInfo": _obj(
            {
                "version": {**SHA256_HEX, "description": "Content hash of the rule files."},
                "git_commit": {
                    "anyOf": [
                        {"type": "string", "pattern": "^[0-9a-f]{40}([0-9a-f]{24})?$"},
                        {"type": "null"},
                    ]
                },
                "rules": COUNT,
                "files": STRING_LIST,
            },
            description="The active ruleset.",
        ),
        "ReloadStatus": _obj(
            {
                "ok": {"type": "boolean", "description": "Whether the last reload succeeded."},
                "problems": {"type": "array", "items": _ref("Problem")},
                "attempted_at": nullable_timestamp,
                "active_since": nullable_timestamp,
                "source": {
                    "type": "string",
                    "description": "Where the active ruleset came from: the rules directory, "
                    "or the database (the last good ruleset).",
                },
            },
            description="The outcome of the last reload; while it failed the last good "
            "ruleset stays active.",
        ),
        "RuleActionSummary": {
            "type": "object",
            "description": "An action of the rule: its kind and target.",
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
            "properties": {
                kind: _obj({"target": STRING}) for kind in ("release", "notify", "pipeline")
            },
        },
        "RuleSummary": _obj(_rule_summary_properties(nullable_timestamp)),
        "Rule": _obj(
            {
                **_rule_summary_properties(nullable_timestamp),
                "source": {**rule_source, "description": "The rule as written in its file."},
                "explanation": _ref("Explanation"),
                "ruleset_version": {"anyOf": [SHA256_HEX, {"type": "null"}]},
                "recent_decisions": {
                    "type": "array",
                    "items": _ref("Decision"),
                    "description": "The rule's latest decisions, newest first.",
                },
            },
            description="One rule, its state and its current explanation.",
        ),
        "RuleList": _obj(
            {
                "ruleset": _nullable(_ref("RulesetInfo")),
                "reload": _ref("ReloadStatus"),
                "rules": {"type": "array", "items": _ref("RuleSummary")},
            }
        ),
        "Clause": _obj(
            {
                "text": STRING,
                "value": {
                    "description": "The sub-condition's value (any JSON); null when missing."
                },
                "missing": {**STRING_LIST, "minItems": 1},
                "error": STRING,
            },
            optional=("missing", "error"),
            description="A sub-condition of `when` and its value.",
        ),
        "Evaluation": _obj(
            {
                "value": {"type": "boolean"},
                "clauses": {"type": "array", "items": _ref("Clause")},
                "missing": {
                    **STRING_LIST,
                    "description": "Dotted names of missing facts or fields.",
                },
                "error": NULLABLE_STRING,
                "seen": {
                    **ANY_OBJECT,
                    "description": "The facts the evaluation read (`kind.id` to data, null "
                    "for a fact that does not exist).",
                },
            },
            description="The value of a `when` condition and of its sub-conditions.",
        ),
        "ApprovalStatus": _obj(
            {
                "required": COUNT,
                "from": STRING_LIST,
                "approved_by": STRING_LIST,
                "rejected_by": STRING_LIST,
                "satisfied": {"type": "boolean"},
            },
            optional=("from",),
            description="How the rule's sign-off stands.",
        ),
        "Explanation": _obj(
            {
                "gate_open": {"type": "boolean"},
                "condition": _ref("Evaluation"),
                "approvals": _ref("ApprovalStatus"),
                "paused": {"type": "boolean"},
                "fired_count": COUNT,
                "rearms": {
                    **COUNT,
                    "description": "A once rule may fire while fired_count <= rearms.",
                },
                "last_fired_at": nullable_timestamp,
                "evaluated_at": timestamp,
            },
            description="Why the rule's gate is open or closed right now.",
        ),
        "Decision": _obj(
            {
                "id": SEQ,
                "decided_at": timestamp,
                "rule_id": STRING,
                "rule_hash": SHA256_HEX,
                "ruleset_version": SHA256_HEX,
                "git_commit": NULLABLE_STRING,
                "trigger": {"enum": ["fact", "reload", "time", "approval", "admin"]},
                "fact_seq": {"type": ["integer", "null"], "minimum": 1},
                "outcome": {
                    "enum": [
                        "fired",
                        "blocked",
                        "paused",
                        "not_met",
                        "already_fired",
                        "still_met",
                        "awaiting_approvals",
                    ]
                },
                "gate_open": {"type": "boolean"},
                "evaluation": _ref("Evaluation"),
                "approvals": _nullable(_ref("ApprovalStatus")),
                "firing_id": {
                    **NULLABLE_STRING,
                    "description": "`<rule id>#<n>` when the rule fired (or was blocked).",
                },
                "request_id": NULLABLE_STRING,
                "reason": {**NULLABLE_STRING, "description": "Why a firing was blocked."},
            },
            description="A recorded decision of the engine about one rule (the audit log).",
        ),
        "ReleasePayload": _obj(
            {
                "project": STRING,
                "escrow": STRING,
                "amount": decimal,
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "payee": STRING,
                "release_id": {**STRING, "description": "The action id, sent as Idempotency-Key."},
            }
        ),
        "NotifyPayload": _obj(
            {
                "project": STRING,
                "message": STRING,
                "alert": {"const": "release_blocked"},
                "reason": STRING,
            },
            optional=("alert", "reason"),
            description="A rendered notification, or an alert that a release was blocked.",
        ),
        "PipelinePayload": _obj(
            {
                "project": STRING,
                "ref": STRING,
                "inputs": {"type": "object", "additionalProperties": STRING},
            }
        ),
        "ActionFields": _action_fields(timestamp, nullable_timestamp),
        "Action": {
            "description": "An action in the outbox (or a dead letter).",
            "allOf": [_ref("ActionFields")],
            "properties": {"attempts": {**COUNT, "description": "Delivery attempts made so far."}},
            "required": ["attempts"],
            "unevaluatedProperties": False,
        },
        "ActionWithAttempts": {
            "description": "An action with its number of attempts and every delivery "
            "attempt, oldest first.",
            "allOf": [_ref("ActionFields")],
            "properties": {
                "attempts": {**COUNT, "description": "Delivery attempts made so far."},
                "delivery_attempts": {"type": "array", "items": _ref("Attempt")},
            },
            "required": ["attempts", "delivery_attempts"],
            "unevaluatedProperties": False,
        },
        "ActionList": _obj({"actions": {"type": "array", "items": _ref("Action")}}),
        "Attempt": _obj(
            {
                "action_id": STRING,
                "attempt": SEQ,
                "started_at": timestamp,
                "latency_ms": {"type": "number", "minimum": 0},
                "status_code": {"type": ["integer", "null"]},
                "error": NULLABLE_STRING,
            },
            description="One delivery attempt: HTTP status, or the error.",
        ),
        "Escrow": _obj(
            {
                "escrow": STRING,
                "currency": {
                    "anyOf": [{"type": "string", "pattern": "^[A-Z]{3}$"}, {"type": "null"}]
                },
                "limit": _nullable(decimal),
                "released": {**decimal, "description": "Releases delivered."},
                "pending": {**decimal, "description": "Releases queued, not yet delivered."},
                "unconfirmed": {
                    **decimal,
                    "description": "Releases dead-lettered: counted as possibly paid.",
                },
                "remaining": _nullable(decimal),
            },
            description="One escrow account; currency, limit and remaining are null for an "
            "escrow no longer in gatekeeper.yaml.",
        ),
        "EscrowList": _obj({"escrows": {"type": "array", "items": _ref("Escrow")}}),
        "Health": _obj(
            {
                "status": {
                    "enum": ["ok", "degraded"],
                    "description": "`degraded` while the database cannot take writes.",
                },
                "version": {"type": "string", "description": "gatekeeper's version."},
                "ruleset": {"anyOf": [SHA256_HEX, {"type": "null"}]},
                "ruleset_ok": {
                    "type": "boolean",
                    "description": "Whether the last reload succeeded.",
                },
                "store": _nullable(
                    _obj(
                        {
                            "condition": {
                                "enum": [
                                    "locked",
                                    "disk_full",
                                    "io_error",
                                    "read_only",
                                    "damaged",
                                    "unavailable",
                                ]
                            },
                            "since": {"type": "string", "format": "date-time"},
                            "message": {"type": "string"},
                        },
                        description="Why the database cannot take writes (null: it can); "
                        "cleared by the next write that succeeds.",
                    )
                ),
            }
        ),
        "RetryRequest": {
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "Recorded in the audit."}},
            "description": "Why the dead letter is requeued (optional; other keys are ignored).",
        },
        "ApprovalRequest": {
            "type": "object",
            "description": "An approver's decision; the approver is the token's subject.",
            "properties": {
                "rule": {"type": "string", "minLength": 1, "description": "The rule id."},
                "decision": {"enum": ["approve", "reject", "withdraw"]},
                "comment": {"type": ["string", "null"], "maxLength": 2000},
            },
            "required": ["rule", "decision"],
            "additionalProperties": False,
        },
        "ApprovalAccepted": _obj(
            {
                "seq": SEQ,
                "request_id": STRING,
                "rule": STRING,
                "approver": STRING,
                "decision": {"enum": ["approve", "reject", "withdraw"]},
                "approvals": _ref("ApprovalStatus"),
            },
            description="The approval is committed; how the rule's sign-off now stands.",
        ),
        "AdminActRequest": {
            "type": "object",
            "description": "Why (required: every admin act is audited with who and why).",
            "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000}},
            "required": ["reason"],
        },
        "Snapshot": _obj(
            {
                "facts": {"type": "array", "items": _ref("Fact")},
                "rule_states": {
                    "type": "array",
                    "items": _obj(
                        {
                            "rule_id": STRING,
                            "fired_count": COUNT,
                            "gate_open": {"type": ["boolean", "null"]},
                            "rearms": COUNT,
                            "paused": {"type": "boolean"},
                            "last_fired_at": nullable_timestamp,
                        }
                    ),
                },
                "approvals": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": {"enum": ["approve", "reject"]},
                    },
                },
                "ruleset": _obj(
                    {
                        "version": {"anyOf": [SHA256_HEX, {"type": "null"}]},
                        "rules": {"type": "object", "additionalProperties": SHA256_HEX},
                    }
                ),
                "escrows": {"type": "array", "items": _ref("Escrow")},
            },
            description="What `gatekeeper export` writes and `gatekeeper plan` reads.",
        ),
        "AuditEntry": _obj(
            {
                "kind": {"enum": ["decision", "admin_act", "approval"]},
                "id": SEQ,
                "at": timestamp,
                "rule_id": NULLABLE_STRING,
                "project": NULLABLE_STRING,
                "what": {
                    **NULLABLE_STRING,
                    "description": "A decision's outcome, the admin act, or the approval's "
                    "decision.",
                },
                "actor": {**NULLABLE_STRING, "description": "Who acted or approved."},
                "reason": {**NULLABLE_STRING, "description": "Why (a comment, a reason)."},
                "firing_id": NULLABLE_STRING,
                "fact_seq": {"type": ["integer", "null"]},
                "request_id": NULLABLE_STRING,
                "trigger": NULLABLE_STRING,
            },
            description="One entry of the audit log.",
        ),
        "AuditPage": _obj(
            {
                "entries": {"type": "array", "items": _ref("AuditEntry")},
                "next_cursor": {
                    **NULLABLE_STRING,
                    "description": "Pass as `cursor` for the next page; null on the last.",
                },
            }
        ),
        "RulesetVersion": _obj(
            {
                "version": SHA256_HEX,
                "git_commit": NULLABLE_STRING,
                "first_activated_at": timestamp,
                "last_activated_at": timestamp,
                "files": STRING_LIST,
            },
            description="A ruleset version that went live (content-addressed).",
        ),
        "RulesetVersionList": _obj(
            {"rulesets": {"type": "array", "items": _ref("RulesetVersion")}}
        ),
        "RulesetText": _obj(
            {
                "version": SHA256_HEX,
                "git_commit": NULLABLE_STRING,
                "first_activated_at": timestamp,
                "last_activated_at": timestamp,
                "files": {"type": "object", "additionalProperties": STRING},
            },
            description="A stored ruleset version: each file's exact text.",
        ),
        "ReleaseStory": _obj(
            {
                "release": _obj(
                    {
                        "release_id": STRING,
                        "escrow": STRING,
                        "amount": decimal,
                        "currency": STRING,
                        "payee": STRING,
                        "rule_id": STRING,
                        "firing_id": STRING,
                        "recorded_at": timestamp,
                    }
                ),
                "decision": _nullable(_ref("Decision")),
                "triggered_by": {
                    "type": ["object", "null"],
                    "description": "The fact log entry whose arrival made the decision.",
                },
                "rule": {
                    "type": ["object", "null"],
                    "description": "The rule as it stood in the ruleset version in force: "
                    "file, line, content hash, source and the file's exact text.",
                },
                "action": _nullable(_ref("Action")),
                "delivery_attempts": {"type": "array", "items": _ref("Attempt")},
            },
            description="Everything about one release, from its release id.",
        ),
        "HookIgnored": _obj(
            {"accepted": {"const": 0}, "ignored": {"const": True}},
            description="The event was verified but no mapping fits it: nothing applied.",
        ),
        "OpenApiDocument": {
            "type": "object",
            "required": ["openapi", "info", "paths"],
            "description": "This document.",
        },
    }


def _rule_summary_properties(nullable_timestamp: JsonObject) -> JsonObject:
    return {
        "id": STRING,
        "project": STRING,
        "description": STRING,
        "when": STRING,
        "fire": {"enum": ["once", "each_time"]},
        "file": {"type": "string", "description": "Relative to the rules directory."},
        "line": {**SEQ, "description": "1-based line where the rule starts."},
        "content_hash": SHA256_HEX,
        "actions": {"type": "array", "items": _ref("RuleActionSummary")},
        "fired_count": COUNT,
        "last_fired_at": nullable_timestamp,
        "gate_open": {"type": ["boolean", "null"], "description": "null: never evaluated."},
    }


def _action_fields(timestamp: JsonObject, nullable_timestamp: JsonObject) -> JsonObject:
    """The fields of an action but ``attempts`` (a count in ``Action``, the list of attempts
    in ``ActionWithAttempts``), left open: those two close it with ``unevaluatedProperties``.
    The payload's shape follows ``kind``."""
    schema = _obj(
        {
            "action_id": {**STRING, "description": "Stable across retries (the webhook-id)."},
            "rule_id": STRING,
            "firing_id": STRING,
            "kind": {"enum": ["release", "notify", "pipeline"]},
            "target": STRING,
            "payload": {"type": "object", "description": "What is sent; shaped by `kind`."},
            "status": {"enum": ["pending", "delivered", "dead"]},
            "created_at": timestamp,
            "next_attempt_at": timestamp,
            "last_error": NULLABLE_STRING,
            "delivered_at": nullable_timestamp,
            "decision_id": SEQ,
            "requeued_at": nullable_timestamp,
            "dead_reason": {
                "enum": ["attempts_exhausted", "too_old", "refused", "not_retryable", None],
                "description": "Why a dead letter died: its attempts ran out, it grew older "
                "than max_age_s, the receiver refused it (4xx), or no retry could help. null "
                "unless status is dead (and for dead letters recorded before this field).",
            },
            "dead_status": {
                "type": ["integer", "null"],
                "description": "The HTTP status of the attempt that made it a dead letter "
                "(null when no answer came, and unless status is dead).",
            },
        }
    )
    del schema["additionalProperties"]
    schema["allOf"] = [
        {
            "if": {"properties": {"kind": {"const": kind}}},
            "then": {"properties": {"payload": _ref(payload)}},
        }
        for kind, payload in (
            ("release", "ReleasePayload"),
            ("notify", "NotifyPayload"),
            ("pipeline", "PipelinePayload"),
        )
    ]
    return schema


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
            "the same key with another body is refused (422). Printable ASCII without spaces.",
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


def _errors(*statuses: int, secured: bool = True) -> JsonObject:
    """Error responses: ``statuses``, 500, and for a secured operation 401 and 403."""
    extra = (401, 403) if secured else ()
    return {
        str(status): {"$ref": f"#/components/responses/{ERROR_STATUSES[status][0]}"}
        for status in sorted({*statuses, *extra, 500})
    }


def _limit(default: int) -> JsonObject:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"How many to list, newest first (1 to {MAX_LIST_LIMIT}).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": default},
    }


def _query(name: str, description: str, **schema: Any) -> JsonObject:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _path_param(name: str, description: str) -> JsonObject:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


def _paths() -> JsonObject:
    rule_id = _path_param(
        "rule_id",
        "A rule id, e.g. `tower-a/design-release`. Ids contain `/`: send it as is or "
        "percent-encoded (`%2F`); either way the rest of the path is the id.",
    )
    action_id = _path_param("action_id", "An action id (`act_<hex>`).")
    return {
        "/v1/facts": {
            "post": {
                "operationId": "postFacts",
                "tags": ["facts"],
                "summary": "Post one fact, or a batch applied atomically",
                "description": "Answers after the facts, the decisions they caused and the "
                "actions those queued are committed (fsynced) in one transaction.",
                "parameters": [
                    {"$ref": "#/components/parameters/IdempotencyKey"},
                    {"$ref": "#/components/parameters/RequestId"},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("FactsRequest")}},
                },
                "responses": {
                    "200": _json(
                        _ref("FactsAccepted"),
                        "The facts are committed.",
                        headers={
                            "X-Request-Id": {
                                "description": "The request's id (the first request's, for "
                                "a replay).",
                                "required": True,
                                "schema": {"type": "string", "minLength": 1},
                            },
                            "Idempotent-Replayed": {
                                "description": "Present on a repeat answered from its "
                                "Idempotency-Key: nothing was applied.",
                                "required": False,
                                "schema": {"const": "true"},
                            },
                        },
                    ),
                    **_errors(400, 413, 415, 422, 503),
                },
            },
            "get": {
                "operationId": "listFacts",
                "tags": ["facts"],
                "summary": "The current facts with their sequence numbers",
                "parameters": [
                    {
                        "name": "project",
                        "in": "query",
                        "required": False,
                        "description": "Only this project's facts.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": _json(_ref("FactList"), "The facts."), **_errors()},
            },
        },
        "/v1/rules": {
            "get": {
                "operationId": "listRules",
                "tags": ["rules"],
                "summary": "The active ruleset, the last reload's outcome, every rule's state",
                "responses": {
                    "200": _json(_ref("RuleList"), "The ruleset and its rules."),
                    **_errors(),
                },
            }
        },
        "/v1/rules/{rule_id}": {
            "get": {
                "operationId": "getRule",
                "tags": ["rules"],
                "summary": "One rule: source, state, explanation, recent decisions",
                "parameters": [rule_id, _limit(20)],
                "responses": {
                    "200": _json(_ref("Rule"), "The rule."),
                    **_errors(400, 404),
                },
            }
        },
        "/v1/actions": {
            "get": {
                "operationId": "listActions",
                "tags": ["actions"],
                "summary": "The outbox and dead letters, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "description": "Only actions with this status.",
                        "schema": {"enum": ["pending", "delivered", "dead"]},
                    },
                    _limit(100),
                ],
                "responses": {
                    "200": _json(_ref("ActionList"), "The actions."),
                    **_errors(400),
                },
            }
        },
        "/v1/actions/{action_id}": {
            "get": {
                "operationId": "getAction",
                "tags": ["actions"],
                "summary": "One action and its delivery attempts",
                "parameters": [action_id],
                "responses": {
                    "200": _json(_ref("ActionWithAttempts"), "The action."),
                    **_errors(404),
                },
            }
        },
        "/v1/actions/{action_id}/retry": {
            "post": {
                "operationId": "retryAction",
                "tags": ["actions"],
                "summary": "Requeue a dead letter (an audited admin act)",
                "description": "The action is due at once, with a fresh allowance of "
                "attempts and age. Only a dead action can be requeued (409 otherwise).",
                "parameters": [action_id],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("RetryRequest")}},
                },
                "responses": {
                    "200": _json(_ref("Action"), "The requeued action."),
                    **_errors(400, 404, 409, 413, 415),
                },
            }
        },
        "/v1/escrows": {
            "get": {
                "operationId": "listEscrows",
                "tags": ["escrows"],
                "summary": "Each escrow: limit, released, pending, unconfirmed, remaining",
                "responses": {"200": _json(_ref("EscrowList"), "The escrows."), **_errors()},
            }
        },
        "/v1/approvals": {
            "post": {
                "operationId": "postApproval",
                "tags": ["rules"],
                "summary": "Approve, reject or withdraw on a rule that takes approvals",
                "description": "The approver is the token's subject and must be in the "
                "rule's `from` list (403 otherwise); a standing reject blocks the rule until "
                "withdrawn. The approval is appended to the fact log and re-evaluates the rule.",
                "parameters": [
                    {"$ref": "#/components/parameters/IdempotencyKey"},
                    {"$ref": "#/components/parameters/RequestId"},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ApprovalRequest")}},
                },
                "responses": {
                    "200": _json(_ref("ApprovalAccepted"), "The approval is committed."),
                    **_errors(400, 404, 413, 415, 422, 503),
                },
            }
        },
        "/v1/rules/{rule_id}/{act}": {
            "post": {
                "operationId": "actOnRule",
                "tags": ["rules"],
                "summary": "Pause, resume or re-arm a rule (an audited admin act)",
                "description": "A paused rule is evaluated and explained but does not fire. "
                "Re-arming a once rule that fired lets it fire once more. The rule is "
                "re-evaluated at once: a resumed or re-armed rule whose gate is open fires.",
                "parameters": [
                    rule_id,
                    {
                        "name": "act",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["pause", "resume", "rearm"]},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AdminActRequest")}},
                },
                "responses": {
                    "200": _json(_ref("Rule"), "The rule after the act."),
                    # 405: an act other than pause/resume/rearm makes the path a rule id,
                    # which only GET serves
                    **_errors(400, 404, 405, 409, 413, 415),
                },
            }
        },
        "/v1/hooks/{source}": {
            "post": {
                "operationId": "postHook",
                "tags": ["facts"],
                "summary": "An event from a CI system, mapped to facts",
                "description": "Verified with the source's own secret (GitHub: "
                "`X-Hub-Signature-256`; GitLab: `X-Gitlab-Token`), not a bearer token, and "
                "mapped to facts by the `hooks` section of gatekeeper.yaml. The delivery id "
                "(`X-GitHub-Delivery`, `X-Gitlab-Event-UUID`) makes redeliveries idempotent.",
                "security": [],
                "parameters": [_path_param("source", "The hook source name in the config.")],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": ANY_OBJECT},
                        "application/x-www-form-urlencoded": {"schema": ANY_OBJECT},
                    },
                },
                "responses": {
                    "200": _json(_ref("FactsAccepted"), "The event's facts are committed."),
                    "202": _json(_ref("HookIgnored"), "No mapping fits: ignored."),
                    **_errors(400, 401, 404, 413, 422, 503, secured=False),
                },
            }
        },
        "/v1/audit": {
            "get": {
                "operationId": "listAudit",
                "tags": ["rules"],
                "summary": "The audit log: decisions, admin acts, approvals (newest first)",
                "parameters": [
                    _query("project", "Only entries of this project."),
                    _query("rule", "Only entries of this rule id."),
                    _query(
                        "kind",
                        "Comma-separated kinds of entry: decision, admin_act, approval.",
                        pattern="^(decision|admin_act|approval)(,(decision|admin_act|approval))*$",
                    ),
                    _query("outcome", "Only decisions with this outcome (e.g. fired)."),
                    _query("since", "From this time on (RFC 3339, inclusive)."),
                    _query("until", "Before this time (RFC 3339, exclusive)."),
                    _query("cursor", "The next_cursor of the previous page."),
                    _limit(100),
                ],
                "responses": {"200": _json(_ref("AuditPage"), "A page."), **_errors(400)},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["meta"],
                "summary": "Prometheus metrics (text exposition format 0.0.4)",
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/v1/export": {
            "get": {
                "operationId": "export",
                "tags": ["facts"],
                "summary": "A snapshot of the state, as `gatekeeper plan --snapshot` reads it",
                "responses": {"200": _json(_ref("Snapshot"), "The snapshot."), **_errors()},
            }
        },
        "/v1/rulesets": {
            "get": {
                "operationId": "listRulesets",
                "tags": ["rules"],
                "summary": "Every ruleset version that went live, most recent first",
                "parameters": [_limit(100)],
                "responses": {
                    "200": _json(_ref("RulesetVersionList"), "The versions."),
                    **_errors(400),
                },
            }
        },
        "/v1/rulesets/{version}": {
            "get": {
                "operationId": "getRuleset",
                "tags": ["rules"],
                "summary": "One stored ruleset version with the exact text of its files",
                "parameters": [_path_param("version", "The ruleset version (SHA-256 hex).")],
                "responses": {
                    "200": _json(_ref("RulesetText"), "The version."),
                    **_errors(404),
                },
            }
        },
        "/v1/releases/{release_id}": {
            "get": {
                "operationId": "getRelease",
                "tags": ["escrows"],
                "summary": "The whole story of a release, from its release id",
                "parameters": [_path_param("release_id", "A release id (`act_<hex>`).")],
                "responses": {
                    "200": _json(_ref("ReleaseStory"), "The story."),
                    **_errors(404),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "tags": ["meta"],
                "summary": "Liveness, ruleset version, whether the last reload succeeded",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "Alive."), **_errors(secured=False)},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["meta"],
                "summary": "This description of the API (OpenAPI 3.1)",
                "responses": {
                    "200": _json(_ref("OpenApiDocument"), "The document."),
                    **_errors(),
                },
            }
        },
    }
