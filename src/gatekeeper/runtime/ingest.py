"""The one write path: the in-memory mirror of what the store committed, and every write.

``Writer`` holds the live engine and the current facts, rule states, standing approvals and
escrow totals, and the lock that every write takes. A write is planned by the pure
``Engine``, committed by the store in one transaction, and only then applied in memory
(``commit_and_apply``); a failed commit changes nothing, and a failure to apply what was
committed rebuilds memory from the database (the database is the truth).

Fact batches go through a queue to a single writer task that commits every batch queued
meanwhile in one transaction (group commit, one fsync), each batch still all-or-nothing; an
``Idempotency-Key`` seen before answers with the first answer and applies nothing.
Approvals and admin acts are written under the same lock, one transaction each.

The writer knows nothing of deadlines or rulesets: after each applied transition it tells
its ``Schedule`` (the deadline loop), and a ruleset manager swaps ``engine`` and ``book``
under ``lock``.

Several daemons on one database (PostgreSQL, ``Store.shared``): any daemon accepts facts,
approvals, admin acts, ticks, ruleset activations, cancels and settlements, and every one
of those writes is still planned from this daemon's memory. What makes each decision see
the latest committed state is the database's state version (``StateFence``): every
deciding write of every daemon takes its row first, so they commit one at a time, and is
refused (``StateBehind``, nothing written) unless memory is at the version the database
holds. Refused, the writer catches up (``catch_up``: what was committed since, read from
the fact log by ``seq`` and from the rule states, approvals, sign-offs, escrow figures and
decisions written since, applied as a committed transition is) and plans the write again
(``REPLANS`` times at most; the daemon holding the row always progresses). So a ``fire:
once`` rule fed through two daemons fires once, a count sees the facts posted to the other
daemon, an escrow's limit holds under releases decided by different daemons, and an
``Idempotency-Key`` posted to two daemons at once applies once (the second, refused as
behind, plans again, finds the key and answers ``replayed``). A COMMIT whose answer was
lost needs nothing more: the fence did not move, so if the server did commit it, the next
write is refused as behind and the catch-up brings it into memory. Every commit also names
the ruleset that planned it; when another daemon has activated another one meanwhile, the
store refuses it (``RulesetChanged``), the writer has the manager adopt the active ruleset
(``adopt_active``), and plans again with it. A daemon that is not writing catches up at
each pass of its deadline loop (``Ticker``) and of its ruleset follower (every
``ruleset_check_s``), so its deadlines and views follow what the others decide. On
SQLite (one daemon per file) nothing is checked: no fence, no cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, TypeVar

from prometheus_client.metrics import MetricWrapperBase

from gatekeeper.clock import Clock
from gatekeeper.config import Escrow
from gatekeeper.delivery.dispatcher import Dispatcher
from gatekeeper.engine.evaluate import Engine, apply_transition, without_consumed
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    ApprovalStanding,
    Decision,
    FactInput,
    IdempotencyRecord,
    InstanceKey,
    RuleState,
    SignOff,
    Stand,
    Transition,
)
from gatekeeper.engine.signoffs import SignedOff, is_money_rule
from gatekeeper.metrics import Metrics, exemplar
from gatekeeper.rules.model import Rule
from gatekeeper.runtime.outage import StoreOutage
from gatekeeper.runtime.recent import RecentDecisions
from gatekeeper.store import Store
from gatekeeper.store.errors import RulesetChanged, StateBehind, StoreUnavailable
from gatekeeper.store.records import CaughtUpDecision, StateChanges, StateFence

log = logging.getLogger("gatekeeper.runtime.ingest")

T = TypeVar("T")

MAX_GROUP_COMMIT = 256
"""At most this many fact batches share one transaction."""

RELOAD_AFTER_FACTS = 10_000
"""A catch-up that would read more fact log entries than this loads the whole state
instead (a daemon that was cut off for long). Measured on PostgreSQL 15 with 20,000 facts
of a per-item rule: catching up on all of them took about 0.7 s, loading them 0.45 s;
catching up on one commit about 1 ms."""

REPLANS = 10
"""How many times a write refused because memory was behind (or planned with a replaced
ruleset) is planned again before it fails (``StoreUnavailable``, condition ``locked``: the
client may retry). Each refusal means another daemon committed in the moment between this
one's catch-up and its commit."""


class UnknownRule(LookupError):
    """No rule with that id in the active ruleset."""


class UnknownInstance(LookupError):
    """The rule has no instance with that item id (no fact of its ``for_each`` kind)."""


class UnknownContentHash(LookupError):
    """No rule of the active ruleset has that content hash."""


class SignOffRefused(ValueError):
    """A sign-off that cannot be taken: the rule is not a money rule (no ``release``), or
    it is in ``mode: shadow`` (going live changes its hash)."""


class AlreadySignedOff(ValueError):
    """The admin already signed off this content hash (each admin signs a hash once)."""


class NotAnApprover(ValueError):
    """The approval does not count: the rule takes none, or the approver is not listed."""


