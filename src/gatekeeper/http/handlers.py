"""The request handlers, by resource: facts, rules (with approvals and admin acts), actions
(with cancels), settlements, audit, rulesets and releases, escrows and their ledger, export,
and the meta routes.

Each takes the aiohttp request and answers a response model encoded by ``wire.respond``
(or raises ``wire.ApiError``). Scopes, paths and documentation live in ``routes.ROUTES``.
``POST /v1/facts`` answers only after the facts, the decisions they caused and the actions
those queued are committed (fsynced), with the facts' sequence numbers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, cast

import msgspec
from aiohttp import web
from msgspec import UNSET

from gatekeeper import __version__
from gatekeeper.clock import format_rfc3339
from gatekeeper.config import Token
from gatekeeper.engine.model import AdminAct, ApprovalInput, IdempotencyRecord, SignOff
from gatekeeper.http import models as m
from gatekeeper.http.context import (
    actor,
    check_project,
    check_token_project,
    daemon_of,
    principal,
    visible,
    visible_projects,
)
from gatekeeper.http.models import MAX_COMMENT_CHARS, convert
from gatekeeper.http.wire import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_LIST_LIMIT,
    ApiError,
    BodyShapeError,
    after_param,
    check_json_content_type,
    decode_cursor,
    decode_facts,
    decode_key,
    decode_model,
    encode_cursor,
    encode_key,
    fact_page_param,
    idempotency_record,
    item_param,
    limit_param,
    next_fact_cursor,
    next_ruleset_cursor,
    read_model,
    request_id_of,
    respond,
    ruleset_cursor_param,
    shape_problems,
    time_param,
)
from gatekeeper.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gatekeeper.metrics import OPENMETRICS_CONTENT_TYPE
from gatekeeper.rules.model import Rule
from gatekeeper.runtime.daemon import (
    AlreadySignedOff,
    Daemon,
    IdempotencyConflict,
    NotAnApprover,
    NotARelease,
    ShuttingDown,
    SignOffRefused,
    UnknownContentHash,
    UnknownRule,
)
from gatekeeper.runtime.hooks import HookRejected, delivery_id, verify_standard
from gatekeeper.runtime.hooks import handle as handle_hook
from gatekeeper.runtime.ingest import IngestResult, UnknownInstance
from gatekeeper.store.errors import AttemptInFlight, Conflict, KeyReused
from gatekeeper.store.queries import AuditQuery
from gatekeeper.store.records import ACTION_STATUSES, AUDIT_KINDS, AuditKind, OutboxEntry

APPROVAL_DECISIONS = ("approve", "reject", "withdraw")
AdminActName = Literal["pause", "resume", "rearm"]
SHUTTING_DOWN = "gatekeeper is shutting down; try again shortly"
MAX_ITEM_CHARS = 128
"""The longest item id (a fact id) an error message repeats."""
RESERVED_KEY_PREFIXES = ("hook:", "approval:")
"""Idempotency keys the daemon makes itself (``hook:<source>:<delivery id>``,
``approval:<subject>:<key>``): a facts client may not use them, or it could take a hook
delivery's or an approver's key (their request would be refused as a conflict)."""


# ---------------------------------------------------------------------------------------------
# Facts


async def post_facts(request: web.Request) -> web.Response:
    """``POST /v1/facts``: one fact or a batch, committed before the answer."""
    check_json_content_type(request)
    batch, body = decode_facts(await request.read())
    for project in sorted({fact.project for fact in batch}):
        check_project(request, project)
    idempotency = idempotency_record(request, body)
    if idempotency is not None and idempotency.key.startswith(RESERVED_KEY_PREFIXES):
        raise ApiError(
            400,
            "Idempotency-Key must not start with "
            + " or ".join(repr(p) for p in RESERVED_KEY_PREFIXES)
            + ": those keys are the daemon's own (hook deliveries, approvals)",
        )
    request_id = request_id_of(request)
    try:
        result = await daemon_of(request).ingest(batch, request_id, idempotency)
    except IdempotencyConflict as exc:
        raise ApiError(422, str(exc)) from None
    except ShuttingDown:
        raise ApiError(503, SHUTTING_DOWN) from None
    headers = {"X-Request-Id": result.request_id or request_id}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    accepted = m.FactsAccepted(len(result.seqs), result.seqs, result.request_id)
    return respond(accepted, headers=headers)


async def get_facts(request: web.Request) -> web.Response:
    """``GET /v1/facts[?project=&cursor=&limit=]``: the current facts the token may see, in
    (project, kind, id) order, a page of ``limit`` (default ``FACTS_PAGE``) after ``cursor``
    (the ``next_cursor`` of the page before)."""
    project = request.query.get("project")
    after, limit = fact_page_param(request)
    facts = await daemon_of(request).list_facts(
        project, projects=visible_projects(request), after=after, limit=limit
    )
    page = {"facts": [f.to_json() for f in facts], "next_cursor": next_fact_cursor(facts, limit)}
    return respond(convert(page, m.FactList))


async def post_hook(request: web.Request) -> web.Response:
    """An event from a CI system (GitHub, GitLab, or any Standard Webhooks sender), verified
    with the source's secret and mapped to facts by the ``hooks`` mapping of gatekeeper.yaml.
    An event no mapping fits is acknowledged (202) and ignored. The sender's delivery id
    (``hooks.delivery_id``: GitHub ``X-GitHub-Delivery``, GitLab ``Idempotency-Key``,
    Standard Webhooks ``webhook-id``) is the idempotency key, so a redelivered event applies
    nothing twice."""
    daemon = daemon_of(request)
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
        return respond(m.HookIgnored(0, True), status=202)
    delivery = delivery_id(hook, request.headers)
    idempotency = None
    if delivery and len(delivery) <= MAX_IDEMPOTENCY_KEY_CHARS - len(source) - 6:
        digest = hashlib.sha256(body).hexdigest()
        idempotency = IdempotencyRecord(f"hook:{source}:{delivery}", digest)
    elif hook.kind == "standard":  # its replay refusal rests on webhook-id: never go without
        raise ApiError(400, "webhook-id is too long to be remembered")
    request_id = request_id_of(request)
    try:
        result = await daemon.ingest(facts, request_id, idempotency)
    except IdempotencyConflict as exc:
        raise ApiError(422, str(exc)) from None
    except ShuttingDown:
        raise ApiError(503, SHUTTING_DOWN) from None
    return respond(m.FactsAccepted(len(result.seqs), result.seqs, result.request_id))


async def get_export(request: web.Request) -> web.Response:
    """A snapshot of the state, in the format ``gatekeeper plan --snapshot`` reads: current
    facts, every rule's firing state, standing approvals, the active ruleset's content
    hashes and the escrows. Limited to the token's projects. The facts are paged as in
    ``GET /v1/facts``; a page after the first holds only facts."""
    after, limit = fact_page_param(request)
    snapshot = await daemon_of(request).export(
        lambda project: visible(request, project),
        visible_projects(request),
        after=after,
        limit=limit,
    )
    facts = snapshot["facts"]
    last = facts[-1] if len(facts) == limit else None
    cursor = encode_key([last["project"], last["kind"], last["id"]]) if last else None
    return respond(convert({**snapshot, "next_cursor": cursor}, m.Snapshot))


# ---------------------------------------------------------------------------------------------
# Rules, approvals, admin acts


async def get_rules(request: web.Request) -> web.Response:
    """``GET /v1/rules``: the active ruleset, the last reload's outcome, every rule's state."""
    daemon = daemon_of(request)
    shadowed = await daemon.shadowed_releases()
    rules = [
        daemon.rule_view(rule, explain=False, shadowed=shadowed)
        for rule in daemon.rules()
        if visible(request, rule.project)
    ]
    body = {"ruleset": daemon.ruleset_view(), "reload": daemon.reload_view(), "rules": rules}
    return respond(convert(body, m.RuleList))


async def get_rule(request: web.Request) -> web.Response:
    """``GET /v1/rules/{rule_id}``: source, state, explanation, ``limit`` recent decisions.
    ``item`` shows one instance of a per-item rule (its state, explanation, approvals and
    decisions; 400 on a rule without ``for_each``, 404 for an item it has no instance of);
    without it a per-item rule lists a page of its instances (``instances_limit`` of them,
    after ``cursor``)."""
    daemon = daemon_of(request)
    rule_id = request.match_info["rule_id"]
    rule = daemon.rule(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset")
    check_project(request, rule.project)
    item = instance_param(rule, item_param(request))
    paging = "cursor" in request.query or "instances_limit" in request.query
    if paging and (rule.for_each is None or item is not None):
        raise ApiError(
            400,
            "cursor and instances_limit page the instances of a per-item rule (for_each), "
            f"without item; rule {rule.id!r} "
            + ("has no for_each" if rule.for_each is None else "is shown for one item"),
        )
    cursor = request.query.get("cursor")
    after = decode_key(cursor, 1)[0] if cursor is not None else None
    detail = await rule_detail(
        daemon,
        rule.id,
        limit_param(request, 20),
        item,
        instances_after=after,
        instances_limit=limit_param(request, 100, "instances_limit"),
    )
    return respond(detail)


def instance_param(rule: Rule, item: str | None) -> str | None:
    """``item`` checked against ``rule``: 400 when it names an instance of a rule without
    ``for_each`` (such a rule has no instances to name)."""
    if item is not None and rule.for_each is None:
        raise ApiError(
            400,
            f"rule {rule.id!r} has no for_each: item names an instance of a per-item rule, "
            f"and this rule has none (item {item[:MAX_ITEM_CHARS]!r})",
        )
    return item


def unknown_instance(rule: Rule, item: str) -> ApiError:
    """The 404 for an item the per-item rule ``rule`` has no instance of (the item cut to
    ``MAX_ITEM_CHARS`` in the message: a fact id is never longer)."""
    item = item[:MAX_ITEM_CHARS]
    return ApiError(
        404,
        f"rule {rule.id!r} has no instance {item!r}: there is no {rule.for_each} fact "
        f"{item!r} in project {rule.project!r}",
    )


async def rule_detail(
    daemon: Daemon,
    rule_id: str,
    decisions: int,
    item: str | None = None,
    *,
    instances_after: str | None = None,
    instances_limit: int = 100,
) -> m.Rule:
    """A rule's full view: state, source, explanation, its ``decisions`` latest decisions
    (of instance ``item``; a per-item rule without it: a page of its instances, its
    ``next_cursor`` made opaque). 404 when the rule has no instance ``item``."""
    try:
        view = await daemon.rule_detail(
            rule_id,
            decisions,
            item,
            instances_after=instances_after,
            instances_limit=instances_limit,
        )
    except KeyError:
        rule = daemon.rule(rule_id)
        if rule is None or item is None:
            raise ApiError(404, f"no rule {rule_id!r} in the active ruleset") from None
        raise unknown_instance(rule, item) from None
    page = view.get("instance_page")
    if page is not None and page["next_cursor"] is not None:
        page["next_cursor"] = encode_key([page["next_cursor"]])
    return convert(view, m.Rule)


_APPROVAL_DECODER = msgspec.json.Decoder(m.ApprovalRequest)
_APPROVAL_MESSAGES = {
    "rule": "must be a rule id (a string)",
    "decision": f"must be one of: {', '.join(APPROVAL_DECISIONS)}",
    "comment": f"must be a string of at most {MAX_COMMENT_CHARS} characters",
    "item": "must be an item id (a non-empty string)",
}


async def post_approvals(request: web.Request) -> web.Response:
    """``{"rule": ID, "decision": "approve" | "reject" | "withdraw", "comment": ...,
    "item": ITEM}``; the approver is the token's subject, never a body field. ``item`` is
    required for a per-item rule and refused for any other (400); an item whose fact does
    not exist is 404. Nothing is recorded on any error."""
    try:
        body, raw = await read_model(request, _APPROVAL_DECODER)
    except BodyShapeError as error:
        problems = shape_problems(m.ApprovalRequest, error.body, _APPROVAL_MESSAGES)
        raise ApiError(400, "the request body is not a valid approval", problems) from None
    token = principal(request)
    if token is None:
        raise ApiError(
            403, "approvals need API tokens: the approver is the token's subject (see tokens)"
        )
    daemon = daemon_of(request)
    request_id = request_id_of(request)
    rule, result = await record_approval(
        daemon, token, body, request_id, lambda: idempotency_record(request, raw)
    )
    try:
        view = daemon.rule_view(rule, explain=True, item=body.item)
    except KeyError:  # the item's fact went away meanwhile
        view = daemon.rule_view(rule, explain=True)
    headers = {"X-Request-Id": result.request_id or request_id}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    accepted = m.ApprovalAccepted(
        seq=result.seqs[0],
        request_id=result.request_id or request_id,
        rule=rule.id,
        approver=token.subject,
        decision=body.decision,
        approvals=convert(view["explanation"]["approvals"], m.ApprovalStatus),
        item=body.item if body.item is not None else UNSET,
    )
    return respond(accepted, headers=headers)


async def record_approval(
    daemon: Daemon,
    token: Token,
    body: m.ApprovalRequest,
    request_id: str,
    idempotency: Callable[[], IdempotencyRecord | None] = lambda: None,
) -> tuple[Rule, IngestResult]:
    """Record ``token``'s subject's approval ``body`` (approve, reject or withdraw, on a
    rule or one instance of a per-item rule): the one path of ``POST /v1/approvals`` and
    the status page. ``idempotency`` gives the request's Idempotency-Key record (read
    after the rule is checked). Returns the rule and the committed result. Raises
    ``ApiError``: 403 for a project the token may not act on or a subject not among the
    rule's approvers; 404 no such rule or instance; 400 an item missing or refused; 422 a
    key reused with another approval; 503 shutting down."""
    rule = daemon.rule(body.rule)
    if rule is None:
        raise ApiError(404, f"no rule {body.rule!r} in the active ruleset")
    check_token_project(token, rule.project)
    _check_item(rule, body.item)
    approval = ApprovalInput(
        body.rule, rule.project, token.subject, body.decision, body.comment, body.item or ""
    )
    record = idempotency()
    if record is not None:  # each approver's keys are their own
        record = replace(record, key=f"approval:{token.subject}:{record.key}")
    try:
        result = await daemon.approve(approval, request_id, record)
    except IdempotencyConflict:
        raise ApiError(422, "Idempotency-Key was already used with a different approval") from None
    except NotAnApprover as exc:
        raise ApiError(403, str(exc)) from None
    except UnknownRule as exc:
        raise ApiError(404, f"no rule {exc} in the active ruleset") from None
    except UnknownInstance:
        raise unknown_instance(rule, body.item or "") from None
    except ShuttingDown:
        raise ApiError(503, SHUTTING_DOWN) from None
    return rule, result


def _check_item(rule: Rule, item: str | None) -> None:
    """400 unless the approval names an item exactly when ``rule`` is per item."""
    if rule.for_each is not None and item is None:
        raise ApiError(
            400,
            f"rule {rule.id!r} is per item (for_each: {rule.for_each}): the approval must "
            f'name the item it decides on ("item": the id of a {rule.for_each} fact)',
        )
    instance_param(rule, item)


_ADMIN_ACT_DECODER = msgspec.json.Decoder(m.AdminActRequest)


async def read_reasoned(
    request: web.Request, decoder: msgspec.json.Decoder[Any], shape: str, what: str
) -> tuple[Any, str]:
    """The body of an audited act that must say why, and its stripped ``reason``. Raises
    ``ApiError`` 400 naming the body's ``shape`` and ``what`` must say why (a missing,
    malformed or blank reason), before anything is looked up or changed."""
    try:
        body = (await read_model(request, decoder))[0]
    except BodyShapeError:
        body = None
    reason = body.reason.strip() if body is not None else ""
    if not reason:
        raise ApiError(
            400,
            f"the body must be {shape}: {what} says why (at most {MAX_COMMENT_CHARS} characters)",
        )
    return body, reason


async def post_rule_act(request: web.Request) -> web.Response:
    """``POST /v1/rules/{id}/pause|resume|rearm`` with ``{"reason": ..., "item": ...}``
    (``reason`` required; ``item`` acts on one instance of a per-item rule: 400 on a rule
    without ``for_each``, 404 for an item it has no instance of). Answers the rule's view;
    an act on a per-item rule as a whole adds ``acted_on`` (how many instances it
    changed)."""
    daemon = daemon_of(request)
    rule_id, act = request.match_info["rule_id"], request.match_info["act"]
    body, reason = await read_reasoned(
        request,
        _ADMIN_ACT_DECODER,
        '{"reason": "..."} (and optionally "item": "<item id>")',
        "every admin act",
    )
    item = body.item if body and isinstance(body.item, str) else None
    acted = await act_on_rule(daemon, principal(request), act, rule_id, reason, item)
    detail = await rule_detail(daemon, rule_id, 20, item)
    if "acted_on" in acted:  # a per-item rule as a whole: how many instances changed
        detail = msgspec.structs.replace(detail, acted_on=acted["acted_on"])
    return respond(detail)


async def act_on_rule(
    daemon: Daemon,
    token: Token | None,
    act: str,
    rule_id: str,
    reason: str,
    item: str | None = None,
) -> dict[str, Any]:
    """Carry out admin act ``act`` (pause, resume, rearm) on rule ``rule_id`` (instance
    ``item`` of a per-item rule), audited as ``token``'s subject's (``local`` without
    tokens) with ``reason``: the one path of ``POST /v1/rules/{id}/{act}`` and the status
    page. Returns ``Daemon.administer``'s view. Raises ``ApiError``: 403 for a project the
    token may not act on; 404 no such rule or instance; 400 an item on a rule without
    ``for_each``; 409 an act that does not apply."""
    rule = daemon.rule(rule_id)
    if rule is None:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset")
    check_token_project(token, rule.project)
    item = instance_param(rule, item)
    subject = token.subject if token else "local"
    try:
        admin_act = AdminAct(cast(AdminActName, act), rule_id, subject, reason, rule.project, item)
        return await daemon.administer(admin_act)
    except UnknownRule:
        raise ApiError(404, f"no rule {rule_id!r} in the active ruleset") from None
    except UnknownInstance:
        raise unknown_instance(rule, item or "") from None
    except ValueError as exc:
        raise ApiError(409, str(exc)) from None


_SIGNOFF_DECODER = msgspec.json.Decoder(m.SignOffRequest)
CONTENT_HASH = re.compile(r"[0-9a-f]{64}")


async def post_signoff(request: web.Request) -> web.Response:
    """``POST /v1/money-rules/{content_hash}/signoffs`` with ``{"comment": ...}`` (optional):
    an admin's sign-off of the money rule with that exact content hash (the two-person
    rule, ``money_rule_approvals``), audited as an admin act ``signoff``. The admin is the
    token's subject: sign-offs need API tokens (403 without). 400 for a hash that is not 64
    lowercase hex digits or a bad body, 404 when no rule of the active ruleset has the hash,
    422 for a rule that is not a money rule (or is in mode: shadow), 409 when this admin
    signed that hash before. Nothing is recorded on any error. Answers the rule's view."""
    content_hash = request.match_info["content_hash"]
    if not CONTENT_HASH.fullmatch(content_hash):
        raise ApiError(
            400,
            "content_hash must be a rule's content hash: 64 lowercase hex digits (see "
            f"content_hash in GET /v1/rules), not {content_hash[:80]!r}",
        )
    comment = None
    if request.can_read_body:
        try:
            body, _ = await read_model(request, _SIGNOFF_DECODER)
        except BodyShapeError as error:
            messages = {"comment": f"must be a string of at most {MAX_COMMENT_CHARS} characters"}
            problems = shape_problems(m.SignOffRequest, error.body, messages)
            raise ApiError(400, "the request body is not a valid sign-off", problems) from None
        comment = body.comment.strip() if body.comment else None
    token = principal(request)
    if token is None:
        raise ApiError(
            403,
            "sign-offs need API tokens: each sign-off is an admin's, the token's subject "
            "(see tokens)",
        )
    daemon = daemon_of(request)
    rule = next((r for r in daemon.rules() if r.content_hash == content_hash), None)
    if rule is not None:
        check_project(request, rule.project)
    try:
        view = await daemon.sign_off(SignOff(content_hash, "", token.subject, comment or None))
    except UnknownContentHash as exc:
        raise ApiError(404, str(exc)) from None
    except SignOffRefused as exc:
        raise ApiError(422, str(exc)) from None
    except AlreadySignedOff as exc:
        raise ApiError(409, str(exc)) from None
    return respond(convert(view, m.RuleSummary))


