"""Durable ingest over HTTP: ``POST /v1/facts`` to the real daemon, beside two baselines.

Run: ``python bench/bench_ingest.py`` (about 50 s on 2 cores); ``--help`` for the knobs.

What runs (everything on 127.0.0.1, in a temporary directory that is removed afterwards):

- **gatekeeper** — ``python -m gatekeeper serve`` in its own process with 1,000 generated
  rules (each fact is read by 5 of them; the facts posted never make one fire, so what is
  measured is ingest: validate, plan, commit fact + 5 decisions + 5 rule states with
  ``synchronous=FULL``, answer). The one target points at a closed local port with
  ``max_attempts: 1``; its secret comes from the environment.
- **baseline (a), bare aiohttp** — an aiohttp endpoint in its own process that only parses
  the JSON body and answers: the ceiling for any aiohttp JSON API on this machine.
- **baseline (b), raw SQLite** — one small row inserted and committed per transaction with
  ``journal_mode=WAL`` and ``synchronous=FULL`` (what the store uses), in this process: the
  cost of durability alone, i.e. the ceiling for a server that commits (fsyncs) once per
  request.

The load comes from a separate process: ``wrk`` when it is installed (with a Lua script that
posts a different fact each time), else an aiohttp client (``--load-generator aiohttp``),
with ``--connections`` concurrent connections for ``--seconds`` per run. The two servers run
side by side and their runs are interleaved; each figure is the median of ``--runs`` runs.
The later target from the brief (informational): gatekeeper's requests/s >= 0.5 x the bare
endpoint's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    BENCH_PROJECT,
    BENCH_TARGET,
    RULES_PER_FACT,
    GroupCommitter,
    Targets,
    add_strict_options,
    fact_count,
    fmt,
    machine_header,
    median,
    ruleset_files,
    spread,
    table,
)

HOST = "127.0.0.1"
SECRET_ENV = "GATEKEEPER_BENCH_SECRET"
STARTUP_TIMEOUT_S = 120.0
WRK_MARKER = "WRKJSON "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="rules loaded in the daemon")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections")
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "aiohttp"],
        default="auto",
        help="auto: wrk when it is on PATH, else the aiohttp client",
    )
    parser.add_argument(
        "--sqlite-seconds", type=float, default=2.0, help="seconds per raw SQLite run"
    )
    parser.add_argument(
        "--time-rules",
        action="store_true",
        help="give the rules a days_since clause (the daemon then re-evaluates them every s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--database",
        metavar="URL",
        default="gatekeeper.db",
        help="the daemon's database: a postgresql://user@host:port/dbname URL of an empty "
        "database (the password from PGPASSWORD), or a SQLite file in the temporary folder "
        "(default: gatekeeper.db); not with --also",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=SPEC",
        help="another gatekeeper measured in the same run, interleaved with this tree's: SPEC "
        "is a comma-separated list of src:DIR (the src directory of another checkout, e.g. a "
        "`git archive` of an older commit, put first on PYTHONPATH) and/or loop:asyncio|uvloop "
        "(GATEKEEPER_EVENT_LOOP); repeatable. E.g. --also before=src:/tmp/old/src",
    )
    add_strict_options(parser)
    # Internal modes: this file is also the bare server and the aiohttp load generator.
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-bare-durable", nargs=2, metavar=("PORT", "DB"), help=argparse.SUPPRESS
    )
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class RunResult:
    """One load run: completed requests per second and latency percentiles (ms)."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu_us: float | None = None
    """Server CPU time (user + system) per completed request, µs; None when unknown."""


def summarize(name: str, runs: list[RunResult]) -> list[str]:
    """A table row: medians of the runs, and the spread of requests/s."""
    rps = [r.rps for r in runs]
    cpu = [r.server_cpu_us for r in runs if r.server_cpu_us is not None]
    return [
        name,
        fmt(median(rps)),
        spread(rps),
        f"{median([r.p50_ms for r in runs]):.2f}",
        f"{median([r.p99_ms for r in runs]):.2f}",
        fmt(median(cpu)) if cpu else "-",
        str(sum(r.errors for r in runs)),
    ]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (Linux ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Server:
    """A server process under test, its port and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/facts"

    def wait_ready(self, path: str) -> None:
        """Poll ``path`` until it answers 200; exit with the log's tail if the server dies."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited at startup:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{self.name} did not answer within {STARTUP_TIMEOUT_S} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the process this benchmark started (SIGTERM, then SIGKILL after 15 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_process(name: str, command: list[str], port: int, log: Path, **kw: Any) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw
        )
    return Server(name, process, port, log)


