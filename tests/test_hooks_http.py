"""Inbound CI webhooks through the live daemon: a signed GitHub workflow_run event becomes a
fact that fires the next step; bad signatures, unknown sources and redeliveries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

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


# --- GitLab: Idempotency-Key, not X-Gitlab-Event-UUID ----------------------------------------

GITLAB_TOKEN = "gitlab-hook-token-5b2e"
GITLAB_HOOKS = {
    "gitlab": {
        "kind": "gitlab",
        "secret_env": "GL_HOOK_TOKEN",
        "project": "tower-a",
        "facts": [
            {
                "event": "Pipeline Hook",
                "match": {"object_kind": "pipeline"},
                "kind": "ci_pipeline",
                "id": "gitlab-${project.id}-${object_attributes.ref}",
                "data": {
                    "status": "${object_attributes.status}",
                    "pipeline_id": "${object_attributes.id}",
                },
            },
            {
                "event": "Job Hook",
                "kind": "ci_job",
                "id": "job-${build_id}",
                "data": {"status": "${build_status}"},
            },
        ],
    }
}


@pytest.fixture
async def gl(project_factory: Callable[..., Project], start_daemon: Any) -> Running:
    project = project_factory(hooks=GITLAB_HOOKS)
    project.write_rule("next.yaml", NEXT_STEP)
    running: Running = await start_daemon(project, env={**ENV, "GL_HOOK_TOKEN": GITLAB_TOKEN})
    return running


def gitlab_headers(
    event_uuid: str, idempotency_key: str | None, event: str = "Pipeline Hook"
) -> dict[str, str]:
    """The headers GitLab 17.4+ sends ("Webhooks", Delivery headers)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.4.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "02affd2d-2cba-4033-917d-ec22d5dc4b38",
        "X-Gitlab-Event-UUID": event_uuid,
        "X-Gitlab-Token": GITLAB_TOKEN,
    }
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def pipeline(status: str, pipeline_id: int) -> bytes:
    published = json.loads((PAYLOADS / "published" / "gitlab_pipeline_hook.json").read_text())
    published["object_attributes"].update(status=status, id=pipeline_id)
    return json.dumps(published).encode()


async def test_gitlab_resend_keeps_its_idempotency_key_and_applies_nothing(gl: Running) -> None:
    """GitLab's "Resend Request" sends the same data with the same Idempotency-Key and a fresh
    X-Gitlab-Event-UUID: an older result must not roll the fact back."""
    failed, success = pipeline("failed", 31), pipeline("success", 32)
    status, first = await post(gl, failed, gitlab_headers("uuid-1", "key-1"), source="gitlab")
    assert status == 200, first
    status, _ = await post(gl, success, gitlab_headers("uuid-2", "key-2"), source="gitlab")
    assert status == 200

    status, again = await post(gl, failed, gitlab_headers("uuid-3", "key-1"), source="gitlab")
    assert status == 200 and again["seqs"] == first["seqs"]
    _, facts = await gl.get("/v1/facts")
    [current] = facts["facts"]
    assert current["id"] == "gitlab-1-master"
    assert current["data"] == {"status": "success", "pipeline_id": 32}
    assert len(await gl.daemon.store.fact_log()) == 2


async def test_gitlab_events_sharing_an_event_uuid_are_each_applied(gl: Running) -> None:
    """Events triggered by an earlier webhook share its X-Gitlab-Event-UUID: that header is no
    per-event key (with or without an Idempotency-Key, from GitLab before 17.4)."""
    job = json.dumps({"object_kind": "build", "build_id": 1977, "build_status": "success"})
    shared = "13792a34-cac6-4fda-95a8-c58e00a3954e"
    status, _ = await post(gl, pipeline("running", 31), gitlab_headers(shared, "k-a"), "gitlab")
    assert status == 200
    status, answer = await post(
        gl, job.encode(), gitlab_headers(shared, "k-b", "Job Hook"), source="gitlab"
    )
    assert status == 200, answer
    status, answer = await post(gl, pipeline("success", 31), gitlab_headers(shared, None), "gitlab")
    assert status == 200, answer
    _, facts = await gl.get("/v1/facts")
    assert {(f["id"], f["data"]["status"]) for f in facts["facts"]} == {
        ("gitlab-1-master", "success"),
        ("job-1977", "success"),
    }
    assert len(await gl.daemon.store.fact_log()) == 3


