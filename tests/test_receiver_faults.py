"""Delivery survives faulty receivers ("money-safe delivery").

Real aiohttp receivers on 127.0.0.1 answer with scripted faults (5xx, hangs longer than the
target's timeout, refused connections, 429 with Retry-After, 4xx), and the real daemon
delivers to them with a tiny backoff. The outbox is read through the daemon's HTTP API
(``GET /v1/actions``) and the attempts through the store (``list_attempts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import inspect
import json
import math
import random
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from gatekeeper.delivery.dispatcher import MAX_DELIVERIES_PER_TARGET

from .conftest import SECRET, Project, fact

FAST: dict[str, Any] = {
    "max_attempts": 20,
    "max_age_s": 30,
    "backoff_base_s": 0.02,
    "backoff_cap_s": 0.2,
    "timeout_s": 0.5,
}


def now() -> float:
    return asyncio.get_running_loop().time()


# -- a receiver with scripted faults ------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request: after ``delay_s`` (a hang when longer than the
    target's timeout), with ``status``, ``headers`` and ``body``."""

    status: int = 200
    body: str = '{"ok": true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Hit:
    """One request as the receiver saw it (times are the event loop's clock)."""

    path: str
    headers: dict[str, str]
    raw: str
    arrived_at: float
    answered_at: float | None = None
    status: int | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


Script = Callable[[Hit, int], Answer]
"""Picks the answer to a request from the request and how many times (1-based) its
``webhook-id`` has been seen."""


def always(answer: Answer) -> Script:
    return lambda _hit, _n: answer


def fail_first(count: int, answer: Answer) -> Script:
    """Answer ``answer`` to the first ``count`` requests of every action, then 200."""
    return lambda _hit, n: answer if n <= count else Answer()


class FaultyReceiver:
    """A real HTTP receiver on 127.0.0.1 that answers as ``script`` says and records every
    request. It can be started late on a port chosen in advance (refused until then)."""

    def __init__(self, port: int, script: Script) -> None:
        self.port = port
        self.script = script
        self.hits: list[Hit] = []
        self._seen: dict[str, int] = defaultdict(int)
        self._release = asyncio.Event()  # ends every hang at once (teardown)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release_hangs(self) -> None:
        self._release.set()

    async def _handle(self, request: web.Request) -> web.Response:
        hit = Hit(request.path, dict(request.headers), await request.text(), now())
        self.hits.append(hit)
        self._seen[hit.webhook_id] += 1
        answer = self.script(hit, self._seen[hit.webhook_id])
        if answer.delay_s > 0 and not self._release.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), answer.delay_s)
        hit.answered_at, hit.status = now(), answer.status
        return web.Response(
            status=answer.status,
            text=answer.body,
            content_type="application/json",
            headers=answer.headers,
        )

    def by_id(self) -> dict[str, list[Hit]]:
        grouped: dict[str, list[Hit]] = defaultdict(list)
        for hit in self.hits:
            grouped[hit.webhook_id].append(hit)
        return dict(grouped)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[FaultyReceiver]]]:
    made: list[FaultyReceiver] = []

    async def make(script: Script | None = None, *, port: int = 0, start: bool = True) -> Any:
        recv = FaultyReceiver(port, script or always(Answer()))
        made.append(recv)
        if start:
            await recv.start()
        return recv

    yield make
    for recv in made:
        await recv.stop()


# -- a deployment with tiny backoff -------------------------------------------------------


def deploy(
    project: Project,
    targets: dict[str, tuple[str, dict[str, Any]]],
    rules: dict[str, list[str]],
) -> None:
    """Write gatekeeper.yaml (JSON is YAML) with ``targets`` (name: (url, delivery policy))
    and one ``fire: each_time`` rule per entry of ``rules`` (task id: action lines); the
    rule for ``T-n`` fires each time task ``T-n`` becomes completed."""
    config = {
        "listen": "127.0.0.1:0",
        "database": "state/gatekeeper.db",
        "rules_dir": "rules",
        "targets": {
            name: {"url": url, "secret_env": "BANK_SECRET", "delivery": policy}
            for name, (url, policy) in targets.items()
        },
        "escrows": {"tower-a-escrow": {"currency": "USD", "limit": "20000.00"}},
    }
    project.config_path.write_text(json.dumps(config, indent=2))
    for task, actions in rules.items():
        lines = "\n".join(f"  - {a}" for a in actions)
        project.write_rule(
            f"{task}.yaml",
            f'id: tower-a/{task.lower()}\nproject: tower-a\nwhen: task["{task}"].status == '
            f'"completed"\nfire: each_time\nactions:\n{lines}\n',
        )


