"""PostgreSQL: durable ingest with 1, 2 and 3 daemons on one database, and failover.

Run: ``python bench/bench_pg.py`` (1 daemon beside the bare baselines, about 60 s on 2
cores); ``--daemons 1,2,3`` adds the daemons sharing one database; ``--failover`` and
``--standby`` time deliveries taken over after a kill -9; ``--profile`` splits the CPU per
fact of one daemon on PostgreSQL and one on SQLite by thread; ``--help`` for the knobs. Needs the
PostgreSQL at ``--dsn`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).

What runs (everything on 127.0.0.1): a scratch database ``gk_bench_<random>`` (the one of
``bench_pg_driver.py``, ``synchronous_commit=on``), dropped at the end with everything in
it; each daemon set gets a fresh schema of its own in it (``gk_<n>d_<random>``).

- **gatekeeper, N daemons on one schema** — ``python -m gatekeeper serve`` processes, each
  on its own port with its own ``daemon_id``, all with the same 1,000 generated rules over
  20 projects (``p00``..``p19``, 50 rules each; each fact read by 5 of them, none fires:
  what is measured is ingest — validate, plan, commit the fact, 5 decisions and the rule
  states, answer).
- **baseline (a), bare asyncpg** — ``bench_pg_driver.py``'s server (a): an aiohttp process
  that parses the JSON body and answers once one multi-row INSERT of every body queued
  meanwhile is committed (group commit) through asyncpg: the floor of durable ingest into
  PostgreSQL here. **(c) bare psycopg 3 on a writer thread**, the same through the
  driver and design gatekeeper uses, for reference.

The load: ``wrk`` when installed (one process per server, the connections spread
round-robin over the servers), else an aiohttp client process that sends each request to
the next server in turn. Facts go round 200 task ids, 10 per project. Runs of every set
are interleaved; each figure is the median of ``--runs`` runs. CPU per fact is given for
the gatekeeper (or bare) processes, their PostgreSQL backends, PostgreSQL's background
processes (WAL writer, checkpointer, background writer), the load generator, and the
whole machine's busy cores, since on 2 cores all of them share the CPUs. Afterwards every
acknowledged fact must be in the fact log (the durability check).

Target: 1 daemon's facts/s >= 0.5 x baseline (a)'s. While one daemon at a time may serve a
database, a set of 2 or more daemons stops at the second one's start (DatabaseInUse): that
part is reported NOT MEASURED and the run exits 1, the other parts are measured.

Failover (``--failover``): ``--failover-daemons`` daemons on one schema, one rule per
project firing a notify on each fact, delivered to a receiver in this process. A trial
posts a firing fact for one project; the receiver holds that delivery unanswered (the
action is claimed: its outbox row names the daemon), the daemon named by the claim is
killed with SIGKILL, and another firing fact of the project is posted to a survivor. Timed
from the signal: the held action's delivery by a survivor (once the lease
``delivery_lease_s`` runs out), the new fact's delivery, and the first of the two (the
project's next delivery). The killed daemon starts again under a new ``daemon_id`` before
the next trial. ``--standby`` is the same with one daemon
serving and a standby that keeps trying to start (every ``--standby-retry-s``) until it
gets the database's one-daemon lock: kill -9 of the serving one, time to the delivery by
the standby, which releases the dead one's claims when it takes the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    BENCH_PROJECT,
    BENCH_TARGET,
    RULES_PER_FACT,
    Targets,
    add_strict_options,
    fmt,
    machine_header,
    median,
    rules_yaml,
    spread,
    table,
)
from bench_ingest import (
    HOST,
    SECRET_ENV,
    STARTUP_TIMEOUT_S,
    WRK_MARKER,
    Server,
    cpu_seconds,
    daemon_env,
    free_port,
    percentile,
    post_facts,
    start_process,
)
from bench_pg_driver import (
    DEFAULT_DSN,
    VARIANTS_BY_KEY,
    admin,
    children_cpu_seconds,
    create_scratch_database,
    default_loop,
    drop_database,
    get_stats,
)
from bench_pg_driver import start_server as start_bare_server

PROJECTS = 20
FACT_IDS = 200
"""Distinct task ids the load goes round, ``FACT_IDS // PROJECTS`` per project."""
REFUSED = "served by another gatekeeper daemon"
"""What a daemon refused by the database's one-daemon lock (DatabaseInUse) says."""
MULTI_DAEMON_NOTE = (
    "several daemons on one database are not served yet by this gatekeeper; run this part "
    "again once they are"
)
BASELINES = ("asyncpg", "psycopg-thread")


# ---------------------------------------------------------------------------------------------
# The workload: 20 projects


def project_of(index: int) -> str:
    return f"p{index:02d}"


