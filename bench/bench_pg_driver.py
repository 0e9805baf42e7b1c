"""The PostgreSQL driver for durable ingest, by measurement: asyncpg against psycopg 3.

Run: ``python bench/bench_pg_driver.py`` (about 90 s on 2 cores); ``--help`` for the knobs.
Needs the PostgreSQL at ``--dsn`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``)
and at least one of ``asyncpg`` and ``psycopg`` (``pip install asyncpg 'psycopg[binary]'``);
a variant whose driver is missing is skipped with a message.

What runs: a scratch database ``gk_bench_<random>`` (dropped at the end) with
``synchronous_commit=on``, and one small aiohttp server per variant, each in its own process
on a 127.0.0.1 ephemeral port. Each answers ``POST /facts`` (a small JSON fact, parsed)
with 200 only after the body is committed, through one connection owned by one writer:

- **group commit** — requests that arrive while a commit is in flight wait in a queue, and
  the writer commits them all in the next transaction: ``BEGIN``, one multi-row
  ``INSERT ... SELECT unnest($1::text[])::jsonb ... RETURNING seq`` for the whole group,
  ``COMMIT`` (three round trips per group whatever its size, the same SQL for every driver);
  (a) asyncpg on the event loop, (b) psycopg 3's ``AsyncConnection`` on the event loop,
  (c) a psycopg 3 sync connection on a dedicated thread, the whole transaction one call
  through ``gatekeeper.store.writer_thread.WriterThread`` (the SQLite backend's design);
  (e) as (c) in psycopg's pipeline mode, the three statements sent together and answered
  in one round trip (asyncpg has no such mode for a transaction of several statements);
- **one commit per request** — the same writer with groups of one, for (a) and (b): the
  rate of commits (fsyncs) one connection can do.

The load comes from a separate process (``bench_ingest.py``'s aiohttp load generator,
``--connections`` concurrent keep-alive clients for ``--seconds``). Runs of the variants are
interleaved; each figure is the median of ``--runs`` runs. The table gives facts/s, p50 and
p99 latency, the CPU per fact of the server process (all its threads, from ``/proc``), of
its PostgreSQL backend and of the load generator (on 2 cores, a busy client caps the rate),
and the mean facts per commit. Afterwards every acknowledged fact must be in the table (the
durability check).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import resource
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import GroupCommitter, fmt, machine_header, median, spread, table
from bench_ingest import (
    HOST,
    RunResult,
    Server,
    cpu_seconds,
    free_port,
    run_aiohttp_load,
    serve_app,
    start_process,
)

SHOWN_SETTINGS = ("server_version", "synchronous_commit", "fsync", "wal_sync_method")
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
FACT_IDS = 200
"""Distinct fact ids the load generator cycles through."""

CREATE_TABLE = (
    "CREATE TABLE fact_log (seq bigserial PRIMARY KEY, body jsonb NOT NULL,"
    " received_at timestamptz NOT NULL DEFAULT now())"
)
INSERT_GROUP = (
    "INSERT INTO fact_log (body) SELECT b::jsonb FROM unnest({}::text[]) AS b RETURNING seq"
)
"""One multi-row INSERT for a whole group; ``{}`` is the driver's placeholder."""


# ---------------------------------------------------------------------------------------------
# Writers: one connection each, a whole transaction per call


class Writer(Protocol):
    """One connection that commits a group of fact bodies in one transaction."""

    async def commit(self, bodies: list[str]) -> list[int]:
        """Insert ``bodies`` (JSON texts) in one transaction; their ``seq``s once committed."""
        ...

    async def backend_pid(self) -> int:
        """The process id of this connection's PostgreSQL backend."""
        ...


class AsyncpgWriter:
    """(a) asyncpg on the event loop: ``BEGIN``, the INSERT, ``COMMIT``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sql = INSERT_GROUP.format("$1")

    @classmethod
    async def open(cls, dsn: str) -> AsyncpgWriter:
        import asyncpg

        return cls(await asyncpg.connect(dsn))

    async def commit(self, bodies: list[str]) -> list[int]:
        async with self._conn.transaction():
            rows = await self._conn.fetch(self._sql, bodies)
        return [row[0] for row in rows]

    async def backend_pid(self) -> int:
        return int(self._conn.get_server_pid())


class PsycopgAsyncWriter:
    """(b) psycopg 3's ``AsyncConnection`` on the event loop: ``BEGIN``, the INSERT,
    ``COMMIT``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._sql = INSERT_GROUP.format("%s")

    @classmethod
    async def open(cls, dsn: str) -> PsycopgAsyncWriter:
        import psycopg

        return cls(await psycopg.AsyncConnection.connect(dsn, autocommit=True))

    async def commit(self, bodies: list[str]) -> list[int]:
        async with self._conn.transaction():
            cursor = await self._conn.execute(self._sql, (bodies,))
            rows = await cursor.fetchall()
        return [row[0] for row in rows]

    async def backend_pid(self) -> int:
        return int(self._conn.info.backend_pid)


