"""Crash harness: the real daemon under ``kill -9``, a real receiver, and the durability checks.

Shared by ``tests/test_crash.py`` (a short CI run) and ``bench/soak_crash.py`` (a long one).

``CrashRun`` runs ``python -m gatekeeper serve`` as a subprocess on a temporary deployment
(``gatekeeper.yaml``, ``rules/``, the database under ``state/``), with every target pointing at
``CrashReceiver``, an aiohttp server on 127.0.0.1 in this process that records every request
it gets (webhook-id, Idempotency-Key, body, the status it answered), verifies its Standard
Webhooks signature, answers 200 or, now and then, 500 (so deliveries are retried), sometimes
after a short delay (so a kill can land between the receiver's answer and the daemon's record
of it). Records live in this process, so they outlive every daemon.

Each *kill cycle* starts the daemon on the same database, waits for ``/healthz`` and streams
facts over HTTP from two concurrent clients (single facts and batches) until it sends
``SIGKILL`` at a moment chosen by the cycle's mode:

- ``timer``: after a random delay, wherever the clients and the outbox happen to be;
- ``after_fire``: right after a fact that fires a rule is acknowledged (the outbox is busy);
- ``mid_request``: a few milliseconds after a large batch was sent (mid-commit, often);
- ``startup``: at a random moment while the daemon starts, before or after ``/healthz``.

A request is *acknowledged* when the daemon answered 200 with its sequence numbers; a request
cut off by the kill is not, and may or may not have been applied. Half the requests carry an
``Idempotency-Key``; those are sent again after the restart (same key, same body) until
acknowledged, and must then be applied exactly once. Each ``fire: once`` rule has a trigger
batch (its milestone approved and its quality gate passed, together) that is posted until
acknowledged, spread over the cycles; noise then flips the same facts to and fro.

Meanwhile a third client, the *bank's back office*, cancels and settles releases over the
API: the bank holds the releases of ``HOLD_RULES`` (answers 500, and now and then 200) and
the back office cancels them while they wait (``POST /v1/actions/{id}/cancel``; a 409 while
an attempt is in flight is expected), and it settles each delivered release once with a
Standard Webhooks signed callback (``POST /v1/settlements/bank``: settled, or failed now
and then), sending a callback the kill cut off again with the same ``webhook-id`` and body,
and replaying an acknowledged one now and then (it must be answered as a replay).

At the end the daemon is restarted once more, the bank stops holding, the outbox is drained
(``GET /v1/actions?status=pending`` until empty) and the daemon is stopped with SIGTERM
(exit 0 expected). Then ``analyse`` reads the SQLite database directly (``fact_log``,
``facts``, ``decisions``, ``rule_state``, ``outbox``, ``ledger_entries``: ``read_sqlite``)
and ``check`` checks every guarantee against them and the receiver's records: see ``check``
for the list. (``tests/crashkit_pg.py`` runs three daemons on PostgreSQL with the same
checks.) The facts the daemon
actually applied (``fact_log`` order, grouped into transactions by request id) are the truth
the expected firings are computed from.

``CrashRun.run_slow_commit`` is a deterministic scenario: the daemon runs through the
``SLOW_COMMIT`` shim (the COMMIT of a transaction that queued actions is held for a while, as
on a slow disk) and is killed before that COMMIT, to check that nothing of an uncommitted
transaction was ever sent.

Every random choice comes from one seed, printed in the summary; timing still varies from
run to run, so a seed reproduces the plan of a run (modes, delays, facts), not its interleaving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import gatekeeper

SECRET = "whsec_" + base64.b64encode(b"gatekeeper-crash-kill-9-secret").decode()
SECRET_ENV = {
    "CRASH_BANK_SECRET": SECRET,
    "CRASH_CHAT_SECRET": SECRET,
    "CRASH_CI_SECRET": SECRET,
    "CRASH_OPS_SECRET": SECRET,
}
PROJECT = "crash"
MODES = ("timer", "after_fire", "mid_request", "startup")
MODE_WEIGHTS = (4, 3, 2, 1)


SLOW_COMMIT = '''\
"""gatekeeper serve with a slow COMMIT (fault injection for tests/crashkit.py): a transaction
that queued actions (it inserted rows into the outbox) waits CRASHKIT_COMMIT_DELAY_S seconds
on the store's writer thread before its COMMIT is sent, as if the disk were slow or the rest
of a large group commit were still being written. Nothing else is changed."""

import os
import sys
import time

from gatekeeper.cli.main import main
from gatekeeper.store import sqlstore

DELAY_S = float(os.environ["CRASHKIT_COMMIT_DELAY_S"])
_flush = sqlstore._Written.flush


def flush(self, version):
    queued = bool(self.outbox)  # the group's rows, then the pause before its COMMIT
    _flush(self, version)
    if queued:
        print(f"crashkit: holding a COMMIT that queued actions for {DELAY_S} s",
              file=sys.stderr, flush=True)
        time.sleep(DELAY_S)


sqlstore._Written.flush = flush
sys.exit(main(sys.argv[1:]))
'''

FactKey = tuple[str, str]
"""(kind, id) of a fact of PROJECT."""
Facts = Mapping[FactKey, Mapping[str, Any]]


# -- the ruleset, in YAML for the daemon and in Python for the checks -------------------------


@dataclass(frozen=True)
class RuleSpec:
    """One rule: its YAML, the facts it reads, and its condition as a Python function.

    A per-item rule (``for_each``) has ``holds_item(facts, item_id)`` instead; ``sets`` is
    the fact ``(kind, id, data)`` a firing records (``set_fact``), which is not an action
    sent (``actions`` lists those)."""

    id: str
    fire: str
    reads: frozenset[FactKey]
    holds: Callable[[Facts], bool]
    actions: tuple[str, ...]
    yaml: str
    release: tuple[str, Decimal] | None = None  # (escrow, amount)
    for_each: str | None = None
    holds_item: Callable[[Facts, str], bool] | None = None
    sets: tuple[str, str, dict[str, Any]] | None = None

    def holds_for(self, facts: Facts, item: str) -> bool:
        """Whether the condition holds for instance ``item`` (``""``: a plain rule)."""
        if self.holds_item is not None:
            return self.holds_item(facts, item)
        return self.holds(facts)


ESCROW_LIMITS = {"escrow-a": Decimal("500.00"), "escrow-b": Decimal("750.00")}
ONCE_RULES = 10
TASKS = 6
MILESTONES = ONCE_RULES
QUALITY_GATES = 2


HOLD_RULES = frozenset({f"{PROJECT}/release-{j}" for j in (1, 4, 7)})
"""The once-rules whose releases the bank holds (answers 500, and 200 with probability
``CrashReceiver.hold_accept_rate``) until the end of the run, so the back office can cancel
them while they wait."""
FAIL_RATE = 0.3
"""How often the back office's settlement of a delivered release says it failed."""


def _release_of(j: int) -> tuple[str, str]:
    """Once-rule ``j`` releases 100.00 from escrow-a (j < 5) or 150.00 from escrow-b: the ten
    releases add up to exactly each escrow's limit, so correct behaviour never exceeds it."""
    return ("escrow-a", "100.00") if j < ONCE_RULES // 2 else ("escrow-b", "150.00")


def _status(facts: Facts, kind: str, id: str) -> Any:
    data = facts.get((kind, id))
    return data.get("status") if data is not None else None


def _passed(facts: Facts, id: str) -> bool:
    data = facts.get(("quality_gate", id))
    return bool(data.get("passed")) if data is not None else False


