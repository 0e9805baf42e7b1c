"""The differences between what was recorded and what a replay did, as pure functions over
plain records (``gatekeeper backtest``).

A *firing* (``FiringRecord``) is a decision that fired or was blocked (its firing id), or
an approvals notice (its notice id), with the actions it queued (``ActionRecord``: kind,
target, rendered payload without its random ids, and how it is counted: ``queued``, or
``shadowed`` for a rule in shadow mode, which releases nothing). The recorded firings come
from the store (``gatekeeper.store.history``), the replayed ones from a replay's
transitions (``firings_of``).

``diff_firings`` matches the firings of each rule instance by the instant they happened
(the recorded millisecond) and reports, per rule instance: firings added (only the replay
has them), firings gone (only the record has them), firings changed (the outcome, a
reason, or an action: amount, payee, escrow, currency, target, rendered message, ref or
inputs) and firings whose release became blocked or is no longer blocked (``BlockChange``:
one change, whatever else differs, since a blocked firing queues only its alert), with what
each escrow would release more or less (a blocked firing releases nothing).
``compare_decisions`` is the self-check: every recorded decision must come out of the
replay of the recorded versions, field for field (``DecisionRecord``), with the same
actions and ledger entries.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from gatekeeper.clock import parse_rfc3339
from gatekeeper.engine.model import Decision, QueuedAction, Transition

FailOn = Literal["release", "any", "none"]

RANDOM_PAYLOAD_FIELDS = ("release_id",)
"""Payload fields that are random by design (a release's id is its action id, a fresh
UUID): left out of every comparison."""


NOT_RELEASED = ("shadowed", "cancelled", "failed")
"""The statuses of a release that releases no money: shadowed (never sent), cancelled
and failed (its amount returned to the escrow)."""


@dataclass(frozen=True)
class ActionRecord:
    """One action of a firing: ``payload`` without ``RANDOM_PAYLOAD_FIELDS``; ``status``
    ``queued`` (to be sent; a release counts against its escrow), ``shadowed`` (recorded
    only, never sent), or, for a release whose amount went back to its escrow,
    ``cancelled`` (an admin cancelled it) or ``failed`` (its settlement failed): none of
    those releases money. ``ledger`` is a release's ledger entry ``(escrow, amount,
    currency, payee)`` when it was read (the self-check), else None."""

    kind: str
    target: str
    payload: Mapping[str, Any]
    status: str = "queued"
    ledger: tuple[str, str, str, str] | None = None

    @property
    def releases(self) -> bool:
        """A release that moves money (not shadowed, cancelled or failed)."""
        return self.kind == "release" and self.status not in NOT_RELEASED

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "status": self.status,
            "payload": dict(self.payload),
        }


@dataclass(frozen=True)
class FiringRecord:
    """A firing (or approvals notice) and its actions; ``at`` is the RFC 3339 millisecond
    it was decided at; ``outcome`` ``fired``, ``blocked`` or ``notice``."""

    rule_id: str
    instance: str
    firing_id: str
    at: str
    outcome: str
    reason: str | None
    actions: tuple[ActionRecord, ...]

    @property
    def name(self) -> str:
        """``RULE`` or ``RULE[ITEM]``."""
        return f"{self.rule_id}[{self.instance}]" if self.instance else self.rule_id

    @property
    def releases(self) -> bool:
        return any(a.releases for a in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule_id,
            "item": self.instance or None,
            "firing_id": self.firing_id,
            "at": self.at,
            "outcome": self.outcome,
            "reason": self.reason,
            "actions": [a.to_json() for a in self.actions],
        }


ACTION_ID = re.compile(r"\b(?:act_[0-9a-f]{32}|replay_[0-9]+)\b")
"""An action id as the daemon makes them (``act_`` and a UUID's 32 hex digits) or a
replay does (``replay_N``): random by design, named by ``ActionNames`` where a payload
mentions one (an alert naming the release it is about)."""


class ActionNames:
    """A stable name for each action id of a history, the same whichever side made the
    id: ``<FIRING_ID action N>`` (its firing or notice id and its place among that
    firing's actions). ``add`` the actions of a firing in the order queued; ``name``
    replaces the ids known in a text."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def add(self, firing_id: str, action_ids: Iterable[str]) -> None:
        for number, action_id in enumerate(action_ids):
            self.names[action_id] = f"<{firing_id} action {number}>"

    def name(self, text: str) -> str:
        return ACTION_ID.sub(lambda m: self.names.get(m.group(), m.group()), text)


def action_record(
    kind: str,
    target: str,
    payload: Mapping[str, Any],
    status: str = "queued",
    ledger: tuple[str, str, str, str] | None = None,
    names: ActionNames | None = None,
) -> ActionRecord:
    """An ``ActionRecord`` with the random fields left out of ``payload`` and the payload
    made plain JSON (tuples as lists), so a stored payload and a rendered one compare; the
    action ids it mentions are replaced by their ``names``."""
    text = json.dumps(dict(payload), default=str)
    if names is not None and names.names:
        text = names.name(text)
    plain = json.loads(text)
    for name in RANDOM_PAYLOAD_FIELDS:
        plain.pop(name, None)
    return ActionRecord(kind, target, plain, status, ledger)


def replayed_status(action: QueuedAction) -> str:
    """How a replayed action counts: ``shadowed`` when the engine shadowed it (a rule in
    shadow mode or awaiting sign-off), else ``queued``."""
    return "shadowed" if action.shadowed else "queued"


def firings_of(
    transition: Transition, names: ActionNames, *, ledger: bool = False
) -> list[FiringRecord]:
    """The firings (and approvals notices) of a replayed transition, with their actions in
    the order queued (their ids added to ``names``, which spans the replay); ``ledger``
    adds each release's ledger entry."""
    by_firing: dict[str, list[QueuedAction]] = defaultdict(list)
    for action in transition.actions:
        by_firing[action.firing_id].append(action)
    for firing_id, queued in by_firing.items():
        names.add(firing_id, (a.action_id for a in queued))
    entries = {e.release_id: e for e in transition.ledger} if ledger else {}

    def actions(firing_id: str) -> tuple[ActionRecord, ...]:
        found = []
        for a in by_firing.get(firing_id, ()):
            entry = entries.get(a.action_id)
            book = (
                None if entry is None else (entry.escrow, entry.amount, entry.currency, entry.payee)
            )
            status = replayed_status(a)
            found.append(action_record(a.kind, a.target, a.payload, status, book, names))
        return tuple(found)

    firings = []
    for d in transition.decisions:
        if d.firing_id is not None:
            firings.append(
                FiringRecord(
                    d.rule_id,
                    d.instance,
                    d.firing_id,
                    d.decided_at,
                    d.outcome,
                    d.reason,
                    actions(d.firing_id),
                )
            )
        if d.notice_id is not None:
            firings.append(
                FiringRecord(
                    d.rule_id,
                    d.instance,
                    d.notice_id,
                    d.decided_at,
                    "notice",
                    None,
                    actions(d.notice_id),
                )
            )
    return firings


def mark_returned(
    firings: Iterable[FiringRecord], returned: Mapping[tuple[str, int], str]
) -> list[FiringRecord]:
    """``firings`` with the status of each release a return applied to (``returned``:
    firing id and place among its actions -> ``cancelled`` or ``failed``, a replay's
    ``Replay.returned``) set so: a return comes after its firing was recorded."""
    if not returned:
        return list(firings)
    marked = []
    for f in firings:
        actions = tuple(
            replace(a, status=returned[(f.firing_id, place)])
            if (f.firing_id, place) in returned
            else a
            for place, a in enumerate(f.actions)
        )
        marked.append(f if actions == f.actions else replace(f, actions=actions))
    return marked


# -- the diff -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference of a matched firing: ``field`` (``outcome``, ``reason``,
    ``actions[N].payload.amount``, ``actions[N]`` for an action added or gone, ...), the
    recorded value and the replayed one (None where there is none)."""

    field: str
    old: Any
    new: Any

    @property
    def money(self) -> bool:
        """Whether the change touches a release (its presence, amount, payee, escrow,
        currency, target or status), or an outcome of a firing with one."""
        return "release" in self.field

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


def matched_json(recorded: FiringRecord, replayed: FiringRecord) -> dict[str, Any]:
    """A firing both sides have, as the report names it: ``rule``, ``item``, ``at`` and
    each side's firing id."""
    return {
        "rule": recorded.rule_id,
        "item": recorded.instance or None,
        "at": recorded.at,
        "recorded_firing_id": recorded.firing_id,
        "replayed_firing_id": replayed.firing_id,
    }


@dataclass(frozen=True)
class ChangedFiring:
    """A firing both sides have (same rule instance, same instant) that differs."""

    recorded: FiringRecord
    replayed: FiringRecord
    changes: tuple[Change, ...]

    @property
    def money(self) -> bool:
        return any(c.money for c in self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            **matched_json(self.recorded, self.replayed),
            "changes": [c.to_json() for c in self.changes],
        }


@dataclass(frozen=True)
class BlockChange:
    """A firing both sides have (same rule instance, same instant) that one side fired and
    the other blocked: ``now_blocked`` when the replay blocked what the record fired (the
    candidate would refuse it: ``reason``), else it is no longer blocked (the candidate
    would carry out what the record refused)."""

    recorded: FiringRecord
    replayed: FiringRecord

    @property
    def now_blocked(self) -> bool:
        return self.replayed.outcome == "blocked"

    @property
    def fired(self) -> FiringRecord:
        """The side that fired."""
        return self.recorded if self.now_blocked else self.replayed

    @property
    def reason(self) -> str | None:
        """Why the blocked side was blocked."""
        return (self.replayed if self.now_blocked else self.recorded).reason

    @property
    def money(self) -> bool:
        """Whether the firing has a release (what was or would be blocked)."""
        return self.fired.releases

    @property
    def what(self) -> str:
        """``release now blocked: <why>`` or ``release no longer blocked`` (``firing ...``
        for a firing without a release: a loop, a chain too deep)."""
        noun = "release" if self.money else "firing"
        if self.now_blocked:
            return f"{noun} now blocked: {self.reason}"
        return f"{noun} no longer blocked"

    def to_json(self) -> dict[str, Any]:
        return {
            **matched_json(self.recorded, self.replayed),
            "change": "now_blocked" if self.now_blocked else "no_longer_blocked",
            "reason": self.reason,
            "actions": [a.to_json() for a in self.fired.actions],
        }


BLOCK_CHANGES = {("fired", "blocked"), ("blocked", "fired")}
"""The (recorded, replayed) outcomes of a matched firing that make a ``BlockChange``."""


@dataclass(frozen=True)
class EscrowDelta:
    """What an escrow released in the record and in the replay (queued releases of fired
    firings, shadowed ones left out), and the difference (replayed - recorded)."""

    escrow: str
    currency: str
    recorded: Decimal
    replayed: Decimal

    @property
    def delta(self) -> Decimal:
        return self.replayed - self.recorded

    def to_json(self) -> dict[str, Any]:
        return {
            "escrow": self.escrow,
            "currency": self.currency,
            "recorded": str(self.recorded),
            "replayed": str(self.replayed),
            "delta": _signed(self.delta),
        }


@dataclass
class BacktestDiff:
    """Every difference within the window, and the firings compared."""

    added: list[FiringRecord] = field(default_factory=list)
    gone: list[FiringRecord] = field(default_factory=list)
    changed: list[ChangedFiring] = field(default_factory=list)
    blocks: list[BlockChange] = field(default_factory=list)
    escrows: list[EscrowDelta] = field(default_factory=list)
    recorded_count: int = 0
    replayed_count: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.gone or self.changed or self.blocks)

    @property
    def now_blocked(self) -> list[BlockChange]:
        return [b for b in self.blocks if b.now_blocked]

    @property
    def no_longer_blocked(self) -> list[BlockChange]:
        return [b for b in self.blocks if not b.now_blocked]

    def counts(self) -> str:
        """``N added, N gone, N changed``, then ``N now blocked`` and ``N no longer
        blocked`` when there are any."""
        text = f"{len(self.added)} added, {len(self.gone)} gone, {len(self.changed)} changed"
        for what, found in (
            ("now blocked", self.now_blocked),
            ("no longer blocked", self.no_longer_blocked),
        ):
            if found:
                text += f", {len(found)} {what}"
        return text

    def trips(self, fail_on: FailOn) -> bool:
        """Whether the differences fail ``--fail-on``: ``release`` any change in releases
        (a firing with a release added or gone, a release changed), ``any`` any difference,
        ``none`` never."""
        if fail_on == "any":
            return not self.empty
        if fail_on == "release":
            return (
                any(f.releases for f in (*self.added, *self.gone))
                or any(c.money for c in self.changed)
                or any(b.money for b in self.blocks)
                or any(e.delta for e in self.escrows)
            )
        return False

    def by_rule(self) -> dict[str, dict[str, int]]:
        """Per rule id (``RULE[ITEM]`` for instances): how many firings added, gone,
        changed, now blocked and no longer blocked."""
        counts: dict[str, dict[str, int]] = defaultdict(
            lambda: {"added": 0, "gone": 0, "changed": 0, "now_blocked": 0, "no_longer_blocked": 0}
        )
        for f in self.added:
            counts[f.name]["added"] += 1
        for f in self.gone:
            counts[f.name]["gone"] += 1
        for c in self.changed:
            counts[c.recorded.name]["changed"] += 1
        for b in self.blocks:
            counts[b.recorded.name]["now_blocked" if b.now_blocked else "no_longer_blocked"] += 1
        return dict(sorted(counts.items()))