class ShuttingDown(Exception):
    """The daemon is stopping and takes no new facts."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request")
        self.key = key


@dataclass(frozen=True)
class IngestResult:
    """The answer to an ingest: the facts' sequence numbers, the request id that applied
    them, and whether this is a repeat answered from an ``Idempotency-Key``."""

    seqs: list[int]
    request_id: str | None
    replayed: bool


@dataclass
class _IngestJob:
    batch: list[FactInput]
    request_id: str | None
    idempotency: IdempotencyRecord | None
    result: asyncio.Future[IngestResult]


class Schedule(Protocol):
    """What the writer tells the deadline loop (``ticker.Ticker``)."""

    def reschedule(
        self,
        transition: Transition,
        engine: Engine,
        facts: FactTable,
        approvals: ApprovalStanding | None = None,
    ) -> None:
        """``transition`` was applied: reschedule the time-dependent rules it evaluated
        (``approvals``: the standing approvals, whose lapses are deadlines too)."""

    def all_due(self, engine: Engine, facts: FactTable) -> None:
        """Memory was rebuilt (``facts``): every time-dependent rule instance of ``engine``
        is due now."""

    def caught_up(
        self,
        decisions: list[CaughtUpDecision],
        engine: Engine,
        facts: FactTable,
        approvals: ApprovalStanding | None = None,
    ) -> None:
        """Memory caught up with ``decisions`` another daemon committed: reschedule the
        time-dependent instances they evaluated, as of when each was decided."""


class WriteLock:
    """The writer's lock (``asyncio.Lock``: one write of this daemon at a time, from plan to
    apply), which also ends the database's decision turn (``Store.take_turn``) when a write
    that took it lets go: a write refused as behind takes the turn before it catches up and
    plans again, and holds it no longer than this lock."""

    def __init__(self, store: Store) -> None:
        self._lock = asyncio.Lock()
        self._store = store
        self._turn = False

    async def take_turn(self) -> None:
        """Take the database's decision turn until this lock is released (held already:
        nothing). Call with the lock held. Raises what ``Store.take_turn`` raises."""
        if not self._turn:
            await self._store.take_turn()
            self._turn = True

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._turn:
                self._turn = False
                await self._store.end_turn()
        finally:
            self._lock.release()


class Counters:
    """The evaluation and outcome metrics of committed work (in memory, no I/O), with each
    labelled child looked up once (``labels`` costs more than the ``inc``/``observe`` done
    on it once per request)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}

    def labelled(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, cached."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def planned(self, trigger: str, started: float, evaluated: int) -> None:
        """Record a planning pass begun at ``started`` (``time.perf_counter()``) that
        evaluated ``evaluated`` rules, triggered by ``trigger`` (fact, time, approval,
        admin, reload)."""
        metrics = self.metrics
        self.labelled(metrics.evaluation_seconds, trigger).observe(time.perf_counter() - started)
        if evaluated:
            self.labelled(metrics.evaluations, trigger).inc(evaluated)

    def applied(self, transitions: list[Transition]) -> None:
        """Count the facts, decisions by outcome and queued actions of committed
        ``transitions``: one ``inc`` per metric and label for the whole group (each ``inc``
        takes the metric's lock)."""
        metrics = self.metrics
        metrics.changed()
        facts = 0
        outcomes: dict[str, int] = {}
        actions: dict[str, int] = {}
        shadowed: dict[tuple[str, str], int] = {}
        items: dict[str, Decision] = {}  # per outcome, the last firing of a per-item rule
        for transition in transitions:
            facts += len(transition.facts)
            for decision in transition.decisions:
                outcome = decision.outcome
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if decision.firing_id is not None and decision.instance:
                    items[outcome] = decision
            for action in transition.actions:
                if action.shadowed:
                    key = (action.rule_id, action.kind)
                    shadowed[key] = shadowed.get(key, 0) + 1
                else:
                    actions[action.target] = actions.get(action.target, 0) + 1
        if facts:
            metrics.facts_accepted.inc(facts)
        for name, count in outcomes.items():
            fired = items.get(name)  # the item as an exemplar, never as a label
            sample = (
                exemplar(item=fired.instance, rule_id=fired.rule_id) if fired is not None else None
            )
            child = self.labelled(metrics.decisions, name)
            if sample is not None and count > 1:  # the exemplar is one firing: an inc of 1
                child.inc(count - 1)
                count = 1
            child.inc(count, exemplar=sample)
        for target, count in actions.items():
            self.labelled(metrics.actions, target, "queued").inc(count)
        for (rule_id, kind), count in shadowed.items():
            self.labelled(metrics.shadowed_actions, rule_id, kind).inc(count)


class Writer:
    """The in-memory mirror and the one write path into ``store`` (see the module doc).

    ``run()`` is the writer task (started by the daemon); ``ingest``, ``approve`` and
    ``administer`` are the writes of requests; ``commit_and_apply`` under ``lock`` is the
    write of everything else (ticks, ruleset activation). ``engine`` is None until a
    ruleset is live.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        counters: Counters,
        dispatcher: Dispatcher,
        schedule: Schedule,
        escrows: Mapping[str, Escrow],
        outage: StoreOutage | None = None,
    ) -> None:
        self.store = store
        self.outage = outage or StoreOutage(clock.now)
        """Where a database that cannot take writes is reported (once per interval)."""
        self.clock = clock
        self.counters = counters
        self.dispatcher = dispatcher
        self.schedule = schedule
        self.engine: Engine | None = None
        self.facts = FactTable()
        self.states: dict[InstanceKey, RuleState] = {}
        """Rule states by instance, ``(rule id, item id)`` (item id ``""``: a plain rule)."""
        self.approvals: dict[str, dict[str, Stand]] = {}
        """Standing approvals by ``approval_key`` (``<rule id>`` or ``<rule id>[<item id>]``)
        -> approver subject."""
        self.book = EscrowBook(escrows)
        self.signed: SignedOff = {}
        """The sign-offs of money rules' content hashes (``SignOffBook.signed``; the live
        engine reads this very mapping, changed in place only after a commit)."""
        self.recent = RecentDecisions()
        """The latest decisions of each project (for the status page)."""
        self.lock = WriteLock(store)
        """Held by every write from plan to apply: one write at a time (and, on a shared
        database, the decision turn a refused write took ends with it)."""
        self._queue: asyncio.Queue[_IngestJob] = asyncio.Queue()
        self._closing = False
        self.adopt_active: Callable[[], Awaitable[object]] | None = None
        """Set by the ruleset manager: make the database's active ruleset live (called with
        ``lock`` held) after a commit was refused as planned with another one."""
        self.fence: StateFence | None = None
        """On a database other daemons share: where memory stands in the database's
        history (set by ``load_state``, moved by each commit and catch-up), handed to
        every deciding write. None on a database one daemon serves (SQLite)."""

    def live_engine(self) -> Engine:
        """The live engine; ``RuntimeError`` before a ruleset went live."""
        if self.engine is None:
            raise RuntimeError("the daemon has not started")
        return self.engine

    # -- state ------------------------------------------------------------------------

    async def load_state(self) -> None:
        """Current facts, rule states, approvals and escrow totals (what is committed: not
        returned), from the database (the escrow limits stay those of the current
        ``book``). On a shared database the position (``fence``) is read first: what is
        loaded is at least that new, and a catch-up from it applies current truth again
        (``StateChanges``), so the reads need no common snapshot."""
        cursor = await self.store.state_cursor() if self.store.shared else None
        self.facts = FactTable(await self.store.load_facts())
        self.states = await self.store.load_rule_states()
        self.approvals = await self.store.load_approvals()
        signed = await self.store.load_signoffs()
        self.signed.clear()  # in place: the live engine holds this mapping
        self.signed.update(signed)
        totals = await self.store.escrow_totals()
        self.book = EscrowBook(
            self.book.escrows, {escrow: figures.committed for escrow, figures in totals.items()}
        )
        self.fence = None if cursor is None else StateFence(cursor)

    async def catch_up(self) -> bool:
        """Bring memory up to the latest state committed in a shared database (see the
        module): apply what was committed after ``fence`` (``Store.state_changes``) as a
        committed transition is applied: facts put in fact log order (the derived
        collections of ``facts`` follow them as they follow applied ones), rule states,
        each changed instance's standing approvals, sign-offs, escrow figures, the
        decisions for the status page and the deadline loop (``Schedule.caught_up``), and
        the dispatcher woken when one fired (its actions may be this daemon's to send). A
        database found older than memory (restored from a backup), or more than
        ``RELOAD_AFTER_FACTS`` fact log entries ahead, is loaded whole.
        Returns whether anything changed; nothing to do without a fence (SQLite). Call with
        ``lock`` held. Raises what the store raises (memory unchanged then)."""
        fence = self.fence
        if fence is None:
            return False
        metrics = self.counters.metrics
        started = time.perf_counter()
        now_at = await self.store.state_cursor()  # one read: usually nothing new
        if now_at == fence.cursor:
            return False
        far = now_at.fact_seq - fence.cursor.fact_seq > RELOAD_AFTER_FACTS
        if fence.cursor.behind(now_at) or far:
            if not far:
                log.error(
                    "the database is at an older position than this daemon's memory (%s, "
                    "memory at %s): was it restored from a backup? Loading the whole state",
                    now_at,
                    fence.cursor,
                )
            await self._reload_state()
            self.counters.labelled(metrics.catch_ups, "reload").inc()
            metrics.catch_up_seconds.observe(time.perf_counter() - started)
            return True
        changes = await self.store.state_changes(fence.cursor)
        try:
            self._apply_changes(changes)
        except Exception:  # the database is the truth: memory is rebuilt from it
            log.critical(
                "applying what other daemons committed in memory failed; reloading the "
                "daemon's state from the database",
                exc_info=True,
            )
            await self._reload_state()
            self.counters.labelled(metrics.catch_ups, "reload").inc()
            return True
        fence.cursor = changes.cursor
        self.counters.labelled(metrics.catch_ups, "incremental").inc()
        metrics.catch_up_seconds.observe(time.perf_counter() - started)
        metrics.changed()
        return True

    def _apply_changes(self, changes: StateChanges) -> None:
        """Apply ``changes`` (committed by other writers) in memory."""
        facts = self.facts
        for key, data in changes.facts:
            facts.put(key, data)
        self.states.update(changes.rule_states)
        for approval_key, standing in changes.approvals.items():
            if standing:
                self.approvals[approval_key] = standing
            else:
                self.approvals.pop(approval_key, None)
        for signoff in changes.signoffs:  # in place: the live engine holds this mapping
            self.signed.setdefault(signoff.content_hash, {})[signoff.actor] = signoff
        self.book.committed.update(changes.escrows)
        decisions = changes.decisions
        self.recent.add(decisions)
        engine = self.engine
        if engine is not None and decisions:
            self.schedule.caught_up(decisions, engine, facts, self.approvals)
        if any(d.outcome == "fired" for d in decisions):
            self.dispatcher.wake()

    async def _reload_state(self) -> None:
        """Rebuild memory from the database after a failure to apply what it committed: the
        state, every time-dependent rule due at once (as at start), and the dispatcher told
        to look at the outbox (committed actions it was not handed)."""
        await self.load_state()
        self.schedule.all_due(self.live_engine(), self.facts)
        self.dispatcher.wake()

    async def commit_and_apply(self, transitions: list[Transition]) -> list[list[int]]:
        """Commit ``transitions`` in one transaction, then apply them in memory; returns
        each transition's fact sequence numbers. Call with ``lock`` held.

        Raises what the store raises when the commit fails (nothing is applied then; a
        ``StoreUnavailable`` is reported to ``outage``, a success clears it). Refused as
        planned on memory behind the database (``StateBehind``) or with a replaced ruleset
        (``RulesetChanged``), it first brings memory up to date (``catch_up``, or adopting
        the active ruleset), then raises: the caller plans again (``replan``). Shielded: a
        caller cancelled meanwhile (at shutdown) does not leave a committed transition
        unapplied, so memory never disagrees with the database."""

        engine = self.engine
        planned_with = engine.ruleset.version if engine and self.store.shared else None

        async def commit_then_apply() -> list[list[int]]:
            try:
                results = await self.store.commit_transitions(
                    transitions, planned_with=planned_with, fence=self.fence
                )
            except StoreUnavailable as exc:
                self.outage.failed(exc)
                raise
            except StateBehind as exc:
                await self.behind(exc)
                raise
            except RulesetChanged as exc:
                log.warning("%s: adopting the active ruleset", exc)
                if self.adopt_active is not None:
                    await self.adopt_active()
                raise
            self.outage.recovered()
            self.counters.applied(transitions)
            try:
                for transition in transitions:
                    self._apply(transition)
            except Exception:
                # Committed: retrying would record the facts (and fire the rules) twice.
                # The database is the truth; memory is rebuilt from it.
                log.critical(
                    "applying %d committed transition(s) in memory failed; reloading the "
                    "daemon's state from the database",
                    len(transitions),
                    exc_info=True,
                )
                await self._reload_state()
            return results

        return await asyncio.shield(commit_then_apply())

    async def behind(self, exc: StateBehind) -> None:
        """A deciding write was refused as planned on memory behind the database
        (``exc``): count it and catch up (the caller then plans again)."""
        log.debug("%s: taking the decision turn and catching up", exc)
        self.counters.metrics.commits_behind.inc()
        # the others' checked writes wait from here until this write is done (``lock``
        # ends the turn), so the plan made on memory caught up below is not refused again
        await self.lock.take_turn()
        await self.catch_up()

    def replan(self, exc: StateBehind | RulesetChanged, attempt: int) -> None:
        """After refusal number ``attempt`` (0 for the first) of a write planned on stale
        memory (``exc``; memory is up to date now): return to plan it again, or raise when
        that cannot help: ``RulesetChanged`` when the active ruleset could not be adopted
        (invalid against this daemon's config: its decisions are refused until fixed),
        ``StoreUnavailable`` (``locked``) after ``REPLANS`` refusals in a row."""
        engine = self.engine
        if isinstance(exc, RulesetChanged) and (
            engine is None or engine.ruleset.version == exc.planned_with
        ):
            raise exc
        if attempt + 1 >= REPLANS:
            raise StoreUnavailable(
                f"other daemons committed before this one {REPLANS} times in a row while it "
                "planned this write; nothing of it was applied: try again",
                "locked",
            ) from exc

    def apply(self, transition: Transition) -> None:
        """Apply a COMMITTED ``transition`` in memory (see ``commit_and_apply``)."""
        self.counters.applied([transition])
        self._apply(transition)

    def _apply(self, transition: Transition) -> None:
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        self.recent.add(transition.decisions)
        for signoff in transition.signoffs:
            at = signoff.at or transition.planned_at
            self.signed.setdefault(signoff.content_hash, {})[signoff.actor] = replace(
                signoff, at=at
            )
        engine = self.engine
        if engine is not None:
            self.schedule.reschedule(transition, engine, self.facts, self.approvals)
        if transition.actions:  # committed: the dispatcher may send them
            self.dispatcher.hand_over(transition.actions, transition.request_id)

    # -- fact batches -----------------------------------------------------------------

    async def ingest(
        self,
        batch: list[FactInput],
        request_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> IngestResult:
        """Apply a batch of facts atomically; answer once it is committed (fsynced).

        Batches arriving together are committed in one transaction (group commit), each
        still all-or-nothing. With ``idempotency``, a key seen before with the same request
        hash returns the first answer (``replayed``) and applies nothing; with another hash
        it raises ``IdempotencyConflict``. Raises ``ShuttingDown`` once ``close()`` was
        called.
        """
        if self._closing:
            raise ShuttingDown("gatekeeper is shutting down")
        job = _IngestJob(batch, request_id, idempotency, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        # the commit goes on even if the client goes away: shield the job from cancellation
        return await asyncio.shield(job.result)

    def close(self) -> None:
        """Refuse new fact batches and approvals (``ShuttingDown``); queued ones go on."""
        self._closing = True

    async def drain(self, grace_s: float) -> None:
        """Wait, for up to ``grace_s`` seconds, until every queued batch is answered, then
        for the write in progress, if any. Batches still queued after that are answered
        ``ShuttingDown`` (nothing of them was applied). Call after ``close()``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._queue.join()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._queue.task_done()
            if not job.result.done():
                job.result.set_exception(ShuttingDown("gatekeeper is shutting down"))
        async with self.lock:  # the group being committed, if any, is done
            pass

    async def run(self) -> None:
        """The writer task: takes every batch queued meanwhile and commits them together."""
        while True:
            jobs = [await self._queue.get()]
            try:
                # shielded: a shutdown never interrupts a group between plan and apply
                await asyncio.shield(self._commit_group(jobs))
            except Exception as exc:  # never let the writer die; fail these jobs instead
                if not isinstance(exc, StoreUnavailable):  # that one: the outage log says it
                    log.exception("committing %d fact batch(es) failed", len(jobs))
                for job in jobs:
                    if not job.result.done():
                        job.result.set_exception(exc)
            for _ in jobs:
                self._queue.task_done()

    async def _commit_group(self, jobs: list[_IngestJob]) -> None:
        """Commit ``jobs`` and every batch queued by the time it starts (added to ``jobs``)
        as one group."""
        # one turn of the loop first: requests already readable on other connections are
        # parsed and queued, and join this group instead of waiting for the next one
        await asyncio.sleep(0)
        while not self._queue.empty() and len(jobs) < MAX_GROUP_COMMIT:
            jobs.append(self._queue.get_nowait())
        async with self.lock:
            planned: list[tuple[_IngestJob, Transition]] = []
            try:
                planned, results = await self._plan_and_commit(jobs, planned)
            except Exception as exc:
                if len(planned) <= 1 or isinstance(exc, StoreUnavailable):
                    raise  # one by one would meet the same database
                log.warning(
                    "group commit of %d batches failed; committing one by one", len(planned)
                )
                planned_jobs = [job for job, _ in planned]
                for job in planned_jobs:
                    await self._commit_alone(job)
                return
            for (job, transition), seqs in zip(planned, results, strict=True):
                posted = seqs[: len(job.batch)]  # not the facts its rules set
                job.result.set_result(IngestResult(posted, job.request_id, replayed=False))
                log_firings(transition)

    async def _plan_and_commit(
        self, jobs: list[_IngestJob], planned: list[tuple[_IngestJob, Transition]]
    ) -> tuple[list[tuple[_IngestJob, Transition]], list[list[int]]]:
        """Plan ``jobs`` as a group (``_plan_group``) and commit it; planned again when the
        commit is refused as planned on stale memory (``replan``), with the jobs still to
        answer (the group's repeats of an ``Idempotency-Key`` a catch-up brought in are
        answered ``replayed`` then). Returns the jobs planned with their transitions, and
        each one's sequence numbers (none planned: nothing committed). ``planned`` holds
        the last group planned when an error leaves."""
        pending = jobs
        for attempt in itertools.count():
            planned[:] = await self._plan_group(pending)
            if not planned:
                return [], []
            try:
                return planned, await self.commit_and_apply([t for _, t in planned])
            except (StateBehind, RulesetChanged) as exc:  # memory is up to date now
                self.replan(exc, attempt)
                pending = [job for job, _ in planned]
        raise AssertionError("unreachable")  # pragma: no cover

    async def _commit_alone(self, job: _IngestJob) -> None:
        try:
            planned, results = await self._plan_and_commit([job], [])
            for (_, transition), seqs in zip(planned, results, strict=True):
                posted = seqs[: len(job.batch)]
                job.result.set_result(IngestResult(posted, job.request_id, replayed=False))
                log_firings(transition)
        except Exception as exc:
            log.exception("committing a fact batch failed; nothing of it was applied")
            job.result.set_exception(exc)

    async def _plan_group(self, jobs: list[_IngestJob]) -> list[tuple[_IngestJob, Transition]]:
        """Plan each job on top of the ones before it (nothing is applied yet); answer the
        idempotent repeats and conflicts right away."""
        engine = self.live_engine()
        now = self.clock.now()
        facts = self.facts.overlay()
        states: dict[InstanceKey, RuleState] = {}
        all_states = PlannedStates(states, self.states)
        book = self.book.copy()
        approvals = self.approvals  # copied only when a planned firing uses some up
        keys: dict[str, _IngestJob] = {}
        planned: list[tuple[_IngestJob, Transition]] = []
        for job in jobs:
            if job.idempotency is not None:
                earlier = keys.get(job.idempotency.key)
                if earlier is not None:  # the same key twice in one group: wait for the first
                    _answer_after(earlier, job)
                    continue
                if await self._answer_repeat(job):
                    continue
                keys[job.idempotency.key] = job
            t0 = time.perf_counter()
            transition = engine.plan_ingest(
                facts, all_states, job.batch, now, book, approvals=approvals
            )
            approvals = without_consumed(approvals, transition.consumed)
            self.counters.planned("fact", t0, len(transition.decisions))
            # a rule state the engine kept as it was (the very object already committed or
            # planned in this group) is not written again: the usual fact changes no gate,
            # and upserting 5 unchanged rows cost about a fifth of the writer's SQLite time
            transition.rule_states = {
                key: state
                for key, state in transition.rule_states.items()
                if all_states.get(key) is not state
            }
            transition.request_id = job.request_id
            transition.idempotency = job.idempotency
            for fact in transition.facts:  # the batch, then the facts its rules set
                facts.put(fact.key, fact.data)
            states.update(transition.rule_states)
            planned.append((job, transition))
        return planned

    async def _answer_repeat(self, job: _IngestJob) -> bool:
        """Answer ``job`` from its stored idempotency key, if it has been seen."""
        assert job.idempotency is not None
        stored = await self.store.find_idempotency_key(job.idempotency.key)
        if stored is None:
            return False
        if stored.request_hash != job.idempotency.request_hash:
            job.result.set_exception(IdempotencyConflict(job.idempotency.key))
        else:
            job.result.set_result(IngestResult(stored.seqs, stored.request_id, replayed=True))
        return True

    # -- approvals and admin acts -----------------------------------------------------

    async def approve(
        self,
        approval: ApprovalInput,
        request_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> IngestResult:
        """Record an approver's decision and re-evaluate its rule, in one transaction.

        ``approval.instance`` names one instance of a per-item rule (``""``: the rule as a
        whole). Raises ``UnknownRule`` when the rule is not in the active ruleset,
        ``UnknownInstance`` when it has no such instance (a rule without ``for_each`` has
        none but ``""``), ``NotAnApprover``
        (a ``ValueError``) when it takes no approvals or the approver is not in its ``from``
        list (the API answers 403 for that), ``IdempotencyConflict``, and ``ShuttingDown``
        once ``close()`` was called.
        """
        if self._closing:
            raise ShuttingDown("gatekeeper is shutting down")
        return await asyncio.shield(self._approve(approval, request_id, idempotency))

    async def _approve(
        self,
        approval: ApprovalInput,
        request_id: str | None,
        idempotency: IdempotencyRecord | None,
    ) -> IngestResult:
        async with self.lock:
            for attempt in itertools.count():
                if idempotency is not None:
                    stored = await self.store.find_idempotency_key(idempotency.key)
                    if stored is not None and stored.request_hash != idempotency.request_hash:
                        raise IdempotencyConflict(idempotency.key)
                    if stored is not None:
                        return IngestResult(stored.seqs, stored.request_id, replayed=True)
                transition = self._plan_approval(approval)
                transition.request_id = request_id
                transition.idempotency = idempotency
                try:
                    (seqs,) = await self.commit_and_apply([transition])
                    break
                except (StateBehind, RulesetChanged) as exc:  # memory is up to date now
                    self.replan(exc, attempt)
            seqs = seqs[len(transition.facts) :]  # the approval's (after facts rules set)
        log.info(
            "approval: %s %ss rule %s%s (request %s)",
            approval.subject,
            approval.decision,
            approval.rule_id,
            f" item {approval.instance}" if approval.instance else "",
            request_id or "-",
            extra={
                "rule_id": approval.rule_id,
                "item": approval.instance or None,
                "approver": approval.subject,
                "decision": approval.decision,
                "request_id": request_id,
            },
        )
        log_firings(transition)
        return IngestResult(seqs, request_id, replayed=False)

    def _plan_approval(self, approval: ApprovalInput) -> Transition:
        """Plan ``approval`` with memory as it is (see ``approve`` for what it raises)."""
        engine = self.live_engine()
        rule = engine.rules.get(approval.rule_id)
        if rule is None:
            raise UnknownRule(approval.rule_id)
        if rule.approvals is None:
            raise NotAnApprover(f"rule {rule.id} takes no approvals")
        if approval.subject not in rule.approvals.from_:
            raise NotAnApprover(
                f"{approval.subject!r} is not one of the approvers of rule {rule.id}"
            )
        if approval.instance and (
            rule.for_each is None
            or self.facts.get((rule.project, rule.for_each, approval.instance)) is None
        ):
            raise UnknownInstance(f"rule {rule.id} has no instance {approval.instance!r}")
        approval = replace(approval, project=rule.project)
        t0 = time.perf_counter()
        transition = engine.plan_approval(
            self.facts,
            self.states,
            self.approvals,
            approval,
            self.clock.now(),
            self.book.copy(),
        )
        self.counters.planned("approval", t0, len(transition.decisions))
        return transition

    async def checked(self, write: Callable[[StateFence | None], Awaitable[T]]) -> T:
        """Run a deciding write that commits through the store itself (a ruleset's
        activation, a cancel, a settlement): ``write(fence)`` plans with memory as it is and
        commits checked against ``fence`` (None: unchecked, SQLite); refused as behind,
        memory catches up and ``write`` runs again (``replan``). Call with ``lock`` held;
        raises what ``write`` raises but ``StateBehind``."""
        for attempt in itertools.count():
            try:
                return await write(self.fence)
            except StateBehind as exc:
                await self.behind(exc)
                self.replan(exc, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def decide(self, plan: Callable[[], Transition]) -> tuple[Transition, list[int]]:
        """Commit what ``plan()`` plans with memory as it is, and apply it; planned again
        when the commit is refused as planned on stale memory (``replan``: memory caught
        up, or the active ruleset adopted). Returns the transition committed and its
        sequence numbers. Call with ``lock`` held; raises what ``plan`` and
        ``commit_and_apply`` raise."""
        for attempt in itertools.count():
            transition = plan()
            try:
                (seqs,) = await self.commit_and_apply([transition])
                return transition, seqs
            except (StateBehind, RulesetChanged) as exc:  # memory is up to date now
                self.replan(exc, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def sign_off(self, signoff: SignOff) -> tuple[Rule, SignOff]:
        """Record an admin's sign-off of the money rule with content hash
        ``signoff.content_hash`` (an audited admin act ``signoff``). Nothing is evaluated:
        the rule runs live from its next evaluation once it has ``money_rule_approvals``
        sign-offs. Returns the rule and the sign-off as recorded (rule id, project, time).

        Raises ``UnknownContentHash`` (no rule of the active ruleset has that hash),
        ``SignOffRefused`` (not a money rule, or a rule in ``mode: shadow``) and
        ``AlreadySignedOff`` (this admin signed that hash before); nothing is recorded
        then."""
        async with self.lock:
            found: list[Rule] = []

            def plan() -> Transition:
                engine = self.live_engine()
                rule = next(
                    (r for r in engine.ruleset.rules if r.content_hash == signoff.content_hash),
                    None,
                )
                if rule is None:
                    raise UnknownContentHash(
                        f"no rule of the active ruleset (version {engine.ruleset.version[:12]}) "
                        f"has content hash {signoff.content_hash!r}"
                    )
                if not is_money_rule(rule):
                    raise SignOffRefused(
                        f"rule {rule.id} (content hash {rule.content_hash}) has no release "
                        "action: only money rules are signed off"
                    )
                if rule.mode == "shadow":
                    raise SignOffRefused(
                        f"rule {rule.id} is in mode: shadow; going live changes its content "
                        "hash, so sign off the live version once it is loaded"
                    )
                if signoff.actor in self.signed.get(rule.content_hash, {}):
                    raise AlreadySignedOff(
                        f"{signoff.actor} already signed off rule {rule.id} at content hash "
                        f"{rule.content_hash}: a second sign-off must come from another admin"
                    )
                found[:] = [rule]
                signed = replace(signoff, rule_id=rule.id, project=rule.project)
                return Transition(signoffs=[signed], planned_at=self.clock.now())

            transition, _ = await self.decide(plan)
            [rule] = found
            [signoff] = transition.signoffs
            engine = self.live_engine()
            recorded = self.signed[rule.content_hash][signoff.actor]
        log.warning(
            "admin: %s signed off money rule %s at content hash %s (%d of %d)%s",
            signoff.actor,
            rule.id,
            rule.content_hash[:12],
            len(self.signed[rule.content_hash]),
            engine.signoffs.required,
            f": {signoff.comment}" if signoff.comment else "",
            extra={
                "actor": signoff.actor,
                "act": "signoff",
                "rule_id": rule.id,
                "content_hash": rule.content_hash,
                "reason": signoff.comment,
            },
        )
        return rule, recorded

    async def administer(self, act: AdminAct) -> tuple[Rule, AdminAct]:
        """Carry out an admin act on a rule (pause, resume, rearm), audited with who and why,
        and re-evaluate the rule under its new state. Returns the rule and the act as
        recorded (``instances``: how many instances of a per-item rule it changed).

        ``act.instance`` names one instance of a per-item rule (None: the rule as a whole,
        see ``Engine.plan_admin``).
        Raises ``UnknownRule``, ``UnknownInstance`` (no such item), or ``ValueError`` when
        the act does not apply."""
        async with self.lock:
            found: list[Rule] = []

            def plan() -> Transition:
                engine = self.live_engine()
                rule = engine.rules.get(act.rule_id)
                if rule is None:
                    raise UnknownRule(act.rule_id)
                found[:] = [rule]
                t0 = time.perf_counter()
                try:
                    transition = engine.plan_admin(
                        self.facts,
                        self.states,
                        self.approvals,
                        act,
                        self.clock.now(),
                        self.book.copy(),
                    )
                except KeyError as exc:
                    raise UnknownInstance(str(exc.args[0])) from None
                self.counters.planned("admin", t0, len(transition.decisions))
                return transition

            transition, _ = await self.decide(plan)
            [rule] = found
        [act] = transition.admin_acts
        log.warning(
            "admin: %s %s rule %s%s: %s",
            act.actor,
            act.act,
            act.rule_id,
            "" if act.instances is None else f" ({act.instances} instance(s))",
            act.reason,
            extra={
                "actor": act.actor,
                "act": act.act,
                "rule_id": act.rule_id,
                "reason": act.reason,
                **({} if act.instances is None else {"instances": act.instances}),
            },
        )
        log_firings(transition)
        return rule, act

    def plan_return(self, escrow: str, amount: str, now: datetime) -> Transition | None:
        """What giving ``amount`` (a decimal string) back to ``escrow`` at ``now`` decides
        (a cancel, a failed settlement, about to be committed): the releases blocked on
        ``escrow`` tried again at once (``Engine.plan_return``, trigger ``return``), for
        the caller to commit in the same transaction as the return; None when nothing is
        decided. Call with ``lock`` held, then ``returned`` once committed."""
        engine = self.engine
        if engine is None:
            return None
        t0 = time.perf_counter()
        book = self.book.copy()
        book.give_back(escrow, amount)
        transition = engine.plan_return(self.facts, self.states, escrow, now, book, self.approvals)
        self.counters.planned("return", t0, len(transition.decisions))
        return transition if transition.decisions else None

    def returned(self, escrow: str, amount: str, transition: Transition | None) -> None:
        """A COMMITTED return of ``amount`` to ``escrow`` and what it decided
        (``plan_return``): the book gives it back, then the transition is applied."""
        self.book.give_back(escrow, amount)
        if transition is not None:
            self.apply(transition)
            log_firings(transition)

    def reclaimed(self, escrow: str, amount: str) -> None:
        """A COMMITTED ``reclaim`` of ``amount`` from ``escrow`` (a cancelled release the
        bank settled anyway): it counts against the escrow again, even past its limit
        (the money moved). Call with ``lock`` held."""
        self.book.commit(escrow, amount)


def _answer_after(first: _IngestJob, job: _IngestJob) -> None:
    """Answer ``job``, which repeats the ``Idempotency-Key`` of ``first`` in the same group,
    with ``first``'s answer once it has one (or a conflict at once)."""
    assert job.idempotency is not None and first.idempotency is not None
    if first.idempotency.request_hash != job.idempotency.request_hash:
        job.result.set_exception(IdempotencyConflict(job.idempotency.key))
        return

    def copy(done: asyncio.Future[IngestResult]) -> None:
        if done.exception() is not None:
            job.result.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            result = done.result()
            job.result.set_result(IngestResult(result.seqs, result.request_id, True))

    first.result.add_done_callback(copy)


def log_firings(transition: Transition) -> None:
    """Log each decision of ``transition`` that fired (info) or was blocked (error)."""
    request_id = transition.request_id
    for decision in transition.fired:
        extra = {
            "rule_id": decision.rule_id,
            "instance": decision.instance,
            "firing_id": decision.firing_id,
            "outcome": decision.outcome,
            "trigger": decision.trigger,
            "ruleset_version": decision.ruleset_version,
            "request_id": request_id,
        }
        if decision.outcome == "shadowed":
            log.info(
                "rule fired in shadow (%s): %s (%s, trigger %s, request %s): nothing sent",
                decision.mode,
                decision.rule_id,
                decision.firing_id,
                decision.trigger,
                request_id or "-",
                extra={**extra, "mode": decision.mode},
            )
        elif decision.outcome == "blocked":
            log.error(
                "rule %s blocked (%s, request %s): %s",
                decision.rule_id,
                decision.firing_id,
                request_id or "-",
                decision.reason,
                extra={**extra, "reason": decision.reason},
            )
        else:
            log.info(
                "rule fired: %s (%s, trigger %s, request %s)",
                decision.rule_id,
                decision.firing_id,
                decision.trigger,
                request_id or "-",
                extra=extra,
            )


class PlannedStates(Mapping[InstanceKey, RuleState]):
    """Rule states as a group of transitions sees them while it is planned: the states
    ``planned`` so far in the group over the ``committed`` ones (a read-only view of two
    dicts; ``get``, which the engine calls for each rule it evaluates, is two dict lookups,
    where ``collections.ChainMap.get`` costs several times that)."""

    __slots__ = ("committed", "planned")

    def __init__(
        self, planned: dict[InstanceKey, RuleState], committed: dict[InstanceKey, RuleState]
    ) -> None:
        self.planned = planned
        self.committed = committed

    def get(self, key: InstanceKey, default: Any = None) -> Any:
        state = self.planned.get(key)
        return self.committed.get(key, default) if state is None else state

    def __getitem__(self, key: InstanceKey) -> RuleState:
        state = self.planned.get(key)
        return self.committed[key] if state is None else state

    def __contains__(self, key: object) -> bool:
        return key in self.planned or key in self.committed

    def __iter__(self) -> Iterator[InstanceKey]:
        yield from self.planned
        yield from (key for key in self.committed if key not in self.planned)

    def __len__(self) -> int:
        return len(self.planned) + sum(1 for key in self.committed if key not in self.planned)
