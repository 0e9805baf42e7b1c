"""A scratch PostgreSQL database per test, for every test that needs one.

The server: ``GATEKEEPER_TEST_POSTGRES``, the ``postgresql://`` URL of a database the tests
may connect to and create databases from (default ``DEFAULT_SERVER``). When it cannot be
reached, a test asking for a database is skipped saying why, unless
``GATEKEEPER_REQUIRE_POSTGRES=1`` (CI): then it fails.

Each test gets its own database (``CREATE DATABASE gk_test_<random>``, about 30 ms here,
dropped at teardown, connections and all), so tests share nothing and a database is what a
deployment starts from: empty.
"""

from __future__ import annotations

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


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty database on the test server: its URL; dropped at the end (its open
    connections are ended). Skips or fails as ``require`` when there is no server."""
    require()
    name = f"gk_test_{secrets.token_hex(6)}"
    with admin() as db:
        db.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(server_url(), name)
    finally:
        with admin() as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