def in_window(at: str, since: datetime | None, until: datetime | None) -> bool:
    """Whether the RFC 3339 time ``at`` is in ``[since, until)`` (either bound open)."""
    when = parse_rfc3339(at)
    return (since is None or when >= since) and (until is None or when < until)


def diff_firings(
    recorded: Iterable[FiringRecord],
    replayed: Iterable[FiringRecord],
    escrow_currencies: Mapping[str, str],
    since: datetime | None = None,
    until: datetime | None = None,
) -> BacktestDiff:
    """The differences between the ``recorded`` and the ``replayed`` firings decided in
    ``[since, until)``. Per rule instance, firings decided at the same instant are the same
    firing (changed when they differ; a ``BlockChange`` when one side fired and the other
    blocked); the others are added (replayed only) or gone (recorded only), so a firing
    that moved in time is one gone and one added.
    ``escrow_currencies`` names the currency of each configured escrow."""
    old = [f for f in recorded if in_window(f.at, since, until)]
    new = [f for f in replayed if in_window(f.at, since, until)]
    result = BacktestDiff(recorded_count=len(old), replayed_count=len(new))
    pending: dict[tuple[str, str, str, str], list[FiringRecord]] = defaultdict(list)
    for f in old:
        pending[_slot(f)].append(f)
    for f in new:
        matches = pending.get(_slot(f))
        if not matches:
            result.added.append(f)
            continue
        before = matches.pop(0)
        if (before.outcome, f.outcome) in BLOCK_CHANGES:
            result.blocks.append(BlockChange(before, f))
            continue
        changes = firing_changes(before, f)
        if changes:
            result.changed.append(ChangedFiring(before, f, changes))
    result.gone = sorted(
        (f for left in pending.values() for f in left), key=lambda f: (f.at, f.firing_id)
    )
    result.escrows = escrow_deltas(old, new, escrow_currencies)
    return result


