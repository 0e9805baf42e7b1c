"""The records the engine takes and gives, shared by the rooms above it: facts, approvals
and admin acts in; rule states, decisions, queued actions and the ``Transition`` that
commits them out. Plain frozen dataclasses (``Transition`` is built up while planning),
no behaviour beyond small derived properties.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from gatekeeper.engine.ledger import LedgerEntry
from gatekeeper.expr import CollectionSeen, Evaluation
from gatekeeper.rules.model import (
    Ruleset,
)

FactKey = tuple[str, str, str]
"""(project, kind, id)"""

InstanceKey = tuple[str, str]
"""(rule id, item id): one instance of a rule. A rule without ``for_each`` has the one
instance ``(rule id, "")``; a per-item rule one per fact of its kind (the fact's id)."""

Trigger = Literal["fact", "reload", "time", "approval", "admin", "return"]
Outcome = Literal[
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
"""``shadowed``: the rule fired in shadow (``Decision.mode``): its actions are stored as
shadowed, never sent. ``still_blocked``: the instance's release was blocked and its gate
stayed open since: it waits (no new attempt, no new alert) for a re-arm, a change of its
escrow, a new version of the rule or its gate opening again."""
EffectiveMode = Literal["live", "shadow", "awaiting_signoff"]
"""The mode a rule runs in: ``live``; ``shadow`` (``mode: shadow`` in its file); or
``awaiting_signoff`` (a money rule whose content hash has fewer sign-offs than
``money_rule_approvals``: run as if ``mode: shadow``)."""


@dataclass(frozen=True, slots=True)
class Stand:
    """An approver's standing decision on one instance of a rule: ``approve`` or
    ``reject``, and when it was given (by the injected clock; None when not known, as in a
    snapshot: such a decision never lapses)."""

    decision: Literal["approve", "reject"]
    at: datetime | None = None


ApprovalStanding = Mapping[str, Mapping[str, Stand]]
"""rule id -> approver subject -> their standing decision (``Stand``). The approvals of one
instance of a per-item rule are under ``<rule id>[<item id>]`` (``evaluate.approval_key``)."""


@dataclass(frozen=True)
class CausedBy:
    """Why a fact was recorded by a rule (``set_fact``) rather than posted: the rule, the
    instance's item id (``""`` for a rule without ``for_each``), the firing, and how deep
    in a chain of rule-set facts it is (1 for a fact set by a rule a posted fact fired)."""

    rule_id: str
    instance: str
    firing_id: str
    depth: int


@dataclass(frozen=True)
class FactInput:
    """A fact as posted: ``data`` replaces the previous data of ``(project, kind, id)``.
    ``caused_by`` is set when a rule's ``set_fact`` recorded it."""

    project: str
    kind: str
    id: str
    data: Mapping[str, Any]
    caused_by: CausedBy | None = None

    @property
    def key(self) -> FactKey:
        return (self.project, self.kind, self.id)


@dataclass(frozen=True, slots=True)
class RuleState:
    """What the engine remembers of a rule between evaluations (persisted by the store).

    ``gate_open`` is the last value of the gate (None before the first evaluation);
    ``fired_count`` only ever grows; ``rule_hash`` is the content hash last evaluated.
    A firing whose release was refused (over the escrow's limit, another currency, a bad
    amount) does not count in ``fired_count``: it counts in ``blocks`` and leaves its
    reason in ``blocked`` until the instance fires.
    """

    rule_id: str
    gate_open: bool | None = None
    fired_count: int = 0
    last_fired_at: str | None = None
    rule_hash: str | None = None
    paused: bool = False
    rearms: int = 0
    """A ``once`` rule may fire while ``fired_count <= rearms`` (re-arming sets it)."""
    instance: str = ""
    """The item id of this instance of a per-item rule (``""`` for a rule without
    ``for_each``): the state is kept per ``InstanceKey`` (rule_id, instance)."""
    notified: bool = False
    """The rule's ``approvals.notify`` target was told of the current wait for approvals
    (cleared when the rule fires or its condition goes false)."""
    notices: int = 0
    """How many waits for approvals were told (only grows; numbers the notice ids)."""
    signoff_alerted: str | None = None
    """The content hash of the rule whose wait for sign-offs the alert target was told
    (``money_rule_awaiting_signoff``, once per content hash): kept in the state of the
    rule's instance ``""`` (a per-item rule's state as a whole)."""
    blocked: str | None = None
    """Why the instance's last firing was blocked by its release (the decision's reason),
    until it fires; None when it is not blocked."""
    blocks: int = 0
    """How many firings were blocked by their release (only grows). Firing ids number
    firings and blocked firings together: the next is ``fired_count + blocks + 1``."""


@dataclass(frozen=True)
class ApprovalInput:
    """An approver's decision on a rule: ``approve``, ``reject`` or ``withdraw`` (which
    removes that approver's standing decision). ``subject`` is the token's subject."""

    rule_id: str
    project: str
    subject: str
    decision: Literal["approve", "reject", "withdraw"]
    comment: str | None = None
    instance: str = ""
    """The item id of the instance approved (per-item rules); ``""`` otherwise."""


@dataclass(frozen=True)
class Consumption:
    """Approvals used up by a firing (``fire: each_time`` or ``each_fact`` rules without
    ``approvals.standing``): the approve decisions of ``subjects`` on instance ``instance``
    of rule ``rule_id`` are removed, in the transaction that records firing ``firing_id``."""

    rule_id: str
    instance: str
    subjects: tuple[str, ...]
    firing_id: str


@dataclass(frozen=True)
class AdminAct:
    """An audited admin act: who (``actor``), what (``act``), on which rule, and why."""

    act: Literal["pause", "resume", "rearm"]
    rule_id: str
    actor: str
    reason: str
    project: str = ""
    instance: str | None = None
    """The item id of the one instance acted on (per-item rules); None acts on the rule:
    its one instance, or a per-item rule as a whole (see ``Engine.plan_admin``)."""
    instances: int | None = None
    """How many instances of a per-item rule an act without ``instance`` changed (paused,
    resumed, re-armed; set by ``Engine.plan_admin``); None otherwise."""


@dataclass(frozen=True)
class SignOff:
    """An admin's sign-off of a money rule's exact content hash (the two-person rule,
    ``money_rule_approvals``): who (``actor``, the token's subject), which rule and hash,
    an optional comment, and when (None until recorded: the store stamps the transition's
    time). Recorded as an admin act ``signoff``, so it is audited and replayable."""

    content_hash: str
    rule_id: str
    actor: str
    comment: str | None = None
    project: str = ""
    at: datetime | None = None


@dataclass(frozen=True)
class QueuedAction:
    """An action to deliver, as it goes into the outbox.

    ``action_id`` is stable across retries (it is the Standard Webhooks ``webhook-id``; for a
    release it is also the ``release_id`` and the ``Idempotency-Key``). ``payload`` is the
    rendered action (JSON-ready); ``target`` names a target of ``gatekeeper.yaml``.
    """

    action_id: str
    kind: str
    target: str
    rule_id: str
    firing_id: str
    payload: Mapping[str, Any]
    created_at: str
    instance: str = ""
    """The item id of the instance that fired (``""`` for a rule without ``for_each``)."""
    shadowed: bool = False
    """Queued by a firing in shadow (``Decision.mode`` not ``live``): stored in the outbox
    with status ``shadowed``, never delivered, never in the ledger."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's verdict on one rule at one moment, with everything needed to explain it.

    ``fact_index`` points into the transition's ``facts`` (the store turns it into the fact's
    sequence number); ``evaluation`` holds the sub-condition values, missing names and the
    facts seen; ``firing_id`` (``<rule id>#<n>``, ``<rule id>[<item id>]#<n>`` for an
    instance of a per-item rule) is set when the rule fired.
    """

    rule_id: str
    rule_hash: str
    ruleset_version: str
    git_commit: str | None
    trigger: Trigger
    outcome: Outcome
    gate_open: bool
    evaluation: Evaluation
    decided_at: str
    fact_index: int | None = None
    firing_id: str | None = None
    approvals: Mapping[str, Any] | None = None
    reason: str | None = None
    project: str = ""
    instance: str = ""
    """The item id of the instance decided (``""`` for a rule without ``for_each``)."""
    item_kind: str = ""
    """The ``for_each`` kind of a per-item rule (the instance's item is the fact
    ``(project, item_kind, instance)``; the store keeps it by reference); ``""`` otherwise."""
    notice_id: str | None = None
    """Set when the decision told the rule's ``approvals.notify`` target that the instance
    waits for approvals (``<rule id>[<item id>]~approvals-<n>``, the id of that notice's
    outbox entry's firing): only when ``firing_id`` is None."""
    mode: EffectiveMode = "live"
    """The mode the rule ran in (``EffectiveMode``); a firing in ``shadow`` or
    ``awaiting_signoff`` has outcome ``shadowed`` (or ``blocked``) and sends nothing."""


@dataclass(frozen=True)
class IdempotencyRecord:
    """An ``Idempotency-Key`` and the SHA-256 (hex) of the request it came with, stored with
    the facts it applied so that a repeat can be answered without applying anything."""

    key: str
    request_hash: str


@dataclass
class Transition:
    """Everything one ingest, reload or clock tick changes, committed atomically:
    facts to append (the posted ones, then those rules set, each with ``caused_by``),
    decisions to record, rule states to write (by ``InstanceKey``) and actions to queue.
    ``ruleset`` is set when the transition activates a ruleset version."""

    facts: list[FactInput] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    rule_states: dict[InstanceKey, RuleState] = field(default_factory=dict)
    actions: list[QueuedAction] = field(default_factory=list)
    ruleset: Ruleset | None = None
    request_id: str | None = None
    ledger: list[LedgerEntry] = field(default_factory=list)
    idempotency: IdempotencyRecord | None = None
    approvals: list[ApprovalInput] = field(default_factory=list)
    admin_acts: list[AdminAct] = field(default_factory=list)
    consumed: list[Consumption] = field(default_factory=list)
    """Approvals the transition's firings used up (removed after ``approvals`` are
    recorded)."""
    signoffs: list[SignOff] = field(default_factory=list)
    """Sign-offs of money rules' content hashes (recorded as admin acts ``signoff``)."""
    planned_at: datetime | None = None
    """The "now" the transition was planned at (deadlines are rescheduled from it)."""

    @property
    def fired(self) -> list[Decision]:
        """Decisions that fired a rule, ``blocked`` ones included (each has a firing id)."""
        return [d for d in self.decisions if d.firing_id is not None]


def evaluation_to_json(evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation as stored in the audit log and shown by the API."""
    return {
        "value": evaluation.value,
        "clauses": [
            {
                "text": c.text,
                "value": c.value,
                **({"missing": list(c.missing)} if c.missing else {}),
                **({"error": c.error} if c.error else {}),
            }
            for c in evaluation.clauses
        ],
        "missing": list(evaluation.missing),
        "error": evaluation.error,
        "seen": dict(evaluation.seen),
        **(
            {"collections": [collection_to_json(c) for c in evaluation.collections]}
            if evaluation.collections
            else {}
        ),
    }


def collection_to_json(seen: CollectionSeen) -> dict[str, Any]:
    """What one collection saw, as stored and shown: counts and ids, never the facts."""
    return {
        "text": seen.text,
        "function": seen.function,
        "kind": seen.kind,
        "items": seen.items,
        "true": seen.true,
        "false_ids": list(seen.false_ids),
        "value": seen.value,
    }


_KIND = re.compile(r"[a-z][a-z0-9_]*")


def split_fact_name(name: str) -> tuple[str, str | None]:
    """``(kind, id)`` of a name of ``Evaluation.seen``: ``milestone.design`` ->
    ``("milestone", "design")``, ``task["T-17"]`` -> ``("task", "T-17")``; a kind read
    whole (``task``) -> ``("task", None)``, as is a name of no known shape."""
    match = _KIND.match(name)
    if match is None:
        return name, None
    kind, rest = match.group(), name[match.end() :]
    if rest.startswith(".") and len(rest) > 1:
        return kind, rest[1:]
    if rest.startswith("[") and rest.endswith("]"):
        try:
            fact_id = json.loads(rest[1:-1])
        except ValueError:
            return name, None
        if isinstance(fact_id, str):
            return kind, fact_id
    return name, None