def release(target: str, amount: str = "100.00") -> str:
    return (
        f"release: {{target: {target}, escrow: tower-a-escrow, amount: "
        f'"{amount}", currency: USD, payee: acme-architects}}'
    )


def notify(target: str) -> str:
    return f'notify: {{target: {target}, message: "${{rule_id}} fired at ${{fired_at}}"}}'


def pipeline(target: str) -> str:
    return f"pipeline: {{target: {target}, ref: main, inputs: {{stage: docs}}}}"


def complete(*tasks: str, status: str = "completed") -> dict[str, Any]:
    return {"facts": [fact("task", t, status=status) for t in tasks]}


async def fire(gk: Any, *tasks: str) -> None:
    """Fire the rules of ``tasks`` (again): reopen the tasks, then complete them."""
    for status in ("open", "completed"):
        code, body = await gk.post("/v1/facts", complete(*tasks, status=status))
        assert code == 200, body


async def actions(gk: Any, status: str | None = None) -> list[dict[str, Any]]:
    query = "/v1/actions?limit=1000" + (f"&status={status}" if status else "")
    code, body = await gk.get(query)
    assert code == 200, body
    return list(body["actions"])


async def wait_actions(
    gk: Any, status: str, count: int, timeout_s: float = 10.0, target: str | None = None
) -> list[dict[str, Any]]:
    """Poll the API until ``count`` actions (of ``target``) have ``status``."""
    deadline = now() + timeout_s
    while True:
        found = [a for a in await actions(gk, status) if target in (None, a["target"])]
        if len(found) >= count:
            return found
        if now() > deadline:
            everything = [(a["target"], a["status"], a["last_error"]) for a in await actions(gk)]
            raise AssertionError(f"expected {count} {status} actions, got {everything}")
        await asyncio.sleep(0.02)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float
) -> None:
    """Poll ``check`` (plain or async) until it holds, or fail after ``timeout_s``."""
    deadline = now() + timeout_s
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if now() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def quiet_for(seconds: float) -> None:
    """Let ``seconds`` pass to show that nothing more happens (longer than any backoff)."""
    await asyncio.sleep(seconds)


# -- 1. 5xx, then 200 -------------------------------------------------------------------


async def test_5xx_then_200_delivers_every_action_once_with_stable_ids(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(fail_first(2, Answer(500, "upstream exploded")))
    project = project_factory()
    policy = FAST | {"max_attempts": 5}
    deploy(
        project,
        {"bank": (recv.url + "/bank", policy), "ci": (recv.url + "/ci", policy)},
        {"T-1": [release("bank"), notify("ci")], "T-2": [pipeline("ci"), release("bank")]},
    )
    gk = await start_daemon(project)
    await fire(gk, "T-1", "T-2")

    delivered = await wait_actions(gk, "delivered", 4)
    assert len(delivered) == 4
    await quiet_for(0.3)  # no further request once delivered
    by_id = recv.by_id()
    assert set(by_id) == {a["action_id"] for a in delivered}
    for action in delivered:
        hits = by_id[action["action_id"]]
        assert [h.status for h in hits] == [500, 500, 200]  # exactly one success
        for hit in hits:  # every retry: same id, same body, a valid signature
            assert Webhook(SECRET).verify(hit.raw, hit.headers) == hits[0].body
            assert hit.body["action_id"] == action["action_id"]
            if action["kind"] == "release":
                assert hit.headers["Idempotency-Key"] == action["action_id"]
                assert hit.body["release_id"] == action["action_id"]
            else:
                assert "Idempotency-Key" not in hit.headers
        assert action["attempts"] == 3
        assert action["last_error"] is None
        attempts = await gk.daemon.store.list_attempts(action["action_id"])
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
        assert [a.error for a in attempts] == [
            "HTTP 500: upstream exploded",
            "HTTP 500: upstream exploded",
            None,
        ]
        assert all(a.latency_ms >= 0 for a in attempts)
        assert attempts[0].started_at < attempts[1].started_at < attempts[2].started_at
    assert {a["kind"] for a in delivered} == {"release", "notify", "pipeline"}
    assert await actions(gk, "pending") == []
    assert await actions(gk, "dead") == []


# -- 2. hangs longer than timeout_s ---------------------------------------------------------


async def test_hang_past_timeout_is_recorded_as_a_timeout_then_delivered(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(fail_first(2, Answer(200, delay_s=10.0)))  # 200, but far too late
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST | {"timeout_s": 0.4})}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1)
    assert action["attempts"] == 3
    attempts = await gk.daemon.store.list_attempts(action["action_id"])
    assert [a.status_code for a in attempts] == [None, None, 200]
    assert [a.error for a in attempts] == ["timed out after 0.4 s"] * 2 + [None]
    for timed_out in attempts[:2]:  # cut at the timeout, long before the answer (10 s)
        assert 350 <= timed_out.latency_ms < 5000
    hits = recv.by_id()[action["action_id"]]
    assert len(hits) == 3
    assert {h.headers["Idempotency-Key"] for h in hits} == {action["action_id"]}