def _slot(f: FiringRecord) -> tuple[str, str, str, str]:
    """Where a firing is matched: its rule instance, its instant, and whether it is a
    notice (a notice and a firing at one instant are not the same thing)."""
    return (f.rule_id, f.instance, f.at, "notice" if f.outcome == "notice" else "firing")


def firing_changes(old: FiringRecord, new: FiringRecord) -> tuple[Change, ...]:
    """What differs between two firings of one rule instance at one instant."""
    money = old.releases or new.releases
    tag = " (release)" if money else ""
    changes = []
    if old.outcome != new.outcome:
        changes.append(Change(f"outcome{tag}", old.outcome, new.outcome))
    if old.reason != new.reason:
        changes.append(Change("reason", old.reason, new.reason))
    for index in range(max(len(old.actions), len(new.actions))):
        a = old.actions[index] if index < len(old.actions) else None
        b = new.actions[index] if index < len(new.actions) else None
        changes += action_changes(index, a, b)
    return tuple(changes)


def action_changes(index: int, old: ActionRecord | None, new: ActionRecord | None) -> list[Change]:
    """The differences of the ``index``th action of two matched firings: the action as a
    whole when one side has none, else its kind, target, status and each payload field
    (``actions[0].payload.amount``...). A change to a release is named so
    (``release actions[0].payload.amount``)."""
    where = f"actions[{index}]"
    kinds = {a.kind for a in (old, new) if a is not None}
    if "release" in kinds:
        where = f"release {where}"
    if old is None or new is None:
        return [
            Change(
                where,
                None if old is None else old.to_json(),
                None if new is None else new.to_json(),
            )
        ]
    changes = []
    for name in ("kind", "target", "status"):
        if getattr(old, name) != getattr(new, name):
            changes.append(Change(f"{where}.{name}", getattr(old, name), getattr(new, name)))
    for key in sorted(set(old.payload) | set(new.payload)):
        if old.payload.get(key) != new.payload.get(key):
            changes.append(
                Change(f"{where}.payload.{key}", old.payload.get(key), new.payload.get(key))
            )
    if old.ledger != new.ledger:
        changes.append(Change(f"{where}.ledger", old.ledger, new.ledger))
    return changes


