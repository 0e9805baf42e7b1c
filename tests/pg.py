"""A scratch PostgreSQL database per test, for every test that needs one.

The server: ``GATEKEEPER_TEST_POSTGRES``, the ``postgresql://`` URL of a database the tests
may connect to and create databases from (default ``DEFAULT_SERVER``). When it cannot be
reached, a test asking for a database is skipped saying why, unless
``GATEKEEPER_REQUIRE_POSTGRES=1`` (CI): then it fails.

Each test gets an empty database of its own: a fresh schema (``gk_<random>``, first on the
search path of every connection its URL opens) in a database created once per test session
(``gk_test_<random>``, dropped at exit). gatekeeper keeps its tables in the current schema,
so a fresh schema is what a deployment starts from. (A database per test took 30 ms to
create on an idle machine, 0.3 to 0.9 s while other work ran: the PostgreSQL contract tests
went from 11 s to 57 s; a schema takes a few ms.)
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url() -> str:
    """The URL of the database the scratch databases are created from."""
    return os.environ.get("GATEKEEPER_TEST_POSTGRES", DEFAULT_SERVER)


@functools.cache
def unreachable() -> str | None:
    """Why the test server cannot be used (once per session), or None."""
    try:
        with psycopg.connect(server_url(), autocommit=True, connect_timeout=3) as db:
            db.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {describe(server_url())} is not reachable: {reason}"
    return None


def describe(url: str) -> str:
    info = conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}"


def require() -> None:
    """Skip the test (or fail it, with ``GATEKEEPER_REQUIRE_POSTGRES=1``) when the test
    server cannot be used."""
    reason = unreachable()
    if reason is None:
        return
    if os.environ.get("GATEKEEPER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (GATEKEEPER_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(f"{reason}; set GATEKEEPER_TEST_POSTGRES to a server to run it")


def admin() -> psycopg.Connection[tuple[object, ...]]:
    """A connection to the test server's database, autocommit (for CREATE DATABASE)."""
    return psycopg.connect(server_url(), autocommit=True)


@functools.cache
def session_database() -> str:
    """The URL of the database the tests' schemas are made in: created on first use,
    dropped when the test run ends (its connections ended)."""
    name = f"gk_test_{secrets.token_hex(6)}"
    with admin() as db:
        db.execute(f'CREATE DATABASE "{name}"')
    atexit.register(_drop_database, name)
    return _with_dbname(server_url(), name)


def _drop_database(name: str) -> None:
    with admin() as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_database() -> Iterator[str]:
    """The URL of an empty database: a new schema, first on the search path of the
    connections the URL opens (``options=-csearch_path=...``); dropped at the end with
    everything in it. Skips or fails as ``require`` when there is no server."""
    require()
    database = session_database()
    schema = f"gk_{secrets.token_hex(6)}"
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f'CREATE SCHEMA "{schema}"')
    try:
        separator = "&" if "?" in database else "?"
        yield f"{database}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(database, autocommit=True) as db:
            db.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _with_dbname(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead (its query string kept)."""
    head, sep, query = url.partition("?")
    base = head.rsplit("/", 1)[0] if head.count("/") > 2 else head
    return f"{base}/{name}{sep}{query}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A scratch database's URL (see ``scratch_database``)."""
    with scratch_database() as url:
        yield url