class PsycopgThreadWriter:
    """(c) a psycopg 3 sync connection owned by one ``WriterThread``; a whole transaction
    (``BEGIN``, the INSERT, ``COMMIT``) is one call on the thread."""

    def __init__(self, thread: Any, conn: Any) -> None:
        self._thread = thread
        self._conn = conn
        self._sql = INSERT_GROUP.format("%s")

    @classmethod
    async def open(cls, dsn: str) -> PsycopgThreadWriter:
        import psycopg

        from gatekeeper.store.writer_thread import WriterThread

        thread = WriterThread("pg-writer")
        return cls(
            thread, await thread.run(functools.partial(psycopg.connect, dsn, autocommit=True))
        )

    def _commit_on_thread(self, bodies: list[str]) -> list[int]:
        with self._conn.transaction():
            rows = self._conn.execute(self._sql, (bodies,)).fetchall()
        return [row[0] for row in rows]

    async def commit(self, bodies: list[str]) -> list[int]:
        return await self._thread.run(self._commit_on_thread, bodies)

    async def backend_pid(self) -> int:
        return int(self._conn.info.backend_pid)


class PsycopgPipelineWriter(PsycopgThreadWriter):
    """(e) as (c), in psycopg's pipeline mode: ``BEGIN``, the INSERT and ``COMMIT`` go out
    together and their results come back in one round trip."""

    def _commit_on_thread(self, bodies: list[str]) -> list[int]:
        with self._conn.pipeline(), self._conn.transaction():
            cursor = self._conn.execute(self._sql, (bodies,))
        return [row[0] for row in cursor.fetchall()]


@dataclass(frozen=True)
class Variant:
    """A server under test: its driver module, writer and largest group per commit."""

    key: str
    label: str
    module: str
    open_writer: Callable[[str], Any]
    max_group: int | None
    """None: every queued body goes into the next commit; 1: one commit per request."""


VARIANTS = [
    Variant("asyncpg", "(a) asyncpg, group commit", "asyncpg", AsyncpgWriter.open, None),
    Variant(
        "psycopg-async",
        "(b) psycopg 3 async, group commit",
        "psycopg",
        PsycopgAsyncWriter.open,
        None,
    ),
    Variant(
        "psycopg-thread",
        "(c) psycopg 3 sync on WriterThread, group",
        "psycopg",
        PsycopgThreadWriter.open,
        None,
    ),
    Variant(
        "psycopg-pipeline",
        "(e) psycopg 3 sync on WriterThread, pipeline",
        "psycopg",
        PsycopgPipelineWriter.open,
        None,
    ),
    Variant("asyncpg-each", "(d) asyncpg, 1 commit/request", "asyncpg", AsyncpgWriter.open, 1),
    Variant(
        "psycopg-async-each",
        "(d) psycopg 3 async, 1 commit/request",
        "psycopg",
        PsycopgAsyncWriter.open,
        1,
    ),
]
VARIANTS_BY_KEY = {variant.key: variant for variant in VARIANTS}


# ---------------------------------------------------------------------------------------------
# The server (this file with --serve KEY PORT DSN, in its own process)


def serve(key: str, port: int, dsn: str, loop_name: str) -> None:
    """Serve ``POST /facts`` for variant ``key`` on 127.0.0.1:``port`` until killed, and
    ``GET /stats`` (commits, facts committed, the backend's pid)."""
    from aiohttp import web

    variant = VARIANTS_BY_KEY[key]
    committer_key = web.AppKey("committer", GroupCommitter)
    pid_key = web.AppKey("backend_pid", int)

    async def post_fact(request: web.Request) -> web.Response:
        text = await request.text()
        json.loads(text)
        seq = await request.app[committer_key].submit(text)
        return web.json_response({"accepted": 1, "seqs": [seq]})

    async def stats(request: web.Request) -> web.Response:
        committer = request.app[committer_key]
        body = {"commits": committer.commits, "facts": committer.facts}
        return web.json_response({**body, "backend_pid": request.app[pid_key]})

    async def writer_ctx(app: web.Application) -> Any:
        writer = await variant.open_writer(dsn)
        app[pid_key] = await writer.backend_pid()
        app[committer_key] = GroupCommitter(writer.commit, variant.max_group)
        task = asyncio.create_task(app[committer_key].run())
        yield
        task.cancel()

    app = web.Application()
    app.cleanup_ctx.append(writer_ctx)
    app.router.add_post("/facts", post_fact)
    app.router.add_get("/stats", stats)
    if loop_name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # run_app's new_event_loop
    serve_app(app, port)