def escrow_deltas(
    recorded: Iterable[FiringRecord],
    replayed: Iterable[FiringRecord],
    currencies: Mapping[str, str],
) -> list[EscrowDelta]:
    """Per escrow released from by either side: the sums of the releases of fired
    firings (queued, not shadowed), recorded and replayed, sorted by escrow."""
    old = released(recorded)
    new = released(replayed)
    return [
        EscrowDelta(
            name,
            currencies.get(name, ""),
            old.get(name, Decimal(0)),
            new.get(name, Decimal(0)),
        )
        for name in sorted(set(old) | set(new))
    ]


def released(firings: Iterable[FiringRecord]) -> dict[str, Decimal]:
    """Per escrow, the sum of the amounts (decimal strings) of the releases the fired
    firings queued (shadowed releases move nothing)."""
    totals: dict[str, Decimal] = {}
    for f in firings:
        if f.outcome != "fired":
            continue
        for a in f.actions:
            if a.releases:
                escrow = str(a.payload.get("escrow"))
                totals[escrow] = totals.get(escrow, Decimal(0)) + Decimal(
                    str(a.payload.get("amount"))
                )
    return totals


def _signed(amount: Decimal) -> str:
    """``+5000.00``, ``-200.00``, ``0``."""
    return f"+{amount}" if amount > 0 else str(amount)


