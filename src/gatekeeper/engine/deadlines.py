"""Deadlines: evaluate a time-dependent rule when time can change it, not on every tick.

Why not ticks
-------------
A rule such as ``days_since(milestone.design.approved_at) >= 7`` changes value at one
instant, ``approved_at + 7 days``, and at no other while its facts stay the same. Re-evaluating
every time-dependent rule every second (the first daemon's clock tick) costs the whole
ruleset's evaluation each second whether or not anything is due: with 10,000 such rules, a
large share of a core for nothing (``bench/bench_deadlines.py`` measures it). Instead,
``CompiledCondition.next_change_at`` (see ``gatekeeper.expr.timing``) computes, from a
rule's current facts, the earliest instant at which its condition may change, to the
microsecond; a ``DeadlineSchedule`` keeps those instants in a min-heap, and the daemon
sleeps until the earliest one. An idle daemon then wakes only when something is due, and a
rule that becomes true through the passing of time alone is evaluated at its instant (the
lag is the event loop's wake-up latency plus the evaluation, far below the 1-second bound).

The fallback
------------
Uses of time that ``next_change_at`` cannot solve (``now()``, arithmetic on ``days_since``,
comparing two time functions, ...) give ``now + 1 s``: such rules are polled once a
second, which is what the tick did, so they still meet the 1-second bound. Only they pay.

How the daemon uses it
----------------------
All instants are aware UTC ``datetime`` values from the injectable clock
(``gatekeeper.clock``); a naive one is taken as UTC, other offsets are converted.

- **At start** (``clear()`` first): mark every time-dependent rule of the active engine
  due now (``mark_due(schedule, engine.time_dependent, now)``). The loop's first pass then
  evaluates them all with trigger ``"time"``: a deadline that passed while the daemon was
  down fires at start, because the rule's persisted gate is still closed and the
  evaluation finds it open. That pass reschedules them (next point). **After a reload**,
  only the new and changed rules are marked due (one that was not loaded may have missed
  its deadline); an unchanged rule keeps its entry, and one gone or no longer
  time-dependent is removed (``set(rule_id, None)``).
- **After every committed transition**, reschedule with ``schedule_rules`` the rules it
  evaluated: the rules reading its facts (``Engine.rules_reading(fact.key)`` for each fact
  of an ingest, exactly the rules ``plan_ingest`` evaluated), the rule of an approval or
  admin act, and the rules a deadline pass planned (all of them: ``plan_rules`` with
  ``record_unchanged=False`` drops the decisions of unchanged rules, so the decisions do not
  list them). Pass the committed ``FactTable`` and **the same ``now`` the plan used**: a
  threshold between the plan's ``now`` and a later one would otherwise be skipped as
  already past. Rules that do not use time can be passed too (they are removed). If a
  commit fails, the popped rules must be marked due again (``mark_due``), or they would
  be forgotten.
- **The loop** (``gatekeeper.runtime.ticker``): sleep ``seconds_until_next(clock.now(),
  cap=...)`` or until a wake-up event set whenever a reschedule happened (an ingest may
  have brought a deadline closer); then, under the write lock, ``now = clock.now()``,
  ``due = [engine.rules[i] for i in schedule.pop_due(now) if i in engine.rules]``,
  ``engine.plan_rules(facts, states, due, now, trigger="time", record_unchanged=False)``,
  commit, apply, ``schedule_rules(schedule, due, facts, now)``. A cap on the sleep (say
  60 s) bounds the effect of a wall-clock jump, since ``asyncio`` sleeps on the monotonic
  clock while deadlines are wall-clock instants; it costs one empty wake-up a minute.

Lazy invalidation: ``set`` pushes a new heap entry and records it as the rule's current one;
older entries of that rule stay in the heap and are skipped when they surface (and the heap
is rebuilt when stale entries outnumber live ones). Every operation is O(log n) amortised.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Generic, TypeVar

from gatekeeper.engine.evaluate import approval_key, lapses_at
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.model import ApprovalStanding, InstanceKey
from gatekeeper.expr import Item, next_change_at
from gatekeeper.rules.model import Rule

K = TypeVar("K", bound=Hashable)

_COMPACT_SLACK = 1024
"""Stale heap entries tolerated beyond the number of live ones before a rebuild."""


def _utc(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime (a naive one is taken as UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class DeadlineSchedule(Generic[K]):
    """When each rule instance is next due: a min-heap of ``(due_at, key)`` with lazy
    invalidation. The daemon's keys are ``InstanceKey`` ``(rule id, item id)``: each
    instance of a per-item rule has its own deadline (``days_since(item.data.opened_at)
    >= 3`` comes due for each item at its own moment).

    A key has at most one due time; ``set`` replaces it and ``set(key, None)`` removes
    it. Not thread-safe: use it from the event loop (under the daemon's write lock).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, int, K]] = []
        self._current: dict[K, tuple[datetime, int]] = {}
        self._sequence = itertools.count()

    def set(self, key: K, due_at: datetime | None) -> None:
        """Make ``key`` due at ``due_at`` (replacing any earlier entry); None removes it."""
        if due_at is None:
            self._current.pop(key, None)
            return
        due_at = _utc(due_at)
        current = self._current.get(key)
        if current is not None and current[0] == due_at:
            return
        entry = (due_at, next(self._sequence), key)
        self._current[key] = (due_at, entry[1])
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._current) + _COMPACT_SLACK:
            self._compact()

    def due_at(self, key: K) -> datetime | None:
        """When ``key`` is due, or None when it is not scheduled."""
        current = self._current.get(key)
        return None if current is None else current[0]

    def pop_due(self, now: datetime) -> list[K]:
        """Remove and return the keys due at or before ``now``, each once, earliest first."""
        now = _utc(now)
        due: list[K] = []
        while self._heap and self._heap[0][0] <= now:
            due_at, sequence, key = heapq.heappop(self._heap)
            if self._current.get(key) == (due_at, sequence):
                del self._current[key]
                due.append(key)
        return due

    def next_due(self) -> datetime | None:
        """The earliest due time, or None when nothing is scheduled."""
        self._drop_stale_head()
        return self._heap[0][0] if self._heap else None

    def seconds_until_next(self, now: datetime, *, cap: float | None = None) -> float | None:
        """Seconds from ``now`` until ``next_due()`` (0 when already due), at most ``cap``;
        None when nothing is scheduled and there is no cap (sleep until woken)."""
        due = self.next_due()
        if due is None:
            return cap
        wait = max(0.0, (due - _utc(now)).total_seconds())
        return wait if cap is None else min(wait, cap)

    def clear(self) -> None:
        """Forget every rule (e.g. before rescheduling a new ruleset)."""
        self._heap.clear()
        self._current.clear()

    def scheduled(self) -> list[K]:
        """Every key scheduled, in no particular order."""
        return list(self._current)

    def __len__(self) -> int:
        """How many rules are scheduled."""
        return len(self._current)

    def __contains__(self, key: object) -> bool:
        return key in self._current

    def _drop_stale_head(self) -> None:
        while self._heap:
            due_at, sequence, key = self._heap[0]
            if self._current.get(key) == (due_at, sequence):
                return
            heapq.heappop(self._heap)

    def _compact(self) -> None:
        self._heap = [(due, seq, key) for key, (due, seq) in self._current.items()]
        heapq.heapify(self._heap)


