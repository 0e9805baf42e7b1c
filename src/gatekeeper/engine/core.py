"""Rule evaluation, pure: facts in, decisions and queued actions out, no I/O.

The engine keeps an index from the fact keys each rule reads (found statically from its
``when`` expression, see ``Condition.reads``) to the rules, so a fact re-evaluates only the
rules that read it: the cost of a fact does not grow with the size of the ruleset.

A rule's *gate* is its condition together with its approvals (``approvals: {required: N}``).
Firing follows the rule's ``fire`` mode:

- ``once``: the first time the gate is open, and never again for that rule id (the count of
  firings is persisted, so this holds across restarts and reloads);
- ``each_time``: on every closed -> open edge of the gate (a rule never seen before counts
  as closed, so a newly loaded rule whose gate is already open fires at once).

The caller (``daemon``) commits the returned ``Transition`` in one transaction and only then
applies it to its in-memory state.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.ledger import EscrowBook, LedgerEntry
from gatekeeper.expr.condition import Evaluation, FactRef
from gatekeeper.rules.model import (
    Action,
    FireMode,
    NotifyAction,
    PipelineAction,
    ReleaseAction,
    Rule,
    Ruleset,
)
from gatekeeper.rules.templates import render_template, template_values

FactKey = tuple[str, str, str]
"""(project, kind, id)"""

Trigger = Literal["fact", "reload", "time", "approval", "admin"]
Outcome = Literal[
    "fired", "blocked", "paused", "not_met", "already_fired", "still_met", "awaiting_approvals"
]
ApprovalStanding = Mapping[str, Mapping[str, str]]
"""rule id -> approver subject -> their standing decision, "approve" or "reject"."""


@dataclass(frozen=True)
class FactInput:
    """A fact as posted: ``data`` replaces the previous data of ``(project, kind, id)``."""

    project: str
    kind: str
    id: str
    data: Mapping[str, Any]

    @property
    def key(self) -> FactKey:
        return (self.project, self.kind, self.id)


@dataclass(frozen=True, slots=True)
class RuleState:
    """What the engine remembers of a rule between evaluations (persisted by the store).

    ``gate_open`` is the last value of the gate (None before the first evaluation);
    ``fired_count`` only ever grows; ``rule_hash`` is the content hash last evaluated.
    """

    rule_id: str
    gate_open: bool | None = None
    fired_count: int = 0
    last_fired_at: str | None = None
    rule_hash: str | None = None
    paused: bool = False
    rearms: int = 0
    """A ``once`` rule may fire while ``fired_count <= rearms`` (re-arming sets it)."""


@dataclass(frozen=True)
class ApprovalInput:
    """An approver's decision on a rule: ``approve``, ``reject`` or ``withdraw`` (which
    removes that approver's standing decision). ``subject`` is the token's subject."""

    rule_id: str
    project: str
    subject: str
    decision: Literal["approve", "reject", "withdraw"]
    comment: str | None = None


@dataclass(frozen=True)
class AdminAct:
    """An audited admin act: who (``actor``), what (``act``), on which rule, and why."""

    act: Literal["pause", "resume", "rearm"]
    rule_id: str
    actor: str
    reason: str
    project: str = ""


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


@dataclass(frozen=True)
class Decision:
    """The engine's verdict on one rule at one moment, with everything needed to explain it.

    ``fact_index`` points into the transition's ``facts`` (the store turns it into the fact's
    sequence number); ``evaluation`` holds the sub-condition values, missing names and the
    facts seen; ``firing_id`` (``<rule id>#<n>``) is set when the rule fired.
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


@dataclass(frozen=True)
class IdempotencyRecord:
    """An ``Idempotency-Key`` and the SHA-256 (hex) of the request it came with, stored with
    the facts it applied so that a repeat can be answered without applying anything."""

    key: str
    request_hash: str


@dataclass
class Transition:
    """Everything one ingest, reload or clock tick changes, committed atomically:
    facts to append, decisions to record, rule states to write and actions to queue.
    ``ruleset`` is set when the transition activates a ruleset version."""

    facts: list[FactInput] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    rule_states: dict[str, RuleState] = field(default_factory=dict)
    actions: list[QueuedAction] = field(default_factory=list)
    ruleset: Ruleset | None = None
    request_id: str | None = None
    ledger: list[LedgerEntry] = field(default_factory=list)
    idempotency: IdempotencyRecord | None = None
    approvals: list[ApprovalInput] = field(default_factory=list)
    admin_acts: list[AdminAct] = field(default_factory=list)
    planned_at: datetime | None = None
    """The "now" the transition was planned at (deadlines are rescheduled from it)."""

    @property
    def fired(self) -> list[Decision]:
        """Decisions that fired a rule (``blocked`` ones included: they count as its firing)."""
        return [d for d in self.decisions if d.firing_id is not None]


class ProjectFacts:
    """The current facts of one project, seen through pending (uncommitted) changes.

    Implements ``expressions.FactLookup``.
    """

    def __init__(self, project: str, facts: FactTable) -> None:
        self._project = project
        self._facts = facts

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        return self._facts.get((self._project, kind, id))

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return self._facts.of_kind(self._project, kind)


class FactTable:
    """Current facts in memory, keyed by (project, kind, id): one dict of ids per
    (project, kind), so ``get`` and ``of_kind`` read the same index.

    ``overlay`` returns a copy-on-write view for planning a transition before it commits.

    The root table (not an overlay) stores each fact's data in a compact form: a copy in
    which equal dict keys, projects, kinds and short strings (up to ``SHARED_MAX_CHARS``
    characters: statuses, codes) are one shared ``str`` object, not one per fact (as
    ``json.loads`` makes them). The copy is equal to the data given; only memory changes
    (about a third less for facts of a few fields). At most ``SHARED_MAX_STRINGS`` distinct
    strings are shared, so unique values cannot grow the pool without bound.
    """

    SHARED_MAX_CHARS = 16
    SHARED_MAX_STRINGS = 65_536
    COMPACT_MAX_DEPTH = 32
    """Data nested deeper than this is kept as given."""

    def __init__(self, facts: Mapping[FactKey, Mapping[str, Any]] | None = None) -> None:
        self._by_kind: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)
        self._parent: FactTable | None = None
        self._strings: dict[str, str] = {}
        for key, data in (facts or {}).items():
            self.put(key, data)

    def overlay(self) -> FactTable:
        """A view that reads through to this table and records its own writes."""
        view = FactTable()
        view._parent = self
        return view

    def put(self, key: FactKey, data: Mapping[str, Any]) -> None:
        """Set the data of fact ``key`` (the root table keeps a compact, equal copy)."""
        project, kind, id = key
        if self._parent is None:
            project, kind = self._shared(project), self._shared(kind)
            data = self._compact_mapping(data, 0)
        self._by_kind[(project, kind)][id] = data

    def _shared(self, text: str) -> str:
        """The pool's ``str`` equal to ``text`` (adding it while the pool has room)."""
        pooled = self._strings.get(text)
        if pooled is not None:
            return pooled
        if len(self._strings) < self.SHARED_MAX_STRINGS:
            self._strings[text] = text
        return text

    def _compact_mapping(self, data: Mapping[str, Any], depth: int) -> dict[str, Any]:
        return {self._shared(k): self._compact(v, depth + 1) for k, v in data.items()}

    def _compact(self, value: Any, depth: int) -> Any:
        if depth > self.COMPACT_MAX_DEPTH:
            return value
        if isinstance(value, str):
            return self._shared(value) if len(value) <= self.SHARED_MAX_CHARS else value
        if isinstance(value, dict):
            return self._compact_mapping(value, depth)
        if isinstance(value, list):
            return [self._compact(v, depth + 1) for v in value]
        return value

    def get(self, key: FactKey) -> Mapping[str, Any] | None:
        if self._by_kind:  # an overlay often holds nothing yet
            ids = self._by_kind.get((key[0], key[1]))
            if ids is not None:
                data = ids.get(key[2])
                if data is not None:
                    return data
        return self._parent.get(key) if self._parent else None

    def snapshot(self) -> dict[FactKey, Mapping[str, Any]]:
        """This table's own facts (not its parent's), ``{(project, kind, id): data}``, in a
        new dict."""
        return {
            (project, kind, id): data
            for (project, kind), ids in self._by_kind.items()
            for id, data in ids.items()
        }

    def of_kind(self, project: str, kind: str) -> Mapping[str, Mapping[str, Any]]:
        merged: dict[str, Mapping[str, Any]] = {}
        if self._parent:
            merged.update(self._parent.of_kind(project, kind))
        merged.update(self._by_kind.get((project, kind), {}))
        return merged


