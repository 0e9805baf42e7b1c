"""The wire model: every request and response body of the HTTP API as a msgspec ``Struct``.

One set of types does three jobs: request models decode and validate bodies in one pass
(``msgspec.json.Decoder``), response models encode answers (``encode``), and both generate
the OpenAPI components (``http.openapi``). Field order is the order on the wire.

Why msgspec and not pydantic v2 (``bench/bench_wire.py``, one run on the shared 2-core
machine, CPU µs per call, medians): decoding and validating a one-fact body took 2.5 µs with
msgspec, 6.6 with pydantic and 9.3 with the former ``loads_strict`` + ``FactShape`` path; a
100-fact batch 245, 984 and 378; a list answer of 100 fact rows cost 77 µs converted into
the response model and encoded by msgspec, 434 with pydantic and 305 with ``json.dumps``.
msgspec also validates patterns with Python's ``re`` (as jsonschema does; pydantic's default
Rust engine refuses the schema's look-ahead ``$(?!\n)``), is strict JSON like
``jsonwire.loads_strict`` (no NaN or Infinity, no number beyond the float range), and is one
small C extension with no dependencies.

Conventions (as before): times are RFC 3339 strings in UTC with milliseconds; money is a
decimal string; a field typed ``X | UnsetType`` is left out of the answer when unset.
Response structs forbid unknown fields, so their schemas are closed objects and converting
a row with a key the model does not know fails loudly (a 500 in tests, not a silent drift).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from gatekeeper.schemas import load_schema
from gatekeeper.store.records import DeadReason

# ---------------------------------------------------------------------------------------------
# Scalars

MAX_COMMENT_CHARS = 2000
"""The longest approval comment or admin-act reason, in characters."""


def documented(pattern: str, description: str | None = None, **schema: Any) -> Meta:
    """A constraint of a response field that the OpenAPI document states and the
    conformance tests check, but encoding does not: a regex per field per row would cost
    more than the encoding itself (about 3 µs per row of a fact list)."""
    return Meta(description=description, extra_json_schema={"pattern": pattern, **schema})


Timestamp = Annotated[
    str,
    documented(
        r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
        "An RFC 3339 time in UTC with milliseconds: 2026-11-01T09:00:00.000Z.",
        format="date-time",
    ),
]
DecimalString = Annotated[
    str,
    documented(
        r"^-?[0-9]+(\.[0-9]+)?$", 'A decimal amount as a string, e.g. "5000.00"; never a number.'
    ),
]
Sha256Hex = Annotated[str, documented("^[0-9a-f]{64}$")]
Currency = Annotated[str, documented("^[A-Z]{3}$")]
Count = Annotated[int, Meta(ge=0)]
Seq = Annotated[int, Meta(ge=1)]
_FACT = load_schema("facts-request.schema.json")["$defs"]["fact"]["properties"]
_BATCH = load_schema("facts-request.schema.json")["oneOf"][1]["properties"]["facts"]
# the identifiers' patterns and descriptions are the published schema's (one source of truth)
ProjectName = Annotated[
    str, Meta(pattern=_FACT["project"]["pattern"], description=_FACT["project"]["description"])
]
FactKind = Annotated[
    str, Meta(pattern=_FACT["kind"]["pattern"], description=_FACT["kind"]["description"])
]
FactId = Annotated[
    str, Meta(pattern=_FACT["id"]["pattern"], description=_FACT["id"]["description"])
]
JsonObject = dict[str, Any]
ApprovalDecision = Literal["approve", "reject", "withdraw"]
ActionKind = Literal["release", "notify", "pipeline", "set_fact"]
ActionStatusName = Literal["pending", "delivered", "dead", "shadowed", "cancelled"]
ModeName = Literal["live", "shadow", "awaiting_signoff"]


class Model(Struct, forbid_unknown_fields=True):
    """A closed JSON object (no keys beyond its fields)."""


# ---------------------------------------------------------------------------------------------
# Requests


class FactIn(Struct, forbid_unknown_fields=True):
    """One fact as posted: the latest known state of one thing, identified by (project,
    kind, id). Posting it replaces the previous data of that key."""

    project: ProjectName
    kind: FactKind
    id: FactId
    data: JsonObject


class FactsBody(Struct, forbid_unknown_fields=True):
    """``POST /v1/facts``: one fact (``project``, ``kind``, ``id``, ``data``), or a batch
    ``{"facts": [fact, ...]}`` of 1 to 1,000 facts applied atomically.

    msgspec has no untagged union of objects, so both forms are one struct with every key
    optional; ``facts_of`` says which form it is and refuses a mix (the published schema,
    ``schemas/facts-request.schema.json``, is a ``oneOf``; a test keeps the two in agreement).
    """

    project: ProjectName | UnsetType = UNSET
    kind: FactKind | UnsetType = UNSET
    id: FactId | UnsetType = UNSET
    data: JsonObject | UnsetType = UNSET
    facts: (
        Annotated[list[FactIn], Meta(min_length=_BATCH["minItems"], max_length=_BATCH["maxItems"])]
        | UnsetType
    ) = UNSET


def facts_of(body: FactsBody) -> list[FactIn] | None:
    """The facts of a decoded ``POST /v1/facts`` body, or None when the body is neither a
    whole fact nor a batch alone (the caller then words the problems from the schema)."""
    single = (body.project, body.kind, body.id, body.data)
    if body.facts is not UNSET:
        return body.facts if all(v is UNSET for v in single) else None
    project, kind, id_, data = single
    if (
        isinstance(project, UnsetType)
        or isinstance(kind, UnsetType)
        or isinstance(id_, UnsetType)
        or isinstance(data, UnsetType)
    ):
        return None
    return [FactIn(project, kind, id_, data)]


class ApprovalRequest(Struct, forbid_unknown_fields=True):
    """An approver's decision; the approver is the token's subject."""

    rule: Annotated[str, Meta(min_length=1, description="The rule id.")]
    decision: ApprovalDecision
    comment: Annotated[str, Meta(max_length=MAX_COMMENT_CHARS)] | None = None
    item: (
        Annotated[
            str,
            Meta(
                min_length=1,
                description="The item id of the instance decided on: required for a "
                "per-item rule (for_each), refused for any other.",
            ),
        ]
        | None
    ) = None


class AdminActRequest(Struct):
    """Why (required: every admin act is audited with who and why), and optionally which
    instance of a per-item rule to act on."""

    reason: Annotated[str, Meta(min_length=1, max_length=MAX_COMMENT_CHARS)]
    item: (
        Annotated[
            str,
            Meta(
                min_length=1,
                description="The item id of one instance of a per-item rule (for_each) to act "
                "on; without it the act applies to every instance it applies to. 400 on a "
                "rule without for_each, 404 for an item the rule has no instance of.",
            ),
        ]
        | UnsetType
    ) = UNSET


class SignOffRequest(Struct, forbid_unknown_fields=True):
    """An admin's sign-off of a money rule's content hash; the admin is the token's
    subject (never a body field)."""

    comment: (
        Annotated[
            str,
            Meta(max_length=MAX_COMMENT_CHARS, description="Why (kept in the audit log)."),
        ]
        | None
    ) = None


class RetryRequest(Struct):
    """Why the dead letter is requeued (optional; other keys are ignored)."""

    reason: Annotated[str, Meta(description="Recorded in the audit.")] | UnsetType = UNSET


# ---------------------------------------------------------------------------------------------
# Errors


class BodyProblem(Model):
    """One problem of a request body."""

    path: Annotated[
        str,
        documented(r"^\$", "The JSON path of the bad value, e.g. $.facts[1].kind."),
    ]
    message: str


class ErrorDetail(Model):
    status: Annotated[int, Meta(ge=400, le=599, description="The HTTP status, repeated.")]
    message: Annotated[str, Meta(description="What is wrong.")]
    problems: (
        Annotated[
            list[BodyProblem],
            Meta(min_length=1, description="Each problem of a body of the wrong shape."),
        ]
        | UnsetType
    ) = UNSET


class Error(Model):
    """Every error: {"error": {"status", "message", "problems"?}}."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# Facts