# ---------------------------------------------------------------------------------------------
# Actions


async def get_actions(request: web.Request) -> web.Response:
    """``GET /v1/actions[?status=&limit=]``: the outbox and dead letters, newest first."""
    status = request.query.get("status")
    if status is not None and status not in ACTION_STATUSES:
        raise ApiError(400, f"status must be one of: {', '.join(ACTION_STATUSES)}")
    entries = await daemon_of(request).list_actions(
        status, limit_param(request), projects=visible_projects(request)
    )
    return respond(convert({"actions": [e.to_json() for e in entries]}, m.ActionList))


async def get_action(request: web.Request) -> web.Response:
    """``GET /v1/actions/{action_id}``: one action and its delivery attempts."""
    daemon = daemon_of(request)
    action_id = request.match_info["action_id"]
    entry = await daemon.get_action(action_id)
    if entry is None:
        raise ApiError(404, f"no action {action_id!r}")
    check_project(request, entry.payload.get("project", ""))
    attempts = await daemon.list_attempts(action_id)
    body = {**entry.to_json(), "delivery_attempts": [a.to_json() for a in attempts]}
    return respond(convert(body, m.ActionWithAttempts))


_RETRY_DECODER = msgspec.json.Decoder(m.RetryRequest)


async def post_action_retry(request: web.Request) -> web.Response:
    """``POST /v1/actions/{action_id}/retry``: requeue a dead letter (an audited admin act)."""
    daemon = daemon_of(request)
    action_id = request.match_info["action_id"]
    reason = None
    if request.can_read_body:
        try:
            retry, _ = await read_model(request, _RETRY_DECODER)
        except BodyShapeError:
            raise ApiError(400, 'the body must be {"reason": "..."} or empty') from None
        reason = retry.reason if isinstance(retry.reason, str) else None
    entry = await retry_dead_letter(daemon, principal(request), action_id, reason)
    return respond(convert(entry.to_json(), m.Action))


