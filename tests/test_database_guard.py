"""One daemon per SQLite database file, no database taken for what it is not, and startup
failures that end the process at once with one clear line: real files, real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gatekeeper.store import open_store
from gatekeeper.store.errors import DatabaseInUse, NotAGatekeeperDatabase, StoreUnavailable

from .conftest import DEPLOY_RULE, DESIGN_RULE, ENV, Project
from .test_cli import free_port

STARTUP_TIMEOUT_S = 60  # a loaded CI machine; a hang is what these tests catch


def serve(project: Project, *extra: str, port: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gatekeeper",
            "serve",
            "-c",
            str(project.config_path),
            "--listen",
            f"127.0.0.1:{port or free_port()}",
            *extra,
        ],
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve_to_the_end(project: Project, *extra: str) -> tuple[int, str, float]:
    """Run ``gatekeeper serve`` expecting it to give up: exit code, stderr, seconds."""
    started = time.monotonic()
    process = serve(project, *extra)
    try:
        _, err = process.communicate(timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"gatekeeper serve hung instead of exiting:\n{err}")
    return process.returncode, err, time.monotonic() - started


def wait_healthy(port: int, process: subprocess.Popen[str]) -> dict[str, object]:
    ready_by = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < ready_by and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                body: dict[str, object] = json.loads(r.read())
                return body
        except OSError:
            time.sleep(0.1)
    _, err = process.communicate(timeout=30)
    raise AssertionError(f"the daemon did not come up:\n{err}")


@contextlib.contextmanager
def running(project: Project) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    process = serve(project, port=port)
    try:
        wait_healthy(port, process)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def database_of(project: Project) -> Path:
    return project.root / "state" / "gatekeeper.db"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


# -- one daemon per database file ------------------------------------------------------


def test_a_second_daemon_on_the_same_database_exits_1_naming_the_holder(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    with running(project) as (first, port):
        code, err, _ = serve_to_the_end(project)
        assert code == 1, err
        assert f"pid {first.pid}" in err
        assert str(database_of(project)) in err
        assert "Traceback" not in err
        assert len(error_lines(err)) == 1
        assert wait_healthy(port, first)["status"] == "ok"  # the first one serves on
    # the lock goes with its holder: the next daemon starts
    with running(project):
        pass


def test_the_lock_goes_with_a_killed_daemon(project_factory: Callable[..., Project]) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    with running(project) as (first, _):
        first.kill()
        first.communicate()
    with running(project) as (second, port):
        assert wait_healthy(port, second)["status"] == "ok"


def test_two_daemons_cannot_both_release_against_one_escrow(
    project_factory: Callable[..., Project],
) -> None:
    """The money scenario: each daemon would keep its own escrow book, so both would
    release. The second one never starts."""
    project = project_factory()
    project.write_rule("design.yaml", DESIGN_RULE)
    facts = [
        {"project": "tower-a", "kind": "milestone", "id": "design", "data": {"status": "approved"}},
        {"project": "tower-a", "kind": "quality_gate", "id": "qg1", "data": {"passed": True}},
    ]
    with running(project) as (_, port):
        code, err, _ = serve_to_the_end(project)
        assert code == 1 and "in use by another gatekeeper daemon" in err
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/facts",
            data=json.dumps({"facts": facts}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    with contextlib.closing(sqlite3.connect(database_of(project))) as db:
        assert db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 1


async def test_a_second_store_on_an_open_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gk.db"
    first = await open_store(path)
    try:
        with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()}") as refused:
            await open_store(path)
        assert refused.value.holder_pid == os.getpid()
    finally:
        await first.close()
    again = await open_store(path)  # closing released it
    await again.close()


async def test_a_second_store_through_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """Two names of one database file (the file and a link to it, or a link to its folder)
    are one database: the second daemon is refused, whichever name it was given."""
    (tmp_path / "volume").mkdir()
    real = tmp_path / "volume" / "gk.db"
    first = await open_store(real)
    try:
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "gk.db").symlink_to(real)
        (tmp_path / "folder-link").symlink_to(tmp_path / "volume")
        for other in (tmp_path / "app" / "gk.db", tmp_path / "folder-link" / "gk.db"):
            with pytest.raises(DatabaseInUse, match=f"pid {os.getpid()}"):
                await open_store(other)
    finally:
        await first.close()


async def test_a_link_to_a_missing_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A volume that is not mounted: the database path is a link whose target is gone. A
    new, empty database there would fire every once rule again and reset the escrows."""
    (tmp_path / "volume").mkdir()
    real = tmp_path / "volume" / "gk.db"
    store = await open_store(real)
    await store.close()
    link = tmp_path / "gk.db"
    link.symlink_to(real)
    (tmp_path / "volume").rename(tmp_path / "volume.unmounted")
    with pytest.raises(NotAGatekeeperDatabase, match=r"symbolic link.*does not exist"):
        await open_store(link)
    assert link.is_symlink()
    assert not (tmp_path / "volume").exists()
    assert not (tmp_path / "gk.db.new").exists()