def instances_of(rules: Iterable[Rule], facts: FactTable) -> list[InstanceKey]:
    """Every instance of ``rules``: ``(rule id, "")`` for a rule without ``for_each``, one
    ``(rule id, item id)`` per current fact of a per-item rule's kind (sorted by id)."""
    keys: list[InstanceKey] = []
    for rule in rules:
        if rule.for_each is None:
            keys.append((rule.id, ""))
        else:
            keys += ((rule.id, i) for i in sorted(facts.of_kind(rule.project, rule.for_each)))
    return keys


def schedule_rules(
    schedule: DeadlineSchedule[InstanceKey],
    rules: Iterable[Rule],
    facts: FactTable,
    now: datetime,
    approvals: ApprovalStanding | None = None,
) -> datetime | None:
    """(Re)schedule every instance of each of ``rules`` (``schedule_instances``)."""
    rules = list(rules)
    by_id = {rule.id: rule for rule in rules}
    keys = instances_of(rules, facts)
    return schedule_instances(schedule, by_id, keys, facts, now, approvals)


def schedule_instances(
    schedule: DeadlineSchedule[InstanceKey],
    rules: Mapping[str, Rule],
    keys: Iterable[InstanceKey],
    facts: FactTable,
    now: datetime,
    approvals: ApprovalStanding | None = None,
) -> datetime | None:
    """(Re)schedule each instance ``keys`` (of ``rules``, by id) at the next instant its
    condition may change through time alone, given ``facts`` (``next_change_at`` over
    ``ProjectFacts(rule.project, facts)``, with the instance's item for a per-item rule),
    or one of its standing ``approvals`` lapses (``approvals.expires_after``), whichever
    comes first; an instance that time cannot change, whose rule is not in ``rules`` or
    whose item is gone is removed from the schedule.

    ``now`` must be the instant the rules were last evaluated at (see the module docstring).
    Returns the earliest due time it set, or None, so the caller can tell whether a
    sleeping deadline loop must be woken.
    """
    earliest: datetime | None = None
    for key in keys:
        rule = rules.get(key[0])
        due = None if rule is None else _next_change(rule, key[1], facts, now)
        if rule is not None and approvals and rule.approvals is not None:
            lapse = _next_lapse(rule, key[1], approvals, now)
            if lapse is not None and (due is None or lapse < due):
                due = lapse
        schedule.set(key, due)
        if due is not None and (earliest is None or due < earliest):
            earliest = due
    return earliest


def _next_lapse(
    rule: Rule, item: str, approvals: ApprovalStanding, now: datetime
) -> datetime | None:
    """When the next standing approval of instance ``item`` of ``rule`` lapses after
    ``now`` (None: none will)."""
    standing = approvals.get(approval_key(rule.id, item))
    if not standing:
        return None
    times = (lapses_at(rule, stand) for stand in standing.values())
    later = [when for when in times if when is not None and when > now]
    return min(later, default=None)


def _next_change(rule: Rule, item: str, facts: FactTable, now: datetime) -> datetime | None:
    lookup = ProjectFacts(rule.project, facts)
    if rule.for_each is None:
        return next_change_at(rule.condition, lookup, now)
    data = facts.get((rule.project, rule.for_each, item))
    if data is None:
        return None
    return next_change_at(rule.condition, lookup, now, item=Item(rule.for_each, item, data))


def mark_due(
    schedule: DeadlineSchedule[InstanceKey], keys: Iterable[InstanceKey], now: datetime
) -> None:
    """Make each instance ``keys`` due at ``now``: the next pass of the deadline loop
    evaluates them (at start and after a reload, so that deadlines missed meanwhile fire
    at once). ``instances_of(rules, facts)`` gives the keys of whole rules."""
    for key in keys:
        schedule.set(key, now)


def drop_rule(schedule: DeadlineSchedule[InstanceKey], rule_id: str) -> None:
    """Remove every instance of rule ``rule_id`` from ``schedule``."""
    for key in schedule.scheduled():
        if key[0] == rule_id:
            schedule.set(key, None)
