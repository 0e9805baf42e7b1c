"""The running gatekeeper: the live ruleset, ingest, hot reload, clock ticks, delivery.

``Daemon`` owns the in-memory mirror of the current facts and rule states and the one
write path into the store. Every change (a fact batch, a ruleset going live, the clock
making a time-dependent rule true) is planned by the pure ``Engine``, committed by the store
in one transaction, and only then applied in memory; a failed commit changes nothing.

Reloads are all-or-nothing: the whole rules directory (and ``gatekeeper.yaml``) is
validated; if anything is wrong the last good ruleset stays active and the problems are
logged and shown by ``GET /v1/rules``. Every ruleset that goes live is stored,
content-addressed, so a daemon restarted on a broken rules directory keeps running the last
good ruleset from its database (and says so loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import watchfiles
from prometheus_client.metrics import MetricWrapperBase

from gatekeeper.clock import Clock, SystemClock, format_rfc3339
from gatekeeper.config import (
    Config,
    ConfigError,
    load_config,
    resolve_hook_secrets,
    resolve_secrets,
)
from gatekeeper.delivery.dispatcher import Dispatcher
from gatekeeper.engine.deadlines import DeadlineSchedule, mark_due, schedule_rules
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    FactInput,
    IdempotencyRecord,
    RuleState,
    Transition,
)
from gatekeeper.metrics import Metrics
from gatekeeper.problems import Problem
from gatekeeper.rules.loader import LoadResult, RuleFileCache, load_rule_texts, load_rules_dir
from gatekeeper.rules.model import Rule, Ruleset
from gatekeeper.runtime.hooks import hook_problems
from gatekeeper.store import Store, store_for
from gatekeeper.store.records import OutboxEntry

log = logging.getLogger("gatekeeper.runtime.daemon")


MAX_GROUP_COMMIT = 256
"""At most this many fact batches share one transaction."""
HOUSEKEEPING_INTERVAL_S = 60.0
FREEZE_AT_RULES = 1000
"""From this many rules, objects alive when a ruleset goes live are frozen (see
``Daemon._freeze_long_lived``)."""


class StartupError(Exception):
    """The daemon cannot start; the message says why (never a secret's value)."""


class UnknownRule(LookupError):
    """No rule with that id in the active ruleset."""


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


@dataclass
class ReloadStatus:
    """The outcome of the last reload attempt, for ``GET /v1/rules`` and the log."""

    ok: bool = True
    problems: list[Problem] = field(default_factory=list)
    attempted_at: str | None = None
    active_since: str | None = None
    source: str = "rules directory"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "attempted_at": self.attempted_at,
            "active_since": self.active_since,
            "source": self.source,
        }