# ---------------------------------------------------------------------------------------------
# The scratch database


def admin(dsn: str, *statements: str) -> list[Any]:
    """Run ``statements`` in autocommit on ``dsn`` with whichever driver is installed;
    the first column of each statement's first row (None for no rows)."""
    if importlib.util.find_spec("psycopg"):
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            out = []
            for statement in statements:
                cursor = conn.execute(statement)
                row = cursor.fetchone() if cursor.description else None
                out.append(row[0] if row else None)
            return out

    async def with_asyncpg() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            return [await conn.fetchval(statement) for statement in statements]
        finally:
            await conn.close()

    return asyncio.run(with_asyncpg())


def with_database(dsn: str, name: str) -> str:
    """``dsn`` naming database ``name`` instead of its own."""
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{name}"


def create_scratch_database(dsn: str) -> tuple[str, str]:
    """A new database ``gk_bench_<random>`` with ``synchronous_commit=on`` and the table;
    returns (its name, its DSN). Exits with a clear message when PostgreSQL is unreachable."""
    name = f"gk_bench_{secrets.token_hex(4)}"
    try:
        admin(dsn, f"CREATE DATABASE {name}", f"ALTER DATABASE {name} SET synchronous_commit = on")
    except Exception as error:  # the two drivers' errors share no base class
        raise SystemExit(f"cannot create a database at {dsn}: {error}") from None
    scratch = with_database(dsn, name)
    admin(scratch, CREATE_TABLE)
    return name, scratch


def drop_database(dsn: str, name: str) -> None:
    admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class Measured:
    """One load run: the load generator's figures and the CPU and commits behind them."""

    run: RunResult
    server_cpu_us: float
    backend_cpu_us: float
    client_cpu_us: float
    facts_per_commit: float


