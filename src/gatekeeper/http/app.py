"""The HTTP API (aiohttp): facts in; rules, facts and the outbox out.

Errors are always JSON, ``{"error": {"status": 400, "message": ..., "problems": [...]}}``,
never a traceback, and a request that is refused changes nothing:

- malformed JSON: 400; a body of the wrong shape: 400 listing each problem with its JSON path
  (``$.facts[1].kind``); a content type other than ``application/json``: 415; a body over
  ``max_body_bytes`` (default 1 MiB): 413; an unknown route: 404; a wrong method: 405.

``POST /v1/facts`` answers only after the facts, the decisions they caused and the actions
those queued are committed (fsynced), with the facts' sequence numbers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal, cast

import jsonschema
from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute

from gatekeeper import __version__
from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.config import Token
from gatekeeper.engine.model import AdminAct, ApprovalInput, FactInput, IdempotencyRecord
from gatekeeper.http.auth import authenticate, bearer_token
from gatekeeper.http.openapi import build_openapi
from gatekeeper.jsonwire import json_path, loads_strict
from gatekeeper.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gatekeeper.runtime.daemon import (
    Daemon,
    IdempotencyConflict,
    NotAnApprover,
    ShuttingDown,
    UnknownRule,
)
from gatekeeper.runtime.hooks import RESERVED_KINDS, HookRejected
from gatekeeper.runtime.hooks import handle as handle_hook
from gatekeeper.schemas import load_schema
from gatekeeper.store.errors import Conflict, StoreUnavailable
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import AUDIT_KINDS, ActionStatus, AuditCursor, AuditKind

log = logging.getLogger("gatekeeper.http.app")

DAEMON_KEY = web.AppKey("daemon", Daemon)
PRINCIPAL_KEY: web.RequestKey[Token | None] = web.RequestKey("principal", Token | None)  # type: ignore[arg-type]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACTION_STATUSES: tuple[ActionStatus, ...] = ("pending", "delivered", "dead")
MAX_LIST_LIMIT = 1000
MAX_IDEMPOTENCY_KEY_CHARS = 255


class ApiError(web.HTTPException):
    """An error answered as JSON: ``status``, a message and optional located problems."""

    def __init__(
        self,
        status: int,
        message: str,
        problems: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status_code = status
        super().__init__(
            text=json.dumps(_error_body(status, message, problems)),
            content_type="application/json",
            headers=headers,
        )


def _error_body(status: int, message: str, problems: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "message": message}
    if problems:
        error["problems"] = problems
    return {"error": error}


def requires(scope: str | None) -> Callable[[Handler], Handler]:
    """Mark a handler with the token scope it needs (None: open, e.g. ``/healthz``)."""

    def mark(handler: Handler) -> Handler:
        handler.required_scope = scope  # type: ignore[attr-defined]
        return handler

    return mark


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check ``Authorization: Bearer <token>`` against the configured token hashes.

    With no tokens configured (the daemon then listens on loopback only) every request is
    let through with no principal. Otherwise: no or an unknown token is 401, a token
    without the route's scope is 403. Unknown routes fall through to 404/405.
    """
    route = request.match_info.route
    if isinstance(route, SystemRoute):  # no such route or method: 404/405 as usual
        return await handler(request)
    # a handler that forgot to say what it needs requires the most: admin
    scope = getattr(route.handler, "required_scope", "admin")
    tokens = _daemon(request).tokens()
    request[PRINCIPAL_KEY] = None
    if not tokens or scope is None:
        return await handler(request)
    principal = authenticate(tokens, bearer_token(request.headers.get("Authorization")))
    if principal is None:
        raise ApiError(
            401,
            "missing or unknown API token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="gatekeeper"'},
        )
    if scope not in principal.scopes:
        raise ApiError(403, f"token of {principal.subject!r} lacks the {scope!r} scope")
    request[PRINCIPAL_KEY] = principal
    return await handler(request)


def principal(request: web.Request) -> Token | None:
    """The authenticated token of ``request`` (None when no tokens are configured)."""
    return request.get(PRINCIPAL_KEY)


def actor(request: web.Request) -> str:
    """Who acts, for the audit log: the token's subject, or ``local`` without tokens."""
    token = principal(request)
    return token.subject if token else "local"


def check_project(request: web.Request, project: str) -> None:
    """403 unless the request's token may act on ``project``."""
    token = principal(request)
    if token is not None and not token.allows_project(project):
        raise ApiError(403, f"token of {token.subject!r} may not act on project {project!r}")