async def test_readers_are_not_blocked_by_the_daemons_lock(tmp_path: Path) -> None:
    """The lock excludes a second daemon only: a plain SQLite reader (a backup, sqlite3,
    a report) reads while the daemon serves."""
    path = tmp_path / "gk.db"
    store = await open_store(path)
    try:
        uri = f"file:{path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as reader:
            assert reader.execute("SELECT COUNT(*) FROM fact_log").fetchone() == (0,)
    finally:
        await store.close()


# -- a file at the database path must be a gatekeeper database ---------------------------


def _other_application(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.execute("INSERT INTO notes (body) VALUES ('keep me')")
        db.commit()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b""), "is an empty file (0 bytes)"),
        (lambda p: p.write_bytes(os.urandom(8192)), "is not a SQLite database"),
        (_other_application, "is a SQLite database but not gatekeeper's"),
        (lambda p: sqlite3.connect(p).execute("VACUUM").connection.close(), "no tables"),
    ],
    ids=["empty", "random-bytes", "other-application", "empty-sqlite"],
)
async def test_an_existing_file_that_is_no_gatekeeper_database_is_refused_untouched(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    path = tmp_path / "gk.db"
    make(path)
    before = path.read_bytes()
    with pytest.raises(NotAGatekeeperDatabase) as refused:
        await open_store(path)
    message = str(refused.value)
    assert says in message
    assert str(path) in message
    assert "point database: at" in message or "delete it" in message  # what to do
    assert path.read_bytes() == before  # neither migrated nor "repaired"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gk.db", "gk.db.lock"]


async def test_a_gatekeeper_database_opens_and_a_missing_one_is_created(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "gk.db"
    created = await open_store(path)  # no file: a new database, folder and all
    await created.close()
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert not path.with_name("gk.db.new").exists()
    reopened = await open_store(path)
    await reopened.close()


async def test_a_write_ahead_log_without_its_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gk.db"
    path.with_name("gk.db-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(28))
    with pytest.raises(NotAGatekeeperDatabase, match="write-ahead log"):
        await open_store(path)
    assert not path.exists()


async def test_a_start_that_died_while_creating_leaves_no_half_database(
    tmp_path: Path,
) -> None:
    """A new database is built under ``.new`` and renamed into place: what a killed start
    left there is scratch, removed by the next start, and the path stays free."""
    path = tmp_path / "gk.db"
    path.with_name("gk.db.new").write_bytes(b"")
    store = await open_store(path)
    await store.close()
    assert not path.with_name("gk.db.new").exists()


# -- startup failures: one line, exit 1, no hang ----------------------------------------


def _started_once(project: Project) -> Path:
    """Serve once and stop: the project's database now exists."""
    with running(project):
        pass
    return database_of(project)


def _assert_one_clear_line(code: int, err: str, seconds: float, *says: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for text in says:
        assert text in lines[0], lines[0]
    print(f"exited in {seconds:.2f} s: {lines[0]}")


def test_serve_on_an_empty_database_file_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = database_of(project)
    database.parent.mkdir()
    database.write_bytes(b"")
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(code, err, seconds, str(database), "empty file", "delete it")
    assert database.read_bytes() == b""


def test_serve_on_a_corrupted_page_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = _started_once(project)
    with contextlib.closing(sqlite3.connect(database)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'facts'").fetchone()
    with database.open("r+b") as file:  # overwrite the facts table's root page
        file.seek((root[0] - 1) * page_size)
        file.write(b"\xff" * page_size)
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(code, err, seconds, str(database), "restore it from a backup")


def test_serve_on_a_database_another_process_has_locked_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = _started_once(project)
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        code, err, seconds = serve_to_the_end(project)
        other.execute("ROLLBACK")
    _assert_one_clear_line(code, err, seconds, str(database), "locked", "stop that process")


def test_serve_where_the_database_folder_cannot_be_made_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    (project.root / "state").write_text("a file where the database's folder should be")
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(
        code, err, seconds, str(database_of(project)), "create", "a file is in the way"
    )


def _unwritable_folder() -> Path | None:
    """A folder even root cannot create files in (sysfs), or None."""
    folder = Path("/sys")
    try:
        (folder / "gatekeeper-probe").touch()
    except OSError:
        return folder if folder.is_dir() else None
    (folder / "gatekeeper-probe").unlink()
    return None


@pytest.mark.skipif(_unwritable_folder() is None, reason="no unwritable folder here")
def test_serve_in_an_unwritable_folder_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = f"{_unwritable_folder()}/gatekeeper.db"
    text = project.config_path.read_text()
    project.config_path.write_text(text.replace("state/gatekeeper.db", database))
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(code, err, seconds, database, "needs to write in the database's folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_serve_on_a_read_only_database_exits_1_with_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = _started_once(project)
    database.chmod(0o444)
    try:
        code, err, seconds = serve_to_the_end(project)
    finally:
        database.chmod(0o644)
    _assert_one_clear_line(code, err, seconds, str(database), "write access")


def test_a_startup_failure_shows_its_traceback_at_debug_level_only(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    database = database_of(project)
    database.parent.mkdir()
    database.write_bytes(os.urandom(4096))
    code, err, _ = serve_to_the_end(project, "--log-level", "debug")
    assert code == 1
    assert "Traceback" in err and "not a SQLite database" in err


def test_check_and_plan_do_not_open_the_database(
    project_factory: Callable[..., Project],
) -> None:
    """``check`` validates files and ``plan`` reads a snapshot or a daemon over HTTP:
    neither opens the database, so neither is blocked by a serving daemon's lock nor
    touches a database URL the build cannot open (``serve`` refuses that by name)."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    text = project.config_path.read_text().replace(
        "database: state/gatekeeper.db", "database: postgresql://gk@db.example/gk"
    )
    project.config_path.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "check", "-c", str(project.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (project.root / "state").exists()


def test_serve_refuses_unsupported_database_url_without_creating_a_file(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    text = project.config_path.read_text().replace(
        "database: state/gatekeeper.db", "database: mysql://gk:s3cret@db.example/gk"
    )
    project.config_path.write_text(text)
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(code, err, seconds, "'mysql' is not supported")
    assert "s3cret" not in err
    assert not any(p.name.startswith("mysql") for p in project.root.rglob("*"))


def test_serve_on_an_unreachable_postgresql_says_which_database_in_one_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    url = "postgresql://gk@127.0.0.1:1/gkdb?connect_timeout=2"
    text = project.config_path.read_text().replace("state/gatekeeper.db", url)
    project.config_path.write_text(text)
    code, err, seconds = serve_to_the_end(project)
    _assert_one_clear_line(code, err, seconds, "gkdb on 127.0.0.1:1", "PGPASSWORD")


def test_store_unavailable_names_its_condition() -> None:
    assert StoreUnavailable("x").condition == "unavailable"
    assert StoreUnavailable("x", "disk_full").condition == "disk_full"


# -- SIGHUP ------------------------------------------------------------------------------


def test_sighup_reloads_the_rules_and_never_kills_the_daemon(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    port = free_port()
    process = serve(project, "--no-watch", port=port)  # only SIGHUP can bring a new rule in

    def live_rules() -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/rules", timeout=5) as r:
            return sorted(rule["id"] for rule in json.loads(r.read())["rules"])

    try:
        wait_healthy(port, process)
        for _ in range(3):  # several in a row, none fatal
            process.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        project.write_rule("design.yaml", DESIGN_RULE)
        time.sleep(2.5)  # a watcher would have reloaded by now (it waits 1.6 s for quiet)
        assert live_rules() == ["tower-a/deploy-docs"], "the rules changed without SIGHUP"
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        rules: list[str] = []
        while time.monotonic() < deadline and len(rules) < 2:
            assert process.poll() is None, "SIGHUP ended the daemon"
            rules = live_rules()
            time.sleep(0.1)
        assert rules == ["tower-a/deploy-docs", "tower-a/design-release"]
        assert wait_healthy(port, process)["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert err.count("reloading the config and rules on SIGHUP") == 4, err
    assert "Traceback" not in err


# -- a database a newer gatekeeper wrote -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_daemon_refuses_a_database_of_a_newer_schema_and_leaves_it_alone(
    backend: str, project_factory: Callable[..., Project], request: pytest.FixtureRequest
) -> None:
    """``gatekeeper serve`` on a database whose schema version is above this gatekeeper's
    exits 1 with one line naming the versions (``SchemaTooNew``), writing nothing."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    if backend == "postgresql":
        from .test_daemon_postgresql import on_postgres

        url = request.getfixturevalue("postgres_url")  # skips without a server, as it says
        on_postgres(project, url)
    else:
        url = str(database_of(project))
    store = await open_store(url)  # created at this gatekeeper's version
    await store.close()
    version = later_version(backend, url)
    code, err, _ = serve_to_the_end(project)
    assert code == 1, err
    [line] = error_lines(err)
    assert f"has schema version {version}, newer than this gatekeeper knows" in line, line
    assert "Traceback" not in err
    assert later_version(backend, url, bump=False) == version  # nothing migrated or written


def later_version(backend: str, url: str, *, bump: bool = True) -> int:
    """Mark the database at ``url`` as written by a newer gatekeeper (one schema version
    later), or with ``bump=False`` read its version; returns the version."""
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(url)) as db:
            if bump:
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                db.execute(f"PRAGMA user_version={version + 1}")
            return int(db.execute("PRAGMA user_version").fetchone()[0])
    import psycopg

    with psycopg.connect(url) as db:
        if bump:
            db.execute(
                "INSERT INTO schema_version (version, name)"
                " SELECT MAX(version) + 1, 'later' FROM schema_version"
            )
        [(version,)] = db.execute("SELECT MAX(version) FROM schema_version").fetchall()
        return int(version)
