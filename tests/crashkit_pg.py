"""Crash harness, failover mode: three daemons on one PostgreSQL database, ``kill -9`` of any.

Shared by ``tests/test_crash.py`` (a short CI run) and ``bench/soak_crash.py --postgres``.

``PgCrashRun`` is a ``crashkit.CrashRun`` whose deployment points ``database:`` at a
PostgreSQL schema and sets a short ``delivery_lease_s`` (``LEASE_S``; the config wants it
``LEASE_MARGIN_S`` = 5 s above every target's ``timeout_s``, so 1 s + 5 s). It keeps
``DAEMONS`` daemon subprocesses (slots a, b, c, each with its log ``daemon-<slot>.log``)
running on that one schema: a slot whose daemon exits, killed by the harness or refused at
start because another daemon holds the database (``DatabaseInUse``: the one-daemon lock),
starts one again after a short back-off (and, while some daemon serves, once no other slot
is starting: starts take turns, as they cost CPU). So while one daemon decides on a database at a
time, one daemon serves and the other two are standbys trying to start, and a kill of the
serving one is a failover to a standby; once several daemons serve one database, all three
serve and a kill leaves two serving. The harness is the same in both regimes and reports the
one it saw (the most daemons healthy at once).

The clients are ``crashkit``'s: two post facts (single facts and batches; half carry an
``Idempotency-Key``; each once-rule's trigger batch posted until acknowledged) and the bank's
back office cancels held releases and settles delivered ones. Each request goes to a random
healthy daemon (``/healthz`` answered 200); a keyed request cut off by a kill, or answered
503, goes at once to another daemon with the same key, body and X-Request-Id until it is
acknowledged (so a retry is applied once at most); a request without a key that was cut off
is left so (applied or not). The clients go on through every kill; no survivor is restarted.

Each *cycle* kills one daemon with ``SIGKILL``, chosen by the cycle's mode:

- ``serving``: a daemon that serves (answers ``/healthz``), after a random delay;
- ``delivering``: a daemon holding claims (``outbox.claimed_by``) on actions it is
  delivering, caught by polling the outbox (a serving daemon if none is seen in time);
- ``after_fire``: the daemon that just acknowledged a fact that fires a rule;
- ``mid_request``: the daemon a large batch was sent to, a few milliseconds after;
- ``startup``: a daemon still starting (a standby, under the one-daemon lock);
- ``timer``: any running daemon, serving or starting, after a random delay.

At the end no daemon is killed any more: keyed requests still cut off and triggers not yet
acknowledged are posted until acknowledged, the bank stops holding, the outbox is drained,
and every daemon is stopped with SIGTERM (one that serves exits 0). Then the schema's tables
are read (``read_postgres``) and ``crashkit.check`` checks every guarantee of the SQLite
harness (acknowledged facts all in ``fact_log``, once-rules fired at most once, each action
delivered under one stable id, a release's Idempotency-Key its id, no escrow over its limit,
the ledger reconciled...), and ``check_failover`` the failover's own:

- every action the killed daemon had claimed (an attempt in flight) and that was not
  delivered or cancelled before reached the receiver again within ``LEASE_S`` +
  ``RESUME_SLACK_S`` of the kill; when no other daemon served then (one daemon at a time),
  of when one began to serve (it released the claims as it took the database over); and
  from a later kill of a serving daemon when one came first (``_deadline``);
- no daemon exited without being killed or stopped, other than refused at start;
- the last daemons stopped with SIGTERM exit 0.

Every random choice comes from one seed (as in ``crashkit``); timing varies from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import dict_row

if __package__:
    from .crashkit import (
        ONCE_RULES,
        TABLE_QUERIES,
        TASKS,
        CrashFailure,
        CrashRun,
        Posted,
        Receipt,
        Report,
        Tables,
    )
else:  # bench/soak_crash.py imports the harness from tests/ as top-level modules
    from crashkit import (
        ONCE_RULES,
        TABLE_QUERIES,
        TASKS,
        CrashFailure,
        CrashRun,
        Posted,
        Receipt,
        Report,
        Tables,
    )

DAEMONS = 3
TIMEOUT_S = 1.0
"""Every target's ``timeout_s`` (the receiver answers within ``RECEIVER_DELAY_S``)."""
LEASE_S = 6.0
"""``delivery_lease_s``: the shortest the config allows with ``TIMEOUT_S`` (5 s more)."""
RESUME_SLACK_S = 2.0
"""An action a killed daemon had claimed is sent again within ``LEASE_S`` plus this (the
survivor's next look at the outbox, the action's retry back-off, a loaded machine)."""
RECEIVER_DELAY_S = 0.15
"""The receiver's longest delay before answering: attempts in flight last long enough for a
kill to catch some."""
RESTART_S = (0.1, 0.4)
"""Back-off before a killed daemon's slot starts one again, seconds (uniform)."""
REFUSED_RESTART_S = (0.2, 0.6)
"""Back-off after a daemon was refused at start (another daemon holds the database)."""
SERVING_TIMEOUT_S = 40.0
"""How long the run waits for some daemon to serve before it gives up (``CrashFailure``)."""
REFUSAL = "served by another gatekeeper daemon"
"""What a daemon refused at start by the one-daemon lock says (``DatabaseInUse``)."""