class FactsAccepted(Model):
    """The facts are committed (fsynced), with the decisions and actions they caused."""

    accepted: Annotated[int, Meta(ge=1, description="How many facts were applied.")]
    seqs: Annotated[
        list[Seq],
        Meta(min_length=1, description="The sequence numbers of the facts, in the order posted."),
    ]
    request_id: Annotated[
        str | None,
        Meta(
            description="The id of the request that applied the facts (the first one, for a "
            "repeat answered from its Idempotency-Key)."
        ),
    ]


class HookIgnored(Model):
    """The event was verified but no mapping fits it: nothing applied."""

    accepted: Literal[0]
    ignored: Literal[True]


class CausedBy(Model):
    """Why a fact was recorded by a rule (``set_fact``) rather than posted."""

    rule_id: str
    instance: Annotated[str, Meta(description="The item id of the instance (or empty).")]
    firing_id: str
    depth: Annotated[int, Meta(ge=1, description="How deep in a chain of rule-set facts.")]


class ItemRef(Model):
    """The item of an instance of a per-item rule (``for_each``)."""

    kind: str
    id: str
    data: JsonObject | None
    seq: int | UnsetType | None = UNSET


class Fact(Model):
    """The current state of one fact."""

    project: Annotated[str, documented(_FACT["project"]["pattern"])]
    kind: Annotated[str, documented(_FACT["kind"]["pattern"])]
    id: Annotated[str, documented(_FACT["id"]["pattern"])]
    data: Annotated[JsonObject, Meta(description="The fact's data as last posted.")]
    seq: Annotated[int, Meta(ge=1, description="The sequence number of the last update.")]
    updated_at: Timestamp
    caused_by: CausedBy | UnsetType = UNSET


class FactList(Model):
    """A page of facts, in (project, kind, id) order (at most `limit`, 1,000 by default)."""

    facts: list[Fact]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null on the last.")
    ] = None


# ---------------------------------------------------------------------------------------------
# Rules