def fact_body(n: int) -> dict[str, Any]:
    """The ``n``-th fact posted: task ``T-<n mod 200>`` of project ``p<(n mod 200) // 10>``."""
    j = n % FACT_IDS
    return {
        "project": project_of(j // (FACT_IDS // PROJECTS)),
        "kind": "task",
        "id": f"T-{j}",
        "data": {"status": "open", "priority": n % 7, "n": n},
    }


def ingest_rules(rules: int) -> dict[str, str]:
    """``{file name: YAML}``: ``rules`` generated rules (``_common.rules_yaml``, no time
    clause) split evenly over the 20 projects, one file each; project ``pK``'s rules read its
    own task ids ``T-<10K>``..``T-<10K+9>``, each read by 5 rules."""
    per_project = rules // PROJECTS
    if per_project != (FACT_IDS // PROJECTS) * RULES_PER_FACT:
        raise SystemExit(f"--rules must be {FACT_IDS * RULES_PER_FACT} (5 per task id)")
    files = {}
    for k in range(PROJECTS):
        text = rules_yaml(per_project, time_clause=False, start=k * per_project)
        text = text.replace("- id: bench/", f"- id: {project_of(k)}/")
        files[f"{project_of(k)}.yaml"] = text.replace(
            f"project: {BENCH_PROJECT}", f"project: {project_of(k)}"
        )
    return files


def failover_delivery(lease_s: float) -> str:
    """The bench target's delivery settings in the failover parts: a request timeout 5 s
    under the lease (the least the config allows), quick retries."""
    return (
        f"{{max_attempts: 20, timeout_s: {lease_s - 5:g}, backoff_base_s: 0.1, backoff_cap_s: 1}}"
    )


def failover_rules() -> dict[str, str]:
    """One event rule per project: a notify to the bench target for every ``task`` fact
    ``F`` posted with status ``go``."""
    lines = []
    for k in range(PROJECTS):
        lines += [
            f"- id: {project_of(k)}/deliver",
            f"  project: {project_of(k)}",
            '  when: \'task["F"].status == "go"\'',
            "  fire: each_fact",
            "  actions:",
            f'    - notify: {{target: {BENCH_TARGET}, message: "fact ${{rule_id}}"}}',
        ]
    return {"failover.yaml": "\n".join(lines) + "\n"}


def wrk_script() -> str:
    """A wrk Lua script posting ``fact_body(offset + i)`` and printing a JSON summary."""
    example = json.dumps(fact_body(0))
    assert '"id": "T-0"' in example  # keep the Lua format in step with fact_body
    per = FACT_IDS // PROJECTS
    return textwrap.dedent(
        f"""\
        local counter = 0
        local headers = {{["Content-Type"] = "application/json"}}
        init = function(args)
          counter = tonumber(args[1] or "0")
        end
        request = function()
          counter = counter + 1
          local j = counter % {FACT_IDS}
          local body = string.format(
            '{{"project": "p%02d", "kind": "task", "id": "T-%d", '
            .. '"data": {{"status": "open", "priority": %d, "n": %d}}}}',
            math.floor(j / {per}), j, counter % 7, counter)
          return wrk.format("POST", nil, headers, body)
        end
        done = function(summary, latency, requests)
          local e = summary.errors
          io.write(string.format(
            '{WRK_MARKER}{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
            .. '"errors": %d}}\\n',
            summary.requests, summary.duration, latency:percentile(50),
            latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
        end
        """
    )


# ---------------------------------------------------------------------------------------------
# Daemons


class Refused(Exception):
    """A daemon refused to start because another one serves its database (DatabaseInUse)."""


class PartRefused(Exception):
    """A part of the benchmark that needs several daemons on one database could not start
    them: the message says which daemon was refused and why."""


@dataclass
class Daemon:
    """A ``gatekeeper serve`` process: its ``daemon_id``, config and process."""

    daemon_id: str
    config: Path
    server: Server

    @property
    def pid(self) -> int:
        return self.server.process.pid

    @property
    def url(self) -> str:
        return self.server.url


def write_config(
    folder: Path,
    *,
    daemon_id: str,
    database: str,
    rules_dir: Path,
    target_url: str,
    delivery: str,
    lease_s: float | None = None,
) -> tuple[Path, int]:
    """``<daemon_id>.yaml`` in ``folder`` for a daemon on a free port; (path, port)."""
    port = free_port()
    config = folder / f"{daemon_id}.yaml"
    lease = "" if lease_s is None else f"delivery_lease_s: {lease_s:g}\n"
    config.write_text(
        f"listen: {HOST}:{port}\n"
        f"database: '{database}'\n"
        f"rules_dir: {rules_dir}\n"
        f"daemon_id: {daemon_id}\n"
        f"{lease}"
        "targets:\n"
        f"  {BENCH_TARGET}:\n"
        f"    url: {target_url}\n"
        f"    secret_env: {SECRET_ENV}\n"
        f"    delivery: {delivery}\n",
        encoding="utf-8",
    )
    return config, port


def spawn_daemon(
    folder: Path, config: Path, port: int, daemon_id: str, env: dict[str, str]
) -> Daemon:
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", "warning"]
    log = folder / f"{daemon_id}.log"
    return Daemon(daemon_id, config, start_process(daemon_id, command, port, log, env=env))


def daemon_state(daemon: Daemon) -> str:
    """``ready`` (``GET /healthz`` answers 200), ``starting``, or ``exited``."""
    if daemon.server.process.poll() is not None:
        return "exited"
    url = f"http://{HOST}:{daemon.server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return "ready" if answer.status == 200 else "starting"
    except (OSError, urllib.error.URLError):
        return "starting"


def refusal(daemon: Daemon) -> str | None:
    """The line of an exited daemon's log saying the database is served by another
    daemon (DatabaseInUse), or None."""
    for line in daemon.server.log_tail(40).splitlines():
        if REFUSED in line or "DatabaseInUse" in line:
            return str(re.sub(r"^[-0-9]+ [:,0-9]+ [A-Z]+ ", "", line.strip()))  # no time, level
    return None


def wait_daemon(daemon: Daemon, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until ``daemon`` answers ``GET /healthz``. Raises ``Refused`` when it exited
    refused by the one-daemon lock, ``SystemExit`` with its log's tail for any other exit
    or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = daemon_state(daemon)
        if state == "ready":
            return
        if state == "exited":
            why = refusal(daemon)
            if why is not None:
                raise Refused(why)
            raise SystemExit(f"{daemon.daemon_id} exited at startup:\n{daemon.server.log_tail()}")
        time.sleep(0.1)
    daemon.server.stop()
    raise SystemExit(f"{daemon.daemon_id} did not answer within {timeout_s:g} s")


def refused_message(daemon_id: str, line: str) -> str:
    return (
        f"a second daemon refused to start: DatabaseInUse ({daemon_id}: {line}); "
        f"{MULTI_DAEMON_NOTE}"
    )


def start_daemons(
    folder: Path,
    count: int,
    *,
    database: str,
    rules_dir: Path,
    target_url: str,
    delivery: str,
    env: dict[str, str],
    lease_s: float | None = None,
    prefix: str = "d",
) -> list[Daemon]:
    """``count`` daemons on ``database``, started one after another. Raises ``PartRefused``
    saying so when the second one is refused (one daemon per database)."""
    daemons: list[Daemon] = []
    try:
        for i in range(count):
            daemon_id = f"{prefix}{i}"
            config, port = write_config(
                folder,
                daemon_id=daemon_id,
                database=database,
                rules_dir=rules_dir,
                target_url=target_url,
                delivery=delivery,
                lease_s=lease_s,
            )
            daemon = spawn_daemon(folder, config, port, daemon_id, env)
            daemons.append(daemon)
            try:
                wait_daemon(daemon)
            except Refused as refused:
                raise PartRefused(refused_message(daemon_id, str(refused))) from None
    except BaseException:
        for daemon in daemons:
            daemon.server.stop()
        raise
    return daemons


# ---------------------------------------------------------------------------------------------
# The database and PostgreSQL's processes


def schema_url(scratch: str, schema: str) -> str:
    """The URL of ``schema`` in the scratch database (first on the search path)."""
    separator = "&" if "?" in scratch else "?"
    return f"{scratch}{separator}options=-csearch_path%3D{schema}"


def new_schema(scratch: str, label: str) -> tuple[str, str]:
    """A fresh schema ``gk_<label>_<random>`` in the scratch database: (name, URL)."""
    name = f"gk_{label}_{secrets.token_hex(3)}"
    admin(scratch, f'CREATE SCHEMA "{name}"')
    return name, schema_url(scratch, name)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def postmaster_pid(dsn: str) -> int | None:
    """The PostgreSQL server's main process (the parent of a backend), when it runs on
    this machine and ``/proc`` shows it; else None."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        fields = proc_stat(conn.info.backend_pid)
    return int(fields[1]) if fields else None


def background_pids(postmaster: int | None) -> list[int]:
    """PostgreSQL's background processes (WAL writer, checkpointer, background writer,
    ...): the postmaster's children that are not client backends, and the postmaster."""
    if postmaster is None:
        return []
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        if not fields or int(fields[1]) != postmaster:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "(" not in cmdline and "[local]" not in cmdline:  # a client backend: "host(port)"
            pids.append(int(entry.name))
    return pids


def gatekeeper_backends(dsn: str, pids: Sequence[int]) -> list[int]:
    """The PostgreSQL backends of the gatekeeper processes ``pids`` (their sessions'
    ``application_name`` is ``gatekeeper <host>:<pid>``)."""
    names = [f"gatekeeper {socket.gethostname()}:{pid}"[:63] for pid in pids]
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)", (names,)
        ).fetchall()
    return [int(row[0]) for row in rows]


