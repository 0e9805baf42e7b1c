"""The ledger's invariants under random sequences of what can happen to releases, through a
real daemon (real SQLite file, real HTTP API) and a real local bank whose answers the test
scripts: releases decided (or blocked), attempts answered 2xx, 5xx, 4xx or timing out,
cancels, signed settlements (settled or failed) and changes of the escrow's limit.

After every step:

- each release's movements are exactly those its state allows (pending or dead: reserve;
  delivered: reserve, send, then settle or fail and return, or a dead letter the bank
  failed: reserve, fail, return; cancelled: reserve, cancel, return, then reclaim, send and
  settle when the bank settled it anyway), so the movements sum to the escrow's figures,
  and the API's figures and the running daemon's escrow book agree with them;
- replaying the movements in order, no reserve ever took the escrow past the limit in
  force when it was made, and a release is decided exactly when it fits;
- the bank never accepted (2xx) a cancelled release, nor received one after its cancel
  was answered; a cancel answered 409 changed nothing.

Hypothesis runs derandomized and bounded (a few seconds).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from gatekeeper.config import load_config
from gatekeeper.http.app import create_app
from gatekeeper.runtime.daemon import Daemon

from .conftest import ENV, SECRET

RULES = 8
AMOUNTS = ("40.00", "75.50", "120.00", "200.00")
LIMITS = ("200.00", "300.00", "450.00", "1000.00")
"""Never below the largest amount: ``check`` refuses a release that could never be sent."""
TIMEOUT_S = 0.2
MODES = ("ok", "5xx", "4xx", "timeout")

decide = st.tuples(st.just("decide"), st.integers(0, RULES - 1))
answer = st.tuples(st.just("answer"), st.sampled_from(MODES))
cancel = st.tuples(st.just("cancel"), st.integers(0, 20))
settle = st.tuples(st.just("settle"), st.integers(0, 20), st.sampled_from(["settled", "failed"]))
steps = st.one_of(  # repeated: drawn more often
    decide,
    decide,
    decide,
    answer,
    answer,
    cancel,
    cancel,
    settle,
    settle,
    st.tuples(st.just("limit"), st.sampled_from(LIMITS)),
    st.tuples(st.just("wait"), st.sampled_from([0.02, 0.15])),
)


@dataclass
class Bank:
    """The bank: answers ``/bank`` as ``mode`` says (ok: 200; 5xx: 503 with Retry-After 1;
    4xx: 422; timeout: holds the request past the dispatcher's timeout, then 503) and
    records each release it got, when, and what it answered; ``/chat`` answers 200."""

    mode: str = "ok"
    got: list[tuple[str, float, int]] = field(default_factory=list)
    """(release id, monotonic arrival time, status answered)"""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        if request.path != "/bank":
            return web.json_response({})
        body = Webhook(SECRET).verify(raw, dict(request.headers))
        arrived = time.monotonic()
        mode = self.mode
        if mode == "timeout":
            await asyncio.sleep(TIMEOUT_S + 0.1)
        status = {"ok": 200, "5xx": 503, "4xx": 422, "timeout": 503}[mode]
        self.got.append((body["release_id"], arrived, status))
        headers = {"Retry-After": "1"} if mode == "5xx" else None
        return web.json_response({}, status=status, headers=headers)


def _config(bank_url: str, limit: str) -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        database: state/gatekeeper.db
        rules_dir: rules
        alert_target: chat
        targets:
          escrow-bank:
            url: {bank_url}/bank
            secret_env: BANK_SECRET
            delivery: {{max_attempts: 4, max_age_s: 60, backoff_base_s: 0.05,
                        backoff_cap_s: 1, timeout_s: {TIMEOUT_S}}}
          chat: {{url: "{bank_url}/chat", secret_env: CHAT_SECRET}}
        escrows:
          esc: {{currency: USD, limit: "{limit}"}}
        """
    )


def _rule(n: int, amount: str) -> str:
    return textwrap.dedent(
        f"""\
        id: p/r{n}
        project: p
        when: milestone["m{n}"].status == "approved"
        actions:
          - release: {{target: escrow-bank, escrow: esc, amount: "{amount}", currency: USD,
                      payee: payee-{n}}}
        """
    )


ALLOWED = {
    "pending": [("reserve",)],
    "dead": [("reserve",)],
    "cancelled": [
        ("reserve", "cancel", "return"),
        ("reserve", "cancel", "return", "reclaim", "send", "settle"),
    ],
    "delivered": [
        ("reserve", "send"),
        ("reserve", "send", "settle"),
        ("reserve", "send", "fail", "return"),
        ("reserve", "fail", "return"),  # a dead letter the bank failed
    ],
}