def visible(request: web.Request, project: str | None) -> bool:
    """Whether the request's token may see things of ``project``."""
    token = principal(request)
    return token is None or project is None or token.allows_project(project)


def visible_projects(request: web.Request) -> frozenset[str] | None:
    """The projects the request's token may see, for store queries: None for all."""
    token = principal(request)
    if token is None or "*" in token.projects:
        return None
    return frozenset(token.projects)


REJECTION_REASONS = {400: "malformed", 413: "too_large", 415: "unsupported_media_type"}


def _count_rejected_fact(request: web.Request, status: int) -> None:
    """Count a refused ``POST /v1/facts`` in gatekeeper_facts_rejected_total."""
    if request.method != "POST" or request.path != "/v1/facts":
        return
    reason = REJECTION_REASONS.get(status, "invalid" if status == 422 else None)
    if reason is not None:
        _daemon(request).fact_rejected(reason)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON answer; an unexpected one is logged, never shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        _count_rejected_fact(request, exc.status)
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: "no such resource",
            405: f"method {request.method} is not allowed here",
            413: "request body too large",
        }.get(exc.status, exc.reason)
        _count_rejected_fact(request, exc.status)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(
            _error_body(exc.status, message), status=exc.status, headers=headers
        )
    except StoreUnavailable as exc:  # disk full, locked, ...: logged once per interval
        retry_after = _daemon(request).store_unavailable(exc)
        message = f"the database is unavailable ({exc.condition}); retry in {retry_after} s"
        return web.json_response(
            _error_body(503, message), status=503, headers={"Retry-After": str(retry_after)}
        )
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response(_error_body(500, "internal error"), status=500)


def _fact_validators() -> tuple[jsonschema.Draft202012Validator, jsonschema.Draft202012Validator]:
    schema = load_schema("facts-request.schema.json")
    defs = schema["$defs"]
    single = {"$defs": defs, "$ref": "#/$defs/fact"}
    batch = {"$defs": defs, **schema["oneOf"][1]}
    return jsonschema.Draft202012Validator(single), jsonschema.Draft202012Validator(batch)


_SINGLE_FACT, _FACT_BATCH = _fact_validators()


class FactShape:
    """A fast check of ``POST /v1/facts`` bodies against facts-request.schema.json, built
    from the schema itself: a fact is an object with exactly the ``fact`` properties, its
    strings matching their ``pattern`` (``re.search``, as jsonschema does) and its objects
    objects; a batch is ``{"facts": [fact, ...]}`` within ``minItems``..``maxItems``.

    About 1 µs where the jsonschema validator takes about 55 µs. Only a yes is trusted:
    ``parse_facts`` sends anything else to the jsonschema validator, which decides and
    words the errors. ``from_schema`` returns None (no fast path) when the schema uses
    anything beyond those keywords, so a schema change can only make it slower, not laxer.
    """

    _FACT_KEYWORDS = frozenset({"type", "description", "properties", "required"})
    _PROPERTY_KEYWORDS = frozenset({"type", "description", "pattern"})

    def __init__(
        self,
        strings: dict[str, Callable[[str], Any]],
        objects: frozenset[str],
        min_items: int,
        max_items: int,
    ) -> None:
        self._strings = tuple(strings.items())
        self._objects = tuple(objects)
        self._keys = frozenset(strings) | objects
        self._min_items = min_items
        self._max_items = max_items

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> FactShape | None:
        """The check for ``schema`` (facts-request.schema.json), or None when the schema is
        not of the shape this class knows how to check exactly."""
        try:
            fact = schema["$defs"]["fact"]
            single, batch = schema["oneOf"]
            facts = batch["properties"]["facts"]
            expected_batch = {
                "type": "object",
                "properties": {"facts": facts},
                "required": ["facts"],
                "additionalProperties": False,
            }
            if (
                single != {"$ref": "#/$defs/fact"}
                or {k: v for k, v in batch.items() if k != "description"} != expected_batch
                or {k: v for k, v in facts.items() if k != "description"}
                != {
                    "type": "array",
                    "minItems": facts["minItems"],
                    "maxItems": facts["maxItems"],
                    "items": {"$ref": "#/$defs/fact"},
                }
                or fact.get("type") != "object"
                or fact.get("additionalProperties") is not False
                or set(fact) - cls._FACT_KEYWORDS - {"additionalProperties"}
                or set(fact["required"]) != set(fact["properties"])
            ):
                return None
            strings: dict[str, Callable[[str], Any]] = {}
            objects: set[str] = set()
            for name, prop in fact["properties"].items():
                if set(prop) - cls._PROPERTY_KEYWORDS:
                    return None
                if prop.get("type") == "string":
                    pattern = prop.get("pattern")
                    strings[name] = re.compile(pattern).search if pattern else _any_text
                elif prop.get("type") == "object" and "pattern" not in prop:
                    objects.add(name)
                else:
                    return None
            return cls(strings, frozenset(objects), int(facts["minItems"]), int(facts["maxItems"]))
        except (KeyError, TypeError, ValueError, re.error):
            return None

    def accepts(self, body: Any) -> bool:
        """True when ``body`` is certainly valid (False: ask the jsonschema validator)."""
        if type(body) is not dict:
            return False
        if len(body) == 1 and "facts" in body:
            items = body["facts"]
            if type(items) is not list or not self._min_items <= len(items) <= self._max_items:
                return False
            return all(self._accepts_fact(item) for item in items)
        return self._accepts_fact(body)

    def _accepts_fact(self, fact: Any) -> bool:
        if type(fact) is not dict or fact.keys() != self._keys:
            return False
        for name, matches in self._strings:
            value = fact[name]
            if type(value) is not str or not matches(value):
                return False
        return all(type(fact[name]) is dict for name in self._objects)