async def retry_dead_letter(
    daemon: Daemon, token: Token | None, action_id: str, reason: str | None
) -> OutboxEntry:
    """Requeue dead letter ``action_id``, an admin act audited as ``token``'s subject's
    (``local`` without tokens): the one path of ``POST /v1/actions/{id}/retry`` and the
    status page. Raises ``ApiError``: 403 for an action of a project the token may not act
    on; 404 no such action; 409 an action that is not dead."""
    existing = await daemon.get_action(action_id)
    if existing is not None:
        check_token_project(token, existing.payload.get("project", ""))
    subject = token.subject if token else "local"
    try:
        entry = await daemon.retry_action(action_id, actor=subject, reason=reason)
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    if entry is None:
        raise ApiError(404, f"no action {action_id!r}")
    return entry


_CANCEL_DECODER = msgspec.json.Decoder(m.CancelRequest)


async def post_action_cancel(request: web.Request) -> web.Response:
    """``POST /v1/actions/{action_id}/cancel`` with ``{"reason": ...}``: cancel a release
    that is pending (waiting for a retry too) or dead, an audited admin act. It is never
    sent afterwards and its amount returns to its escrow. 409 while an attempt is in flight
    (its outcome decides) and for a delivered or cancelled release; 422 for an action
    that is not a release; 404 for no such action. Nothing changes on any error."""
    daemon = daemon_of(request)
    action_id = request.match_info["action_id"]
    _, reason = await read_reasoned(request, _CANCEL_DECODER, '{"reason": "..."}', "every cancel")
    existing = await daemon.get_action(action_id)
    if existing is not None:
        check_project(request, existing.payload.get("project", ""))
    try:
        cancelled = await daemon.cancel_action(action_id, actor=actor(request), reason=reason)
    except NotARelease as exc:
        raise ApiError(422, str(exc)) from None
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    if cancelled is None:
        raise ApiError(404, f"no action {action_id!r}")
    entry, movements = cancelled
    body_out = {"action": entry.to_json(), "entries": [e.to_json() for e in movements]}
    return respond(convert(body_out, m.CancelledRelease))