def _once_rule(j: int) -> RuleSpec:
    milestone, gate = f"m-{j}", f"qg-{j % QUALITY_GATES}"
    escrow, amount = _release_of(j)
    actions = ["release"]
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/release-{j}
          description: Release {amount} from {escrow} once milestone {milestone} is approved
          project: {PROJECT}
          when: milestone["{milestone}"].status == "approved" and quality_gate["{gate}"].passed
          fire: once
          actions:
            - release: {{target: bank, escrow: {escrow}, amount: "{amount}", currency: USD,
                         payee: payee-{j}}}
        """
    )
    if j % 2 == 0:
        actions.append("notify")
        text += (
            "    - notify: {target: chat, message: "
            '"Released ${amount} ${currency} to ${payee} from ${escrow} (${rule_id})"}\n'
        )
    return RuleSpec(
        id=f"{PROJECT}/release-{j}",
        fire="once",
        reads=frozenset({("milestone", milestone), ("quality_gate", gate)}),
        holds=lambda f: _status(f, "milestone", milestone) == "approved" and _passed(f, gate),
        actions=tuple(actions),
        yaml=text,
        release=(escrow, Decimal(amount)),
    )


def _deploy_rule(k: int) -> RuleSpec:
    task = f"T-{k}"
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/deploy-{k}
          project: {PROJECT}
          when: task["{task}"].status == "completed"
          fire: each_time
          actions:
            - pipeline: {{target: ci, ref: main, inputs: {{task: {task}}}}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/deploy-{k}",
        fire="each_time",
        reads=frozenset({("task", task)}),
        holds=lambda f: _status(f, "task", task) == "completed",
        actions=("pipeline",),
        yaml=text,
    )


def _pair_rule(k: int) -> RuleSpec:
    a, b = f"T-{2 * k}", f"T-{2 * k + 1}"
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/pair-{k}
          project: {PROJECT}
          when: task["{a}"].status == "completed" and task["{b}"].status == "completed"
          fire: each_time
          actions:
            - notify: {{target: ops, message: "${{rule_id}}: {a} and {b} done"}}
            - pipeline: {{target: ci, ref: main, inputs: {{pair: "{k}"}}}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/pair-{k}",
        fire="each_time",
        reads=frozenset({("task", a), ("task", b)}),
        holds=lambda f: (
            _status(f, "task", a) == "completed" and _status(f, "task", b) == "completed"
        ),
        actions=("notify", "pipeline"),
        yaml=text,
    )


def _review_holds(facts: Facts) -> bool:
    """The review rule's ``when`` as the language defines it: ``or`` short-circuits, and a
    missing fact that the evaluation reaches makes the whole condition false. So while
    ``m-0`` does not exist the rule does not hold, whatever ``m-1`` says."""
    first = facts.get(("milestone", "m-0"))
    if first is None or "status" not in first:
        return False
    if first["status"] == "in_review":
        return True
    second = facts.get(("milestone", "m-1"))
    return second is not None and second.get("status") == "in_review"


def _review_rule() -> RuleSpec:
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/review
          project: {PROJECT}
          when: milestone["m-0"].status == "in_review" or milestone["m-1"].status == "in_review"
          fire: each_time
          actions:
            - notify: {{target: ops, message: "a milestone went into review (${{rule_id}})"}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/review",
        fire="each_time",
        reads=frozenset({("milestone", "m-0"), ("milestone", "m-1")}),
        holds=_review_holds,
        actions=("notify",),
        yaml=text,
    )


def _task_event_rule() -> RuleSpec:
    """An event rule that sets a fact: every accepted T-0 fact saying completed fires it
    (the same status twice fires twice), and each firing records ``mirror.T-0``."""
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/task-event
          project: {PROJECT}
          when: task["T-0"].status == "completed"
          fire: each_fact
          actions:
            - notify: {{target: ops, message: "${{rule_id}}: T-0 completed again"}}
            - set_fact: {{kind: mirror, id: T-0, data: {{status: completed}}}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/task-event",
        fire="each_fact",
        reads=frozenset({("task", "T-0")}),
        holds=lambda f: _status(f, "task", "T-0") == "completed",
        actions=("notify",),
        yaml=text,
        sets=("mirror", "T-0", {"status": "completed"}),
    )


def _mirror_rule() -> RuleSpec:
    """An event rule on the fact the task-event rule sets: fires once per fact set, in the
    same transaction (a chain of depth 1)."""
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/mirror
          project: {PROJECT}
          when: mirror["T-0"].status == "completed"
          fire: each_fact
          actions:
            - pipeline: {{target: ci, ref: main, inputs: {{mirror: T-0}}}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/mirror",
        fire="each_fact",
        reads=frozenset({("mirror", "T-0")}),
        holds=lambda f: _status(f, "mirror", "T-0") == "completed",
        actions=("pipeline",),
        yaml=text,
    )


def _task_item_rule() -> RuleSpec:
    """A per-item rule: each task is an instance, with its own closed -> open edges."""
    text = textwrap.dedent(
        f"""\
        - id: {PROJECT}/task-started
          project: {PROJECT}
          for_each: task
          when: item.data.status == "in_progress"
          fire: each_time
          actions:
            - notify: {{target: ops, message: "${{item.id}} started (${{rule_id}})"}}
        """
    )
    return RuleSpec(
        id=f"{PROJECT}/task-started",
        fire="each_time",
        reads=frozenset(),
        holds=lambda f: False,
        actions=("notify",),
        yaml=text,
        for_each="task",
        holds_item=lambda f, item: _status(f, "task", item) == "in_progress",
    )


def ruleset() -> list[RuleSpec]:
    """The crash ruleset: 10 once-rules with releases, 10 each_time rules, two event rules
    (one setting the fact the other fires on) and a per-item rule over the tasks."""
    return (
        [_once_rule(j) for j in range(ONCE_RULES)]
        + [_deploy_rule(k) for k in range(TASKS)]
        + [_pair_rule(k) for k in range(TASKS // 2)]
        + [_review_rule(), _task_event_rule(), _mirror_rule(), _task_item_rule()]
    )


def config_text(receiver_url: str) -> str:
    """gatekeeper.yaml: four targets at the receiver (alerts to ``ops``), fast retries, two
    escrows."""
    delivery = (
        "{max_attempts: 500, max_age_s: 86400, backoff_base_s: 0.05, backoff_cap_s: 0.4,"
        " timeout_s: 5}"
    )
    targets = {
        "bank": ("CRASH_BANK_SECRET", "json"),
        "chat": ("CRASH_CHAT_SECRET", "slack"),
        "ci": ("CRASH_CI_SECRET", "json"),
        "ops": ("CRASH_OPS_SECRET", "json"),
    }
    lines = [
        "listen: 127.0.0.1:8080  # overridden by --listen",
        "database: state/gatekeeper.db",
        "rules_dir: rules",
        "alert_target: ops",
        "targets:",
    ]
    for name, (env, fmt) in targets.items():
        lines += [
            f"  {name}:",
            f"    url: {receiver_url}/{name}",
            f"    secret_env: {env}",
            f"    format: {fmt}",
            f"    delivery: {delivery}",
        ]
    lines.append("escrows:")
    for name, limit in ESCROW_LIMITS.items():
        lines.append(f'  {name}: {{currency: USD, limit: "{limit}"}}')
    return "\n".join(lines) + "\n"


# -- the receiver ----------------------------------------------------------------------------


@dataclass
class Receipt:
    """One request as the receiver got it, and the status it answered."""

    path: str
    webhook_id: str | None
    idempotency_key: str | None
    raw: str
    status: int
    verified: bool
    at: float = 0.0
    """When it arrived (``time.monotonic()``)."""

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


class CrashReceiver:
    """A webhook receiver on 127.0.0.1 that records everything, answering 200, or 500 with
    probability ``fail_rate``, after a random delay of up to ``max_delay_s``."""

    def __init__(self, rng: random.Random, fail_rate: float = 0.15, max_delay_s: float = 0.03):
        self.rng = rng
        self.fail_rate = fail_rate
        self.max_delay_s = max_delay_s
        self.receipts: list[Receipt] = []
        self.fail_paths: set[str] = set()  # always answered 500 while listed
        self.hold_rules: frozenset[str] = frozenset()
        """Releases of these rules are answered 500, or 200 with probability
        ``hold_accept_rate`` (the bank held them; now and then it takes one)."""
        self.hold_accept_rate = 0.05
        self.accepted_keys: set[str] = set()
        """The bank's Idempotency-Keys it answered 2xx: a retry of one (its answer was lost
        to a kill) is answered 2xx again, never a fault, as a bank's idempotency replay is."""
        self.arrived = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._webhook = Webhook(SECRET)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        headers = dict(request.headers)
        try:
            self._webhook.verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        arrived = time.monotonic()
        status = (500 if self.rng.random() < self.fail_rate else 200) if verified else 401
        if request.path in self.fail_paths:
            status = 500
        held = verified and request.path == "/bank" and bool(self.hold_rules)
        if held and json.loads(raw).get("rule_id") in self.hold_rules:
            status = 200 if self.rng.random() < self.hold_accept_rate else 500
        key = headers.get("Idempotency-Key")
        if verified and request.path == "/bank" and key in self.accepted_keys:
            status = 200  # a bank answers a request it took before as it did then
        elif verified and request.path == "/bank" and key and status == 200:
            self.accepted_keys.add(key)
        self.receipts.append(
            Receipt(
                request.path,
                headers.get("webhook-id"),
                headers.get("Idempotency-Key"),
                raw,
                status,
                verified,
                arrived,
            )
        )
        self.arrived.set()
        delay = self.rng.uniform(0, self.max_delay_s) if self.rng.random() < 0.5 else 0.0
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"ok": status == 200}, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Posted:
    """One POST /v1/facts attempt and what came of it (``seqs`` when acknowledged)."""

    request_id: str
    facts: list[dict[str, Any]]
    cycle: int
    purpose: str
    single: bool = False  # sent as one bare fact rather than {"facts": [...]}
    idempotency_key: str | None = None
    attempts: int = 0
    replayed: bool = False
    seqs: list[int] | None = None
    status: int | None = None
    error: str | None = None

    def body(self) -> Any:
        return self.facts[0] if self.single else {"facts": self.facts}


