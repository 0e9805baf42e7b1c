"""Rule evaluation, pure: facts in, decisions and queued actions out, no I/O.

The engine keeps an index from the fact keys each rule reads (found statically from its
``when`` expression, see ``Condition.reads``) to the rules, so a fact re-evaluates only the
rules that read it: the cost of a fact does not grow with the size of the ruleset.

A rule is decided per *instance*, ``InstanceKey = (rule id, item id)``: a rule without
``for_each`` has the one instance ``(id, "")``; a per-item rule (``for_each: KIND``) one per
fact of KIND in its project, evaluated with that fact as ``item``. A fact of KIND
re-evaluates its own instance only; a fact the rule reads otherwise (by id, or its whole
kind) every instance. Firing ids are ``<rule id>#<n>`` and ``<rule id>[<item id>]#<n>``.

A rule's *gate* is its condition together with its approvals (``approvals: {required: N}``).
Firing follows the rule's ``fire`` mode:

- ``once``: the first time the gate is open, and never again for that rule id (the count of
  firings is persisted, so this holds across restarts and reloads);
- ``each_time``: on every closed -> open edge of the gate (a rule never seen before counts
  as closed, so a newly loaded rule whose gate is already open fires at once);
- ``each_fact`` (an event rule): at every fact that triggers it while its gate is open,
  whatever it was before; each fact of a batch decides it on its own, seeing the batch
  applied up to and including that fact. Nothing but a fact fires it (a reload or tick
  finds it ``still_met``). A per-item event rule is triggered by its own item only.

``once`` and ``each_time`` hold per instance. A firing's ``set_fact`` actions append facts
(with ``caused_by``) to the same transition, evaluated like posted facts, level by level
(breadth first: the facts a level's firings set form the next level), up to
``max_chain_depth`` levels; a firing that would set a deeper fact is ``blocked``. Within
one chain (the firings that led, one fact after the other, from one fact or act from
outside to a decision) a rule instance fires at most once: a second firing is a loop and
is ``blocked``, whatever the depth. A firing is also ``blocked`` when a release does not
fit its escrow or a template name has no value; nothing of a blocked firing is sent or
recorded but the alert.

A rule runs in its *effective mode* (``signoffs.effective_mode``): ``live``, ``shadow``
(``mode: shadow``) or ``awaiting_signoff`` (a money rule whose content hash lacks the
sign-offs ``money_rule_approvals`` asks for). Out of ``live`` it decides and records as
usual (state, firing ids, a ``once`` firing used up, approvals consumed), but a firing's
outcome is ``shadowed`` and everything it queues is a shadowed action: stored, never sent;
no ledger entry, nothing counted against an escrow, no fact set (a ``set_fact`` is stored
as a shadowed action of kind ``set_fact``). The first shadowed release of a money rule
awaiting sign-off tells the alert target, once per content hash
(``money_rule_awaiting_signoff``).

A firing blocked by its release (over the escrow's limit, another currency, a bad amount
read from a fact) does not count as the instance's firing: its state keeps the reason
(``RuleState.blocked``) and the firing's number (``blocks``), and while its gate stays open
later evaluations find it ``still_blocked`` (no new attempt, no new alert). It tries again
at a new edge of its gate, when re-armed, under a new version of the rule, or when planned
with ``retry`` (a change of its escrow), or when an amount returns to its escrow (a
cancelled release, a failed settlement: ``plan_return``, trigger ``return``); an
``each_fact`` rule tries at every fact.

The caller (the runtime's ``Writer``, ``gatekeeper.runtime.ingest``) commits the returned
``Transition`` in one transaction and only then applies it to its in-memory state.
"""

from __future__ import annotations

import functools
import uuid
from collections import ChainMap, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, MutableMapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from gatekeeper.clock import format_rfc3339
from gatekeeper.config import Config, Escrow
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.ledger import EscrowBook, LedgerEntry, checked_amount
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    ApprovalStanding,
    CausedBy,
    Consumption,
    Decision,
    EffectiveMode,
    FactInput,
    FactKey,
    InstanceKey,
    Outcome,
    QueuedAction,
    RuleState,
    Stand,
    Transition,
    Trigger,
    evaluation_to_json,
    split_fact_name,
)
from gatekeeper.engine.signoffs import SignedOff, SignOffBook, effective_mode
from gatekeeper.expr import Evaluation, Item
from gatekeeper.rules.model import (
    FACT_ID,
    FACT_ID_RULE,
    Action,
    FireMode,
    NotifyAction,
    PipelineAction,
    ReleaseAction,
    Rule,
    Ruleset,
    SetFactAction,
)
from gatekeeper.rules.templates import (
    MISSING,
    Resolve,
    TemplateError,
    amount_value,
    render_template,
    render_value,
    slack_escape,
    template_resolver,
)

DEFAULT_MAX_CHAIN_DEPTH = 16
"""How deep a chain of rules setting facts may go by default (``max_chain_depth``)."""

Chain = tuple[InstanceKey, ...]
"""The rule instances whose firings, one setting a fact that fired the next, led to a
decision, first first; ``()`` for a decision made by a fact or act from outside."""


def loop_refusal(rule: Rule, item: str, chain: Chain) -> str | None:
    """Why a firing of instance ``item`` of ``rule`` is a loop, or None: when the instance
    already fired in its ``chain`` (the same fact from outside led to both firings). E.g.
    ``loop: p/pay already fired in this chain (p/pay -> p/bounce -> p/pay)``."""
    key = (rule.id, item)
    if key not in chain:
        return None

    def name(instance: InstanceKey) -> str:
        return instance[0] if not instance[1] else f"{instance[0]}[{instance[1]}]"

    path = " -> ".join(name(k) for k in (*chain[chain.index(key) :], key))
    return f"loop: {name(key)} already fired in this chain ({path})"


class _Entry:
    """What deciding one rule reads, in one small object: the rule and the fields of it
    that every decision uses. An engine builds them one after the other, in rule order, so
    that the entries of neighbouring rules (often the rules reading one fact) share cache
    lines instead of being scattered over the heap with the rest of each rule. ``key`` is
    the ``InstanceKey`` of the rule's one instance (``(id, "")``), the one tuple the rule
    states of the engine's plans are kept under."""

    __slots__ = (
        "approvals",
        "checks_mode",
        "condition",
        "content_hash",
        "event",
        "fire",
        "for_each",
        "id",
        "key",
        "project",
        "rule",
        "time_dependent",
    )

    def __init__(self, rule: Rule, project: str) -> None:
        self.rule = rule
        self.id = rule.id
        self.key = (rule.id, "")
        self.project = project
        self.content_hash = rule.content_hash
        self.condition = rule.condition
        self.fire = rule.fire
        self.approvals = rule.approvals
        self.for_each = rule.for_each
        self.event = rule.fire == "each_fact"
        self.checks_mode = rule.mode == "shadow" or rule.release is not None
        """Whether its mode may be other than live (``mode: shadow``, or a money rule)."""
        self.time_dependent = rule.condition.uses_time or _lapsing(rule)
        """Whether time alone can change it (see ``Engine.time_dependent``)."""