def total_cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Load and measurement


@dataclass(frozen=True)
class Load:
    """One load run's client-side figures, all servers together."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float


def run_wrk(urls: Sequence[str], script: Path, connections: int, seconds: float) -> Load:
    """One ``wrk`` process per URL at once, the connections dealt round-robin over them;
    each posts from its own offset of the fact sequence."""
    shares = [len(range(i, connections, len(urls))) for i in range(len(urls))]
    processes = []
    for i, (url, share) in enumerate(zip(urls, shares, strict=True)):
        command = ["wrk", "-t1", f"-c{max(1, share)}", f"-d{max(1, round(seconds))}s"]
        command += ["--timeout", "10s", "-s", str(script), url, "--", str(i * 1_000_000_000)]
        processes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        line = next((x for x in out.splitlines() if x.startswith(WRK_MARKER)), None)
        if process.returncode != 0 or line is None:
            raise SystemExit(f"wrk failed ({process.returncode}):\n{out}\n{err}")
        results.append(json.loads(line[len(WRK_MARKER) :]))
    return Load(
        requests=sum(r["requests"] for r in results),
        errors=sum(r["errors"] for r in results),
        seconds=max(r["duration_us"] for r in results) / 1e6,
        p50_ms=median([r["p50_us"] / 1000 for r in results]),
        p99_ms=max(r["p99_us"] / 1000 for r in results),
    )


def run_aiohttp(urls: Sequence[str], connections: int, seconds: float) -> Load:
    """This file's aiohttp load generator in its own process (see ``aiohttp_load``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--load", ",".join(urls)]
    command += ["--connections", str(connections), "--seconds", str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"load generator failed:\n{done.stdout}\n{done.stderr}")
    return Load(**json.loads(done.stdout.strip().splitlines()[-1]))


async def aiohttp_load(urls: Sequence[str], connections: int, seconds: float) -> Load:
    """``connections`` workers posting ``fact_body(n)`` for ``seconds``, request ``n`` to
    ``urls[n % len(urls)]`` (round-robin over the servers: ``bench_ingest.post_facts``)."""
    latencies, errors, elapsed = await post_facts(
        urls, connections, seconds, lambda n: json.dumps(fact_body(n))
    )
    return Load(
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )


@dataclass
class System:
    """What one load run is sent to: one or more server processes and their URLs."""

    label: str
    servers: list[Server]
    urls: list[str]
    backends: Callable[[], list[int]]
    """The PostgreSQL backends serving these processes (asked before each run)."""
    acknowledged: int = 0
    runs: list[Measured] = field(default_factory=list)


