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

The caller (the runtime's ``Writer``, ``gatekeeper.runtime.ingest``) commits the returned
``Transition`` in one transaction and only then applies it to its in-memory state.
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.ledger import EscrowBook, LedgerEntry
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    ApprovalStanding,
    Decision,
    FactInput,
    FactKey,
    Outcome,
    QueuedAction,
    RuleState,
    Transition,
    Trigger,
    evaluation_to_json,
)
from gatekeeper.expr import FactRef
from gatekeeper.rules.model import (
    Action,
    FireMode,
    NotifyAction,
    PipelineAction,
    ReleaseAction,
    Rule,
    Ruleset,
    SetFactAction,
)
from gatekeeper.rules.templates import render_template, template_values


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
                self._decide(transition, entry, view, states, now, "fact", 0, book, approvals)
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
            self._decide(transition, entry, view, states, now, "fact", index, book, approvals)
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
            entry = _Entry(rule, rule.project)
            self._decide(transition, entry, facts, states, now, trigger, None, book, approvals)
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
        _stand(standing, approval)
        view = {**approvals, rule.id: standing}
        transition = Transition(approvals=[approval], planned_at=now)
        book = book if book is not None else EscrowBook({})
        entry = _Entry(rule, rule.project)
        self._decide(transition, entry, facts, states, now, "approval", 0, book, view)
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
        entry = _Entry(rule, rule.project)
        self._decide(transition, entry, facts, states, now, "admin", None, book, approvals)
        return transition

    def _decide(
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
        """Evaluate the rule of ``entry`` (``_Entry(rule, rule.project)`` for a rule picked
        outside the fact index) and add its decision, new state and any queued actions to
        ``transition``."""
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
        fields["instance"] = ""
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
        _stand(approvals.setdefault(approval.rule_id, {}), approval)
    for entry in transition.ledger:
        book.commit(entry.escrow, entry.amount)


def _stand(standing: dict[str, str], approval: ApprovalInput) -> None:
    """Record ``approval`` in one rule's ``standing`` (``{subject: decision}``): a withdrawal
    removes the subject's decision, any other decision replaces it."""
    if approval.decision == "withdraw":
        standing.pop(approval.subject, None)
    else:
        standing[approval.subject] = approval.decision


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
        if isinstance(action, SetFactAction):
            continue  # recorded as a fact, not sent
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