# -- the self-check -----------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class DecisionRecord:
    """A decision as the self-check compares it: every field the engine decides, without
    the ids the store and the HTTP layer give (the decision's row id, its request id).
    ``approvals`` is the approvals status as canonical JSON text; ``fact_seq`` the fact log
    position of the fact that triggered it; ``mode`` the mode its rule ran in."""

    at: str
    rule_id: str
    instance: str
    trigger: str
    outcome: str
    gate_open: bool
    firing_id: str | None
    reason: str | None
    rule_hash: str
    ruleset_version: str
    fact_seq: int | None
    approvals: str | None
    mode: str = "live"

    def __str__(self) -> str:
        name = f"{self.rule_id}[{self.instance}]" if self.instance else self.rule_id
        text = f"{self.at} {name} {self.trigger} -> {self.outcome}"
        if self.firing_id:
            text += f" ({self.firing_id})"
        if self.reason:
            text += f": {self.reason}"
        return text


def approvals_text(approvals: Mapping[str, Any] | None) -> str | None:
    """An approvals status as the self-check compares it: sorted compact JSON."""
    if approvals is None:
        return None
    return json.dumps(approvals, sort_keys=True, separators=(",", ":"), default=str)


def decision_record(decision: Decision, fact_seq: int | None) -> DecisionRecord:
    """The ``DecisionRecord`` of a replayed decision whose triggering fact is at
    ``fact_seq`` in the fact log."""
    return DecisionRecord(
        decision.decided_at,
        decision.rule_id,
        decision.instance,
        decision.trigger,
        decision.outcome,
        decision.gate_open,
        decision.firing_id,
        decision.reason,
        decision.rule_hash,
        decision.ruleset_version,
        fact_seq,
        approvals_text(decision.approvals),
        decision.mode,
    )