# ---------------------------------------------------------------------------------------------
# Settlements

_SETTLEMENT_DECODER = msgspec.json.Decoder(m.SettlementRequest)
_SETTLEMENT_MESSAGES = {
    "release_id": "must be a release id (a non-empty string)",
    "status": 'must be "settled" or "failed"',
    "reference": f"must be the provider's reference, 1 to {m.MAX_REFERENCE_CHARS} characters",
    "reason": f"must be a string of at most {MAX_COMMENT_CHARS} characters",
}


SETTLEMENT_RETRY_AFTER_S = "1"
"""``Retry-After`` (seconds) of a settlement callback that came while the release's attempt
is in flight: its answer is about to be recorded."""


async def post_settlement(request: web.Request) -> web.Response:
    """``POST /v1/settlements/{target}``: the bank (target ``target``) says a release it
    was sent is settled or failed. No bearer token: the body is signed per Standard
    Webhooks with the target's own secret (``secret_env``; 401 otherwise) and its
    ``webhook-id`` is applied once (the same id with another body: 422). A failure returns
    the amount to the escrow and alerts ``alert_target`` once. A dead letter may be settled
    or failed too (the bank got it after all); so may a cancelled release (settled: its
    amount is taken back out of the escrow and ``alert_target`` told; failed: recorded,
    nothing moves). 404: no such target, or no release sent to it; 409: the release was
    not sent, or was settled the other way, or its attempt is in flight (with
    ``Retry-After``: retry). The same outcome again answers 200 with ``applied`` false.
    Nothing changes on any error."""
    daemon = daemon_of(request)
    target = request.match_info["target"]
    secret = daemon.settlement_secret(target)
    if secret is None:
        raise ApiError(404, f"no webhook target {target[:80]!r} is configured")
    raw = await request.read()
    try:
        verify_standard(secret, request.headers, raw, sender=f"target {target!r}")
    except HookRejected as exc:
        raise ApiError(exc.status, exc.message) from None
    check_json_content_type(request)
    try:
        body = decode_model(raw, _SETTLEMENT_DECODER)
    except BodyShapeError as error:
        problems = shape_problems(m.SettlementRequest, error.body, _SETTLEMENT_MESSAGES)
        raise ApiError(400, "the request body is not a valid settlement", problems) from None
    webhook_id = request.headers.get("webhook-id", "").strip()
    if len(webhook_id) > MAX_IDEMPOTENCY_KEY_CHARS:  # remembered to refuse a replay
        raise ApiError(400, "webhook-id is too long to be remembered")
    try:
        result = await daemon.settle(
            target,
            body.release_id,
            body.status,
            body.reference,
            body.reason,
            webhook_id=webhook_id,
            body_sha256=hashlib.sha256(raw).hexdigest(),
        )
    except KeyReused as exc:
        raise ApiError(422, str(exc)) from None
    except AttemptInFlight as exc:  # the bank called back before its answer was recorded
        raise ApiError(409, str(exc), headers={"Retry-After": SETTLEMENT_RETRY_AFTER_S}) from None
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    if result is None:
        raise ApiError(404, f"no release {body.release_id!r} was sent to target {target!r}")
    accepted = m.SettlementAccepted(
        release_id=result.release_id,
        status=result.outcome,
        reference=result.reference,
        at=format_rfc3339(result.at),
        applied=bool(result.movements),
        replayed=result.replayed,
        entries=[convert(e.to_json(), m.LedgerMovement) for e in result.movements],
    )
    return respond(accepted)


