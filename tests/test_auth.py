"""Authentication and authorization over HTTP with real tokens: 401 without or with a wrong
token on every route but /healthz, 403 outside a token's scopes or projects."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from gatekeeper.config import Token
from gatekeeper.http.app import create_app
from gatekeeper.http.auth import authenticate, bearer_token, hash_token

from .conftest import DEPLOY_RULE, DESIGN_RULE, ENV, Project, Receiver, Running, fact

TOKENS = {
    "alice": "gk_alice-token-for-tests-0000000000000000000",
    "bob": "gk_bob-token-for-tests-00000000000000000000000",
    "carol": "gk_carol-token-for-tests-000000000000000000000",
    "mallory": "gk_mallory-token-for-tests-0000000000000000000",
    "ci": "gk_ci-token-for-tests-000000000000000000000000",
    "ops": "gk_ops-token-for-tests-00000000000000000000000",
    "reader-b": "gk_reader-b-token-for-tests-00000000000000000",
    "historian": "gk_historian-token-for-tests-000000000000000",
    "historian-b": "gk_historian-b-token-for-tests-0000000000000",
    "backtester": "gk_backtester-token-for-tests-00000000000000",
}
SCOPES = {
    "alice": (["approve", "read"], ["tower-a"]),
    "bob": (["approve", "read"], ["tower-a"]),
    "carol": (["approve"], ["*"]),
    "mallory": (["approve", "read"], ["tower-a"]),
    "ci": (["facts:write"], ["tower-a"]),
    "ops": (["admin", "read"], ["*"]),
    "reader-b": (["read", "facts:write"], ["tower-b"]),
    "historian": (["history"], ["*"]),
    "historian-b": (["history"], ["tower-b"]),
    "backtester": (["history", "read"], ["*"]),
}

APPROVED_RULE = """\
id: tower-a/structure-release
project: tower-a
when: milestone.structure.status == "approved"
approvals: {required: 2, from: [alice, bob, carol]}
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "2500.00",
              currency: USD, payee: northside-builders}