# --- Other senders: Standard Webhooks --------------------------------------------------------

STANDARD_SECRET = "whsec_" + base64.b64encode(b"jenkins-to-gatekeeper-7d41").decode()
STANDARD_HOOKS = {
    "jenkins": {
        "kind": "standard",
        "secret_env": "JENKINS_HOOK_SECRET",
        "project": "tower-a",
        "facts": [
            {
                "event": "build.completed",
                "match": {"data.job": "tower-docs"},
                "kind": "ci_build",
                "id": "jenkins-tower-docs",
                "data": {"result": "${data.result}", "build": "${data.number}"},
            }
        ],
    }
}
AFTER_BUILD = """\
id: tower-a/after-docs-build
project: tower-a
when: ci_build["jenkins-tower-docs"].result == "SUCCESS"
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: publish}}
"""


@pytest.fixture
async def std(
    project_factory: Callable[..., Project], start_daemon: Any, receiver: Receiver
) -> Running:
    project = project_factory(receiver.url, hooks=STANDARD_HOOKS)
    project.write_rule("next.yaml", AFTER_BUILD)
    env = {**ENV, "JENKINS_HOOK_SECRET": STANDARD_SECRET}
    running: Running = await start_daemon(project, env=env)
    return running


def build_event(result: str, number: int) -> bytes:
    data = {"job": "tower-docs", "number": number, "result": result}
    return json.dumps(
        {"type": "build.completed", "timestamp": "2026-12-07T05:00:00Z", "data": data}
    ).encode()


def standard_signed(
    body: bytes, msg_id: str, *, at: datetime | None = None, secret: str = STANDARD_SECRET
) -> dict[str, str]:
    when = at or datetime.now(UTC)
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
    }


async def test_a_standard_webhook_becomes_a_fact_and_fires_the_next_step(
    std: Running, receiver: Receiver
) -> None:
    body = build_event("SUCCESS", 42)
    status, answer = await post(std, body, standard_signed(body, "msg-42"), source="jenkins")
    assert status == 200, answer
    _, facts = await std.get("/v1/facts")
    [build] = facts["facts"]
    assert (build["kind"], build["id"]) == ("ci_build", "jenkins-tower-docs")
    assert build["data"] == {"result": "SUCCESS", "build": 42}
    received = await receiver.wait_for(1)
    assert json.loads(received[0].raw)["inputs"] == {"stage": "publish"}


async def test_a_standard_webhook_with_a_bad_signature_or_an_old_timestamp_is_401(
    std: Running,
) -> None:
    body = build_event("SUCCESS", 42)
    wrong = "whsec_" + base64.b64encode(b"not the shared secret").decode()
    status, error = await post(std, body, standard_signed(body, "m-1", secret=wrong), "jenkins")
    assert status == 401, error
    assert STANDARD_SECRET not in json.dumps(error)
    status, error = await post(std, body + b"\n", standard_signed(body, "m-2"), "jenkins")
    assert status == 401, error
    old = datetime.now(UTC) - timedelta(minutes=6)
    status, error = await post(std, body, standard_signed(body, "m-3", at=old), "jenkins")
    assert status == 401 and "5 minutes" in error["error"]["message"]
    assert await std.daemon.store.fact_log() == []


async def test_a_replayed_standard_webhook_is_not_applied_twice(std: Running) -> None:
    success = build_event("SUCCESS", 42)
    status, first = await post(std, success, standard_signed(success, "msg-42"), "jenkins")
    assert status == 200
    failure = build_event("FAILURE", 43)
    status, _ = await post(std, failure, standard_signed(failure, "msg-43"), "jenkins")
    assert status == 200

    # the same message again (a retry, or a captured request replayed): answered as the first
    status, again = await post(std, success, standard_signed(success, "msg-42"), "jenkins")
    assert status == 200 and again["seqs"] == first["seqs"]
    # the same webhook-id, validly signed, on another body: refused
    forged = build_event("SUCCESS", 44)
    status, error = await post(std, forged, standard_signed(forged, "msg-42"), "jenkins")
    assert status == 422 and "hook:jenkins:msg-42" in error["error"]["message"]

    assert len(await std.daemon.store.fact_log()) == 2
    _, facts = await std.get("/v1/facts")
    assert facts["facts"][0]["data"] == {"result": "FAILURE", "build": 43}