# ---------------------------------------------------------------------------------------------
# Audit, rulesets, releases, escrows


async def get_audit(request: web.Request) -> web.Response:
    """The audit log, newest first: decisions, admin acts and approvals, filtered by
    ``project``, ``rule``, ``item`` (the instance of a per-item rule an entry is about),
    ``kind`` (comma-separated), ``outcome``, ``since``/``until`` (RFC 3339), paged by
    ``cursor`` (the ``next_cursor`` of the previous page)."""
    query = request.query
    if "project" in query:
        check_project(request, query["project"])
    kinds = tuple(k for k in query.get("kind", ",".join(AUDIT_KINDS)).split(",") if k)
    if not kinds or any(k not in AUDIT_KINDS for k in kinds):
        raise ApiError(400, f"kind must be a comma-separated list of: {', '.join(AUDIT_KINDS)}")
    audit_query = AuditQuery(
        project=query.get("project"),
        rule_id=query.get("rule"),
        instance=item_param(request),
        kinds=cast(tuple[AuditKind, ...], kinds),
        outcome=query.get("outcome"),
        since=time_param(request, "since"),
        until=time_param(request, "until"),
        after=decode_cursor(query.get("cursor")),
        projects=visible_projects(request),
        limit=limit_param(request),
    )
    entries = await daemon_of(request).audit(audit_query)
    last = entries[-1] if len(entries) == audit_query.limit else None
    page = {
        "entries": [e.to_json() for e in entries],
        "next_cursor": encode_cursor(last.cursor) if last else None,
    }
    return respond(convert(page, m.AuditPage))


