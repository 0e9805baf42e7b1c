"""Several daemons serving one PostgreSQL database, all deciding: any daemon takes facts,
approvals and admin acts, and each decision is made on the latest committed state (the
state version every deciding write checks; a daemon behind catches up and plans again). A
``fire: once`` rule fed through two daemons fires once, a count sees the facts posted to
the other, a deadline fires once with two deadline loops, an escrow's limit holds under
releases decided by two daemons at once, an ``Idempotency-Key`` posted to both applies
once, and after a ``kill -9`` of one daemon the other goes on serving, with no
acknowledged fact lost, no once-rule fired twice, no release sent under two ids.

Real daemons (in this process, and one ``gatekeeper serve`` subprocess) on ephemeral ports,
a real PostgreSQL (``tests/pg.py``) and a real receiver."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

import gatekeeper

from .conftest import DESIGN_RULE, ENV, Project, Receiver, Running, config_text, fact
from .test_auth import call, tokens_yaml
from .test_daemon import APPROVED, QA_PASSED, settle
from .test_daemon_postgresql import on_postgres
from .test_metrics import scrape, value

COUNT_RULE = """\
id: tower-a/three-done
project: tower-a
when: count(t for t in task if t.data.status == "done") >= 3
fire: once
actions:
  - notify: {target: finance-chat, message: "three tasks done (${rule_id})"}
"""

HOLD_RULE = """\
id: tower-a/hold-release
project: tower-a
when: milestone.hold.status == "approved" and minutes_since(milestone.hold.approved_at) >= 1
fire: once
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "1000.00",
              currency: USD, payee: acme-architects}
"""

DEPLOY_EACH = """\
id: tower-a/deploy
project: tower-a
when: task.deploy.status == "completed"
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: docs}}
"""


def _release_rule(n: int, amount: str) -> str:
    return f"""\
id: tower-a/pay-{n}
project: tower-a
when: invoice.i{n}.status == "due"
fire: once
actions:
  - release: {{target: escrow-bank, escrow: tower-a-escrow, amount: "{amount}",
              currency: USD, payee: supplier-{n}}}
"""


GATE_RULE = """\
id: tower-a/gate
project: tower-a
when: milestone.gate.status == "ready"
approvals: {required: 1, from: [alice]}
fire: once
actions:
  - notify: {target: finance-chat, message: "gate open (${rule_id})"}
"""


def deployment(
    root: Path, receiver_url: str, database: str, rules: dict[str, str], **extra: Any
) -> Project:
    """A deployment folder of its own (config, rules) on the shared ``database``, checking
    the active ruleset every 60 s (both folders hold the same rules: one version)."""
    project = Project(root)
    project.rules_dir.mkdir(parents=True)
    project.config_path.write_text(config_text(receiver_url, ruleset_check_s=60, **extra))
    for name, text in rules.items():
        project.write_rule(name, text)
    return on_postgres(project, database)


async def two_daemons(
    tmp_path: Path,
    receiver: Receiver,
    start_daemon: Any,
    database: str,
    rules: dict[str, str],
    *,
    tick_s: float = 0.2,
    **extra: Any,
) -> tuple[Running, Running]:
    a = deployment(tmp_path / "a", receiver.url, database, rules, **extra)
    b = deployment(tmp_path / "b", receiver.url, database, rules, **extra)
    gk_a = await start_daemon(a, tick_s=tick_s)
    gk_b = await start_daemon(b, tick_s=tick_s)
    assert gk_a.daemon.dispatcher.daemon_id != gk_b.daemon.dispatcher.daemon_id
    return gk_a, gk_b


def fired(database: str, rule_id: str) -> list[tuple[str, str]]:
    """The firings of ``rule_id`` in the database: (outcome, firing id)."""
    with psycopg.connect(database) as db:
        return [
            (outcome, firing_id)
            for outcome, firing_id in db.execute(
                "SELECT outcome, firing_id FROM decisions WHERE rule_id = %s"
                " AND firing_id IS NOT NULL ORDER BY id",
                (rule_id,),
            )
        ]


def releases_by_id(receiver: Receiver) -> collections.Counter[str]:
    """The releases the bank got, by release id (the ``Idempotency-Key``)."""
    return collections.Counter(
        r.headers["Idempotency-Key"] for r in receiver.received if r.path == "/bank"
    )


async def test_facts_posted_to_either_daemon_are_decided_on_the_latest_state(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """The deadline loops look at the database only every 60 s here: what brings each
    daemon's memory up to date before it decides is its commit being refused as behind."""
    gk_a, gk_b = await two_daemons(
        tmp_path,
        receiver,
        start_daemon,
        postgres_url,
        {"design.yaml": DESIGN_RULE, "count.yaml": COUNT_RULE},
        tick_s=60,
    )
    # the once-rule's two facts come through different daemons: B decides on A's fact
    assert (await gk_a.post("/v1/facts", APPROVED))[0] == 200
    assert (await gk_b.post("/v1/facts", QA_PASSED))[0] == 200
    assert [o for o, _ in fired(postgres_url, "tower-a/design-release")] == ["fired"]
    # the condition going false and true again through both fires nothing more
    for gk in (gk_a, gk_b, gk_a, gk_b):
        await gk.post("/v1/facts", fact("quality_gate", "qg1", passed=False))
        await gk.post("/v1/facts", QA_PASSED)
    assert len(fired(postgres_url, "tower-a/design-release")) == 1
    # a count over a kind sees the facts posted to the other daemon
    for n, gk in enumerate((gk_a, gk_b, gk_a)):
        status, body = await gk.post("/v1/facts", fact("task", f"t{n}", status="done"))
        assert status == 200, body
    assert [o for o, _ in fired(postgres_url, "tower-a/three-done")] == ["fired"]
    _, rule = await gk_a.get("/v1/rules/tower-a/three-done")  # A decided it: 3 seen
    assert rule["fired_count"] == 1
    for gk in (gk_a, gk_b):
        _, samples = await scrape(gk.daemon)
        assert value(samples, "gatekeeper_commits_behind_total") >= 1
        assert value(samples, "gatekeeper_catch_ups_total", how="incremental") >= 1
    await receiver.wait_for(3)  # the release, its notice, the count's notice
    await settle()
    assert list(releases_by_id(receiver).values()) == [1]
    assert len([r for r in receiver.received if r.path == "/chat"]) == 2