def write_gatekeeper_setup(
    folder: Path,
    rules: int,
    time_rules: bool,
    target_url: str | None = None,
    delivery: str = "{max_attempts: 1, timeout_s: 1}",
    database: str = "gatekeeper.db",
) -> tuple[Path, int]:
    """Rules and ``gatekeeper.yaml`` in ``folder``; returns the config path and the port.

    The bench target posts to ``target_url`` (default: a closed 127.0.0.1 port) with the
    ``delivery`` settings given as a YAML flow mapping; ``database`` is the setting as
    written (a file relative to ``folder``, or a URL)."""
    rules_dir = folder / "rules"
    rules_dir.mkdir()
    for name, text in ruleset_files(rules, time_clause=time_rules).items():
        (rules_dir / name).write_text(text, encoding="utf-8")
    port = free_port()
    if target_url is None:
        target_url = f"http://{HOST}:{free_port()}/nobody-listens"
    config = folder / "gatekeeper.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen: {HOST}:{port}
            database: {database}
            rules_dir: rules
            targets:
              {BENCH_TARGET}:
                url: {target_url}
                secret_env: {SECRET_ENV}
                delivery: {delivery}
            """
        ),
        encoding="utf-8",
    )
    return config, port


def daemon_env() -> dict[str, str]:
    """This process's environment plus a fresh random secret for the bench target."""
    env = dict(os.environ)
    env[SECRET_ENV] = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    return env


def start_gatekeeper(
    folder: Path, args: argparse.Namespace, name: str = "gatekeeper", spec: str = ""
) -> Server:
    """``gatekeeper serve`` in ``folder``; ``spec`` as ``--also`` takes it (src:DIR, loop:X)."""
    config, port = write_gatekeeper_setup(
        folder, args.rules, args.time_rules, database=args.database
    )
    env = daemon_env()
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition(":")
        if key == "src":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [value, env.get("PYTHONPATH")]))
        elif key == "loop":
            env["GATEKEEPER_EVENT_LOOP"] = value
        else:
            raise SystemExit(f"--also: unknown part {part!r} (src:DIR or loop:NAME)")
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", "warning"]
    server = start_process(name, command, port, folder / "gatekeeper.log", env=env)
    server.wait_ready("/healthz")
    return server