class Problem(Model):
    """A problem found in a rule file or in gatekeeper.yaml."""

    file: str
    line: Annotated[int, Meta(ge=0, description="1-based; 0 when unknown.")]
    column: Annotated[int, Meta(ge=0, description="1-based; 0 when unknown.")]
    message: str
    path: Annotated[str, Meta(description="Key path in the file, or empty.")]
    rule_id: str | None


class RulesetInfo(Model):
    """The active ruleset."""

    version: Annotated[str, documented("^[0-9a-f]{64}$", "Content hash of the rule files.")]
    git_commit: Annotated[str, documented("^[0-9a-f]{40}([0-9a-f]{24})?$")] | None
    rules: Count
    files: list[str]


class ReloadStatus(Model):
    """The outcome of the last reload; while it failed the last good ruleset stays active."""

    ok: Annotated[bool, Meta(description="Whether the last reload succeeded.")]
    problems: list[Problem]
    attempted_at: Timestamp | None
    active_since: Timestamp | None
    source: Annotated[
        str,
        Meta(
            description="Where the active ruleset came from: the rules directory, or the "
            "database (the last good ruleset)."
        ),
    ]


class ActionTarget(Model):
    target: str


class SetFactSummary(Model):
    kind: Annotated[str, Meta(description="The kind of the fact the action records.")]


class RuleActionSummary(Model):
    """An action of the rule: its kind and target, or for set_fact the kind of fact it
    records (exactly one key)."""

    release: ActionTarget | UnsetType = UNSET
    notify: ActionTarget | UnsetType = UNSET
    pipeline: ActionTarget | UnsetType = UNSET
    set_fact: SetFactSummary | UnsetType = UNSET


OneAction = Annotated[
    RuleActionSummary, Meta(extra_json_schema={"minProperties": 1, "maxProperties": 1})
]


class Clause(Model):
    """A sub-condition of `when` and its value."""

    text: str
    value: Annotated[
        Any, Meta(description="The sub-condition's value (any JSON); null when missing.")
    ]
    missing: Annotated[list[str], Meta(min_length=1)] | UnsetType = UNSET
    error: str | UnsetType = UNSET
    value_omitted: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="In a recorded decision: the value was longer than 1,024 characters "
                "of JSON (this many) and is not kept (value is null).",
            ),
        ]
        | UnsetType
    ) = UNSET


class SeenKind(Model):
    """A kind a recorded decision read whole: how many facts it had, and the fact log's
    last seq then (the kind as read is, per id, the latest entry up to that seq)."""

    facts: Count
    as_of_seq: Annotated[int, Meta(ge=0)]


class CollectionSeen(Model):
    """What one collection saw: counts and ids, never the facts it went over."""

    text: str
    function: Literal["any", "all", "count", "sum", "min", "max"]
    kind: str
    items: Annotated[int, Meta(ge=0, description="Facts of the kind passing the filter.")]
    true: Annotated[int, Meta(ge=0, description="Of those, how many had a true element.")]
    false_ids: Annotated[
        list[str], Meta(description="The first ids (sorted) whose element was false/missing.")
    ]
    value: Any
    value_omitted: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    as_of_seq: int | UnsetType | None = UNSET


class Evaluation(Model):
    """The value of a `when` condition and of its sub-conditions."""

    value: bool
    clauses: list[Clause]
    missing: Annotated[list[str], Meta(description="Dotted names of missing facts or fields.")]
    error: str | None
    seen: Annotated[
        JsonObject,
        Meta(
            description="The facts the evaluation read (`kind.id` to data, null for a fact "
            "that does not exist). A live explanation also maps each kind read whole "
            "(`len(task)`) to its facts (`task` to {id: data}); a recorded decision keeps the "
            "facts it read by id (rebuilt from the fact log) and summarises a kind read "
            "whole in `seen_kinds` instead."
        ),
    ]
    seen_kinds: (
        Annotated[
            dict[str, SeenKind], Meta(description="In a recorded decision: each kind read whole.")
        ]
        | UnsetType
    ) = UNSET
    item: ItemRef | UnsetType = UNSET
    collections: list[CollectionSeen] | UnsetType = UNSET


class ApprovalStatus(Model, kw_only=True, rename={"from_": "from"}):
    """How the rule's sign-off stands."""

    required: Count
    from_: list[str] | UnsetType = UNSET
    approved_by: list[str]
    rejected_by: list[str]
    satisfied: bool
    lapsed: Annotated[
        list[str] | UnsetType,
        Meta(description="Approvers whose approval is older than expires_after: not counted."),
    ] = UNSET
    consumed: Annotated[
        list[str] | UnsetType,
        Meta(description="Approvals this firing used up (each_time and each_fact rules)."),
    ] = UNSET


BLOCKED_DESCRIPTION = (
    "Why the release of its last firing was refused (over the escrow's limit, another "
    "currency, a bad amount): it has not fired, and waits for a re-arm, a change of its "
    "escrow, a new version of the rule or its gate opening again. null: not blocked."
)