class _Entry:
    """What deciding one rule reads, in one small object: the rule and the fields of it
    that every decision uses. An engine builds them one after the other, in rule order, so
    that the entries of neighbouring rules (often the rules reading one fact) share cache
    lines instead of being scattered over the heap with the rest of each rule."""

    __slots__ = ("approvals", "condition", "content_hash", "fire", "id", "project", "rule")

    def __init__(self, rule: Rule, project: str) -> None:
        self.rule = rule
        self.id = rule.id
        self.project = project
        self.content_hash = rule.content_hash
        self.condition = rule.condition
        self.fire = rule.fire
        self.approvals = rule.approvals


def _entries(entries: Mapping[str, _Entry], rules: Iterable[Rule]) -> tuple[_Entry, ...]:
    """The entries of ``rules`` (``entries`` is keyed by rule id), each rule id once, first
    seen first."""
    unique = {rule.id: entries[rule.id] for rule in rules}
    return tuple(unique.values())


def uuid_action_id() -> str:
    """A fresh action id, ``act_`` and 32 hex digits of a random UUID (the default
    ``new_action_id`` of ``Engine``)."""
    return f"act_{uuid.uuid4().hex}"


class Engine:
    """A ruleset with its fact-key index. Immutable once built; a reload builds a new one.

    ``new_action_id`` makes the id of each queued action (``act_...``, unique for good: it
    is the outbox key and a release's id); the runtime passes it, tests may pass a
    deterministic one. The engine makes no other ids and reads no clock.
    """

    def __init__(
        self,
        ruleset: Ruleset,
        *,
        alert_target: str | None = None,
        new_action_id: Callable[[], str] = uuid_action_id,
    ) -> None:
        self.ruleset = ruleset
        self.alert_target = alert_target
        self.new_action_id = new_action_id
        self.rules: dict[str, Rule] = ruleset.by_id()
        self._by_fact: dict[FactKey, list[Rule]] = defaultdict(list)
        self._by_kind: dict[tuple[str, str], list[Rule]] = defaultdict(list)
        self.time_dependent: tuple[Rule, ...] = tuple(
            r for r in ruleset.rules if r.condition.uses_time
        )
        self.time_dependent_ids = frozenset(r.id for r in self.time_dependent)
        for rule in ruleset.rules:
            for ref in rule.condition.reads:
                self._index(rule, ref)
        # One entry per rule, allocated in rule order; one tuple of entries per fact key
        # (the rules reading it by id, then those reading its whole kind, each once).
        projects: dict[str, str] = {}
        entries = {  # as in self.rules, the last rule of an id is the one
            rule.id: _Entry(rule, projects.setdefault(rule.project, rule.project))
            for rule in ruleset.rules
        }
        self._entries_by_fact: dict[FactKey, tuple[_Entry, ...]] = {
            key: _entries(entries, [*rules, *self._by_kind.get((key[0], key[1]), [])])
            for key, rules in self._by_fact.items()
        }
        self._entries_by_kind: dict[tuple[str, str], tuple[_Entry, ...]] = {
            key: _entries(entries, rules) for key, rules in self._by_kind.items()
        }

    def _index(self, rule: Rule, ref: FactRef) -> None:
        if ref.id is None:
            self._by_kind[(rule.project, ref.kind)].append(rule)
        else:
            self._by_fact[(rule.project, ref.kind, ref.id)].append(rule)

    def rules_reading(self, key: FactKey) -> list[Rule]:
        """The rules whose condition reads fact ``key`` (by id or by its whole kind)."""
        return self._by_fact.get(key, []) + self._by_kind.get((key[0], key[1]), [])

    def _entries_reading(self, key: FactKey) -> tuple[_Entry, ...]:
        """The entries of the rules reading fact ``key``, each rule once, in the order of
        ``rules_reading``."""
        found = self._entries_by_fact.get(key)
        if found is None:
            found = self._entries_by_kind.get((key[0], key[1]), ())
        return found

    def plan_ingest(
        self,
        facts: FactTable,
        states: Mapping[str, RuleState],
        batch: list[FactInput],
        now: datetime,
        book: EscrowBook | None = None,
        approvals: ApprovalStanding | None = None,
    ) -> Transition:
        """Plan applying ``batch`` atomically: every rule reading any of its facts is evaluated
        once, against the facts with the whole batch applied.

        ``book`` holds the escrows' limits and committed amounts; releases planned here are
        committed to it (pass a copy to plan without committing). Without a book no escrow
        is configured, so every release is blocked.
        """
        book = book if book is not None else EscrowBook({})
        view = facts.overlay()
        transition = Transition(facts=list(batch), planned_at=now)
        if len(batch) == 1:  # the usual batch: its rules are already listed once each
            fact = batch[0]
            view.put(fact.key, fact.data)
            for entry in self._entries_reading(fact.key):
                self._decide_entry(transition, entry, view, states, now, "fact", 0, book, approvals)
            return transition
        touched: dict[str, int] = {}
        picked: dict[str, _Entry] = {}
        for index, fact in enumerate(batch):
            view.put(fact.key, fact.data)
            for entry in self._entries_reading(fact.key):
                touched[entry.id] = index
                picked.setdefault(entry.id, entry)
        for rule_id, index in touched.items():
            entry = picked[rule_id]
            self._decide_entry(transition, entry, view, states, now, "fact", index, book, approvals)
        return transition

    def plan_rules(
        self,
        facts: FactTable,
        states: Mapping[str, RuleState],
        rules: Iterable[Rule],
        now: datetime,
        trigger: Trigger,
        *,
        book: EscrowBook | None = None,
        approvals: ApprovalStanding | None = None,
        record_unchanged: bool = True,
    ) -> Transition:
        """Plan evaluating ``rules`` without a new fact (a reload, or the clock moving on).

        With ``record_unchanged`` False, a decision is kept only when the gate changed or the
        rule fired (clock ticks would otherwise flood the audit log).
        """
        book = book if book is not None else EscrowBook({})
        transition = Transition(planned_at=now)
        for rule in rules:
            before = states.get(rule.id, RuleState(rule.id))
            self._decide(transition, rule, facts, states, now, trigger, None, book, approvals)
            decision = transition.decisions[-1]
            unchanged = (
                decision.firing_id is None
                and before.gate_open == decision.gate_open
                and before.rule_hash == rule.content_hash
            )
            if unchanged and not record_unchanged:
                transition.decisions.pop()
                transition.rule_states.pop(rule.id, None)
        return transition

    def explain(
        self,
        rule: Rule,
        facts: FactTable,
        state: RuleState | None,
        now: datetime,
        approvals: ApprovalStanding | None = None,
    ) -> dict[str, Any]:
        """The rule's current explanation (JSON-ready): gate, sub-conditions, missing facts,
        approvals counted, whether it is paused and how often it fired."""
        evaluation = rule.condition.evaluate(ProjectFacts(rule.project, facts), now)
        standing = approvals_status(rule, (approvals or {}).get(rule.id, {}))
        state = state or RuleState(rule.id)
        return {
            "gate_open": evaluation.value and standing["satisfied"],
            "condition": evaluation_to_json(evaluation),
            "approvals": standing,
            "paused": state.paused,
            "fired_count": state.fired_count,
            "rearms": state.rearms,
            "last_fired_at": state.last_fired_at,
            "evaluated_at": format_rfc3339(now),
        }

    def plan_approval(
        self,
        facts: FactTable,
        states: Mapping[str, RuleState],
        approvals: ApprovalStanding,
        approval: ApprovalInput,
        now: datetime,
        book: EscrowBook | None = None,
    ) -> Transition:
        """Plan recording ``approval`` and re-evaluating its rule with it counted."""
        rule = self.rules[approval.rule_id]
        standing = dict(approvals.get(rule.id, {}))
        if approval.decision == "withdraw":
            standing.pop(approval.subject, None)
        else:
            standing[approval.subject] = approval.decision
        view = {**approvals, rule.id: standing}
        transition = Transition(approvals=[approval], planned_at=now)
        book = book if book is not None else EscrowBook({})
        self._decide(transition, rule, facts, states, now, "approval", 0, book, view)
        return transition

    def plan_admin(
        self,
        facts: FactTable,
        states: Mapping[str, RuleState],
        approvals: ApprovalStanding,
        act: AdminAct,
        now: datetime,
        book: EscrowBook | None = None,
    ) -> Transition:
        """Plan an admin act on a rule (pause, resume, rearm) and re-evaluate the rule under
        its new state: a resumed or re-armed rule whose gate is open fires at once.

        Raises ``ValueError`` when the act does not apply (re-arming an each_time rule, or
        a rule that has not fired; pausing a paused rule; resuming a running one)."""
        rule = self.rules[act.rule_id]
        state = states.get(rule.id, RuleState(rule.id))
        if act.act == "pause":
            if state.paused:
                raise ValueError(f"rule {rule.id} is already paused")
            state = replace(state, paused=True)
        elif act.act == "resume":
            if not state.paused:
                raise ValueError(f"rule {rule.id} is not paused")
            state = replace(state, paused=False)
        else:
            if rule.fire != "once":
                raise ValueError(f"rule {rule.id} fires each_time; only once rules are re-armed")
            if state.fired_count <= state.rearms:
                raise ValueError(f"rule {rule.id} has not fired since it was last armed")
            # the next open gate fires again; an open gate now counts as a fresh edge
            state = replace(state, rearms=state.fired_count, gate_open=False)
        transition = Transition(admin_acts=[act], planned_at=now)
        transition.rule_states[rule.id] = state
        book = book if book is not None else EscrowBook({})
        self._decide(transition, rule, facts, states, now, "admin", None, book, approvals)
        return transition

    def _decide(
        self,
        transition: Transition,
        rule: Rule,
        facts: FactTable,
        states: Mapping[str, RuleState],
        now: datetime,
        trigger: Trigger,
        fact_index: int | None,
        book: EscrowBook,
        standing: ApprovalStanding | None = None,
    ) -> None:
        entry = _Entry(rule, rule.project)
        self._decide_entry(
            transition, entry, facts, states, now, trigger, fact_index, book, standing
        )

    def _decide_entry(
        self,
        transition: Transition,
        entry: _Entry,
        facts: FactTable,
        states: Mapping[str, RuleState],
        now: datetime,
        trigger: Trigger,
        fact_index: int | None,
        book: EscrowBook,
        standing: ApprovalStanding | None = None,
    ) -> None:
        """Evaluate the rule of ``entry`` and add its decision, new state and any queued
        actions to ``transition``."""
        rule_id = entry.id
        state = transition.rule_states.get(rule_id) or states.get(rule_id) or RuleState(rule_id)
        evaluation = entry.condition.evaluate(ProjectFacts(entry.project, facts), now)
        value = evaluation.value
        approvals_rule = entry.approvals
        if approvals_rule is None:  # no sign-off: the gate is the condition
            approvals = None
            gate_open = value
        else:
            approvals = approvals_status(entry.rule, (standing or {}).get(rule_id, {}))
            gate_open = value and bool(approvals["satisfied"])
        outcome = _outcome(entry.fire, state, value, gate_open)
        decided_at = _format_now(now)
        firing_id = None
        reason = None
        content_hash = entry.content_hash
        if state.gate_open is gate_open and state.rule_hash == content_hash:
            new_state = state  # unchanged (the common case): no copy
        else:
            new_state = replace(state, gate_open=gate_open, rule_hash=content_hash)
        if outcome == "fired":
            rule = entry.rule
            firing_id = f"{rule_id}#{state.fired_count + 1}"
            new_state = replace(
                new_state, fired_count=state.fired_count + 1, last_fired_at=decided_at
            )
            reason = book.refusal_of_all(r for r in rule.actions if isinstance(r, ReleaseAction))
            if reason is None:
                self._queue_firing(transition, rule, firing_id, now, book)
            else:
                outcome = "blocked"
                self._queue_alert(transition, rule, firing_id, now, reason)
        transition.rule_states[rule_id] = new_state
        # Decision(...) without the frozen dataclass's __init__ (fourteen object.__setattr__
        # calls, about 1 µs): the very same instance, its fields set in the same order.
        decision = _new(Decision)
        fields = decision.__dict__
        fields["rule_id"] = rule_id
        fields["rule_hash"] = content_hash
        fields["ruleset_version"] = self.ruleset.version
        fields["git_commit"] = self.ruleset.git_commit
        fields["trigger"] = trigger
        fields["outcome"] = outcome
        fields["gate_open"] = gate_open
        fields["evaluation"] = evaluation
        fields["decided_at"] = decided_at
        fields["fact_index"] = fact_index
        fields["firing_id"] = firing_id
        fields["approvals"] = approvals if approvals_rule else None
        fields["reason"] = reason
        fields["project"] = entry.project
        transition.decisions.append(decision)

    def _queue_firing(
        self,
        transition: Transition,
        rule: Rule,
        firing_id: str,
        now: datetime,
        book: EscrowBook,
    ) -> None:
        actions = render_actions(rule, firing_id, now, self.new_action_id)
        transition.actions.extend(actions)
        for action in actions:
            if action.kind == "release":
                payload = action.payload
                book.commit(payload["escrow"], payload["amount"])
                transition.ledger.append(
                    LedgerEntry(
                        release_id=payload["release_id"],
                        escrow=payload["escrow"],
                        amount=payload["amount"],
                        currency=payload["currency"],
                        payee=payload["payee"],
                        rule_id=rule.id,
                        firing_id=firing_id,
                        recorded_at=action.created_at,
                    )
                )

    def _queue_alert(
        self, transition: Transition, rule: Rule, firing_id: str, now: datetime, reason: str
    ) -> None:
        """Tell the alert target (when configured) that a release was blocked."""
        if self.alert_target is None:
            return
        releases = "; ".join(
            f"{a.amount} {a.currency} from {a.escrow} to {a.payee}"
            for a in rule.actions
            if isinstance(a, ReleaseAction)
        )
        message = f"gatekeeper blocked the release of {releases} by rule {rule.id}: {reason}"
        transition.actions.append(
            QueuedAction(
                action_id=self.new_action_id(),
                kind="notify",
                target=self.alert_target,
                rule_id=rule.id,
                firing_id=firing_id,
                payload={
                    "project": rule.project,
                    "message": message,
                    "alert": "release_blocked",
                    "reason": reason,
                },
                created_at=format_rfc3339(now),
            )
        )


