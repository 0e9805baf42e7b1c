"""Inbound CI webhooks: GitHub ``X-Hub-Signature-256`` and GitLab ``X-Gitlab-Token``
verification, JSON and form-encoded bodies, and the declarative event-to-fact mapping.

The payloads in ``tests/data/hooks`` are trimmed copies of the documented ones: GitHub's
``workflow_run`` and ``check_suite`` examples (octokit/webhooks ``payload-examples``, which
GitHub's "Webhook events and payloads" page is generated from) and GitLab's "Pipeline Hook"
example (GitLab docs, "Webhook events"). Only long lists of ``*_url`` fields were dropped.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import textwrap
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.config import Hook, HookFact, load_config
from gatekeeper.engine.model import FactInput
from gatekeeper.runtime.hooks import (
    HookRejected,
    check_hook,
    delivery_id,
    event_name,
    handle,
    lookup,
    map_event,
    render,
    verify,
)

DATA = Path(__file__).parent / "data" / "hooks"
GITHUB_SECRET = "gh-webhook-secret-3f9c2a7e"
GITLAB_SECRET = "glpat-style-token-8d1e5b"

CI_RUN = HookFact(
    event="workflow_run",
    kind="ci_run",
    id="${workflow_run.name}-${workflow_run.head_branch}",
    match={"action": "completed"},
    data={
        "conclusion": "${workflow_run.conclusion}",
        "run_number": "${workflow_run.run_number}",
        "sha": "${workflow_run.head_sha}",
        "url": "${workflow_run.html_url}",
        "repository": "${repository.full_name}",
        "finished_at": "${workflow_run.updated_at}",
    },
)
CHECK_SUITE = HookFact(
    event="check_suite",
    kind="check_suite",
    id="${check_suite.head_branch}",
    match={"action": "completed"},
    data={
        "conclusion": "${check_suite.conclusion}",
        "app": "${check_suite.app.name}",
        "pull_request": "${check_suite.pull_requests.0.number}",
    },
)
CI_PIPELINE = HookFact(
    event="Pipeline Hook",
    kind="ci_pipeline",
    id="gitlab-test-${object_attributes.ref}",
    match={"object_kind": "pipeline", "object_attributes.status": "success"},
    data={
        "project": "${project.path_with_namespace}",
        "status": "${object_attributes.status}",
        "detailed_status": "${object_attributes.detailed_status}",
        "ref": "${object_attributes.ref}",
        "sha": "${object_attributes.sha}",
        "stages": "${object_attributes.stages}",
        "duration_s": "${object_attributes.duration}",
        "summary": "pipeline #${object_attributes.id} on ${object_attributes.ref}",
    },
)
GITHUB = Hook("github", "github", "GITHUB_HOOK_SECRET", "tower-a", (CI_RUN, CHECK_SUITE))
GITLAB = Hook("gitlab", "gitlab", "GITLAB_HOOK_TOKEN", "tower-a", (CI_PIPELINE,))

EXPECTED_RUN = FactInput(
    project="tower-a",
    kind="ci_run",
    id="test-master",
    data={
        "conclusion": "success",
        "run_number": 163,
        "sha": "3484a3fb816e0859fd6e1cea078d76385ff50625",
        "url": "https://github.com/octo-org/octo-repo/actions/runs/289782451",
        "repository": "octo-org/octo-repo",
        "finished_at": "2020-10-05T16:33:49Z",
    },
)
EXPECTED_PIPELINE_DATA = {
    "project": "gitlab-org/gitlab-test",
    "status": "success",
    "detailed_status": "passed",
    "ref": "master",
    "sha": "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
    "stages": ["build", "test", "deploy"],
    "duration_s": 63,
    "summary": "pipeline #31 on master",
}


def payload(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return loaded


def github_signature(body: bytes, secret: str = GITHUB_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_request(
    event: str, body: bytes, *, secret: str = GITHUB_SECRET, form: bool = False
) -> dict[str, str]:
    """The headers GitHub sends with a delivery (Hookshot), signed with ``secret``."""
    content_type = "application/x-www-form-urlencoded" if form else "application/json"
    return {
        "User-Agent": "GitHub-Hookshot/044aadd",
        "Content-Type": content_type,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Event": event,
        "X-GitHub-Hook-ID": "109948940",
        "X-Hub-Signature-256": github_signature(body, secret),
    }


def gitlab_request(token: str | None = GITLAB_SECRET) -> dict[str, str]:
    """The headers GitLab sends with a Pipeline Hook."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.0.0",
        "X-Gitlab-Event": "Pipeline Hook",
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": "7f7c4a53-3a2f-4c4e-9d8b-3c0d5a6f1e2b",
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers


