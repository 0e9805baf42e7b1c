"""The contract test suite of ``gatekeeper.store``: every backend must pass it.

``backend`` is parametrized over the backends: SQLite (a file in the test's folder) and
PostgreSQL (a scratch database per test, ``tests/pg.py``: skipped when no server can be
reached, unless ``GATEKEEPER_REQUIRE_POSTGRES=1``). Stores are opened through
``open_store``, on real databases, as the daemon opens them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekeeper.store import Store, open_store

from .. import pg

BACKENDS = ["sqlite", "postgresql"]


@dataclass
class Backend:
    """One backend under test: ``url`` names a fresh database; ``open()`` opens a store on
    it (again and again, for durability across reopening); every store opened is closed
    at the end of the test."""

    name: str
    url: str
    opened: list[Store]

    async def open(self) -> Store:
        store = await open_store(self.url)
        self.opened.append(store)
        return store


def _url(name: str, tmp_path: Path, cleanup: ExitStack) -> str:
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'gatekeeper.db'}"
    if name == "postgresql":
        return cleanup.enter_context(pg.scratch_database())
    raise AssertionError(f"no database for backend {name!r}")


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened: list[Store] = []
    with ExitStack() as cleanup:
        yield Backend(request.param, _url(request.param, tmp_path, cleanup), opened)
        for store in opened:
            await store.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