@dataclass
class World:
    root: Path
    daemon: Daemon
    url: str
    session: aiohttp.ClientSession
    bank: Bank
    amounts: list[str]
    limit: Decimal
    limits: list[tuple[int, Decimal]] = field(default_factory=list)
    """(the first movement id a limit applies to, the limit)"""
    releases: dict[int, str] = field(default_factory=dict)
    """rule number -> the release its firing queued"""
    blocked: set[int] = field(default_factory=set)
    """rules whose firing was blocked (over the limit) and has not fired since"""
    cancelled: dict[str, tuple[float, int]] = field(default_factory=dict)
    """release id -> (monotonic time its cancel was answered, its attempts then)"""
    failed_after_cancel: set[str] = field(default_factory=set)
    """cancelled releases the bank said failed (recorded, no movement)"""

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.root / "state" / "gatekeeper.db", isolation_level=None)

    def snapshot(self) -> tuple[list[tuple[Any, ...]], dict[str, tuple[str, int]]]:
        """The movements and each release's (status, attempts), read in one transaction."""
        db = self.db()
        try:
            db.execute("BEGIN")
            movements = db.execute(
                "SELECT id, release_id, movement, amount FROM ledger_entries ORDER BY id"
            ).fetchall()
            outbox = {
                r[0]: (r[1], r[2])
                for r in db.execute(
                    "SELECT action_id, status, attempts FROM outbox WHERE kind = 'release'"
                )
            }
            db.execute("COMMIT")
            return movements, outbox
        finally:
            db.close()

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=body) as response:
            return response.status, await response.json()

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as response:
            assert response.status == 200
            return await response.json()


def _committed(movements: list[tuple[Any, ...]]) -> Decimal:
    total = Decimal(0)
    for _, _, movement, amount in movements:
        if movement in ("reserve", "reclaim"):
            total += Decimal(amount)
        elif movement in ("cancel", "fail"):
            total -= Decimal(amount)
    return total


async def _check(world: World) -> None:
    movements, outbox = world.snapshot()
    by_release: dict[str, list[str]] = {}
    for _, release_id, movement, _ in movements:
        by_release.setdefault(release_id, []).append(movement)
    assert set(by_release) == set(outbox)
    for release_id, (status, _) in outbox.items():
        assert tuple(by_release[release_id]) in ALLOWED[status], (release_id, status, by_release)
    sums: dict[str, Decimal] = {}
    for _, _, movement, amount in movements:
        sums[movement] = sums.get(movement, Decimal(0)) + Decimal(amount)

    def s(name: str) -> Decimal:
        return sums.get(name, Decimal(0))

    committed = s("reserve") + s("reclaim") - s("cancel") - s("fail")
    # the API's figures (a send may land between the two reads: reserved + sent is stable)
    [account] = (await world.get("/v1/escrows"))["escrows"]
    assert Decimal(account["reserved"]) + Decimal(account["sent"]) == (
        s("reserve") + s("reclaim") - s("cancel") - s("settle") - s("fail")
    )
    assert Decimal(account["settled"]) == s("settle")
    assert Decimal(account["returned"]) == s("return") - s("reclaim")
    assert s("return") == s("cancel") + s("fail")
    assert Decimal(account["remaining"]) == world.limit - committed
    assert world.daemon.writer.book.committed.get("esc", Decimal(0)) == committed
    # no reserve ever went past the limit in force when it was made
    running = Decimal(0)
    for movement_id, _, movement, amount in movements:
        if movement == "reserve":
            running += Decimal(amount)
            limit = [lim for first, lim in world.limits if first <= movement_id][-1]
            assert running <= limit, (movement_id, running, limit)
        elif movement == "reclaim":  # the bank paid a cancelled release: it may overdraw
            running += Decimal(amount)
        elif movement in ("cancel", "fail"):
            running -= Decimal(amount)
    # the bank never accepted a cancelled release, nor got one after its cancel
    for release_id, arrived, answered in world.bank.got:
        if release_id in world.cancelled:
            cancelled_at, _ = world.cancelled[release_id]
            assert answered >= 300, release_id
            assert arrived < cancelled_at, release_id
    for release_id, (_, attempts) in world.cancelled.items():
        assert outbox[release_id] == ("cancelled", attempts)


def _next_id(world: World) -> int:
    movements, _ = world.snapshot()
    return (movements[-1][0] + 1) if movements else 1