_new = object.__new__

_format_now = functools.lru_cache(maxsize=4)(format_rfc3339)
"""``format_rfc3339`` of the planning "now", formatted once per plan, not once per rule."""


def _outcome(fire: FireMode, state: RuleState, condition: bool, gate_open: bool) -> Outcome:
    if not condition:
        return "not_met"
    if not gate_open:
        return "awaiting_approvals"
    if fire == "once" and state.fired_count > state.rearms:
        return "already_fired"
    if fire == "each_time" and state.gate_open:
        return "still_met"
    return "paused" if state.paused else "fired"


def apply_transition(
    transition: Transition,
    facts: FactTable,
    states: dict[str, RuleState],
    approvals: dict[str, dict[str, str]],
    book: EscrowBook,
) -> None:
    """Apply a committed ``transition`` to in-memory state: the current facts, the rule
    states, the approvers' standing decisions and the escrows' committed amounts. The daemon
    does it after each commit; ``gatekeeper test`` and ``plan`` after each planned step."""
    for fact in transition.facts:
        facts.put(fact.key, fact.data)
    states.update(transition.rule_states)
    for approval in transition.approvals:
        standing = approvals.setdefault(approval.rule_id, {})
        if approval.decision == "withdraw":
            standing.pop(approval.subject, None)
        else:
            standing[approval.subject] = approval.decision
    for entry in transition.ledger:
        book.commit(entry.escrow, entry.amount)


