"""RulesetReads: the active ruleset version, and the announcement of each activation to the
other daemons of a shared database (PostgreSQL: LISTEN/NOTIFY, sent only on commit)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from gatekeeper.store import Store
from gatekeeper.store.errors import Conflict, RulesetChanged

from . import build
from .conftest import Backend


async def test_the_active_version_is_the_last_activated_one(backend: Backend) -> None:
    store = await backend.open()
    assert await store.active_ruleset_version() is None
    await store.commit_transition(build.ruleset("v1", build.T0))
    await store.commit_transition(build.ruleset("v2", build.at(10), {"x.yaml": "- id: x\n"}))
    assert await store.active_ruleset_version() == "v2"
    await store.commit_transition(build.ruleset("v1", build.at(20)))  # back to v1
    assert await store.active_ruleset_version() == "v1"
    await store.close()
    assert await (await backend.open()).active_ruleset_version() == "v1"


async def test_a_database_one_daemon_holds_announces_nothing(store: Store) -> None:
    if store.shared:
        pytest.skip("a shared database announces activations (next test)")
    changes = store.ruleset_changes()
    await store.commit_transition(build.ruleset("v1", build.T0))
    assert [version async for version in changes] == []


async def _first_announced(
    changes: AsyncGenerator[str, None], activate: Store, version: str, tries: int = 40
) -> str:
    """The first version ``changes`` yields, activating ``version`` through ``activate``
    until one is announced (the listener starts listening at its first step, at a time
    the test cannot see)."""
    waiting = asyncio.ensure_future(anext(changes))
    for step in range(tries):
        await activate.commit_transition(build.ruleset(version, build.at(step)))
        done, _ = await asyncio.wait([waiting], timeout=0.25)
        if done:
            return waiting.result()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    raise AssertionError(f"no activation announced after {tries} activations of {version}")


async def test_another_daemons_activation_is_announced_once_committed(backend: Backend) -> None:
    listening = await backend.open()
    if not listening.shared:
        pytest.skip("one daemon holds this database: nothing to announce")
    other = await backend.open()
    changes = listening.ruleset_changes()
    try:
        assert await _first_announced(changes, other, "v1") == "v1"
        await other.commit_transition(build.idempotent("k", build.at(100)))
        with pytest.raises(Conflict):  # the key is reused: the whole transaction rolls back
            await other.commit_transitions(
                [build.ruleset("rolled-back", build.at(101)), build.idempotent("k", build.at(101))]
            )
        assert await listening.active_ruleset_version() == "v1"
        await other.commit_transition(build.ruleset("v2", build.at(102)))
        announced = [await asyncio.wait_for(anext(changes), 5)]
        while announced[-1] == "v1":  # v1 again: activated more than once while listening began
            announced.append(await asyncio.wait_for(anext(changes), 5))
        assert announced[-1] == "v2"
        assert await listening.active_ruleset_version() == "v2"
    finally:
        await changes.aclose()


async def test_a_commit_planned_with_another_ruleset_than_the_active_one_is_refused(
    store: Store,
) -> None:
    await store.commit_transition(build.ruleset("v1", build.T0))
    fact = build.facts(build.at(1), ("tower-a", "task", "a", {"v": 1}))
    assert await store.commit_transitions([fact], planned_with="v1") == [[1]]
    await store.commit_transition(build.ruleset("v2", build.at(2), {"x.yaml": "- id: x\n"}))
    late = build.facts(build.at(3), ("tower-a", "task", "b", {}))
    with pytest.raises(RulesetChanged) as refused:
        await store.commit_transitions([late], planned_with="v1")
    assert (refused.value.planned_with, refused.value.active) == ("v1", "v2")
    assert [f.id for f in await store.list_facts()] == ["a"]  # nothing of it written
    assert await store.commit_transitions([late], planned_with="v2") == [[2]]