PG_MODES = ("serving", "delivering", "after_fire", "mid_request", "startup", "timer")
PG_MODE_WEIGHTS = (3, 3, 2, 2, 1, 2)


@dataclass
class Slot:
    """One of the daemons: its current process (None between two), where it listens,
    whether it serves (``/healthz`` answered 200) and its ``daemon_id``, and counts."""

    name: str
    log_path: Path
    log_file: Any = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    healthy: bool = False
    daemon_id: str | None = None
    killing: bool = False
    starts: int = 0
    refused: int = 0
    killed: int = 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.killing


@dataclass
class Kill:
    """One SIGKILL: when (``time.monotonic()``), of which daemon, whether it served and
    another one did, and the pending actions it had claimed (their attempts in flight)
    right after it died."""

    cycle: int
    mode: str
    slot: str
    pid: int
    at: float
    serving: bool
    others_serving: bool
    claimed: list[str] = field(default_factory=list)


def read_postgres(url: str) -> Tables:
    """The tables of the PostgreSQL database (schema) at ``url``, read after the daemons
    stopped, as ``crashkit.read_sqlite`` reads a SQLite file."""
    with psycopg.connect(url, row_factory=dict_row) as db:
        rows = {name: list(db.execute(sql)) for name, sql in TABLE_QUERIES.items()}
    return Tables(**rows)


def _claimed_by(claimer: str, pid: int, daemon_id: str | None) -> bool:
    """Whether ``outbox.claimed_by`` names the daemon of process ``pid`` (its ``daemon_id``
    when known, else the default one, ``<hostname>:<pid>:<hex>``)."""
    if daemon_id is not None and claimer == daemon_id:
        return True
    parts = claimer.split(":")
    return len(parts) >= 3 and parts[-2] == str(pid)