@dataclass(frozen=True)
class Measured:
    """One load run: facts/s and latency, CPU per fact of each part, the machine's busy
    cores."""

    load: Load
    server_cpu_us: float
    backend_cpu_us: float
    background_cpu_us: float
    client_cpu_us: float
    busy_cores: float

    @property
    def rps(self) -> float:
        return (self.load.requests - self.load.errors) / self.load.seconds

    @property
    def total_cpu_us(self) -> float:
        return self.server_cpu_us + self.backend_cpu_us + self.background_cpu_us


def measure(
    system: System, args: argparse.Namespace, seconds: float, background: list[int]
) -> Measured:
    """One load run against ``system`` (``args.generator``, ``args.connections``)."""
    pids = [s.process.pid for s in system.servers]
    backends = system.backends()
    before = (total_cpu(pids), total_cpu(backends), total_cpu(background))
    client = children_cpu_seconds()
    busy = machine_busy_seconds()
    wall = time.monotonic()
    if args.generator == "wrk":
        load = run_wrk(system.urls, args.script, args.connections, seconds)
    else:
        load = run_aiohttp(system.urls, args.connections, seconds)
    wall = time.monotonic() - wall
    busy = machine_busy_seconds() - busy
    client = children_cpu_seconds() - client
    after = (total_cpu(pids), total_cpu(backends), total_cpu(background))
    done = max(1, load.requests - load.errors)
    system.acknowledged += load.requests - load.errors
    us = [(b - a) * 1e6 / done for a, b in zip(before, after, strict=True)]
    return Measured(load, us[0], us[1], us[2], client * 1e6 / done, busy / wall)