def serve_app(app: Any, port: int) -> None:
    """Run the aiohttp application ``app`` on 127.0.0.1:``port`` until killed, with the
    ``GET /healthz`` that ``Server.wait_ready`` polls."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


def start_bare(folder: Path) -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
    server = start_process("bare aiohttp", command, port, folder / "bare.log")
    server.wait_ready("/healthz")
    return server


def serve_bare(port: int) -> None:
    """Baseline (a): an aiohttp endpoint that parses the JSON body and answers."""
    from aiohttp import web

    counter = 0

    async def post_facts(request: web.Request) -> web.Response:
        nonlocal counter
        await request.json()
        counter += 1
        return web.json_response({"accepted": 1, "seqs": [counter]})

    app = web.Application()
    app.router.add_post("/v1/facts", post_facts)
    serve_app(app, port)


def start_bare_durable(folder: Path) -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare-durable", str(port)]
    command.append(str(folder / "bare-durable.db"))
    server = start_process("bare durable", command, port, folder / "bare-durable.log")
    server.wait_ready("/healthz")
    return server


def serve_bare_durable(port: int, path: str) -> None:
    """Baseline (c): an aiohttp endpoint that parses the JSON body, queues it, and answers
    once a single writer (stdlib sqlite3 on one thread, WAL, ``synchronous=FULL``) has
    committed it, every body queued meanwhile in the same transaction (group commit): the
    floor of durable ingest on this machine, with none of gatekeeper's validation, rules,
    decisions or audit rows."""
    import concurrent.futures
    import sqlite3

    from aiohttp import web

    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS fact_log (seq INTEGER PRIMARY KEY, body TEXT)")
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="writer")

    def commit(bodies: list[str]) -> list[int]:
        db.execute("BEGIN IMMEDIATE")
        try:
            insert = "INSERT INTO fact_log (body) VALUES (?)"
            seqs = [int(db.execute(insert, (body,)).lastrowid or 0) for body in bodies]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return seqs

    async def commit_on_thread(bodies: list[str]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(thread, commit, bodies)

    committer = GroupCommitter(commit_on_thread)

    async def post_facts(request: web.Request) -> web.Response:
        text = await request.text()
        json.loads(text)
        return web.json_response({"accepted": 1, "seqs": [await committer.submit(text)]})

    async def start_writer(app: web.Application) -> None:
        app["writer"] = asyncio.create_task(committer.run())

    app = web.Application()
    app.on_startup.append(start_writer)
    app.router.add_post("/v1/facts", post_facts)
    serve_app(app, port)


# ---------------------------------------------------------------------------------------------
# Load generators


def fact_body(n: int, facts: int) -> dict[str, Any]:
    """The ``n``-th fact posted: an open task (the rules wait for ``completed``)."""
    return {
        "project": BENCH_PROJECT,
        "kind": "task",
        "id": f"T-{n % facts}",
        "data": {"status": "open", "priority": n % 7, "n": n},
    }


def wrk_script(facts: int) -> str:
    """A wrk Lua script posting ``fact_body(n)`` and printing a JSON summary at the end."""
    example = json.dumps(fact_body(0, facts))
    assert '"id": "T-0"' in example  # keep the Lua format in step with fact_body
    return textwrap.dedent(
        f"""\
        local counter = 0
        local headers = {{["Content-Type"] = "application/json"}}
        request = function()
          counter = counter + 1
          local body = string.format(
            '{{"project": "{BENCH_PROJECT}", "kind": "task", "id": "T-%d", '
            .. '"data": {{"status": "open", "priority": %d, "n": %d}}}}',
            counter % {facts}, counter % 7, counter)
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


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> RunResult:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    command += ["--timeout", "10s", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    line = next(
        (x for x in done.stdout.splitlines() if x.startswith(WRK_MARKER)),
        None,
    )
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len(WRK_MARKER) :])
    return RunResult(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        requests=data["requests"],
        errors=data["errors"],
    )


def run_aiohttp_load(url: str, connections: int, seconds: float, facts: int) -> RunResult:
    """Run the aiohttp load generator in a separate process and read its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--load", url]
    command += ["--connections", str(connections), "--seconds", str(seconds)]
    command += ["--rules", str(facts * RULES_PER_FACT)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"load generator failed:\n{done.stdout}\n{done.stderr}")
    return RunResult(**json.loads(done.stdout.strip().splitlines()[-1]))


async def post_facts(
    urls: Sequence[str], connections: int, seconds: float, body_of: Callable[[int], str]
) -> tuple[list[float], int, float]:
    """``connections`` workers posting ``body_of(n)`` for ``seconds``, request ``n`` to
    ``urls[n % len(urls)]`` (round-robin over the servers). Returns the latencies in
    seconds, sorted, the count of requests not answered 200, and the seconds elapsed."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal counter, errors
            while time.perf_counter() < deadline:
                counter += 1
                url = urls[counter % len(urls)]
                body = body_of(counter)
                sent = time.perf_counter()
                try:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as response:
                        await response.read()
                        ok = response.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append(time.perf_counter() - sent)
                errors += 0 if ok else 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return latencies, errors, elapsed