def _any_text(_text: str) -> bool:
    return True


_FACT_SHAPE = FactShape.from_schema(load_schema("facts-request.schema.json"))


def parse_facts(body: Any) -> list[FactInput]:
    """Validate a ``POST /v1/facts`` body; raise ``ApiError`` 400 listing every problem."""
    is_batch = isinstance(body, dict) and "facts" in body
    if _FACT_SHAPE is None or not _FACT_SHAPE.accepts(body):
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
    return [FactInput(f["project"], f["kind"], f["id"], f["data"]) for f in items]


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; 415 for another content type, 400 for malformed JSON."""
    if request.content_type != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {request.content_type!r}")
    raw = await request.read()
    try:
        return loads_strict(raw)
    except ValueError as exc:  # bad UTF-8, NaN, 1e400, a 5,000-digit number, deep nesting
        raise ApiError(400, f"malformed JSON: {exc}"[:300]) from None


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]


def _limit(request: web.Request, default: int = 100) -> int:
    text = request.query.get("limit", str(default))
    if not (len(text) <= 6 and text.isascii() and text.isdigit()) or not (
        1 <= int(text) <= MAX_LIST_LIMIT
    ):
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    return int(text)


def idempotency_record(request: web.Request, body: Any) -> IdempotencyRecord | None:
    """The request's ``Idempotency-Key`` with the SHA-256 of its canonical JSON body; 400 for
    a key that is empty, longer than 255 characters or not printable ASCII."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " < c <= "~" for c in key):
        raise ApiError(
            400,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII "
            "characters without spaces",
        )
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return IdempotencyRecord(key, hashlib.sha256(canonical.encode()).hexdigest())


@requires("facts:write")
async def post_facts(request: web.Request) -> web.Response:
    body = await read_json(request)
    batch = parse_facts(body)
    for project in sorted({fact.project for fact in batch}):
        check_project(request, project)
    idempotency = idempotency_record(request, body)
    request_id = _request_id(request)
    try:
        result = await _daemon(request).ingest(batch, request_id, idempotency)
    except IdempotencyConflict as exc:
        raise ApiError(422, str(exc)) from None
    except ShuttingDown:
        raise ApiError(503, "gatekeeper is shutting down; try again shortly") from None
    headers = {"X-Request-Id": result.request_id or request_id}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(
        {"accepted": len(result.seqs), "seqs": result.seqs, "request_id": result.request_id},
        headers=headers,
    )


@requires("read")
async def get_facts(request: web.Request) -> web.Response:
    project = request.query.get("project")
    facts = await _daemon(request).list_facts(project, projects=visible_projects(request))
    return web.json_response({"facts": [f.to_json() for f in facts]})