def encode(data: Any) -> bytes:
    return json.dumps(data).encode()


def rejected(call: Any, *args: Any) -> HookRejected:
    with pytest.raises(HookRejected) as caught:
        call(*args)
    for secret in (GITHUB_SECRET, GITLAB_SECRET):
        assert secret not in str(caught.value)
    return caught.value


# --- GitHub: X-Hub-Signature-256 -------------------------------------------------------------


def test_github_documented_test_vector_verifies() -> None:
    """The example in GitHub's "Validating webhook deliveries"."""
    headers = {
        "X-Hub-Signature-256": (
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        )
    }
    verify(GITHUB, "It's a Secret to Everybody", headers, b"Hello, World!")


def test_workflow_run_completed_maps_to_ci_run_fact() -> None:
    body = encode(payload("github_workflow_run_completed"))

    facts = handle(GITHUB, GITHUB_SECRET, github_request("workflow_run", body), body)

    assert facts == [EXPECTED_RUN]
    assert type(facts[0].data["run_number"]) is int


def test_header_names_are_case_insensitive() -> None:
    body = encode(payload("github_workflow_run_completed"))
    headers = {k.lower(): v for k, v in github_request("workflow_run", body).items()}

    assert handle(GITHUB, GITHUB_SECRET, headers, body) == [EXPECTED_RUN]


def test_check_suite_completed_maps_with_a_list_index_path() -> None:
    body = encode(payload("github_check_suite_completed"))

    facts = handle(GITHUB, GITHUB_SECRET, github_request("check_suite", body), body)

    assert facts == [
        FactInput(
            "tower-a",
            "check_suite",
            "changes",
            {"conclusion": "success", "app": "octocoders-linter", "pull_request": 2},
        )
    ]


def test_wrong_secret_is_401() -> None:
    body = encode(payload("github_workflow_run_completed"))
    headers = github_request("workflow_run", body, secret="not-the-secret")

    error = rejected(handle, GITHUB, GITHUB_SECRET, headers, body)

    assert error.status == 401
    assert "X-Hub-Signature-256" in error.message


def test_missing_signature_is_401() -> None:
    body = encode(payload("github_workflow_run_completed"))
    headers = github_request("workflow_run", body)
    del headers["X-Hub-Signature-256"]

    error = rejected(handle, GITHUB, GITHUB_SECRET, headers, body)

    assert (error.status, error.message) == (401, "missing X-Hub-Signature-256 header")


@pytest.mark.parametrize(
    "signature",
    ["", "sha1=0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33", "sha256=", "sha256=zz", "sha256=\udcff"],
)
def test_malformed_signature_is_401(signature: str) -> None:
    body = encode(payload("github_workflow_run_completed"))
    headers = {**github_request("workflow_run", body), "X-Hub-Signature-256": signature}

    assert rejected(handle, GITHUB, GITHUB_SECRET, headers, body).status == 401


def test_tampered_body_is_401() -> None:
    original = payload("github_workflow_run_completed")
    headers = github_request("workflow_run", encode(original))
    original["workflow_run"]["conclusion"] = "failure"
    tampered = encode(original)

    assert rejected(handle, GITHUB, GITHUB_SECRET, headers, tampered).status == 401


def test_signature_is_checked_before_the_body_is_read() -> None:
    body = b"not json at all"
    headers = {**github_request("workflow_run", body, secret="wrong"), "Content-Type": "text/xml"}

    assert rejected(handle, GITHUB, GITHUB_SECRET, headers, body).status == 401


def test_empty_secret_verifies_nothing() -> None:
    body = encode(payload("github_workflow_run_completed"))
    headers = github_request("workflow_run", body, secret="")

    assert rejected(handle, GITHUB, "", headers, body).status == 401


def test_form_encoded_github_delivery_maps_like_json() -> None:
    """GitHub's "Content type: application/x-www-form-urlencoded" sends ``payload=<json>``;
    the signature covers the form-encoded body as sent."""
    text = json.dumps(payload("github_workflow_run_completed"))
    body = urllib.parse.urlencode({"payload": text}).encode()

    headers = github_request("workflow_run", body, form=True)

    assert handle(GITHUB, GITHUB_SECRET, headers, body) == [EXPECTED_RUN]


