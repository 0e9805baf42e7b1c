"""What the store's contract changes show through the real HTTP API and CLI: a dead letter
says why it died, and a token restricted to some projects gets full pages of what it may
see (filtered in the query, before LIMIT), admin acts on actions included."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatekeeper.config import load_config
from gatekeeper.http.auth import hash_token

from .conftest import DEPLOY_RULE, ENV, Project, Receiver, Running, fact
from .test_delivery import wait_status

TOKENS = {
    "ops": "gk_ops-token-for-store-tests-000000000000000",
    "reader-a": "gk_reader-a-token-for-store-tests-0000000000",
    "reader-b": "gk_reader-b-token-for-store-tests-0000000000",
}
SCOPES = {
    "ops": (["admin", "read", "facts:write"], ["*"]),
    "reader-a": (["read"], ["tower-a"]),
    "reader-b": (["read", "facts:write"], ["tower-b"]),
}
TOWER_B_RULE = """\
id: tower-b/deploy-docs
project: tower-b
when: task["B-1"].status == "completed"
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: docs}}
"""


def tokens_yaml() -> list[dict[str, Any]]:
    return [
        {"subject": s, "sha256": hash_token(TOKENS[s]), "scopes": sc, "projects": pr}
        for s, (sc, pr) in SCOPES.items()
    ]


async def call(gk: Running, method: str, path: str, who: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with gk.session.request(method, gk.url + path, json=body, headers=headers) as response:
        assert response.status == 200, (response.status, await response.text())
        return await response.json()


async def _fire(gk: Running, project: str, task: str, times: int) -> None:
    """Fire the ``each_time`` deploy rule of ``project`` ``times`` times."""
    for _ in range(times):
        for status in ("completed", "open"):
            item = {**fact("task", task, status=status), "project": project}
            await call(gk, "POST", "/v1/facts", "ops", {"facts": [item]})


async def _settled(gk: Running, count: int) -> list[dict[str, Any]]:
    """Wait until ``count`` actions are no longer pending; return them all."""
    for _ in range(200):
        actions = (await call(gk, "GET", "/v1/actions?limit=1000", "ops"))["actions"]
        if len(actions) >= count and all(a["status"] != "pending" for a in actions):
            return list(actions)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} actions did not settle")


async def test_a_refused_action_says_it_was_refused_with_the_status(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    receiver.responses = [422]
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    [dead] = await wait_status(gk, "dead", 1)
    assert dead["dead_reason"] == "refused"
    assert dead["dead_status"] == 422
    assert dead["attempts"] == 1
    _, detail = await gk.get(f"/v1/actions/{dead['action_id']}")
    assert (detail["dead_reason"], detail["dead_status"]) == ("refused", 422)

    listing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gatekeeper", "actions", "list", "--url", gk.url,
         "-c", str(project.config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    assert "dead: refused (HTTP 422)" in listing.stdout

    # requeued, it is no dead letter any more: the reason goes with the status
    status, entry = await gk.post(f"/v1/actions/{dead['action_id']}/retry", {})
    assert status == 200
    assert (entry["status"], entry["dead_reason"], entry["dead_status"]) == ("pending", None, None)
    [delivered] = await wait_status(gk, "delivered", 1)
    assert (delivered["dead_reason"], delivered["dead_status"]) == (None, None)


async def test_an_action_that_runs_out_of_attempts_says_so(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("target: ci", "target: escrow-bank"))
    receiver.responses = [503, 503, 503]  # escrow-bank allows 3 attempts
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    [dead] = await wait_status(gk, "dead", 1)
    assert dead["attempts"] == 3
    assert dead["dead_reason"] == "attempts_exhausted"
    assert dead["dead_status"] == 503
    assert len(receiver.received) == 3

    listing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gatekeeper", "actions", "list", "--url", gk.url,
         "-c", str(project.config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert "dead: attempts_exhausted (HTTP 503)" in listing.stdout


async def test_an_action_that_grows_too_old_says_so(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    policy = "max_attempts: 3, max_age_s: 60"
    text = project.config_path.read_text()
    assert policy in text
    project.config_path.write_text(text.replace(policy, "max_attempts: 1000, max_age_s: 0.5"))
    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("target: ci", "target: escrow-bank"))
    receiver.responses = [503] * 1000
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    [dead] = await wait_status(gk, "dead", 1)
    assert 2 <= dead["attempts"] < 1000
    assert (dead["dead_reason"], dead["dead_status"]) == ("too_old", 503)


async def _two_projects(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> Running:
    project = project_factory(receiver.url, tokens=tokens_yaml())
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    project.write_rule("tower-b.yaml", TOWER_B_RULE)
    gk: Running = await start_daemon(project, env=ENV)
    return gk


async def test_a_restricted_token_gets_full_pages_of_actions_and_audit_entries(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    gk = await _two_projects(project_factory, receiver, start_daemon)
    await _fire(gk, "tower-b", "B-1", 3)  # older
    await _fire(gk, "tower-a", "T-17", 3)  # newer: the first page of everything
    await _settled(gk, 6)

    actions = (await call(gk, "GET", "/v1/actions?limit=2", "reader-b"))["actions"]
    assert [a["rule_id"] for a in actions] == ["tower-b/deploy-docs"] * 2
    actions = (await call(gk, "GET", "/v1/actions?limit=2", "reader-a"))["actions"]
    assert [a["rule_id"] for a in actions] == ["tower-a/deploy-docs"] * 2

    page = await call(gk, "GET", "/v1/audit?kind=decision&limit=2", "reader-b")
    assert len(page["entries"]) == 2
    assert {e["project"] for e in page["entries"]} == {"tower-b"}
    assert page["next_cursor"] is not None
    seen = list(page["entries"])
    while page["next_cursor"] is not None:
        path = f"/v1/audit?kind=decision&limit=2&cursor={page['next_cursor']}"
        page = await call(gk, "GET", path, "reader-b")
        seen += page["entries"]
    everything = await call(gk, "GET", "/v1/audit?kind=decision&limit=1000", "ops")
    assert seen == [e for e in everything["entries"] if e["project"] == "tower-b"]

    facts = (await call(gk, "GET", "/v1/facts", "reader-b"))["facts"]
    assert {f["project"] for f in facts} == {"tower-b"}
    export = await call(gk, "GET", "/v1/export", "reader-b")
    assert {f["project"] for f in export["facts"]} == {"tower-b"}


async def test_a_retry_is_seen_only_by_tokens_that_may_see_the_actions_project(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    receiver.responses = [422]
    gk = await _two_projects(project_factory, receiver, start_daemon)
    await _fire(gk, "tower-a", "T-17", 1)
    [dead] = await _settled(gk, 1)
    assert dead["status"] == "dead"
    await call(gk, "POST", f"/v1/actions/{dead['action_id']}/retry", "ops", {"reason": "fixed"})

    def retries(page: dict[str, Any]) -> list[tuple[str, str, Any]]:
        return [(e["what"], e["rule_id"], e["project"]) for e in page["entries"]]

    expected = [("retry_action", dead["action_id"], None)]  # stored without a project
    assert retries(await call(gk, "GET", "/v1/audit?kind=admin_act", "ops")) == expected
    assert retries(await call(gk, "GET", "/v1/audit?kind=admin_act", "reader-a")) == expected
    assert retries(await call(gk, "GET", "/v1/audit?kind=admin_act", "reader-b")) == []


def test_serve_refuses_a_database_url_of_another_scheme_naming_it(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    for url, code, says in (
        ("mysql://gk:s3cret@db.example/gk", 1, "'mysql' is not supported"),
        ("postgresql://gk:s3cret@db.example/gk", 1, "database: the URL holds a password"),
    ):
        text = project.config_path.read_text()
        project.config_path.write_text(re.sub(r"database: .*", f"database: {url}", text))
        result = subprocess.run(
            [sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ENV},
            check=False,
        )
        assert result.returncode == code, result.stderr
        assert says in result.stderr
        assert "s3cret" not in result.stderr
        assert "Traceback" not in result.stderr


def test_a_sqlite_url_in_the_config_is_resolved_like_a_path(tmp_path: Path) -> None:
    config_path = tmp_path / "gatekeeper.yaml"
    for database, expected in (
        ("state/gk.db", tmp_path / "state" / "gk.db"),
        ("sqlite:///state/gk.db", f"sqlite:///{tmp_path / 'state' / 'gk.db'}"),
        ("sqlite:////var/gk.db", "sqlite:////var/gk.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql://db.example/gk", "postgresql://db.example/gk"),
    ):
        config_path.write_text(f'database: "{database}"\n')
        assert load_config(config_path).database == expected, database