class PgCrashRun(CrashRun):
    """A failover crash run in ``workdir`` on the empty PostgreSQL database (schema) at
    ``database_url``: ``await run()`` returns the checked ``Report``. Options as
    ``CrashRun``'s, plus ``daemons`` (how many) and ``lease_s`` (``delivery_lease_s``)."""

    outage_statuses = frozenset({503})

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        *,
        seed: int,
        cycles: int,
        daemons: int = DAEMONS,
        lease_s: float = LEASE_S,
        **options: Any,
    ) -> None:
        options.setdefault("max_window_s", 0.6)
        super().__init__(workdir, seed=seed, cycles=cycles, **options)
        self.database_url = database_url
        self.lease_s = lease_s
        self.receiver.max_delay_s = RECEIVER_DELAY_S
        self.slots = [Slot(name, workdir / f"daemon-{name}.log") for name in "abcdefghij"[:daemons]]
        self.log_path = workdir
        self.kill_log: list[Kill] = []
        self.acked_at: list[float] = []
        self.served_from: list[float] = []
        """When a daemon began to serve (its first ``/healthz`` answered 200)."""
        self.max_healthy = 0
        self.unexpected_exits = 0
        self.cycle = 0
        self.keeper_rng = random.Random(seed + 3)
        self._closing = False
        self._clients_stop = asyncio.Event()
        self._cue = asyncio.Event()
        self._cue_mode: str | None = None
        self._cue_slot: Slot | None = None
        self._outbox_db: psycopg.AsyncConnection[Any] | None = None
        self.tables = Tables([], [], [], [], [], [])

    # -- the deployment and the daemons -----------------------------------------------------

    def _write_deployment(self) -> None:
        super()._write_deployment()
        text = self.config_path.read_text()
        for old, new in (
            ("database: state/gatekeeper.db\n", f"database: {json.dumps(self.database_url)}\n"),
            (" timeout_s: 5}", f" timeout_s: {TIMEOUT_S:g}}}"),
        ):
            assert old in text, (old, text)
            text = text.replace(old, new)
        self.config_path.write_text(text + f"delivery_lease_s: {self.lease_s:g}\n")

    async def _keep(self, slot: Slot) -> None:
        """Keep a daemon running in ``slot`` until the run closes: start one, watch its
        ``/healthz``, and when it exits account for how, then start another after a
        back-off. While some daemon serves, one slot starts at a time (a start costs a
        second or more of CPU; with the one-daemon lock the standbys take turns)."""
        while not self._closing:
            while self._serving() and any(
                s is not slot and s.running() and not s.healthy for s in self.slots
            ):
                await asyncio.sleep(0.02)
            if self._closing:
                return
            proc, slot.url = self._spawn(log_file=slot.log_file)
            slot.proc, slot.starts = proc, slot.starts + 1
            slot.healthy, slot.daemon_id, slot.killing = False, None, False
            next_look = 0.0
            while proc.poll() is None:
                if not slot.killing and not self._closing and time.monotonic() >= next_look:
                    await self._look(slot)
                    next_look = time.monotonic() + (0.5 if slot.healthy else 0.05)
                await asyncio.sleep(0.02)
            slot.healthy = False
            if self._closing:
                return
            refused = self._exited(slot, proc)
            await asyncio.sleep(
                self.keeper_rng.uniform(*(REFUSED_RESTART_S if refused else RESTART_S))
            )

    async def _look(self, slot: Slot) -> None:
        """Ask the slot's daemon ``/healthz``: it serves when it answers 200."""
        assert self._session is not None
        healthy, daemon_id = False, slot.daemon_id
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with self._session.get(
                slot.url + "/healthz", timeout=aiohttp.ClientTimeout(total=3)
            ) as response:
                healthy = response.status == 200
                if healthy:
                    daemon_id = (await response.json()).get("daemon_id")
        if slot.killing or self._closing:
            return
        if healthy and not slot.healthy:
            self.served_from.append(time.monotonic())
        slot.healthy, slot.daemon_id = healthy, daemon_id
        self.max_healthy = max(self.max_healthy, sum(1 for s in self.slots if s.healthy))

    def _exited(self, slot: Slot, proc: subprocess.Popen[bytes]) -> bool:
        """Account for an exit of the slot's daemon; True when it was refused at start."""
        if slot.killing:
            slot.killing = False
            slot.killed += 1
            return False
        output = self._output_of(slot, proc)
        if REFUSAL in output:
            slot.refused += 1
            return True
        self.unexpected_exits += 1
        last = " | ".join(output.strip().splitlines()[-3:])
        self.problems.append(
            f"daemon {slot.name} (pid {proc.pid}) exited with {proc.returncode} unasked: {last}"
        )
        return False

    def _output_of(self, slot: Slot, proc: subprocess.Popen[bytes]) -> str:
        """What the daemon of ``proc`` wrote to the slot's log (after its start line)."""
        text = slot.log_path.read_text(errors="replace")
        marker = f"start on port {slot.url.rsplit(':', 1)[-1]}\n"
        return text[text.rfind(marker) + len(marker) :] if marker in text else text[-2000:]

    def _serving(self) -> list[Slot]:
        return [s for s in self.slots if s.healthy and s.running()]

    async def _pick(self, timeout_s: float = SERVING_TIMEOUT_S) -> Slot | None:
        """A random daemon that serves, waiting up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        while not (serving := self._serving()):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.rng.choice(serving)

    async def _serving_one(self) -> Slot:
        slot = await self._pick()
        if slot is None:
            tails = "\n".join(
                f"--- {s.log_path.name}\n{self._tail(s.log_path)}" for s in self.slots
            )
            raise CrashFailure(f"no daemon served for {SERVING_TIMEOUT_S:.0f} s\n{tails}")
        return slot

    @staticmethod
    def _tail(path: Path, lines: int = 12) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- clients ----------------------------------------------------------------------------

    async def _post_any(
        self, posted: Posted, cue: str | None = None, until: asyncio.Event | None = None
    ) -> Slot | None:
        """POST ``posted`` to a serving daemon; when keyed and cut off (or answered 503),
        again to another, until acknowledged or ``until`` is set. Returns the daemon that
        acknowledged it, None when it was not (a keyed request: after ``SERVING_TIMEOUT_S``).
        ``cue``: the mode waiting for this request (``mid_request``: set the cue as it is
        sent; ``after_fire``: when it is acknowledged)."""
        deadline = time.monotonic() + SERVING_TIMEOUT_S
        while True:
            slot = await self._pick()
            if slot is None:
                self.problems.append(f"no daemon served to take request {posted.request_id}")
                return None
            if cue == "mid_request" and not self._cue.is_set():
                self._cue_slot = slot
                self._cue.set()
            if await self._post(slot.url, posted):
                self.acked_at.append(time.monotonic())
                if cue == "after_fire" and not self._cue.is_set():
                    self._cue_slot = slot
                    self._cue.set()
                return slot
            outage = posted.status is None or posted.status in self.outage_statuses
            if not outage or posted.idempotency_key is None:
                return None
            if (until is not None and until.is_set()) or time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)

    async def _client(self, wid: int) -> None:
        """Post facts until the clients stop; client 0 posts the due triggers and the
        requests a cycle's mode waits for."""
        stop = self._clients_stop
        while not stop.is_set():
            cycle = self.cycle
            j = self._due_trigger(cycle) if wid == 0 else None
            mode = self._cue_mode if wid == 0 and not self._cue.is_set() else None
            if j is not None:
                cue = "after_fire" if mode == "after_fire" else None
                await self._post_any(self._trigger_request(cycle, j), cue, stop)
            elif mode == "mid_request":
                posted = self._noise_request(cycle, self.rng.randint(30, 80))
                posted.purpose = "large"
                await self._post_any(posted, mode, stop)
            elif mode == "after_fire":
                k = self.rng.randrange(TASKS)
                fact = self._fact("task", f"T-{k}", status="completed")
                await self._post_any(self._request(cycle, "fire", [fact]), mode, stop)
            else:
                await self._post_any(self._noise_request(cycle), None, stop)
            await asyncio.sleep(self.rng.uniform(0, self.pause_s))

    async def _office(self) -> None:
        """The bank's back office (``CrashRun._office_round``) at a random serving daemon
        each round, until the clients stop."""
        stop = self._clients_stop
        while not stop.is_set():
            slot = await self._pick(timeout_s=5.0)
            if slot is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                    await self._office_round(slot.url, stop)
            await asyncio.sleep(self.office_rng.uniform(0.005, 0.03))

    # -- cycles -----------------------------------------------------------------------------

    def plan_modes(self) -> list[str]:
        """The cycles' kill modes: every mode at least once (when there are enough cycles)."""
        modes = list(PG_MODES[: min(len(PG_MODES), self.cycles)])
        modes += self.rng.choices(PG_MODES, PG_MODE_WEIGHTS, k=self.cycles - len(modes))
        self.rng.shuffle(modes)
        return modes

    async def _claims(self) -> list[tuple[str, str]]:
        """(action id, claimed_by) of every pending action claimed for delivery (none when
        the database does not answer: the next look connects again)."""
        try:
            if self._outbox_db is None:
                self._outbox_db = await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True
                )
            cursor = await self._outbox_db.execute(
                "SELECT action_id, claimed_by FROM outbox"
                " WHERE status = 'pending' AND claimed_by IS NOT NULL"
            )
            return [(str(a), str(c)) for a, c in await cursor.fetchall()]
        except psycopg.Error as exc:
            self.log(f"the outbox's claims could not be read: {exc}")
            if self._outbox_db is not None:
                await self._outbox_db.close()
            self._outbox_db = None
            return []

    async def _victim(self, mode: str) -> Slot | None:
        """The daemon a ``serving``, ``delivering``, ``startup`` or ``timer`` cycle kills."""
        window = self.rng.uniform(0.05, self.max_window_s)
        if mode == "delivering":  # hunt for an attempt in flight
            deadline = time.monotonic() + max(window, 1.0)
            while time.monotonic() < deadline:
                claimers = {c for _, c in await self._claims()}
                holding = [
                    s
                    for s in self._serving()
                    if any(_claimed_by(c, s.proc.pid, s.daemon_id) for c in claimers if s.proc)
                ]
                if holding:
                    return self.rng.choice(holding)
                await asyncio.sleep(0.01)
            return await self._pick()
        await asyncio.sleep(window)
        if mode == "startup":
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                starting = [s for s in self.slots if s.running() and not s.healthy]
                if starting:
                    return self.rng.choice(starting)
                await asyncio.sleep(0.01)
        if mode in ("timer", "startup"):
            running = [s for s in self.slots if s.running()]
            return self.rng.choice(running) if running else None
        return await self._pick()

    async def _pg_cycle(self, index: int, mode: str) -> None:
        self.cycle = index
        await self._serving_one()
        victim: Slot | None
        if mode in ("after_fire", "mid_request"):
            self._cue.clear()
            self._cue_slot = None
            self._cue_mode = mode
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cue.wait(), timeout=3.0)
            self._cue_mode = None
            victim = self._cue_slot
            await asyncio.sleep(self.rng.uniform(0.0, 0.03 if mode == "after_fire" else 0.015))
        else:
            victim = await self._victim(mode)
        if victim is None or not victim.running():
            victim = await self._pick()
        if victim is not None:
            await self._kill_slot(victim, index, mode)

    async def _kill_slot(self, slot: Slot, index: int, mode: str) -> None:
        proc = slot.proc
        assert proc is not None
        serving, daemon_id = slot.healthy, slot.daemon_id
        others = any(s is not slot for s in self._serving())
        slot.killing, slot.healthy = True, False
        at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await self._reap(proc, 10.0)
        self.kills[mode] += 1
        kill = Kill(index, mode, slot.name, proc.pid, at, serving, others)
        kill.claimed = [a for a, c in await self._claims() if _claimed_by(c, proc.pid, daemon_id)]
        self.kill_log.append(kill)
        slot.log_file.write(f"===== {time.strftime('%H:%M:%S')} SIGKILL ({mode})\n")
        slot.log_file.flush()

    async def _finish_pg(self, clients: list[asyncio.Task[None]]) -> None:
        """No more kills: stop the clients, post every cut-off keyed request and every
        trigger not yet acknowledged until acknowledged, let the bank take what it held,
        drain the outbox, settle what is left, then SIGTERM every daemon."""
        self._clients_stop.set()
        await asyncio.gather(*clients)
        for _ in range(3):
            for posted in list(self.retry_queue):
                await self._post_any(posted)
        for posted in self.retry_queue:
            self.problems.append(f"keyed request {posted.request_id} was never acknowledged")
        for j in range(ONCE_RULES):
            for _ in range(5):
                if j in self.trigger_acked:
                    break
                await self._post_any(self._trigger_request(self.cycles, j))
            if j not in self.trigger_acked:
                self.problems.append(f"the trigger of once-rule {j} was never acknowledged")
        self.receiver.hold_rules = frozenset()
        await self._drain((await self._serving_one()).url)
        await self._office_round((await self._serving_one()).url)
        self._closing = True
        serving = [s for s in self.slots if s.healthy and s.running()]
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is None:
                continue
            code = await self._reap(slot.proc, 30.0)
            if slot in serving and code != 0:
                self.problems.append(
                    f"daemon {slot.name} exited with {code} on SIGTERM (expected 0)"
                )
            if slot in serving:
                self.sigterm_exit = code

    async def run(self) -> Report:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.receiver.start()
        self._write_deployment()
        for slot in self.slots:
            slot.log_file = slot.log_path.open("a")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        keepers = [asyncio.create_task(self._keep(s), name=f"keep-{s.name}") for s in self.slots]
        clients: list[asyncio.Task[None]] = []
        try:
            await self._serving_one()
            clients = [asyncio.create_task(self._client(w)) for w in range(self.workers)]
            clients.append(asyncio.create_task(self._office()))
            for index, mode in enumerate(self.plan_modes()):
                await self._pg_cycle(index, mode)
            await self._finish_pg(clients)
        finally:
            self._closing = True
            self._clients_stop.set()
            for task in clients:
                task.cancel()
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
                    await self._reap(slot.proc, 10.0)
            for task in [*clients, *keepers]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._outbox_db is not None:
                await self._outbox_db.close()
            await self._session.close()
            await self.receiver.stop()
            for slot in self.slots:
                slot.log_file.close()
        self.elapsed_s = time.monotonic() - started
        return self._report()

    # -- the checks -------------------------------------------------------------------------

    def _tables(self) -> Tables:
        self.tables = read_postgres(self.database_url)
        return self.tables

    def _report(self) -> Report:
        report = super()._report()
        check_failover(report, self, self.receiver.receipts, self.tables)
        return report