async def aiohttp_load(url: str, connections: int, seconds: float, facts: int) -> RunResult:
    """The fallback load generator: ``connections`` workers posting facts for ``seconds``."""
    latencies, errors, elapsed = await post_facts(
        [url], connections, seconds, lambda n: json.dumps(fact_body(n, facts))
    )
    return RunResult(
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        requests=len(latencies),
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# Baseline (b): raw SQLite


def sqlite_run(path: Path, seconds: float) -> RunResult:
    """Insert and commit one row per transaction (WAL, synchronous=FULL) for ``seconds``."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS fact_log (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " project TEXT, kind TEXT, id TEXT, data TEXT, received_at TEXT)"
        )
        latencies: list[float] = []
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            n += 1
            body = fact_body(n, 200)
            row = (body["project"], body["kind"], body["id"], json.dumps(body["data"]), "now")
            sent = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO fact_log (project, kind, id, data, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                row,
            )
            db.execute("COMMIT")
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
    finally:
        db.close()
    latencies.sort()
    return RunResult(
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        requests=len(latencies),
        errors=0,
    )


# ---------------------------------------------------------------------------------------------
# The benchmark


def measure(
    server: Server, args: argparse.Namespace, generator: str, script: Path, seconds: float
) -> RunResult:
    """One load run against ``server``, with the server's CPU time per request."""
    facts = fact_count(args.rules)
    cpu_before = cpu_seconds(server.process.pid)
    if generator == "wrk":
        result = run_wrk(server.url, script, args.connections, seconds)
    else:
        result = run_aiohttp_load(server.url, args.connections, seconds, facts)
    cpu_after = cpu_seconds(server.process.pid)
    if cpu_before is None or cpu_after is None or not result.requests:
        return result
    cpu_us = (cpu_after - cpu_before) * 1e6 / result.requests
    return RunResult(**{**result.__dict__, "server_cpu_us": cpu_us})


def check_one_post(server: Server) -> dict[str, Any]:
    """Post one fact and return the answer, so a broken setup fails before the load."""
    request = urllib.request.Request(
        server.url,
        data=json.dumps(fact_body(0, 1)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as error:
        message = f"{server.name}: POST /v1/facts answered {error.code}: {error.read()!r}"
        raise SystemExit(message) from None


def database_counts(folder: Path, database: str) -> tuple[int, int]:
    """(fact_log rows, decisions rows) in the daemon's database (``database`` as
    ``--database`` gives it, a file relative to ``folder``), read after it stopped."""
    counts = (
        "SELECT count(*) FROM fact_log",
        "SELECT count(*) FROM decisions WHERE trigger = 'fact'",
    )
    if "://" in database:
        import psycopg

        with psycopg.connect(database) as pg:
            facts, decisions = (pg.execute(sql).fetchall()[0][0] for sql in counts)
        return int(facts), int(decisions)
    db = sqlite3.connect(f"file:{folder / database}?mode=ro", uri=True)
    try:
        facts, decisions = (db.execute(sql).fetchone()[0] for sql in counts)
    finally:
        db.close()
    return int(facts), int(decisions)


def run(args: argparse.Namespace) -> int:
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    if args.also and args.database != "gatekeeper.db":
        raise SystemExit("--database: one daemon per database; not with --also")
    generator = args.load_generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "aiohttp"
    print(machine_header("bench_ingest: durable POST /v1/facts over HTTP"))
    print(
        f"   {args.rules:,} rules, each fact read by {RULES_PER_FACT} (none fires); load: "
        f"{generator}, {args.connections} connections, {args.runs} interleaved runs of "
        f"{args.seconds:g} s each (+{args.warmup:g} s warm-up); figures are medians"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-"))
    script = folder / "post_fact.lua"
    script.write_text(wrk_script(fact_count(args.rules)), encoding="utf-8")
    started = time.perf_counter()
    servers: list[Server] = []
    try:
        load_started = time.perf_counter()
        gatekeeper = start_gatekeeper(folder, args)
        servers.append(gatekeeper)
        print(f"   gatekeeper started with {args.rules:,} rules in ", end="")
        print(f"{time.perf_counter() - load_started:.1f} s")
        others: list[tuple[str, Server]] = []
        for also in args.also:
            label, _, spec = also.partition("=")
            subfolder = folder / f"also-{len(others)}"
            subfolder.mkdir()
            other = start_gatekeeper(subfolder, args, f"gatekeeper {label}", spec)
            servers.append(other)
            others.append((label, other))
            check_one_post(other)
        bare = start_bare(folder)
        servers.append(bare)
        durable = start_bare_durable(folder)
        servers.append(durable)
        answer = check_one_post(gatekeeper)
        assert answer.get("seqs"), answer
        check_one_post(bare)
        check_one_post(durable)
        results: dict[str, list[RunResult]] = {
            "bare": [],
            "durable": [],
            "gatekeeper": [],
            "sqlite": [],
            **{f"also {label}": [] for label, _ in others},
        }
        warmups = {s.name: measure(s, args, generator, script, args.warmup) for s in servers}
        sqlite_run(folder / "raw.db", min(args.warmup, 1.0))
        for _ in range(args.runs):
            results["bare"].append(measure(bare, args, generator, script, args.seconds))
            results["durable"].append(measure(durable, args, generator, script, args.seconds))
            results["gatekeeper"].append(measure(gatekeeper, args, generator, script, args.seconds))
            for label, other in others:
                run_result = measure(other, args, generator, script, args.seconds)
                results[f"also {label}"].append(run_result)
            results["sqlite"].append(sqlite_run(folder / "raw.db", args.sqlite_seconds))
        for server in servers:
            server.stop()
        gatekeeper_runs = [warmups[gatekeeper.name], *results["gatekeeper"]]
        acknowledged = 1 + sum(r.requests - r.errors for r in gatekeeper_runs)
        facts_logged, decisions = database_counts(folder, args.database)
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print()
    print(
        table(
            [
                "what",
                "req/s (median)",
                f"min..max of {args.runs}",
                "p50 ms",
                "p99 ms",
                "server CPU µs/req",
                "errors",
            ],
            [
                summarize("(a) bare aiohttp: parse JSON, answer", results["bare"]),
                summarize("(c) (a) + queue + group commit, FULL", results["durable"]),
                summarize("gatekeeper POST /v1/facts, durable", results["gatekeeper"]),
                *(
                    summarize(f"gatekeeper {label}", results[f"also {label}"])
                    for label, _ in others
                ),
                summarize("(b) raw SQLite: 1 row/commit, FULL", results["sqlite"]),
            ],
        )
    )
    gk = median([r.rps for r in results["gatekeeper"]])
    bare_rps = median([r.rps for r in results["bare"]])
    sqlite_rps = median([r.rps for r in results["sqlite"]])
    durable_rps = median([r.rps for r in results["durable"]])
    print(
        f"\n   gatekeeper ÷ bare aiohttp: {gk / bare_rps:.3f}; "
        f"gatekeeper ÷ raw SQLite commits: {gk / sqlite_rps:.3f}"
    )
    print(
        f"   (c) bare durable ÷ bare aiohttp: {durable_rps / bare_rps:.3f}; "
        f"gatekeeper ÷ (c) bare durable: {gk / durable_rps:.3f}"
    )
    print(
        f"   durability check: {acknowledged:,} facts acknowledged (warm-up included), "
        f"{facts_logged:,} in fact_log, {decisions:,} fact decisions "
        f"({decisions / max(1, facts_logged):.1f} per fact)"
    )
    this_cpu = median([r.server_cpu_us or 0.0 for r in results["gatekeeper"]])
    for label, _ in others:
        runs = results[f"also {label}"]
        other_cpu = median([r.server_cpu_us or 0.0 for r in runs])
        print(
            f"   gatekeeper {label} ÷ (c) bare durable: "
            f"{median([r.rps for r in runs]) / durable_rps:.3f}; its CPU µs/req ÷ this "
            f"tree's: {other_cpu / this_cpu if this_cpu else float('nan'):.2f}"
        )
    if acknowledged > facts_logged:
        print("   ERROR: fewer facts in the log than were acknowledged")
        targets.failed += 1
    if sum(r.errors for r in results["gatekeeper"]) or sum(r.errors for r in results["bare"]):
        print("   WARNING: some requests failed (see the errors column)")
    targets.check("gatekeeper req/s ÷ bare aiohttp req/s", gk / bare_rps, ">=", 0.5, later=True)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    if args.serve_bare_durable is not None:
        port, path = args.serve_bare_durable
        serve_bare_durable(int(port), path)
        return 0
    if args.load is not None:
        facts = fact_count(args.rules)
        result = asyncio.run(aiohttp_load(args.load, args.connections, args.seconds, facts))
        print(json.dumps(result.__dict__))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