class Daemon:
    """gatekeeper's runtime. ``start()`` it, use ``ingest``, ``stop()`` it.

    ``environ`` supplies target secrets (``secret_env``); ``clock`` is injectable for tests.
    ``tick_s`` is the longest the deadline loop sleeps before looking at the clock again.
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        *,
        clock: Clock | None = None,
        tick_s: float = 60.0,
        watch: bool = True,
    ) -> None:
        self.config = config
        self.environ = dict(environ)
        self.clock: Clock = clock or SystemClock()
        self.tick_s = tick_s
        self.watch = watch
        self.store: Store = store_for(config.database)
        self.facts = FactTable()
        self.states: dict[str, RuleState] = {}
        self.approvals: dict[str, dict[str, str]] = {}
        self.engine: Engine | None = None
        self.book = EscrowBook(config.escrows)
        self.reload_status = ReloadStatus()
        self.secrets: dict[str, str] = {}
        self.hook_secrets: dict[str, str] = {}
        self.metrics = Metrics()
        self._metric_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.dispatcher = Dispatcher(
            self.store,
            lambda: self.config.targets,
            lambda: self.secrets,
            self.clock,
            metrics=self.metrics,
        )
        self._write_lock = asyncio.Lock()
        self._ingest_queue: asyncio.Queue[_IngestJob] = asyncio.Queue()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watching = asyncio.Event()
        self.deadlines = DeadlineSchedule()
        self._deadline_changed = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load state and the ruleset, start delivery, watching and ticks.

        Raises ``StartupError`` when a secret is missing or no usable ruleset exists.
        """
        try:
            self.secrets = resolve_secrets(self.config, self.environ)
            self.hook_secrets = resolve_hook_secrets(self.config, self.environ)
            check_hooks(self.config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        await self.store.open()
        await self._load_state()
        await self._load_initial_ruleset()
        self._tasks.append(asyncio.create_task(self._write_forever(), name="writer"))
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))
        self._tasks.append(asyncio.create_task(self._tick_forever(), name="clock-ticks"))
        self._tasks.append(asyncio.create_task(self._housekeep_forever(), name="housekeeping"))
        if self.watch:
            self._tasks.append(asyncio.create_task(self._watch_forever(), name="watcher"))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop in stages: take no new facts, commit the ones already queued, stop watching
        and ticking, let deliveries in progress finish for up to ``grace_s`` seconds
        (default: the config's ``shutdown_grace_s``), then close the store. Actions not yet
        delivered stay in the outbox and resume at the next start."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._closing = True
        self._stop_watching.set()
        await self._drain_ingest_queue(grace_s)
        await self.dispatcher.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        async with self._write_lock:
            await self.store.close()

    async def _drain_ingest_queue(self, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while not self._ingest_queue.empty() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        async with self._write_lock:  # the group being committed, if any, is done
            pass

    async def _load_initial_ruleset(self) -> None:
        # checked rule files by content hash: a reload parses and checks only what changed
        self.rule_cache = RuleFileCache()
        result = load_rules_dir(self.config.rules_dir, self.config, self.rule_cache)
        if result.ruleset is not None:
            await self._activate(result.ruleset, trigger_source="rules directory")
            return
        self._report_refused(result)
        stored = await self.store.last_ruleset()
        if stored is None:
            raise StartupError(
                f"the rules in {self.config.rules_dir} are invalid and the database holds no "
                "earlier ruleset to fall back on:\n" + "\n".join(str(p) for p in result.problems)
            )
        fallback = load_rule_texts(stored.files, self.config, stored.git_commit)
        if fallback.ruleset is None:
            raise StartupError(
                f"the rules in {self.config.rules_dir} are invalid, and so is the last good "
                f"ruleset {stored.version[:12]} against the current config:\n"
                + "\n".join(str(p) for p in fallback.problems)
            )
        log.error(
            "RUNNING THE LAST GOOD RULESET %s (activated %s) FROM THE DATABASE: the rules "
            "directory %s is invalid; fix it and gatekeeper reloads it",
            stored.version[:12],
            format_rfc3339(stored.last_activated_at),
            self.config.rules_dir,
        )
        await self._activate(fallback.ruleset, trigger_source="database (last good ruleset)")
        self.reload_status.ok = False
        self.reload_status.problems = list(result.problems)

    # -- ingest -------------------------------------------------------------------------

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
        it raises ``IdempotencyConflict``. Raises ``ShuttingDown`` once ``stop()`` began.
        """
        if self._closing:
            raise ShuttingDown("gatekeeper is shutting down")
        job = _IngestJob(batch, request_id, idempotency, asyncio.get_running_loop().create_future())
        self._ingest_queue.put_nowait(job)
        # the commit goes on even if the client goes away: shield the job from cancellation
        return await asyncio.shield(job.result)

    async def _write_forever(self) -> None:
        """The single writer: takes every batch queued meanwhile and commits them together."""
        while True:
            jobs = [await self._ingest_queue.get()]
            try:
                # shielded: a shutdown never interrupts a group between plan and apply
                await asyncio.shield(self._commit_group(jobs))
            except Exception as exc:  # never let the writer die; fail these jobs instead
                log.exception("committing %d fact batch(es) failed", len(jobs))
                for job in jobs:
                    if not job.result.done():
                        job.result.set_exception(exc)

    async def _commit_group(self, jobs: list[_IngestJob]) -> None:
        """Commit ``jobs`` and every batch queued by the time it starts (added to ``jobs``)
        as one group."""
        # one turn of the loop first: requests already readable on other connections are
        # parsed and queued, and join this group instead of waiting for the next one
        await asyncio.sleep(0)
        while not self._ingest_queue.empty() and len(jobs) < MAX_GROUP_COMMIT:
            jobs.append(self._ingest_queue.get_nowait())
        async with self._write_lock:
            planned = await self._plan_group(jobs)
            if not planned:
                return
            try:
                results = await self._commit_and_apply([t for _, t in planned])
            except Exception:
                if len(planned) == 1:
                    raise
                log.warning(
                    "group commit of %d batches failed; committing one by one", len(planned)
                )
                planned_jobs = [job for job, _ in planned]
                for job in planned_jobs:
                    await self._commit_alone(job)
                return
            for (job, transition), seqs in zip(planned, results, strict=True):
                job.result.set_result(IngestResult(seqs, job.request_id, replayed=False))
                self._log_firings(transition)

    async def _commit_alone(self, job: _IngestJob) -> None:
        try:
            planned = await self._plan_group([job])
            if planned:
                _, transition = planned[0]
                (seqs,) = await self._commit_and_apply([transition])
                job.result.set_result(IngestResult(seqs, job.request_id, replayed=False))
                self._log_firings(transition)
        except Exception as exc:
            log.exception("committing a fact batch failed; nothing of it was applied")
            job.result.set_exception(exc)

    async def _plan_group(self, jobs: list[_IngestJob]) -> list[tuple[_IngestJob, Transition]]:
        """Plan each job on top of the ones before it (nothing is applied yet); answer the
        idempotent repeats and conflicts right away."""
        engine = self._engine()
        now = self.clock.now()
        facts = self.facts.overlay()
        states: dict[str, RuleState] = {}
        all_states = PlannedStates(states, self.states)
        book = self.book.copy()
        keys: dict[str, _IngestJob] = {}
        planned: list[tuple[_IngestJob, Transition]] = []
        for job in jobs:
            if job.idempotency is not None:
                earlier = keys.get(job.idempotency.key)
                if earlier is not None:  # the same key twice in one group: wait for the first
                    self._answer_after(earlier, job)
                    continue
                if await self._answer_repeat(job):
                    continue
                keys[job.idempotency.key] = job
            t0 = time.perf_counter()
            transition = engine.plan_ingest(
                facts, all_states, job.batch, now, book, approvals=self.approvals
            )
            self._planned("fact", t0, len(transition.decisions))
            transition.request_id = job.request_id
            transition.idempotency = job.idempotency
            for fact in job.batch:
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

    def _answer_after(self, first: _IngestJob, job: _IngestJob) -> None:
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

    async def _commit_and_apply(self, transitions: list[Transition]) -> list[list[int]]:
        """Commit ``transitions`` in one transaction, then apply them in memory.

        Shielded: a caller cancelled meanwhile (at shutdown) does not leave a committed
        transition unapplied, so memory never disagrees with the database."""

        async def commit_then_apply() -> list[list[int]]:
            results = await self.store.commit_transitions(transitions)
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

    async def _load_state(self) -> None:
        """Current facts, rule states, approvals and escrow totals, from the database."""
        self.facts = FactTable(await self.store.load_facts())
        self.states = await self.store.load_rule_states()
        self.approvals = await self.store.load_approvals()
        committed = await self.store.escrow_totals()
        self.book = EscrowBook(
            self.config.escrows,
            {
                escrow: sum(by_status.values(), Decimal(0))
                for escrow, by_status in committed.items()
            },
        )

    async def _reload_state(self) -> None:
        """Rebuild memory from the database after a failure to apply what it committed: the
        state, every time-dependent rule due at once (as at start), and the dispatcher told
        to look at the outbox (committed actions it was not handed)."""
        await self._load_state()
        now = self.clock.now()
        mark_due(self.deadlines, self._engine().time_dependent, now)
        self._deadline_changed.set()
        self.dispatcher.wake()

    def _log_firings(self, transition: Transition) -> None:
        request_id = transition.request_id
        for decision in transition.fired:
            extra = {
                "rule_id": decision.rule_id,
                "firing_id": decision.firing_id,
                "outcome": decision.outcome,
                "trigger": decision.trigger,
                "ruleset_version": decision.ruleset_version,
                "request_id": request_id,
            }
            if decision.outcome == "blocked":
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

    def _planned(self, trigger: str, started: float, evaluated: int) -> None:
        """Record a planning pass begun at ``started`` (``time.perf_counter()``) that
        evaluated ``evaluated`` rules."""
        metrics = self.metrics
        self._labelled(metrics.evaluation_seconds, trigger).observe(time.perf_counter() - started)
        if evaluated:
            self._labelled(metrics.evaluations, trigger).inc(evaluated)

    def _labelled(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label values (``labels`` costs
        more than the ``inc``/``observe`` done on it once per request)."""
        key = (metric, values)
        child = self._metric_children.get(key)
        if child is None:
            child = self._metric_children[key] = metric.labels(*values)
        return child

    def _apply(self, transition: Transition) -> None:
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        self._reschedule(transition)
        self._count(transition)
        if transition.actions:  # committed: the dispatcher may send them
            self.dispatcher.hand_over(transition.actions, transition.request_id)

    def _count(self, transition: Transition) -> None:
        """Update the metrics of a committed transition (in memory, no database access)."""
        metrics = self.metrics
        if transition.facts:
            metrics.facts_accepted.inc(len(transition.facts))
        outcomes: dict[str, int] = {}
        for decision in transition.decisions:
            outcomes[decision.outcome] = outcomes.get(decision.outcome, 0) + 1
        for outcome, count in outcomes.items():
            self._labelled(metrics.decisions, outcome).inc(count)
        for action in transition.actions:
            self._labelled(metrics.actions, action.target, "queued").inc()

    async def approve(
        self,
        approval: ApprovalInput,
        request_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> IngestResult:
        """Record an approver's decision and re-evaluate its rule, in one transaction.

        Raises ``UnknownRule`` when the rule is not in the active ruleset, ``ValueError``
        when it takes no approvals or the approver is not in its ``from`` list (the API
        answers 403 for that), ``ShuttingDown`` once ``stop()`` began.
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
        async with self._write_lock:
            if idempotency is not None:
                stored = await self.store.find_idempotency_key(idempotency.key)
                if stored is not None and stored.request_hash != idempotency.request_hash:
                    raise IdempotencyConflict(idempotency.key)
                if stored is not None:
                    return IngestResult(stored.seqs, stored.request_id, replayed=True)
            engine = self._engine()
            rule = engine.rules.get(approval.rule_id)
            if rule is None:
                raise UnknownRule(approval.rule_id)
            if rule.approvals is None:
                raise NotAnApprover(f"rule {rule.id} takes no approvals")
            if approval.subject not in rule.approvals.from_:
                raise NotAnApprover(
                    f"{approval.subject!r} is not one of the approvers of rule {rule.id}"
                )
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
            self._planned("approval", t0, len(transition.decisions))
            transition.request_id = request_id
            transition.idempotency = idempotency
            (seqs,) = await self._commit_and_apply([transition])
        log.info(
            "approval: %s %ss rule %s (request %s)",
            approval.subject,
            approval.decision,
            approval.rule_id,
            request_id or "-",
            extra={
                "rule_id": approval.rule_id,
                "approver": approval.subject,
                "decision": approval.decision,
                "request_id": request_id,
            },
        )
        self._log_firings(transition)
        return IngestResult(seqs, request_id, replayed=False)

    async def administer(self, act: AdminAct) -> dict[str, Any]:
        """Carry out an admin act on a rule (pause, resume, rearm), audited with who and why,
        and re-evaluate the rule under its new state. Returns the rule's view.

        Raises ``UnknownRule``, or ``ValueError`` when the act does not apply."""
        async with self._write_lock:
            engine = self._engine()
            rule = engine.rules.get(act.rule_id)
            if rule is None:
                raise UnknownRule(act.rule_id)
            t0 = time.perf_counter()
            transition = engine.plan_admin(
                self.facts, self.states, self.approvals, act, self.clock.now(), self.book.copy()
            )
            self._planned("admin", t0, len(transition.decisions))
            await self._commit_and_apply([transition])
        log.warning(
            "admin: %s %s rule %s: %s",
            act.actor,
            act.act,
            act.rule_id,
            act.reason,
            extra={
                "actor": act.actor,
                "act": act.act,
                "rule_id": act.rule_id,
                "reason": act.reason,
            },
        )
        self._log_firings(transition)
        return self.rule_view(rule, explain=True)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the daemon has not started")
        return self.engine

    # -- rulesets -------------------------------------------------------------------------

    async def _activate(
        self,
        ruleset: Ruleset,
        trigger_source: str,
        config: Config | None = None,
        secrets: dict[str, str] | None = None,
    ) -> None:
        """Make ``ruleset`` (with ``config`` and its ``secrets``, when given) live: store it
        and evaluate, at once, the rules that are new, changed, or were not in the previous
        ruleset (a rule removed and put back may have missed facts meanwhile).

        All or nothing: if the commit fails, the previous ruleset, config and secrets stay.
        """
        config = config or self.config
        async with self._write_lock:
            engine = Engine(ruleset, alert_target=config.alert_target)
            book = EscrowBook(config.escrows, self.book.committed)
            previous_rules = self.engine.rules if self.engine else {}
            states = self.states
            changed = [
                rule
                for rule in ruleset.rules
                if rule.id not in previous_rules
                or (state := states.get(rule.id)) is None
                or state.rule_hash != rule.content_hash
            ]
            t0 = time.perf_counter()
            transition = engine.plan_rules(
                self.facts,
                self.states,
                changed,
                self.clock.now(),
                "reload",
                book=book.copy(),
                approvals=self.approvals,
            )
            self._planned("reload", t0, len(changed))
            transition.ruleset = ruleset
            await self.store.commit_transition(transition)
            self.config = config
            self.secrets = secrets if secrets is not None else self.secrets
            self.book = book
            self._apply(transition)
            previous = self.engine
            self.engine = engine
            self._schedule_activated(engine, previous, changed)
        self._freeze_long_lived(ruleset)
        now = format_rfc3339(self.clock.now())
        self.reload_status = ReloadStatus(
            ok=True, attempted_at=now, active_since=now, source=trigger_source
        )
        self.metrics.ruleset_loaded(ruleset.version, self.clock.now().timestamp())
        log.info(
            "ruleset %s loaded from %s: %d rules (%d new or changed)%s",
            ruleset.version[:12],
            trigger_source,
            len(ruleset.rules),
            len(changed),
            "" if previous is None else f", replacing {previous.ruleset.version[:12]}",
            extra={
                "ruleset_version": ruleset.version,
                "git_commit": ruleset.git_commit,
                "source": trigger_source,
                "rules": len(ruleset.rules),
                "changed": len(changed),
            },
        )
        self._log_firings(transition)

    def _schedule_activated(
        self, engine: Engine, previous: Engine | None, changed: list[Rule]
    ) -> None:
        """Deadlines for a ruleset going live. At start every time-dependent rule is due at
        once: deadlines that passed while the daemon was down fire now. At a reload, so are
        the new and changed ones (they may have missed facts or deadlines while out); a rule
        that did not change keeps its deadline, since its condition and facts are the same;
        a rule no longer time-dependent (or gone) is dropped."""
        now = self.clock.now()
        if previous is None:
            self.deadlines.clear()
            mark_due(self.deadlines, engine.time_dependent, now)
        else:
            for rule in previous.time_dependent:
                if rule.id not in engine.time_dependent_ids:
                    self.deadlines.set(rule.id, None)
            changed_ids = {rule.id for rule in changed}
            mark_due(self.deadlines, (r for r in engine.time_dependent if r.id in changed_ids), now)
        self._deadline_changed.set()

    @staticmethod
    def _freeze_long_lived(ruleset: Ruleset) -> None:
        """With a large ruleset live, move every object then alive out of the cyclic
        collector's reach (``gc.freeze``): the rules, engine, facts and states are long-lived,
        and a full collection would walk them all again (about 800,000 objects and 1 to 2 s
        with 10,000 rules, a pause that hits a reload or a request). The collection run
        first walks only the objects made since the previous freeze (all of them at start),
        so cyclic garbage left by evaluations is not frozen with them; what a reload replaces
        is freed by reference counting (a reload leaves no cyclic garbage). Small rulesets
        are left alone."""
        if len(ruleset.rules) >= FREEZE_AT_RULES:
            started = time.perf_counter()
            gc.collect()  # walks only what is not frozen yet: what was made since the last time
            gc.freeze()
            log.debug("collected and froze in %.3f s", time.perf_counter() - started)

    async def reload(self) -> bool:
        """Re-read ``gatekeeper.yaml`` (when there is one) and the rules directory.

        All-or-nothing: returns False, keeping the active ruleset and config, when anything
        is invalid; the problems are in ``reload_status``.
        """
        config = self.config
        if config.path is not None:
            try:
                config = load_config(config.path)
                secrets = resolve_secrets(config, self.environ)
                hook_secrets = resolve_hook_secrets(config, self.environ)
                check_hooks(config)
            except ConfigError as exc:
                self._report_refused_problems(exc.problems)
                return False
            if (config.database, config.listen_host, config.listen_port) != (
                self.config.database,
                self.config.listen_host,
                self.config.listen_port,
            ):
                log.warning("listen and database changes in the config take effect on restart")
                config = _keep_listen_and_database(config, self.config)
        else:
            secrets, hook_secrets = self.secrets, self.hook_secrets
        result = load_rules_dir(config.rules_dir, config, self.rule_cache)
        if result.ruleset is None:
            self._report_refused(result)
            return False
        unchanged = (
            self.engine is not None and self.engine.ruleset.version == result.ruleset.version
        )
        self.hook_secrets = hook_secrets  # hooks do not depend on the ruleset
        if unchanged and config == self.config and secrets == self.secrets:
            now = format_rfc3339(self.clock.now())
            self.reload_status = ReloadStatus(
                ok=True,
                attempted_at=now,
                active_since=self.reload_status.active_since,
                source="rules directory",
            )
            self.metrics.ruleset_loaded(result.ruleset.version, self.clock.now().timestamp())
            log.info(
                "ruleset %s unchanged",
                result.ruleset.version[:12],
                extra={"ruleset_version": result.ruleset.version},
            )
            return True
        try:
            await self._activate(result.ruleset, "rules directory", config, secrets)
        except Exception as exc:
            log.exception("activating the new ruleset failed")
            message = f"activating the ruleset failed ({type(exc).__name__}); nothing changed"
            self._report_refused_problems([Problem(str(config.rules_dir), 0, 0, message)])
            return False
        return True

    def _report_refused(self, result: LoadResult) -> None:
        self._report_refused_problems(list(result.problems))

    def _report_refused_problems(self, problems: list[Problem]) -> None:
        now = format_rfc3339(self.clock.now())
        self.reload_status.ok = False
        self.reload_status.problems = problems
        self.reload_status.attempted_at = now
        self.metrics.ruleset_refused()
        log.error(
            "ruleset refused, %d problem(s); the last good ruleset stays active",
            len(problems),
            extra={"problems": [str(p) for p in problems]},
        )
        for problem in problems:
            log.error("  %s", problem)

    async def _watch_forever(self) -> None:
        paths = [self.config.rules_dir]
        if self.config.path is not None:
            paths.append(self.config.path)
        async for _changes in watchfiles.awatch(
            *paths, stop_event=self._stop_watching, debounce=200, step=20, recursive=True
        ):
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the last good ruleset stays active")

    # -- time ---------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        """Sleep until the next deadline (or a wake-up: a new fact moved one earlier), then
        evaluate the rules that are due. Never longer than ``tick_s``, since deadlines are
        wall-clock times and the clock may jump."""
        while True:
            self._deadline_changed.clear()
            wait = self.deadlines.seconds_until_next(self.clock.now(), cap=self.tick_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._deadline_changed.wait(), self.tick_s if wait is None else wait
                )
            try:
                await self.tick()
            except Exception:
                log.exception("evaluating due time-dependent rules failed; retrying shortly")
                await asyncio.sleep(min(self.tick_s, 1.0))

    async def tick(self) -> Transition:
        """Evaluate the time-dependent rules whose deadline has come (see ``deadlines``):
        each rule is scheduled at the instant its condition can next change with the facts
        as they are, so an idle daemon does no work and a deadline fires on time.

        Shielded like every write: cancelling the caller never interrupts it halfway."""
        return await asyncio.shield(self._tick())

    async def _tick(self) -> Transition:
        async with self._write_lock:
            engine = self._engine()
            now = self.clock.now()
            earliest = self.deadlines.next_due()
            due = [engine.rules[i] for i in self.deadlines.pop_due(now) if i in engine.rules]
            if due and earliest is not None:
                lag_s = max(0.0, (now - earliest).total_seconds())
                self.metrics.deadline_lag_seconds.observe(lag_s)
            t0 = time.perf_counter()
            transition = engine.plan_rules(
                self.facts,
                self.states,
                due,
                now,
                "time",
                book=self.book.copy(),
                approvals=self.approvals,
                record_unchanged=False,
            )
            if due:
                self._planned("time", t0, len(due))
            if transition.decisions:
                try:
                    await self._commit_and_apply([transition])
                except BaseException:
                    mark_due(self.deadlines, due, now)  # not lost: tried again next pass
                    raise
            schedule_rules(self.deadlines, due, self.facts, now)
        self._log_firings(transition)
        return transition

    def _reschedule(self, transition: Transition) -> None:
        """After ``transition`` is applied: reschedule the time-dependent rules it evaluated,
        from the same "now" it was planned at."""
        engine = self.engine
        if engine is None or transition.planned_at is None:
            return
        rules = [
            engine.rules[d.rule_id]
            for d in transition.decisions
            if d.rule_id in engine.time_dependent_ids
        ]
        if rules:
            before = self.deadlines.next_due()
            schedule_rules(self.deadlines, rules, self.facts, transition.planned_at)
            after = self.deadlines.next_due()
            if after is not None and (before is None or after < before):
                self._deadline_changed.set()

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                await self.purge_idempotency_keys()
            except Exception:
                log.exception("housekeeping failed; retrying later")

    async def purge_idempotency_keys(self) -> int:
        """Forget ``Idempotency-Key``s older than the config's ``idempotency_window_s``."""
        window = timedelta(seconds=self.config.idempotency_window_s)
        return await self.store.purge_idempotency_keys(self.clock.now() - window)

    # -- views ----------------------------------------------------------------------------

    def rule_view(self, rule: Rule, *, explain: bool) -> dict[str, Any]:
        """A rule as ``GET /v1/rules`` shows it; with ``explain`` its current explanation."""
        state = self.states.get(rule.id)
        view: dict[str, Any] = {
            "id": rule.id,
            "project": rule.project,
            "description": rule.description,
            "when": rule.condition.text.strip(),
            "fire": rule.fire,
            "file": rule.file,
            "line": rule.line,
            "content_hash": rule.content_hash,
            "actions": [{a.kind: {"target": a.target}} for a in rule.actions],
            "fired_count": state.fired_count if state else 0,
            "last_fired_at": state.last_fired_at if state else None,
            "gate_open": state.gate_open if state else None,
        }
        if explain:
            view["source"] = dict(rule.source)
            view["explanation"] = self._engine().explain(
                rule, self.facts, state, self.clock.now(), self.approvals
            )
        return view

    async def retry_action(
        self, action_id: str, *, actor: str, reason: str | None
    ) -> OutboxEntry | None:
        """Requeue dead letter ``action_id``, an audited admin act (``Store.requeue_action``)."""
        entry = await self.store.requeue_action(action_id, self.clock.now(), actor, reason)
        if entry is not None:
            log.warning(
                "action %s requeued by %s: %s",
                action_id,
                actor,
                reason or "no reason",
                extra={"action_id": action_id, "actor": actor, "reason": reason},
            )
            self.dispatcher.wake()
        return entry

    async def escrow_report(self) -> list[dict[str, Any]]:
        """Per escrow: currency, limit, released (delivered), pending, dead (unconfirmed:
        counted as possibly paid) and remaining, as decimal strings."""
        totals = await self.store.escrow_totals()
        report = []
        for name in sorted(set(self.config.escrows) | set(totals)):
            account = self.config.escrows.get(name)
            by_status = totals.get(name, {})
            committed = sum(by_status.values(), Decimal(0))
            report.append(
                {
                    "escrow": name,
                    "currency": account.currency if account else None,
                    "limit": str(account.limit) if account else None,
                    "released": str(by_status.get("delivered", Decimal("0.00"))),
                    "pending": str(by_status.get("pending", Decimal("0.00"))),
                    "unconfirmed": str(by_status.get("dead", Decimal("0.00"))),
                    "remaining": str(account.limit - committed) if account else None,
                }
            )
        return report


class PlannedStates(Mapping[str, RuleState]):
    """Rule states as a group of transitions sees them while it is planned: the states
    ``planned`` so far in the group over the ``committed`` ones (a read-only view of two
    dicts; ``get``, which the engine calls for each rule it evaluates, is two dict lookups,
    where ``collections.ChainMap.get`` costs several times that)."""

    __slots__ = ("committed", "planned")

    def __init__(self, planned: dict[str, RuleState], committed: dict[str, RuleState]) -> None:
        self.planned = planned
        self.committed = committed

    def get(self, key: str, default: Any = None) -> Any:
        state = self.planned.get(key)
        return self.committed.get(key, default) if state is None else state

    def __getitem__(self, key: str) -> RuleState:
        state = self.planned.get(key)
        return self.committed[key] if state is None else state

    def __contains__(self, key: object) -> bool:
        return key in self.planned or key in self.committed

    def __iter__(self) -> Iterator[str]:
        yield from self.planned
        yield from (key for key in self.committed if key not in self.planned)

    def __len__(self) -> int:
        return len(self.planned) + sum(1 for key in self.committed if key not in self.planned)


def check_hooks(config: Config) -> None:
    """Raise ``ConfigError`` when a hook mapping is broken (a malformed ``${path}`` template,
    a reserved fact kind), so it is refused at start or reload, not when an event arrives."""
    problems = hook_problems(config)
    if problems:
        raise ConfigError(problems)


def _keep_listen_and_database(new: Config, old: Config) -> Config:
    return replace(
        new,
        database=old.database,
        listen_host=old.listen_host,
        listen_port=old.listen_port,
    )