class Explanation(Model):
    """Why the rule's gate is open or closed right now."""

    gate_open: bool
    condition: Evaluation
    approvals: ApprovalStatus
    paused: bool
    fired_count: Count
    rearms: Annotated[
        int, Meta(ge=0, description="A once rule may fire while fired_count <= rearms.")
    ]
    last_fired_at: Timestamp | None
    blocked: Annotated[str | None, Meta(description=BLOCKED_DESCRIPTION)]
    evaluated_at: Timestamp
    item: ItemRef | UnsetType | None = UNSET


InstanceStatus = Literal["new", "armed", "open", "fired", "paused", "blocked"]

DecisionOutcome = Literal[
    "fired",
    "blocked",
    "paused",
    "not_met",
    "already_fired",
    "still_met",
    "awaiting_approvals",
    "shadowed",
    "still_blocked",
]


class Decision(Model):
    """A recorded decision of the engine about one rule (the audit log)."""

    id: Seq
    decided_at: Timestamp
    rule_id: str
    rule_hash: Sha256Hex
    ruleset_version: Sha256Hex
    git_commit: str | None
    trigger: Literal["fact", "reload", "time", "approval", "admin", "return"]
    fact_seq: Seq | None
    outcome: DecisionOutcome
    gate_open: bool
    evaluation: Evaluation
    approvals: ApprovalStatus | None
    firing_id: Annotated[
        str | None, Meta(description="`<rule id>#<n>` when the rule fired (or was blocked).")
    ]
    request_id: str | None
    reason: Annotated[
        str | None,
        Meta(
            description="Why a firing was blocked (outcome blocked), or why the instance "
            "still waits (still_blocked: its release was blocked and its gate stayed open)."
        ),
    ]
    instance: Annotated[
        str | UnsetType, Meta(description="The item id of the instance (per-item rules).")
    ] = UNSET
    mode: Annotated[
        ModeName | UnsetType,
        Meta(
            description="The mode the rule ran in when not live: shadow, or awaiting_signoff "
            "(a money rule short of sign-offs); its firing's outcome is shadowed."
        ),
    ] = UNSET


RULE_SOURCE_REF = "#/components/schemas/RuleFile.rule"
"""The schema of a rule as written (``schemas/rules.schema.json``), under components."""


class SignedBy(Model):
    """One admin's sign-off of a money rule's content hash."""

    actor: str
    at: Timestamp | None
    comment: str | None


class SignOffStatus(Model):
    """Where a money rule stands under the two-person rule (money_rule_approvals)."""

    content_hash: Annotated[str, documented("^[0-9a-f]{64}$", "The content hash signed off.")]
    required: Annotated[int, Meta(ge=1, description="money_rule_approvals.")]
    missing: Annotated[int, Meta(ge=0, description="How many more sign-offs it needs to run live.")]
    signed_by: list[SignedBy]


class ShadowedRelease(Model):
    """What a rule's shadowed firings (of its current content hash) would have released
    from one escrow: never sent, never counted against the escrow."""

    escrow: str
    currency: Currency
    count: Annotated[int, Meta(ge=1)]
    amount: DecimalString
    first_release_id: Annotated[str, Meta(description="The first shadowed release's id.")]


class RuleSummary(Model):
    """A rule and its state, as ``GET /v1/rules`` lists it."""

    id: str
    project: str
    description: str
    when: str
    fire: Literal["once", "each_time", "each_fact"]
    file: Annotated[str, Meta(description="Relative to the rules directory.")]
    line: Annotated[int, Meta(ge=1, description="1-based line where the rule starts.")]
    content_hash: Sha256Hex
    actions: list[OneAction]
    fired_count: Count
    last_fired_at: Timestamp | None
    gate_open: Annotated[bool | None, Meta(description="null: never evaluated.")]
    paused: Annotated[
        bool,
        Meta(
            description="An admin paused the rule (evaluated, never fired). A per-item rule "
            "without `item`: paused as a whole (every instance, those to come too); with "
            "`item`: that instance is paused, by its item or with its rule."
        ),
    ]
    mode: Annotated[
        ModeName,
        Meta(
            description="The mode the rule runs in: live; shadow (`mode: shadow`: decided and "
            "recorded, its actions stored as shadowed, never sent); awaiting_signoff (a "
            "money rule whose content hash has fewer sign-offs than money_rule_approvals: "
            "run as shadow)."
        ),
    ]
    signoff: (
        Annotated[
            SignOffStatus,
            Meta(description="A money rule under money_rule_approvals: its sign-offs."),
        ]
        | UnsetType
    ) = UNSET
    shadowed_releases: (
        Annotated[
            list[ShadowedRelease],
            Meta(
                description="A money rule not live, or one whose current version has "
                "shadowed releases: per escrow and currency, what it would have released."
            ),
        ]
        | UnsetType
    ) = UNSET
    for_each: str | UnsetType = UNSET
    instances: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    item: str | UnsetType = UNSET
    state: Annotated[
        InstanceStatus | UnsetType,
        Meta(
            description="Where the rule (or instance `item`) stands, as an instance row's "
            "`state`; absent for a per-item rule without `item`."
        ),
    ] = UNSET
    blocked: Annotated[str | UnsetType | None, Meta(description=BLOCKED_DESCRIPTION)] = UNSET
    blocks: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="How many firings were blocked by their release (firing ids "
                "number firings and blocked firings together); absent for a per-item rule "
                "without `item`.",
            ),
        ]
        | UnsetType
    ) = UNSET
    blocked_instances: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="A per-item rule without `item`: how many of "
                "its instances are blocked.",
            ),
        ]
        | UnsetType
    ) = UNSET