async def get_history_facts(request: web.Request) -> web.Response:
    """A page of the fact log (posted facts, facts rules set, approvals), in seq order,
    after ``after``, of the token's projects: what ``gatekeeper backtest --url`` replays."""
    after = after_param(request)
    limit = limit_param(request, MAX_LIST_LIMIT)
    facts = await daemon_of(request).fact_log(after, limit, projects=visible_projects(request))
    page = {
        "facts": [f.to_json() for f in facts],
        "next_after": facts[-1].seq if len(facts) == limit else None,
    }
    return respond(convert(page, m.HistoryFacts))


async def get_history_decisions(request: web.Request) -> web.Response:
    """A page of the decision log after ``after``, oldest first, without evaluations, of
    the token's projects: the decisions a replay needs (``every=true``: all of them), the
    actions they queued, and where each decision made by the clock, an admin act or a
    reload falls in the fact log."""
    after = after_param(request)
    limit = limit_param(request, MAX_LIST_LIMIT)
    every = request.query.get("every", "false")
    if every not in ("true", "false"):
        raise ApiError(400, "every must be true or false")
    decisions, actions, positions = await daemon_of(request).decision_page(
        after, limit, every == "true", projects=visible_projects(request)
    )
    page = {
        "decisions": [d.to_json(evaluation=False) for d in decisions],
        "actions": [a.to_json() for a in actions],
        "positions": {str(k): v for k, v in positions.items()},
        "next_after": decisions[-1].id if len(decisions) == limit else None,
    }
    return respond(convert(page, m.HistoryDecisions))


