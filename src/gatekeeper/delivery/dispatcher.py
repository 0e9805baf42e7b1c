"""The outbox dispatcher: delivers queued actions, at least once, with retries.

Each due action is POSTed to its target (see ``requests``). A 2xx answer marks it delivered.
Connection errors, timeouts, 408, 429 and 5xx are retried after a delay drawn with "full
jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): uniform in
``[0, min(backoff_cap_s, backoff_base_s * 2**(attempt-1))]``, or the server's
``Retry-After`` (delay-seconds or an HTTP-date; at most ``backoff_cap_s``) when it is
longer (``retry``). Any other answer, or running out of attempts
(``max_attempts``) or time (``max_age_s``), makes the action a dead letter, kept with its
last error and visible in ``GET /v1/actions?status=dead``. Nothing is dropped silently.

Delivery is at-least-once: a crash between the receiver's answer and the commit of that
answer means the action is sent again, with the same ``webhook-id`` (and, for a release,
the same ``Idempotency-Key``), so receivers can deduplicate.

Several daemons may share one database: every action is CLAIMED before it is started
(``DeliveryQueue.claim_due``), by this daemon's ``daemon_id`` with a lease of
``lease_s`` seconds (longer than any target's request timeout, see ``config``), whether an
outbox query found it or it was handed over in memory (on a database only this daemon
can have, a SQLite file, a hand-over is sent unclaimed); another daemon does not pick it
while the lease runs, and takes it over once it ran out (its daemon died mid-delivery).
Recording the attempt clears the claim; a release's ``begin_attempt`` is refused when
another daemon took it over meanwhile (this one stalled past its lease).

Every attempt is recorded (time, latency, HTTP status or error). Actions are delivered
concurrently, so one slow or unreachable target does not hold up the others.

A release may be cancelled until it is sent: before each attempt of a release the
dispatcher marks the attempt started in the store (``begin_attempt``), which refuses once
the release is cancelled (it is then dropped, never sent) and, from then until the outcome
is recorded, makes a cancel wait for that outcome. ``drop`` forgets a cancelled action
held in memory (handed over, scheduled for a retry, held back). A dead letter queues a
``dead_letter`` alert to the config's ``alert_target`` with its record (``alerts``); a
delivered release gets the ledger's ``send`` movement from the store with its record.

Time: attempts and due times are stored in wall time (so they survive a restart), but what
is a duration inside this process follows the monotonic clock (``JumpDetector``): an
action's age for ``max_age_s`` leaves out a jump of the wall clock, a retry scheduled here
waits its delay on the monotonic clock (a forward jump does not make it due early), and a
due time stored before a backward jump is not made later by it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

import aiohttp

from gatekeeper.clock import Clock, JumpDetector
from gatekeeper.config import DEFAULT_DELIVERY_LEASE_S, DeliveryPolicy, Target
from gatekeeper.delivery.alerts import dead_letter_alert
from gatekeeper.delivery.requests import build_request
from gatekeeper.delivery.retry import (
    backoff_ceiling_s,
    backoff_delay_s,
    parse_retry_after,
    retry_delay_s,
)
from gatekeeper.engine.evaluate import uuid_action_id
from gatekeeper.engine.model import QueuedAction
from gatekeeper.metrics import Metrics
from gatekeeper.store.contract import DeliveryQueue
from gatekeeper.store.errors import StoreUnavailable
from gatekeeper.store.queries import OutboxFilter
from gatekeeper.store.records import (
    ActionStatus,
    Attempt,
    AttemptRecord,
    DeadReason,
    OutboxEntry,
    outbox_entry_of,
)

log = logging.getLogger("gatekeeper.delivery.dispatcher")

RETRYABLE_STATUS = frozenset({408, 429})
MAX_CONCURRENT_DELIVERIES = 64
MAX_DELIVERIES_PER_TARGET = 8
MAX_ERROR_CHARS = 500
MAX_READY = 10_000
"""At most this many handed-over actions wait in memory for a slot; more are left to an
outbox query."""
MAX_RECENTLY_FINISHED = 4096
HOLD_BASE_S = 5.0
HOLD_CAP_S = 300.0
MAX_TIMED_RETRIES = 1024
"""At most this many retries scheduled in this process are also timed on the monotonic
clock (the rest follow their stored due time only)."""


def new_daemon_id() -> str:
    """A daemon id for a daemon whose config names none: ``<hostname>:<pid>:<6 random hex
    digits>`` (unique among the daemons sharing a database, and anew at each start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class AttemptOutcome:
    """What one attempt came to: ``status_code`` (None when no answer), ``error`` text,
    whether to retry, and the server's ``Retry-After`` in seconds when it sent one."""

    status_code: int | None
    error: str | None
    retryable: bool
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class OutageReport(Protocol):
    """Where the database's run-time condition is reported (``runtime.outage``)."""

    def failed(self, exc: StoreUnavailable) -> None:
        """A write failed with ``exc``."""

    def recovered(self) -> None:
        """A write succeeded."""


class Dispatcher:
    """Delivers due actions from the outbox until stopped.

    ``targets`` and ``secrets`` are read through callables so a config reload is picked up.
    Call ``hand_over(actions)`` after committing new actions (they are started from memory,
    with no outbox query; on a shared database one claim for those starting together),
    ``wake()`` after any other change to the outbox (a requeued dead letter): the outbox is
    then queried for due actions. The outbox is also queried at start, when a retry falls
    due, when a hold ends, when a target's slot frees after a query left due actions
    behind, and every ``idle_poll_s`` seconds.

    Outcomes are recorded in groups: the outcomes that arrive while one group is being
    committed are committed together next (one transaction, one fsync). An action stays
    "in flight" (never picked again) until its outcome is committed, and nothing that
    depends on an outcome (the log line, the next attempt) happens before that.

    ``alert_target`` (read through a callable, like ``targets``) is where a dead letter's
    alert goes (None: nowhere); ``new_action_id`` makes the alerts' ids. ``daemon_id`` names
    this daemon in its claims, ``lease_s`` (a callable: seconds) how long they last.
    """

    def __init__(
        self,
        store: DeliveryQueue,
        targets: Callable[[], Mapping[str, Target]],
        secrets: Callable[[], Mapping[str, str]],
        clock: Clock,
        *,
        rng: random.Random | None = None,
        idle_poll_s: float = 5.0,
        metrics: Metrics | None = None,
        outage: OutageReport | None = None,
        alert_target: Callable[[], str | None] = lambda: None,
        new_action_id: Callable[[], str] = uuid_action_id,
        daemon_id: str | None = None,
        lease_s: Callable[[], float] = lambda: DEFAULT_DELIVERY_LEASE_S,
    ) -> None:
        self._store = store
        self.daemon_id = daemon_id or new_daemon_id()
        self._lease_s = lease_s
        self._alert_target = alert_target
        self._new_action_id = new_action_id
        self._outage = outage
        """Told when the database cannot take the dispatcher's writes (it logs that once
        per interval) and when they succeed again; without it such a failure is logged
        here, like any other."""
        self._targets = targets
        self._secrets = secrets
        self._clock = clock
        self._time = JumpDetector(clock)
        self._retry_due: dict[str, float] = {}
        """Retries scheduled in this process: monotonic time they fall due; until then
        they are not picked, whatever the wall clock says."""
        self._rng = rng or random.Random()
        self._idle_poll_s = idle_poll_s
        self._wakeup = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        """Deliveries in progress, from the request to the recorded outcome."""
        self._holding: set[str] = set()
        """Deliveries whose request is not answered yet: they hold a slot of their target
        (``MAX_DELIVERIES_PER_TARGET``) and of ``MAX_CONCURRENT_DELIVERIES``."""
        self._ready: dict[str, collections.deque[OutboxEntry]] = {}
        """Committed actions handed over in memory and not started yet, per target, oldest
        first; an entry counts only while its id is in ``_ready_ids`` (a query may start it
        first)."""
        self._ready_ids: set[str] = set()
        self._recently_finished: dict[str, None] = {}
        """The last ``MAX_RECENTLY_FINISHED`` actions whose delivery task ended (a late
        hand-over of one of them is ignored)."""
        self._scanning = False
        self._finished_during_query: set[str] = set()
        self._query_needed = True
        """Look at the outbox at the next turn (at start: whatever is pending)."""
        self._query_at: datetime | None = None
        """When the earliest pending action not in memory falls due (a retry)."""
        self._last_query = -math.inf
        self._per_target: collections.Counter[str] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._running = False
        self._done = asyncio.Event()
        self._grace_s = 10.0
        self._held_until: dict[str, float] = {}
        self._hold_count: collections.Counter[str] = collections.Counter()
        self._outcomes: list[tuple[AttemptRecord, asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None
        self.delivered = 0
        self.dead = 0
        self.metrics = metrics or Metrics()

    def hand_over(self, actions: Sequence[QueuedAction], request_id: str | None) -> None:
        """Deliver ``actions``, caused by request ``request_id``, without querying the
        outbox for them (shadowed ones are skipped: they are never sent). Call only once
        their outbox rows are COMMITTED: an action is never sent before its row is durable.
        Beyond ``MAX_READY`` waiting actions the rest are left to an outbox query."""
        if self._stopping:
            return
        for action in actions:
            if action.shadowed:  # stored to be shown, never sent
                continue
            action_id = action.action_id
            if (
                action_id in self._in_flight
                or action_id in self._ready_ids
                or action_id in self._recently_finished
            ):
                continue
            if len(self._ready_ids) >= MAX_READY:
                self._query_needed = True
                continue
            queue = self._ready.get(action.target)
            if queue is None:
                queue = self._ready[action.target] = collections.deque()
            queue.append(outbox_entry_of(action, request_id))
            self._ready_ids.add(action_id)
        self._wakeup.set()

    def drop(self, action_id: str) -> None:
        """Forget ``action_id`` (cancelled): not started from the hand-over queue, its
        retry no longer timed, its hold forgotten, a late hand-over of it ignored. A query
        that read it before the cancel was committed may still pick it: ``begin_attempt``
        then refuses it, and it is not sent."""
        self._ready_ids.discard(action_id)
        self._retry_due.pop(action_id, None)
        self._held_until.pop(action_id, None)
        self._hold_count.pop(action_id, None)
        if action_id not in self._in_flight:
            self._recently_finished.pop(action_id, None)
            if len(self._recently_finished) >= MAX_RECENTLY_FINISHED:
                del self._recently_finished[next(iter(self._recently_finished))]
            self._recently_finished[action_id] = None

    def _reported(self, exc: Exception) -> bool:
        """Hand ``exc`` to ``outage`` if it is the database's condition (it
        logs that once per interval); False: log it here."""
        if self._outage is None or not isinstance(exc, StoreUnavailable):
            return False
        self._outage.failed(exc)
        return True

    def wake(self) -> None:
        """Look at the outbox now (it changed other than by ``hand_over``)."""
        self._query_needed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver until ``stop()``; meant to run as a background task."""
        self._session = aiohttp.ClientSession()
        self._running = True
        try:
            while not self._stopping:
                # cleared before looking, so a wake() while looking is not lost
                self._wakeup.clear()
                try:
                    if self._query_due():
                        await self._dispatch_due()
                    await self._start_ready()
                    await self._sleep_until_due()
                except Exception as exc:  # e.g. the database is locked: never let delivery die
                    self._query_needed = True
                    if not self._reported(exc):
                        log.exception(
                            "the dispatcher failed; retrying in %.0f s", self._idle_poll_s
                        )
                    await asyncio.sleep(self._idle_poll_s)
        finally:
            await self._finish_in_flight()
            if self._recorder is not None:  # outcomes of deliveries cancelled meanwhile
                await asyncio.wait([self._recorder], timeout=self._grace_s)
            await self._session.close()
            self._running = False
            self._done.set()

    async def _finish_in_flight(self) -> None:
        """Let deliveries in progress finish for up to the grace period, then cancel them
        (their actions stay pending and are sent again at the next start)."""
        tasks = list(self._in_flight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=self._grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking new work; let deliveries in progress finish for up to ``grace_s``."""
        self._grace_s = grace_s
        self._stopping = True
        self._wakeup.set()
        if self._running:
            await self._done.wait()

    def _query_due(self) -> bool:
        """Whether to look at the outbox this turn."""
        if self._held_until and self._expire_holds():
            self._query_needed = True
        if self._retry_due and self._expire_retry_waits():
            self._query_needed = True
        if self._query_needed:
            return True
        if self._query_at is not None and self._due_now() >= self._query_at:
            return True
        return time.monotonic() - self._last_query >= self._idle_poll_s

    async def _dispatch_due(self) -> None:
        """Start deliveries of due actions found in the outbox, per target, up to the
        concurrency limits; then note when the next one falls due."""
        # A delivery that finishes while a query runs may be read as still pending: such
        # ids land in _finished_during_query and are skipped (no duplicate send).
        self._scanning = True
        self._finished_during_query = set()
        self._query_needed = False
        self._query_at = None
        self._last_query = time.monotonic()
        complete = True  # every due action was seen
        try:
            now = self._due_now()
            configured = sorted(self._targets())
            buckets = [OutboxFilter(target=name) for name in configured]
            buckets.append(OutboxFilter(not_targets=configured))  # targets no longer configured
            for bucket in buckets:
                free = MAX_CONCURRENT_DELIVERIES - len(self._holding)
                if bucket.target is not None:
                    free = min(free, MAX_DELIVERIES_PER_TARGET - self._per_target[bucket.target])
                if self._stopping:
                    return
                if free <= 0:
                    complete = False
                    continue
                only = replace(bucket, exclude_ids=self._excluded_ids())
                entries = await self._claim(now, free, only)
                if len(entries) >= free:
                    complete = False
                for entry in entries:
                    self._start(entry)
            if len(self._holding) < MAX_CONCURRENT_DELIVERIES:
                # targets at their limit are left out: a slot freeing up wakes the loop
                full = [t for t, n in self._per_target.items() if n >= MAX_DELIVERIES_PER_TARGET]
                only = OutboxFilter(not_targets=full, exclude_ids=self._excluded_ids())
                next_at = await self._store.next_attempt_at(only=only)
                if next_at is not None:
                    self._note_due(next_at)
        finally:
            self._scanning = False
            self._finished_during_query = set()
            if not complete:
                self._query_needed = True

    def _note_due(self, when: datetime) -> None:
        if self._query_at is None or when < self._query_at:
            self._query_at = when

    async def _claim(self, now: datetime, limit: int, only: OutboxFilter) -> list[OutboxEntry]:
        """Claim at most ``limit`` due actions narrowed by ``only`` for this daemon
        (``DeliveryQueue.claim_due``), counting the claims and the leases taken over. On
        a database only this daemon serves (not ``shared``: a SQLite file) nothing needs a
        claim: the due actions are read (``due_actions``, the reader), not written for."""
        if not self._store.shared:
            return await self._store.due_actions(now, limit, only=only)
        entries = await self._store.claim_due(
            now, limit, daemon_id=self.daemon_id, lease_s=self._lease_s(), only=only
        )
        self.metrics.delivery_claims.inc(len(entries))
        for entry in entries:
            if entry.lease_taken_from is not None:
                self.metrics.delivery_leases_expired.inc()
                log.warning(
                    "took over %s %s: the lease of daemon %s on it ran out",
                    entry.kind,
                    entry.action_id,
                    entry.lease_taken_from,
                    extra={"action_id": entry.action_id, "daemon_id": entry.lease_taken_from},
                )
        return entries

    async def _start_ready(self) -> None:
        """Start the handed-over actions whose targets have a free slot, oldest first; on
        a shared database (``DeliveryQueue.shared``) only those claimed, all in one claim.
        One not claimed (cancelled, taken by another daemon, not due on this clock yet)
        is left to an outbox query. A SQLite file has this daemon alone: no claim (no
        write, no fsync, between a commit and its delivery)."""
        if not self._ready_ids:
            return
        picked: list[OutboxEntry] = []
        per_target: collections.Counter[str] = collections.Counter()
        for target, queue in list(self._ready.items()):
            while queue and len(self._holding) + len(picked) < MAX_CONCURRENT_DELIVERIES:
                if self._per_target[target] + per_target[target] >= MAX_DELIVERIES_PER_TARGET:
                    break
                entry = queue.popleft()
                if entry.action_id in self._ready_ids:  # else a query started it
                    self._ready_ids.discard(entry.action_id)
                    picked.append(entry)
                    per_target[target] += 1
            if not queue:
                del self._ready[target]
        if not picked:
            return
        if self._store.shared:
            only = OutboxFilter(ids=[entry.action_id for entry in picked])
            claimed = await self._claim(self._due_now(), len(picked), only)
            ids = {entry.action_id for entry in claimed}
            if len(ids) < len(picked):
                self._query_needed = True
            picked = [entry for entry in picked if entry.action_id in ids]
        for entry in picked:
            self._start(entry)

    def _start(self, entry: OutboxEntry) -> None:
        skip = self._finished_during_query
        if entry.action_id in self._in_flight or entry.action_id in skip or self._stopping:
            return
        if self._per_target[entry.target] >= MAX_DELIVERIES_PER_TARGET:
            return
        self._ready_ids.discard(entry.action_id)
        self._per_target[entry.target] += 1
        self._holding.add(entry.action_id)
        task = asyncio.create_task(self._deliver(entry))
        self._in_flight[entry.action_id] = task
        task.add_done_callback(functools.partial(self._finished, entry))

    def _release_slot(self, entry: OutboxEntry) -> None:
        """The request of ``entry`` is over: its target may take another one while the
        outcome is being recorded (``entry`` itself stays in flight, so it is not picked
        again until its outcome is committed)."""
        if entry.action_id in self._holding:
            self._holding.discard(entry.action_id)
            self._per_target[entry.target] -= 1
            self._wakeup.set()

    def _finished(self, entry: OutboxEntry, _task: asyncio.Task[None]) -> None:
        self._release_slot(entry)
        self._in_flight.pop(entry.action_id, None)
        if self._scanning:
            self._finished_during_query.add(entry.action_id)
        if len(self._recently_finished) >= MAX_RECENTLY_FINISHED:
            del self._recently_finished[next(iter(self._recently_finished))]
        self._recently_finished[entry.action_id] = None
        self._wakeup.set()

    async def _sleep_until_due(self) -> None:
        """Sleep until a wake-up (a hand-over, ``wake()``, a slot freed, a delivery
        finished), the next retry falls due, a hold ends or the next periodic look."""
        if self._wakeup.is_set():  # woken while dispatching: look again at once
            return
        timeout = self._idle_poll_s - (time.monotonic() - self._last_query)
        if self._query_at is not None:
            timeout = min(timeout, (self._query_at - self._due_now()).total_seconds())
        if self._held_until:
            timeout = min(timeout, min(self._held_until.values()) - time.monotonic())
        if self._retry_due:
            timeout = min(timeout, min(self._retry_due.values()) - time.monotonic())
        timeout = max(0.0, timeout)
        if timeout > 0:
            # asyncio.timeout, not wait_for: no task per turn of the loop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _deliver(self, entry: OutboxEntry) -> None:
        try:
            await self._deliver_once(entry)
            self._hold_count.pop(entry.action_id, None)
            if self._outage is not None:
                self._outage.recovered()  # its outcome was recorded
        except Exception as exc:
            # the attempt could not even be recorded (e.g. the database is locked or full):
            # hold the action back in memory so it is not resent in a tight loop
            self._hold_count[entry.action_id] += 1
            hold_s = backoff_ceiling_s(
                self._hold_count[entry.action_id], base_s=HOLD_BASE_S, cap_s=HOLD_CAP_S
            )
            self._held_until[entry.action_id] = time.monotonic() + hold_s
            if self._reported(exc):
                return
            log.exception(
                "delivering %s %s failed before its outcome was recorded; holding it %.0f s",
                entry.kind,
                entry.action_id,
                hold_s,
            )

    def _expire_holds(self) -> bool:
        """Forget the holds that have ended; True when there were any."""
        now = time.monotonic()
        ended = [action_id for action_id, until in self._held_until.items() if until <= now]
        for action_id in ended:
            del self._held_until[action_id]
        return bool(ended)

    def _expire_retry_waits(self) -> bool:
        """Forget the monotonic waits of retries that have ended; True when there were any."""
        now = time.monotonic()
        ended = [action_id for action_id, due in self._retry_due.items() if due <= now]
        for action_id in ended:
            del self._retry_due[action_id]
        return bool(ended)

    def _due_now(self) -> datetime:
        """The time stored due times are compared with (see ``JumpDetector.due_now``)."""
        return self._time.due_now(self._time.now())

    def _excluded_ids(self) -> tuple[str, ...]:
        """Actions not to pick: in flight, held back after a failure to record, or a retry
        whose delay has not passed on the monotonic clock."""
        if self._expire_holds() | self._expire_retry_waits():
            self._query_needed = True
        return (*self._in_flight, *self._held_until, *self._retry_due)

    async def _deliver_once(self, entry: OutboxEntry) -> None:
        target = self._targets().get(entry.target)
        attempt_no = entry.attempts + 1
        started = self._time.now()
        if entry.kind == "release" and not await self._store.begin_attempt(
            entry.action_id, started, daemon_id=self.daemon_id
        ):
            self._release_slot(entry)  # cancelled since it was read: never sent
            log.info(
                "release %s is no longer pending (cancelled) or another daemon took it over:"
                " not sent",
                entry.action_id,
                extra={"action_id": entry.action_id, "rule_id": entry.rule_id},
            )
            return
        t0 = time.perf_counter()
        if target is None:
            outcome = AttemptOutcome(None, f"target {entry.target!r} is not configured", True)
        else:
            outcome = await self._attempt(entry, target)
        latency_ms = (time.perf_counter() - t0) * 1000
        self._release_slot(entry)
        if target is not None:
            self.metrics.attempt(entry.target, outcome.status_code, latency_ms / 1000)
        finished = self._time.now()  # backoff and Retry-After count from the answer
        status, next_at, dead_reason = self._next_state(
            entry, target, outcome, attempt_no, finished
        )
        waits_from = time.monotonic()
        attempt = Attempt(
            entry.action_id,
            attempt_no,
            started,
            round(latency_ms, 3),
            outcome.status_code,
            outcome.error,
        )
        alert = None
        if status == "dead":
            alert = self._dead_letter_alert(entry, attempt_no, dead_reason, outcome, finished)
        await self._record(AttemptRecord(attempt, status, next_at, dead_reason, alert))
        if alert is not None:  # committed with the dead letter
            self.metrics.actions.labels(target=alert.target, status="queued").inc()
            self.hand_over([alert], entry.request_id)
        if next_at is not None:  # a retry: the outbox is looked at again when it falls due
            self._note_due(next_at)
            if len(self._retry_due) < MAX_TIMED_RETRIES:
                delay_s = (next_at - finished).total_seconds()
                self._retry_due[entry.action_id] = waits_from + delay_s
        self._log(entry, status, outcome, attempt_no)

    def _dead_letter_alert(
        self,
        entry: OutboxEntry,
        attempts: int,
        reason: DeadReason | None,
        outcome: AttemptOutcome,
        at: datetime,
    ) -> QueuedAction | None:
        """The ``dead_letter`` alert of ``entry`` (``alerts.dead_letter_alert``), or None."""
        alert_target = self._alert_target()
        if alert_target is None:
            return None
        target = self._targets().get(alert_target)
        return dead_letter_alert(
            entry,
            attempts=attempts,
            reason=reason or "dead",
            error=outcome.error,
            alert_target=alert_target,
            slack=target is not None and target.format == "slack",
            action_id=self._new_action_id(),
            at=at,
        )

    async def _record(self, record: AttemptRecord) -> None:
        """Commit ``record``; return once it is durable. Raises what the store raised.

        Records arriving while a group is being committed wait and are committed together
        in the next group (``Store.record_attempts``): one transaction and one fsync for
        many outcomes. A group that fails is committed again one record at a time, so one
        bad record fails only its own delivery."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outcomes.append((record, future))
        if self._recorder is None:
            self._recorder = asyncio.create_task(self._record_groups())
        await future

    async def _record_groups(self) -> None:
        """Commit the waiting records, group after group, until none is left."""
        try:
            while self._outcomes:
                group, self._outcomes = self._outcomes, []
                try:
                    if len(group) == 1:
                        await self._store.record_attempt(group[0][0])
                    else:
                        await self._store.record_attempts([r for r, _ in group])
                except Exception as exc:
                    if len(group) == 1:
                        _settle(group[0][1], exc)
                        continue
                    log.warning("recording %d delivery outcomes together failed", len(group))
                    for record, future in group:
                        try:
                            await self._store.record_attempt(record)
                        except Exception as one:
                            _settle(future, one)
                        else:
                            _settle(future, None)
                else:
                    for _, future in group:
                        _settle(future, None)
        finally:
            self._recorder = None

    async def _attempt(self, entry: OutboxEntry, target: Target) -> AttemptOutcome:
        assert self._session is not None
        secret = self._secrets().get(target.name, "")
        try:
            request = build_request(entry, target, secret, self._clock.now())
        except Exception as exc:  # an unusable secret: no retry can help, a person must
            return AttemptOutcome(None, f"cannot sign the request: {type(exc).__name__}", False)
        timeout = aiohttp.ClientTimeout(total=target.delivery.timeout_s)
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers=dict(request.headers),
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:  # the body is read, not decoded
                    await response.read()
                    return AttemptOutcome(response.status, None, False)
                text = (await response.text(errors="replace"))[:MAX_ERROR_CHARS]
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), self._clock.now()
                )
                return _classify(response.status, text, retry_after)
        except TimeoutError:
            return AttemptOutcome(None, f"timed out after {target.delivery.timeout_s} s", True)
        except aiohttp.ClientError as exc:
            return AttemptOutcome(None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], True)

    def _next_state(
        self,
        entry: OutboxEntry,
        target: Target | None,
        outcome: AttemptOutcome,
        attempt_no: int,
        finished: datetime,
    ) -> tuple[ActionStatus, datetime | None, DeadReason | None]:
        """The action's state after an attempt: its status, when it is due again (a retry)
        and why it died (a dead letter)."""
        if outcome.delivered:
            return "delivered", None, None
        policy = target.delivery if target else DeliveryPolicy()
        # a requeued dead letter gets a fresh allowance of attempts and age
        since = entry.requeued_at or entry.created_at
        age_s = self._time.elapsed_s(since, finished)  # a wall-clock jump is not age
        if not outcome.retryable:
            code = outcome.status_code
            refused = code is not None and 400 <= code < 500
            return "dead", None, "refused" if refused else "not_retryable"
        if attempt_no - entry.attempts_at_requeue >= policy.max_attempts:
            return "dead", None, "attempts_exhausted"
        backoff_s = backoff_delay_s(
            attempt_no, base_s=policy.backoff_base_s, cap_s=policy.backoff_cap_s, rng=self._rng
        )
        delay = retry_delay_s(backoff_s, outcome.retry_after_s, policy.backoff_cap_s)
        if age_s + delay > policy.max_age_s:
            return "dead", None, "too_old"
        return "pending", finished + timedelta(seconds=delay), None

    def _log(
        self, entry: OutboxEntry, status: ActionStatus, outcome: AttemptOutcome, attempt: int
    ) -> None:
        request_id = entry.request_id
        extra = {
            "action_id": entry.action_id,
            "action_kind": entry.kind,
            "target": entry.target,
            "rule_id": entry.rule_id,
            "firing_id": entry.firing_id,
            "attempt": attempt,
            "http_status": outcome.status_code,
            "request_id": request_id,
        }
        if status != "pending":
            self.metrics.actions.labels(target=entry.target, status=status).inc()
        if status == "delivered":
            self.delivered += 1
            log.info(
                "action delivered: %s %s to %s (rule %s, attempt %d, HTTP %s, request %s)",
                entry.kind,
                entry.action_id,
                entry.target,
                entry.rule_id,
                attempt,
                outcome.status_code,
                request_id or "-",
                extra=extra,
            )
        elif status == "dead":
            self.dead += 1
            log.error(
                "action dead-lettered: %s %s to %s (rule %s, request %s) after %d attempt(s): %s",
                entry.kind,
                entry.action_id,
                entry.target,
                entry.rule_id,
                request_id or "-",
                attempt,
                outcome.error,
                extra={**extra, "error": outcome.error},
            )
        else:
            log.warning(
                "action delivery failed, will retry: %s %s to %s (attempt %d): %s",
                entry.kind,
                entry.action_id,
                entry.target,
                attempt,
                outcome.error,
                extra={**extra, "error": outcome.error},
            )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve ``future`` (its waiter may have been cancelled meanwhile)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _classify(status: int, body: str, retry_after_s: float | None) -> AttemptOutcome:
    if 200 <= status < 300:
        return AttemptOutcome(status, None, False)
    error = f"HTTP {status}: {body}" if body else f"HTTP {status}"
    retryable = status in RETRYABLE_STATUS or status >= 500
    return AttemptOutcome(status, error, retryable, retry_after_s)