class InstanceRow(Model):
    """One instance of a per-item rule (one fact of its for_each kind) and its state."""

    item: Annotated[str, Meta(description="The item id (the fact's id).")]
    state: Annotated[
        InstanceStatus,
        Meta(
            description="Where the instance stands: new (never evaluated), armed (gate "
            "closed: fires when its condition holds and its approvals are satisfied), open "
            "(gate open: an each_time or each_fact instance that fired when it opened), fired "
            "(a once instance that fired and was not re-armed), blocked (its last firing's "
            "release was refused: see `blocked`), paused (an admin paused it, or its rule as "
            "a whole)."
        ),
    ]
    gate_open: Annotated[bool | None, Meta(description="null: never evaluated.")]
    fired_count: Count
    last_fired_at: Timestamp | None
    paused: Annotated[bool, Meta(description="Paused by its item, or with its rule as a whole.")]
    rearms: Count
    blocked: Annotated[str | None, Meta(description=BLOCKED_DESCRIPTION)]


class InstancePage(Model):
    """A page of a per-item rule's instances, in item id order."""

    instances: list[InstanceRow]
    next_cursor: Annotated[
        str | None,
        Meta(description="Pass as `cursor` for the next page of instances; null on the last."),
    ]


class Rule(RuleSummary, kw_only=True):
    """One rule, its state and its current explanation."""

    source: Annotated[
        JsonObject,
        Meta(
            description="The rule as written in its file.",
            extra_json_schema={"$ref": RULE_SOURCE_REF},
        ),
    ]
    explanation: Explanation
    ruleset_version: Sha256Hex | None
    recent_decisions: Annotated[
        list[Decision],
        Meta(description="The rule's (or the instance's) latest decisions, newest first."),
    ]
    instance_page: (
        Annotated[
            InstancePage,
            Meta(
                description="A per-item rule shown without `item`: a page of its instances with "
                "their states (`instances_limit`, `cursor`)."
            ),
        ]
        | UnsetType
    ) = UNSET
    acted_on: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="The answer to an admin act on a per-item rule without `item`: "
                "how many of its instances the act changed (paused, resumed, re-armed).",
            ),
        ]
        | UnsetType
    ) = UNSET


class RuleList(Model):
    ruleset: RulesetInfo | None
    reload: ReloadStatus
    rules: list[RuleSummary]


class ApprovalAccepted(Model):
    """The approval is committed; how the rule's sign-off now stands."""

    seq: Seq
    request_id: str
    rule: str
    approver: str
    decision: ApprovalDecision
    approvals: ApprovalStatus
    item: Annotated[
        str | UnsetType, Meta(description="The item id of the instance (per-item rules).")
    ] = UNSET


# ---------------------------------------------------------------------------------------------
# Actions


class ReleasePayload(Model):
    project: str
    escrow: str
    amount: DecimalString
    currency: Currency
    payee: str
    release_id: Annotated[str, Meta(description="The action id, sent as Idempotency-Key.")]
    item: ItemRef | UnsetType = UNSET
    facts: dict[str, JsonObject] | UnsetType = UNSET


class NotifyPayload(Model):
    """A rendered notification, or an alert: a firing or release blocked, a money rule
    awaiting sign-off (naming the rule, its content hash, the sign-offs required and
    given, and its first shadowed release), a dead letter, a failed settlement."""

    project: str
    message: str
    alert: (
        Literal[
            "release_blocked",
            "firing_blocked",
            "money_rule_awaiting_signoff",
            "dead_letter",
            "settlement_failed",
        ]
        | UnsetType
    ) = UNSET
    reason: str | UnsetType = UNSET
    rule_id: str | UnsetType = UNSET
    content_hash: Sha256Hex | UnsetType = UNSET
    required: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    signed_by: list[str] | UnsetType = UNSET
    release_id: Annotated[
        str | UnsetType,
        Meta(
            description="The release an alert is about (money_rule_awaiting_signoff: its "
            "first shadowed release; dead_letter of a release; settlement_failed)."
        ),
    ] = UNSET
    action_id: Annotated[
        str | UnsetType, Meta(description="The action a dead_letter alert is about.")
    ] = UNSET
    error: Annotated[str | UnsetType | None, Meta(description="A dead letter's last error.")] = (
        UNSET
    )
    reference: Annotated[
        str | UnsetType, Meta(description="The provider's reference of a failed settlement.")
    ] = UNSET
    firing_id: Annotated[
        str | UnsetType,
        Meta(
            description="An alert: the firing blocked (its decision's firing_id). A blocked "
            "release has no release id: only releases recorded in the ledger get one."
        ),
    ] = UNSET
    item: ItemRef | UnsetType = UNSET
    facts: dict[str, JsonObject] | UnsetType = UNSET