async def test_a_deadline_fires_once_with_two_daemons_ticking(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    gk_a, gk_b = await two_daemons(
        tmp_path, receiver, start_daemon, postgres_url, {"hold.yaml": HOLD_RULE}
    )
    approved_at = datetime.now(UTC) - timedelta(seconds=56)  # due in 4 s
    milestone = fact("milestone", "hold", status="approved", approved_at=approved_at.isoformat())
    assert (await gk_a.post("/v1/facts", milestone))[0] == 200
    key = ("tower-a/hold-release", "")
    deadline = time.monotonic() + 3  # B's deadline loop catches up on A's decision
    while gk_b.daemon.ticker.deadlines.due_at(key) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert gk_b.daemon.ticker.deadlines.due_at(key) is not None  # both loops wait for it
    assert gk_a.daemon.ticker.deadlines.due_at(key) is not None
    await receiver.wait_for(1, timeout_s=10)
    await asyncio.sleep(1.0)  # both loops pass the deadline again
    assert [o for o, _ in fired(postgres_url, "tower-a/hold-release")] == ["fired"]
    assert list(releases_by_id(receiver).values()) == [1]


async def test_releases_on_one_escrow_decided_by_two_daemons_never_exceed_its_limit(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """Four releases of 7000.00 on an escrow of 20000.00, due at once through two daemons:
    two fit, two are blocked, whichever daemon decided them."""
    rules = {f"pay{n}.yaml": _release_rule(n, "7000.00") for n in range(4)}
    gk_a, gk_b = await two_daemons(tmp_path, receiver, start_daemon, postgres_url, rules)
    answers = await asyncio.gather(
        *(
            gk.post("/v1/facts", fact("invoice", f"i{n}", status="due"))
            for n, gk in enumerate((gk_a, gk_b, gk_a, gk_b))
        )
    )
    assert [status for status, _ in answers] == [200] * 4, answers
    outcomes = [o for n in range(4) for o, _ in fired(postgres_url, f"tower-a/pay-{n}")]
    assert sorted(outcomes) == ["blocked", "blocked", "fired", "fired"]
    await receiver.wait_for(2)
    await settle()
    assert sorted(releases_by_id(receiver).values()) == [1, 1]
    _, escrows = await gk_b.get("/v1/escrows")
    [account] = escrows["escrows"]
    assert account["released"] == "14000.00" and account["remaining"] == "6000.00", account


async def test_a_cancel_on_one_daemon_fires_the_release_another_daemon_blocked(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """A decides a release (the bank refuses it until it is dead) and blocks a second one
    that does not fit; an admin cancels the first on B, whose memory has seen neither (no
    deadline loop or follower pass meanwhile): the cancel's return is refused as behind, B
    catches up and plans it again, and the blocked release fires in the cancel's own
    write."""
    rules = {f"pay{n}.yaml": _release_rule(n, "15000.00") for n in range(2)}
    gk_a, gk_b = await two_daemons(tmp_path, receiver, start_daemon, postgres_url, rules, tick_s=60)
    receiver.path_responses["/bank"] = [503, 503, 503]  # max_attempts 3: a dead letter
    assert (await gk_a.post("/v1/facts", fact("invoice", "i0", status="due")))[0] == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, dead = await gk_a.get("/v1/actions?status=dead")
        if dead["actions"]:
            break
        await asyncio.sleep(0.05)
    [first] = [a["action_id"] for a in dead["actions"]]
    assert (await gk_a.post("/v1/facts", fact("invoice", "i1", status="due")))[0] == 200
    assert [o for o, _ in fired(postgres_url, "tower-a/pay-1")] == ["blocked"]
    status, body = await gk_b.post(f"/v1/actions/{first}/cancel", {"reason": "wrong payee"})
    assert status == 200, body
    assert [o for o, _ in fired(postgres_url, "tower-a/pay-1")] == ["blocked", "fired"]
    _, samples = await scrape(gk_b.daemon)
    assert value(samples, "gatekeeper_commits_behind_total") >= 1
    await receiver.wait_for(4)
    await settle()
    assert releases_by_id(receiver)[first] == 3 and len(releases_by_id(receiver)) == 2
    _, escrows = await gk_a.get("/v1/escrows")
    [account] = escrows["escrows"]
    assert (account["released"], account["remaining"]) == ("15000.00", "5000.00"), account


async def test_approvals_and_admin_acts_on_one_daemon_count_in_the_others_decisions(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    gk_a, gk_b = await two_daemons(
        tmp_path,
        receiver,
        start_daemon,
        postgres_url,
        {"gate.yaml": GATE_RULE, "deploy.yaml": DEPLOY_EACH},
        tokens=tokens_yaml(),
    )
    status, body = await call(
        gk_a, "POST", "/v1/approvals", "alice", {"rule": "tower-a/gate", "decision": "approve"}
    )
    assert status == 200, body
    gate = fact("milestone", "gate", status="ready")
    status, body = await call(gk_b, "POST", "/v1/facts", "ci", gate)
    assert status == 200, body  # B counts alice's approval, given to A
    assert [o for o, _ in fired(postgres_url, "tower-a/gate")] == ["fired"]

    status, body = await call(
        gk_a, "POST", "/v1/rules/tower-a/deploy/pause", "ops", {"reason": "freeze"}
    )
    assert status == 200, body
    completed = fact("task", "deploy", status="completed")
    status, body = await call(gk_b, "POST", "/v1/facts", "ci", completed)
    assert status == 200, body  # B sees the pause A recorded
    assert fired(postgres_url, "tower-a/deploy") == []
    status, body = await call(gk_b, "GET", "/v1/rules/tower-a/deploy", "ops")
    assert body["paused"] is True, body
    status, body = await call(
        gk_b, "POST", "/v1/rules/tower-a/deploy/resume", "ops", {"reason": "thaw"}
    )
    assert status == 200, body
    await call(gk_a, "POST", "/v1/facts", "ci", fact("task", "deploy", status="open"))
    await call(gk_a, "POST", "/v1/facts", "ci", completed)  # A sees the resume B recorded
    assert [o for o, _ in fired(postgres_url, "tower-a/deploy")] == ["fired"]


async def test_one_idempotency_key_posted_to_two_daemons_at_once_applies_once(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    gk_a, gk_b = await two_daemons(
        tmp_path, receiver, start_daemon, postgres_url, {"design.yaml": DESIGN_RULE}
    )
    body = {"facts": [APPROVED, QA_PASSED]}
    headers = {"Idempotency-Key": "order-17"}

    async def post(gk: Running) -> tuple[int, dict[str, Any], bool]:
        async with gk.session.post(gk.url + "/v1/facts", json=body, headers=headers) as r:
            return r.status, await r.json(), r.headers.get("Idempotent-Replayed") == "true"

    for _ in range(3):  # each round a new key: which daemon commits first varies
        answers = await asyncio.gather(post(gk_a), post(gk_b))
        assert [status for status, _, _ in answers] == [200, 200], answers
        assert answers[0][1]["seqs"] == answers[1][1]["seqs"], answers
        assert sorted(replayed for _, _, replayed in answers) == [False, True], answers
        headers["Idempotency-Key"] += "+"
    with psycopg.connect(postgres_url) as db:
        [(logged,)] = db.execute("SELECT COUNT(*) FROM fact_log").fetchall()
    assert logged == 6  # each key's two facts, once
    assert len(fired(postgres_url, "tower-a/design-release")) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve(project: Project, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``gatekeeper serve`` on ``project`` as a subprocess on a free port, once healthy."""
    port = _free_port()
    env = {**os.environ, **ENV}
    here = str(Path(gatekeeper.__file__).resolve().parents[1])  # this checkout's src/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)]
    command += ["--listen", f"127.0.0.1:{port}"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=project.root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return proc, url
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"gatekeeper serve did not answer within 30 s:\n{log.read_text()}")


async def test_after_kill_9_of_one_daemon_the_other_goes_on_serving(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """Facts stream alternately to a ``gatekeeper serve`` subprocess and an in-process
    daemon; the subprocess is killed with SIGKILL mid-stream. The survivor goes on
    serving: every fact either daemon acknowledged is in the fact log, the once-rule fired
    once, the deadline the dead daemon was told of fires at the survivor, each release
    reached the bank under one id, the escrow is within its limit."""
    rules = {"design.yaml": DESIGN_RULE, "hold.yaml": HOLD_RULE, "deploy.yaml": DEPLOY_EACH}
    # what the dead daemon claimed and did not send is the survivor's 8 s later
    a = deployment(tmp_path / "a", receiver.url, postgres_url, rules, delivery_lease_s=8)
    b = deployment(tmp_path / "b", receiver.url, postgres_url, rules, delivery_lease_s=8)
    proc, url_a = await _serve(a, tmp_path / "a.log")
    survivor = await start_daemon(b)
    acknowledged: list[tuple[list[int], dict[str, Any]]] = []
    try:
        async with aiohttp.ClientSession() as session:

            async def post(url: str, body: dict[str, Any]) -> None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(url + "/v1/facts", json=body) as response:
                        if response.status == 200:
                            acknowledged.append(((await response.json())["seqs"], body))

            approved_at = (datetime.now(UTC) - timedelta(seconds=57)).isoformat()
            await post(url_a, fact("milestone", "hold", status="approved", approved_at=approved_at))
            await post(url_a, APPROVED)
            killed = False
            for n in range(40):
                url = url_a if n % 2 == 0 else survivor.url
                if n == 20:
                    proc.send_signal(signal.SIGKILL)  # mid-stream, requests in flight
                    killed = True
                status = "completed" if n % 4 < 2 else "open"
                await post(url, {"facts": [fact("task", "deploy", status=status), QA_PASSED]})
            assert killed and proc.wait(10) == -signal.SIGKILL
            status, body = await survivor.post("/v1/facts", fact("task", "last", status="done"))
            assert status == 200, body  # the survivor goes on serving
        await receiver.wait_for(3, timeout_s=15)  # the hold's release after its minute too
        deadline = time.monotonic() + 10
        while len(fired(postgres_url, "tower-a/hold-release")) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acknowledged) >= 20
    with psycopg.connect(postgres_url) as db:
        logged = {seq: data for seq, data in db.execute("SELECT seq, data FROM fact_log")}
    for seqs, body in acknowledged:  # no acknowledged fact lost
        posted = body.get("facts", [body])
        for seq, one in zip(seqs, posted, strict=True):
            assert seq in logged and json.loads(logged[seq]) == one["data"], (seq, one)
    assert [o for o, _ in fired(postgres_url, "tower-a/design-release")] == ["fired"]
    assert [o for o, _ in fired(postgres_url, "tower-a/hold-release")] == ["fired"]
    await settle()
    by_id = releases_by_id(receiver)
    assert len(by_id) == 2, by_id  # each release under one id (retries repeat the id)
    _, escrows = await survivor.get("/v1/escrows")
    [account] = escrows["escrows"]
    assert account["released"] == "6000.00" and account["remaining"] == "14000.00", account
