"""The rows the store hands back, as typed records (frozen dataclasses), and what callers
hand in besides the engine's ``Transition``.

Times are timezone-aware ``datetime``s in UTC everywhere in these records; a backend keeps
them in its own column type (SQLite: RFC 3339 text). Money amounts are decimal strings as
written (``"1250.00"``) or ``Decimal`` sums, never floats. ``to_json()`` gives the JSON
shape the HTTP API shows (times as RFC 3339 with milliseconds and ``Z``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.engine.model import (
    FactKey,
    InstanceKey,
    QueuedAction,
    RuleState,
    SignOff,
    Stand,
    Transition,
)

ActionStatus = Literal["pending", "delivered", "dead", "shadowed", "cancelled"]
"""An outbox entry's delivery state: ``pending`` (due now or later), ``delivered`` (a 2xx
answer), ``dead`` (a dead letter: no further attempt unless an admin requeues it),
``shadowed`` (queued by a firing in shadow: never due, never delivered, never in the
ledger or counted against an escrow), ``cancelled`` (a release an admin cancelled before it
was sent: never due again, its amount returned to its escrow)."""

ACTION_STATUSES: tuple[ActionStatus, ...] = (
    "pending",
    "delivered",
    "dead",
    "shadowed",
    "cancelled",
)

DeadReason = Literal["attempts_exhausted", "too_old", "refused", "not_retryable"]
"""Why an action died: ``attempts_exhausted`` (``max_attempts`` spent), ``too_old`` (the
next attempt would come after ``max_age_s``), ``refused`` (the receiver answered 4xx: the
status is in the attempt), ``not_retryable`` (a failure no retry can help: an unsignable
request, a target refusing the action's kind)."""

DEAD_REASONS: tuple[DeadReason, ...] = (
    "attempts_exhausted",
    "too_old",
    "refused",
    "not_retryable",
)

AuditKind = Literal["decision", "admin_act", "approval"]
AUDIT_KINDS: tuple[AuditKind, ...] = ("decision", "admin_act", "approval")

Movement = Literal["reserve", "send", "settle", "fail", "cancel", "return", "reclaim"]
"""A movement of a release's amount in the ledger: ``reserve`` (the release was decided and
queued), ``send`` (the bank answered 2xx, or settled a dead letter), ``settle`` / ``fail`` (the
bank's signed settlement callback), ``cancel`` (an admin act), ``return`` (the amount went
back to the escrow: after ``cancel`` or ``fail``), ``reclaim`` (a cancelled release the bank
settled anyway: the returned amount goes back out of the escrow, before its ``send`` and
``settle``)."""

MOVEMENTS: tuple[Movement, ...] = (
    "reserve",
    "send",
    "settle",
    "fail",
    "cancel",
    "return",
    "reclaim",
)

Settlement = Literal["settled", "failed"]
"""What the bank's settlement callback says became of a sent release."""

StandingApprovals = dict[str, dict[str, Stand]]
"""rule id -> approver subject -> standing decision (``Stand``: ``"approve"`` or
``"reject"`` and when it was given); an instance of a per-item rule is under
``<rule id>[<item id>]``."""


def record_json(record: Any, *, omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record (a dataclass of this module) as the API shows it: each field but ``omit``
    under its own name, in field order; times as RFC 3339 text (``format_rfc3339``),
    mappings as dicts, tuples as lists, other values as they are."""
    return {
        field.name: _json_value(getattr(record, field.name))
        for field in dataclasses.fields(record)
        if field.name not in omit
    }


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_rfc3339(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass(frozen=True, slots=True)
class StoredFact:
    """A current fact: the latest ``data`` of ``(project, kind, id)``, the sequence number
    of the fact log entry that set it and when it was received."""

    project: str
    kind: str
    id: str
    data: Mapping[str, Any]
    seq: int
    updated_at: datetime
    caused_by: Mapping[str, Any] | None = None
    """Set when a rule recorded the current data (``set_fact``): ``{rule_id, instance,
    firing_id, depth}``; shown only then."""

    def to_json(self) -> dict[str, Any]:
        return record_json(self, omit=() if self.caused_by else ("caused_by",))


@dataclass(frozen=True, slots=True)
class LoggedFact:
    """One entry of the append-only fact log (approvals included, as kind ``approval``):
    ``seq`` grows by one per entry; ``request_id`` is the HTTP request that brought it."""

    seq: int
    project: str
    kind: str
    id: str
    data: Mapping[str, Any]
    received_at: datetime
    request_id: str | None
    caused_by: Mapping[str, Any] | None = None
    """Set when a rule recorded it (``set_fact``): ``{rule_id, instance, firing_id,
    depth}``; shown only then."""

    def to_json(self) -> dict[str, Any]:
        return record_json(self, omit=() if self.caused_by else ("caused_by",))


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """A recorded decision: the engine's ``Decision`` with its id, its triggering fact's
    sequence number (``fact_seq``) and the HTTP request that caused it. ``approvals`` is the
    JSON the engine produced; ``evaluation`` too, with ``seen`` rebuilt from the fact log
    (``gatekeeper.store.evidence.shown_evaluation``: facts read by id with the data they
    had then, kinds read whole summarised in ``seen_kinds``)."""

    id: int
    decided_at: datetime
    rule_id: str
    rule_hash: str
    ruleset_version: str
    git_commit: str | None
    trigger: str
    fact_seq: int | None
    outcome: str
    gate_open: bool
    evaluation: Mapping[str, Any]
    approvals: Mapping[str, Any] | None
    firing_id: str | None
    request_id: str | None
    reason: str | None
    instance: str = ""
    """The item id of the instance decided (per-item rules; shown only then)."""
    mode: str = "live"
    """The mode the rule ran in (``shadow``, ``awaiting_signoff``; shown only when not
    ``live``)."""

    def to_json(self, *, evaluation: bool = True) -> dict[str, Any]:
        """As the API shows it; without ``evaluation`` for a replay of the history."""
        omit: tuple[str, ...] = () if self.instance else ("instance",)
        if self.mode == "live":
            omit = (*omit, "mode")
        return record_json(self, omit=omit if evaluation else (*omit, "evaluation"))


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One queued action and its delivery state.

    ``decision_id`` is None for an entry handed to the dispatcher in memory right after its
    commit (``outbox_entry_of``); ``request_id`` is the HTTP request that caused the
    decision, None when there was none. ``attempts_at_requeue`` is ``attempts`` when an
    admin last requeued it (a requeued dead letter gets a fresh allowance of attempts).
    ``dead_reason`` says why a dead letter died and ``dead_status`` is the HTTP status of
    the attempt that made it one (None when no answer came); both None unless ``status`` is
    ``dead``, and for dead letters recorded before gatekeeper kept them.
    """

    action_id: str
    rule_id: str
    firing_id: str
    kind: str
    target: str
    payload: Mapping[str, Any]
    status: ActionStatus
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_error: str | None
    delivered_at: datetime | None
    decision_id: int | None
    requeued_at: datetime | None = None
    attempts_at_requeue: int = 0
    request_id: str | None = None
    dead_reason: DeadReason | None = None
    dead_status: int | None = None
    instance: str = ""
    """The item id of the instance that fired (per-item rules; shown only then)."""
    lease_taken_from: str | None = None
    """Set by ``DeliveryQueue.claim_due`` only: the other daemon whose expired lease on
    the action this claim took over (it died or stalled mid-delivery). Never shown."""

    @property
    def project(self) -> str | None:
        """The project of the rule that queued the action (its payload's ``project``)."""
        project = self.payload.get("project")
        return project if isinstance(project, str) else None

    def to_json(self) -> dict[str, Any]:
        omit = ("request_id", "attempts_at_requeue", "lease_taken_from")
        return record_json(self, omit=omit if self.instance else (*omit, "instance"))


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt of an action: its number (1, 2, ...), when it started, how long
    it took (milliseconds), the HTTP status (None when no answer came) or the error text."""

    action_id: str
    attempt: int
    started_at: datetime
    latency_ms: float
    status_code: int | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return record_json(self)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """A delivery attempt with the action's state after it: ``status``; for a retry,
    ``next_attempt_at`` (None keeps the current one); for a dead letter, ``dead_reason``
    (its ``dead_status`` is the attempt's ``status_code``) and the ``alert`` to queue."""

    attempt: Attempt
    status: ActionStatus
    next_attempt_at: datetime | None
    dead_reason: DeadReason | None = None
    alert: QueuedAction | None = None
    """For a dead letter: the ``dead_letter`` notice to queue with it (to the alert
    target, in the same transaction), or None."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of the audit log, whatever its kind.

    ``what`` is a decision's outcome, an admin act's name (``pause``, ``retry_action``, ...)
    or an approval's decision; ``rule_id`` is the act's subject for admin acts (an action id
    for ``retry_action``); ``actor`` the token subject of acts and approvals; ``id`` the
    decision id, admin act id or fact log ``seq`` (unique within its kind).
    """

    kind: AuditKind
    id: int
    at: datetime
    rule_id: str | None
    project: str | None
    what: str | None
    actor: str | None
    reason: str | None
    firing_id: str | None
    fact_seq: int | None
    request_id: str | None
    trigger: str | None
    instance: str = ""
    """The item id of the instance of a per-item rule the entry is about (shown only
    then)."""
    instances: int | None = None
    """An admin act on a per-item rule as a whole: how many of its instances it changed
    (shown only then)."""
    rule_hash: str | None = None
    """A sign-off (admin act ``signoff``): the content hash signed off (shown only then)."""

    @property
    def cursor(self) -> AuditCursor:
        """Where a page ending with this entry ends (``AuditQuery.after``)."""
        return AuditCursor(self.at, self.kind, self.id)

    def to_json(self) -> dict[str, Any]:
        omit = () if self.instance else ("instance",)
        if self.instances is None:
            omit = (*omit, "instances")
        if self.rule_hash is None:
            omit = (*omit, "rule_hash")
        return record_json(self, omit=omit)


@dataclass(frozen=True, slots=True)
class AuditCursor:
    """The position of an audit entry in the log's order (newest first: ``at``, then
    ``kind``, then ``id``, all descending)."""

    at: datetime
    kind: str
    id: int


@dataclass(frozen=True, slots=True)
class StoredRuleset:
    """A ruleset version as kept in the database: its files' text (file name -> YAML text)
    and where it came from."""

    version: str
    files: Mapping[str, str]
    git_commit: str | None
    first_activated_at: datetime
    last_activated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return record_json(self)


@dataclass(frozen=True, slots=True)
class RulesetSummary:
    """A stored ruleset version without its text: the sorted names of its files."""

    version: str
    git_commit: str | None
    first_activated_at: datetime
    last_activated_at: datetime
    files: Sequence[str]

    @property
    def cursor(self) -> RulesetCursor:
        """Where a page ending with this version ends (``list_rulesets(after=...)``)."""
        return RulesetCursor(self.last_activated_at, self.version)

    def to_json(self) -> dict[str, Any]:
        return record_json(self)


@dataclass(frozen=True, slots=True)
class RulesetCursor:
    """The position of a ruleset version in the listing's order (the most recently
    activated first: ``last_activated_at``, then ``version``, both descending)."""

    last_activated_at: datetime
    version: str


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """A release's ledger row: ``amount`` is the decimal string as written (``"1250.00"``)
    in ``currency``; ``release_id`` is also the release action's id."""

    release_id: str
    escrow: str
    amount: str
    currency: str
    payee: str
    rule_id: str
    firing_id: str
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        return record_json(self)


@dataclass(frozen=True, slots=True)
class LedgerMovement:
    """One movement of the ledger (``Movement``), as kept: ``id`` grows with every
    movement (the order to reconcile in); ``amount`` the release's decimal string in
    ``currency``; ``actor`` who moved it (the rule for ``reserve``, the target for ``send``,
    ``settle`` and ``fail``, the admin's subject for ``cancel``; a ``return`` names the
    actor of what caused it); ``reference`` the provider's reference (``settle``,
    ``fail``); ``reason`` why (``cancel``, ``fail``, ``return``)."""

    id: int
    release_id: str
    escrow: str
    movement: Movement
    amount: str
    currency: str
    at: datetime
    actor: str | None
    reference: str | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return record_json(self)


@dataclass(frozen=True, slots=True)
class EscrowFigures:
    """What one escrow's ledger adds up to, as ``Decimal`` sums of its movements:

    - ``reserved``: reserve + reclaim - send - cancel - the ``fail`` of releases never
      sent (decided, not yet sent nor cancelled); of it, ``unconfirmed`` belongs to dead
      letters (possibly paid: a bank may have processed a request whose answer was lost);
    - ``sent``: send - settle - the ``fail`` of sent releases (the bank has it, no
      settlement yet);
    - ``settled``: settle;
    - ``returned``: return - reclaim (cancelled or failed amounts, back in the escrow; a
      ``reclaim`` takes a cancelled amount back out when the bank settled it anyway).

    ``committed`` (reserved + sent + settled, everything not returned) is what counts
    against the escrow's limit."""

    reserved: Decimal = Decimal("0.00")
    sent: Decimal = Decimal("0.00")
    settled: Decimal = Decimal("0.00")
    returned: Decimal = Decimal("0.00")
    unconfirmed: Decimal = Decimal("0.00")

    @property
    def committed(self) -> Decimal:
        return self.reserved + self.sent + self.settled


EscrowTotals = dict[str, EscrowFigures]
"""Per escrow with at least one release, its ``EscrowFigures``."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """An admin's cancel of release ``release_id`` (its action id) at ``at``: who and
    why (both kept in the audit log and on the ledger's ``cancel`` movement)."""

    release_id: str
    at: datetime
    actor: str
    reason: str
    then: Transition | None = None
    """What the return decides (``Engine.plan_return``: blocked releases tried again),
    committed in the same transaction as the cancel (None: nothing)."""


@dataclass(frozen=True, slots=True)
class SettlementCallback:
    """A verified settlement callback of ``target`` (the bank the release was sent to):
    release ``release_id`` is ``settled`` or ``failed`` (``outcome``), with the provider's
    ``reference`` and, for a failure, an optional ``reason``. ``webhook_id`` is the Standard
    Webhooks message id and ``body_sha256`` the SHA-256 (hex) of the signed body: a
    ``webhook-id`` is applied once. ``alert`` is the notice to queue with the movements
    when they are new: ``settlement_failed`` for a failure, ``settled_after_cancel`` for a
    cancelled release the bank settled (None: no alert target, or nothing to tell)."""

    target: str
    release_id: str
    outcome: Settlement
    reference: str
    reason: str | None
    webhook_id: str
    body_sha256: str
    at: datetime
    alert: QueuedAction | None = None
    then: Transition | None = None
    """What a failure's return decides (``Engine.plan_return``), committed with the
    ``fail`` and ``return`` movements when they are new (not otherwise)."""


@dataclass(frozen=True, slots=True)
class SettlementResult:
    """What a settlement callback came to: the release's settlement as now recorded
    (``outcome``, ``reference``, ``at``), the movements it wrote (empty when the same
    outcome was recorded before: idempotent), and whether its ``webhook-id`` had been
    applied already (``replayed``: nothing written)."""

    release_id: str
    outcome: Settlement
    reference: str | None
    at: datetime
    movements: tuple[LedgerMovement, ...]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ShadowedReleases:
    """What the shadowed firings of one version of a rule would have released from one
    escrow: rule id, its content hash then (``rule_hash``), escrow and currency, how many
    releases, their sum (``Decimal``), and the release id of the first of them."""

    rule_id: str
    rule_hash: str
    escrow: str
    currency: str
    count: int
    amount: Decimal
    first_release_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "escrow": self.escrow,
            "currency": self.currency,
            "count": self.count,
            "amount": str(self.amount),
            "first_release_id": self.first_release_id,
        }


@dataclass(frozen=True, slots=True)
class IdempotencyOutcome:
    """What a stored ``Idempotency-Key`` answered: the SHA-256 (hex) of its request, the
    sequence numbers it was given, its request id and when it was stored."""

    request_hash: str
    seqs: list[int]
    request_id: str | None
    created_at: datetime


_ENCODER = msgspec.json.Encoder(order="sorted", enc_hook=str)
"""msgspec's encoder: about 4× faster than ``json`` with ``sort_keys`` on the decision rows
written for every fact (their evaluation JSON was the largest part of the writer thread)."""

_FALLBACK = json.JSONEncoder(
    separators=(",", ":"), sort_keys=True, default=str, check_circular=False
)
"""For what msgspec refuses: dicts with keys other than strings (made strings), and lone
surrogates (``"\\ud800"``, valid in a JSON string, not in UTF-8), kept as ``\\u`` escapes."""


def canonical_json(value: Any) -> str:
    """Canonical JSON text, as every backend stores JSON: compact, keys sorted (by code
    point), UTF-8 (``\\u`` escapes only where JSON requires them, or for a lone
    surrogate), a ``Decimal`` as its ``str``, a ``datetime`` in RFC 3339, anything else
    that is not JSON as its ``str``.
    Stored JSON is built from parsed JSON and our own records, which hold no cycles."""
    try:
        return _ENCODER.encode(value).decode()
    except (TypeError, UnicodeEncodeError):  # int keys; a lone surrogate
        return _FALLBACK.encode(value)


def outbox_entry_of(action: QueuedAction, request_id: str | None) -> OutboxEntry:
    """The pending outbox entry of ``action`` as its row reads once committed (no attempt
    yet, due at once), without reading it back: the payload goes through the same JSON
    text as the stored one, so a first attempt sends what a retry loaded from the database
    sends. ``decision_id`` is not known here (None). Raises ``ValueError`` when
    ``action.created_at`` is not an RFC 3339 time."""
    created_at = parse_rfc3339(action.created_at)
    return OutboxEntry(
        action_id=action.action_id,
        rule_id=action.rule_id,
        firing_id=action.firing_id,
        kind=action.kind,
        target=action.target,
        payload=json.loads(canonical_json(action.payload)),
        status="pending",
        attempts=0,
        created_at=created_at,
        next_attempt_at=created_at,
        last_error=None,
        delivered_at=None,
        decision_id=None,
        request_id=request_id,
        instance=action.instance,
    )


@dataclass(frozen=True, slots=True)
class StateCursor:
    """Where a daemon's memory stands in a database's history of deciding writes.

    ``version`` is the database's state version (``meta`` row ``state_version``: how many
    deciding writes were committed, checked writes only); the rest say up to where the
    memory holds the rows those writes appended, for a catch-up to read only what follows:
    the fact log's last ``seq``, the last decision's id, the last sign-off's admin act id and
    the last ledger movement id of those that change what an escrow has left (``reserve``,
    ``return``, ``reclaim``). Each is only ever appended by deciding writes, which commit
    one at a time (the version row is their lock), so ids grow in commit order."""

    version: int = 0
    fact_seq: int = 0
    decision_id: int = 0
    signoff_id: int = 0
    ledger_id: int = 0

    def behind(self, other: StateCursor) -> bool:
        """Whether any position of this cursor is past ``other``'s (a database restored
        from an older backup than the memory it is compared with)."""
        return (
            self.version > other.version
            or self.fact_seq > other.fact_seq
            or self.decision_id > other.decision_id
            or self.signoff_id > other.signoff_id
            or self.ledger_id > other.ledger_id
        )


@dataclass(slots=True)
class StateFence:
    """A writer's position (``cursor``), handed to each of its deciding writes on a database
    other daemons share: the write's transaction first takes the ``state_version`` row (a
    row lock: deciding writes of every daemon commit one at a time) and is refused with
    ``StateBehind``, writing nothing, unless the database is at ``cursor.version``; once it
    commits, ``cursor`` moves to the position it wrote (the version one up). A write whose
    COMMIT failed leaves the fence where it was: if the server committed it after all, the
    next write is refused as behind and the catch-up brings it into memory."""

    cursor: StateCursor


@dataclass(frozen=True, slots=True)
class CaughtUpDecision:
    """A decision another writer committed, as a catch-up reads it: what the status page
    lists (``decided_at`` as stored, RFC 3339 text) and the instance a deadline loop
    reschedules."""

    project: str
    decided_at: str
    rule_id: str
    instance: str
    outcome: str
    trigger: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class StateChanges:
    """What deciding writes committed after a ``StateCursor`` (``StateStore.state_changes``),
    read in one snapshot, up to ``cursor`` (the position they reach).

    ``facts``: the fact log's entries in ``seq`` order (approvals left out), ``(key,
    data)``; applying them in order leaves each fact's current data. ``rule_states``: the
    states written since (their current rows). ``approvals``: the standing approvals of
    every instance that may have changed (an approval or a withdrawal logged, or a firing
    that used some up: its rule state changed), by ``approval_key``, each whole (an empty
    mapping: none stands any more). ``signoffs``: the sign-offs recorded since.
    ``escrows``: the committed amount (reserved + sent + settled) of each escrow whose
    figures changed. ``decisions``: in the order committed (a ruleset activated meanwhile
    is not among the parts: the commit planned with another is refused, ``RulesetChanged``,
    and the writer adopts it). Each part is the database's current truth for what it
    covers, so applying it twice (or over memory newer than the cursor it was read from)
    changes nothing more."""

    cursor: StateCursor
    facts: list[tuple[FactKey, dict[str, Any]]]
    rule_states: dict[InstanceKey, RuleState]
    approvals: StandingApprovals
    signoffs: list[SignOff]
    escrows: dict[str, Decimal]
    decisions: list[CaughtUpDecision]

    @property
    def empty(self) -> bool:
        """Whether nothing was committed after the cursor read from."""
        return not (
            self.facts
            or self.rule_states
            or self.approvals
            or self.signoffs
            or self.escrows
            or self.decisions
        )
