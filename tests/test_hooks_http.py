"""Inbound CI webhooks through the live daemon: a signed GitHub workflow_run event becomes a
fact that fires the next step; bad signatures, unknown sources and redeliveries."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import ENV, Project, Receiver, Running

HOOK_SECRET = "It's a Secret to Everybody"
PAYLOADS = Path(__file__).parent / "data" / "hooks"
HOOKS = {
    "github": {
        "kind": "github",
        "secret_env": "GH_HOOK_SECRET",
        "project": "tower-a",
        "facts": [
            {
                "event": "workflow_run",
                "match": {"action": "completed"},
                "kind": "ci_run",
                "id": "${workflow_run.name}-${workflow_run.head_branch}",
                "data": {
                    "conclusion": "${workflow_run.conclusion}",
                    "run_number": "${workflow_run.run_number}",
                },
            }
        ],
    }
}
NEXT_STEP = """\
id: tower-a/deploy-after-tests
project: tower-a
when: ci_run["test-master"].conclusion == "success" and ci_run["test-master"].run_number > 100
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: deploy}}
"""


@pytest.fixture
async def gk(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Receiver
) -> Running:
    project = project_factory(receiver.url, hooks=HOOKS)
    project.write_rule("next.yaml", NEXT_STEP)
    running: Running = await start_daemon(project, env={**ENV, "GH_HOOK_SECRET": HOOK_SECRET})
    return running


def signed(body: bytes, event: str, delivery: str) -> dict[str, str]:
    digest = hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": f"sha256={digest}",
    }


async def post(gk: Running, body: bytes, headers: dict[str, str], source: str = "github") -> Any:
    async with gk.session.post(f"{gk.url}/v1/hooks/{source}", data=body, headers=headers) as r:
        return r.status, await r.json()


async def test_signed_workflow_run_becomes_a_fact_and_fires_the_next_step(
    gk: Running, receiver: Receiver
) -> None:
    body = (PAYLOADS / "github_workflow_run_completed.json").read_bytes()
    status, answer = await post(gk, body, signed(body, "workflow_run", "d-1"))
    assert status == 200, answer
    _, facts = await gk.get("/v1/facts")
    [run] = facts["facts"]
    assert (run["kind"], run["id"]) == ("ci_run", "test-master")
    assert run["data"] == {"conclusion": "success", "run_number": 163}
    received = await receiver.wait_for(1)
    assert json.loads(received[0].raw)["inputs"] == {"stage": "deploy"}

    # GitHub redelivers the same delivery: answered from the first, nothing applied twice
    status, again = await post(gk, body, signed(body, "workflow_run", "d-1"))
    assert status == 200 and again["seqs"] == answer["seqs"]
    assert len(await gk.daemon.store.fact_log()) == 1


async def test_bad_signature_unknown_source_and_unmapped_events(gk: Running) -> None:
    body = (PAYLOADS / "github_workflow_run_completed.json").read_bytes()
    headers = signed(body, "workflow_run", "d-2")
    status, error = await post(gk, body + b" ", headers)
    assert status == 401
    assert HOOK_SECRET not in json.dumps(error)
    status, _ = await post(gk, body, {k: v for k, v in headers.items() if "Signature" not in k})
    assert status == 401
    status, _ = await post(gk, body, headers, source="jenkins")
    assert status == 404
    ping = (PAYLOADS / "github_ping.json").read_bytes()
    status, answer = await post(gk, ping, signed(ping, "ping", "d-3"))
    assert status == 202 and answer["ignored"] is True
    requested = (PAYLOADS / "github_workflow_run_requested.json").read_bytes()
    status, _ = await post(gk, requested, signed(requested, "workflow_run", "d-4"))
    assert status == 202  # only completed runs are mapped
    assert await gk.daemon.store.fact_log() == []


async def test_a_broken_hook_mapping_is_refused_at_start(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    from gatekeeper.runtime.daemon import StartupError

    broken = {"github": {**HOOKS["github"], "facts": [{**HOOKS["github"]["facts"][0]}]}}
    broken["github"]["facts"][0]["id"] = "$workflow_run.name"  # ${...} needed for a path
    project = project_factory(hooks=broken)
    project.write_rule("next.yaml", NEXT_STEP)
    with pytest.raises(StartupError) as caught:
        await start_daemon(project, env={**ENV, "GH_HOOK_SECRET": HOOK_SECRET})
    assert "hooks.github.facts[0].id" in str(caught.value)
    assert HOOK_SECRET not in str(caught.value)