class _TimeDependentIds(AbstractSet[str]):
    """The ids of an engine's time-dependent rules (``Engine.time_dependent_ids``), read
    from its entries: a set of its own would take about 50 bytes per rule."""

    __slots__ = ("_count", "_entries")

    def __init__(self, entries: Mapping[str, _Entry]) -> None:
        self._entries = entries
        self._count = sum(1 for entry in entries.values() if entry.time_dependent)

    def __contains__(self, rule_id: object) -> bool:
        entry = self._entries.get(rule_id) if isinstance(rule_id, str) else None
        return entry is not None and entry.time_dependent

    def __iter__(self) -> Iterator[str]:
        return (rule_id for rule_id, entry in self._entries.items() if entry.time_dependent)

    def __len__(self) -> int:
        return self._count


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

    ``max_chain_depth`` bounds chains of rules setting facts (``set_fact``): a fact posted
    has depth 0, a fact set by a firing it caused depth 1, and so on; a firing that would
    set a fact deeper than the bound is ``blocked`` (nothing of it is recorded or sent) and
    the alert target is told. ``target_formats`` maps a target name to its message format
    (``"slack"`` targets get ``&``, ``<``, ``>`` escaped in substituted template values).
    ``signoffs`` holds ``money_rule_approvals`` and the sign-offs recorded so far (read at
    each decision: the runtime adds a sign-off to it once committed); None: none required.
    """

    def __init__(
        self,
        ruleset: Ruleset,
        *,
        alert_target: str | None = None,
        new_action_id: Callable[[], str] = uuid_action_id,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        target_formats: Mapping[str, str] | None = None,
        signoffs: SignOffBook | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.signoffs = signoffs if signoffs is not None else SignOffBook()
        self.alert_target = alert_target
        self.new_action_id = new_action_id
        self.max_chain_depth = max_chain_depth
        self.target_formats: Mapping[str, str] = dict(target_formats or {})
        self.rules: dict[str, Rule] = ruleset.by_id()
        self.time_dependent: tuple[Rule, ...] = tuple(
            r for r in ruleset.rules if r.condition.uses_time or _lapsing(r)
        )
        """The rules time alone can change: their condition reads the clock, or their
        approvals lapse (``approvals.expires_after``)."""
        by_fact, by_kind = self._rule_index
        # One entry per rule, allocated in rule order; one tuple of entries per fact key
        # (the rules reading it by id, then those reading its whole kind, each once).
        projects: dict[str, str] = {}
        entries = {  # as in self.rules, the last rule of an id is the one
            rule.id: _Entry(rule, projects.setdefault(rule.project, rule.project))
            for rule in ruleset.rules
        }
        self._entries = entries
        self.time_dependent_ids: AbstractSet[str] = _TimeDependentIds(entries)
        """The ids of ``time_dependent`` (a view of the entries, not a set of its own)."""
        self._entries_by_fact: dict[FactKey, tuple[_Entry, ...]] = {
            key: _entries(entries, [*rules, *by_kind.get((key[0], key[1]), [])])
            for key, rules in by_fact.items()
        }
        self._entries_by_kind: dict[tuple[str, str], tuple[_Entry, ...]] = {
            key: _entries(entries, rules) for key, rules in by_kind.items()
        }
        del self._rule_index  # made again when asked (``rules_reading``)
        by_item_kind: dict[tuple[str, str], list[Rule]] = defaultdict(list)
        for rule in self.rules.values():
            if rule.for_each is not None:
                by_item_kind[(rule.project, rule.for_each)].append(rule)
        self._entries_by_item_kind: dict[tuple[str, str], tuple[_Entry, ...]] = {
            key: _entries(entries, rules) for key, rules in by_item_kind.items()
        }
        self._special_kinds = set(by_item_kind)
        for rule in self.rules.values():
            if rule.for_each is not None or rule.fire == "each_fact":
                self._special_kinds.update((rule.project, ref.kind) for ref in rule.condition.reads)

    @classmethod
    def for_config(
        cls,
        ruleset: Ruleset,
        config: Config,
        *,
        new_action_id: Callable[[], str] = uuid_action_id,
        signed: SignedOff | None = None,
        presumed_signed: frozenset[str] = frozenset(),
    ) -> Engine:
        """An engine for ``ruleset`` as ``config`` (``gatekeeper.yaml``) sets it up: its
        alert target, ``max_chain_depth``, each target's message format and
        ``money_rule_approvals``, with the sign-offs ``signed`` (``SignOffBook.signed``,
        shared, not copied: the runtime adds to it; None: none yet) and the content hashes
        ``presumed_signed`` taken as signed off (``SignOffBook.presumed``: a backtest's)."""
        return cls(
            ruleset,
            alert_target=config.alert_target,
            new_action_id=new_action_id,
            max_chain_depth=config.max_chain_depth,
            target_formats={name: target.format for name, target in config.targets.items()},
            signoffs=SignOffBook(
                config.money_rule_approvals,
                signed if signed is not None else {},
                presumed_signed,
            ),
        )

    def mode_of(self, rule: Rule) -> EffectiveMode:
        """The mode ``rule`` runs in now (``signoffs.effective_mode``)."""
        return effective_mode(rule, self.signoffs)

    @functools.cached_property
    def _rule_index(
        self,
    ) -> tuple[dict[FactKey, list[Rule]], dict[tuple[str, str], list[Rule]]]:
        """``(by fact key, by (project, kind))``: the rules reading each fact by id, and
        each kind whole, in ruleset order (a rule once per read). Built for the entries,
        then dropped: only ``rules_reading`` asks for it again."""
        by_fact: dict[FactKey, list[Rule]] = defaultdict(list)
        by_kind: dict[tuple[str, str], list[Rule]] = defaultdict(list)
        for rule in self.ruleset.rules:
            for ref in rule.condition.reads:
                if ref.id is None:
                    by_kind[(rule.project, ref.kind)].append(rule)
                else:
                    by_fact[(rule.project, ref.kind, ref.id)].append(rule)
        return by_fact, by_kind

    def rules_reading(self, key: FactKey) -> list[Rule]:
        """The rules whose condition reads fact ``key`` (by id or by its whole kind)."""
        by_fact, by_kind = self._rule_index
        return by_fact.get(key, []) + by_kind.get((key[0], key[1]), [])

    def _entries_reading(self, key: FactKey) -> tuple[_Entry, ...]:
        """The entries of the rules reading fact ``key``, each rule once, in the order of
        ``rules_reading``."""
        found = self._entries_by_fact.get(key)
        if found is None:
            found = self._entries_by_kind.get((key[0], key[1]), ())
        return found

    def instances(self, rule: Rule, facts: FactTable) -> list[str]:
        """The item ids of ``rule``'s instances, sorted: ``[""]`` for a rule without
        ``for_each``, else the id of every current fact of its kind in its project."""
        if rule.for_each is None:
            return [""]
        return sorted(facts.of_kind(rule.project, rule.for_each))

    def instance_keys(self, rules: Iterable[Rule], facts: FactTable) -> list[InstanceKey]:
        """The ``InstanceKey`` of every instance of ``rules`` (see ``instances``); the one
        instance of a rule of this engine is its entry's key, not a new tuple."""
        keys: list[InstanceKey] = []
        entries = self._entries
        for rule in rules:
            entry = entries.get(rule.id) if rule.for_each is None else None
            if entry is not None and entry.rule is rule:
                keys.append(entry.key)
            else:
                keys.extend((rule.id, item) for item in self.instances(rule, facts))
        return keys

    def _triggered(self, key: FactKey, facts: FactTable) -> Iterator[tuple[_Entry, str]]:
        """The instances fact ``key`` (just put in ``facts``) re-evaluates: of each rule
        reading it, its one instance, or every instance of a per-item rule (a per-item
        event rule is triggered only by its own item); of each per-item rule of its kind,
        the instance of its id. An instance may be given twice (the caller keeps one)."""
        for entry in self._entries_reading(key):
            if entry.for_each is None:
                yield entry, ""
            elif not entry.event:
                for item in sorted(facts.of_kind(entry.project, entry.for_each)):
                    yield entry, item
        for entry in self._entries_by_item_kind.get((key[0], key[1]), ()):
            yield entry, key[2]

    def plan_ingest(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        batch: list[FactInput],
        now: datetime,
        book: EscrowBook | None = None,
        approvals: ApprovalStanding | None = None,
    ) -> Transition:
        """Plan applying ``batch`` atomically: every rule instance reading any of its facts
        is evaluated once, against the facts with the whole batch applied; an event rule
        (``fire: each_fact``) is decided once per fact triggering it, against the batch
        applied up to and including that fact. Facts set by the rules that fired
        (``set_fact``) are appended to the transition and evaluated the same way, level by
        level (breadth first), up to ``max_chain_depth``.

        ``book`` holds the escrows' limits and committed amounts; releases planned here are
        committed to it (pass a copy to plan without committing). Without a book no escrow
        is configured, so every release is blocked.
        """
        book = book if book is not None else EscrowBook({})
        view = facts.overlay()
        transition = Transition(facts=list(batch), planned_at=now)
        if len(batch) == 1 and self._plain_only(batch[0].key):
            # the usual batch: its rules are plain, already listed once each
            fact = batch[0]
            view.put(fact.key, fact.data)
            for entry in self._entries_reading(fact.key):
                self._decide(transition, entry, "", view, states, now, "fact", 0, book, approvals)
            if len(transition.facts) > 1:
                self._cascade(transition, view, states, now, book, approvals, 1, 1)
            return transition
        self._cascade(transition, view, states, now, book, approvals, 0, 0)
        return transition

    def _plain_only(self, key: FactKey) -> bool:
        """Whether fact ``key`` triggers only rules without ``for_each`` and ``each_fact``
        (false for every fact of a kind some other rule reads or is per item of)."""
        return (key[0], key[1]) not in self._special_kinds

    def _cascade(
        self,
        transition: Transition,
        view: FactTable,
        states: Mapping[InstanceKey, RuleState],
        now: datetime,
        book: EscrowBook,
        approvals: ApprovalStanding | None,
        start: int,
        depth: int,
    ) -> None:
        """Evaluate the facts of ``transition`` from index ``start`` on, level by level:
        the facts of one level (depth ``depth``: 0 for posted facts) are applied to
        ``view`` in order, each event rule instance they trigger decided at its fact, then
        every other instance they trigger decided once against the whole level; the facts
        those firings set form the next level.

        Each decision knows its *chain*: the rule instances whose firings set the fact
        that triggered it, and the fact that triggered those, back to a fact or act from
        outside (an instance decided against a whole level takes the chain of a fact of the
        level that leads back to it, if any, else of its last). A firing of an instance
        already in its chain is a loop and is ``blocked`` (see ``_queue_firing``)."""
        fired_after: dict[str, Chain] = {}
        """The chain of each firing decided here with a chain, by firing id."""
        while start < len(transition.facts):
            end = len(transition.facts)
            touched: dict[InstanceKey, tuple[_Entry, int, Chain]] = {}
            for index in range(start, end):
                fact = transition.facts[index]
                view.put(fact.key, fact.data)
                cause = fact.caused_by
                chain: Chain = (
                    ()
                    if cause is None
                    else (*fired_after.get(cause.firing_id, ()), (cause.rule_id, cause.instance))
                )
                decided: set[InstanceKey] = set()
                for entry, item in self._triggered(fact.key, view):
                    key = (entry.id, item)
                    if entry.event:
                        if key not in decided:
                            decided.add(key)
                            self._decide_in_chain(
                                transition,
                                entry,
                                item,
                                view,
                                states,
                                now,
                                "fact",
                                index,
                                book,
                                approvals,
                                depth,
                                chain,
                                fired_after,
                            )
                    else:  # first seen first, with the last fact of the level it reads
                        earlier = touched.get(key)
                        if earlier is not None and key in earlier[2] and key not in chain:
                            touched[key] = (entry, index, earlier[2])
                        else:
                            touched[key] = (entry, index, chain)
            for (_, item), (entry, index, chain) in touched.items():
                self._decide_in_chain(
                    transition,
                    entry,
                    item,
                    view,
                    states,
                    now,
                    "fact",
                    index,
                    book,
                    approvals,
                    depth,
                    chain,
                    fired_after,
                )
            start = end
            depth += 1

    def _decide_in_chain(
        self,
        transition: Transition,
        entry: _Entry,
        item: str,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        now: datetime,
        trigger: Trigger,
        fact_index: int,
        book: EscrowBook,
        standing: ApprovalStanding | None,
        depth: int,
        chain: Chain,
        fired_after: dict[str, Chain],
    ) -> None:
        """``_decide`` for a fact of a cascade whose firing chain is ``chain``; a firing it
        makes is entered in ``fired_after`` with that chain (a firing by a fact from
        outside, with no chain, need not be: the default is no chain)."""
        count = len(transition.decisions)
        self._decide(
            transition,
            entry,
            item,
            facts,
            states,
            now,
            trigger,
            fact_index,
            book,
            standing,
            depth,
            chain,
        )
        if chain and len(transition.decisions) > count:
            firing_id = transition.decisions[-1].firing_id
            if firing_id is not None:
                fired_after[firing_id] = chain

    def plan_rules(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        rules: Iterable[Rule],
        now: datetime,
        trigger: Trigger,
        *,
        book: EscrowBook | None = None,
        approvals: ApprovalStanding | None = None,
        record_unchanged: bool = True,
        record_first: bool = True,
        retry: Collection[str] = (),
    ) -> Transition:
        """Plan evaluating ``rules`` without a new fact (a reload, or the clock moving on):
        every instance of each (every fact of a per-item rule's kind), see
        ``plan_instances``."""
        rules = list(rules)
        mine = self.rules
        return self.plan_instances(
            facts,
            states,
            self.instance_keys(rules, facts),
            now,
            trigger,
            book=book,
            approvals=approvals,
            record_unchanged=record_unchanged,
            record_first=record_first,
            # this engine's rules resolve themselves: no dict of them per plan
            rules=None
            if all(mine.get(rule.id) is rule for rule in rules)
            else {rule.id: rule for rule in rules},
            retry=retry,
        )

    def plan_instances(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        keys: Iterable[InstanceKey],
        now: datetime,
        trigger: Trigger,
        *,
        book: EscrowBook | None = None,
        approvals: ApprovalStanding | None = None,
        record_unchanged: bool = True,
        record_first: bool = True,
        rules: Mapping[str, Rule] | None = None,
        retry: Collection[str] = (),
    ) -> Transition:
        """Plan evaluating the rule instances ``keys`` without a new fact (a reload, the
        clock moving on): an instance whose item no longer exists is skipped. Facts set by
        the firings are evaluated as in ``plan_ingest``.

        With ``record_unchanged`` False, a decision is kept only when the gate changed or the
        rule fired (clock ticks would otherwise flood the audit log). The decision of an
        instance of a per-item rule is kept only then in any case: a reload of a rule over
        100,000 items records what changed, not 100,000 decisions. With ``record_first``
        False (the daemon's reloads), the same holds for an instance evaluated for the first
        time under this version of the rule: when nothing is decided (no firing, no notice,
        the gate stays closed or open), it keeps its new state (which records the version,
        so the next reload skips it) without a decision; ``plan`` and rule tests keep those
        decisions to show every instance. ``rules`` resolves rule ids (default: this
        engine's rules).

        ``retry`` names rules whose blocked instances (``RuleState.blocked``, the gate still
        open) try their release again (an escrow they release from changed): each is
        decided as if its gate had just opened. (A new version of a rule tries its blocked
        instances again anyway: an instance is held ``still_blocked`` only under the version
        that blocked it.)"""
        book = book if book is not None else EscrowBook({})
        rules = rules if rules is not None else self.rules
        transition = Transition(planned_at=now)
        shared_seen: dict[str, Mapping[str, Any]] = {}
        for rule_id, item in keys:
            rule = rules[rule_id]
            key = (rule_id, item)
            before = states.get(key) or RuleState(rule_id, instance=item)
            seen = states
            if before.blocked is not None and before.gate_open and rule_id in retry:
                before = replace(before, gate_open=False)  # a fresh edge: try again
                # ChainMap only reads the maps after its first: the states are not copied
                seen = ChainMap({key: before}, cast(MutableMapping[InstanceKey, RuleState], states))
            entry = self._entries.get(rule_id)
            if entry is None or entry.rule is not rule:  # not this engine's rule
                entry = _Entry(rule, rule.project)
            count = len(transition.decisions)
            self._decide(
                transition,
                entry,
                item,
                facts,
                seen,
                now,
                trigger,
                None,
                book,
                approvals,
                shared_seen=shared_seen,
            )
            if len(transition.decisions) == count:
                continue  # no such instance (its item is gone)
            decision = transition.decisions[-1]
            quiet = (
                decision.firing_id is None
                and decision.notice_id is None
                and before.notified == transition.rule_states[key].notified
                and bool(before.gate_open) == decision.gate_open
            )
            unchanged = quiet and before.rule_hash == rule.content_hash
            if unchanged and (not record_unchanged or rule.for_each is not None):
                transition.decisions.pop()
                transition.rule_states.pop(key, None)
            elif quiet and not record_first and rule.for_each is not None:
                transition.decisions.pop()  # new version, nothing decided: the state says it
        if transition.facts:
            self._cascade(transition, facts.overlay(), states, now, book, approvals, 0, 1)
        return transition

    def plan_return(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        escrow: str,
        now: datetime,
        book: EscrowBook,
        approvals: ApprovalStanding | None = None,
    ) -> Transition:
        """Plan trying again, at once, the blocked releases an amount returned to ``escrow``
        (a cancelled release, a failed settlement; ``book`` already has it back) may now
        let through: the instances of this engine's rules releasing from ``escrow``
        (``releases_from``) whose state is ``blocked`` with the gate open, not paused and
        not of ``each_fact`` rules (nothing but a fact tries those), in ruleset order then
        item order, are decided as with ``retry`` (trigger ``return``). Only what
        changes is kept: an instance blocked again (its release still does not fit) keeps
        its state, its decision and its one alert of the episode (it is planned again
        without it; a blocked firing commits nothing, so the others decide the same).
        An empty transition when nothing was blocked on ``escrow``."""
        order = {rule.id: index for index, rule in enumerate(self.ruleset.rules)}
        keys = sorted(
            (
                key
                for key, state in states.items()
                if state.blocked is not None
                and state.gate_open
                and key[0] in self.rules
                and self.rules[key[0]].fire != "each_fact"  # only a fact tries those
                and not instance_paused(states, *key)
                and releases_from(self.rules[key[0]], (escrow,))
            ),
            key=lambda key: (order[key[0]], key[1]),
        )
        while True:
            transition = self.plan_instances(
                facts,
                states,
                keys,
                now,
                "return",
                book=book.copy(),
                approvals=approvals,
                record_unchanged=False,
                retry={key[0] for key in keys},
            )
            again = {
                (d.rule_id, d.instance)
                for d in transition.decisions
                if d.outcome == "blocked" and (d.rule_id, d.instance) in keys
            }
            if not again:
                return transition
            keys = [key for key in keys if key not in again]

    def explain(
        self,
        rule: Rule,
        facts: FactTable,
        state: RuleState | None,
        now: datetime,
        approvals: ApprovalStanding | None = None,
        item: str = "",
        whole: RuleState | None = None,
    ) -> dict[str, Any]:
        """The rule's current explanation (JSON-ready): gate, sub-conditions, missing facts,
        approvals counted, whether it is paused, how often it fired and why its release is
        blocked (``blocked``: the reason, None when it is not). ``item`` names the
        instance of a per-item rule (``KeyError`` when it has no such instance; ``""`` for
        a plain rule, or a per-item rule explained without an item: its ``item`` names are
        missing and ``item`` is None). ``whole`` is the state of a per-item rule as a whole
        (its instance ``""``): when it is paused, so is every instance explained."""
        data = self._item_data(rule, item, facts)
        if rule.for_each is not None and item and data is None:
            raise KeyError(f"rule {rule.id} has no instance {item!r}")
        evaluation = _evaluate(rule, ProjectFacts(rule.project, facts), now, item, data)
        standing = approvals_status(
            rule, (approvals or {}).get(approval_key(rule.id, item), {}), now
        )
        state = state or RuleState(rule.id, instance=item)
        explained: dict[str, Any] = {
            "gate_open": evaluation.value and standing["satisfied"],
            "condition": evaluation_to_json(evaluation),
            "approvals": standing,
            "paused": state.paused
            or (rule.for_each is not None and whole is not None and whole.paused),
            "fired_count": state.fired_count,
            "rearms": state.rearms,
            "last_fired_at": state.last_fired_at,
            "blocked": state.blocked,
            "evaluated_at": format_rfc3339(now),
        }
        if rule.for_each is not None:  # without an item: its names are missing
            explained["item"] = (
                None if data is None else {"kind": rule.for_each, "id": item, "data": data}
            )
        return explained

    @staticmethod
    def _item_data(rule: Rule, item: str, facts: FactTable) -> Mapping[str, Any] | None:
        if rule.for_each is None:
            return None
        return facts.get((rule.project, rule.for_each, item))

    def plan_approval(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        approvals: ApprovalStanding,
        approval: ApprovalInput,
        now: datetime,
        book: EscrowBook | None = None,
    ) -> Transition:
        """Plan recording ``approval`` and re-evaluating its rule with it counted: the
        instance it names (``approval.instance``), or the rule's every instance when it names
        none (the instances of a per-item rule count only the approvals naming them:
        ``approval_key``)."""
        rule = self.rules[approval.rule_id]
        key = approval_key(rule.id, approval.instance)
        standing = dict(approvals.get(key, {}))
        _stand(standing, approval, now)
        view = {**approvals, key: standing}
        transition = Transition(approvals=[approval], planned_at=now)
        book = book if book is not None else EscrowBook({})
        entry = _Entry(rule, rule.project)
        items = [approval.instance] if approval.instance else self.instances(rule, facts)
        for item in items:
            self._decide(transition, entry, item, facts, states, now, "approval", 0, book, view)
        if transition.facts:
            self._cascade(transition, facts.overlay(), states, now, book, view, 0, 1)
            # the approval's seq follows the facts' (seqs are facts, then approvals)
            first = len(transition.facts)
            transition.decisions = [
                replace(d, fact_index=first) if d.trigger == "approval" else d
                for d in transition.decisions
            ]
        return transition

    def plan_admin(
        self,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        approvals: ApprovalStanding,
        act: AdminAct,
        now: datetime,
        book: EscrowBook | None = None,
    ) -> Transition:
        """Plan an admin act on a rule (pause, resume, rearm) and re-evaluate the rule under
        its new state: a resumed or re-armed rule whose gate is open fires at once. The
        transition's one admin act carries ``instances``, how many instances of a per-item
        rule acted on without an item it changed.

        ``act.instance`` names one instance of a per-item rule; without it the act applies
        to the rule's one instance, or to a per-item rule as a whole:

        - ``pause`` pauses the rule as a whole (kept as the state of its instance ``""``,
          ``rule_paused``): every instance, those whose item is posted later too, is
          evaluated and recorded ``paused`` instead of firing; it works with no instance;
        - ``resume`` lifts that pause; an instance paused by its item stays paused (its own
          reason stands). When the rule as a whole is not paused, it resumes every instance
          paused by its item instead;
        - ``rearm`` re-arms every instance that fired since it was last armed, or whose
          release is blocked (it tries again at once when its gate is open).

        Raises ``KeyError`` when the rule has no instance ``act.instance``, ``ValueError``
        when the act does not apply (re-arming an each_time rule, or a rule that has not
        fired; pausing a paused rule; resuming a running one; resuming an instance that is
        paused only with its rule as a whole; re-arming a per-item rule none of whose
        instances fired)."""
        rule = self.rules[act.rule_id]
        per_item = rule.for_each is not None
        whole_key = (rule.id, "")
        whole = states.get(whole_key) or RuleState(rule.id)
        if act.instance is not None and act.instance != "":
            if self._item_data(rule, act.instance, facts) is None:
                raise KeyError(f"rule {rule.id} has no instance {act.instance!r}")
            key = (rule.id, act.instance)
            state = states.get(key) or RuleState(rule.id, instance=act.instance)
            if act.act == "resume" and not state.paused and whole.paused:
                raise ValueError(
                    f"rule {rule.id}[{act.instance}] is not paused by its item; the rule is "
                    "paused as a whole (resume it without an item)"
                )
            items = [act.instance]
        else:
            items = self.instances(rule, facts)
        transition = Transition(admin_acts=[act], planned_at=now)
        book = book if book is not None else EscrowBook({})
        entry = _Entry(rule, rule.project)
        acted = []
        if per_item and not act.instance and act.act == "pause":
            # the rule as a whole: its instances (and those to come) read it
            transition.rule_states[whole_key] = _acted(rule, act, whole)
            acted = [item for item in items if not _paused_state(states, (rule.id, item))]
        elif per_item and not act.instance and act.act == "resume" and whole.paused:
            transition.rule_states[whole_key] = _acted(rule, act, whole)
            acted = [item for item in items if not _paused_state(states, (rule.id, item))]
        else:
            refusal: ValueError | None = None
            for item in items:
                key = (rule.id, item)
                try:
                    state = _acted(rule, act, states.get(key) or RuleState(rule.id, instance=item))
                except ValueError as exc:
                    if not per_item or act.instance:
                        raise
                    refusal = refusal or exc
                    continue
                transition.rule_states[key] = state
                acted.append(item)
            if not acted:
                if act.act == "resume" and per_item:
                    raise ValueError(f"rule {rule.id} is not paused, nor any of its instances")
                raise refusal or ValueError(f"rule {rule.id} has no instance yet")
        if per_item and not act.instance:
            transition.admin_acts = [replace(act, instances=len(acted))]
        for item in acted:
            self._decide(
                transition, entry, item, facts, states, now, "admin", None, book, approvals
            )
        if transition.facts:
            self._cascade(transition, facts.overlay(), states, now, book, approvals, 0, 1)
        return transition

    def _decide(
        self,
        transition: Transition,
        entry: _Entry,
        item: str,
        facts: FactTable,
        states: Mapping[InstanceKey, RuleState],
        now: datetime,
        trigger: Trigger,
        fact_index: int | None,
        book: EscrowBook,
        standing: ApprovalStanding | None = None,
        depth: int = 0,
        chain: Chain = (),
        shared_seen: dict[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Evaluate instance ``item`` of the rule of ``entry`` (``_Entry(rule,
        rule.project)`` for a rule picked outside the fact index) and add its decision, new
        state, any queued actions and any facts it sets to ``transition``. With
        ``shared_seen`` (a plan of many rules), an evaluation that read one fact keeps the
        ``seen`` an earlier one of the plan made of the same data (``_share_seen``).
        ``depth`` is the
        chain depth of the facts that triggered it (0: posted, or no fact); ``chain`` the
        rule instances whose firings led to it (see ``_cascade``). An instance of a
        per-item rule whose item does not exist is not decided."""
        rule_id = entry.id
        key = (rule_id, item) if item else entry.key
        state = transition.rule_states.get(key) or states.get(key) or RuleState(rule_id)
        lookup = ProjectFacts(entry.project, facts)
        for_each = entry.for_each
        if for_each is None:
            data = None
            evaluation = entry.condition.evaluate(lookup, now)
            if shared_seen is not None:
                evaluation = _share_seen(evaluation, shared_seen)
        else:
            data = facts.get((entry.project, for_each, item))
            if data is None:
                return
            evaluation = _evaluate(entry.rule, lookup, now, item, data)
            if state.instance != item:
                state = replace(state, instance=item)
        value = evaluation.value
        approvals_rule = entry.approvals
        if approvals_rule is None:  # no sign-off: the gate is the condition
            approvals = None
            gate_open = value
        else:
            approvals = approvals_status(
                entry.rule, _standing_of(transition, standing, rule_id, item), now
            )
            gate_open = value and bool(approvals["satisfied"])
        outcome = _outcome(entry.fire, state, value, gate_open, trigger, entry.content_hash)
        if outcome == "fired" and for_each is not None:
            whole = transition.rule_states.get((rule_id, "")) or states.get((rule_id, ""))
            if whole is not None and whole.paused:  # paused as a whole (rule_paused)
                outcome = "paused"
        decided_at = _format_now(now)
        firing_id = None
        reason = None
        mode: EffectiveMode = "live"
        if entry.checks_mode:  # else live, without a look at the sign-offs
            mode = effective_mode(entry.rule, self.signoffs)
        content_hash = entry.content_hash
        if state.gate_open is gate_open and state.rule_hash == content_hash:
            new_state = state  # unchanged (the common case): no copy
        else:
            new_state = replace(state, gate_open=gate_open, rule_hash=content_hash)
        if outcome == "still_blocked":
            reason = state.blocked
        elif outcome == "fired":
            rule = entry.rule
            n = state.fired_count + state.blocks + 1
            firing_id = f"{rule_id}#{n}" if for_each is None else f"{rule_id}[{item}]#{n}"
            firing = _Firing(rule, item, data, firing_id, now, depth + 1, evaluation, lookup, chain)
            shadowed = mode != "live"
            blocked = self._queue_firing(transition, firing, book, shadowed)
            if blocked is not None and blocked[1] == "release_blocked":
                # the release was refused: nothing happened, the instance has not fired
                new_state = replace(new_state, blocks=state.blocks + 1, blocked=blocked[0])
            else:
                new_state = replace(
                    new_state,
                    fired_count=state.fired_count + 1,
                    last_fired_at=decided_at,
                    blocked=None,
                )
            if blocked is not None:
                outcome = "blocked"
                reason, alert = blocked
                self._queue_alert(transition, rule, firing_id, now, reason, alert, item, shadowed)
            elif approvals is not None and _consumes(entry) and approvals["approved_by"]:
                used = tuple(approvals["approved_by"])
                transition.consumed.append(Consumption(rule_id, item, used, firing_id))
                approvals = {**approvals, "consumed": list(used)}
                # the firing used the approvals up: the gate is closed until new ones come
                new_state = replace(new_state, gate_open=False)
            if shadowed and blocked is None:  # decided as live, nothing of it sent
                outcome = "shadowed"
                if mode == "awaiting_signoff":
                    new_state = self._signoff_alert(transition, states, firing, new_state)
        notice_id = None
        if approvals is not None and entry.approvals is not None and entry.approvals.notify:
            new_state, notice_id = self._notice(
                transition, entry, item, data, new_state, outcome, approvals, now
            )
        transition.rule_states[key] = new_state
        # Decision(...) without the frozen dataclass's __init__ (eighteen object.__setattr__
        # calls, about 1 µs): the very same instance, its slots set through their descriptors.
        decision = _new(Decision)
        _set_rule_id(decision, rule_id)
        _set_rule_hash(decision, content_hash)
        _set_ruleset_version(decision, self.ruleset.version)
        _set_git_commit(decision, self.ruleset.git_commit)
        _set_trigger(decision, trigger)
        _set_outcome(decision, outcome)
        _set_gate_open(decision, gate_open)
        _set_evaluation(decision, evaluation)
        _set_decided_at(decision, decided_at)
        _set_fact_index(decision, fact_index)
        _set_firing_id(decision, firing_id)
        _set_approvals(decision, approvals if approvals_rule else None)
        _set_reason(decision, reason)
        _set_project(decision, entry.project)
        _set_instance(decision, item)
        _set_item_kind(decision, for_each or "")
        _set_notice_id(decision, notice_id)
        _set_mode(decision, mode)
        transition.decisions.append(decision)

    def _notice(
        self,
        transition: Transition,
        entry: _Entry,
        item: str,
        data: Mapping[str, Any] | None,
        state: RuleState,
        outcome: Outcome,
        approvals: Mapping[str, Any],
        now: datetime,
    ) -> tuple[RuleState, str | None]:
        """Tell the rule's ``approvals.notify`` target, once per wait, that instance ``item``
        waits only for its approvals (its condition holds, and it could fire): returns the
        instance's ``state`` with the wait marked told, and the notice id (None when nothing
        is told). A firing, or the condition going false, ends the wait."""
        rule = entry.rule
        assert rule.approvals is not None and rule.approvals.notify is not None
        waiting = outcome == "awaiting_approvals" and (
            entry.fire != "once" or state.fired_count <= state.rearms
        )
        if not waiting:
            if state.notified and outcome in ("not_met", "fired", "blocked", "shadowed"):
                return replace(state, notified=False), None
            return state, None
        if state.notified:
            return state, None
        n = state.notices + 1
        name = rule.id if not item else f"{rule.id}[{item}]"
        notice_id = f"{name}~approvals-{n}"
        target = rule.approvals.notify
        escape = slack_escape if self.target_formats.get(target) == "slack" else _same
        payload: dict[str, Any] = {
            "project": rule.project,
            "message": approvals_wait_message(rule, item, approvals, escape),
            "awaiting_approvals": {
                "required": approvals["required"],
                "from": list(approvals.get("from", [])),
                "approved_by": list(approvals["approved_by"]),
                "rejected_by": list(approvals["rejected_by"]),
            },
        }
        if item and data is not None:
            payload["item"] = {"kind": rule.for_each, "id": item, "data": dict(data)}
        transition.actions.append(
            QueuedAction(
                action_id=self.new_action_id(),
                kind="notify",
                target=target,
                rule_id=rule.id,
                firing_id=notice_id,
                payload=payload,
                created_at=_format_now(now),
                instance=item,
            )
        )
        return replace(state, notified=True, notices=n), notice_id

    def _queue_firing(
        self, transition: Transition, firing: _Firing, book: EscrowBook, shadowed: bool = False
    ) -> tuple[str, str] | None:
        """Queue what ``firing`` does (actions, ledger entries, facts it sets), or nothing
        and return why it is blocked and the alert to send: a release refused by the ledger
        (``release_blocked``), a loop (an instance already in the firing's chain), a fact
        set deeper than ``max_chain_depth`` or a template name without a value
        (``firing_blocked``). A ``shadowed`` firing is checked the same way, but queues
        only shadowed actions (its facts to set among them): no ledger entry, nothing
        committed to ``book``, no fact."""
        rule = firing.rule
        loop = loop_refusal(rule, firing.item, firing.chain)
        if loop is not None:
            return loop, "firing_blocked"
        try:
            amounts = release_amounts(firing, book.escrows)
        except ReleaseBlocked as exc:
            return str(exc), "release_blocked"
        reason = book.refusal_of_all(
            replace(a, amount=amounts[n]) if n in amounts else a
            for n, a in enumerate(rule.actions, start=1)
            if isinstance(a, ReleaseAction)
        )
        if reason is not None:
            return reason, "release_blocked"
        sets = [a for a in rule.actions if isinstance(a, SetFactAction)]
        if sets and firing.depth > self.max_chain_depth:
            return (
                f"set_fact chain deeper than max_chain_depth {self.max_chain_depth}: "
                f"{sets[0].fact_kind} would be set at depth {firing.depth}",
                "firing_blocked",
            )
        try:
            actions, new_facts = render_firing(
                firing, self.new_action_id, self.target_formats, amounts
            )
        except FiringBlocked as exc:
            return str(exc), "firing_blocked"
        if shadowed:
            transition.actions.extend(self._shadowed(actions, new_facts, firing))
            return None
        transition.actions.extend(actions)
        transition.facts.extend(new_facts)
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
                        firing_id=firing.firing_id,
                        recorded_at=action.created_at,
                    )
                )
        return None

    def _shadowed(
        self, actions: list[QueuedAction], facts: list[FactInput], firing: _Firing
    ) -> list[QueuedAction]:
        """The shadowed actions of a firing in shadow: its rendered ``actions`` marked
        shadowed, then each fact it would set as a ``set_fact`` action (payload
        ``{project, kind, id, data}``, no target), recorded instead of the fact."""
        shadowed = [replace(action, shadowed=True) for action in actions]
        created_at = _format_now(firing.fired_at)
        for fact in facts:
            payload = {"project": fact.project, "kind": fact.kind, "id": fact.id}
            shadowed.append(
                QueuedAction(
                    action_id=self.new_action_id(),
                    kind="set_fact",
                    target="",
                    rule_id=firing.rule.id,
                    firing_id=firing.firing_id,
                    payload={**payload, "data": dict(fact.data)},
                    created_at=created_at,
                    instance=firing.item,
                    shadowed=True,
                )
            )
        return shadowed

    def _signoff_alert(
        self,
        transition: Transition,
        states: Mapping[InstanceKey, RuleState],
        firing: _Firing,
        state: RuleState,
    ) -> RuleState:
        """Tell the alert target, once per content hash, that money rule ``firing.rule``
        awaits sign-off, naming the release id of its first shadowed release (this
        firing's): ``alert: money_rule_awaiting_signoff``. Whether it was told is kept in
        the state of the rule's instance ``""`` (``RuleState.signoff_alerted``): returns
        ``state`` (the firing instance's new state) with it marked for a plain rule; a
        per-item rule's state as a whole is put in ``transition``."""
        rule = firing.rule
        if self.alert_target is None:
            return state
        whole_key = (rule.id, "")
        plain = rule.for_each is None
        whole = (
            state
            if plain
            else transition.rule_states.get(whole_key)
            or states.get(whole_key)
            or RuleState(rule.id)
        )
        if whole.signoff_alerted == rule.content_hash:
            return state
        release_id = next(
            a.action_id
            for a in transition.actions
            if a.firing_id == firing.firing_id and a.kind == "release"
        )
        book = self.signoffs
        signed = book.signed_by(rule.content_hash)
        missing = book.required - len(signed)
        message = (
            f"gatekeeper: money rule {rule.id} (content hash {rule.content_hash[:12]}) awaits "
            f"sign-off: {book.required} needed, {missing} more; its releases are shadowed, "
            f"not sent (first shadowed release {release_id})"
        )
        payload: dict[str, Any] = {
            "project": rule.project,
            "message": message,
            "alert": "money_rule_awaiting_signoff",
            "rule_id": rule.id,
            "content_hash": rule.content_hash,
            "required": book.required,
            "signed_by": signed,
            "release_id": release_id,
        }
        if firing.item:
            payload["item"] = {"kind": rule.for_each, "id": firing.item}
        transition.actions.append(
            QueuedAction(
                action_id=self.new_action_id(),
                kind="notify",
                target=self.alert_target,
                rule_id=rule.id,
                firing_id=firing.firing_id,
                payload=payload,
                created_at=_format_now(firing.fired_at),
                instance=firing.item,
            )
        )
        whole = replace(whole, signoff_alerted=rule.content_hash)
        if plain:
            return whole
        transition.rule_states[whole_key] = whole
        return state

    def _queue_alert(
        self,
        transition: Transition,
        rule: Rule,
        firing_id: str,
        now: datetime,
        reason: str,
        alert: str,
        item: str = "",
        shadowed: bool = False,
    ) -> None:
        """Tell the alert target (when configured) that a firing was blocked: a release
        (``alert: release_blocked``), or anything else (``alert: firing_blocked``). The alert
        names the blocked firing (``firing_id``, also the decision's in the audit log): a
        blocked release is never given a release id, which only a release recorded in the
        ledger gets. A blocked release is alerted once per blocked episode (see
        ``RuleState.blocked``). The alert of a firing in shadow is ``shadowed`` too: nothing
        live hears of it."""
        if self.alert_target is None:
            return
        if alert == "release_blocked":
            releases = "; ".join(
                f"{_amount_shown(a)} from {a.escrow} to {a.payee}"
                for a in rule.actions
                if isinstance(a, ReleaseAction)
            )
            message = (
                f"gatekeeper blocked the release of {releases} by rule {rule.id} "
                f"(firing {firing_id}): {reason}"
            )
        else:
            message = f"gatekeeper blocked firing {firing_id} of rule {rule.id}: {reason}"
        payload: dict[str, Any] = {
            "project": rule.project,
            "message": message,
            "alert": alert,
            "reason": reason,
            "firing_id": firing_id,
        }
        if item:
            payload["item"] = {"kind": rule.for_each, "id": item}
        transition.actions.append(
            QueuedAction(
                action_id=self.new_action_id(),
                kind="notify",
                target=self.alert_target,
                rule_id=rule.id,
                firing_id=firing_id,
                payload=payload,
                created_at=format_rfc3339(now),
                instance=item,
                shadowed=shadowed,
            )
        )


_new = object.__new__


def _share_seen(evaluation: Evaluation, shared: dict[str, Mapping[str, Any]]) -> Evaluation:
    """``evaluation``, or the same evaluation with the equal ``seen`` kept in ``shared``
    when it read one fact and an earlier evaluation of the plan read the very same data
    (the rules reading one fact, evaluated at a reload: one dict, not one each). A
    ``seen`` is never changed once its evaluation is made, so sharing it is safe."""
    seen = evaluation.seen
    if len(seen) != 1:
        return evaluation
    name = next(iter(seen))
    kept = shared.get(name)
    if kept is not None and kept is not seen and kept[name] is seen[name]:
        return evaluation.with_seen(kept)
    shared[name] = seen
    return evaluation


def _slot_setter(name: str) -> Callable[[Decision, Any], None]:
    """The setter of slot ``name`` of ``Decision`` (whose frozen ``__setattr__`` refuses):
    ``_decide`` builds each decision with them, as fast as its ``__dict__`` was filled."""
    setter: Callable[[Decision, Any], None] = Decision.__dict__[name].__set__
    return setter


_set_rule_id = _slot_setter("rule_id")
_set_rule_hash = _slot_setter("rule_hash")
_set_ruleset_version = _slot_setter("ruleset_version")
_set_git_commit = _slot_setter("git_commit")
_set_trigger = _slot_setter("trigger")
_set_outcome = _slot_setter("outcome")
_set_gate_open = _slot_setter("gate_open")
_set_evaluation = _slot_setter("evaluation")
_set_decided_at = _slot_setter("decided_at")
_set_fact_index = _slot_setter("fact_index")
_set_firing_id = _slot_setter("firing_id")
_set_approvals = _slot_setter("approvals")
_set_reason = _slot_setter("reason")
_set_project = _slot_setter("project")
_set_instance = _slot_setter("instance")
_set_item_kind = _slot_setter("item_kind")
_set_notice_id = _slot_setter("notice_id")
_set_mode = _slot_setter("mode")

_format_now = functools.lru_cache(maxsize=4)(format_rfc3339)
"""``format_rfc3339`` of the planning "now", formatted once per plan, not once per rule."""


def _lapsing(rule: Rule) -> bool:
    """Whether the approvals of ``rule`` lapse (it sets ``approvals.expires_after``)."""
    return rule.approvals is not None and rule.approvals.expires_after_s is not None


def _same(text: str) -> str:
    return text


def _consumes(entry: _Entry) -> bool:
    """Whether a firing of the rule of ``entry`` uses up the approvals that allowed it:
    ``each_time`` and ``each_fact`` rules, unless ``approvals.standing``."""
    return entry.fire != "once" and entry.approvals is not None and not entry.approvals.standing


_NO_STANDING: Mapping[str, Stand] = {}


def _standing_of(
    transition: Transition, standing: ApprovalStanding | None, rule_id: str, item: str
) -> Mapping[str, Stand]:
    """The standing decisions on instance ``item`` of rule ``rule_id`` as ``transition``
    sees them: ``standing`` without the approvals its firings used up so far."""
    found = (standing or {}).get(approval_key(rule_id, item), _NO_STANDING)
    if not transition.consumed:
        return found
    used = {
        subject
        for c in transition.consumed
        if c.rule_id == rule_id and c.instance == item
        for subject in c.subjects
    }
    if not used:
        return found
    return {s: stand for s, stand in found.items() if s not in used or stand.decision != "approve"}


def approvals_wait_message(
    rule: Rule, item: str, approvals: Mapping[str, Any], escape: Callable[[str], str] = _same
) -> str:
    """The text telling a rule's ``approvals.notify`` target that an instance waits only
    for approvals: the rule, the item (per-item rules), how many approvals are needed from
    whom, and those given (or rejecting) so far. ``escape`` is applied to the names
    (Slack targets)."""
    where = f"rule {escape(rule.id)}"
    if item:
        where += f" ({escape(str(rule.for_each))} {escape(item)})"
    approvers = ", ".join(escape(s) for s in approvals.get("from", []))
    approved = list(approvals["approved_by"])
    text = (
        f"{where} waits for approvals: {approvals['required']} needed from {approvers}; "
        f"{len(approved)} given"
    )
    if approved:
        text += f" ({', '.join(escape(s) for s in approved)})"
    rejected = list(approvals["rejected_by"])
    if rejected:
        text += f"; rejected by {', '.join(escape(s) for s in rejected)}"
    return text


def _outcome(
    fire: FireMode,
    state: RuleState,
    condition: bool,
    gate_open: bool,
    trigger: Trigger,
    content_hash: str,
) -> Outcome:
    if not condition:
        return "not_met"
    if not gate_open:
        return "awaiting_approvals"
    if fire == "once" and state.fired_count > state.rearms:
        return "already_fired"
    if (
        state.blocked is not None
        and state.gate_open
        and fire != "each_fact"
        and state.rule_hash == content_hash
    ):
        return "still_blocked"  # one attempt (and one alert) per blocked episode
    if fire == "each_time" and state.gate_open:
        return "still_met"
    if fire == "each_fact" and trigger != "fact":
        return "still_met"  # an event rule fires only at a fact that triggers it
    return "paused" if state.paused else "fired"


def rule_paused(states: Mapping[InstanceKey, RuleState], rule_id: str) -> bool:
    """Whether rule ``rule_id`` is paused as a whole: for a per-item rule, an admin paused
    it without naming an item, which holds every instance, present and to come (kept as
    the state of its instance ``""``, which a per-item rule never evaluates)."""
    whole = states.get((rule_id, ""))
    return whole is not None and whole.paused


def instance_paused(states: Mapping[InstanceKey, RuleState], rule_id: str, item: str) -> bool:
    """Whether instance ``item`` of rule ``rule_id`` is paused: by its item, or with its
    rule as a whole (``rule_paused``)."""
    return _paused_state(states, (rule_id, item)) or rule_paused(states, rule_id)


def _paused_state(states: Mapping[InstanceKey, RuleState], key: InstanceKey) -> bool:
    state = states.get(key)
    return state is not None and state.paused


def _acted(rule: Rule, act: AdminAct, state: RuleState) -> RuleState:
    """``state`` after admin act ``act``; ``ValueError`` when the act does not apply."""
    name = rule.id if not state.instance else f"{rule.id}[{state.instance}]"
    if act.act == "pause":
        if state.paused:
            raise ValueError(f"rule {name} is already paused")
        return replace(state, paused=True)
    if act.act == "resume":
        if not state.paused:
            raise ValueError(f"rule {name} is not paused")
        return replace(state, paused=False)
    if rule.fire != "once":
        raise ValueError(f"rule {rule.id} fires {rule.fire}; only once rules are re-armed")
    if state.fired_count <= state.rearms and state.blocked is None:
        raise ValueError(f"rule {name} has not fired since it was last armed")
    # the next open gate fires again; an open gate now counts as a fresh edge (a blocked
    # instance, which has not fired, tries its release again)
    return replace(state, rearms=state.fired_count, gate_open=False)


def releases_from(rule: Rule, escrows: Collection[str]) -> bool:
    """Whether ``rule`` has a release from one of ``escrows``."""
    return any(isinstance(a, ReleaseAction) and a.escrow in escrows for a in rule.actions)


def apply_transition(
    transition: Transition,
    facts: FactTable,
    states: dict[InstanceKey, RuleState],
    approvals: dict[str, dict[str, Stand]],
    book: EscrowBook,
) -> None:
    """Apply a committed ``transition`` to in-memory state: the current facts, the rule
    states, the approvers' standing decisions and the escrows' committed amounts. The daemon
    does it after each commit; ``gatekeeper test`` and ``plan`` after each planned step."""
    for fact in transition.facts:
        facts.put(fact.key, fact.data)
    states.update(transition.rule_states)
    for approval in transition.approvals:
        _stand(
            approvals.setdefault(approval_key(approval.rule_id, approval.instance), {}),
            approval,
            transition.planned_at,
        )
    _consume(approvals, transition.consumed)
    for entry in transition.ledger:
        book.commit(entry.escrow, entry.amount)


def approval_key(rule_id: str, item: str) -> str:
    """The key of an instance's standing approvals (``ApprovalStanding``): the rule id for
    a rule as a whole, ``<rule id>[<item id>]`` for one instance of a per-item rule (whose
    instances count only approvals naming them)."""
    return f"{rule_id}[{item}]" if item else rule_id


def _stand(standing: dict[str, Stand], approval: ApprovalInput, at: datetime | None) -> None:
    """Record ``approval``, given at ``at``, in one instance's ``standing`` (``{subject:
    Stand}``): a withdrawal removes the subject's decision, any other decision replaces it.
    The time is kept to the millisecond, as the store keeps it (RFC 3339 with milliseconds),
    so an approval lapses at the same instant before and after a restart."""
    if approval.decision == "withdraw":
        standing.pop(approval.subject, None)
    else:
        if at is not None:
            at = at.replace(microsecond=at.microsecond // 1000 * 1000)
        standing[approval.subject] = Stand(approval.decision, at)


def _consume(approvals: dict[str, dict[str, Stand]], consumed: Iterable[Consumption]) -> None:
    """Remove the approve decisions firings used up (``Transition.consumed``)."""
    for used in consumed:
        standing = approvals.get(approval_key(used.rule_id, used.instance))
        if standing is None:
            continue
        for subject in used.subjects:
            stand = standing.get(subject)
            if stand is not None and stand.decision == "approve":
                del standing[subject]


def without_consumed(
    approvals: dict[str, dict[str, Stand]], consumed: Iterable[Consumption]
) -> dict[str, dict[str, Stand]]:
    """``approvals`` without what ``consumed`` used up, as a new mapping (``approvals``
    and its inner mappings are left as they are; only the instances touched are copied):
    how a group of transitions planned one after the other sees the approvals."""
    consumed = list(consumed)
    if not consumed:
        return approvals
    copied = dict(approvals)
    for used in consumed:
        key = approval_key(used.rule_id, used.instance)
        if key in copied:
            copied[key] = dict(copied[key])
    _consume(copied, consumed)
    return copied


def lapses_at(rule: Rule, stand: Stand) -> datetime | None:
    """When approval ``stand`` on ``rule`` stops counting: ``expires_after`` after it was
    given (None: it never lapses: the rule sets no ``expires_after``, the time it was given
    is not known, or it is a reject, which stands until withdrawn)."""
    if rule.approvals is None or rule.approvals.expires_after_s is None:
        return None
    if stand.at is None or stand.decision != "approve":
        return None
    return stand.at + timedelta(seconds=rule.approvals.expires_after_s)


def approvals_status(
    rule: Rule, standing: Mapping[str, Stand], now: datetime | None = None
) -> dict[str, Any]:
    """How the rule's sign-off stands at ``now``, from each approver's standing decision
    (``{subject: Stand}``): required, from, approved_by, rejected_by, satisfied, and
    ``lapsed`` (only when any: the approvers whose approval is older than the rule's
    ``expires_after``, which no longer count; none lapse when ``now`` is None).

    Only approvers listed in the rule's ``from`` count; distinct approvers are counted; a
    standing reject from any of them blocks the rule until withdrawn.
    """
    if rule.approvals is None:
        return {"required": 0, "approved_by": [], "rejected_by": [], "satisfied": True}
    listed = rule.approvals.from_
    approved: list[str] = []
    rejected: list[str] = []
    lapsed: list[str] = []
    for subject in sorted(listed):
        stand = standing.get(subject)
        if stand is None:
            continue
        if stand.decision == "reject":
            rejected.append(subject)
            continue
        until = lapses_at(rule, stand) if now is not None else None
        (lapsed if until is not None and now is not None and now >= until else approved).append(
            subject
        )
    status: dict[str, Any] = {
        "required": rule.approvals.required,
        "from": list(listed),
        "approved_by": approved,
        "rejected_by": rejected,
        "satisfied": len(approved) >= rule.approvals.required and not rejected,
    }
    if lapsed:
        status["lapsed"] = lapsed
    return status


class FiringBlocked(Exception):
    """A firing cannot be carried out as written (a template name without a value, a
    rendered text too long); the message is the decision's ``reason``."""


class ReleaseBlocked(FiringBlocked):
    """A release of a firing cannot be sent: its amount, read from a fact, has no value or
    is not a decimal amount within the escrow's precision and the release's
    ``max_amount`` (see ``release_amounts``)."""


@dataclass(frozen=True, slots=True)
class _Firing:
    """One firing being rendered: the rule, the instance's item id and data (None for a
    plain rule), the firing id, when, the chain depth of the facts it would set, and the
    evaluation that fired it (the facts it read by id feed templates and bodies)."""

    rule: Rule
    item: str
    data: Mapping[str, Any] | None
    firing_id: str
    fired_at: datetime
    depth: int
    evaluation: Evaluation
    lookup: ProjectFacts
    """The facts as the decision saw them (templates read the facts the rule reads)."""
    chain: Chain = ()
    """The rule instances whose firings led to this one, first first (see ``_cascade``)."""


def _read_by_id(evaluation: Evaluation, item: Item | None) -> dict[str, Any]:
    """The facts an evaluation read by id that exist, but the instance's own ``item``:
    ``{"kind.id": data}`` (kinds read whole are not copied)."""
    read = {}
    for name, data in evaluation.seen.items():
        if data is None:
            continue
        kind, fact_id = split_fact_name(name)
        if fact_id is None or (item is not None and (kind, fact_id) == (item.kind, item.id)):
            continue
        read[name] = data
    return read


MAX_SHOWN_AMOUNT_CHARS = 64
"""A refused amount is shown in a reason cut to this many characters (the last ``…``)."""


def _amount_shown(release: ReleaseAction) -> str:
    """A release's amount and currency as an alert names them: ``5000.00 USD`` as written,
    or for an amount read from a fact, that field and its cap (``the amount in
    item.data.amount (at most 3000.00 USD)``), never the ``${...}`` template itself (the
    alert's reason carries the value read)."""
    if not release.templated:
        return f"{release.amount} {release.currency}"
    field = release.amount[2:-1]
    return f"the amount in {field} (at most {release.max_amount} {release.currency})"


def release_amounts(firing: _Firing, escrows: Mapping[str, Escrow]) -> dict[int, str]:
    """The amount of each release of ``firing`` whose ``amount`` is a template
    (``"${item.data.amount}"``), read from the facts as the decision saw them and checked
    (``ledger.checked_amount``: a decimal amount above zero, with at most the escrow's
    decimals, at most the release's ``max_amount``), by the action's number (1-based).

    Raises ``ReleaseBlocked`` whose reason names the field, the rule, the value (cut at
    ``MAX_SHOWN_AMOUNT_CHARS``) and the action, e.g. ``release amount item.data.amount of
    rule p/pay is '12000.00': above the release's max_amount 10000.00 (release action 1)``.
    """
    rule = firing.rule
    found: dict[int, str] = {}
    resolve: Resolve | None = None
    for number, action in enumerate(rule.actions, start=1):
        if not isinstance(action, ReleaseAction) or not action.templated:
            continue
        if resolve is None:
            resolve = template_resolver(
                rule, firing.fired_at, item=_item_of(firing), fact=firing.lookup.get
            )
        field = action.amount[2:-1]
        where = f"release action {number}"
        value = amount_value(action.amount, resolve)
        if value is MISSING:
            raise ReleaseBlocked(f"release amount {field} of rule {rule.id} has no value ({where})")
        escrow = escrows.get(action.escrow)
        try:
            found[number] = checked_amount(
                value,
                max_amount=action.max_amount or "0",
                decimals=escrow.decimals if escrow is not None else Escrow.decimals,
            )
        except ValueError as exc:
            shown = render_value(value)
            if len(shown) > MAX_SHOWN_AMOUNT_CHARS:
                shown = shown[: MAX_SHOWN_AMOUNT_CHARS - 1] + "…"
            shown = repr(shown) if isinstance(value, str) else shown
            raise ReleaseBlocked(
                f"release amount {field} of rule {rule.id} is {shown}: {exc} ({where})"
            ) from None
    return found


def _item_of(firing: _Firing) -> Item | None:
    """The current item of ``firing`` (None for a rule without ``for_each``)."""
    if firing.rule.for_each is None or firing.data is None:
        return None
    return Item(firing.rule.for_each, firing.item, firing.data)


def render_firing(
    firing: _Firing,
    new_action_id: Callable[[], str] = uuid_action_id,
    target_formats: Mapping[str, str] | None = None,
    amounts: Mapping[int, str] | None = None,
) -> tuple[list[QueuedAction], list[FactInput]]:
    """The actions one firing queues, each with a fresh id from ``new_action_id`` that stays
    stable across retries, and the facts it sets (``set_fact``, with ``caused_by``). Every
    action body carries ``project``, ``item`` (per-item rules: ``{kind, id, data}``) and
    ``facts`` (the facts the decision read by id, when any: ``{"kind.id": data}``).

    Templates (notify ``message``, pipeline ``ref`` and ``inputs``, set_fact ``id`` and
    string ``data`` values) are rendered with the rule's names, the item and the facts as
    the decision saw them; values sent to a target of format ``slack`` (``target_formats``)
    are Slack-escaped. Raises ``FiringBlocked`` when a template cannot be rendered (a name
    without a value, a text too long, a set_fact id that is not a fact id): its reason
    names the action and its number (1-based), e.g. ``template name item.data.commit has
    no value (notify action 1)``.

    ``amounts`` holds the rendered amount of each release whose amount is a template, by
    action number (``release_amounts``): it is the amount in the release's body, and the
    value of ``${amount}`` when it is the rule's own release."""
    rule = firing.rule
    created_at = _format_now(firing.fired_at)
    amounts = amounts or {}
    item = _item_of(firing)
    extra: dict[str, Any] = {}
    if item is not None:
        extra["item"] = {"kind": item.kind, "id": item.id, "data": dict(item.data)}
    read = _read_by_id(firing.evaluation, item)
    if read:
        extra["facts"] = read
    own = next((n for n, a in enumerate(rule.actions, 1) if isinstance(a, ReleaseAction)), 0)
    resolve = template_resolver(
        rule, firing.fired_at, item=item, fact=firing.lookup.get, amount=amounts.get(own)
    )
    formats = target_formats or {}
    queued: list[QueuedAction] = []
    facts: list[FactInput] = []
    for number, action in enumerate(rule.actions, start=1):
        where = f"{action.kind} action {number}"
        if isinstance(action, SetFactAction):
            fact_id = _render(action.fact_id, resolve, None, where)
            if not FACT_ID.fullmatch(fact_id):  # what POST /v1/facts would refuse
                shown = fact_id if len(fact_id) <= 64 else fact_id[:63] + "…"
                raise FiringBlocked(
                    f"set_fact id {shown!r} is not a valid fact id ({FACT_ID_RULE}) ({where})"
                )
            data = {
                k: _render(v, resolve, None, where) if isinstance(v, str) else v
                for k, v in action.data.items()
            }
            caused_by = CausedBy(rule.id, firing.item, firing.firing_id, firing.depth)
            facts.append(FactInput(rule.project, action.fact_kind, fact_id, data, caused_by))
            continue
        escape = slack_escape if formats.get(action.target) == "slack" else None
        body = _render_payload(action, resolve, escape, where)
        action_id = new_action_id()
        payload = {"project": rule.project, **body, **extra}
        if isinstance(action, ReleaseAction):
            payload["release_id"] = action_id
            if number in amounts:
                payload["amount"] = amounts[number]
        queued.append(
            QueuedAction(
                action_id=action_id,
                kind=action.kind,
                target=action.target,
                rule_id=rule.id,
                firing_id=firing.firing_id,
                payload=payload,
                created_at=created_at,
                instance=firing.item,
            )
        )
    return queued, facts


def _render(text: str, resolve: Resolve, escape: Callable[[str], str] | None, where: str) -> str:
    try:
        return render_template(text, resolve, escape=escape)
    except TemplateError as exc:
        raise FiringBlocked(f"{exc} ({where})") from None


def _render_payload(
    action: Action, resolve: Resolve, escape: Callable[[str], str] | None, where: str
) -> dict[str, Any]:
    if isinstance(action, ReleaseAction):
        return {
            "escrow": action.escrow,
            "amount": action.amount,
            "currency": action.currency,
            "payee": action.payee,
        }
    if isinstance(action, NotifyAction):
        return {"message": _render(action.message, resolve, escape, where)}
    if isinstance(action, PipelineAction):
        return {
            "ref": _render(action.ref, resolve, escape, where),
            "inputs": {k: _render(v, resolve, escape, where) for k, v in action.inputs.items()},
        }
    raise TypeError(f"unknown action {action!r}")


def _evaluate(
    rule: Rule,
    lookup: ProjectFacts,
    now: datetime,
    item: str,
    data: Mapping[str, Any] | None,
) -> Evaluation:
    """``rule``'s condition evaluated for instance ``item`` (its item's ``data``; None for
    a plain rule)."""
    if rule.for_each is None or data is None:
        return rule.condition.evaluate(lookup, now)
    return rule.condition.evaluate(lookup, now, item=Item(rule.for_each, item, data))