def check_one_post(url: str) -> None:
    """Post one fact and require a 200, so a broken setup fails before the load."""
    request = urllib.request.Request(
        url,
        data=json.dumps(fact_body(0)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise SystemExit(f"POST {url} answered {error.code}: {error.read()!r}") from None


def row(label: str, runs: list[Measured], baseline_rps: float | None) -> list[str]:
    rps = [m.rps for m in runs]
    ratio = f"{median(rps) / baseline_rps:.3f}" if baseline_rps else "-"
    return [
        label,
        fmt(median(rps)),
        spread(rps),
        ratio,
        f"{median([m.load.p50_ms for m in runs]):.2f}",
        f"{median([m.load.p99_ms for m in runs]):.2f}",
        fmt(median([m.server_cpu_us for m in runs])),
        fmt(median([m.backend_cpu_us for m in runs])),
        fmt(median([m.background_cpu_us for m in runs])),
        fmt(median([m.total_cpu_us for m in runs])),
        fmt(median([m.client_cpu_us for m in runs])),
        f"{median([m.busy_cores for m in runs]):.2f}",
        str(sum(m.load.errors for m in runs)),
    ]


HEADERS = [
    "what",
    "facts/s",
    "min..max",
    "÷ (a)",
    "p50 ms",
    "p99 ms",
    "server µs/fact",
    "PG backends µs/fact",
    "PG background µs/fact",
    "server+PG µs/fact",
    "client µs/fact",
    "busy cores",
    "errors",
]


# ---------------------------------------------------------------------------------------------
# Ingest: 1, 2, 3 daemons beside the bare baselines


def parse_daemon_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--daemons: a comma-separated list of counts, not {text!r}") from None
    if not counts or counts[0] < 1:
        raise SystemExit("--daemons: counts of at least 1")
    return counts


def start_daemon_set(
    folder: Path, scratch: str, count: int, args: argparse.Namespace, env: dict[str, str]
) -> tuple[System, str]:
    """``count`` daemons on a fresh schema, with the ingest rules: (the system, the
    schema's URL)."""
    _, url = new_schema(scratch, f"{count}d")
    sub = folder / f"{count}d"
    sub.mkdir()
    rules_dir = sub / "rules"
    rules_dir.mkdir()
    for name, text in ingest_rules(args.rules).items():
        (rules_dir / name).write_text(text, encoding="utf-8")
    closed = f"http://{HOST}:{free_port()}/nobody-listens"
    started = time.perf_counter()
    daemons = start_daemons(
        sub,
        count,
        database=url,
        rules_dir=rules_dir,
        target_url=closed,
        delivery="{max_attempts: 1, timeout_s: 1}",
        env=env,
        prefix=f"n{count}-d",
    )
    print(
        f"   {count} daemon(s) started on schema {url.rsplit('%3D', 1)[1]} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    pids = [d.pid for d in daemons]
    label = f"gatekeeper, {count} daemon{'s' if count > 1 else ''}"
    system = System(
        label,
        [d.server for d in daemons],
        [d.url for d in daemons],
        lambda: gatekeeper_backends(scratch, pids),
    )
    for daemon in daemons:
        check_one_post(daemon.url)
    system.acknowledged += len(daemons)
    return system, url


def fact_log_count(url: str) -> int:
    (count,) = admin(url, "SELECT count(*) FROM fact_log")
    return int(count)


def run_ingest(args: argparse.Namespace, scratch: str, folder: Path, targets: Targets) -> None:
    counts = parse_daemon_counts(args.daemons)
    env = daemon_env()
    background = background_pids(postmaster_pid(scratch))
    bare: list[System] = []
    sets: list[tuple[System, str]] = []
    stop: list[Server] = []
    try:
        for key in args.baselines:
            variant = VARIANTS_BY_KEY[key]
            server = start_bare_server(variant, scratch, folder, args.loop)
            stop.append(server)
            backend = [int(get_stats(server)["backend_pid"])]
            url = f"http://{HOST}:{server.port}/facts"
            check_one_post(url)
            bare.append(System(variant.label, [server], [url], backend.copy, 1))
        for count in counts:
            try:
                system, url = start_daemon_set(folder, scratch, count, args, env)
            except PartRefused as refused:
                print(f"   FAIL  {count} daemons: {refused}")
                args.failures.append(f"{count} daemons: {refused}")
                continue
            stop.extend(system.servers)
            sets.append((system, url))
        systems = [*bare, *(s for s, _ in sets)]
        for system in systems:
            measure(system, args, args.warmup, background)
        for _ in range(args.runs):
            for system in systems:
                system.runs.append(measure(system, args, args.seconds, background))
        for server in stop:
            server.stop()
        stored = {s.label: fact_log_count(url) for s, url in sets}
        bare_rows = fact_log_count(scratch)
    finally:
        for server in stop:
            server.stop()

    baseline = median([m.rps for m in bare[0].runs]) if bare else None
    print()
    print(table(HEADERS, [row(s.label, s.runs, baseline) for s in systems]))
    print(
        "\n   server: the gatekeeper (or bare) processes; PG backends: their sessions' "
        "backends; PG background: WAL writer, checkpointer, ... (shared with any other "
        "user of the server); busy cores: the whole machine, of "
        f"{os.cpu_count()}"
    )
    for system, _ in sets:
        print(
            f"   durability check, {system.label}: {system.acknowledged:,} facts acknowledged "
            f"(warm-up included), {stored[system.label]:,} in fact_log"
        )
        if stored[system.label] < system.acknowledged:
            print("   ERROR: fewer facts in the log than were acknowledged")
            targets.failed += 1
    acknowledged_bare = sum(s.acknowledged for s in bare)
    print(f"   durability check, baselines: {acknowledged_bare:,} acknowledged, {bare_rows:,} rows")
    if bare_rows < acknowledged_bare:
        print("   ERROR: fewer baseline rows than were acknowledged")
        targets.failed += 1
    if baseline and sets and sets[0][0].label.endswith("1 daemon"):
        one = median([m.rps for m in sets[0][0].runs])
        cpu = median([m.total_cpu_us for m in sets[0][0].runs]) / median(
            [m.total_cpu_us for m in bare[0].runs]
        )
        print(
            f"   server+PG CPU per fact, 1 daemon ÷ {bare[0].label}: {cpu:.2f} (where the CPU "
            f"is what runs out, 1 daemon's facts/s come to about 1/{cpu:.1f} of its)"
        )
        targets.check("1 daemon facts/s ÷ bare asyncpg facts/s", one / baseline, ">=", 0.5)
    if len(sets) > 1:
        first = sets[0][0]
        for system, _ in sets[1:]:
            gain = median([m.rps for m in system.runs]) / median([m.rps for m in first.runs])
            cpu = median([m.total_cpu_us for m in system.runs]) / median(
                [m.total_cpu_us for m in first.runs]
            )
            print(
                f"   {system.label} ÷ {first.label}: facts/s {gain:.2f}, server+PG CPU per "
                f"fact {cpu:.2f}"
            )


# ---------------------------------------------------------------------------------------------
# Failover: a receiver in this process


@dataclass
class Delivery:
    at: float
    """``time.monotonic()`` when the request arrived (the same clock in every process)."""
    project: str
    action_id: str


class Receiver:
    """An aiohttp receiver recording every delivery (arrival time, project, action id).
    ``hold(project)`` makes it keep the next delivery of that project unanswered until
    ``release()``: its action stays claimed by the daemon that sent it."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Condition()
        self._hold: str | None = None
        self.held: Delivery | None = None
        self._release = asyncio.Event()
        self._runner: Any = None
        self.port = 0

    async def start(self) -> str:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/deliver", self._deliver)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, HOST, self.port).start()
        return f"http://{HOST}:{self.port}/deliver"

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def hold(self, project: str) -> None:
        self._hold, self.held = project, None
        self._release.clear()

    def release(self) -> None:
        self._hold = None
        self._release.set()

    async def _deliver(self, request: Any) -> Any:
        from aiohttp import web

        at = time.monotonic()
        body = await request.json()
        delivery = Delivery(at, str(body.get("project")), str(body.get("action_id")))
        async with self.arrived:
            self.deliveries.append(delivery)
            self.arrived.notify_all()
        if self._hold == delivery.project and self.held is None:
            self.held = delivery
            with contextlib.suppress(asyncio.CancelledError):
                await self._release.wait()
        return web.json_response({"ok": True})

    async def wait_for(self, test: Callable[[Delivery], bool], timeout_s: float) -> Delivery | None:
        """The first recorded delivery passing ``test`` (waiting up to ``timeout_s``)."""

        def found() -> Delivery | None:
            return next((d for d in self.deliveries if test(d)), None)

        async with self.arrived:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.arrived.wait_for(lambda: found() is not None), timeout_s
                )
        return found()


async def post_fact(url: str, body: dict[str, Any]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
        if answer.status != 200:
            raise SystemExit(f"POST {url} answered {answer.status}: {await answer.text()}")


async def try_post(url: str, body: dict[str, Any]) -> str:
    """Post one fact; ``"200"``, or what went wrong (another status and its body, or the
    client's error), never raising."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
            return "200" if answer.status == 200 else f"{answer.status}: {await answer.text()}"
    except (aiohttp.ClientError, OSError) as error:
        return f"{type(error).__name__}: {error}"


async def claim_of(url: str, action_id: str) -> tuple[str | None, str | None]:
    """(``claimed_by``, ``lease_until``) of an outbox row."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT claimed_by, lease_until FROM outbox WHERE action_id = %s", (action_id,)
        )
        found = await cursor.fetchone()
    return (found[0], found[1]) if found else (None, None)


@dataclass
class Trial:
    """One kill -9: seconds from the signal to deliveries of the project (None: none came
    within the lease + 60 s)."""

    project: str
    killed: str
    held_s: float | None
    """... to the held action's delivery by another daemon (its claim taken over)."""
    new_s: float | None = None
    """... to the delivery of a new fact's action, the fact posted to a survivor right after
    the kill (None also when no daemon survived: ``--standby``)."""

    @property
    def next_s(self) -> float | None:
        """... to the project's next delivery, whichever came first."""
        times = [t for t in (self.held_s, self.new_s) if t is not None]
        return min(times) if times else None


def kill9(daemon: Daemon) -> float:
    """SIGKILL ``daemon``; ``time.monotonic()`` when the signal was sent."""
    at = time.monotonic()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.server.process.wait()
    return at


async def until_ready(daemon: Daemon, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """``wait_daemon`` off the event loop (the receiver keeps answering meanwhile)."""
    await asyncio.to_thread(wait_daemon, daemon, timeout_s)


async def one_trial(
    number: int,
    receiver: Receiver,
    url: str,
    daemons: dict[str, Daemon],
    post_to: Daemon,
    timeout_s: float,
) -> tuple[Trial, Daemon]:
    """Post a firing fact for one project to ``post_to``, hold its delivery at the
    receiver, SIGKILL the daemon whose claim the outbox row names; then post another
    firing fact of the project to a survivor, if any, and wait for the held action's
    delivery and the new one's. Returns the trial and the daemon killed."""
    project = project_of(number % PROJECTS)
    receiver.hold(project)
    fact = {"project": project, "kind": "task", "id": "F", "data": {"status": "go", "n": number}}
    await post_fact(post_to.url, fact)
    held = await receiver.wait_for(lambda d: d.project == project and receiver.held is d, timeout_s)
    if held is None:
        raise SystemExit(
            f"trial {number}: the delivery of {project} did not arrive in {timeout_s:g} s"
        )
    claimed_by, _ = await claim_of(url, held.action_id)
    if claimed_by not in daemons:
        raise SystemExit(
            f"trial {number}: action {held.action_id} is claimed by {claimed_by!r}, none of "
            f"{sorted(daemons)}"
        )
    victim = daemons[claimed_by]
    killed_at = await asyncio.to_thread(kill9, victim)
    survivors = [d for d in daemons.values() if d is not victim]
    posting = None
    if survivors:  # the fact may wait (the project serialised elsewhere): in the background
        again = {**fact, "data": {"status": "go", "n": number, "after_kill": True}}
        posting = asyncio.create_task(try_post(survivors[0].url, again))
    deadline = killed_at + timeout_s
    taken_over = await receiver.wait_for(
        lambda d: d.action_id == held.action_id and d.at > killed_at,
        deadline - time.monotonic(),
    )
    new = None
    if posting is not None:
        new = await receiver.wait_for(
            lambda d: d.project == project and d.action_id != held.action_id and d.at > killed_at,
            max(0.0, deadline - time.monotonic()),
        )
        if not posting.done():
            posting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            answer = await posting
            if answer != "200":
                print(f"   trial {number + 1}: the survivor answered the new fact {answer}")
    receiver.release()
    trial = Trial(
        project,
        claimed_by,
        None if taken_over is None else taken_over.at - killed_at,
        None if new is None else new.at - killed_at,
    )
    return trial, victim


async def failover(args: argparse.Namespace, scratch: str, folder: Path) -> list[Trial]:
    """``--failover``: survivors take over a killed daemon's claimed delivery."""
    _, url = new_schema(scratch, "failover")
    env = daemon_env()
    rules_dir = folder / "failover-rules"
    rules_dir.mkdir()
    for name, text in failover_rules().items():
        (rules_dir / name).write_text(text, encoding="utf-8")
    receiver = Receiver()
    target = await receiver.start()
    delivery = failover_delivery(args.lease)
    daemons: dict[str, Daemon] = {}
    try:
        started = await asyncio.to_thread(
            start_daemons,
            folder,
            args.failover_daemons,
            database=url,
            rules_dir=rules_dir,
            target_url=target,
            delivery=delivery,
            env=env,
            lease_s=args.lease,
            prefix="f",
        )
        daemons = {d.daemon_id: d for d in started}
        trials = []
        for number in range(args.trials):
            alive = list(daemons.values())
            trial, victim = await one_trial(
                number, receiver, url, daemons, alive[number % len(alive)], args.lease + 60
            )
            trials.append(trial)
            print(
                f"   trial {number + 1}: killed {trial.killed}: held action "
                f"{show_seconds(trial.held_s)}, new fact's {show_seconds(trial.new_s)}"
            )
            del daemons[victim.daemon_id]
            again_id = f"{victim.daemon_id.split('-r')[0]}-r{number + 1}"
            config, port = write_config(
                folder,
                daemon_id=again_id,
                database=url,
                rules_dir=rules_dir,
                target_url=target,
                delivery=delivery,
                lease_s=args.lease,
            )
            again = spawn_daemon(folder, config, port, again_id, env)
            daemons[again_id] = again
            try:
                await until_ready(again)
            except Refused as refused:
                raise PartRefused(refused_message(again_id, str(refused))) from None
        return trials
    finally:
        receiver.release()
        for daemon in daemons.values():
            await asyncio.to_thread(daemon.server.stop)
        await receiver.close()


async def standby(args: argparse.Namespace, scratch: str, folder: Path) -> list[Trial]:
    """``--standby``: one daemon serves; a standby retries its start every
    ``--standby-retry-s`` until it gets the one-daemon lock. Each trial kills the serving
    one; the standby takes over, the killed one becomes the next standby."""
    _, url = new_schema(scratch, "standby")
    env = daemon_env()
    rules_dir = folder / "standby-rules"
    rules_dir.mkdir()
    for name, text in failover_rules().items():
        (rules_dir / name).write_text(text, encoding="utf-8")
    receiver = Receiver()
    target = await receiver.start()
    delivery = failover_delivery(args.lease)
    starts = refusals = 0
    cycle_s = args.standby_retry_s
    live: list[Daemon] = []

    def configure(daemon_id: str) -> tuple[Path, int]:
        return write_config(
            folder,
            daemon_id=daemon_id,
            database=url,
            rules_dir=rules_dir,
            target_url=target,
            delivery=delivery,
            lease_s=args.lease,
        )

    async def keep_starting(name: str) -> Daemon:
        """Start ``name`` again and again, ``--standby-retry-s`` apart, until it serves."""
        nonlocal starts, refusals, cycle_s
        while True:
            starts += 1
            tried = time.monotonic()
            daemon_id = f"{name}-s{starts}"
            config, port = configure(daemon_id)
            daemon = spawn_daemon(folder, config, port, daemon_id, env)
            live.append(daemon)
            try:
                await until_ready(daemon)
                return daemon
            except Refused:
                live.remove(daemon)
                refusals += 1
                cycle_s = time.monotonic() - tried + args.standby_retry_s
                await asyncio.sleep(args.standby_retry_s)

    trials = []
    standby_task: asyncio.Task[Daemon] | None = None
    try:
        active = await keep_starting("a")
        names = ["b", "a"]
        for number in range(args.trials):
            before = refusals
            standby_task = asyncio.create_task(keep_starting(names[number % 2]))
            while refusals == before:  # the standby is waiting for the lock...
                await asyncio.sleep(0.05)
            # ...and killed at a random point of its cycle (a start refused, the pause)
            await asyncio.sleep(random.uniform(0, cycle_s))
            trial, victim = await one_trial(
                number, receiver, url, {active.daemon_id: active}, active, args.lease + 60
            )
            live.remove(victim)
            trials.append(trial)
            active = await standby_task
            print(
                f"   trial {number + 1}: killed {trial.killed}: {show_seconds(trial.held_s)} "
                f"(the standby had been refused {refusals - before} times)"
            )
        return trials
    finally:
        if standby_task is not None:
            standby_task.cancel()
        receiver.release()
        for daemon in live:
            await asyncio.to_thread(daemon.server.stop)
        await receiver.close()


def show_seconds(value: float | None) -> str:
    return "no delivery in time" if value is None else f"{value:.2f} s"


def report_trials(title: str, trials: list[Trial], args: argparse.Namespace) -> None:
    print(f"\n   {title}: {len(trials)} trials, delivery_lease_s {args.lease:g}")
    for label, values in (
        ("next delivery of the project", [t.next_s for t in trials]),
        ("the held action delivered by another daemon", [t.held_s for t in trials]),
        ("a new fact's action, posted to a survivor", [t.new_s for t in trials]),
    ):
        times = sorted(v for v in values if v is not None)
        if not times:
            continue
        missing = len(values) - len(times)
        print(
            f"   kill -9 → {label}: p50 {median(times):.2f} s, max {max(times):.2f} s, "
            f"min {min(times):.2f} s ({len(times)} trials"
            + (f"; {missing} saw none within the lease + 60 s)" if missing else ")")
        )


# ---------------------------------------------------------------------------------------------
# Profile: where one daemon's CPU goes, PostgreSQL against SQLite


def thread_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of process ``pid`` (``/proc``)."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError):
                text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = text.rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


@dataclass(frozen=True)
class ThreadSplit:
    """A daemon's CPU per fact in one run, µs: its main thread (the event loop: HTTP,
    planning, applying), its busiest other thread (the store's writer thread: rows,
    driver, SQLite's own work), its other threads."""

    main: float
    writer: float
    others: float


def split_threads(
    pid: int, before: dict[int, float], after: dict[int, float], facts: int
) -> ThreadSplit:
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main = used.pop(pid, 0.0)
    writer = max(used.values(), default=0.0)
    others = sum(used.values()) - writer
    return ThreadSplit(*(x * 1e6 / max(1, facts) for x in (main, writer, others)))


def run_profile(args: argparse.Namespace, scratch: str, folder: Path) -> None:
    """``--profile``: one daemon on PostgreSQL and one on a SQLite file, the same rules
    and load, runs interleaved; each one's CPU per fact split by thread, with the
    PostgreSQL backends beside."""
    env = daemon_env()
    background = background_pids(postmaster_pid(scratch))
    sub = folder / "profile"
    sub.mkdir()
    rules_dir = sub / "rules"
    rules_dir.mkdir()
    for name, text in ingest_rules(args.rules).items():
        (rules_dir / name).write_text(text, encoding="utf-8")
    _, url = new_schema(scratch, "profile")
    closed = f"http://{HOST}:{free_port()}/nobody-listens"
    systems: list[tuple[System, Daemon]] = []
    try:
        for label, database in (("PostgreSQL", url), ("SQLite", str(sub / "gatekeeper.db"))):
            [daemon] = start_daemons(
                sub,
                1,
                database=database,
                rules_dir=rules_dir,
                target_url=closed,
                delivery="{max_attempts: 1, timeout_s: 1}",
                env=env,
                prefix=f"{label.lower()}-d",
            )
            pids = [daemon.pid]
            backends: Callable[[], list[int]] = list
            if label == "PostgreSQL":
                backends = functools.partial(gatekeeper_backends, scratch, pids)
            system = System(f"gatekeeper on {label}", [daemon.server], [daemon.url], backends)
            systems.append((system, daemon))
        splits: dict[str, list[ThreadSplit]] = {s.label: [] for s, _ in systems}
        for system, _ in systems:
            measure(system, args, args.warmup, background)
        for _ in range(args.runs):
            for system, daemon in systems:
                before = thread_cpu(daemon.pid)
                measured = measure(system, args, args.seconds, background)
                facts = measured.load.requests - measured.load.errors
                splits[system.label].append(
                    split_threads(daemon.pid, before, thread_cpu(daemon.pid), facts)
                )
                system.runs.append(measured)
    finally:
        for _, daemon in systems:
            daemon.server.stop()
    rows = []
    for system, _ in systems:
        runs, parts = system.runs, splits[system.label]
        rows.append(
            [
                system.label,
                fmt(median([m.rps for m in runs])),
                fmt(median([p.main for p in parts])),
                fmt(median([p.writer for p in parts])),
                fmt(median([p.others for p in parts])),
                fmt(median([m.backend_cpu_us for m in runs])),
                fmt(median([m.total_cpu_us for m in runs])),
                f"{median([m.busy_cores for m in runs]):.2f}",
            ]
        )
    print()
    print(
        table(
            [
                "profile (1 daemon)",
                "facts/s",
                "main thread µs/fact",
                "writer thread µs/fact",
                "other threads µs/fact",
                "PG backends µs/fact",
                "total µs/fact",
                "busy cores",
            ],
            rows,
        )
    )
    print(
        "   main thread: the event loop (HTTP, validation, planning, applying); writer thread:"
        " the store's (rows, driver or SQLite); total includes PG's background processes"
    )


def run_failover_part(part: str, args: argparse.Namespace, scratch: str, folder: Path) -> None:
    """``--standby`` or ``--failover``: the trials and their p50 and max."""
    if part == "standby":
        print(
            "\n   standby takeover: one daemon serving, a standby retrying its start every "
            f"{args.standby_retry_s:g} s"
        )
        trials = asyncio.run(standby(args, scratch, folder))
        report_trials("standby takeover (one daemon serves the database)", trials, args)
    else:
        print(f"\n   failover: {args.failover_daemons} daemons on one database")
        trials = asyncio.run(failover(args, scratch, folder))
        report_trials(f"failover to a survivor ({args.failover_daemons} daemons)", trials, args)


def run(args: argparse.Namespace) -> int:
    args.failures = []
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    args.generator = args.load_generator
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "aiohttp"
    print(machine_header("bench_pg: PostgreSQL ingest with 1..N daemons, failover"))
    name, scratch = create_scratch_database(args.dsn)
    version, sync_commit, fsync = admin(
        scratch, "SHOW server_version", "SHOW synchronous_commit", "SHOW fsync"
    )
    print(
        f"   PostgreSQL {version} (synchronous_commit={sync_commit}, fsync={fsync}) at "
        f"{args.dsn.rpartition('/')[0]}, scratch database {name}"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-pg-"))
    args.script = folder / "post_fact.lua"
    args.script.write_text(wrk_script(), encoding="utf-8")
    started = time.perf_counter()
    try:
        if not args.skip_ingest:
            print(
                f"   ingest: {args.rules:,} rules over {PROJECTS} projects, daemons "
                f"{args.daemons}; load: {args.generator}, {args.connections} connections, "
                f"{args.runs} interleaved runs of {args.seconds:g} s (+{args.warmup:g} s "
                "warm-up); figures are medians"
            )
            run_ingest(args, scratch, folder, targets)
        if args.profile:
            run_profile(args, scratch, folder)
        for part, wanted in (("standby", args.standby), ("failover", args.failover)):
            if not wanted:
                continue
            try:
                run_failover_part(part, args, scratch, folder)
            except PartRefused as refused:
                print(f"   FAIL  {part}: {refused}")
                args.failures.append(f"{part}: {refused}")
    finally:
        drop_database(args.dsn, name)
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time; {name} dropped")
    for failure in args.failures:
        print(f"   NOT MEASURED  {failure}")
    return 1 if args.failures else targets.exit_code()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="a database to create the scratch one")
    parser.add_argument("--rules", type=int, default=1000, help="rules loaded in each daemon")
    parser.add_argument("--daemons", default="1", help="daemon counts to measure, e.g. 1,2,3")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections")
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "aiohttp"],
        default="auto",
        help="auto: wrk when it is on PATH, else the aiohttp client",
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="bare endpoints measured beside (the first is the ratio's baseline)",
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default=default_loop(),
        help="the bare endpoints' event loop (default: uvloop when installed, as gatekeeper)",
    )
    parser.add_argument("--skip-ingest", action="store_true", help="no ingest measurement")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="1 daemon on PostgreSQL beside 1 on SQLite: CPU per fact by thread",
    )
    parser.add_argument("--failover", action="store_true", help="time failover to survivors")
    parser.add_argument("--failover-daemons", type=int, default=2, help="daemons in --failover")
    parser.add_argument("--standby", action="store_true", help="time a standby's takeover")
    parser.add_argument(
        "--standby-retry-s", type=float, default=0.5, help="how often the standby tries to start"
    )
    parser.add_argument("--trials", type=int, default=20, help="kill -9 trials")
    parser.add_argument(
        "--lease", type=float, default=10.0, help="delivery_lease_s of the failover daemons"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    add_strict_options(parser)
    # Internal mode: this file is also the aiohttp load generator.
    parser.add_argument("--load", metavar="URLS", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load is not None:
        result = asyncio.run(aiohttp_load(args.load.split(","), args.connections, args.seconds))
        print(json.dumps(result.__dict__))
        return 0
    if args.failover_daemons < 2:
        raise SystemExit("--failover-daemons: at least 2 (one killed, the others survive)")
    if args.lease < 6:
        raise SystemExit("--lease: at least 6 s (a target's timeout_s of 1 s plus 5 s)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