async def get_rulesets(request: web.Request) -> web.Response:
    """Every ruleset version that went live, most recent first (content-addressed), a page
    of ``limit`` after ``cursor``, without the files' text."""
    after = ruleset_cursor_param(request)
    limit = limit_param(request)
    rulesets = await daemon_of(request).list_rulesets(limit, after)
    page = {
        "rulesets": [r.to_json() for r in rulesets],
        "next_cursor": next_ruleset_cursor(rulesets, limit),
    }
    return respond(convert(page, m.RulesetVersionList))


async def get_ruleset(request: web.Request) -> web.Response:
    """One stored ruleset version with the exact text of its files."""
    version = request.match_info["version"]
    stored = await daemon_of(request).stored_ruleset(version)
    if stored is None:
        raise ApiError(404, f"no ruleset version {version[:80]!r}")
    return respond(convert(stored.to_json(), m.RulesetText))


async def get_release(request: web.Request) -> web.Response:
    """The whole story of one release, from its release id: the ledger entry, the decision
    that made it (facts seen, sub-conditions, approvals counted), the fact that triggered it,
    the exact rule text of the ruleset version in force, and every delivery attempt."""
    release_id = request.match_info["release_id"]
    found = await daemon_of(request).release(release_id)
    if found is None:
        raise ApiError(404, f"no release {release_id[:80]!r}")
    project, story = found
    check_project(request, project)
    return respond(convert(story, m.ReleaseStory))