async def _decide(world: World, n: int) -> None:
    movements, _ = world.snapshot()
    fits = _committed(movements) + Decimal(world.amounts[n]) <= world.limit
    fired_before = n in world.blocked or n in world.releases
    status, _ = await world.post(
        "/v1/facts",
        {"project": "p", "kind": "milestone", "id": f"m{n}", "data": {"status": "approved"}},
    )
    assert status == 200
    actions = (await world.get("/v1/actions?limit=1000"))["actions"]
    mine = [a for a in actions if a["rule_id"] == f"p/r{n}" and a["kind"] == "release"]
    if fired_before:  # once: one firing, ever; a blocked one is not tried by a fact again
        assert len(mine) == (1 if n in world.releases else 0)
        return
    if fits:
        [release] = mine
        world.releases[n] = release["action_id"]
    else:
        assert mine == []  # blocked: no release (its alert goes to chat)
        world.blocked.add(n)


def _pick(world: World, k: int) -> str | None:
    """The ``k``-th release decided so far (round the list), or None before any."""
    decided = list(world.releases.values())
    return decided[k % len(decided)] if decided else None


async def _cancel(world: World, k: int) -> None:
    release_id = _pick(world, k)
    if release_id is None:
        return
    _, before = world.snapshot()
    status, body = await world.post(f"/v1/actions/{release_id}/cancel", {"reason": "stop it"})
    answered = time.monotonic()
    _, after = world.snapshot()
    if status == 200:
        assert before[release_id][0] in ("pending", "dead")
        assert after[release_id][0] == "cancelled"
        world.cancelled[release_id] = (answered, after[release_id][1])
        return
    assert status == 409, body
    message = body["error"]["message"]
    was, now = before[release_id][0], after[release_id][0]
    if "in flight" in message:  # an attempt's outcome decides (it may be recorded since)
        assert was == "pending" and now in ("pending", "delivered", "dead"), (message, now)
    elif "is delivered" in message:  # perhaps since the snapshot
        assert was in ("pending", "delivered") and now == "delivered", (message, was)
    else:
        assert "is cancelled" in message and was == now == "cancelled", (message, was)
    assert now != "cancelled" or release_id in world.cancelled


async def _settle(world: World, k: int, outcome: str, counter: list[int]) -> None:
    """Settle the ``k``-th release decided or, for an even ``k``, the ``k``-th one delivered
    (the bank settles what it got; other callbacks must be refused)."""
    release_id = _pick(world, k)
    if k % 2 == 0:
        _, outbox = world.snapshot()
        delivered = [r for r in world.releases.values() if outbox[r][0] == "delivered"]
        release_id = delivered[k % len(delivered)] if delivered else release_id
    if release_id is None:
        return
    counter[0] += 1
    msg_id = f"msg-{counter[0]}"
    body = json.dumps({"release_id": release_id, "status": outcome, "reference": msg_id})
    now = datetime.now(UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(msg_id, now, body),
    }
    movements, before = world.snapshot()
    moved = [m for _, r, m, _ in movements if r == release_id]
    recorded = "settled" if "settle" in moved else "failed" if "fail" in moved else None
    if release_id in world.failed_after_cancel:
        recorded = "failed"
    async with world.session.post(
        f"{world.url}/v1/settlements/escrow-bank", data=body, headers=headers
    ) as response:
        status, answer = response.status, await response.json()
    state = before[release_id][0]
    if state in ("delivered", "dead", "cancelled"):  # the bank got it, or may have
        if recorded is None or recorded == outcome:
            assert status == 200, answer
            moves = recorded is None and (state != "cancelled" or outcome == "settled")
            assert answer["applied"] == moves
            if state == "cancelled" and outcome == "failed":
                world.failed_after_cancel.add(release_id)
        else:
            assert status == 409, answer
    else:  # pending: it may be delivered or dead meanwhile, or an attempt in flight
        assert state == "pending" and status in (200, 409), answer


async def _limit(world: World, limit: str) -> None:
    first = _next_id(world)
    text = (world.root / "gatekeeper.yaml").read_text()
    old = f'limit: "{world.limit:.2f}"'
    assert old in text
    (world.root / "gatekeeper.yaml").write_text(text.replace(old, f'limit: "{limit}"'))
    assert await world.daemon.reload()
    world.limit = Decimal(limit)
    world.limits.append((first, world.limit))
    assert world.daemon.writer.book.escrows["esc"].limit == world.limit
    # a new limit tries the blocked releases again: those that fit now fired
    actions = (await world.get("/v1/actions?limit=1000"))["actions"]
    for n in sorted(world.blocked):
        fired = [a for a in actions if a["rule_id"] == f"p/r{n}" and a["kind"] == "release"]
        if fired:
            world.releases[n] = fired[0]["action_id"]
            world.blocked.discard(n)


