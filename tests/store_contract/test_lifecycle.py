"""StoreLifecycle and open_store: opening, closing, reopening, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatekeeper.store import open_store, store_for
from gatekeeper.store.errors import StoreError, StoreUnavailable, UnsupportedDatabase

from . import build
from .conftest import Backend


async def test_open_close_and_is_open(backend: Backend) -> None:
    store = await backend.open()
    assert store.is_open
    await store.close()
    assert not store.is_open
    await store.close()  # idempotent
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.commit_transition(build.facts(build.T0, ("p", "task", "a", {})))
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.list_facts()


async def test_what_is_committed_survives_closing_and_reopening(backend: Backend) -> None:
    store = await backend.open()
    seqs = await store.commit_transition(
        build.facts(build.T0, ("tower-a", "task", "a", {"x": 1}), ("tower-a", "task", "b", {}))
    )
    assert seqs == [1, 2]
    await store.commit_transition(build.firing("tower-a/r", 1, build.at(1)))
    await store.close()

    again = await backend.open()
    assert await again.load_facts() == {
        ("tower-a", "task", "a"): {"x": 1},
        ("tower-a", "task", "b"): {},
        ("tower-a", "task", "tower-a/r-1"): {"n": 1},
    }
    assert [f.seq for f in await again.fact_log()] == [1, 2, 3]
    assert [a.action_id for a in await again.list_actions()] == [build.action_id("tower-a/r", 1)]
    # sequence numbers go on after the last one
    assert await again.commit_transition(build.facts(build.at(2), ("p", "k", "c", {}))) == [4]


async def test_a_database_url_of_another_scheme_is_refused_naming_it() -> None:
    with pytest.raises(UnsupportedDatabase, match="'mysql'") as refused:
        await open_store("mysql://gk:s3cret@db.example/gatekeeper")
    assert "s3cret" not in str(refused.value)  # the URL's password is never repeated
    assert isinstance(refused.value, StoreError)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://gk:s3cret@db.example/gatekeeper",
        "postgres://gk:s3cret@db.example:5433/gatekeeper",
        "postgresql://gk@db.example/gatekeeper?password=s3cret",
    ],
)
async def test_a_postgresql_url_with_a_password_is_refused_without_repeating_it(
    url: str,
) -> None:
    with pytest.raises(UnsupportedDatabase, match="holds a password") as refused:
        await open_store(url)
    assert "s3cret" not in str(refused.value)
    assert "PGPASSWORD" in str(refused.value)
    with pytest.raises(UnsupportedDatabase, match="three slashes"):
        store_for("sqlite://relative.db")
    with pytest.raises(UnsupportedDatabase, match="names no file"):
        store_for("sqlite:///")


async def test_a_plain_path_and_a_sqlite_url_open_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "gk.db"
    first = await open_store(path)
    try:
        await first.commit_transition(build.facts(build.T0, ("p", "task", "a", {"v": 1})))
    finally:
        await first.close()
    for database in (str(path), f"sqlite:///{path}"):
        store = await open_store(database)
        try:
            assert await store.load_facts() == {("p", "task", "a"): {"v": 1}}
        finally:
            await store.close()


async def test_an_in_memory_database_works_and_is_private() -> None:
    one = await open_store("sqlite:///:memory:")
    two = await open_store("sqlite:///:memory:")
    try:
        await one.commit_transition(build.firing("tower-a/r", 1, build.T0))
        assert [a.status for a in await one.list_actions()] == ["pending"]  # reader sees it
        assert await two.list_actions() == []
    finally:
        await one.close()
        await two.close()


async def test_a_file_that_is_no_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "gk.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(StoreUnavailable):
        await open_store(path)
