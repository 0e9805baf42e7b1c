"""The running gatekeeper: wires the store, the writer, the ruleset manager, the deadline
loop and delivery, and offers the HTTP layer a narrow facade.

The parts: ``ingest.Writer`` (the in-memory mirror and the one write path: fact batches
with group commit and idempotency, approvals, admin acts), ``rulesets.Rulesets`` (load,
activate, reload, watch; all-or-nothing), ``ticker.Ticker`` (the deadline loop),
``views`` (the JSON the API serves) and ``delivery.Dispatcher``. ``Daemon`` owns their
background tasks: ``start()`` opens the store, loads the state and the ruleset and starts
them; ``stop()`` drains and stops them (``running()`` does both around a block, for
``aiohttp``'s ``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gatekeeper.clock import Clock, JumpDetector, SystemClock
from gatekeeper.config import Config, Hook, Token
from gatekeeper.delivery.alerts import settled_after_cancel_alert, settlement_failed_alert
from gatekeeper.delivery.dispatcher import Dispatcher
from gatekeeper.engine.evaluate import uuid_action_id
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    FactInput,
    FactKey,
    IdempotencyRecord,
    QueuedAction,
    SignOff,
    Transition,
)
from gatekeeper.metrics import Metrics
from gatekeeper.rules.model import Rule
from gatekeeper.runtime import views
from gatekeeper.runtime.ingest import (
    AlreadySignedOff,
    Counters,
    IdempotencyConflict,
    IngestResult,
    NotAnApprover,
    ShuttingDown,
    SignOffRefused,
    UnknownContentHash,
    UnknownRule,
    Writer,
)
from gatekeeper.runtime.outage import RETRY_AFTER_S, StoreOutage
from gatekeeper.runtime.rulesets import Rulesets, StartupError
from gatekeeper.runtime.ticker import Ticker
from gatekeeper.store import Store, database_name, store_for
from gatekeeper.store.errors import ADVICE, StoreError, StoreUnavailable
from gatekeeper.store.queries import AuditQuery, Projects
from gatekeeper.store.records import (
    ActionStatus,
    Attempt,
    AuditEntry,
    CancelRequest,
    LedgerMovement,
    LoggedFact,
    OutboxEntry,
    RulesetCursor,
    RulesetSummary,
    Settlement,
    SettlementCallback,
    SettlementResult,
    ShadowedReleases,
    StateFence,
    StoredDecision,
    StoredFact,
    StoredRuleset,
)

__all__ = [
    "AlreadySignedOff",
    "Daemon",
    "Health",
    "IdempotencyConflict",
    "IngestResult",
    "NotARelease",
    "NotAnApprover",
    "ShuttingDown",
    "SignOffRefused",
    "StartupError",
    "UnknownContentHash",
    "UnknownRule",
]

PING_TIMEOUT_S = 2.0
"""How long ``/healthz`` waits for the database to answer before calling it unreachable."""

log = logging.getLogger("gatekeeper.runtime.daemon")

HOUSEKEEPING_INTERVAL_S = 60.0


class NotARelease(ValueError):
    """The action is not a release: only a release can be cancelled (notify and pipeline
    actions move no money)."""


@dataclass(frozen=True)
class Health:
    """What ``/healthz`` tells: the live ruleset version (None before one went live),
    whether the last reload attempt was good, and the database's condition when it cannot
    take writes (``StoreOutage.current``: condition, since, message; None when fine)."""

    ruleset: str | None
    ruleset_ok: bool
    store: dict[str, Any] | None = None
    daemon_id: str = ""
    """This daemon's name among those sharing its database (``Dispatcher.daemon_id``)."""


