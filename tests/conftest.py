"""Shared fixtures: factories for rule directories and configs, a real webhook receiver on
127.0.0.1, and a running daemon with its real aiohttp server on an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import json
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .pg import postgres_url  # noqa: F401 -- the fixture, for every test

SECRET = "whsec_" + base64.b64encode(b"gatekeeper-test-secret-32-bytes!").decode()
ENV = {"BANK_SECRET": SECRET, "CHAT_SECRET": SECRET, "CI_SECRET": SECRET}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    raw: str

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Receiver:
    """A real HTTP receiver on 127.0.0.1 that records every request.

    ``responses`` is a queue of statuses to answer with (then 200 forever);
    ``path_responses`` one per path (``/bank``), used first for requests to that path.
    """

    url: str = ""
    received: list[Recorded] = field(default_factory=list)
    responses: list[int] = field(default_factory=list)
    path_responses: dict[str, list[int]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Recorded(request.path, dict(request.headers), await request.text()))
        self.arrived.set()
        queue = self.path_responses.get(request.path) or self.responses
        status = queue.pop(0) if queue else 200
        return web.json_response({"status": status}, status=status)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Recorded]:
        async def enough() -> None:
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)
        return self.received


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", recv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    recv.url = f"http://127.0.0.1:{port}"
    yield recv
    await runner.cleanup()


def config_text(receiver_url: str, **extra: Any) -> str:
    """A gatekeeper.yaml with the test targets (all pointing at ``receiver_url``)."""
    body = textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        database: state/gatekeeper.db
        rules_dir: rules
        targets:
          escrow-bank:
            url: {receiver_url}/bank
            secret_env: BANK_SECRET
            delivery:
              {{max_attempts: 3, max_age_s: 60, backoff_base_s: 0.05, backoff_cap_s: 0.2,
                timeout_s: 2}}
          finance-chat: {{url: "{receiver_url}/chat", format: slack, secret_env: CHAT_SECRET}}
          ci: {{url: "{receiver_url}/ci", secret_env: CI_SECRET}}
        escrows:
          tower-a-escrow: {{currency: USD, limit: "20000.00"}}
        """
    )
    for key, value in extra.items():
        body += f"{key}: {json.dumps(value)}\n"
    return body


@dataclass
class Project:
    """A temporary deployment folder: gatekeeper.yaml, rules/, and the database under state/."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "gatekeeper.yaml"

    @property
    def rules_dir(self) -> Path:
        return self.root / "rules"

    def write_rule(self, name: str, text: str) -> Path:
        path = self.rules_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path


@pytest.fixture
def project_factory(tmp_path: Path) -> Iterator[Callable[..., Project]]:
    def make(receiver_url: str = "http://127.0.0.1:9", **extra: Any) -> Project:
        project = Project(tmp_path)
        project.rules_dir.mkdir(exist_ok=True)
        project.config_path.write_text(config_text(receiver_url, **extra))
        return project

    yield make


DESIGN_RULE = """\
id: tower-a/design-release
description: Release design-phase escrow after approval and QA
project: tower-a
when: >
  milestone.design.status == "approved"
  and quality_gate.qg1.passed
fire: once
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "5000.00",
              currency: USD, payee: acme-architects}
  - notify: {target: finance-chat,
             message: "Released ${amount} ${currency} to ${payee} (${rule_id})"}
"""

DEPLOY_RULE = """\
id: tower-a/deploy-docs
project: tower-a
when: task["T-17"].status == "completed"
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: docs}}
"""


def outbox_entry(
    kind: str, payload: dict[str, Any], *, target: str = "t", rule_id: str = "tower-a/r"
) -> Any:
    """A pending outbox entry (action ``act_0123``, first firing of ``rule_id``)."""
    from gatekeeper.store.records import OutboxEntry

    return OutboxEntry(
        action_id="act_0123",
        rule_id=rule_id,
        firing_id=f"{rule_id}#1",
        kind=kind,
        target=target,
        payload=payload,
        status="pending",
        attempts=0,
        created_at=datetime(2026, 11, 1, 9, 0, tzinfo=UTC),
        next_attempt_at=datetime(2026, 11, 1, 9, 0, tzinfo=UTC),
        last_error=None,
        delivered_at=None,
        decision_id=1,
    )


def fact(kind: str, id: str, **data: Any) -> dict[str, Any]:
    return {"project": "tower-a", "kind": kind, "id": id, "data": data}


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


@dataclass
class Running:
    """A started daemon served over real HTTP on 127.0.0.1 (ephemeral port)."""

    daemon: Any
    url: str
    session: aiohttp.ClientSession
    runner: web.AppRunner

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        return await post_json(self.session, self.url + path, body)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.url + path) as response:
            return response.status, await response.json()

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.daemon.stop(grace_s=2)


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Any]]:
    from gatekeeper.config import load_config
    from gatekeeper.http.app import create_app
    from gatekeeper.runtime.daemon import Daemon

    running: list[Running] = []
    session = aiohttp.ClientSession()

    async def start(
        project: Project,
        *,
        clock: Any = None,
        watch: bool = False,
        env: dict[str, str] | None = None,
        tick_s: float = 0.2,
        ui: bool = False,
    ) -> Running:
        config = load_config(project.config_path)
        daemon = Daemon(
            config, ENV if env is None else env, clock=clock, watch=watch, tick_s=tick_s
        )
        await daemon.start()
        app = create_app(daemon)
        if ui:  # the status page, as `gatekeeper serve` mounts it
            from gatekeeper.ui import mount

            mount(app)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        result = Running(daemon, f"http://127.0.0.1:{port}", session, runner)
        running.append(result)
        return result

    yield start
    for item in running:
        if item.daemon.store.is_open:
            await item.stop()
    await session.close()