def get_stats(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{server.port}/stats", timeout=10) as response:
        stats: dict[str, Any] = json.loads(response.read())
        return stats


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have ended (the load
    generator's processes; the servers end only after the runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(server: Server, args: argparse.Namespace, seconds: float) -> Measured:
    """One load run against ``server``: facts/s, latency, CPU per fact, facts per commit."""
    before = get_stats(server)
    server_cpu = cpu_seconds(server.process.pid) or 0.0
    backend_cpu = cpu_seconds(before["backend_pid"]) or 0.0
    url = f"http://{HOST}:{server.port}/facts"
    client_cpu = children_cpu_seconds()
    run = run_aiohttp_load(url, args.connections, seconds, FACT_IDS)
    client_cpu = children_cpu_seconds() - client_cpu
    after = get_stats(server)
    server_cpu = (cpu_seconds(server.process.pid) or 0.0) - server_cpu
    backend_cpu = (cpu_seconds(before["backend_pid"]) or 0.0) - backend_cpu
    done = max(1, run.requests)
    commits = max(1, after["commits"] - before["commits"])
    return Measured(
        run=run,
        server_cpu_us=server_cpu * 1e6 / done,
        backend_cpu_us=backend_cpu * 1e6 / done,
        client_cpu_us=client_cpu * 1e6 / done,
        facts_per_commit=(after["facts"] - before["facts"]) / commits,
    )


def start_server(variant: Variant, scratch: str, folder: Path, loop_name: str) -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", variant.key, str(port)]
    command += [scratch, "--loop", loop_name]
    server = start_process(variant.label, command, port, folder / f"{variant.key}.log")
    server.wait_ready("/healthz")
    return server


def row(variant: Variant, runs: list[Measured], baseline_rps: float | None) -> list[str]:
    """A table row: medians of the runs, the spread of facts/s, the ratio to (a)."""
    rps = [m.run.rps for m in runs]
    ratio = f"{median(rps) / baseline_rps:.2f}" if baseline_rps else "-"
    return [
        variant.label,
        fmt(median(rps)),
        spread(rps),
        ratio,
        f"{median([m.run.p50_ms for m in runs]):.2f}",
        f"{median([m.run.p99_ms for m in runs]):.2f}",
        fmt(median([m.server_cpu_us for m in runs])),
        fmt(median([m.backend_cpu_us for m in runs])),
        fmt(median([m.client_cpu_us for m in runs])),
        f"{median([m.facts_per_commit for m in runs]):.1f}",
        str(sum(m.run.errors for m in runs)),
    ]


def available(variants: list[Variant]) -> list[Variant]:
    """The variants whose driver is installed; a message for each one skipped."""
    kept = []
    for variant in variants:
        if importlib.util.find_spec(variant.module):
            kept.append(variant)
        else:
            print(f"   SKIP {variant.label}: {variant.module} is not installed")
    return kept


def default_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def run(args: argparse.Namespace) -> int:
    print(machine_header("bench_pg_driver: durable POST /facts through asyncpg and psycopg 3"))
    chosen = [VARIANTS_BY_KEY[key] for key in args.variants]
    variants = available(chosen)
    if not variants:
        install = "pip install asyncpg 'psycopg[binary]'"
        raise SystemExit(f"no driver of the chosen variants is installed: {install}")
    name, scratch = create_scratch_database(args.dsn)
    version, sync_commit, fsync, sync_method = admin(
        scratch,
        "SHOW server_version",
        "SHOW synchronous_commit",
        "SHOW fsync",
        "SHOW wal_sync_method",
    )
    print(
        f"   PostgreSQL {version} (synchronous_commit={sync_commit}, fsync={fsync}, "
        f"wal_sync_method={sync_method}) at {args.dsn.rpartition('/')[0]}, database {name}; "
        f"server loop {args.loop}"
    )
    print(
        f"   load: aiohttp client process, {args.connections} connections, {args.runs} "
        f"interleaved runs of {args.seconds:g} s (+{args.warmup:g} s warm-up); figures are "
        "medians"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-pg-"))
    started = time.perf_counter()
    servers: dict[str, Server] = {}
    results: dict[str, list[Measured]] = {v.key: [] for v in variants}
    acknowledged = 0
    try:
        for variant in variants:
            servers[variant.key] = start_server(variant, scratch, folder, args.loop)
        for variant in variants:
            warm = measure(servers[variant.key], args, args.warmup)
            acknowledged += warm.run.requests - warm.run.errors
        for _ in range(args.runs):
            for variant in variants:
                measured = measure(servers[variant.key], args, args.seconds)
                results[variant.key].append(measured)
                acknowledged += measured.run.requests - measured.run.errors
        for server in servers.values():
            server.stop()
        (stored,) = admin(scratch, "SELECT count(*) FROM fact_log")
    finally:
        for server in servers.values():
            server.stop()
        drop_database(args.dsn, name)
        shutil.rmtree(folder, ignore_errors=True)

    first = results[variants[0].key]
    baseline_rps = median([m.run.rps for m in first]) if variants[0].key == "asyncpg" else None
    print()
    print(
        table(
            [
                "variant",
                "facts/s",
                f"min..max of {args.runs}",
                "÷ (a)",
                "p50 ms",
                "p99 ms",
                "server CPU µs/fact",
                "PG backend CPU µs/fact",
                "client CPU µs/fact",
                "facts/commit",
                "errors",
            ],
            [row(v, results[v.key], baseline_rps) for v in variants],
        )
    )
    print(
        f"\n   durability check: {acknowledged:,} facts acknowledged (warm-up included), "
        f"{stored:,} rows in fact_log"
    )
    status = 0
    if stored < acknowledged:
        print("   ERROR: fewer rows than facts acknowledged")
        status = 1
    if any(m.run.errors for runs in results.values() for m in runs):
        print("   WARNING: some requests failed (see the errors column and the server logs)")
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time; {name} dropped")
    return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="a database to create the scratch one")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per load run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default=default_loop(),
        help="the servers' event loop (default: uvloop when installed, as gatekeeper serve)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS_BY_KEY),
        default=list(VARIANTS_BY_KEY),
        help="which servers to measure (default: all)",
    )
    # Internal mode: this file is also the server under test.
    parser.add_argument("--serve", nargs=3, metavar=("KEY", "PORT", "DSN"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        key, port, dsn = args.serve
        serve(key, int(port), dsn, args.loop)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