@pytest.mark.parametrize(
    "body",
    [b"zen=Design+for+failure.", b"payload=%7B%7D&payload=%7B%7D", b"payload=%7Bnot+json", b"&&"],
)
def test_malformed_form_body_is_400(body: bytes) -> None:
    headers = github_request("workflow_run", body, form=True)

    assert rejected(handle, GITHUB, GITHUB_SECRET, headers, body).status == 400


# --- GitLab: X-Gitlab-Token ------------------------------------------------------------------


def test_gitlab_pipeline_with_the_right_token_maps_to_ci_pipeline_fact() -> None:
    body = encode(payload("gitlab_pipeline_success"))

    facts = handle(GITLAB, GITLAB_SECRET, gitlab_request(), body)

    assert facts == [
        FactInput("tower-a", "ci_pipeline", "gitlab-test-master", EXPECTED_PIPELINE_DATA)
    ]


@pytest.mark.parametrize("token", ["wrong-token", GITLAB_SECRET + "x", GITLAB_SECRET[:-1], None])
def test_gitlab_wrong_or_missing_token_is_401(token: str | None) -> None:
    body = encode(payload("gitlab_pipeline_success"))

    error = rejected(handle, GITLAB, GITLAB_SECRET, gitlab_request(token), body)

    assert error.status == 401
    assert "X-Gitlab-Token" in error.message


def test_gitlab_does_not_accept_form_bodies() -> None:
    body = urllib.parse.urlencode({"payload": "{}"}).encode()
    headers = {**gitlab_request(), "Content-Type": "application/x-www-form-urlencoded"}

    error = rejected(handle, GITLAB, GITLAB_SECRET, headers, body)

    assert error.status == 400
    assert "application/json" in error.message


def test_gitlab_running_pipeline_is_ignored_by_the_status_match() -> None:
    running = payload("gitlab_pipeline_success")
    running["object_attributes"].update(
        status="running", detailed_status="running", finished_at=None, duration=None
    )

    assert handle(GITLAB, GITLAB_SECRET, gitlab_request(), encode(running)) == []


# --- Mapping ---------------------------------------------------------------------------------


def test_match_keeps_only_completed_runs() -> None:
    body = encode(payload("github_workflow_run_requested"))

    assert handle(GITHUB, GITHUB_SECRET, github_request("workflow_run", body), body) == []


def test_event_no_mapping_names_is_ignored() -> None:
    body = encode(payload("github_ping"))

    assert handle(GITHUB, GITHUB_SECRET, github_request("ping", body), body) == []


def test_the_first_fitting_mapping_wins() -> None:
    failed = HookFact(
        "workflow_run",
        "ci_failure",
        "${workflow_run.id}",
        match={"action": "completed", "workflow_run.conclusion": "failure"},
    )
    hook = Hook("github", "github", "S", "tower-a", (failed, CI_RUN))
    run = payload("github_workflow_run_completed")

    assert [f.kind for f in map_event(hook, "workflow_run", run)] == ["ci_run"]
    run["workflow_run"]["conclusion"] = "failure"
    assert map_event(hook, "workflow_run", run) == [
        FactInput("tower-a", "ci_failure", "289782451", {})
    ]


def test_match_compares_json_values_exactly() -> None:
    pipeline = payload("gitlab_pipeline_success")

    def fits(match: dict[str, Any]) -> bool:
        mapping = HookFact("Pipeline Hook", "ci_pipeline", "p-${object_attributes.id}", {}, match)
        return bool(
            map_event(Hook("gl", "gitlab", "S", "p", (mapping,)), "Pipeline Hook", pipeline)
        )

    assert fits({"object_attributes.tag": False})
    assert not fits({"object_attributes.tag": 0})
    assert fits({"object_attributes.id": 31})
    assert not fits({"object_attributes.id": "31"})
    assert fits({"merge_request.iid": 1.0})
    assert fits({"builds.0.runner": None})
    assert not fits({"builds.9.runner": None})
    assert not fits({"object_attributes.status.deeper": "success"})


def test_single_templates_keep_the_json_type() -> None:
    run = payload("github_workflow_run_requested")

    assert render("${workflow_run.run_number}", run) == 163
    assert render("${workflow_run.conclusion}", run) is None
    assert render("${workflow_run.pull_requests}", run) == []
    assert render("${repository.private}", run) is False
    assert render("${workflow_run.actor}", run)["login"] == "Codertocat"
    assert render("#${workflow_run.run_number}", run) == "#163"
    assert render("${repository.private}!", run) == "false!"
    assert (
        render("$${workflow_run.run_number} costs $$5", run)
        == "${workflow_run.run_number} costs $5"
    )