def check_failover(
    report: Report, run: PgCrashRun, receipts: Iterable[Receipt], tables: Tables
) -> None:
    """The failover's own figures and checks (see the module's docstring), added to
    ``report``: ``notes`` lines, and ``violations`` for an action a killed daemon had
    claimed that was not sent again within the lease (plus ``RESUME_SLACK_S``): within
    ``lease_s`` of the kill when another daemon served then, else of when one began to
    serve (one daemon at a time: the standby that took over released the claims as it
    started, however long its start took)."""
    v = report.violations
    status = {a["action_id"]: a["status"] for a in tables.outbox}
    arrivals: dict[str, list[Receipt]] = {}
    for r in receipts:
        if r.webhook_id is not None:
            arrivals.setdefault(r.webhook_id, []).append(r)
    resumed: list[float] = []  # from the kill
    resumed_served: list[float] = []  # from when another daemon served
    done_before = cancelled = 0
    for kill in run.kill_log:
        for action_id in kill.claimed:
            got = arrivals.get(action_id, [])
            after = [r.at for r in got if r.at > kill.at]
            if after:
                again = min(after)
                last, deadline = _deadline(run, kill, again)
                resumed.append(again - kill.at)
                resumed_served.append(again - _takeover(run, last))
                if again > deadline:
                    v.append(
                        f"action {action_id}, claimed by daemon {kill.slot} (pid {kill.pid}) "
                        f"killed in cycle {kill.cycle}, was sent again {again - kill.at:.2f} s "
                        f"after the kill, {again - _takeover(run, last):.2f} s after another "
                        f"daemon served (lease {run.lease_s:g} s)"
                    )
            elif status.get(action_id) == "cancelled":
                cancelled += 1
            elif status.get(action_id) == "delivered" and any(
                200 <= r.status < 300 for r in got if r.at <= kill.at
            ):
                done_before += 1  # its answer came just before the kill
            else:
                v.append(
                    f"action {action_id}, claimed by daemon {kill.slot} killed in cycle "
                    f"{kill.cycle}, never reached the receiver after the kill "
                    f"(it is {status.get(action_id)})"
                )
    serving_kills = [k for k in run.kill_log if k.serving]
    gaps: list[tuple[float, Kill]] = []  # kill -> next acknowledged request
    for kill, following in zip(serving_kills, [*serving_kills[1:], None], strict=True):
        later = [t for t in run.acked_at if t > kill.at]
        if later and (following is None or min(later) < following.at):
            gaps.append((min(later) - kill.at, kill))
    worst = max(gaps, key=lambda g: g[0], default=None)
    takeovers = [_takeover(run, k) - k.at for k in serving_kills if not k.others_serving]
    starts = sum(s.starts for s in run.slots)
    refused = sum(s.refused for s in run.slots)
    killed = sum(s.killed for s in run.slots)
    regime = (
        "one at a time (the one-daemon lock: standbys refused at start, DatabaseInUse)"
        if run.max_healthy <= 1
        else f"{run.max_healthy} at once"
    )
    report.figures.update(
        daemons=len(run.slots),
        serving_at_once=run.max_healthy,
        refused=refused,
        serving_kills=len(serving_kills),
        resumed=len(resumed),
        resumed_max_s=max(resumed, default=0.0),
        takeover_max_s=max(takeovers, default=0.0),
    )
    report.notes += [
        (
            "daemons (PostgreSQL)",
            f"{len(run.slots)}, delivery_lease_s {run.lease_s:g}; {starts} starts, {killed} "
            f"killed, {refused} refused at start (DatabaseInUse), {run.unexpected_exits} "
            "other exits",
        ),
        ("serving", regime),
        (
            "failover",
            f"{len(serving_kills)} kills of a serving daemon ({len(takeovers)} of the only "
            f"one: another served after {_spread(takeovers)}); next acknowledged request "
            f"after {_spread([g for g, _ in gaps])}"
            + (f" (cycle {worst[1].cycle}, {worst[1].mode})" if worst else "")
            + f" ({len(serving_kills) - len(gaps)} kills followed by another before one)",
        ),
        (
            "in-flight resumed",
            f"{len(resumed)} claimed actions of {sum(1 for k in run.kill_log if k.claimed)} "
            f"killed daemons sent again after {_spread(resumed)} from the kill, "
            f"{_spread(resumed_served)} from when another daemon served (bound: lease "
            f"{run.lease_s:g} s + {RESUME_SLACK_S:g} s); {cancelled} cancelled meanwhile, "
            f"{done_before} answered just before the kill",
        ),
    ]


