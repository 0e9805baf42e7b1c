"""Fencing on PostgreSQL: a daemon whose session broke while another decided writes
nothing on its stale memory (its writes are refused as behind until it catches up); a
gatekeeper starting beside serving daemons migrates nothing; a COMMIT whose answer was lost
(in doubt at the store: the writer's next commit is refused as behind, and the catch-up
brings what the server committed into memory)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from gatekeeper.store import open_store
from gatekeeper.store.errors import DatabaseInUse, StateBehind, StoreError, StoreUnavailable
from gatekeeper.store.postgresql import DAEMON_LOCK_KEY, MIGRATIONS
from gatekeeper.store.records import StateFence

from .conftest import DESIGN_RULE, Project, Receiver, fact
from .pg import postgres_url  # noqa: F401  (fixture)
from .store_contract import build
from .test_daemon import APPROVED, QA_PASSED, settle
from .test_daemon_postgresql import on_postgres
from .test_metrics import scrape, value


def _terminate(url: str, application_like: str = "gatekeeper%") -> None:
    """End every gatekeeper session on ``url``'s database (as a server restart would)."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
            " AND application_name LIKE %s AND pid != pg_backend_pid()",
            (conninfo_to_dict(url)["dbname"], application_like),
        )


def _fact_log_size(url: str) -> int:
    with psycopg.connect(url) as db:
        return int(db.execute("SELECT COUNT(*) FROM fact_log").fetchone()[0])


async def test_a_daemon_whose_session_broke_writes_nothing_on_what_another_decided(
    postgres_url: str,  # noqa: F811
) -> None:
    """Daemon A's writer session ends (network, server restart) while daemon B decides;
    A's next write connects again and takes its share of the daemon lock again, but its
    memory (its fence) is from before B's commit: refused as behind, writing nothing,
    however often it is tried; once A caught up on what B decided, it writes again."""
    a = await open_store(postgres_url)
    b = None
    try:
        await a.hold_daemon_lock()
        fence_a = StateFence(await a.state_cursor())
        await a.commit_transitions(
            [build.facts(build.at(0), ("p", "task", "a", {}))], fence=fence_a
        )
        _terminate(postgres_url)  # A's sessions end; A's process lives on
        b = await open_store(postgres_url)
        await b.hold_daemon_lock()
        fence_b = StateFence(await b.state_cursor())
        assert fence_b.cursor == fence_a.cursor
        await b.commit_transitions(
            [build.facts(build.at(1), ("p", "task", "b", {"by": "B"}))], fence=fence_b
        )
        with pytest.raises(StoreUnavailable):  # the write that met the ended session
            await a.commit_transitions(
                [build.facts(build.at(2), ("p", "task", "x", {}))], fence=fence_a
            )
        for _ in range(2):  # A must not go on as if nothing happened, however often
            with pytest.raises(StateBehind) as behind:
                await a.commit_transitions(
                    [build.facts(build.at(3), ("p", "task", "c", {}))], fence=fence_a
                )
            assert (behind.value.expected, behind.value.current) == (1, 2)
        assert _fact_log_size(postgres_url) == 2
        changes = await a.state_changes(fence_a.cursor)
        assert [data for key, data in changes.facts] == [{"by": "B"}]
        assert changes.cursor == fence_b.cursor
        fence_a.cursor = changes.cursor  # A's memory caught up
        await a.commit_transitions(
            [build.facts(build.at(3), ("p", "task", "c", {}))], fence=fence_a
        )
        assert _fact_log_size(postgres_url) == 3 and fence_a.cursor.version == 3
    finally:
        await a.close()
        if b is not None:
            await b.close()


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
async def test_a_gatekeeper_refused_the_lock_migrated_nothing(
    postgres_url: str,  # noqa: F811
    mode: str,
) -> None:
    """Daemons of the previous schema version serve the database (share the daemon lock;
    or, a gatekeeper of before, hold it alone); a newer gatekeeper started beside them (a
    standby, copy-db's destination) is refused the lock, never migrating the schema under
    the serving daemons."""
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        for migration in MIGRATIONS[:-1]:
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_version VALUES (%s, %s)", (migration.version, migration.name)
            )
    serving = psycopg.connect(postgres_url, autocommit=True)  # the older daemon's session
    function = "pg_try_advisory_lock_shared" if mode == "shared" else "pg_try_advisory_lock"
    try:
        assert serving.execute(f"SELECT {function}(({DAEMON_LOCK_KEY}))").fetchone()[0]
        with pytest.raises(DatabaseInUse, match="schema in use"):  # refused before migrating
            await open_store(postgres_url)
        version = serving.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        assert version == MIGRATIONS[-2].version  # nothing migrated under the serving daemon
    finally:
        serving.close()


