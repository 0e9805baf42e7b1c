"""The outbox dispatcher: delivers queued actions, at least once, with retries.

Each due action is POSTed to its target (see ``actions``). A 2xx answer marks it delivered.
Connection errors, timeouts, 408, 429 and 5xx are retried after a delay drawn with "full
jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): uniform in
``[0, min(backoff_cap_s, backoff_base_s * 2**(attempt-1))]``, or the server's
``Retry-After`` (seconds) when it is longer. Any other answer, or running out of attempts
(``max_attempts``) or time (``max_age_s``), makes the action a dead letter, kept with its
last error and visible in ``GET /v1/actions?status=dead``. Nothing is dropped silently.

Delivery is at-least-once: a crash between the receiver's answer and the commit of that
answer means the action is sent again, with the same ``webhook-id`` (and, for a release,
the same ``Idempotency-Key``), so receivers can deduplicate.

Every attempt is recorded (time, latency, HTTP status or error). Actions are delivered
concurrently, so one slow or unreachable target does not hold up the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import aiohttp

from gatekeeper.actions import build_request
from gatekeeper.clock import Clock, format_rfc3339, parse_rfc3339
from gatekeeper.config import DeliveryPolicy, Target
from gatekeeper.metrics import Metrics
from gatekeeper.store import ActionStatus, Attempt, OutboxEntry, OutboxFilter, Store

log = logging.getLogger("gatekeeper.delivery")

RETRYABLE_STATUS = frozenset({408, 429})
MAX_CONCURRENT_DELIVERIES = 64
MAX_DELIVERIES_PER_TARGET = 8
MAX_ERROR_CHARS = 500
MAX_REQUEST_IDS = 100_000
"""At most this many action -> request id notes are kept for the delivery log lines."""
HOLD_BASE_S = 5.0
HOLD_CAP_S = 300.0


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


def backoff_delay_s(policy: DeliveryPolicy, attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), full jitter."""
    ceiling = min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (only the delay-seconds form; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Dispatcher:
    """Delivers due actions from the outbox until stopped.

    ``targets`` and ``secrets`` are read through callables so a config reload is picked up.
    Call ``wake()`` after committing new actions.
    """

    def __init__(
        self,
        store: Store,
        targets: Callable[[], Mapping[str, Target]],
        secrets: Callable[[], Mapping[str, str]],
        clock: Clock,
        *,
        rng: random.Random | None = None,
        idle_poll_s: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._targets = targets
        self._secrets = secrets
        self._clock = clock
        self._rng = rng or random.Random()
        self._idle_poll_s = idle_poll_s
        self._wakeup = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        """Deliveries in progress, from the request to the recorded outcome."""
        self._holding: set[str] = set()
        """Deliveries whose request is not answered yet: they hold a slot of their target
        (``MAX_DELIVERIES_PER_TARGET``) and of ``MAX_CONCURRENT_DELIVERIES``."""
        self._finished_during_query: set[str] = set()
        self._per_target: collections.Counter[str] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._running = False
        self._done = asyncio.Event()
        self._grace_s = 10.0
        self._held_until: dict[str, float] = {}
        self._hold_count: collections.Counter[str] = collections.Counter()
        self.delivered = 0
        self.dead = 0
        self.metrics = metrics or Metrics()
        self._request_ids: dict[str, str] = {}

    def note_request_id(self, action_id: str, request_id: str) -> None:
        """Remember the HTTP request that caused ``action_id``, for its delivery log lines
        (in memory only: after a restart those lines carry no request id)."""
        if len(self._request_ids) >= MAX_REQUEST_IDS:
            del self._request_ids[next(iter(self._request_ids))]
        self._request_ids[action_id] = request_id

    def wake(self) -> None:
        """Look at the outbox now (new actions were committed)."""
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
                    await self._dispatch_due()
                    await self._sleep_until_due()
                except Exception:  # e.g. the database is locked: never let delivery die
                    log.exception("the dispatcher failed; retrying in %.0f s", self._idle_poll_s)
                    await asyncio.sleep(self._idle_poll_s)
        finally:
            await self._finish_in_flight()
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

    async def _dispatch_due(self) -> None:
        """Start deliveries of due actions, per target, up to the concurrency limits."""
        # A delivery that finishes while a query runs may be read as still pending: such
        # ids land in _finished_during_query and are skipped (no duplicate send).
        self._finished_during_query = set()
        now = self._clock.now()
        configured = sorted(self._targets())
        buckets = [OutboxFilter(target=name) for name in configured]
        buckets.append(OutboxFilter(not_targets=configured))  # targets no longer configured
        for bucket in buckets:
            free = MAX_CONCURRENT_DELIVERIES - len(self._holding)
            if bucket.target is not None:
                free = min(free, MAX_DELIVERIES_PER_TARGET - self._per_target[bucket.target])
            if free <= 0 or self._stopping:
                continue
            only = replace(bucket, exclude_ids=self._excluded_ids())
            for entry in await self._store.due_actions(now, free, only=only):
                self._start(entry)

    def _start(self, entry: OutboxEntry) -> None:
        skip = self._finished_during_query
        if entry.action_id in self._in_flight or entry.action_id in skip or self._stopping:
            return
        if self._per_target[entry.target] >= MAX_DELIVERIES_PER_TARGET:
            return
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
        self._finished_during_query.add(entry.action_id)
        self._wakeup.set()

    async def _sleep_until_due(self) -> None:
        """Sleep until the next attempt is due, a delivery finishes or ``wake()`` is called.

        Actions being delivered, and targets at their concurrency limit, are left out of
        "next due", so a hanging receiver does not make this loop spin."""
        if self._wakeup.is_set():  # woken while dispatching: look again at once
            return
        timeout = self._idle_poll_s
        if len(self._holding) < MAX_CONCURRENT_DELIVERIES:
            full = [t for t, n in self._per_target.items() if n >= MAX_DELIVERIES_PER_TARGET]
            only = OutboxFilter(not_targets=full, exclude_ids=self._excluded_ids())
            next_at = await self._store.next_attempt_at(only=only)
            if next_at is not None:
                wait = (parse_rfc3339(next_at) - self._clock.now()).total_seconds()
                timeout = max(0.0, min(timeout, wait))
            if self._held_until:
                wait = min(self._held_until.values()) - time.monotonic()
                timeout = max(0.0, min(timeout, wait))
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    async def _deliver(self, entry: OutboxEntry) -> None:
        try:
            await self._deliver_once(entry)
            self._hold_count.pop(entry.action_id, None)
        except Exception:
            # the attempt could not even be recorded (e.g. the database is locked or full):
            # hold the action back in memory so it is not resent in a tight loop
            self._hold_count[entry.action_id] += 1
            hold_s = min(HOLD_CAP_S, HOLD_BASE_S * 2 ** (self._hold_count[entry.action_id] - 1))
            self._held_until[entry.action_id] = time.monotonic() + hold_s
            log.exception(
                "delivering %s %s failed before its outcome was recorded; holding it %.0f s",
                entry.kind,
                entry.action_id,
                hold_s,
            )

    def _excluded_ids(self) -> tuple[str, ...]:
        """Actions not to pick: in flight, or held back after a failure to record."""
        now = time.monotonic()
        for action_id, until in list(self._held_until.items()):
            if until <= now:
                del self._held_until[action_id]
        return (*self._in_flight, *self._held_until)

    async def _deliver_once(self, entry: OutboxEntry) -> None:
        target = self._targets().get(entry.target)
        attempt_no = entry.attempts + 1
        started = self._clock.now()
        t0 = time.perf_counter()
        if target is None:
            outcome = AttemptOutcome(None, f"target {entry.target!r} is not configured", True)
        else:
            outcome = await self._attempt(entry, target)
        latency_ms = (time.perf_counter() - t0) * 1000
        self._release_slot(entry)
        if target is not None:
            self.metrics.attempt(entry.target, outcome.status_code, latency_ms / 1000)
        finished = self._clock.now()  # backoff and Retry-After count from the answer
        status, next_at = self._next_state(entry, target, outcome, attempt_no, finished)
        await self._store.record_attempt(
            Attempt(
                entry.action_id,
                attempt_no,
                format_rfc3339(started),
                round(latency_ms, 3),
                outcome.status_code,
                outcome.error,
            ),
            status,
            next_at,
        )
        self._log(entry, status, outcome, attempt_no)

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
                text = (await response.text(errors="replace"))[:MAX_ERROR_CHARS]
                return _classify(response.status, text, response.headers.get("Retry-After"))
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
    ) -> tuple[ActionStatus, str | None]:
        if outcome.delivered:
            return "delivered", None
        policy = target.delivery if target else DeliveryPolicy()
        # a requeued dead letter gets a fresh allowance of attempts and age
        since = parse_rfc3339(entry.requeued_at or entry.created_at)
        age_s = (finished - since).total_seconds()
        if not outcome.retryable or attempt_no - entry.attempts_at_requeue >= policy.max_attempts:
            return "dead", None
        delay = backoff_delay_s(policy, attempt_no, self._rng)
        if outcome.retry_after_s is not None:
            delay = max(delay, min(outcome.retry_after_s, policy.backoff_cap_s))
        if age_s + delay > policy.max_age_s:
            return "dead", None
        return "pending", format_rfc3339(finished + timedelta(seconds=delay))

    def _log(
        self, entry: OutboxEntry, status: ActionStatus, outcome: AttemptOutcome, attempt: int
    ) -> None:
        request_id = self._request_ids.get(entry.action_id)
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
        if status == "delivered":  # a dead letter keeps it: it may be requeued
            self._request_ids.pop(entry.action_id, None)
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


def _classify(status: int, body: str, retry_after: str | None) -> AttemptOutcome:
    if 200 <= status < 300:
        return AttemptOutcome(status, None, False)
    error = f"HTTP {status}: {body}" if body else f"HTTP {status}"
    retryable = status in RETRYABLE_STATUS or status >= 500
    return AttemptOutcome(status, error, retryable, parse_retry_after(retry_after))