"""


def tokens_yaml() -> list[dict[str, Any]]:
    return [
        {"subject": s, "sha256": hash_token(TOKENS[s]), "scopes": sc, "projects": pr}
        for s, (sc, pr) in SCOPES.items()
    ]


@pytest.fixture
async def gk(project_factory: Callable[..., Project], start_daemon: Any, receiver: Any) -> Running:
    # a hook source named "x", so the route walk below reaches its signature check
    hook = {
        "kind": "github",
        "secret_env": "X_HOOK_SECRET",
        "project": "tower-a",
        "facts": [{"event": "workflow_run", "kind": "ci_run", "id": "${workflow_run.name}"}],
    }
    project = project_factory(receiver.url, tokens=tokens_yaml(), hooks={"x": hook})
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    project.write_rule("structure.yaml", APPROVED_RULE)
    running: Running = await start_daemon(project, env={**ENV, "X_HOOK_SECRET": "s3cret"})
    running.receiver = receiver  # type: ignore[attr-defined]
    return running


async def call(
    gk: Running, method: str, path: str, who: str | None = None, body: Any = None, raw: str = ""
) -> tuple[int, Any]:
    headers = {}
    if who is not None:
        headers["Authorization"] = f"Bearer {TOKENS[who]}"
    if raw:
        headers["Authorization"] = raw
    async with gk.session.request(method, gk.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


def test_bearer_parsing_and_constant_time_lookup() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    token = Token("alice", hash_token("s3cret"), frozenset({"read"}))
    assert authenticate([token], "s3cret") is token
    assert authenticate([token], "s3cret ") is None
    assert authenticate([token], None) is None


PATH_VALUES = {"act": "pause", "target": "escrow-bank"}
"""Path parameters the route walk fills in ("x" otherwise): a settlement names a target that
exists, so the walk reaches its signature check."""


async def test_every_route_but_healthz_needs_a_token(gk: Running) -> None:
    app = create_app(gk.daemon)
    checked = 0
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: PATH_VALUES.get(m.group(1), "x"), path)
        for route in resource:
            if route.method == "HEAD":
                continue
            status, body = await call(gk, route.method, path, body={})
            expected = 200 if path == "/healthz" else 401
            assert status == expected, (route.method, path, body)
            if expected == 401:
                status, _ = await call(gk, route.method, path, raw="Bearer gk_wrong", body={})
                assert status == 401, (route.method, path)
            checked += 1
    assert checked >= 10


async def test_401_says_how_to_authenticate(gk: Running) -> None:
    async with gk.session.get(gk.url + "/v1/facts") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
    assert "Bearer" in body["error"]["message"]
    assert TOKENS["alice"] not in str(body)


async def test_scopes_and_projects(gk: Running) -> None:
    done = fact("task", "T-17", status="completed")
    assert (await call(gk, "POST", "/v1/facts", "ci", done))[0] == 200
    assert (await call(gk, "POST", "/v1/facts", "alice", done))[0] == 403  # no facts:write
    other = {**done, "project": "tower-b"}
    status, body = await call(gk, "POST", "/v1/facts", "ci", {"facts": [done, other]})
    assert status == 403 and "tower-b" in body["error"]["message"]  # nothing applied
    assert (await call(gk, "GET", "/v1/facts", "ci"))[0] == 403  # no read
    status, facts = await call(gk, "GET", "/v1/facts", "alice")
    assert status == 200 and len(facts["facts"]) == 1
    status, facts = await call(gk, "GET", "/v1/facts", "reader-b")
    assert status == 200 and facts["facts"] == []  # tower-a is not reader-b's
    status, _ = await call(gk, "GET", "/v1/rules/tower-a/deploy-docs", "reader-b")
    assert status == 403
    status, rules = await call(gk, "GET", "/v1/rules", "reader-b")
    assert rules["rules"] == []
    assert (await call(gk, "POST", "/v1/actions/x/retry", "alice", {}))[0] == 403  # not admin
    status, _ = await call(gk, "POST", "/v1/actions/act_none/retry", "ops", {})
    assert status == 404


async def test_a_history_token_reads_the_history_of_its_projects_and_nothing_else(
    gk: Running,
) -> None:
    done = fact("task", "T-17", status="done")
    assert (await call(gk, "POST", "/v1/facts", "ci", done))[0] == 200
    other = {**fact("task", "B-1", status="done"), "project": "tower-b"}
    assert (await call(gk, "POST", "/v1/facts", "reader-b", other))[0] == 200
    status, page = await call(gk, "GET", "/v1/history/facts", "historian")
    assert status == 200, page
    assert [(f["project"], f["id"]) for f in page["facts"]] == [
        ("tower-a", "T-17"),
        ("tower-b", "B-1"),
    ]
    status, decisions = await call(gk, "GET", "/v1/history/decisions?every=true", "historian")
    assert status == 200 and decisions["decisions"], decisions
    assert (await call(gk, "GET", "/v1/history/decisions", "ops"))[0] == 200  # admin too
    # a token of tower-b sees tower-b's history only
    status, page = await call(gk, "GET", "/v1/history/facts", "historian-b")
    assert status == 200 and [f["id"] for f in page["facts"]] == ["B-1"]
    status, mine = await call(gk, "GET", "/v1/history/decisions?every=true", "historian-b")
    assert status == 200 and (mine["decisions"], mine["actions"]) == ([], [])
    # nothing else: no other read, no write
    for method, path in (
        ("GET", "/v1/facts"),
        ("GET", "/v1/actions"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/rules"),
        ("GET", "/v1/export"),
    ):
        status, body = await call(gk, method, path, "historian")
        assert status == 403 and "lacks the 'read' scope" in body["error"]["message"], path
    status, _ = await call(gk, "POST", "/v1/facts", "historian", fact("task", "T-18"))
    assert status == 403
    status, body = await call(gk, "GET", "/v1/history/facts", "alice")  # read is not history
    assert status == 403 and "'history'" in body["error"]["message"]


async def test_two_of_three_approvals_reject_blocks_withdraw_unblocks(gk: Running) -> None:
    rule = "tower-a/structure-release"
    assert (
        await call(gk, "POST", "/v1/facts", "ci", fact("milestone", "structure", status="approved"))
    )[0] == 200
    status, answer = await call(
        gk,
        "POST",
        "/v1/approvals",
        "alice",
        {"rule": rule, "decision": "approve", "comment": "looks right"},
    )
    assert status == 200, answer
    assert answer["approver"] == "alice"
    assert answer["approvals"]["approved_by"] == ["alice"]
    assert answer["approvals"]["satisfied"] is False

    # carol rejects: bob's approval does not open the gate while her reject stands
    assert (await call(gk, "POST", "/v1/approvals", "carol", {"rule": rule, "decision": "reject"}))[
        0
    ] == 200
    status, answer = await call(
        gk, "POST", "/v1/approvals", "bob", {"rule": rule, "decision": "approve"}
    )
    assert answer["approvals"]["approved_by"] == ["alice", "bob"]
    assert answer["approvals"]["rejected_by"] == ["carol"]
    assert answer["approvals"]["satisfied"] is False
    _, view = await call(gk, "GET", f"/v1/rules/{rule}", "alice")
    assert view["fired_count"] == 0
    assert view["recent_decisions"][0]["outcome"] == "awaiting_approvals"

    # an approver outside `from` is refused, and the body cannot name the approver
    status, body = await call(
        gk, "POST", "/v1/approvals", "mallory", {"rule": rule, "decision": "approve"}
    )
    assert status == 403 and "mallory" in body["error"]["message"]
    status, _ = await call(
        gk,
        "POST",
        "/v1/approvals",
        "mallory",
        {"rule": rule, "decision": "approve", "approver": "alice"},
    )
    assert status == 400

    # carol withdraws her reject: two approvals stand, the release fires
    status, answer = await call(
        gk, "POST", "/v1/approvals", "carol", {"rule": rule, "decision": "withdraw"}
    )
    assert answer["approvals"]["satisfied"] is True
    received = await gk.receiver.wait_for(1)  # type: ignore[attr-defined]
    assert received[0].path == "/bank"
    _, view = await call(gk, "GET", f"/v1/rules/{rule}", "alice")
    assert view["fired_count"] == 1
    assert view["recent_decisions"][0]["trigger"] == "approval"
    log = await gk.daemon.store.fact_log()
    approvals = [(r.id, r.data["decision"]) for r in log if r.kind == "approval"]
    assert approvals == [
        ("alice", "approve"),
        ("carol", "reject"),
        ("bob", "approve"),
        ("carol", "withdraw"),
    ]


async def test_approvals_survive_restart(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Any
) -> None:
    project = project_factory(receiver.url, tokens=tokens_yaml())
    project.write_rule("structure.yaml", APPROVED_RULE)
    gk = await start_daemon(project)
    rule = "tower-a/structure-release"
    await call(gk, "POST", "/v1/approvals", "alice", {"rule": rule, "decision": "approve"})
    await gk.stop()
    gk2 = await start_daemon(project)
    await call(gk2, "POST", "/v1/approvals", "bob", {"rule": rule, "decision": "approve"})
    status, _ = await call(
        gk2, "POST", "/v1/facts", "ci", fact("milestone", "structure", status="approved")
    )
    assert status == 200
    await receiver.wait_for(1)


async def test_approval_errors(gk: Running) -> None:
    status, _ = await call(
        gk, "POST", "/v1/approvals", "alice", {"rule": "nope", "decision": "approve"}
    )
    assert status == 404
    status, body = await call(
        gk, "POST", "/v1/approvals", "alice", {"rule": "tower-a/deploy-docs", "decision": "approve"}
    )
    assert status == 403 and "takes no approvals" in body["error"]["message"]
    status, body = await call(
        gk, "POST", "/v1/approvals", "alice", {"rule": "x", "decision": "maybe"}
    )
    assert status == 400 and body["error"]["problems"][0]["path"] == "$.decision"
    assert (await call(gk, "POST", "/v1/approvals", "ci", {"rule": "x", "decision": "approve"}))[
        0
    ] == 403
    status, _ = await call(gk, "POST", "/v1/facts", "ci", fact("approval", "alice", rule="x"))
    assert status == 400


async def test_pause_resume_rearm_are_audited_admin_acts(gk: Running) -> None:
    rule = "tower-a/deploy-docs"
    reason = {"reason": "CI maintenance window"}
    assert (await call(gk, "POST", f"/v1/rules/{rule}/pause", "alice", reason))[0] == 403
    assert (await call(gk, "POST", f"/v1/rules/{rule}/pause", "ops", {}))[0] == 400
    status, view = await call(gk, "POST", f"/v1/rules/{rule}/pause", "ops", reason)
    assert status == 200 and view["explanation"]["paused"] is True
    assert (await call(gk, "POST", f"/v1/rules/{rule}/pause", "ops", reason))[0] == 409
    await call(gk, "POST", "/v1/facts", "ci", fact("task", "T-17", status="completed"))
    _, view = await call(gk, "GET", f"/v1/rules/{rule}", "ops")
    assert view["recent_decisions"][0]["outcome"] == "paused"
    assert view["explanation"]["gate_open"] is True  # evaluated and explained, not fired
    assert (await call(gk, "POST", f"/v1/rules/{rule}/resume", "ops", {"reason": "done"}))[0] == 200
    assert (await call(gk, "POST", f"/v1/rules/{rule}/rearm", "ops", reason))[0] == 409  # each_time

    once = "tower-a/design-release"
    batch = {
        "facts": [
            fact("milestone", "design", status="approved"),
            fact("quality_gate", "qg1", passed=True),
        ]
    }
    await call(gk, "POST", "/v1/facts", "ci", batch)
    await gk.receiver.wait_for(2)  # type: ignore[attr-defined]
    status, view = await call(
        gk, "POST", f"/v1/rules/{once}/rearm", "ops", {"reason": "second tranche agreed"}
    )
    assert status == 200
    # the gate is open: fires again
    await gk.receiver.wait_for(4)  # type: ignore[attr-defined]
    _, view = await call(gk, "GET", f"/v1/rules/{once}", "ops")
    assert view["fired_count"] == 2
    # with the gate closed, re-arming arms the rule without firing; arming twice is refused
    await call(gk, "POST", "/v1/facts", "ci", fact("quality_gate", "qg1", passed=False))
    assert (await call(gk, "POST", f"/v1/rules/{once}/rearm", "ops", reason))[0] == 200
    assert (await call(gk, "POST", f"/v1/rules/{once}/rearm", "ops", reason))[0] == 409

    import sqlite3

    db = sqlite3.connect(gk.daemon.config.database)
    acts = db.execute("SELECT actor, act, subject, reason FROM admin_acts ORDER BY id").fetchall()
    assert acts[:2] == [
        ("ops", "pause", rule, "CI maintenance window"),
        ("ops", "resume", rule, "done"),
    ]
    assert acts[2] == ("ops", "rearm", once, "second tranche agreed")


def test_token_new_prints_a_token_once_and_its_hash() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gatekeeper",
            "token",
            "new",
            "--subject",
            "alice",
            "--scope",
            "approve",
            "--scope",
            "read",
            "--project",
            "tower-a",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    token = re.search(r"gk_[A-Za-z0-9_-]{43}", result.stdout)
    assert token is not None
    entry = result.stdout.split("gatekeeper.yaml entry (under tokens:):\n")[1]
    assert hash_token(token.group(0)) in entry
    assert result.stdout.count(token.group(0)) == 1
    assert 'projects: ["tower-a"]' in entry


async def test_rules_cli_pauses_with_the_token_from_the_environment(gk: Running) -> None:
    import asyncio
    import os

    command = [
        sys.executable, "-m", "gatekeeper", "rules", "pause", "tower-a/deploy-docs",
        "--reason", "freeze before handover", "--url", gk.url,
    ]  # fmt: skip
    env = {**os.environ, "GATEKEEPER_TOKEN": TOKENS["ops"]}
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "tower-a/deploy-docs: pause done; paused" in result.stdout
    env["GATEKEEPER_TOKEN"] = TOKENS["alice"]  # no admin scope
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env
    )
    assert result.returncode == 1
    assert "HTTP 403" in result.stderr
    assert TOKENS["alice"] not in result.stderr


async def test_approval_with_idempotency_key_applies_once(gk: Running) -> None:
    rule = "tower-a/structure-release"
    body = {"rule": rule, "decision": "approve", "comment": "ok"}
    headers = {"Authorization": f"Bearer {TOKENS['alice']}", "Idempotency-Key": "a-1"}
    url = gk.url + "/v1/approvals"
    async with gk.session.post(url, json=body, headers=headers) as response:
        first = await response.json()
        assert response.status == 200
    async with gk.session.post(url, json=body, headers=headers) as response:
        again = await response.json()
        assert response.headers["Idempotent-Replayed"] == "true"
    assert again["seq"] == first["seq"]
    async with gk.session.post(url, json={**body, "decision": "reject"}, headers=headers) as r:
        assert r.status == 422
    # the same key from another approver is theirs, not alice's
    bob = {**headers, "Authorization": f"Bearer {TOKENS['bob']}"}
    async with gk.session.post(url, json=body, headers=bob) as response:
        assert response.status == 200 and "Idempotent-Replayed" not in response.headers
    log = await gk.daemon.store.fact_log()
    assert [(r.id, r.data["decision"]) for r in log if r.kind == "approval"] == [
        ("alice", "approve"),
        ("bob", "approve"),
    ]


SHIP_PER_BUILD = """\
id: tower-a/ship
project: tower-a
for_each: build
when: item.data.status == "passed"
actions:
  - notify: {target: ci, message: "ship ${item.id}"}
"""


async def test_exemplars_name_items_only_to_tokens_of_every_project(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, tokens=tokens_yaml())
    project.write_rule("ship.yaml", SHIP_PER_BUILD)
    gk = await start_daemon(project, env=ENV)
    status, _ = await call(
        gk, "POST", "/v1/facts", "ci", fact("build", "build-42", status="passed")
    )
    assert status == 200
    answers = {}
    for name in ("reader-b", "ops"):
        headers = {
            "Authorization": f"Bearer {TOKENS[name]}",
            "Accept": "application/openmetrics-text",
        }
        async with gk.session.get(gk.url + "/metrics", headers=headers) as response:
            assert response.status == 200
            answers[name] = (response.headers["Content-Type"], await response.text())
    content_type, text = answers["reader-b"]  # tower-b only: the classic format, no exemplar
    assert content_type.startswith("text/plain") and "build-42" not in text
    content_type, text = answers["ops"]  # every project
    assert content_type.startswith("application/openmetrics-text") and "build-42" in text