class Daemon:
    """gatekeeper's runtime. ``start()`` it (or enter ``running()``), use it, ``stop()`` it.

    ``environ`` supplies target secrets (``secret_env``); ``clock`` is injectable for tests.
    ``tick_s`` is the longest the deadline loop sleeps before looking at the clock again;
    ``watch`` reloads on changes to the rules directory and config; ``new_action_id`` makes
    the ids of queued actions (default: ``act_`` and a random UUID).

    The parts are attributes for tests and tools (``store``, ``writer``, ``rulesets``,
    ``ticker``, ``dispatcher``, ``metrics``); the HTTP layer uses only the methods.
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        *,
        clock: Clock | None = None,
        tick_s: float = 60.0,
        watch: bool = True,
        new_action_id: Callable[[], str] = uuid_action_id,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self._clock_jumps = JumpDetector(self.clock)
        """Wall-clock jumps seen by this process: a key is never forgotten early."""
        self.watch = watch
        self.store: Store = store_for(config.database)
        self._database = config.database
        self.metrics = Metrics()
        outage = StoreOutage(self.clock.now)
        self.dispatcher = Dispatcher(
            self.store,
            lambda: self.rulesets.config.targets,
            lambda: self.rulesets.secrets,
            self.clock,
            metrics=self.metrics,
            outage=outage,
            alert_target=lambda: self.rulesets.config.alert_target,
            new_action_id=new_action_id,
            daemon_id=config.daemon_id,
            lease_s=lambda: self.rulesets.config.delivery_lease_s,
        )
        self.metrics.daemon_info.labels(daemon_id=self.dispatcher.daemon_id).set(1)
        self._new_action_id = new_action_id
        self.ticker = Ticker(self.clock, self.metrics, tick_s)
        self.writer = Writer(
            self.store,
            self.clock,
            Counters(self.metrics),
            self.dispatcher,
            self.ticker,
            config.escrows,
            outage,
        )
        self.rulesets = Rulesets(
            config, environ, self.writer, self.ticker, self.clock, self.metrics, new_action_id
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    @property
    def config(self) -> Config:
        """The live config (a reload may replace it)."""
        return self.rulesets.config

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load state and the ruleset, start delivery, watching and ticks.

        Raises ``StartupError`` when a secret is missing or no usable ruleset exists (the
        store is closed again then).
        """
        self.rulesets.resolve_secrets()
        await self.store.open()
        try:
            await self.store.hold_daemon_lock()
        except BaseException:
            await self.store.close()
            raise
        try:
            await self.writer.load_state()
            await self.rulesets.load_initial()
        except StoreUnavailable as exc:
            await self.store.close()
            raise StoreUnavailable(
                f"cannot load the state from database {database_name(self._database)}: "
                f"{exc}; {ADVICE[exc.condition]}",
                exc.condition,
            ) from exc
        except BaseException:
            await self.store.close()
            raise
        self._started = True
        self._spawn(self.writer.run(), "writer")
        self._spawn(self.dispatcher.run(), "dispatcher")
        self._spawn(self.ticker.run(self.writer), "clock-ticks")
        self._spawn(self._housekeep_forever(), "housekeeping")
        if self.watch:
            self._spawn(self.rulesets.watch(), "watcher")
        if self.store.shared:  # other daemons may activate rulesets: follow the active one
            self._spawn(self.rulesets.follow(), "ruleset-follower")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop in stages: take no new facts (``ShuttingDown``), commit the ones already
        queued, stop watching and ticking, let deliveries in progress finish for up to
        ``grace_s`` seconds (default: the config's ``shutdown_grace_s``), then close the
        store. Actions not yet delivered stay in the outbox and resume at the next start."""
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        self.writer.close()
        self.rulesets.stop_watching()
        await self.writer.drain(grace_s)
        await self.dispatcher.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        async with self.writer.lock:
            await self.store.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """``start()`` on entry and ``stop()`` on exit, unless the daemon was started
        already: whoever started it stops it (tests start a daemon, then serve it)."""
        if self._started:
            yield
            return
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def _housekeep_forever(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                await self.purge_idempotency_keys()
            except Exception:
                log.exception("housekeeping failed; retrying later")

    async def purge_idempotency_keys(self) -> int:
        """Forget ``Idempotency-Key``s older than the config's ``idempotency_window_s``;
        returns how many."""
        window_s = self.config.idempotency_window_s
        cutoff = self._clock_jumps.keep_since(self._clock_jumps.now(), window_s)
        return await self.store.purge_idempotency_keys(cutoff)

    # -- writes -------------------------------------------------------------------------

    def ingest(
        self,
        batch: list[FactInput],
        request_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> Coroutine[Any, Any, IngestResult]:
        """Apply a batch of facts atomically, answering once committed (``Writer.ingest``:
        group commit, ``Idempotency-Key`` replay, ``IdempotencyConflict``,
        ``ShuttingDown``)."""
        return self.writer.ingest(batch, request_id, idempotency)

    def approve(
        self,
        approval: ApprovalInput,
        request_id: str | None = None,
        idempotency: IdempotencyRecord | None = None,
    ) -> Coroutine[Any, Any, IngestResult]:
        """Record an approver's decision and re-evaluate its rule (``Writer.approve``:
        ``UnknownRule``, ``NotAnApprover``, ``IdempotencyConflict``, ``ShuttingDown``)."""
        return self.writer.approve(approval, request_id, idempotency)

    async def administer(self, act: AdminAct) -> dict[str, Any]:
        """Carry out an admin act on a rule (pause, resume, rearm), audited with who and why,
        and re-evaluate the rule under its new state. Returns the rule's view (of the
        instance ``act.instance`` names, when it names one); an act on a per-item rule as a
        whole adds ``acted_on``, how many of its instances it changed.

        Raises ``UnknownRule``, ``UnknownInstance`` (a per-item rule with no instance
        ``act.instance``), or ``ValueError`` when the act does not apply."""
        rule, recorded = await self.writer.administer(act)
        view = views.rule_view(self.writer, rule, explain=True, item=act.instance or None)
        if recorded.instances is not None:
            view["acted_on"] = recorded.instances
        return view

    async def sign_off(self, signoff: SignOff) -> dict[str, Any]:
        """Record an admin's sign-off of a money rule's content hash (``Writer.sign_off``:
        ``UnknownContentHash``, ``SignOffRefused``, ``AlreadySignedOff``; nothing recorded
        then). Returns the signed rule's view, with ``signoff`` saying where it stands."""
        rule, _ = await self.writer.sign_off(signoff)
        shadowed = await self.store.shadowed_releases()
        return views.rule_view(self.writer, rule, explain=False, shadowed=shadowed)

    async def shadowed_releases(self) -> list[ShadowedReleases]:
        """What shadowed firings would have released, per rule, content hash, escrow and
        currency (``Store.shadowed_releases``)."""
        return await self.store.shadowed_releases()

    async def retry_action(
        self, action_id: str, *, actor: str, reason: str | None
    ) -> OutboxEntry | None:
        """Requeue dead letter ``action_id``, an audited admin act (``Store.requeue_action``:
        None when there is no such action, ``Conflict`` when it is not dead)."""
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

    async def cancel_action(
        self, action_id: str, *, actor: str, reason: str
    ) -> tuple[OutboxEntry, list[LedgerMovement]] | None:
        """Cancel release ``action_id`` before it is sent, an audited admin act
        (``Store.cancel_release``): it is never sent afterwards (the dispatcher drops it),
        and its amount returns to its escrow at once (the book too); the releases blocked
        on that escrow are tried again in the same transaction (``Writer.plan_return``,
        decisions with trigger ``return``). Returns the cancelled entry and the ledger
        movements written (cancel, return); None when there is no such action.

        Raises ``NotARelease`` for a notify or pipeline action, ``Conflict`` when an
        attempt of it is in flight (the store's ``begin_attempt`` mark: from just before its
        request to its recorded outcome, which decides) or it is delivered or cancelled
        already; nothing changes then."""
        existing = await self.store.get_action(action_id)
        if existing is None:
            return None
        if existing.kind != "release":
            raise NotARelease(
                f"action {action_id} is a {existing.kind} action: only a release can be cancelled"
            )
        writer = self.writer
        async with writer.lock:  # the book changes with the commit, between writes
            record = await self.store.release_record(action_id)

            async def cancel(
                fence: StateFence | None,
            ) -> tuple[tuple[OutboxEntry, list[LedgerMovement]] | None, Transition | None]:
                now = self.clock.now()
                then = None
                if record is not None:  # planned on the latest state: checked
                    then = writer.plan_return(record.escrow, record.amount, now)
                request = CancelRequest(action_id, now, actor, reason, then)
                return await self.store.cancel_release(request, fence=fence), then

            cancelled, then = await writer.checked(cancel)
            if cancelled is None:
                return None
            entry, movements = cancelled
            self._give_back(movements, then)
        self.dispatcher.drop(action_id)
        log.warning(
            "release %s cancelled by %s: %s",
            action_id,
            actor,
            reason,
            extra={"action_id": action_id, "actor": actor, "reason": reason},
        )
        return entry, movements

    def _give_back(self, movements: Sequence[LedgerMovement], then: Transition | None) -> None:
        """Apply committed ``return`` movements to the live escrow book, with ``then``,
        what the return decided, committed with it (``Writer.returned``); a ``reclaim``
        counts its amount against the escrow again (``Writer.reclaimed``)."""
        for movement in movements:
            if movement.movement == "return":
                self.writer.returned(movement.escrow, movement.amount, then)
                then = None
            elif movement.movement == "reclaim":
                self.writer.reclaimed(movement.escrow, movement.amount)

    def settlement_secret(self, target: str) -> str | None:
        """The Standard Webhooks secret that signs target ``target``'s settlement callbacks
        (its ``secret_env``; "" when it has none), or None when no webhook target
        ``target`` is configured."""
        found = self.config.targets.get(target)
        if found is None or found.kind != "webhook":
            return None
        return self.rulesets.secrets.get(target, "")

    async def settle(
        self,
        target: str,
        release_id: str,
        outcome: Settlement,
        reference: str,
        reason: str | None,
        *,
        webhook_id: str,
        body_sha256: str,
    ) -> SettlementResult | None:
        """Record target ``target``'s verified settlement callback about release
        ``release_id`` (``Store.settle_release``; a sent, dead or cancelled release):
        settled, or failed (its amount returns to the escrow at once, the book too, the
        releases blocked on that escrow are tried again in the same transaction, and
        ``alert_target`` is told once). A cancelled release settled anyway is reclaimed:
        its amount counts against the escrow again (the book too) and ``alert_target`` is
        told (``settled_after_cancel``); a failure of it moves nothing. None when
        ``target`` was sent no such release; raises ``KeyReused`` (the webhook-id came
        with another body), ``AttemptInFlight`` (an attempt is in flight: retry) or
        ``Conflict`` (not sent, or settled the other way)."""
        writer = self.writer
        async with writer.lock:
            result, then, alert = await writer.checked(
                functools.partial(
                    self._settle,
                    target,
                    release_id,
                    outcome,
                    reference,
                    reason,
                    webhook_id,
                    body_sha256,
                )
            )
            if result is None:
                return None
            self._give_back(result.movements, then)
        if result.movements:
            log.log(
                logging.INFO if outcome == "settled" else logging.ERROR,
                "release %s %s by %s (reference %s)%s",
                release_id,
                outcome,
                target,
                reference,
                f": {reason}" if reason else "",
                extra={"action_id": release_id, "target": target, "reference": reference},
            )
            if alert is not None:  # written with the first movements
                self.metrics.actions.labels(target=alert.target, status="queued").inc()
                self.dispatcher.hand_over([alert], None)
        return result

    async def _settle(
        self,
        target: str,
        release_id: str,
        outcome: Settlement,
        reference: str,
        reason: str | None,
        webhook_id: str,
        body_sha256: str,
        fence: StateFence | None,
    ) -> tuple[SettlementResult | None, Transition | None, QueuedAction | None]:
        """With the writer's lock held: plan what the settlement decides (a failure's
        return: ``Writer.plan_return``; the alert) and record it (``Store.settle_release``,
        checked against ``fence``). Returns the result, the transition the return decided
        and the alert queued. Raises as ``settle`` does, and ``StateBehind``."""
        now = self.clock.now()  # under the lock: the writes' times follow their order
        release = await self.store.get_action(release_id)
        alert = then = None
        alert_target = self.config.alert_target
        alert_config = self.config.targets.get(alert_target or "")
        slack = alert_config is not None and alert_config.format == "slack"
        cancelled = release is not None and release.status == "cancelled"
        if release is not None and outcome == "failed" and not cancelled:
            record = await self.store.release_record(release_id)
            if record is not None:
                then = self.writer.plan_return(record.escrow, record.amount, now)
            alert = settlement_failed_alert(
                release,
                reference=reference,
                reason=reason,
                alert_target=alert_target,
                slack=slack,
                action_id=self._new_action_id(),
                at=now,
            )
        elif release is not None and cancelled and outcome == "settled":
            alert = settled_after_cancel_alert(
                release,
                reference=reference,
                alert_target=alert_target,
                slack=slack,
                action_id=self._new_action_id(),
                at=now,
            )
        result = await self.store.settle_release(
            SettlementCallback(
                target,
                release_id,
                outcome,
                reference,
                reason,
                webhook_id,
                body_sha256,
                now,
                alert,
                then,
            ),
            fence=fence,
        )
        return result, then, alert

    async def escrow_entries(
        self, escrow: str, *, after: int = 0, limit: int = 1000, projects: Projects = None
    ) -> list[LedgerMovement] | None:
        """A page of escrow ``escrow``'s ledger movements, oldest first, after movement id
        ``after``, at most ``limit``, only of releases of ``projects``; None for an escrow
        neither configured nor ever moved."""
        if escrow not in self.config.escrows and not await self.store.ledger_movements(
            escrow, limit=1
        ):
            return None
        return await self.store.ledger_movements(
            escrow, after=after, limit=limit, projects=projects
        )

    async def reload(self) -> bool:
        """Re-read the config and rules directory, all-or-nothing (``Rulesets.reload``):
        False, keeping what is live, when anything is invalid."""
        return await self.rulesets.reload()

    async def tick(self) -> Transition:
        """Evaluate the time-dependent rules that are due now (``Ticker.tick``); returns
        the transition."""
        return await self.ticker.tick(self.writer)

    # -- reads for the API --------------------------------------------------------------

    def tokens(self) -> Sequence[Token]:
        """The API tokens of the live config (empty: no authentication, loopback only)."""
        return self.config.tokens

    def max_body_bytes(self) -> int:
        """The largest request body the API accepts, in bytes."""
        return self.config.max_body_bytes

    def hook(self, source: str) -> tuple[Hook, str] | None:
        """The configured hook ``source`` and its secret ("" when it has none), or None."""
        hook = self.config.hooks.get(source)
        if hook is None:
            return None
        return hook, self.rulesets.hook_secrets.get(source, "")

    def fact_rejected(self, reason: str) -> None:
        """Count a refused ``POST /v1/facts`` (``malformed``, ``too_large``, ...)."""
        self.metrics.fact_rejected(reason)

    def rules(self) -> Sequence[Rule]:
        """The rules of the live ruleset, in ruleset order (none before one went live)."""
        engine = self.writer.engine
        return engine.ruleset.rules if engine else ()

    def rule(self, rule_id: str) -> Rule | None:
        """Rule ``rule_id`` of the live ruleset, or None."""
        engine = self.writer.engine
        return engine.rules.get(rule_id) if engine else None

    def rule_view(
        self,
        rule: Rule,
        *,
        explain: bool,
        item: str | None = None,
        shadowed: Sequence[ShadowedReleases] | None = None,
    ) -> dict[str, Any]:
        """A rule as ``GET /v1/rules`` shows it; with ``explain`` its current explanation;
        ``item``: one instance of a per-item rule (``KeyError`` when it has none such);
        ``shadowed`` (``shadowed_releases()``): what its shadowed firings would have
        released."""
        return views.rule_view(self.writer, rule, explain=explain, item=item, shadowed=shadowed)

    async def rule_detail(
        self,
        rule_id: str,
        decisions: int,
        item: str | None = None,
        *,
        instances_after: str | None = None,
        instances_limit: int = 100,
    ) -> dict[str, Any]:
        """A live rule's full view with its ``decisions`` most recent decisions, of instance
        ``item`` when given; a per-item rule without ``item`` with a page of its instances
        (``views.rule_detail``). ``KeyError`` for a rule not live or an unknown instance."""
        return await views.rule_detail(
            self.writer,
            rule_id,
            decisions,
            item,
            instances_after=instances_after,
            instances_limit=instances_limit,
        )

    def rule_instances(
        self, rule: Rule, *, after: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """A page of the rule's instances with their states (``views.instances_view``)."""
        return views.instances_view(self.writer, rule, after=after, limit=limit)

    def rule_status(self, rule: Rule) -> str | None:
        """Where a rule without ``for_each`` stands, in a word (``views.rule_status``; None
        for a per-item rule)."""
        return views.rule_status(self.writer, rule)

    def gate_timing(self, rule: Rule, item: str = "") -> dict[str, Any]:
        """When time alone next changes the rule's condition (instance ``item``) and when
        its standing approvals lapse (``views.gate_timing``)."""
        return views.gate_timing(self.writer, rule, item)

    async def recent_decisions(self, project: str, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` latest decisions of ``project``, newest first, from memory
        (``views.recent_decisions``)."""
        return await views.recent_decisions(self.writer, project, limit)

    def change_stamp(self) -> int:
        """A number that grows whenever something a status page shows may have changed
        (a committed transition, a delivery attempt, a ruleset going live)."""
        return self.metrics.changes

    def ruleset_view(self) -> dict[str, Any] | None:
        """The live ruleset's version, git commit, size and files (None before one)."""
        return views.ruleset_view(self.writer.engine)

    def reload_view(self) -> dict[str, Any]:
        """The outcome of the last reload attempt, as JSON."""
        return self.rulesets.status.to_json()

    def health(self) -> Health:
        """The live ruleset version and whether the last reload was good."""
        engine = self.writer.engine
        return Health(
            engine.ruleset.version if engine else None,
            self.rulesets.status.ok,
            self.writer.outage.current(),
            self.dispatcher.daemon_id,
        )

    async def database_reachable(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether the database answers a ``Store.ping`` within ``timeout_s`` seconds. The
        ping is shielded: one that times out finishes in the background rather than
        being cancelled halfway through a round trip on the shared read connection."""
        try:
            await asyncio.wait_for(asyncio.shield(self.store.ping()), timeout_s)
        except (StoreError, TimeoutError):
            return False
        return True

    def store_unavailable(self, exc: StoreUnavailable) -> int:
        """A request met a database that cannot serve it (``exc``): report it (logged once
        per condition per interval) and return the seconds a client should wait before
        retrying (``Retry-After``)."""
        self.writer.outage.failed(exc)
        return RETRY_AFTER_S

    async def list_facts(
        self,
        project: str | None = None,
        *,
        projects: Projects = None,
        after: FactKey | None = None,
        limit: int | None = None,
    ) -> list[StoredFact]:
        """The current facts (of ``project``, when given; only of ``projects``) in
        ``(project, kind, id)`` order, after ``after``, at most ``limit`` (None: all)."""
        return await self.store.list_facts(project, projects=projects, after=after, limit=limit)

    async def list_actions(
        self, status: ActionStatus | None = None, limit: int = 100, *, projects: Projects = None
    ) -> list[OutboxEntry]:
        """Outbox entries (of ``status``, when given; only of ``projects``), at most
        ``limit``."""
        return await self.store.list_actions(status, limit, projects=projects)

    async def get_action(self, action_id: str) -> OutboxEntry | None:
        """One outbox entry, or None."""
        return await self.store.get_action(action_id)

    async def list_attempts(self, action_id: str) -> list[Attempt]:
        """Every delivery attempt of ``action_id``, oldest first."""
        return await self.store.list_attempts(action_id)

    async def audit(self, query: AuditQuery) -> list[AuditEntry]:
        """The audit log entries ``query`` selects, newest first."""
        return await self.store.audit(query)

    async def fact_log(
        self, after_seq: int, limit: int, *, projects: Projects = None
    ) -> list[LoggedFact]:
        """A page of the fact log, in seq order, only of ``projects`` (for a replay of the
        history)."""
        return await self.store.fact_log(after_seq, limit, projects=projects)

    async def decision_page(
        self, after_id: int, limit: int, every: bool, *, projects: Projects = None
    ) -> tuple[list[StoredDecision], list[OutboxEntry], dict[int, int]]:
        """A page of the decision log for a replay (``every``: quiet decisions too),
        without evaluations, only of ``projects``, with the actions its decisions queued
        and where each decision not made on a fact or approval falls in the fact log."""
        store = self.store
        decisions = await store.decision_log(
            after_id, limit, evaluations=False, quiet=every, projects=projects
        )
        if not decisions:
            return [], [], {}
        actions = await store.actions_of_decisions(decisions[0].id, decisions[-1].id)
        if projects is not None:  # the actions of the page's decisions only
            ids = {d.id for d in decisions}
            actions = [a for a in actions if a.decision_id in ids]
        positions = await store.fact_log_positions(
            [d.id for d in decisions if d.trigger not in ("fact", "approval")]
        )
        return decisions, actions, positions

    async def list_rulesets(
        self, limit: int, after: RulesetCursor | None = None
    ) -> list[RulesetSummary]:
        """The ruleset versions that went live, most recent first, at most ``limit``,
        continuing after ``after``; without their files' text."""
        return await self.store.list_rulesets(limit, after=after)

    async def stored_ruleset(self, version: str) -> StoredRuleset | None:
        """One stored ruleset version with its files' text, or None."""
        return await self.store.get_ruleset(version)

    async def release(self, release_id: str) -> tuple[str, dict[str, Any]] | None:
        """The project and whole story of one release (``views.release_view``), or None."""
        return await views.release_view(self.store, release_id)

    async def export(
        self,
        visible: views.Visible,
        projects: Projects,
        *,
        after: FactKey | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """A snapshot of the state for ``gatekeeper plan --snapshot``, limited to the
        ``visible`` projects (the same set as ``projects``, which the store filters by;
        ``views.export_view``), its facts paged by ``after`` and ``limit``."""
        return await views.export_view(
            self.writer, self.config.escrows, visible, projects, after=after, limit=limit
        )

    async def escrow_report(self) -> list[dict[str, Any]]:
        """Per escrow: currency, limit, reserved, sent, settled, returned, remaining, and
        released, pending, unconfirmed, as decimal strings (``views.escrow_report``)."""
        return await views.escrow_report(self.store, self.config.escrows)

    async def metrics_text(self, *, openmetrics: bool = False) -> bytes:
        """The Prometheus text exposition (or, ``openmetrics``, the OpenMetrics one, with
        the item of per-item firings as exemplars), after refreshing the scrape-time gauges
        (deadlines pending, outbox counts, escrow amounts)."""
        self.metrics.refresh(
            deadlines_pending=len(self.ticker.deadlines),
            action_counts=await self.store.count_actions(),
            escrows=[
                (
                    str(row["escrow"]),
                    Decimal(row["released"]),
                    None if row["remaining"] is None else Decimal(row["remaining"]),
                )
                for row in await self.escrow_report()
            ],
        )
        return self.metrics.render(openmetrics_format=openmetrics)