class SetFactPayload(Model):
    """A fact a rule in shadow would have set (a shadowed set_fact: never recorded)."""

    project: str
    kind: str
    id: str
    data: JsonObject


class PipelinePayload(Model):
    project: str
    ref: str
    inputs: dict[str, str]
    item: ItemRef | UnsetType = UNSET
    facts: dict[str, JsonObject] | UnsetType = UNSET


PAYLOAD_SCHEMA = {
    "description": "What is sent; shaped by `kind`.",
    "anyOf": [
        {"$ref": f"#/components/schemas/{name}"}
        for name in ("ReleasePayload", "NotifyPayload", "PipelinePayload", "SetFactPayload")
    ],
}


class Action(Model):
    """An action in the outbox (or a dead letter)."""

    action_id: Annotated[str, Meta(description="Stable across retries (the webhook-id).")]
    rule_id: str
    firing_id: str
    kind: ActionKind
    target: str
    payload: Annotated[JsonObject, Meta(extra_json_schema=PAYLOAD_SCHEMA)]
    status: ActionStatusName
    attempts: Annotated[int, Meta(ge=0, description="Delivery attempts made so far.")]
    created_at: Timestamp
    next_attempt_at: Timestamp
    last_error: str | None
    delivered_at: Timestamp | None
    decision_id: Seq
    requeued_at: Timestamp | None
    dead_reason: Annotated[
        DeadReason | None,
        Meta(
            description="Why a dead letter died: its attempts ran out, it grew older than "
            "max_age_s, the receiver refused it (4xx), or no retry could help. null unless "
            "status is dead (and for dead letters recorded before this field)."
        ),
    ]
    dead_status: Annotated[
        int | None,
        Meta(
            description="The HTTP status of the attempt that made it a dead letter (null "
            "when no answer came, and unless status is dead)."
        ),
    ]
    instance: Annotated[
        str | UnsetType, Meta(description="The item id of the instance (per-item rules).")
    ] = UNSET


class Attempt(Model):
    """One delivery attempt: HTTP status, or the error."""

    action_id: str
    attempt: Seq
    started_at: Timestamp
    latency_ms: Annotated[float, Meta(ge=0)]
    status_code: int | None
    error: str | None


class ActionWithAttempts(Action, kw_only=True):
    """An action with its number of attempts and every delivery attempt, oldest first."""

    delivery_attempts: list[Attempt]


class ActionList(Model):
    actions: list[Action]


# ---------------------------------------------------------------------------------------------
# Escrows, releases, audit, rulesets, export, health


class Escrow(Model):
    """One escrow account, its figures summed from the ledger's movements; currency, limit,
    decimals and remaining are null for an escrow no longer in gatekeeper.yaml. remaining = limit -
    (reserved + sent + settled); released + pending + unconfirmed = reserved + sent +
    settled."""

    escrow: str
    currency: Currency | None
    limit: DecimalString | None
    decimals: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="The escrow's precision (gatekeeper.yaml's decimals): every figure "
                "is written with this many decimals (more only for an amount recorded before "
                "the precision was lowered).",
            ),
        ]
        | None
    )
    reserved: Annotated[
        DecimalString,
        Meta(
            description="Releases decided, not yet sent nor cancelled: reserve + reclaim - "
            "send - cancel - the fail of releases never sent."
        ),
    ]
    sent: Annotated[
        DecimalString,
        Meta(
            description="Releases the bank has (2xx), not yet settled: send - settle - the "
            "fail of sent releases."
        ),
    ]
    settled: Annotated[
        DecimalString, Meta(description="Releases the bank's callback settled: settle.")
    ]
    returned: Annotated[
        DecimalString,
        Meta(
            description="Amounts back in the escrow (cancelled or failed releases): return - "
            "reclaim."
        ),
    ]
    remaining: DecimalString | None
    released: Annotated[DecimalString, Meta(description="Releases delivered: sent + settled.")]
    pending: Annotated[
        DecimalString, Meta(description="Reserved releases queued, not yet delivered.")
    ]
    unconfirmed: Annotated[
        DecimalString,
        Meta(description="Reserved releases dead-lettered: counted as possibly paid."),
    ]


class EscrowList(Model):
    escrows: list[Escrow]


MovementName = Literal["reserve", "send", "settle", "fail", "cancel", "return", "reclaim"]


class LedgerMovement(Model):
    """One movement of a release's amount. reserve: decided and queued; send: the bank
    answered 2xx (or settled a dead letter); settle / fail: the bank's signed settlement
    callback; cancel: an admin act; return: the amount back in the escrow (after cancel or
    fail); reclaim: a cancelled release the bank settled anyway, its amount taken back out
    of the escrow (before its send and settle)."""

    id: Annotated[Seq, Meta(description="Grows with every movement: the order to reconcile in.")]
    release_id: str
    escrow: str
    movement: MovementName
    amount: DecimalString
    currency: Currency
    at: Timestamp
    actor: Annotated[
        str | None,
        Meta(
            description="Who moved it: the rule (reserve), the target (send, settle, fail, "
            "reclaim), the admin (cancel); a return names the actor of its cancel or fail."
        ),
    ]
    reference: Annotated[
        str | None, Meta(description="The provider's reference (settle, fail, their return).")
    ]
    reason: Annotated[str | None, Meta(description="Why (cancel, fail, return).")]