async def run_example(
    actions: list[tuple[Any, ...]], amounts: list[str], limit: str, mode: str = "ok"
) -> None:
    bank = Bank(mode)
    bank_app = web.Application()
    bank_app.router.add_route("POST", "/{tail:.*}", bank.handle)
    bank_runner = web.AppRunner(bank_app)
    await bank_runner.setup()
    try:
        bank_site = web.TCPSite(bank_runner, "127.0.0.1", 0)
        await bank_site.start()
        port = bank_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            (root / "rules").mkdir()
            for n, amount in enumerate(amounts):
                (root / "rules" / f"r{n}.yaml").write_text(_rule(n, amount))
            (root / "gatekeeper.yaml").write_text(_config(f"http://127.0.0.1:{port}", limit))
            daemon = Daemon(load_config(root / "gatekeeper.yaml"), ENV, watch=False, tick_s=0.5)
            await daemon.start()
            try:
                await _serve(root, daemon, bank, actions, amounts, limit)
            finally:
                await daemon.stop(grace_s=1)
    finally:
        await bank_runner.cleanup()


async def _serve(
    root: Path,
    daemon: Daemon,
    bank: Bank,
    actions: list[tuple[Any, ...]],
    amounts: list[str],
    limit: str,
) -> None:
    runner = web.AppRunner(create_app(daemon))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            world = World(root, daemon, url, session, bank, amounts, Decimal(limit))
            world.limits.append((1, world.limit))
            await _run(world, actions)
    finally:
        await runner.cleanup()


async def _run(world: World, actions: list[tuple[Any, ...]]) -> None:
    counter = [0]
    for action in actions:
        kind = action[0]
        if kind == "decide":
            await _decide(world, action[1])
        elif kind == "answer":
            world.bank.mode = action[1]
        elif kind == "cancel":
            await _cancel(world, action[1])
        elif kind == "settle":
            await _settle(world, action[1], action[2], counter)
        elif kind == "limit":
            await _limit(world, action[1])
        else:
            await asyncio.sleep(action[1])
        await _check(world)
    world.bank.mode = "ok"
    await asyncio.sleep(TIMEOUT_S + 0.12)  # attempts in flight end
    await _check(world)


EVERY_KIND = [
    ("decide", 0),  # 120.00 of 300.00, delivered
    ("decide", 1),  # 75.50, delivered
    ("wait", 0.15),
    ("settle", 0, "settled"),
    ("settle", 1, "failed"),  # returned: 75.50 free again
    ("settle", 1, "settled"),  # refused: failed already
    ("answer", "5xx"),
    ("decide", 2),  # 75.50, waits for its retry
    ("cancel", 2),  # cancelled: 75.50 back
    ("answer", "timeout"),
    ("decide", 3),  # 40.00: its attempt hangs
    ("cancel", 3),  # in flight: refused
    ("answer", "4xx"),
    ("wait", 0.15),
    ("decide", 4),  # 40.00, refused by the bank: dead
    ("wait", 0.02),
    ("cancel", 4),
    ("limit", "200.00"),
    ("decide", 5),  # 200.00 does not fit: blocked
    ("answer", "ok"),
    ("limit", "450.00"),
    ("decide", 6),  # fits now
    ("wait", 0.15),
    ("settle", 6, "settled"),
    ("answer", "4xx"),
    ("decide", 7),  # 40.00, refused by the bank: dead (7 releases decided: r0-r5, r7)
    ("wait", 0.15),
    ("settle", 9, "settled"),  # r2, cancelled: the bank paid it anyway (reclaim)
    ("settle", 11, "failed"),  # r4, dead then cancelled: recorded, nothing moves
    ("settle", 13, "settled"),  # r7, dead: the bank paid it (send, settle)
    ("settle", 3, "failed"),  # r3, dead: the bank failed it (fail, return; never sent)
]
"""One sequence that meets every kind of step and outcome (run first, then the random
ones)."""


@example(
    actions=EVERY_KIND,
    amounts=["120.00", "75.50", "75.50", "40.00", "40.00", "200.00", "200.00", "40.00"],
    limit="300.00",
    mode="ok",
)
@settings(
    max_examples=6,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example runs a daemon
)
@given(
    actions=st.lists(steps, min_size=8, max_size=24),
    amounts=st.lists(st.sampled_from(AMOUNTS), min_size=RULES, max_size=RULES),
    limit=st.sampled_from(LIMITS),
    mode=st.sampled_from(MODES),
)
def test_the_ledger_reconciles_whatever_happens(
    actions: list[tuple[Any, ...]], amounts: list[str], limit: str, mode: str
) -> None:
    asyncio.run(run_example(actions, amounts, limit, mode))