class MaxJitter(random.Random):
    """Draws the longest delay full jitter allows, so a backoff can be measured."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_backoff_after_a_timeout_counts_from_the_failure(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(fail_first(1, Answer(200, delay_s=2.0)))
    project = project_factory()
    policy = FAST | {"timeout_s": 0.3, "backoff_base_s": 0.25, "backoff_cap_s": 0.25}
    deploy(project, {"ci": (recv.url, policy)}, {"T-1": [pipeline("ci")]})
    gk = await start_daemon(project)
    gk.daemon.dispatcher._rng = MaxJitter()  # every retry waits exactly 0.25 s
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1)
    first, second = recv.by_id()[action["action_id"]]
    timed_out_at = first.arrived_at + 0.3
    assert second.arrived_at - timed_out_at >= 0.2


# -- 3. refused for a long stretch, then back on the same port -------------------------------


async def test_receiver_down_for_a_stretch_gets_everything_when_it_returns(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(port=free_port(), start=False)  # nothing listens yet: refused
    project = project_factory()
    policy = FAST | {"max_attempts": 50}
    tasks = [f"T-{n}" for n in range(1, 6)]
    deploy(
        project,
        {"bank": (recv.url + "/bank", policy), "ci": (recv.url + "/ci", policy)},
        {
            task: [release("bank", "10.00") if n % 2 else pipeline("ci"), notify("ci")]
            for n, task in enumerate(tasks, 1)
        },
    )
    gk = await start_daemon(project)
    await fire(gk, *tasks)
    await fire(gk, *tasks)  # 5 rules x 2 firings x 2 actions

    down_since = now()

    async def refused_for_a_long_stretch() -> bool:
        # "long" next to the backoff: 1 s is five times backoff_cap_s
        pending = await actions(gk, "pending")
        return (
            now() - down_since >= 1.0
            and len(pending) == 20
            and all(a["attempts"] >= 3 for a in pending)
        )

    await eventually(refused_for_a_long_stretch, "20 actions refused for 1 s", 10)
    queued = {a["action_id"]: a for a in await actions(gk, "pending")}
    assert {a["kind"] for a in queued.values()} == {"release", "notify", "pipeline"}
    assert all("Connect" in a["last_error"] for a in queued.values()), queued

    await recv.start()  # back, on the very same port
    delivered = await wait_actions(gk, "delivered", 20)
    await quiet_for(0.3)

    assert {a["action_id"] for a in delivered} == set(queued)  # none lost
    assert await actions(gk, "dead") == []
    by_id = recv.by_id()
    assert set(by_id) == set(queued)  # every action arrived, nothing else did
    for action_id, hits in by_id.items():
        # at-least-once: a duplicate may only be the same action again, byte for byte
        assert {h.raw for h in hits} == {hits[0].raw}
        assert hits[0].body["action_id"] == action_id
        if queued[action_id]["kind"] == "release":
            assert {h.headers["Idempotency-Key"] for h in hits} == {action_id}
        attempts = await gk.daemon.store.list_attempts(action_id)
        assert attempts[-1].status_code == 200
        assert len(attempts) >= 4  # three refused at least, then the delivery
        assert all(a.status_code is None and "Connect" in (a.error or "") for a in attempts[:-1])
    releases = [h for h in recv.hits if h.path == "/bank" and h.status == 200]
    assert len({h.webhook_id for h in releases}) == 6  # 3 release rules x 2 firings


# -- 4. 429 with Retry-After --------------------------------------------------------------


async def test_429_retry_after_is_honoured(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    # the dispatcher waits max(jitter, min(Retry-After, backoff_cap_s)): the cap must allow 1 s
    recv = await receivers(fail_first(1, Answer(429, "slow down", {"Retry-After": "1"})))
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST | {"backoff_cap_s": 5})}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1)
    first, second = recv.by_id()[action["action_id"]]
    assert first.status == 429 and second.status == 200
    assert 0.95 <= second.arrived_at - first.arrived_at < 4.0  # 1 s, not the cap (5 s)
    attempts = await gk.daemon.store.list_attempts(action["action_id"])
    assert [(a.status_code, a.error) for a in attempts] == [
        (429, "HTTP 429: slow down"),
        (200, None),
    ]


async def test_retry_after_beyond_the_cap_waits_only_the_cap(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(fail_first(1, Answer(429, headers={"Retry-After": "3600"})))
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST | {"backoff_cap_s": 0.3})}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1, timeout_s=10)
    first, second = recv.by_id()[action["action_id"]]
    assert 0.25 <= second.arrived_at - first.arrived_at < 2.5  # the cap (0.3 s), not 3600 s


async def test_retry_after_counts_from_the_answer(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    slow_429 = Answer(429, headers={"Retry-After": "1"}, delay_s=0.6)
    recv = await receivers(fail_first(1, slow_429))
    project = project_factory()
    policy = FAST | {"backoff_cap_s": 5, "timeout_s": 2}
    deploy(project, {"bank": (recv.url, policy)}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1)
    first, second = recv.by_id()[action["action_id"]]
    assert first.answered_at is not None
    assert second.arrived_at - first.answered_at >= 0.95


async def test_retry_after_as_an_http_date_is_honoured(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    # RFC 9110 allows an HTTP-date: "retry at 12:00:02 GMT". The date is the next whole
    # second but one, so the wait it asks for is more than 1 s (the backoff alone: 20 ms).
    def retry_at_date(hit: Hit, n: int) -> Answer:
        if n > 1:
            return Answer()
        at = datetime.fromtimestamp(math.floor(time.time()) + 2, UTC)
        return Answer(429, "slow down", {"Retry-After": email.utils.format_datetime(at, True)})

    recv = await receivers(retry_at_date)
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST | {"backoff_cap_s": 5})}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [action] = await wait_actions(gk, "delivered", 1)
    first, second = recv.by_id()[action["action_id"]]
    assert first.status == 429 and second.status == 200
    assert 0.95 <= second.arrived_at - first.arrived_at < 4.0


# -- 5. 400 / 422: dead at once -----------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
async def test_client_error_is_dead_lettered_at_once_with_the_answer(
    status: int, project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    answer = '{"error": "amount must be a decimal string"}'
    recv = await receivers(always(Answer(status, answer)))
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST)}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [dead] = await wait_actions(gk, "dead", 1)
    await quiet_for(0.3)  # longer than backoff_cap_s: no retry comes
    assert len(recv.hits) == 1
    assert dead["attempts"] == 1
    assert dead["last_error"] == f"HTTP {status}: {answer}"
    attempts = await gk.daemon.store.list_attempts(dead["action_id"])
    assert [(a.status_code, a.error) for a in attempts] == [(status, f"HTTP {status}: {answer}")]
    assert await actions(gk, "pending") == []
    assert await actions(gk, "delivered") == []


# -- 6. failing past max_attempts / max_age_s ------------------------------------------------


async def test_failing_past_max_attempts_is_dead_lettered_with_the_last_error(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(lambda _hit, n: Answer(503, f"maintenance, try {n}"))
    project = project_factory()
    deploy(project, {"bank": (recv.url, FAST | {"max_attempts": 4})}, {"T-1": [release("bank")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [dead] = await wait_actions(gk, "dead", 1)
    await quiet_for(0.3)
    assert dead["kind"] == "release"
    assert dead["attempts"] == 4
    assert dead["last_error"] == "HTTP 503: maintenance, try 4"
    assert dead["delivered_at"] is None
    assert [h.webhook_id for h in recv.hits] == [dead["action_id"]] * 4
    attempts = await gk.daemon.store.list_attempts(dead["action_id"])
    assert [a.status_code for a in attempts] == [503] * 4
    assert [a.error for a in attempts] == [f"HTTP 503: maintenance, try {n}" for n in range(1, 5)]
    assert await actions(gk, "pending") == []


async def test_failing_past_max_age_is_dead_lettered_with_attempts_left(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(always(Answer(500)))
    project = project_factory()
    policy = FAST | {"max_attempts": 1000, "max_age_s": 0.5}
    deploy(project, {"ci": (recv.url, policy)}, {"T-1": [pipeline("ci")]})
    gk = await start_daemon(project)
    await fire(gk, "T-1")

    [dead] = await wait_actions(gk, "dead", 1, timeout_s=3)
    assert 2 <= dead["attempts"] < 1000
    assert dead["last_error"].startswith("HTTP 500")
    assert len(recv.hits) == dead["attempts"]


# -- 7. one bad target does not delay another -----------------------------------------------


@pytest.mark.parametrize("fault", ["hang", "refuse"])
async def test_a_down_target_does_not_delay_a_healthy_one(
    fault: str, project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    if fault == "hang":
        bad = await receivers(always(Answer(200, delay_s=30)))  # hangs until released
        bad_policy = FAST | {"timeout_s": 20}
    else:
        bad = await receivers(port=free_port(), start=False)
        bad_policy = FAST | {"max_attempts": 1000}
    good = await receivers()
    project = project_factory()
    tasks_a = [f"T-{n}" for n in range(1, 6)]
    tasks_b = [f"T-{n}" for n in range(6, 11)]
    deploy(
        project,
        {"bad": (bad.url, bad_policy), "good": (good.url, FAST)},
        {t: [pipeline("bad")] for t in tasks_a} | {t: [release("good", "1.00")] for t in tasks_b},
    )
    gk = await start_daemon(project)
    await fire(gk, *tasks_a)  # the bad target's actions come first
    if fault == "hang":
        await eventually(lambda: len(bad.hits) == 5, "5 hanging requests", 5)

    started = now()
    await fire(gk, *tasks_b)
    await wait_actions(gk, "delivered", 5, timeout_s=10, target="good")
    elapsed = now() - started
    # waiting for the bad target would take its timeout (20 s) or its retries
    assert elapsed < 5.0, f"the healthy target waited {elapsed:.2f} s"
    assert len(good.hits) == 5
    assert [a for a in await actions(gk, "delivered") if a["target"] == "bad"] == []

    if fault == "hang":  # the hung requests are answered at last: delivered, not lost
        assert all(h.answered_at is None for h in bad.hits)
        bad.release_hangs()
        await wait_actions(gk, "delivered", 5, timeout_s=5, target="bad")


async def test_many_hanging_actions_do_not_starve_another_target(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    bad = await receivers(always(Answer(200, delay_s=30)))
    good = await receivers()
    project = project_factory()
    deploy(
        project,
        {"bad": (bad.url, FAST | {"timeout_s": 20}), "good": (good.url, FAST)},
        {"T-1": [pipeline("bad")] * 32, "T-2": [release("good", "1.00")]},
    )
    gk = await start_daemon(project)
    await fire(gk, "T-1")
    # the bad target holds as many requests as it is allowed to (at most 8 at once)
    hanging = min(32, MAX_DELIVERIES_PER_TARGET)
    await eventually(lambda: len(bad.hits) == hanging, f"{hanging} hanging requests", 5)

    started = now()
    await fire(gk, "T-2")
    waited: float | None = None
    with contextlib.suppress(AssertionError):
        await wait_actions(gk, "delivered", 1, timeout_s=10, target="good")
        waited = now() - started
    bad.release_hangs()
    await wait_actions(gk, "delivered", 33, timeout_s=10)
    assert waited is not None, "the healthy target got nothing within 10 s"
    # waiting for a slot of the bad target would take its timeout (20 s)
    assert waited < 5.0, f"the healthy target waited {waited:.2f} s"


async def test_dispatcher_does_not_spin_while_a_request_hangs(
    project_factory: Callable[..., Project], receivers: Any, start_daemon: Any
) -> None:
    recv = await receivers(always(Answer(200, delay_s=30)))
    project = project_factory()
    deploy(project, {"ci": (recv.url, FAST | {"timeout_s": 5})}, {"T-1": [pipeline("ci")]})
    gk = await start_daemon(project)
    store = gk.daemon.store
    calls = 0
    real_due_actions = store.due_actions

    async def counting_due_actions(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real_due_actions(*args, **kwargs)

    store.due_actions = counting_due_actions
    await fire(gk, "T-1")
    await eventually(lambda: len(recv.hits) == 1, "the hanging request", 5)
    calls = 0
    await asyncio.sleep(1.0)
    spins = calls
    recv.release_hangs()
    await wait_actions(gk, "delivered", 1)
    assert spins <= 10, f"{spins} outbox queries in 1 s while one request hung"
