"""The daemon's life cycle: started and stopped by the aiohttp application that serves it
(``cleanup_ctx``), shutdown draining the ingest queue within the grace period, and the
engine's action ids coming from the generator the runtime passes it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from gatekeeper.config import load_config
from gatekeeper.engine.model import FactInput
from gatekeeper.http.app import create_app
from gatekeeper.runtime.daemon import Daemon, ShuttingDown

from .conftest import DEPLOY_RULE, ENV, Project

COMPLETED = FactInput("tower-a", "task", "T-17", {"status": "completed"})


def new_daemon(project: Project, **options: Any) -> Daemon:
    return Daemon(load_config(project.config_path), ENV, watch=False, tick_s=0.2, **options)


async def test_the_app_starts_the_daemon_and_stops_it_at_cleanup(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    daemon = new_daemon(project)
    runner = web.AppRunner(create_app(daemon))
    await runner.setup()
    try:
        assert daemon.health().ruleset is not None
        names = {task.get_name() for task in daemon._tasks}
        assert names == {"writer", "dispatcher", "clock-ticks", "housekeeping"}
        assert (await daemon.ingest([COMPLETED])).seqs == [1]
    finally:
        await runner.cleanup()
    assert daemon._tasks == []
    with pytest.raises(ShuttingDown):
        await daemon.ingest([COMPLETED])


async def test_an_app_serving_a_started_daemon_leaves_stopping_to_its_starter(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    daemon = new_daemon(project)
    await daemon.start()
    try:
        runner = web.AppRunner(create_app(daemon))
        await runner.setup()
        await runner.cleanup()
        assert (await daemon.ingest([COMPLETED])).seqs == [1]  # still running
    finally:
        await daemon.stop(grace_s=1)


async def test_stop_answers_batches_still_queued_after_the_grace_period(
    project_factory: Callable[..., Project], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch still queued when the grace period ends was never answered: its caller
    waited forever. It is now refused (``ShuttingDown``) with nothing applied, while the
    group being committed finishes."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    daemon = new_daemon(project)
    await daemon.start()
    store = daemon.store
    original = store.commit_transitions
    in_commit, release = asyncio.Event(), asyncio.Event()

    async def slow_commit(transitions: Any, **options: Any) -> list[list[int]]:
        in_commit.set()
        await release.wait()
        return await original(transitions, **options)

    monkeypatch.setattr(store, "commit_transitions", slow_commit)
    first = asyncio.create_task(daemon.ingest([COMPLETED]))
    await asyncio.wait_for(in_commit.wait(), 5)
    second = asyncio.create_task(daemon.ingest([FactInput("tower-a", "task", "T-2", {})]))
    await asyncio.sleep(0)  # queued behind the group being committed
    asyncio.get_running_loop().call_later(0.5, release.set)
    started = time.monotonic()
    await asyncio.wait_for(daemon.stop(grace_s=0.2), 5)
    assert time.monotonic() - started < 4
    assert (await first).seqs == [1]
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(second, 1)


async def test_action_ids_come_from_the_generator_the_runtime_passes(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    counter = itertools.count(1)
    daemon = new_daemon(project, new_action_id=lambda: f"act_test{next(counter)}")
    await daemon.start()
    try:
        await daemon.ingest([COMPLETED])
        actions = await daemon.list_actions()
        assert [a.action_id for a in actions] == ["act_test1"]
    finally:
        await daemon.stop(grace_s=0)


def test_the_http_layer_uses_only_the_daemon_facade() -> None:
    """Handlers call the daemon's methods; its parts (store, writer, rulesets, ticker,
    dispatcher, metrics, config) are the runtime's business."""
    import ast
    import inspect
    from pathlib import Path

    import gatekeeper.http

    facade = {
        name
        for name, member in inspect.getmembers(Daemon)
        if not name.startswith("_") and inspect.isfunction(member)
    } - {"start", "stop", "running"}
    used: dict[str, str] = {}
    for path in Path(gatekeeper.http.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            is_daemon = (isinstance(value, ast.Name) and value.id == "daemon") or (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "_daemon"
            )
            if is_daemon:
                used[node.attr] = f"{path.name}:{node.lineno}"
    assert used, "no daemon call found: the check no longer sees the handlers"
    assert {name: where for name, where in used.items() if name not in facade} == {}