async def get_escrows(request: web.Request) -> web.Response:
    """``GET /v1/escrows``: each escrow's limit, reserved, sent, settled, returned,
    remaining (and released, pending, unconfirmed)."""
    escrows = await daemon_of(request).escrow_report()
    return respond(convert({"escrows": escrows}, m.EscrowList))


async def get_escrow_entries(request: web.Request) -> web.Response:
    """``GET /v1/escrows/{escrow}/entries[?cursor=&limit=]``: every ledger movement of the
    escrow, oldest first, a page of ``limit`` (default 1000) after ``cursor``; 404 for an
    escrow neither configured nor ever moved. A token of some projects sees the movements
    of their releases."""
    escrow = request.match_info["escrow"]
    cursor = request.query.get("cursor")
    after = 0
    if cursor is not None:
        (text,) = decode_key(cursor, 1)
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise ApiError(400, "cursor is not a next_cursor this API gave out")
        after = int(text)
    limit = limit_param(request, MAX_LIST_LIMIT)
    entries = await daemon_of(request).escrow_entries(
        escrow, after=after, limit=limit, projects=visible_projects(request)
    )
    if entries is None:
        raise ApiError(404, f"no escrow {escrow[:80]!r}")
    last = entries[-1] if len(entries) == limit else None
    page = {
        "escrow": escrow,
        "entries": [e.to_json() for e in entries],
        "next_cursor": encode_key([str(last.id)]) if last else None,
    }
    return respond(convert(page, m.LedgerPage))


# ---------------------------------------------------------------------------------------------
# Meta


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (text format 0.0.4); a scraper sends a token with ``read``. A
    scraper whose ``Accept`` asks for ``application/openmetrics-text`` gets OpenMetrics,
    which carries the item and rule of per-item firings as exemplars, when its token may
    see every project (a token of some projects gets the classic format: an exemplar may
    name an item of a project it may not see)."""
    openmetrics = wants_openmetrics(request) and visible_projects(request) is None
    return await metrics_response(daemon_of(request), openmetrics)


def wants_openmetrics(request: web.Request) -> bool:
    """Whether the request's ``Accept`` names ``application/openmetrics-text`` with a
    non-zero ``q`` (as Prometheus asks when it scrapes exemplars)."""
    for part in request.headers.get("Accept", "").split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() != "application/openmetrics-text":
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, text = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(text)
                except ValueError:
                    quality = 0.0
        return quality > 0
    return False


async def metrics_response(daemon: Daemon, openmetrics: bool = False) -> web.Response:
    """The answer to ``GET /metrics``: refresh the scrape-time gauges, then render (as
    OpenMetrics when ``openmetrics``)."""
    content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else METRICS_CONTENT_TYPE
    return web.Response(
        body=await daemon.metrics_text(openmetrics=openmetrics),
        headers={"Content-Type": content_type},
    )


async def get_healthz(request: web.Request) -> web.Response:
    """Liveness: gatekeeper's version, the active ruleset, whether the last reload
    succeeded, this daemon's id and whether its database answers (503 when it does not)."""
    daemon = daemon_of(request)
    health = daemon.health()
    reachable = await daemon.database_reachable()
    answer = m.Health(  # 200 while the process serves and reaches its database
        status="ok" if health.store is None and reachable else "degraded",
        version=__version__,
        ruleset=health.ruleset,
        ruleset_ok=health.ruleset_ok,
        store=None if health.store is None else convert(health.store, m.StoreCondition),
        daemon_id=health.daemon_id,
        database="ok" if reachable else "unreachable",
    )
    return respond(answer, status=200 if reachable else 503)


async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API."""
    from gatekeeper.http.openapi import openapi_bytes  # the document is built from ROUTES

    return web.Response(body=openapi_bytes(), content_type="application/json", charset="utf-8")