class LedgerPage(Model):
    escrow: str
    entries: list[LedgerMovement]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null on the last.")
    ]


class CancelRequest(Struct):
    """Why the release is cancelled (required: kept in the audit log and on the ledger)."""

    reason: Annotated[str, Meta(min_length=1, max_length=MAX_COMMENT_CHARS)]


class CancelledRelease(Model):
    """The cancelled release (never sent afterwards) and the ledger movements the cancel
    wrote (cancel, then return)."""

    action: Action
    entries: list[LedgerMovement]


MAX_REFERENCE_CHARS = 200
"""The longest provider reference a settlement callback may carry."""


class SettlementRequest(Struct, forbid_unknown_fields=True):
    """A bank's settlement callback (the body it signs, per Standard Webhooks)."""

    release_id: Annotated[str, Meta(min_length=1, max_length=200)]
    status: Literal["settled", "failed"]
    reference: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_REFERENCE_CHARS,
            description="The provider's reference of the settlement.",
        ),
    ]
    reason: Annotated[str, Meta(max_length=MAX_COMMENT_CHARS)] | None = None


class SettlementAccepted(Model):
    """The release's settlement as recorded: applied now (entries written), the same
    outcome recorded before (applied false, no entries), or a replayed webhook-id
    (replayed true, nothing applied)."""

    release_id: str
    status: Literal["settled", "failed"]
    reference: str | None
    at: Timestamp
    applied: bool
    replayed: bool
    entries: list[LedgerMovement]


class ReleaseRecord(Model):
    release_id: str
    escrow: str
    amount: DecimalString
    currency: str
    payee: str
    rule_id: str
    firing_id: str
    recorded_at: Timestamp


class ReleaseStory(Model):
    """Everything about one release, from its release id."""

    release: ReleaseRecord
    movements: Annotated[
        list[LedgerMovement],
        Meta(description="Its ledger movements, oldest first (reserve, send, settle, ...)."),
    ]
    decision: Decision | None
    triggered_by: Annotated[
        JsonObject | None,
        Meta(description="The fact log entry whose arrival made the decision."),
    ]
    rule: Annotated[
        JsonObject | None,
        Meta(
            description="The rule as it stood in the ruleset version in force: file, line, "
            "content hash, source and the file's exact text."
        ),
    ]
    action: Action | None
    delivery_attempts: list[Attempt]


class AuditEntry(Model):
    """One entry of the audit log."""

    kind: Literal["decision", "admin_act", "approval"]
    id: Seq
    at: Timestamp
    rule_id: str | None
    project: str | None
    what: Annotated[
        str | None,
        Meta(description="A decision's outcome, the admin act, or the approval's decision."),
    ]
    actor: Annotated[str | None, Meta(description="Who acted or approved.")]
    reason: Annotated[str | None, Meta(description="Why (a comment, a reason).")]
    firing_id: str | None
    fact_seq: int | None
    request_id: str | None
    trigger: str | None
    instance: Annotated[
        str | UnsetType, Meta(description="The item id of the instance (per-item rules).")
    ] = UNSET
    instances: (
        Annotated[
            int,
            Meta(
                ge=0,
                description="An admin act on a per-item rule as a whole (no item): how many "
                "of its instances it paused, resumed or re-armed.",
            ),
        ]
        | UnsetType
    ) = UNSET
    rule_hash: Annotated[
        Sha256Hex | UnsetType,
        Meta(description="A sign-off (what: signoff): the content hash signed off."),
    ] = UNSET


class LoggedFact(Model):
    """One entry of the append-only fact log: a posted fact, a fact a rule set
    (``caused_by``) or an approval (kind ``approval``, id the approver)."""

    seq: Seq
    project: str
    kind: str
    id: str
    data: JsonObject
    received_at: Timestamp
    request_id: str | None
    caused_by: CausedBy | UnsetType = UNSET


class HistoryFacts(Model):
    """A page of the fact log, in seq order."""

    facts: list[LoggedFact]
    next_after: Annotated[
        int | None, Meta(description="Pass as `after` for the next page; null on the last.")
    ]


class HistoryDecision(Model):
    """A decision as a replay of the history reads it (without its evaluation)."""

    id: Seq
    decided_at: Timestamp
    rule_id: str
    rule_hash: str
    ruleset_version: Sha256Hex
    git_commit: str | None
    trigger: Literal["fact", "reload", "time", "approval", "admin", "return"]
    fact_seq: Seq | None
    outcome: str
    gate_open: bool
    approvals: JsonObject | None
    firing_id: str | None
    request_id: str | None
    reason: str | None
    instance: Annotated[
        str | UnsetType, Meta(description="The item id of the instance (per-item rules).")
    ] = UNSET
    mode: Annotated[
        ModeName | UnsetType,
        Meta(description="The mode the rule ran in when not live (shadow, awaiting_signoff)."),
    ] = UNSET


