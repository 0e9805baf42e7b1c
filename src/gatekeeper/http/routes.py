"""The route table: one ``Route`` per operation drives both ``create_app``'s router and the
``paths`` of the OpenAPI document, so a route cannot be served undocumented (or documented
and not served).

A route names its method, its aiohttp path (``{name:regex}`` where a parameter needs one;
the document shows ``{name}``), its handler, the token scope it needs (None: open, e.g.
``/healthz``; a hook authenticates by its source's own signature), the request and response
models, and its documentation.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gatekeeper.http import handlers as h
from gatekeeper.http import models as m
from gatekeeper.http.wire import FACTS_PAGE, MAX_LIST_LIMIT

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JsonObject = dict[str, Any]

FACTS_REQUEST = "FactsRequest"
"""The request body of ``POST /v1/facts``: the published ``facts-request.schema.json``."""
OPENAPI_DOCUMENT = "OpenApiDocument"
"""The answer of ``GET /openapi.json`` (a component ``openapi`` writes by hand)."""


@dataclass(frozen=True)
class Route:
    """One operation of the API.

    ``request`` is a request model, ``FACTS_REQUEST`` (the published schema), ``dict`` (any
    JSON object) or None (no body); ``response`` the model of the 200 answer, or the name
    of a component (``OPENAPI_DOCUMENT``), or None (``text/plain``, for ``/metrics``).
    ``errors`` lists the 4xx/5xx statuses beyond 401, 403 and 500 (which every secured
    operation may answer). ``parameters`` are OpenAPI parameter objects.
    """

    method: str
    path: str
    handler: Handler
    scope: str | None
    operation_id: str
    tag: str
    summary: str
    response: type[Any] | str | None
    request: type[Any] | str | None = None
    request_required: bool = True
    description: str | None = None
    parameters: tuple[JsonObject, ...] = ()
    errors: tuple[int, ...] = ()
    headers: Mapping[str, JsonObject] = field(default_factory=dict)
    extra_responses: Mapping[int, tuple[type[Any], str]] = field(default_factory=dict)
    response_description: str = "OK."
    request_media_types: tuple[str, ...] = ("application/json",)

    @property
    def query_names(self) -> frozenset[str]:
        """The query parameters this operation takes (any other is answered 400)."""
        return frozenset(p["name"] for p in self.parameters if p.get("in") == "query")

    @property
    def openapi_path(self) -> str:
        """The path as OpenAPI writes it: ``{rule_id:.+}`` becomes ``{rule_id}``."""
        return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", self.path)


def _limit(default: int) -> JsonObject:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"How many to list, newest first (1 to {MAX_LIST_LIMIT}).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": default},
    }


def _fact_page() -> tuple[JsonObject, ...]:
    return (
        _query("cursor", "The next_cursor of the previous page."),
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": f"How many facts to list, in (project, kind, id) order (1 to "
            f"{FACTS_PAGE}); follow next_cursor for the rest.",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": FACTS_PAGE,
                "default": FACTS_PAGE,
            },
        },
    )


def _page_limit(what: str) -> JsonObject:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"How many {what} a page holds, oldest first (1 to {MAX_LIST_LIMIT}).",
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_LIST_LIMIT,
            "default": MAX_LIST_LIMIT,
        },
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


IDEMPOTENCY = {"$ref": "#/components/parameters/IdempotencyKey"}
REQUEST_ID = {"$ref": "#/components/parameters/RequestId"}
FACT_PAGE = _fact_page()
RULE_ID = _path_param(
    "rule_id",
    "A rule id, e.g. `tower-a/design-release`. Ids contain `/`: send it as is or "
    "percent-encoded (`%2F`); either way the rest of the path is the id.",
)
ACTION_ID = _path_param("action_id", "An action id (`act_<hex>`).")
ACCEPTED_HEADERS = {
    "X-Request-Id": {
        "description": "The request's id (the first request's, for a replay).",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
    "Idempotent-Replayed": {
        "description": "Present on a repeat answered from its Idempotency-Key: nothing was "
        "applied.",
        "required": False,
        "schema": {"const": "true"},
    },
}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/facts",
        h.post_facts,
        "facts:write",
        "postFacts",
        "facts",
        "Post one fact, or a batch applied atomically",
        m.FactsAccepted,
        request=FACTS_REQUEST,
        description="Answers after the facts, the decisions they caused and the actions those "
        "queued are committed (fsynced) in one transaction.",
        parameters=(IDEMPOTENCY, REQUEST_ID),
        errors=(400, 413, 415, 422, 503),
        headers=ACCEPTED_HEADERS,
        response_description="The facts are committed.",
    ),
    Route(
        "GET",
        "/v1/facts",
        h.get_facts,
        "read",
        "listFacts",
        "facts",
        "The current facts with their sequence numbers",
        m.FactList,
        parameters=(_query("project", "Only this project's facts."), *FACT_PAGE),
        errors=(400,),
        response_description="A page of facts.",
    ),
    Route(
        "GET",
        "/v1/rules",
        h.get_rules,
        "read",
        "listRules",
        "rules",
        "The active ruleset, the last reload's outcome, every rule's state",
        m.RuleList,
        response_description="The ruleset and its rules.",
    ),
    Route(
        "POST",
        "/v1/rules/{rule_id:.+}/{act:pause|resume|rearm}",
        h.post_rule_act,
        "admin",
        "actOnRule",
        "rules",
        "Pause, resume or re-arm a rule (an audited admin act)",
        m.Rule,
        request=m.AdminActRequest,
        description="A paused rule is evaluated and explained but does not fire. Re-arming a "
        "once rule that fired lets it fire once more. The rule is re-evaluated at once: a "
        "resumed or re-armed rule whose gate is open fires. On a per-item rule (`for_each`) "
        "without `item`, pause and resume act on the rule as a whole: a paused rule holds "
        "every instance, those whose item comes later too (it can be paused before it has "
        "any); resume lifts it, and an instance paused by its item stays paused (when the "
        "rule is not paused as a whole, resume resumes the instances paused by item); rearm "
        "re-arms every instance that fired. The answer's `acted_on` and the audit entry's "
        "`instances` say how many instances the act changed. With `item` in the body the act "
        "applies to that one instance (400 on a rule without `for_each`, 404 for an item "
        "the rule has no instance of); the audit entry names the item.",
        parameters=(
            RULE_ID,
            {
                "name": "act",
                "in": "path",
                "required": True,
                "schema": {"enum": ["pause", "resume", "rearm"]},
            },
        ),
        # 405: an act other than pause/resume/rearm makes the path a rule id, which only
        # GET serves
        errors=(400, 404, 405, 409, 413, 415),
        response_description="The rule after the act.",
    ),
    Route(
        "POST",
        "/v1/money-rules/{content_hash}/signoffs",
        h.post_signoff,
        "admin",
        "signOffMoneyRule",
        "rules",
        "Sign off a money rule's content hash (the two-person rule; an audited admin act)",
        m.RuleSummary,
        request=m.SignOffRequest,
        request_required=False,
        description="With `money_rule_approvals: N` in gatekeeper.yaml, a rule with a release "
        "action runs as if `mode: shadow` (mode `awaiting_signoff`: its releases are stored "
        "as shadowed, never sent) until N distinct admins signed off its exact content hash "
        "(`content_hash` in `GET /v1/rules`). The admin is the token's subject: sign-offs "
        "need API tokens (403 without). A sign-off counts from the next evaluation on; "
        "firings decided before stay shadowed. Any change to the rule makes a new hash, "
        "which needs new sign-offs. 400: not a content hash (64 lowercase hex digits); 404: "
        "no rule of the active ruleset has it; 422: not a money rule, or a rule in "
        "`mode: shadow`; 409: this admin signed that hash before. Nothing is recorded on "
        "any error. Kept in the audit log as an admin act `signoff` with its `rule_hash`.",
        parameters=(
            {
                "name": "content_hash",
                "in": "path",
                "required": True,
                "description": "A rule's content hash (SHA-256, 64 lowercase hex digits).",
                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        ),
        errors=(400, 404, 409, 413, 415, 422),
        response_description="The sign-off is recorded; the rule as it now stands.",
    ),
    Route(
        "GET",
        "/v1/rules/{rule_id:.+}",
        h.get_rule,
        "read",
        "getRule",
        "rules",
        "One rule: source, state, explanation, recent decisions",
        m.Rule,
        description="A per-item rule (`for_each`) lists a page of its instances with their "
        "states in `instance_page` (`instances_limit` of them, then `cursor`); with `item` "
        "it shows that one instance instead: its state, explanation (with the item and its "
        "approvals) and decisions. `item` on a rule without `for_each` is 400; an item the "
        "rule has no instance of is 404.",
        parameters=(
            RULE_ID,
            {
                **_limit(20),
                "description": f"How many recent decisions to show, newest first (1 to "
                f"{MAX_LIST_LIMIT}).",
            },
            _query(
                "item",
                "The item id of one instance of a per-item rule (the id of a fact of its "
                "for_each kind): show that instance.",
                minLength=1,
            ),
            _query("cursor", "The instance_page.next_cursor of the previous page of instances."),
            {
                "name": "instances_limit",
                "in": "query",
                "required": False,
                "description": f"How many instances of a per-item rule to list, in item id "
                f"order (1 to {MAX_LIST_LIMIT}).",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIST_LIMIT,
                    "default": 100,
                },
            },
        ),
        errors=(400, 404),
        response_description="The rule.",
    ),
    Route(
        "POST",
        "/v1/approvals",
        h.post_approvals,
        "approve",
        "postApproval",
        "rules",
        "Approve, reject or withdraw on a rule that takes approvals",
        m.ApprovalAccepted,
        request=m.ApprovalRequest,
        description="The approver is the token's subject and must be in the rule's `from` "
        "list (403 otherwise); a standing reject blocks the rule until withdrawn. `item` is "
        "required for a per-item rule and refused for any other (400); an item whose fact "
        "does not exist is 404. The approval is appended to the fact log and re-evaluates "
        "the rule (the instance it names). A firing of an each_time or each_fact rule uses "
        "up the approvals that allowed it unless `standing`; approvals lapse after "
        "`expires_after`.",
        parameters=(IDEMPOTENCY, REQUEST_ID),
        errors=(400, 404, 413, 415, 422, 503),
        response_description="The approval is committed.",
    ),
    Route(
        "POST",
        "/v1/hooks/{source}",
        h.post_hook,
        None,
        "postHook",
        "facts",
        "An event from a CI system, mapped to facts",
        m.FactsAccepted,
        request=dict,
        request_media_types=("application/json", "application/x-www-form-urlencoded"),
        description="Verified with the source's own secret (GitHub: `X-Hub-Signature-256`; "
        "GitLab: `X-Gitlab-Token`; other senders: a Standard Webhooks `webhook-signature` "
        "with a `webhook-timestamp` within 5 minutes), not a bearer token, and mapped to "
        "facts by the `hooks` "
        "section of gatekeeper.yaml. The sender's delivery id (GitHub: `X-GitHub-Delivery`; "
        "GitLab: `Idempotency-Key`, never `X-Gitlab-Event-UUID`, which events triggered by "
        "one webhook share; Standard Webhooks: `webhook-id`) makes redeliveries idempotent; "
        "a `webhook-id` replayed with another body is refused (422).",
        parameters=(_path_param("source", "The hook source name in the config."),),
        errors=(400, 401, 404, 413, 422, 503),
        extra_responses={202: (m.HookIgnored, "No mapping fits: ignored.")},
        response_description="The event's facts are committed.",
    ),
    Route(
        "GET",
        "/v1/actions",
        h.get_actions,
        "read",
        "listActions",
        "actions",
        "The outbox and dead letters, newest first",
        m.ActionList,
        parameters=(
            {
                "name": "status",
                "in": "query",
                "required": False,
                "description": "Only actions with this status (shadowed: queued by a "
                "firing in shadow, never sent; cancelled: a release cancelled before it was "
                "sent).",
                "schema": {"enum": ["pending", "delivered", "dead", "shadowed", "cancelled"]},
            },
            _limit(100),
        ),
        errors=(400,),
        response_description="The actions.",
    ),
    Route(
        "GET",
        "/v1/actions/{action_id}",
        h.get_action,
        "read",
        "getAction",
        "actions",
        "One action and its delivery attempts",
        m.ActionWithAttempts,
        parameters=(ACTION_ID,),
        errors=(404,),
        response_description="The action.",
    ),
    Route(
        "POST",
        "/v1/actions/{action_id}/retry",
        h.post_action_retry,
        "admin",
        "retryAction",
        "actions",
        "Requeue a dead letter (an audited admin act)",
        m.Action,
        request=m.RetryRequest,
        request_required=False,
        description="The action is due at once, with a fresh allowance of attempts and age. "
        "Only a dead action can be requeued (409 otherwise).",
        parameters=(ACTION_ID,),
        errors=(400, 404, 409, 413, 415),
        response_description="The requeued action.",
    ),
    Route(
        "POST",
        "/v1/actions/{action_id}/cancel",
        h.post_action_cancel,
        "admin",
        "cancelAction",
        "actions",
        "Cancel a release before it is sent (an audited admin act)",
        m.CancelledRelease,
        request=m.CancelRequest,
        description="A release that is pending (waiting for a retry too) or dead becomes "
        "`cancelled`: it is never sent afterwards, and its amount returns to its escrow at "
        "once (ledger movements `cancel` and `return`). The audit log keeps the act "
        "(`cancel_action`) with the actor and the reason. 409, changing nothing: an attempt "
        "of it is in flight (its outcome decides), or it is delivered or cancelled already. "
        "422: the action is a notify or pipeline action (only releases are cancelled).",
        parameters=(ACTION_ID,),
        errors=(400, 404, 409, 413, 415, 422),
        response_description="The cancelled release and the ledger movements written.",
    ),
    Route(
        "POST",
        "/v1/settlements/{target}",
        h.post_settlement,
        None,
        "postSettlement",
        "escrows",
        "The bank's signed callback: a release it was sent is settled or failed",
        m.SettlementAccepted,
        request=m.SettlementRequest,
        description="No bearer token: the body is signed per Standard Webhooks with the "
        "target's own secret (`secret_env`): `webhook-id`, `webhook-timestamp` within 5 "
        "minutes of now, `webhook-signature` (401 otherwise). A sent (delivered), dead or "
        "cancelled release can be settled or failed (409 before it was sent), by the target "
        "it was sent to (404 otherwise); while an attempt of it is in flight (the bank "
        "called back before its answer was recorded) the answer is 409 with `Retry-After`: "
        "retry. `settled` writes the ledger movement `settle` (a dead letter: `send` and "
        "`settle`, and it becomes delivered; a cancelled release: `reclaim`, `send` and "
        "`settle`, it stays cancelled and `alert_target` is told, alert "
        "`settled_after_cancel`); `failed` writes `fail` and `return` (the amount is back in "
        "the escrow at once) and tells `alert_target` once (alert `settlement_failed`); for "
        "a cancelled release it is recorded and moves nothing. The same outcome again answers "
        "200 with `applied: false`; the other outcome is 409. A `webhook-id` is applied "
        "once: a replay answers the recorded settlement with `replayed: true`, the same id "
        "with another body is 422. Nothing changes on any error.",
        parameters=(_path_param("target", "The name of the target (the bank) in the config."),),
        errors=(400, 401, 404, 409, 413, 415, 422, 503),
        response_description="The release's settlement as recorded.",
    ),
    Route(
        "GET",
        "/v1/escrows",
        h.get_escrows,
        "read",
        "listEscrows",
        "escrows",
        "Each escrow: limit, reserved, sent, settled, returned, remaining",
        m.EscrowList,
        description="Summed from the ledger's movements: reserved = reserve + reclaim - send "
        "- cancel - the fail of releases never sent (dead letters the bank failed), sent = "
        "send - settle - the fail of sent releases, settled = settle, returned = return - "
        "reclaim, remaining = limit - (reserved + sent + settled), below zero when a reclaim "
        "overdrew the escrow. `released` (sent + settled), `pending` and "
        "`unconfirmed` (reserved releases queued, and dead-lettered: counted as possibly "
        "paid) split the same amounts as before.",
        response_description="The escrows.",
    ),
    Route(
        "GET",
        "/v1/escrows/{escrow}/entries",
        h.get_escrow_entries,
        "read",
        "listEscrowEntries",
        "escrows",
        "Every ledger movement of an escrow, oldest first, to reconcile line by line",
        m.LedgerPage,
        description="Movements: reserve (a release decided and queued), send (the bank "
        "answered 2xx), settle / fail (the bank's signed callback), cancel (an admin act), "
        "return (the amount back in the escrow, after cancel or fail). Summed per movement "
        "they give the figures of `GET /v1/escrows`. A token of some projects sees the "
        "movements of their releases only.",
        parameters=(
            _path_param("escrow", "The escrow's name in the config."),
            _query("cursor", "The next_cursor of the previous page."),
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "description": f"How many movements to list, oldest first (1 to "
                f"{MAX_LIST_LIMIT}); follow next_cursor for the rest.",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIST_LIMIT,
                    "default": MAX_LIST_LIMIT,
                },
            },
        ),
        errors=(400, 404),
        response_description="A page of movements.",
    ),
    Route(
        "GET",
        "/v1/audit",
        h.get_audit,
        "read",
        "listAudit",
        "rules",
        "The audit log: decisions, admin acts, approvals (newest first)",
        m.AuditPage,
        parameters=(
            _query("project", "Only entries of this project."),
            _query("rule", "Only entries of this rule id."),
            _query(
                "item",
                "Only entries about this instance of a per-item rule (its item id): its "
                "decisions, admin acts and approvals.",
                minLength=1,
            ),
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
        ),
        errors=(400,),
        response_description="A page.",
    ),
    Route(
        "GET",
        "/v1/export",
        h.get_export,
        "read",
        "export",
        "facts",
        "A snapshot of the state, as `gatekeeper plan --snapshot` reads it",
        m.Snapshot,
        parameters=FACT_PAGE,
        errors=(400,),
        response_description="The snapshot (a page of it).",
    ),
    Route(
        "GET",
        "/v1/history/facts",
        h.get_history_facts,
        "history",
        "historyFacts",
        "facts",
        "The fact log, oldest first: what `gatekeeper backtest --url` replays",
        m.HistoryFacts,
        description="Every fact log entry (posted facts, facts set by rules with "
        "`caused_by`, approvals as kind `approval`) with `seq > after`, in seq order. Read "
        "only; scope `history` (or `admin`): the token's projects only.",
        parameters=(
            _query(
                "after",
                "A fact log seq: entries after it (0, the start, by default).",
                pattern="^[0-9]{1,18}$",
            ),
            _page_limit("entries"),
        ),
        errors=(400,),
        response_description="A page of the fact log.",
    ),
    Route(
        "GET",
        "/v1/history/decisions",
        h.get_history_decisions,
        "history",
        "historyDecisions",
        "rules",
        "The decision log, oldest first: what `gatekeeper backtest --url` replays",
        m.HistoryDecisions,
        description="Decisions with `id > after`, in id order (the order they were "
        "committed in), without their evaluations: those that fired, were blocked or told "
        "approvers, and those made by the clock, an admin act or a reload (`every=true`: "
        "all of them); the actions they queued; and for each decision not made on a fact or "
        "an approval, the last fact log seq committed before it. Read only; scope "
        "`history` (or `admin`): the decisions of the token's projects and their actions.",
        parameters=(
            _query(
                "after",
                "A decision id: decisions after it (0, the start, by default).",
                pattern="^[0-9]{1,18}$",
            ),
            _query("every", "true: every decision, the quiet ones too.", enum=["true", "false"]),
            _page_limit("decisions"),
        ),
        errors=(400,),
        response_description="A page of the decision log.",
    ),
    Route(
        "GET",
        "/v1/rulesets",
        h.get_rulesets,
        "read",
        "listRulesets",
        "rules",
        "Every ruleset version that went live, most recent first",
        m.RulesetVersionList,
        parameters=(_query("cursor", "The next_cursor of the previous page."), _limit(100)),
        errors=(400,),
        response_description="The versions.",
    ),
    Route(
        "GET",
        "/v1/rulesets/{version}",
        h.get_ruleset,
        "read",
        "getRuleset",
        "rules",
        "One stored ruleset version with the exact text of its files",
        m.RulesetText,
        parameters=(_path_param("version", "The ruleset version (SHA-256 hex)."),),
        errors=(404,),
        response_description="The version.",
    ),
    Route(
        "GET",
        "/v1/releases/{release_id}",
        h.get_release,
        "read",
        "getRelease",
        "escrows",
        "The whole story of a release, from its release id",
        m.ReleaseStory,
        parameters=(_path_param("release_id", "A release id (`act_<hex>`)."),),
        errors=(404,),
        response_description="The story.",
    ),
    Route(
        "GET",
        "/healthz",
        h.get_healthz,
        None,
        "health",
        "meta",
        "Liveness, ruleset version, whether the last reload succeeded, daemon id, database",
        m.Health,
        response_description="Alive (503, with the same body, when the database does not answer).",
    ),
    Route(
        "GET",
        "/metrics",
        h.get_metrics,
        "read",
        "metrics",
        "meta",
        "Prometheus metrics (text exposition format 0.0.4, or OpenMetrics on request)",
        None,
        description="The classic Prometheus text format; a scraper whose Accept names "
        "`application/openmetrics-text` gets OpenMetrics instead, where "
        "`gatekeeper_decisions_total` carries the item (and rule) of the latest firing of a "
        "per-item rule as an exemplar. Items are never labels: their number is unbounded.",
        response_description="The metrics.",
    ),
    Route(
        "GET",
        "/openapi.json",
        h.get_openapi,
        "read",
        "openapi",
        "meta",
        "This description of the API (OpenAPI 3.1)",
        OPENAPI_DOCUMENT,
        response_description="The document.",
    ),
)
