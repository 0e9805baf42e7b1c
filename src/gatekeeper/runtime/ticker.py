"""The deadline loop: time-dependent rules evaluated when the clock can change them.

Each time-dependent rule is scheduled (``engine.deadlines``) at the instant its condition
can next change with the facts as they are; ``Ticker.run`` sleeps until the earliest one (or
until a new fact moves one earlier), then evaluates the rules that are due, through the
writer like any other write. An idle daemon does no work and a deadline fires on time.

On a database several daemons share, every daemon's loop schedules every deadline, and
each pass first catches up with what the others committed (``Writer.catch_up``: their
decisions reschedule the instances they evaluated), so a deadline fires once across the
daemons (the first to commit fires it; another one planning the same firing is refused as
behind, catches up and finds it fired), and fires even when the daemon that saw its facts
has died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence

from gatekeeper.clock import Clock, parse_rfc3339
from gatekeeper.engine.deadlines import (
    DeadlineSchedule,
    drop_rule,
    instances_of,
    mark_due,
    schedule_instances,
)
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.model import ApprovalStanding, InstanceKey, Transition
from gatekeeper.metrics import Metrics
from gatekeeper.rules.model import Rule
from gatekeeper.runtime.ingest import Writer, log_firings
from gatekeeper.store.errors import RulesetChanged, StateBehind, StoreUnavailable
from gatekeeper.store.records import CaughtUpDecision

log = logging.getLogger("gatekeeper.runtime.ticker")


class Ticker:
    """The deadlines of the live ruleset and the loop that acts on them.

    ``tick_s`` is the longest ``run`` sleeps before looking at the clock again (deadlines
    are wall-clock times and the clock may jump). Implements the writer's ``Schedule``:
    ``reschedule`` after each applied transition, ``all_due`` after memory was rebuilt.
    """

    def __init__(self, clock: Clock, metrics: Metrics, tick_s: float = 60.0) -> None:
        self.clock = clock
        self.metrics = metrics
        self.tick_s = tick_s
        self.deadlines: DeadlineSchedule[InstanceKey] = DeadlineSchedule()
        self._changed = asyncio.Event()

    def reschedule(
        self,
        transition: Transition,
        engine: Engine,
        facts: FactTable,
        approvals: ApprovalStanding | None = None,
    ) -> None:
        """After ``transition`` is applied: reschedule the time-dependent rules it evaluated
        (approvals that lapse included), from the same "now" it was planned at; wake the
        loop when the next deadline moved earlier."""
        if transition.planned_at is None:
            return
        time_dependent = engine.time_dependent_ids
        keys = [
            (d.rule_id, d.instance) for d in transition.decisions if d.rule_id in time_dependent
        ]
        if keys:
            deadlines = self.deadlines
            before = deadlines.next_due()
            schedule_instances(
                deadlines, engine.rules, keys, facts, transition.planned_at, approvals
            )
            after = deadlines.next_due()
            if after is not None and (before is None or after < before):
                self._changed.set()

    def caught_up(
        self,
        decisions: list[CaughtUpDecision],
        engine: Engine,
        facts: FactTable,
        approvals: ApprovalStanding | None = None,
    ) -> None:
        """After a catch-up applied ``decisions`` another daemon committed: reschedule the
        time-dependent instances they evaluated, each from the instant it was decided at
        (as ``reschedule`` does from a transition's); wake the loop when the next deadline
        moved earlier."""
        time_dependent = engine.time_dependent_ids
        by_time: dict[str, list[InstanceKey]] = {}
        for d in decisions:
            if d.rule_id in time_dependent:
                by_time.setdefault(d.decided_at, []).append((d.rule_id, d.instance))
        if not by_time:
            return
        deadlines = self.deadlines
        before = deadlines.next_due()
        for decided_at, keys in by_time.items():
            schedule_instances(
                deadlines, engine.rules, keys, facts, parse_rfc3339(decided_at), approvals
            )
        after = deadlines.next_due()
        if after is not None and (before is None or after < before):
            self._changed.set()

    def all_due(self, engine: Engine, facts: FactTable) -> None:
        """Every instance of every time-dependent rule of ``engine`` is due now (memory was
        rebuilt from ``facts``)."""
        mark_due(self.deadlines, instances_of(engine.time_dependent, facts), self.clock.now())
        self._changed.set()

    def activated(
        self,
        engine: Engine,
        previous: Engine | None,
        changed: Sequence[Rule],
        facts: FactTable,
    ) -> None:
        """Deadlines for a ruleset going live. At start every time-dependent rule is due at
        once: deadlines that passed while the daemon was down fire now. At a reload, so are
        the new and changed ones (they may have missed facts or deadlines while out); a rule
        that did not change keeps its deadline, since its condition and facts are the same;
        a rule no longer time-dependent (or gone) is dropped."""
        now = self.clock.now()
        if previous is None:
            self.deadlines.clear()
            mark_due(self.deadlines, instances_of(engine.time_dependent, facts), now)
        else:
            for rule in previous.time_dependent:
                if rule.id not in engine.time_dependent_ids:
                    drop_rule(self.deadlines, rule.id)
            changed_ids = {rule.id for rule in changed}
            due = [r for r in engine.time_dependent if r.id in changed_ids]
            mark_due(self.deadlines, instances_of(due, facts), now)
        self._changed.set()

    async def run(self, writer: Writer) -> None:
        """The deadline task: sleep until the next deadline (or a wake-up: a new fact moved
        one earlier), then evaluate the rules that are due. Never longer than ``tick_s``."""
        while True:
            self._changed.clear()
            wait = self.deadlines.seconds_until_next(self.clock.now(), cap=self.tick_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.tick_s if wait is None else wait)
            try:
                await self.tick(writer)
            except Exception as exc:
                # those: the writer's outage log, or its adopting the active ruleset
                if not isinstance(exc, StoreUnavailable | RulesetChanged):
                    log.exception("evaluating due time-dependent rules failed; retrying shortly")
                await asyncio.sleep(min(self.tick_s, 1.0))

    async def tick(self, writer: Writer) -> Transition:
        """Evaluate, through ``writer``, the time-dependent rules whose deadline has come;
        returns the transition (committed when it has decisions).

        Shielded like every write: cancelling the caller never interrupts it halfway."""
        return await asyncio.shield(self._tick(writer))

    async def _tick(self, writer: Writer) -> Transition:
        async with writer.lock:
            await writer.catch_up()  # a shared database: what the others decided first
            engine = writer.live_engine()
            now = self.clock.now()
            earliest = self.deadlines.next_due()
            due = [key for key in self.deadlines.pop_due(now) if key[0] in engine.rules]
            if due and earliest is not None:
                lag_s = max(0.0, (now - earliest).total_seconds())
                self.metrics.deadline_lag_seconds.observe(lag_s)
            for attempt in itertools.count():
                engine = writer.live_engine()  # another one, once an activation was adopted
                due = [key for key in due if key[0] in engine.rules]
                t0 = time.perf_counter()
                transition = engine.plan_instances(
                    writer.facts,
                    writer.states,
                    due,
                    now,
                    "time",
                    book=writer.book.copy(),
                    approvals=writer.approvals,
                    record_unchanged=False,
                )
                if due:
                    writer.counters.planned("time", t0, len(due))
                if not transition.decisions:
                    break
                try:
                    await writer.commit_and_apply([transition])
                    break
                except (StateBehind, RulesetChanged) as exc:  # memory is up to date now
                    try:
                        writer.replan(exc, attempt)
                    except BaseException:
                        mark_due(self.deadlines, due, now)  # not lost: tried again next pass
                        raise
                except BaseException:
                    mark_due(self.deadlines, due, now)  # not lost: tried again next pass
                    raise
            schedule_instances(
                self.deadlines, engine.rules, due, writer.facts, now, writer.approvals
            )
        log_firings(transition)
        return transition