class HistoryDecisions(Model):
    """A page of the decision log, oldest first, with the actions its decisions queued
    and where each decision made by the clock, an admin act or a reload falls in the fact
    log (``positions``: decision id -> the last fact log seq committed before it)."""

    decisions: list[HistoryDecision]
    actions: list[Action]
    positions: dict[str, int]
    next_after: Annotated[
        int | None, Meta(description="Pass as `after` for the next page; null on the last.")
    ]


class AuditPage(Model):
    entries: list[AuditEntry]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null on the last.")
    ]


class RulesetVersion(Model):
    """A ruleset version that went live (content-addressed)."""

    version: Sha256Hex
    git_commit: str | None
    first_activated_at: Timestamp
    last_activated_at: Timestamp
    files: list[str]


class RulesetVersionList(Model):
    rulesets: list[RulesetVersion]
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null on the last.")
    ] = None


class RulesetText(Model):
    """A stored ruleset version: each file's exact text."""

    version: Sha256Hex
    git_commit: str | None
    first_activated_at: Timestamp
    last_activated_at: Timestamp
    files: dict[str, str]


class RuleStateRow(Model, kw_only=True):
    rule_id: str
    instance: Annotated[
        str | UnsetType, Meta(description="The item id of an instance of a per-item rule.")
    ] = UNSET
    fired_count: Count
    gate_open: bool | None
    rearms: Count
    paused: bool
    last_fired_at: Timestamp | None
    blocked: Annotated[str | UnsetType, Meta(description=BLOCKED_DESCRIPTION)] = UNSET
    blocks: (
        Annotated[
            int,
            Meta(ge=0, description="Firings blocked by their release (they number firing ids)."),
        ]
        | UnsetType
    ) = UNSET


class SnapshotRuleset(Model):
    version: Sha256Hex | None
    rules: dict[str, Sha256Hex]


class SnapshotShadowedRelease(ShadowedRelease, kw_only=True):
    """What the shadowed firings of one version of a rule would have released."""

    rule_id: str
    rule_hash: Sha256Hex


class Snapshot(Model):
    """What `gatekeeper export` writes and `gatekeeper plan` reads. From `GET /v1/export`, a
    page: its facts are paged as `GET /v1/facts`'s; the first page holds everything else, a
    later one (with `cursor`) only facts. `gatekeeper export` follows the pages and writes
    one snapshot."""

    facts: list[Fact]
    rule_states: list[RuleStateRow] | UnsetType = UNSET
    approvals: dict[str, dict[str, Literal["approve", "reject"]]] | UnsetType = UNSET
    ruleset: SnapshotRuleset | UnsetType = UNSET
    escrows: list[Escrow] | UnsetType = UNSET
    signoffs: Annotated[
        dict[str, list[SignedBy]] | UnsetType,
        Meta(description="Content hash -> the admins who signed it off (money rules)."),
    ] = UNSET
    shadowed_releases: Annotated[
        list[SnapshotShadowedRelease] | UnsetType,
        Meta(description="What shadowed firings would have released, per rule version."),
    ] = UNSET
    next_cursor: Annotated[
        str | None, Meta(description="Pass as `cursor` for the next page; null on the last.")
    ] = None


class StoreCondition(Model):
    """Why the database cannot take writes; cleared by the next write that succeeds."""

    condition: Literal["locked", "disk_full", "io_error", "read_only", "damaged", "unavailable"]
    since: Timestamp
    message: str


class Health(Model):
    status: Annotated[
        Literal["ok", "degraded"],
        Meta(description="`degraded` while the database cannot take writes or answer."),
    ]
    version: Annotated[str, Meta(description="gatekeeper's version.")]
    ruleset: Sha256Hex | None
    ruleset_ok: Annotated[bool, Meta(description="Whether the last reload succeeded.")]
    store: Annotated[
        StoreCondition | None,
        Meta(description="Why the database cannot take writes (null: it can)."),
    ]
    daemon_id: Annotated[
        str,
        Meta(
            description="This daemon's name among the daemons sharing its database "
            "(config `daemon_id`, or `<hostname>:<pid>:<hex>` made at start)."
        ),
    ]
    database: Annotated[
        Literal["ok", "unreachable"],
        Meta(
            description="Whether the database answered a trivial query within 2 s; "
            "`unreachable` comes with HTTP 503 (status `degraded`)."
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Encoding

T = TypeVar("T")

_ENCODER = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """``value`` (a Struct, or JSON-ready builtins) as compact UTF-8 JSON bytes.

    Non-finite floats become ``null`` (the answer stays RFC 8259 JSON); raises
    ``TypeError`` for a value msgspec cannot encode."""
    return _ENCODER.encode(value)


def convert(value: Any, model: type[T]) -> T:
    """``value`` (a dict row, a dataclass, or a record with attributes) as ``model``.

    Raises ``msgspec.ValidationError`` when it does not fit: a missing or unknown key, a
    wrong type, a broken constraint (a bug in the view, answered 500)."""
    return msgspec.convert(value, model, from_attributes=True)