@requires("read")
async def get_rules(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    rules = [
        daemon.rule_view(rule, explain=False)
        for rule in daemon.rules()
        if visible(request, rule.project)
    ]
    return web.json_response(
        {
            "ruleset": daemon.ruleset_view(),
            "reload": daemon.reload_view(),
            "rules": rules,
        }
    )


@requires("read")
async def get_rule(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    rule_id = request.match_info["rule_id"]
    rule = daemon.rule(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset")
    check_project(request, rule.project)
    return web.json_response(await daemon.rule_detail(rule.id, _limit(request, 20)))


@requires("read")
async def get_actions(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in ACTION_STATUSES:
        raise ApiError(400, f"status must be one of: {', '.join(ACTION_STATUSES)}")
    entries = await _daemon(request).list_actions(
        status, _limit(request), projects=visible_projects(request)
    )
    return web.json_response({"actions": [e.to_json() for e in entries]})


@requires("read")
async def get_action(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    action_id = request.match_info["action_id"]
    entry = await daemon.get_action(action_id)
    if entry is None:
        raise ApiError(404, f"no action {action_id!r}")
    check_project(request, entry.payload.get("project", ""))
    attempts = await daemon.list_attempts(action_id)
    return web.json_response(
        {**entry.to_json(), "delivery_attempts": [a.to_json() for a in attempts]}
    )


@requires("admin")
async def post_action_retry(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    action_id = request.match_info["action_id"]
    reason = None
    if request.can_read_body:
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
            raise ApiError(400, 'the body must be {"reason": "..."} or empty')
        reason = body.get("reason")
    existing = await daemon.get_action(action_id)
    if existing is not None:
        check_project(request, existing.payload.get("project", ""))
    try:
        entry = await daemon.retry_action(action_id, actor=actor(request), reason=reason)
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    if entry is None:
        raise ApiError(404, f"no action {action_id!r}")
    return web.json_response(entry.to_json())


APPROVAL_DECISIONS = ("approve", "reject", "withdraw")
AdminActName = Literal["pause", "resume", "rearm"]
MAX_COMMENT_CHARS = 2000


@requires("approve")
async def post_approvals(request: web.Request) -> web.Response:
    """``{"rule": ID, "decision": "approve" | "reject" | "withdraw", "comment": ...}``; the
    approver is the token's subject, never a body field."""
    body = await read_json(request)
    problems = _approval_problems(body)
    if problems:
        raise ApiError(400, "the request body is not a valid approval", problems)
    token = principal(request)
    if token is None:
        raise ApiError(
            403, "approvals need API tokens: the approver is the token's subject (see tokens)"
        )
    daemon = _daemon(request)
    rule = daemon.rule(body["rule"])
    if rule is None:
        raise ApiError(404, f"no rule {body['rule']!r} in the active ruleset")
    check_project(request, rule.project)
    approval = ApprovalInput(
        body["rule"], rule.project, token.subject, body["decision"], body.get("comment")
    )
    request_id = _request_id(request)
    idempotency = idempotency_record(request, body)
    if idempotency is not None:  # each approver's keys are their own
        idempotency = replace(idempotency, key=f"approval:{token.subject}:{idempotency.key}")
    try:
        result = await daemon.approve(approval, request_id, idempotency)
    except IdempotencyConflict:
        raise ApiError(422, "Idempotency-Key was already used with a different approval") from None
    except NotAnApprover as exc:
        raise ApiError(403, str(exc)) from None
    except UnknownRule as exc:
        raise ApiError(404, f"no rule {exc} in the active ruleset") from None
    except ShuttingDown:
        raise ApiError(503, "gatekeeper is shutting down; try again shortly") from None
    view = daemon.rule_view(rule, explain=True)
    headers = {"X-Request-Id": result.request_id or request_id}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(
        {
            "seq": result.seqs[0],
            "request_id": result.request_id or request_id,
            "rule": rule.id,
            "approver": token.subject,
            "decision": approval.decision,
            "approvals": view["explanation"]["approvals"],
        },
        headers=headers,
    )


def _approval_problems(body: Any) -> list[dict[str, str]]:
    if not isinstance(body, dict):
        return [{"path": "$", "message": "must be an object"}]
    problems = []
    for key in sorted(set(body) - {"rule", "decision", "comment"}):
        problems.append({"path": f"$.{key}", "message": f"unknown key {key!r}"})
    if not isinstance(body.get("rule"), str) or not body.get("rule"):
        problems.append({"path": "$.rule", "message": "must be a rule id (a string)"})
    if body.get("decision") not in APPROVAL_DECISIONS:
        problems.append(
            {"path": "$.decision", "message": f"must be one of: {', '.join(APPROVAL_DECISIONS)}"}
        )
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        message = f"must be a string of at most {MAX_COMMENT_CHARS} characters"
        problems.append({"path": "$.comment", "message": message})
    return problems


@requires("admin")
async def post_rule_act(request: web.Request) -> web.Response:
    """``POST /v1/rules/{id}/pause|resume|rearm`` with ``{"reason": ...}`` (required)."""
    daemon = _daemon(request)
    rule_id, act = request.match_info["rule_id"], request.match_info["act"]
    body = await read_json(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_COMMENT_CHARS:
        raise ApiError(
            400,
            f'the body must be {{"reason": "..."}}: every admin act says why '
            f"(at most {MAX_COMMENT_CHARS} characters)",
        )
    rule = daemon.rule(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset")
    check_project(request, rule.project)
    try:
        admin_act = AdminAct(
            cast(AdminActName, act), rule_id, actor(request), reason.strip(), rule.project
        )
        await daemon.administer(admin_act)
    except UnknownRule:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset") from None
    except ValueError as exc:
        raise ApiError(409, str(exc)) from None
    return web.json_response(await daemon.rule_detail(rule_id, 20))


HOOK_DELIVERY_HEADERS = ("X-GitHub-Delivery", "X-Gitlab-Event-UUID")


@requires(None)  # authenticated by the source's own signature or token, not a bearer token
async def post_hook(request: web.Request) -> web.Response:
    """An event from a CI system (GitHub, GitLab), verified with the source's secret and
    mapped to facts by the ``hooks`` mapping of gatekeeper.yaml. An event no mapping fits
    is acknowledged (202) and ignored. The delivery id header is the idempotency key, so a
    redelivered event applies nothing twice."""
    daemon = _daemon(request)
    source = request.match_info["source"]
    configured = daemon.hook(source)
    if configured is None:
        raise ApiError(404, f"no hook source {source!r} is configured")
    hook, secret = configured
    body = await request.read()
    try:
        facts = handle_hook(hook, secret, request.headers, body)
    except HookRejected as exc:
        raise ApiError(exc.status, exc.message) from None
    if not facts:
        return web.json_response({"accepted": 0, "ignored": True}, status=202)
    delivery = next(
        (request.headers[h] for h in HOOK_DELIVERY_HEADERS if h in request.headers), None
    )
    idempotency = None
    if delivery and len(delivery) <= MAX_IDEMPOTENCY_KEY_CHARS - len(source) - 6:
        digest = hashlib.sha256(body).hexdigest()
        idempotency = IdempotencyRecord(f"hook:{source}:{delivery}", digest)
    request_id = _request_id(request)
    try:
        result = await daemon.ingest(facts, request_id, idempotency)
    except IdempotencyConflict as exc:
        raise ApiError(422, str(exc)) from None
    except ShuttingDown:
        raise ApiError(503, "gatekeeper is shutting down; try again shortly") from None
    return web.json_response(
        {"accepted": len(result.seqs), "seqs": result.seqs, "request_id": result.request_id}
    )


@requires("read")
async def get_audit(request: web.Request) -> web.Response:
    """The audit log, newest first: decisions, admin acts and approvals, filtered by
    ``project``, ``rule``, ``kind`` (comma-separated), ``outcome``, ``since``/``until``
    (RFC 3339), paged by ``cursor`` (the ``next_cursor`` of the previous page)."""
    query = request.query
    if "project" in query:
        check_project(request, query["project"])
    kinds = tuple(k for k in query.get("kind", ",".join(AUDIT_KINDS)).split(",") if k)
    if not kinds or any(k not in AUDIT_KINDS for k in kinds):
        raise ApiError(400, f"kind must be a comma-separated list of: {', '.join(AUDIT_KINDS)}")
    audit_query = AuditQuery(
        project=query.get("project"),
        rule_id=query.get("rule"),
        kinds=cast(tuple[AuditKind, ...], kinds),
        outcome=query.get("outcome"),
        since=_time_param(request, "since"),
        until=_time_param(request, "until"),
        after=_decode_cursor(query.get("cursor")),
        projects=visible_projects(request),
        limit=_limit(request),
    )
    entries = await _daemon(request).audit(audit_query)
    last = entries[-1] if len(entries) == audit_query.limit else None
    return web.json_response(
        {
            "entries": [e.to_json() for e in entries],
            "next_cursor": _encode_cursor(last.cursor) if last else None,
        }
    )


def _time_param(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise ApiError(
            400, f"{name} must be an RFC 3339 time with a zone, got {text[:40]!r}"
        ) from None


def _encode_cursor(cursor: AuditCursor) -> str:
    fields = [format_rfc3339(cursor.at), cursor.kind, cursor.id]
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


def _decode_cursor(text: str | None) -> AuditCursor | None:
    if text is None:
        return None
    try:
        at, kind, id_ = json.loads(base64.urlsafe_b64decode(text.encode()))
        if isinstance(at, str) and isinstance(kind, str) and isinstance(id_, int):
            return AuditCursor(parse_rfc3339(at), kind, id_)
    except (ValueError, TypeError, UnicodeError):
        pass
    raise ApiError(400, "cursor is not a next_cursor this API gave out")


@requires("read")
async def get_export(request: web.Request) -> web.Response:
    """A snapshot of the state, in the format ``gatekeeper plan --snapshot`` reads: current
    facts, every rule's firing state, standing approvals, the active ruleset's content
    hashes and the escrows. Limited to the token's projects."""
    return web.json_response(
        await _daemon(request).export(
            lambda project: visible(request, project), visible_projects(request)
        )
    )


@requires("read")
async def get_rulesets(request: web.Request) -> web.Response:
    """Every ruleset version that went live, most recent first (content-addressed)."""
    rulesets = await _daemon(request).list_rulesets(_limit(request))
    return web.json_response({"rulesets": [r.to_json() for r in rulesets]})


@requires("read")
async def get_ruleset(request: web.Request) -> web.Response:
    """One stored ruleset version with the exact text of its files."""
    version = request.match_info["version"]
    stored = await _daemon(request).stored_ruleset(version)
    if stored is None:
        raise ApiError(404, f"no ruleset version {version[:80]!r}")
    return web.json_response(stored.to_json())


@requires("read")
async def get_release(request: web.Request) -> web.Response:
    """The whole story of one release, from its release id: the ledger entry, the decision
    that made it (facts seen, sub-conditions, approvals counted), the fact that triggered it,
    the exact rule text of the ruleset version in force, and every delivery attempt."""
    release_id = request.match_info["release_id"]
    found = await _daemon(request).release(release_id)
    if found is None:
        raise ApiError(404, f"no release {release_id[:80]!r}")
    project, story = found
    check_project(request, project)
    return web.json_response(story)


@requires("read")
async def get_escrows(request: web.Request) -> web.Response:
    return web.json_response({"escrows": await _daemon(request).escrow_report()})


@requires("read")
async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (text format 0.0.4); a scraper sends a token with ``read``."""
    return await metrics_response(_daemon(request))


async def metrics_response(daemon: Daemon) -> web.Response:
    """The answer to ``GET /metrics``: refresh the scrape-time gauges, then render."""
    return web.Response(
        body=await daemon.metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


@requires(None)
async def get_healthz(request: web.Request) -> web.Response:
    health = _daemon(request).health()
    return web.json_response(  # 200 while the process serves: "degraded" says the rest
        {
            "status": "ok" if health.store is None else "degraded",
            "version": __version__,
            "ruleset": health.ruleset,
            "ruleset_ok": health.ruleset_ok,
            "store": health.store,
        }
    )


@requires("read")
async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API."""
    return web.json_response(build_openapi())


async def _daemon_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The daemon's background tasks live as long as the application (``cleanup_ctx``)."""
    async with app[DAEMON_KEY].running():
        yield


def create_app(daemon: Daemon) -> web.Application:
    """The aiohttp application serving ``daemon``. The application starts the daemon when
    it starts and stops it at cleanup, unless the caller started it (then the caller
    stops it)."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=daemon.max_body_bytes(),
    )
    app[DAEMON_KEY] = daemon
    app.cleanup_ctx.append(_daemon_lifecycle)
    app.router.add_post("/v1/facts", post_facts)
    app.router.add_get("/v1/facts", get_facts)
    app.router.add_get("/v1/rules", get_rules)
    app.router.add_post("/v1/rules/{rule_id:.+}/{act:pause|resume|rearm}", post_rule_act)
    app.router.add_get("/v1/rules/{rule_id:.+}", get_rule)
    app.router.add_post("/v1/approvals", post_approvals)
    app.router.add_post("/v1/hooks/{source}", post_hook)
    app.router.add_get("/v1/actions", get_actions)
    app.router.add_get("/v1/actions/{action_id}", get_action)
    app.router.add_post("/v1/actions/{action_id}/retry", post_action_retry)
    app.router.add_get("/v1/escrows", get_escrows)
    app.router.add_get("/v1/audit", get_audit)
    app.router.add_get("/v1/export", get_export)
    app.router.add_get("/v1/rulesets", get_rulesets)
    app.router.add_get("/v1/rulesets/{version}", get_ruleset)
    app.router.add_get("/v1/releases/{release_id}", get_release)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/openapi.json", get_openapi)
    return app