@dataclass
class CancelPost:
    """One ``POST /v1/actions/{id}/cancel`` of the back office and its answer (``status``
    None: cut off by a kill); ``answered_at`` is ``time.monotonic()`` at the answer."""

    release_id: str
    status: int | None = None
    message: str = ""
    answered_at: float = 0.0


@dataclass
class SettlementPost:
    """One settlement callback (``webhook_id`` and ``body`` are kept for sending it again):
    its last answer (``status`` None: cut off) and how many times it was answered as a
    replay."""

    release_id: str
    outcome: str
    webhook_id: str
    body: str
    status: int | None = None
    answer: Any = None
    sends: int = 0
    replays: int = 0


@dataclass
class CycleContext:
    index: int
    mode: str
    url: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cue: asyncio.Event = field(default_factory=asyncio.Event)


class CrashFailure(Exception):
    """The run could not go on (the daemon did not come back, or would not stop)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CrashRun:
    """One crash run in ``workdir``: ``await run()`` returns the ``Report``.

    ``max_window_s`` bounds how long a ``timer`` cycle streams before the kill; ``pause_s``
    bounds each client's pause between requests (keep both modest on small machines).
    """

    outage_statuses: frozenset[int] = frozenset()
    """HTTP statuses answered while a daemon cannot serve, taken as a request cut off (sent
    again if keyed) rather than a violation: none for one daemon on SQLite."""

    def __init__(
        self,
        workdir: Path,
        *,
        seed: int,
        cycles: int,
        workers: int = 2,
        max_window_s: float = 0.6,
        pause_s: float = 0.015,
        drain_timeout_s: float = 30.0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.workdir = workdir
        self.seed = seed
        self.cycles = cycles
        self.workers = workers
        self.max_window_s = max_window_s
        self.pause_s = pause_s
        self.drain_timeout_s = drain_timeout_s
        self.log = log
        self.rng = random.Random(seed)
        self.receiver = CrashReceiver(random.Random(seed + 1))
        self.receiver.hold_rules = HOLD_RULES
        self.office_rng = random.Random(seed + 2)
        self.cancels: list[CancelPost] = []
        self.settlements: dict[str, SettlementPost] = {}  # by release id
        self.rules = ruleset()
        self.posted: list[Posted] = []
        self.problems: list[str] = []  # violations seen while running (before analysis)
        self.kills: Counter[str] = Counter()
        self.trigger_acked: set[int] = set()
        self.retry_queue: list[Posted] = []
        self.config_path = workdir / "gatekeeper.yaml"
        self.db_path = workdir / "state" / "gatekeeper.db"
        self.log_path = workdir / "daemon.log"
        self._fact_counter = 0
        self._request_counter = 0
        self._session: aiohttp.ClientSession | None = None
        self._log_file: Any = None
        self.sigterm_exit: int | None = None
        self.elapsed_s = 0.0

    # -- set-up and the daemon process ------------------------------------------------------

    def _write_deployment(self) -> None:
        rules_dir = self.workdir / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        once = [r for r in self.rules if r.fire == "once"]
        each = [r for r in self.rules if r.fire == "each_time"]
        (rules_dir / "once.yaml").write_text("".join(r.yaml for r in once))
        (rules_dir / "each_time.yaml").write_text("".join(r.yaml for r in each))
        events = [r for r in self.rules if r.fire == "each_fact"]
        (rules_dir / "events.yaml").write_text("".join(r.yaml for r in events))
        self.config_path.write_text(config_text(self.receiver.url))

    def _spawn(
        self, commit_delay_s: float = 0.0, log_file: Any = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start the daemon on a fresh port, its output to ``log_file`` (default: the run's
        log). With ``commit_delay_s``, through ``SLOW_COMMIT``: the COMMIT of every
        transaction that queued actions waits that long (a slow disk)."""
        log_file = log_file or self._log_file
        port = free_port()
        env = {**os.environ, **SECRET_ENV}
        # the daemon runs the gatekeeper these tests import (a checkout's src/, not another
        # installed copy), whatever the working folder
        here = str(Path(gatekeeper.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        if commit_delay_s:
            shim = self.workdir / "slow_commit_serve.py"
            shim.write_text(SLOW_COMMIT)
            entry = [str(shim)]
            env["CRASHKIT_COMMIT_DELAY_S"] = str(commit_delay_s)
        else:
            entry = ["-m", "gatekeeper"]
        command = [
            sys.executable,
            *entry,
            "serve",
            "-c",
            str(self.config_path),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        log_file.write(f"\n===== {time.strftime('%H:%M:%S')} start on port {port}\n")
        log_file.flush()
        proc = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        return proc, f"http://127.0.0.1:{port}"

    async def _reap(self, proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)
        return proc.returncode

    async def _kill(self, proc: subprocess.Popen[bytes], mode: str) -> None:
        proc.send_signal(signal.SIGKILL)
        await self._reap(proc, 10.0)
        self.kills[mode] += 1
        self._log_file.write(f"===== {time.strftime('%H:%M:%S')} SIGKILL ({mode})\n")
        self._log_file.flush()

    async def _wait_healthy(self, proc: subprocess.Popen[bytes], url: str) -> None:
        assert self._session is not None
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CrashFailure(
                    f"the daemon exited with code {proc.returncode} while starting; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self._session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.02)
        proc.kill()
        await self._reap(proc, 10.0)
        raise CrashFailure(f"the daemon did not answer /healthz within 20 s; log: {self.log_path}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- facts ------------------------------------------------------------------------------

    def _fact(self, kind: str, id: str, **data: Any) -> dict[str, Any]:
        self._fact_counter += 1
        return {
            "project": PROJECT,
            "kind": kind,
            "id": id,
            "data": {**data, "n": self._fact_counter},
        }

    def _noise_fact(self) -> dict[str, Any]:
        r = self.rng.random()
        if r < 0.65:
            status = self.rng.choice(("open", "in_progress", "completed"))
            return self._fact("task", f"T-{self.rng.randrange(TASKS)}", status=status)
        if r < 0.9:
            j = self.rng.randrange(MILESTONES)
            # before its trigger is acknowledged a milestone is never approved by noise, so the
            # once-rules fire at the planned moments; after, re-approvals must fire nothing
            choices = ["draft", "in_review"] + (["approved"] if j in self.trigger_acked else [])
            return self._fact("milestone", f"m-{j}", status=self.rng.choice(choices))
        gate = f"qg-{self.rng.randrange(QUALITY_GATES)}"
        return self._fact("quality_gate", gate, passed=self.rng.random() < 0.6)

    def _request(self, cycle: int, purpose: str, facts: list[dict[str, Any]]) -> Posted:
        self._request_counter += 1
        request_id = f"crash-{self.seed}-{self._request_counter}"
        posted = Posted(request_id, facts, cycle, purpose)
        posted.single = len(facts) == 1 and self.rng.random() < 0.5
        # half the requests carry an Idempotency-Key: when one is cut off by a kill it is sent
        # again (same key, same body, same X-Request-Id) after the restart, until acknowledged
        if self.rng.random() < 0.5:
            posted.idempotency_key = request_id
        self.posted.append(posted)
        return posted

    def _noise_request(self, cycle: int, size: int | None = None) -> Posted:
        if size is None:
            size = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 6)
        return self._request(cycle, "noise", [self._noise_fact() for _ in range(size)])

    def _trigger_request(self, cycle: int, j: int) -> Posted:
        facts = [
            self._fact("quality_gate", f"qg-{j % QUALITY_GATES}", passed=True),
            self._fact("milestone", f"m-{j}", status="approved"),
        ]
        return self._request(cycle, f"trigger-{j}", facts)

    def _due_trigger(self, cycle: int) -> int | None:
        for j in range(ONCE_RULES):
            if j not in self.trigger_acked and j * self.cycles // ONCE_RULES <= cycle:
                return j
        return None

    async def _post(self, url: str, posted: Posted) -> bool:
        """POST the request; True when acknowledged (HTTP 200 with sequence numbers).

        A request with an Idempotency-Key that is cut off goes to ``retry_queue``."""
        assert self._session is not None
        headers = {"X-Request-Id": posted.request_id}
        if posted.idempotency_key is not None:
            headers["Idempotency-Key"] = posted.idempotency_key
        posted.attempts += 1
        try:
            async with self._session.post(
                url + "/v1/facts", json=posted.body(), headers=headers
            ) as response:
                posted.status = response.status
                posted.replayed = response.headers.get("Idempotent-Replayed") == "true"
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            posted.status = None
            posted.error = type(exc).__name__
        if posted.status is None or posted.status in self.outage_statuses:
            if posted.idempotency_key is not None and posted not in self.retry_queue:
                self.retry_queue.append(posted)
            return False
        if posted.status != 200:
            self.problems.append(
                f"the daemon answered HTTP {posted.status} to valid request "
                f"{posted.request_id}: {text[:300]}"
            )
            return False
        posted.seqs = [int(s) for s in json.loads(text)["seqs"]]
        if posted in self.retry_queue:
            self.retry_queue.remove(posted)
        if posted.purpose.startswith("trigger-"):
            self.trigger_acked.add(int(posted.purpose.split("-")[1]))
        return True

    async def _retry_cut_off(self, url: str, stop: asyncio.Event | None = None) -> None:
        """Send again every keyed request that a kill cut off (same key, same body)."""
        for posted in list(self.retry_queue):
            if stop is not None and stop.is_set():
                return
            await self._post(url, posted)

    # -- cycles -----------------------------------------------------------------------------

    async def _worker(self, ctx: CycleContext, wid: int) -> None:
        sent = 0
        cue_after = self.rng.randint(0, 4)
        if wid == 1:
            await self._retry_cut_off(ctx.url, ctx.stop)
        while not ctx.stop.is_set():
            j = self._due_trigger(ctx.index) if wid == 0 else None
            if j is not None:
                posted = self._trigger_request(ctx.index, j)
                if await self._post(ctx.url, posted) and ctx.mode == "after_fire":
                    ctx.cue.set()
            elif wid == 0 and sent >= cue_after and not ctx.cue.is_set():
                if ctx.mode == "mid_request":
                    posted = self._noise_request(ctx.index, self.rng.randint(30, 80))
                    posted.purpose = "large"
                    ctx.cue.set()
                    await self._post(ctx.url, posted)
                elif ctx.mode == "after_fire":
                    k = self.rng.randrange(TASKS)
                    posted = self._request(
                        ctx.index, "fire", [self._fact("task", f"T-{k}", status="completed")]
                    )
                    if await self._post(ctx.url, posted):
                        ctx.cue.set()
                else:
                    await self._post(ctx.url, self._noise_request(ctx.index))
            else:
                await self._post(ctx.url, self._noise_request(ctx.index))
            sent += 1
            await asyncio.sleep(self.rng.uniform(0, self.pause_s))

    async def _cycle(self, index: int, mode: str) -> None:
        proc, url = self._spawn()
        try:
            if mode == "startup":
                await asyncio.sleep(self.rng.uniform(0.0, 0.7))
                await self._kill(proc, mode)
                return
            await self._wait_healthy(proc, url)
            ctx = CycleContext(index, mode, url)
            workers = [asyncio.create_task(self._worker(ctx, w)) for w in range(self.workers)]
            workers.append(asyncio.create_task(self._back_office(ctx)))
            if mode == "timer":
                await asyncio.sleep(self.rng.uniform(0.03, self.max_window_s))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.cue.wait(), timeout=3.0)
                limit = 0.03 if mode == "after_fire" else 0.015
                await asyncio.sleep(self.rng.uniform(0.0, limit))
            ctx.stop.set()  # no new requests from here on; those in flight are cut off
            await self._kill(proc, mode)
            await asyncio.gather(*workers)
        finally:
            if proc.poll() is None:
                proc.kill()
                await self._reap(proc, 10.0)

    # -- the bank's back office: cancels and settlements -----------------------------------

    async def _back_office(self, ctx: CycleContext) -> None:
        """Until the cycle stops: cancel held releases while they wait, settle each delivered
        release once, send cut-off callbacks again, replay acknowledged ones now and then."""
        while not ctx.stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self._office_round(ctx.url, ctx.stop)
            await asyncio.sleep(self.office_rng.uniform(0.005, 0.03))

    async def _office_round(self, url: str, stop: asyncio.Event | None = None) -> None:
        assert self._session is not None
        rng = self.office_rng
        async with self._session.get(url + "/v1/actions?limit=1000") as response:
            actions = (await response.json())["actions"]
        cancelled = {c.release_id for c in self.cancels if c.status == 200}
        for a in actions:
            if stop is not None and stop.is_set():
                return
            if a["kind"] != "release":
                continue
            release_id = a["action_id"]
            if (
                a["status"] in ("pending", "dead")
                and a["rule_id"] in HOLD_RULES
                and release_id not in cancelled
                and rng.random() < 0.6
            ):
                await self._cancel(url, release_id)
            elif a["status"] == "delivered" and release_id not in self.settlements:
                outcome = "failed" if rng.random() < FAIL_RATE else "settled"
                body = {
                    "release_id": release_id,
                    "status": outcome,
                    "reference": f"ref-{release_id}",
                }
                if outcome == "failed":
                    body["reason"] = "the payee's account is closed"
                post = SettlementPost(release_id, outcome, f"settle-{release_id}", json.dumps(body))
                self.settlements[release_id] = post
                await self._settle(url, post)
        for post in list(self.settlements.values()):
            if stop is not None and stop.is_set():
                return
            if post.status is None or (post.status == 200 and rng.random() < 0.05):
                await self._settle(url, post)  # cut off: again; acknowledged: a replay

    async def _cancel(self, url: str, release_id: str) -> None:
        assert self._session is not None
        post = CancelPost(release_id)
        self.cancels.append(post)
        async with self._session.post(
            f"{url}/v1/actions/{release_id}/cancel", json={"reason": "the bank held it"}
        ) as response:
            answer = await response.json()
            post.status = response.status
            post.answered_at = time.monotonic()
        if post.status != 200:
            post.message = str(answer.get("error", {}).get("message", answer))
        if post.status not in (200, 409, *self.outage_statuses):
            self.problems.append(f"cancel of {release_id} answered {post.status}: {post.message}")

    async def _settle(self, url: str, post: SettlementPost) -> None:
        """Send ``post`` signed as the bank (the same ``webhook-id`` and body every time, a
        fresh timestamp: a sender's retry)."""
        assert self._session is not None
        acknowledged = post.status == 200
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": post.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(SECRET).sign(post.webhook_id, now, post.body),
        }
        post.sends += 1
        post.status = None
        async with self._session.post(
            f"{url}/v1/settlements/bank", data=post.body, headers=headers
        ) as response:
            post.answer = await response.json()
            post.status = response.status
        if post.status in self.outage_statuses:
            post.status = None  # cut off: sent again
            return
        if post.status != 200:
            self.problems.append(
                f"settlement {post.webhook_id} ({post.outcome}) answered {post.status}: "
                f"{post.answer}"
            )
            return
        if post.answer["replayed"]:
            post.replays += 1
        elif acknowledged:
            self.problems.append(f"settlement {post.webhook_id} sent again was not a replay")
        if post.answer["status"] != post.outcome:
            self.problems.append(f"settlement {post.webhook_id} recorded as {post.answer}")

    async def _finish(self) -> None:
        """Restart, post every trigger not yet acknowledged, let the bank take the releases
        it held, drain the outbox, settle what is left, SIGTERM."""
        assert self._session is not None
        proc, url = self._spawn()
        try:
            await self._wait_healthy(proc, url)
            for _ in range(3):
                await self._retry_cut_off(url)
            for posted in self.retry_queue:
                self.problems.append(f"keyed request {posted.request_id} was never acknowledged")
            for j in range(ONCE_RULES):
                for _ in range(5):
                    if j in self.trigger_acked:
                        break
                    await self._post(url, self._trigger_request(self.cycles, j))
                if j not in self.trigger_acked:
                    self.problems.append(f"the trigger of once-rule {j} was never acknowledged")
            self.receiver.hold_rules = frozenset()
            await self._drain(url)
            await self._office_round(url)  # the last settlements (and cut-off ones again)
            proc.send_signal(signal.SIGTERM)
            self.sigterm_exit = await self._reap(proc, 30.0)
            if self.sigterm_exit != 0:
                self.problems.append(
                    f"the daemon exited with {self.sigterm_exit} on SIGTERM (expected 0)"
                )
        finally:
            if proc.poll() is None:
                proc.kill()
                await self._reap(proc, 10.0)

    async def _drain(self, url: str) -> None:
        assert self._session is not None
        deadline = time.monotonic() + self.drain_timeout_s
        pending: list[Any] = []
        while time.monotonic() < deadline:
            async with self._session.get(url + "/v1/actions?status=pending&limit=1000") as resp:
                pending = (await resp.json())["actions"]
            if not pending:
                break
            await asyncio.sleep(0.1)
        else:
            self.problems.append(
                f"{len(pending)} action(s) still pending {self.drain_timeout_s:.0f} s after "
                "the last kill"
            )
        async with self._session.get(url + "/v1/actions?status=dead&limit=1000") as resp:
            dead = (await resp.json())["actions"]
        if dead:
            self.problems.append(f"{len(dead)} action(s) dead-lettered: {dead[:3]}")

    def plan_modes(self) -> list[str]:
        """The cycles' kill modes: every mode at least once (when there are enough cycles)."""
        modes = list(MODES[: min(len(MODES), self.cycles)])
        modes += self.rng.choices(MODES, MODE_WEIGHTS, k=self.cycles - len(modes))
        self.rng.shuffle(modes)
        return modes

    async def run(self) -> Report:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.receiver.start()
        self._write_deployment()
        self._log_file = self.log_path.open("a")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        try:
            for index, mode in enumerate(self.plan_modes()):
                await self._cycle(index, mode)
            await self._finish()
        finally:
            await self._session.close()
            await self.receiver.stop()
            self._log_file.close()
        self.elapsed_s = time.monotonic() - started
        return self._report()

    async def run_slow_commit(self, commit_delay_s: float = 1.5, tries: int = 3) -> Report:
        """Kill the daemon while the COMMIT of a transaction that queued a release is slow.

        The daemon runs through ``SLOW_COMMIT``. A few pipeline actions fail forever (the
        receiver answers 500 on ``/ci``), so the dispatcher keeps looking at the outbox. Then
        once-rule ``release-j``'s trigger is posted; its transaction is written and its COMMIT
        held for ``commit_delay_s``. If the release reaches the receiver before the trigger is
        acknowledged, the dispatcher read a row that is not committed yet: the daemon is
        killed right then, so that row never commits. Up to ``tries`` once-rules are tried.
        Then the run finishes as usual (restart, every trigger posted until acknowledged,
        drain, SIGTERM) and is analysed: a correct daemon shows no violation.
        """
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.receiver.fail_rate = 0.0
        self.receiver.max_delay_s = 0.0
        self.receiver.fail_paths = {"/ci"}
        await self.receiver.start()
        self._write_deployment()
        self._log_file = self.log_path.open("a")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        try:
            for j in range(tries):
                proc, url = self._spawn(commit_delay_s)
                try:
                    await self._wait_healthy(proc, url)
                    if j == 0:  # pipeline actions that keep failing (retried every <= 0.4 s)
                        failing = [
                            self._fact("task", f"T-{k}", status="completed") for k in (0, 2, 4)
                        ]
                        await self._post(url, self._request(0, "failing", failing))
                    trigger = self._trigger_request(0, j)
                    posting = asyncio.create_task(self._post(url, trigger))
                    while not posting.done() and not self._release_received(j):
                        await asyncio.sleep(0.002)
                    leaked = self._release_received(j) and not posting.done()
                    await self._kill(proc, "slow_commit")
                    await posting
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        await self._reap(proc, 10.0)
                if leaked:
                    self.log(
                        f"release-{j} reached the receiver before its trigger was acknowledged "
                        "(its transaction not yet committed); the daemon was killed then"
                    )
                    break
            self.receiver.fail_paths.clear()
            await self._finish()
        finally:
            await self._session.close()
            await self.receiver.stop()
            self._log_file.close()
        self.elapsed_s = time.monotonic() - started
        return self._report()

    def _release_received(self, j: int) -> bool:
        return any(
            r.path == "/bank" and json.loads(r.raw).get("rule_id") == f"{PROJECT}/release-{j}"
            for r in self.receiver.receipts
        )

    def _tables(self) -> Tables:
        """The database's tables, read after the last daemon stopped."""
        return read_sqlite(self.db_path)

    def _report(self) -> Report:
        report = check(
            self._tables(),
            self.posted,
            self.receiver.receipts,
            self.rules,
            self.cancels,
            list(self.settlements.values()),
        )
        report.seed = self.seed
        report.kills = Counter(self.kills)
        report.violations[:0] = self.problems
        report.elapsed_s = self.elapsed_s
        report.log_path = self.log_path
        report.retried_requests = sum(1 for p in self.posted if p.attempts > 1)
        report.replayed = sum(1 for p in self.posted if p.replayed)
        return report


# -- the checks ------------------------------------------------------------------------------


@dataclass
class Report:
    """What a run found: counts for the summary and every violated guarantee."""

    seed: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    requests_acked: int = 0
    requests_unacked: int = 0
    unacked_applied: int = 0
    facts_acked: int = 0
    facts_found: int = 0
    once_expected: int = 0
    once_found: int = 0
    each_expected: int = 0
    each_found: int = 0
    event_found: int = 0
    """Of the firings found: those of event rules (``each_fact``)."""
    instance_found: int = 0
    """Of the firings found: those of instances of per-item rules."""
    facts_set: int = 0
    """Facts recorded by rules (``set_fact``) in the fact log."""
    actions_queued: int = 0
    actions_delivered: int = 0
    releases_queued: int = 0
    releases_received: int = 0
    released: dict[str, Decimal] = field(default_factory=dict)
    receipts: int = 0
    duplicates: int = 0
    retried_requests: int = 0
    replayed: int = 0
    retried_5xx: int = 0
    cancels_sent: int = 0
    cancels_refused: int = 0
    """Cancels answered 409 (an attempt in flight, or delivered meanwhile)."""
    cancelled: int = 0
    settled: int = 0
    failed: int = 0
    settlement_replays: int = 0
    movements: int = 0
    elapsed_s: float = 0.0
    log_path: Path | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)
    """More lines of the summary (label, figures), before the violations."""
    figures: dict[str, float] = field(default_factory=dict)
    """More figures by name (a mode's own: ``crashkit_pg.check_failover``)."""
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kills = sum(self.kills.values())
        modes = ", ".join(f"{m} {n}" for m, n in sorted(self.kills.items()))
        escrows = ", ".join(
            f"{name} {self.released.get(name, Decimal(0))}/{limit}"
            for name, limit in ESCROW_LIMITS.items()
        )
        lines = [
            f"== gatekeeper crash test (seed {self.seed}, {self.elapsed_s:.1f} s)",
            f"kill cycles:              {kills} ({modes})",
            f"requests:                 {self.requests_acked} acknowledged, "
            f"{self.requests_unacked} cut off for good ({self.unacked_applied} of them "
            f"applied); {self.retried_requests} keyed requests sent again after a kill "
            f"({self.replayed} answered as replays)",
            f"facts acknowledged:       {self.facts_acked}",
            f"facts found (fact_log):   {self.facts_found}",
            f"firings expected/found:   once {self.once_expected}/{self.once_found}, "
            f"each_time and each_fact {self.each_expected}/{self.each_found} "
            f"({self.event_found} of event rules, {self.instance_found} of per-item "
            f"instances; {self.facts_set} facts set by rules)",
            f"actions queued/delivered: {self.actions_queued}/{self.actions_delivered} "
            f"({self.releases_queued} releases queued, {self.releases_received} received)",
            f"released/limit:           {escrows}",
            f"requests received:        {self.receipts} ({self.duplicates} duplicates of a "
            f"2xx-answered webhook-id, {self.retried_5xx} answered 5xx and retried)",
            f"cancels:                  {self.cancels_sent} sent, {self.cancelled} releases "
            f"cancelled, {self.cancels_refused} refused (409)",
            f"settlements:              {self.settled} settled, {self.failed} failed "
            f"({self.settlement_replays} replays answered as such); "
            f"{self.movements} ledger movements",
        ]
        lines += [f"{label + ':':<26}{figures}" for label, figures in self.notes]
        lines += [
            f"violations:               {len(self.violations)}",
        ]
        lines += [f"  VIOLATION: {v}" for v in self.violations[:40]]
        if len(self.violations) > 40:
            lines.append(f"  ... and {len(self.violations) - 40} more")
        if self.violations and self.log_path is not None:
            lines.append(f"daemon log: {self.log_path}")
        return "\n".join(lines)


Row = dict[str, Any]
"""A database row by column name (either backend)."""

TABLE_QUERIES = {
    "log": "SELECT seq, project, kind, id, data, request_id, caused_by FROM fact_log ORDER BY seq",
    "facts": "SELECT project, kind, id, data, seq FROM facts",
    "decisions": "SELECT id, rule_id, trigger, fact_seq, outcome, gate_open, firing_id, instance"
    " FROM decisions ORDER BY id",
    "states": "SELECT rule_id, instance, gate_open, fired_count FROM rule_state",
    "outbox": "SELECT action_id, decision_id, rule_id, firing_id, kind, target, payload, status"
    " FROM outbox",
    "movements": "SELECT id, release_id, escrow, movement, amount FROM ledger_entries ORDER BY id",
}
"""What ``analyse`` reads, the same SQL on SQLite and PostgreSQL."""


@dataclass
class Tables:
    """The rows ``check`` reads, by ``TABLE_QUERIES`` name (``fact_log`` in ``seq`` order,
    ``decisions`` and ``ledger_entries`` by id)."""

    log: list[Row]
    facts: list[Row]
    decisions: list[Row]
    states: list[Row]
    outbox: list[Row]
    movements: list[Row]


def read_sqlite(db_path: Path) -> Tables:
    """The tables of the SQLite database at ``db_path`` (read after the daemons stopped)."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        rows = {name: [dict(r) for r in db.execute(sql)] for name, sql in TABLE_QUERIES.items()}
    return Tables(**rows)


def analyse(
    db_path: Path,
    posted: Iterable[Posted],
    receipts: list[Receipt],
    rules: list[RuleSpec],
    cancels: Iterable[CancelPost] = (),
    settlements: Iterable[SettlementPost] = (),
) -> Report:
    """``check`` the SQLite database at ``db_path``."""
    return check(read_sqlite(db_path), posted, receipts, rules, cancels, settlements)


def check(
    tables: Tables,
    posted: Iterable[Posted],
    receipts: list[Receipt],
    rules: list[RuleSpec],
    cancels: Iterable[CancelPost] = (),
    settlements: Iterable[SettlementPost] = (),
) -> Report:
    """Check every guarantee against the database's tables and the receiver's records.

    1. every acknowledged fact is in ``fact_log`` with its sequence number and content;
       a request that was cut off is applied entirely or not at all, and nothing else is there;
    2. each request's facts are contiguous in ``fact_log`` (one transaction each);
    3. replaying ``fact_log`` transaction by transaction (and within one, level by level:
       the posted facts, then the facts the rules they fired set) gives the expected
       firings, per rule instance (a per-item rule has one per task): a once-rule fires at
       the first transaction after which its condition holds (so at most once, and exactly
       once when its trigger was acknowledged); an each_time rule fires on every false ->
       true edge; an event rule (each_fact) at every fact of its that holds, one decision per
       fact; every other rule instance reading a level's facts has exactly one decision on
       it; each firing of a set_fact rule recorded exactly its fact, with caused_by, in the
       same transaction; ``facts`` and ``rule_state`` agree with the replay;
    4. each firing queued exactly its rule's actions in the outbox, and every action belongs
       to a firing; nothing is left pending or dead;
    5. the receiver got every action (a 2xx answer) and nothing else, always with the same
       webhook-id and body; releases carry Idempotency-Key == release_id == webhook-id, the
       distinct releases received equal the releases queued and not cancelled, and never
       add up to more than an escrow's limit;
    6. the ledger (``check_ledger``): each release's movements are those its state allows,
       so they sum to the escrow figures; replayed in order, no reserve took an escrow past
       its limit; nothing cancelled was ever accepted by the bank (2xx), nor reached it after
       its cancel was answered; every acknowledged cancel and settlement is recorded as
       answered; each failed settlement alerted ``ops`` exactly once, and nothing else did.
    """
    report = Report()
    v = report.violations
    posted = list(posted)
    log, facts_table, decisions = tables.log, tables.facts, tables.decisions
    states, outbox, movements = tables.states, tables.outbox, tables.movements
    rules_by_id = {r.id: r for r in rules}
    by_seq = {row["seq"]: row for row in log}
    report.facts_found = len(log)

    # 1. acknowledged facts are durable; cut-off requests are all or nothing
    rows_of_request: dict[str, list[Row]] = defaultdict(list)
    for row in log:
        if row["caused_by"] is None:  # posted, not set by a rule
            rows_of_request[row["request_id"]].append(row)
    known_requests = {p.request_id: p for p in posted}
    for request_id, rows in rows_of_request.items():
        if request_id not in known_requests:
            v.append(f"fact_log holds {len(rows)} fact(s) of unknown request {request_id!r}")

    def same(row: Row, fact: Mapping[str, Any]) -> bool:
        return (row["project"], row["kind"], row["id"], json.loads(row["data"])) == (
            fact["project"],
            fact["kind"],
            fact["id"],
            fact["data"],
        )

    for p in posted:
        rows = rows_of_request.get(p.request_id, [])
        if p.seqs is not None:
            report.requests_acked += 1
            report.facts_acked += len(p.facts)
            if len(p.seqs) != len(p.facts):
                v.append(f"request {p.request_id}: {len(p.facts)} facts but seqs {p.seqs}")
            for seq, fact in zip(p.seqs, p.facts, strict=False):
                row = by_seq.get(seq)
                if row is None:
                    v.append(f"acknowledged fact seq {seq} ({p.request_id}) is not in fact_log")
                elif not same(row, fact) or row["request_id"] != p.request_id:
                    v.append(f"fact_log seq {seq} differs from the acknowledged fact {fact}")
        else:
            report.requests_unacked += 1
            if rows:
                report.unacked_applied += 1
        if rows and (
            len(rows) != len(p.facts)
            or not all(same(r, f) for r, f in zip(rows, p.facts, strict=False))
        ):
            v.append(
                f"request {p.request_id} ({len(p.facts)} facts) is in fact_log as "
                f"{len(rows)} fact(s) / other content: not applied atomically"
            )

    # 2. transactions: runs of one request id, each request id in one run
    groups: list[list[Row]] = []
    for row in log:
        if groups and groups[-1][0]["request_id"] == row["request_id"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    runs = Counter(g[0]["request_id"] for g in groups)
    for request_id, count in runs.items():
        if count > 1:
            v.append(f"the facts of request {request_id} are interleaved with others in fact_log")
    group_of_seq = {row["seq"]: index for index, g in enumerate(groups) for row in g}

    # 3. replay, level by level within each transaction: the posted facts, then the facts
    # the rules they fired set (caused_by depth 1), and so on
    state: dict[FactKey, Mapping[str, Any]] = {}
    last_seq: dict[FactKey, int] = {}
    Instance = tuple[str, str]  # (rule id, item id; "" for a plain rule)
    gate: dict[Instance, bool] = {}
    fired_once: set[Instance] = set()
    expected: dict[Instance, list[int]] = defaultdict(list)  # group index per firing
    expected_decisions: Counter[tuple[str, str, int]] = Counter()
    expected_sets: Counter[tuple[int, str, str, str, str]] = Counter()
    readers: dict[FactKey, list[RuleSpec]] = defaultdict(list)
    per_item: dict[str, list[RuleSpec]] = defaultdict(list)
    for rule in rules:
        for key in rule.reads:
            readers[key].append(rule)
        if rule.for_each is not None:
            per_item[rule.for_each].append(rule)

    def fire(rule: RuleSpec, item: str, index: int) -> None:
        expected[(rule.id, item)].append(index)
        if rule.sets is not None:
            kind, fact_id, data = rule.sets
            expected_sets[(index, rule.id, kind, fact_id, json.dumps(data, sort_keys=True))] += 1

    found_sets: Counter[tuple[int, str, str, str, str]] = Counter()
    set_firings: list[tuple[str, str]] = []  # (firing id, fact log seq) of each set fact
    for index, group in enumerate(groups):
        levels: dict[int, list[Row]] = defaultdict(list)
        for row in group:
            caused = json.loads(row["caused_by"]) if row["caused_by"] else None
            levels[caused["depth"] if caused else 0].append(row)
            if caused:
                data = json.dumps(json.loads(row["data"]), sort_keys=True)
                found_sets[(index, caused["rule_id"], row["kind"], row["id"], data)] += 1
                set_firings.append((caused["firing_id"], row["seq"]))
        for depth in sorted(levels):
            touched: dict[Instance, RuleSpec] = {}
            for row in levels[depth]:
                key = (row["kind"], row["id"])
                state[key] = json.loads(row["data"])
                last_seq[key] = row["seq"]
                triggered = [(rule, "") for rule in readers.get(key, [])]
                triggered += [(rule, row["id"]) for rule in per_item.get(row["kind"], [])]
                for rule, item in triggered:
                    if rule.fire == "each_fact":  # decided at its fact, fires when it holds
                        expected_decisions[(rule.id, item, index)] += 1
                        value = rule.holds_for(state, item)
                        gate[(rule.id, item)] = value
                        if value:
                            fire(rule, item, index)
                    else:
                        touched[(rule.id, item)] = rule
            for (rule_id, item), rule in touched.items():
                expected_decisions[(rule_id, item, index)] += 1
                value = rule.holds_for(state, item)
                if rule.fire == "once":
                    if value and (rule_id, item) not in fired_once:
                        fired_once.add((rule_id, item))
                        fire(rule, item, index)
                elif value and not gate.get((rule_id, item), False):
                    fire(rule, item, index)
                gate[(rule_id, item)] = value
    report.facts_set = len(set_firings)
    if found_sets != expected_sets:
        v.append(
            f"facts set by rules: expected {sorted((expected_sets - found_sets).elements())[:3]}"
            f" missing, {sorted((found_sets - expected_sets).elements())[:3]} unexpected"
        )

    found: dict[Instance, list[int]] = defaultdict(list)
    decisions_on: Counter[tuple[str, str, int]] = Counter()
    fired_decisions: dict[int, Row] = {}
    for d in decisions:
        group_index = group_of_seq.get(d["fact_seq"]) if d["fact_seq"] is not None else None
        if d["trigger"] == "fact":
            if group_index is None:
                v.append(f"decision {d['id']} ({d['rule_id']}) points at no fact_log row")
            else:
                decisions_on[(d["rule_id"], d["instance"], group_index)] += 1
        if d["outcome"] == "fired":
            fired_decisions[d["id"]] = d
            if d["trigger"] != "fact" or group_index is None:
                v.append(f"unexpected {d['trigger']} firing of {d['rule_id']} ({d['firing_id']})")
                found[(d["rule_id"], d["instance"])].append(-1)
            else:
                found[(d["rule_id"], d["instance"])].append(group_index)
    fired_ids = {d["firing_id"] for d in fired_decisions.values()}
    for firing_id, seq in set_firings:
        if firing_id not in fired_ids:
            v.append(f"fact_log seq {seq} was set by {firing_id}, which is no firing")
    if len({f for f, _ in set_firings}) != len(set_firings):
        v.append("a firing set its fact more than once")
    for key, count in expected_decisions.items():
        if decisions_on.get(key, 0) != count:
            v.append(
                f"rule {key[0]}[{key[1]}] has {decisions_on.get(key, 0)} decisions on the "
                f"transaction of request {groups[key[2]][0]['request_id']} (expected {count})"
            )
    for key in decisions_on.keys() - expected_decisions.keys():
        v.append(f"rule {key[0]} was decided on a transaction that does not touch its facts")

    for key in sorted(expected.keys() | found.keys()):
        rule = rules_by_id.get(key[0])
        if rule is None:
            v.append(f"firings of an unknown rule {key[0]}")
            continue
        want, got = expected.get(key, []), sorted(found.get(key, []))
        if rule.fire == "once":
            report.once_expected += len(want)
            report.once_found += len(got)
            if len(got) > 1:
                v.append(f"once-rule {rule.id} fired {len(got)} times")
        else:
            report.each_expected += len(want)
            report.each_found += len(got)
        report.event_found += len(got) if rule.fire == "each_fact" else 0
        report.instance_found += len(got) if key[1] else 0
        if want != got:
            v.append(
                f"{rule.id}[{key[1]}] ({rule.fire}): expected firings on transactions "
                f"{_describe(want, groups)}, found {_describe(got, groups)}"
            )
    for p in posted:
        if p.purpose.startswith("trigger-") and p.seqs is not None:
            rule_id = f"{PROJECT}/release-{p.purpose.split('-')[1]}"
            if len(found.get((rule_id, ""), [])) != 1:
                v.append(f"once-rule {rule_id}: acknowledged trigger but no single firing")

    current = {(r["kind"], r["id"]): (json.loads(r["data"]), r["seq"]) for r in facts_table}
    replayed = {key: (data, last_seq[key]) for key, data in state.items()}
    if current != replayed:
        differing = sorted(
            key for key in current.keys() | replayed.keys() if current.get(key) != replayed.get(key)
        )
        v.append(
            f"the facts table disagrees with fact_log replayed on {differing[:5]}: "
            f"table {[current.get(k) for k in differing[:2]]}, "
            f"replayed {[replayed.get(k) for k in differing[:2]]}"
        )
    for s in states:
        rule = rules_by_id.get(s["rule_id"])
        if rule is None:
            continue
        item = s["instance"]
        fired = len(found.get((rule.id, item), []))
        if s["fired_count"] != fired:
            v.append(
                f"rule_state {rule.id}[{item}]: fired_count {s['fired_count']}, {fired} firings"
            )
        if bool(s["gate_open"]) != rule.holds_for(state, item):
            v.append(
                f"rule_state {rule.id}[{item}]: gate_open {s['gate_open']} after the last fact"
            )
    wanted_states = {(r.id, "") for r in rules if r.for_each is None} | {
        (r.id, fact_id)
        for r in rules
        if r.for_each
        for (kind, fact_id) in state
        if kind == r.for_each
    }
    missing_states = wanted_states - {(s["rule_id"], s["instance"]) for s in states}
    if missing_states:
        v.append(f"rule instances without rule_state: {sorted(missing_states)[:5]}")

    # 4. outbox <-> firings (alerts about a firing's actions are checked with the ledger)
    alerts = [a for a in outbox if "alert" in json.loads(a["payload"])]
    alert_ids = {a["action_id"] for a in alerts}
    actions_of: dict[int, list[Row]] = defaultdict(list)
    for a in outbox:
        if a["action_id"] not in alert_ids:
            actions_of[a["decision_id"]].append(a)
        if a["decision_id"] not in fired_decisions:
            v.append(f"outbox action {a['action_id']} belongs to no fired decision")
    for decision_id, d in fired_decisions.items():
        rule = rules_by_id.get(d["rule_id"])
        actions = actions_of.get(decision_id, [])
        if rule is not None and sorted(a["kind"] for a in actions) != sorted(rule.actions):
            v.append(
                f"firing {d['firing_id']} queued {[a['kind'] for a in actions]}, "
                f"expected {list(rule.actions)}"
            )
        for a in actions:
            if a["firing_id"] != d["firing_id"] or a["rule_id"] != d["rule_id"]:
                v.append(f"outbox action {a['action_id']} names another firing")
    report.actions_queued = len(outbox)
    report.actions_delivered = sum(1 for a in outbox if a["status"] == "delivered")
    for status, count in Counter(a["status"] for a in outbox).items():
        if status not in ("delivered", "cancelled"):
            v.append(f"{count} action(s) left {status}")
    releases = [a for a in outbox if a["kind"] == "release"]
    report.releases_queued = len(releases)
    if len(releases) != report.once_found:
        v.append(f"{len(releases)} releases queued for {report.once_found} once-rule firings")

    # 5. the receiver
    by_action = {a["action_id"]: a for a in outbox}
    receipts_of: dict[str, list[Receipt]] = defaultdict(list)
    report.receipts = len(receipts)
    phantoms: set[str | None] = set()
    for r in receipts:
        if not r.verified:
            v.append(f"request to {r.path} failed signature verification")
        if r.webhook_id is None or r.webhook_id not in by_action:
            if r.webhook_id not in phantoms:
                phantoms.add(r.webhook_id)
                v.append(
                    f"the receiver got {r.path} webhook-id {r.webhook_id}, which is not in the "
                    f"outbox: an action sent without a committed firing: {r.raw[:240]}"
                )
            continue
        receipts_of[r.webhook_id].append(r)
    ids_per_firing: dict[tuple[str, str], set[str]] = defaultdict(set)
    for action_id, got in receipts_of.items():
        a = by_action[action_id]
        payload = json.loads(a["payload"])
        ok = [r for r in got if 200 <= r.status < 300]
        report.duplicates += max(0, len(ok) - 1)
        report.retried_5xx += sum(1 for r in got if r.status >= 500)
        if len({r.raw for r in got}) > 1:
            v.append(f"action {action_id} was sent with different bodies")
        if any(r.path != f"/{a['target']}" for r in got):
            v.append(f"action {action_id} for {a['target']} arrived at {got[0].path}")
        body = got[0].body
        if a["target"] == "chat":
            if body != {"text": payload["message"]}:
                v.append(f"notify {action_id}: unexpected Slack body {body}")
        elif (body.get("action_id"), body.get("type"), body.get("firing_id")) != (
            action_id,
            a["kind"],
            a["firing_id"],
        ):
            v.append(f"action {action_id} ({a['firing_id']}) arrived with body {body}")
        if action_id not in alert_ids:
            ids_per_firing[(a["firing_id"], a["kind"])].add(action_id)
        if a["kind"] == "release":
            rule = rules_by_id.get(a["rule_id"])
            if rule is None or rule.release != (payload["escrow"], Decimal(payload["amount"])):
                v.append(f"release {action_id} of {payload} does not match its rule")
    for (firing_id, kind), ids in ids_per_firing.items():
        if len(ids) > 1:
            v.append(f"firing {firing_id} sent its {kind} under {len(ids)} different ids")
    cancelled = {a["action_id"] for a in outbox if a["status"] == "cancelled"}
    for action_id in by_action.keys() - cancelled:
        if not any(200 <= r.status < 300 for r in receipts_of.get(action_id, [])):
            v.append(
                f"action {action_id} ({by_action[action_id]['kind']}) never reached the receiver"
            )

    # releases as the bank saw them: every release request answered 2xx, known or not
    paid: dict[str, dict[str, Any]] = {}  # release id -> body
    for r in receipts:
        body = r.body if r.verified else None
        if not isinstance(body, dict) or body.get("type") != "release":
            continue
        if not (r.idempotency_key == body.get("release_id") == r.webhook_id):
            v.append(
                f"release {r.webhook_id}: Idempotency-Key {r.idempotency_key}, "
                f"release_id {body.get('release_id')}"
            )
        if 200 <= r.status < 300:
            paid[str(body.get("release_id"))] = body
    report.releases_received = len(paid)
    if len(paid) != len(releases) - len(cancelled):
        v.append(
            f"{len(paid)} distinct releases received and paid, {len(releases)} queued, "
            f"{len(cancelled)} of them cancelled"
        )
    per_rule: dict[str, set[str]] = defaultdict(set)
    for release_id, body in paid.items():
        per_rule[str(body.get("rule_id"))].add(release_id)
        escrow = str(body.get("escrow"))
        report.released[escrow] = report.released.get(escrow, Decimal(0)) + Decimal(
            str(body.get("amount"))
        )
    for rule_id, ids in sorted(per_rule.items()):
        if len(ids) > 1:
            v.append(f"once-rule {rule_id} was paid {len(ids)} times: release ids {sorted(ids)}")
    for escrow, total in sorted(report.released.items()):
        limit = ESCROW_LIMITS.get(escrow)
        if limit is None or total > limit:
            v.append(f"{total} released from {escrow}, over its limit {limit}")
    check_ledger(report, outbox, movements, receipts, alerts, list(cancels), list(settlements))
    return report


LEDGER_SEQUENCES = {
    "pending": [("reserve",)],
    "dead": [("reserve",)],
    "cancelled": [("reserve", "cancel", "return")],
    "delivered": [
        ("reserve", "send"),
        ("reserve", "send", "settle"),
        ("reserve", "send", "fail", "return"),
    ],
}
"""The movements a release may have, in order, by its outbox status."""


def check_ledger(
    report: Report,
    outbox: list[Row],
    movements: list[Row],
    receipts: list[Receipt],
    alerts: list[Row],
    cancels: list[CancelPost],
    settlements: list[SettlementPost],
) -> None:
    """Step 6 of ``analyse``: the ledger's movements, cancels and settlements."""
    v = report.violations
    report.movements = len(movements)
    releases = {a["action_id"]: a for a in outbox if a["kind"] == "release"}
    moved: dict[str, list[str]] = defaultdict(list)
    for m in movements:
        moved[m["release_id"]].append(m["movement"])
    for release_id in moved.keys() - releases.keys():
        v.append(f"ledger movements of {release_id}, which is no release in the outbox")
    for release_id, a in releases.items():
        sequence = tuple(moved.get(release_id, []))
        if sequence not in LEDGER_SEQUENCES.get(a["status"], []):
            v.append(f"release {release_id} is {a['status']} with movements {list(sequence)}")
    # replayed in order, no reserve took its escrow past its limit
    committed: dict[str, Decimal] = defaultdict(Decimal)
    for m in movements:
        amount = Decimal(m["amount"])
        if m["movement"] == "reserve":
            committed[m["escrow"]] += amount
            limit = ESCROW_LIMITS.get(m["escrow"])
            if limit is None or committed[m["escrow"]] > limit:
                v.append(f"reserve {m['id']} took {m['escrow']} to {committed[m['escrow']]}")
        elif m["movement"] in ("cancel", "fail"):
            committed[m["escrow"]] -= amount
    # nothing cancelled was accepted by the bank, nor reached it after its cancel's answer
    cancelled = {r for r, a in releases.items() if a["status"] == "cancelled"}
    report.cancelled = len(cancelled)
    report.cancels_sent = len(cancels)
    report.cancels_refused = sum(1 for c in cancels if c.status == 409)
    answered = {c.release_id: c.answered_at for c in cancels if c.status == 200}
    for release_id in answered.keys() - cancelled:
        v.append(f"cancel of {release_id} was answered 200 but it is not cancelled")
    for r in receipts:
        if r.webhook_id not in cancelled:
            continue
        if 200 <= r.status < 300:
            v.append(f"cancelled release {r.webhook_id} was accepted by the bank")
        if r.at > answered.get(str(r.webhook_id), float("inf")):
            v.append(f"cancelled release {r.webhook_id} reached the bank after its cancel")
    expected_refusals = ("in flight", "is delivered", "is cancelled")
    for c in cancels:
        if c.status == 409 and not any(why in c.message for why in expected_refusals):
            v.append(f"cancel of {c.release_id} refused: {c.message}")
    # settlements: each acknowledged one recorded as sent; failures alerted once
    outcome = {}
    for m in movements:
        if m["movement"] in ("settle", "fail"):
            outcome[m["release_id"]] = "settled" if m["movement"] == "settle" else "failed"
    report.settled = sum(1 for o in outcome.values() if o == "settled")
    report.failed = sum(1 for o in outcome.values() if o == "failed")
    report.settlement_replays = sum(p.replays for p in settlements)
    for post in settlements:
        if post.status == 200 and outcome.get(post.release_id) != post.outcome:
            v.append(
                f"settlement {post.webhook_id} ({post.outcome}) was acknowledged, the ledger "
                f"says {outcome.get(post.release_id)}"
            )
    for release_id in outcome.keys() - {p.release_id for p in settlements}:
        v.append(f"release {release_id} settled by no callback sent")
    alerted: Counter[str] = Counter()
    for a in alerts:
        payload = json.loads(a["payload"])
        if payload.get("alert") != "settlement_failed":
            v.append(f"unexpected alert {payload.get('alert')}: {payload.get('message')}")
            continue
        alerted[str(payload.get("release_id"))] += 1
    failed = {r for r, o in outcome.items() if o == "failed"}
    for release_id in failed | set(alerted):
        if alerted[release_id] != (1 if release_id in failed else 0):
            v.append(f"release {release_id}: {alerted[release_id]} settlement_failed alerts")


def _describe(indexes: list[int], groups: list[list[Row]]) -> str:
    def one(i: int) -> str:
        if i < 0:
            return "(not a fact)"
        return f"{groups[i][0]['request_id']}@{groups[i][0]['seq']}"

    shown = ", ".join(one(i) for i in indexes[:6])
    return f"[{shown}{', ...' if len(indexes) > 6 else ''}] ({len(indexes)})"


async def run_crash_test(workdir: Path, *, seed: int, cycles: int, **options: Any) -> Report:
    """Run ``cycles`` kill cycles in ``workdir`` and return the checked ``Report``."""
    return await CrashRun(workdir, seed=seed, cycles=cycles, **options).run()


async def run_slow_commit_test(workdir: Path, *, seed: int, **options: Any) -> Report:
    """The slow-COMMIT scenario (see ``CrashRun.run_slow_commit``), checked."""
    return await CrashRun(workdir, seed=seed, cycles=1).run_slow_commit(**options)