def test_a_queued_run_keeps_its_null_conclusion() -> None:
    every_run = HookFact(
        "workflow_run", "ci_run", "${workflow_run.id}", {"conclusion": "${workflow_run.conclusion}"}
    )
    hook = Hook("github", "github", "S", "tower-a", (every_run,))

    facts = map_event(hook, "workflow_run", payload("github_workflow_run_requested"))

    assert facts == [FactInput("tower-a", "ci_run", "289782451", {"conclusion": None})]


def test_a_template_to_a_missing_path_is_422_naming_the_path() -> None:
    mapping = HookFact(
        "workflow_run", "ci_run", "${workflow_run.id}", {"x": "${workflow_run.nope}"}
    )
    hook = Hook("github", "github", "S", "tower-a", (mapping,))

    error = rejected(map_event, hook, "workflow_run", payload("github_workflow_run_completed"))

    assert error.status == 422
    assert "'workflow_run.nope'" in error.message


@pytest.mark.parametrize(
    "template", ["${workflow_run.pull_requests.1.number}", "${workflow_run.id.x}", "${nope}"]
)
def test_paths_past_the_end_or_through_scalars_are_missing(template: str) -> None:
    with pytest.raises(HookRejected) as caught:
        render(template, payload("github_workflow_run_completed"))
    assert caught.value.status == 422


def test_null_or_objects_inside_a_text_are_422() -> None:
    run = payload("github_workflow_run_requested")

    for template in ("run ${workflow_run.conclusion}", "by ${workflow_run.actor}"):
        error = rejected(render, template, run)
        assert error.status == 422
        assert "alone" in error.message


@pytest.mark.parametrize(
    ("name", "valid"),
    [("docs.yml", True), ("Build_2", True), ("Build & Test", False), ("release/1.0", False)],
)
def test_fact_ids_are_checked_against_the_fact_schema(name: str, valid: bool) -> None:
    run = payload("github_workflow_run_completed")
    run["workflow_run"].update(name=name, head_branch="main")
    hook = Hook("github", "github", "S", "tower-a", (CI_RUN,))

    if valid:
        assert map_event(hook, "workflow_run", run)[0].id == f"{name}-main"
    else:
        error = rejected(map_event, hook, "workflow_run", run)
        assert error.status == 422
        assert "fact id" in error.message


def test_an_id_too_long_or_from_an_object_is_422() -> None:
    run = payload("github_workflow_run_completed")
    run["workflow_run"]["name"] = "x" * 130
    assert rejected(map_event, GITHUB, "workflow_run", run).status == 422

    whole = HookFact("workflow_run", "ci_run", "${workflow_run.actor}")
    hook = Hook("github", "github", "S", "tower-a", (whole,))
    assert rejected(map_event, hook, "workflow_run", run).status == 422


def test_reserved_or_invalid_kinds_are_422_and_reported_by_check_hook() -> None:
    forged = HookFact("workflow_run", "approval", "${workflow_run.id}")
    hook = Hook("github", "github", "S", "tower-a", (forged,))

    error = rejected(map_event, hook, "workflow_run", payload("github_workflow_run_completed"))

    assert (error.status, error.message) == (422, "fact kind 'approval' is reserved")
    assert check_hook(hook) == ["facts[0].kind: fact kind 'approval' is reserved"]


def test_bare_dollar_names_are_invalid_placeholders() -> None:
    mapping = HookFact("workflow_run", "ci_run", "$workflow_run.id", {"ok": "${action}"})
    hook = Hook("github", "github", "S", "tower-a", (mapping,))

    error = rejected(map_event, hook, "workflow_run", payload("github_workflow_run_completed"))

    assert error.status == 422
    assert "invalid placeholder" in error.message
    assert check_hook(hook) == [
        "facts[0].id: invalid placeholder in '$workflow_run.id': "
        "write ${dotted.path} (e.g. ${workflow_run.conclusion}), or $$ for a literal $"
    ]
    assert check_hook(GITHUB) == []


def test_lookup_walks_objects_and_lists() -> None:
    suite = payload("github_check_suite_completed")

    assert lookup(suite, "check_suite.pull_requests.0.base.ref") == "master"
    with pytest.raises(KeyError):
        lookup(suite, "check_suite.pull_requests.-1")


# --- Request shape ---------------------------------------------------------------------------