class _CommitSwallower:
    """A TCP proxy to PostgreSQL that, once armed, forwards a COMMIT and then ends both
    connections without passing the server's answer on (a connection lost after the
    server committed)."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # the simple-protocol Query message

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.armed = False
        self.match = b""
        """Swallow only a COMMIT whose transaction sent this (e.g. ``b"fact_log"``)."""
        self.swallowed = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.host, self.port)
        cut = asyncio.Event()
        swallow = asyncio.Event()

        async def up() -> None:
            sent = b""  # what the transaction in progress sent (up to its COMMIT)
            while data := await client_r.read(65536):
                sent = sent[-65536:] + data
                if self.armed and self.COMMIT in data and self.match in sent:
                    self.armed = False
                    swallow.set()  # nothing the server answers from now on is passed on
                    server_w.write(data)
                    await server_w.drain()
                    self.swallowed += 1
                    await asyncio.sleep(0.5)  # the server commits meanwhile
                    cut.set()
                    return
                if self.COMMIT in data:
                    sent = b""
                server_w.write(data)
                await server_w.drain()

        async def down() -> None:
            while data := await server_r.read(65536):
                if swallow.is_set():
                    continue
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait([*tasks, asyncio.create_task(cut.wait())], return_when="FIRST_COMPLETED")
        for task in tasks:
            task.cancel()
        for w in (client_w, server_w):
            w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.xfail(
    strict=True,
    reason="a COMMIT whose answer was lost is in doubt at the store (resolving it with "
    "txid_status is not built); the writer's fence did not move, so its next commit is "
    "refused as behind and it catches up on what the server committed instead",
)
async def test_a_commit_whose_answer_was_lost_is_not_reported_as_not_written(
    postgres_url: str,  # noqa: F811
) -> None:
    """The COMMIT reached the server and committed; its answer was lost. The store says
    ``StoreUnavailable`` ("nothing applied"), though the database holds the batch (what
    covers it is the state version: ``test_after_a_lost_commit_answer_...``)."""
    info = conninfo_to_dict(postgres_url)
    proxy = _CommitSwallower(info.get("host", "127.0.0.1"), int(info.get("port", 5432)))
    port = await proxy.start()
    host_port = f"{info.get('host', '127.0.0.1')}:{info.get('port', '5432')}"
    url = postgres_url.replace(host_port, f"127.0.0.1:{port}", 1) + "&sslmode=disable"
    assert url.startswith("postgresql://") and str(port) in url
    store = await open_store(url)
    try:
        await store.hold_daemon_lock()  # the daemon lock shared, as a serving daemon does
        proxy.armed = True
        failed = None
        try:
            await store.commit_transition(build.facts(build.at(1), ("p", "task", "a", {})))
        except StoreUnavailable as exc:
            failed = exc
        assert proxy.swallowed == 1, repr(failed)
        with psycopg.connect(postgres_url) as db:
            kept = db.execute("SELECT COUNT(*) FROM fact_log").fetchone()[0]
        # either the write is reported done, or it was not kept: never "failed" but kept
        assert failed is None or kept == 0, f"reported {failed!r} but {kept} fact(s) kept"
    finally:
        with contextlib.suppress(StoreError):
            await store.close()
        await proxy.close()


async def test_after_a_lost_commit_answer_the_daemon_decides_on_what_the_database_holds(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    postgres_url: str,  # noqa: F811
) -> None:
    """The COMMIT of the batch that fires a once-rule reaches the server, its answer is
    lost: the client is answered 503. The fence did not move: the daemon's next commit, or
    its deadline loop's look at the database before it, finds the database ahead, and
    memory catches up (the lost commit's facts, rule state and release); the next request
    is planned on it: answered 200. From then on the daemon knows the rule fired: posting
    the same facts again fires nothing more, and one release reaches the bank."""
    info = conninfo_to_dict(postgres_url)
    proxy = _CommitSwallower(info.get("host", "127.0.0.1"), int(info.get("port", 5432)))
    port = await proxy.start()
    host_port = f"{info.get('host', '127.0.0.1')}:{info.get('port', '5432')}"
    url = postgres_url.replace(host_port, f"127.0.0.1:{port}", 1) + "&sslmode=disable"
    project = on_postgres(project_factory(receiver.url), url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    try:
        proxy.match, proxy.armed = b"fact_log", True  # the facts' transaction, no other
        status, _ = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
        assert status == 503 and proxy.swallowed == 1
        status, body = await gk.post("/v1/facts", fact("task", "t1", status="open"))
        assert status == 200, body  # caught up (refused as behind, or by a tick) first
        _, samples = await scrape(gk.daemon)
        assert value(samples, "gatekeeper_catch_ups_total", how="incremental") >= 1
        _, rule = await gk.get("/v1/rules/tower-a/design-release")
        assert rule["fired_count"] == 1, rule  # the lost commit's firing, known now
        status, body = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
        assert status == 200, body
        _, rule = await gk.get("/v1/rules/tower-a/design-release")
        assert rule["fired_count"] == 1, rule
        await receiver.wait_for(2, timeout_s=15)
        await settle()
        assert len([r for r in receiver.received if r.path == "/bank"]) == 1
    finally:
        await gk.stop()
        await proxy.close()


async def test_the_writer_session_is_kept_alive_both_ways(postgres_url: str) -> None:  # noqa: F811
    """A daemon gone silent (a partition) loses its session, and its share of the daemon
    lock with it, within about 30 s on the server's side; the daemon finds a silent server
    as fast."""
    store = await open_store(postgres_url)
    try:
        shown = await store._transaction(  # type: ignore[attr-defined]
            lambda tx: [
                tx.execute(f"SHOW {name}").fetchone()[0]
                for name in ("tcp_keepalives_idle", "tcp_keepalives_count", "tcp_user_timeout")
            ]
        )
        assert shown == ["10s", "3", "30s"] or shown == ["10", "3", "30000"], shown
    finally:
        await store.close()