def shared(text: str) -> str:
    """``text`` as the one copy every record holding it shares (``sys.intern``): rule ids,
    hashes and versions repeat in every decision of a long history."""
    return sys.intern(text)


@dataclass
class SelfCheck:
    """The self-check's verdict: how many recorded decisions the replay reproduced
    (the decision itself, and for a firing or notice its actions and ledger entries),
    and the first differences, in the record's order."""

    total: int
    reproduced: int
    differences: list[str]

    @property
    def ok(self) -> bool:
        return self.reproduced == self.total and not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "decisions": self.total,
            "reproduced": self.reproduced,
            "differences": self.differences,
        }


def compare_decisions(
    recorded: Sequence[DecisionRecord],
    replayed: Iterable[DecisionRecord],
    recorded_firings: Iterable[FiringRecord],
    replayed_firings: Iterable[FiringRecord],
    *,
    show: int = 20,
) -> SelfCheck:
    """Compare the recorded decisions with the replayed ones (as multisets: within one
    millisecond the order of rule instances due together may differ; ``replayed`` is
    consumed first, as it comes, so it may be the replay itself) and then the actions of
    each firing and notice (by firing or notice id). A recorded decision is reproduced
    when an equal one was replayed and its firing's actions are the same. At most ``show``
    differences are listed."""
    left = Counter(recorded)
    extras: list[DecisionRecord] = []
    for record in replayed:
        if left[record] > 0:
            left[record] -= 1
        else:
            extras.append(record)
    unmatched_recorded = []
    for record in recorded:
        if left[record] > 0:
            left[record] -= 1
            unmatched_recorded.append(record)
    extra = sorted(extras)
    replayed_by_id = {f.firing_id: f for f in replayed_firings}
    recorded_by_id = {f.firing_id: f for f in recorded_firings}
    bad_firings: dict[str, list[Change]] = {}
    for firing_id, old in recorded_by_id.items():
        new = replayed_by_id.get(firing_id)
        if new is None:
            bad_firings[firing_id] = [Change("firing", firing_id, None)]
            continue
        changes = [c for c in firing_changes(old, new) if c.field != "outcome"]
        if old.at != new.at:
            changes.insert(0, Change("at", old.at, new.at))
        if changes:
            bad_firings[firing_id] = changes
    for firing_id in replayed_by_id.keys() - recorded_by_id.keys():
        bad_firings[firing_id] = [Change("firing", None, firing_id)]
    differences = []
    for record in unmatched_recorded:
        differences.append(f"recorded, not reproduced: {record}")
    for record in extra:
        differences.append(f"reproduced, not recorded: {record}")
    for firing_id, changes in bad_firings.items():
        for c in changes:
            differences.append(
                f"{firing_id}: {c.field}: recorded {_json(c.old)}, replayed {_json(c.new)}"
            )
    failed = {id(r) for r in unmatched_recorded}
    reproduced = sum(
        1
        for r in recorded
        if id(r) not in failed and (r.firing_id is None or r.firing_id not in bad_firings)
    )
    return SelfCheck(len(recorded), reproduced, differences[:show])


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