def test_event_names_come_from_the_event_headers() -> None:
    assert event_name(GITHUB, {"x-github-event": "workflow_run"}) == "workflow_run"
    assert event_name(GITLAB, {"X-GITLAB-EVENT": "Pipeline Hook"}) == "Pipeline Hook"
    error = rejected(event_name, GITLAB, {"X-Gitlab-Token": GITLAB_SECRET})
    assert (error.status, error.message) == (400, "missing X-Gitlab-Event header")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b"{}"),
        (None, b"{}"),
        ("application/json", b"{not json"),
        ("application/json", b"[1, 2]"),
        ("application/json", b'{"duration": NaN}'),
        ("application/json", b'{"duration": 1e400}'),  # overflows to inf: not JSON again
        ("application/json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),  # too deep
        ("application/json", b"\xff\xfe\xfa"),
    ],
)
def test_malformed_payloads_are_400(content_type: str | None, body: bytes) -> None:
    headers = gitlab_request()
    del headers["Content-Type"]
    if content_type:
        headers["Content-Type"] = content_type

    assert rejected(handle, GITLAB, GITLAB_SECRET, headers, body).status == 400


def test_content_type_parameters_are_ignored() -> None:
    body = encode(payload("gitlab_pipeline_success"))
    headers = {**gitlab_request(), "Content-Type": "application/json; charset=utf-8"}

    assert len(handle(GITLAB, GITLAB_SECRET, headers, body)) == 1


# --- gatekeeper.yaml -------------------------------------------------------------------------

CONFIG = """\
hooks:
  github:
    kind: github
    secret_env: GITHUB_HOOK_SECRET
    project: tower-a
    facts:
      - event: workflow_run
        match: {action: completed}
        kind: ci_run
        id: "${workflow_run.name}-${workflow_run.head_branch}"
        data:
          conclusion: "${workflow_run.conclusion}"
          run_number: "${workflow_run.run_number}"
          sha: "${workflow_run.head_sha}"
          url: "${workflow_run.html_url}"
          repository: "${repository.full_name}"
          finished_at: "${workflow_run.updated_at}"
      - event: check_suite
        match: {action: completed}
        kind: check_suite
        id: "${check_suite.head_branch}"
        data:
          conclusion: "${check_suite.conclusion}"
          app: "${check_suite.app.name}"
          pull_request: "${check_suite.pull_requests.0.number}"
  gitlab:
    kind: gitlab
    secret_env: GITLAB_HOOK_TOKEN
    project: tower-a
    facts:
      - event: Pipeline Hook
        match: {object_kind: pipeline, object_attributes.status: success}
        kind: ci_pipeline
        id: "gitlab-test-${object_attributes.ref}"
        data:
          project: "${project.path_with_namespace}"
          status: "${object_attributes.status}"
          detailed_status: "${object_attributes.detailed_status}"
          ref: "${object_attributes.ref}"
          sha: "${object_attributes.sha}"
          stages: "${object_attributes.stages}"
          duration_s: "${object_attributes.duration}"
          summary: "pipeline #${object_attributes.id} on ${object_attributes.ref}"
"""


def test_hooks_load_from_gatekeeper_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(textwrap.dedent(CONFIG))

    hooks = load_config(path).hooks

    assert dict(hooks) == {"github": GITHUB, "gitlab": GITLAB}
    body = encode(payload("gitlab_pipeline_success"))
    facts = handle(hooks["gitlab"], GITLAB_SECRET, gitlab_request(), body)
    assert facts[0].data == EXPECTED_PIPELINE_DATA
    assert [check_hook(hook) for hook in hooks.values()] == [[], []]


def test_payloads_are_not_mutated_by_mapping() -> None:
    run = payload("github_workflow_run_completed")
    before = copy.deepcopy(run)

    facts = map_event(GITHUB, "workflow_run", run)

    assert run == before
    assert facts == [EXPECTED_RUN]


def test_the_delivery_id_is_github_delivery_or_gitlab_idempotency_key() -> None:
    body = encode(payload("gitlab_pipeline_success"))
    github = github_request("workflow_run", body)
    assert delivery_id(GITHUB, github) == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    # X-Gitlab-Event-UUID is shared by events triggered by one webhook and changes on resend
    assert delivery_id(GITLAB, gitlab_request()) is None
    resend = {**gitlab_request(), "idempotency-key": "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"}
    assert delivery_id(GITLAB, resend) == "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"
    assert delivery_id(GITLAB, {**gitlab_request(), "Idempotency-Key": " "}) is None