def approvals_status(rule: Rule, standing: Mapping[str, str]) -> dict[str, Any]:
    """How the rule's sign-off stands, from each approver's standing decision
    (``{subject: "approve" | "reject"}``): required, from, approved_by, rejected_by, satisfied.

    Only approvers listed in the rule's ``from`` count; distinct approvers are counted; a
    standing reject from any of them blocks the rule until withdrawn.
    """
    if rule.approvals is None:
        return {"required": 0, "approved_by": [], "rejected_by": [], "satisfied": True}
    listed = rule.approvals.from_
    approved = sorted(s for s in listed if standing.get(s) == "approve")
    rejected = sorted(s for s in listed if standing.get(s) == "reject")
    return {
        "required": rule.approvals.required,
        "from": list(listed),
        "approved_by": approved,
        "rejected_by": rejected,
        "satisfied": len(approved) >= rule.approvals.required and not rejected,
    }


def render_actions(
    rule: Rule,
    firing_id: str,
    fired_at: datetime,
    new_action_id: Callable[[], str] = uuid_action_id,
) -> list[QueuedAction]:
    """The actions one firing queues, each with a fresh id from ``new_action_id`` that stays
    stable across retries."""
    values = template_values(rule, fired_at)
    queued = []
    for action in rule.actions:
        action_id = new_action_id()
        payload = {"project": rule.project, **_render_payload(action, values)}
        if isinstance(action, ReleaseAction):
            payload["release_id"] = action_id
        queued.append(
            QueuedAction(
                action_id=action_id,
                kind=action.kind,
                target=action.target,
                rule_id=rule.id,
                firing_id=firing_id,
                payload=payload,
                created_at=values["fired_at"],
            )
        )
    return queued


def _render_payload(action: Action, values: Mapping[str, str]) -> dict[str, Any]:
    if isinstance(action, ReleaseAction):
        return {
            "escrow": action.escrow,
            "amount": action.amount,
            "currency": action.currency,
            "payee": action.payee,
        }
    if isinstance(action, NotifyAction):
        return {"message": render_template(action.message, values)}
    if isinstance(action, PipelineAction):
        return {"ref": action.ref, "inputs": dict(action.inputs)}
    raise TypeError(f"unknown action {action!r}")


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
    }