def _deadline(run: PgCrashRun, kill: Kill, again: float) -> tuple[Kill, float]:
    """By when an action the daemon of ``kill`` had claimed, sent again at ``again``, had to
    be sent: ``lease_s`` (plus ``RESUME_SLACK_S``) after the kill, or after another daemon
    served if none did then; and counted from a later kill of a serving daemon when one
    came before that (the daemon taking it over may be the one killed). Returns the kill
    the deadline counts from, and the deadline."""
    while True:
        deadline = max(kill.at + run.lease_s, _takeover(run, kill)) + RESUME_SLACK_S
        later = [k for k in run.kill_log if k.serving and kill.at < k.at < min(deadline, again)]
        if not later:
            return kill, deadline
        kill = later[0]


def _takeover(run: PgCrashRun, kill: Kill) -> float:
    """When another daemon served after ``kill``: at once if one did, else the first start
    after it (``inf`` if none)."""
    if kill.others_serving:
        return kill.at
    return min((t for t in run.served_from if t > kill.at), default=float("inf"))


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


async def run_pg_crash_test(
    workdir: Path, database_url: str, *, seed: int, cycles: int, **options: Any
) -> Report:
    """Run ``cycles`` failover kill cycles on the empty PostgreSQL schema at
    ``database_url`` in ``workdir`` and return the checked ``Report``."""
    return await PgCrashRun(workdir, database_url, seed=seed, cycles=cycles, **options).run()
