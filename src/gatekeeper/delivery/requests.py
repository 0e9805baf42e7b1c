"""Turning a queued action into the HTTP request its target expects.

Webhook targets (``kind: webhook``, the default) get a JSON POST signed per the Standard
Webhooks spec
(https://www.standardwebhooks.com/, headers ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), computed with the
spec's own ``standardwebhooks`` package so receivers can verify with any of its libraries.
The ``webhook-id`` is the action id, stable across retries; a release also carries it as
``release_id`` in the body and as the ``Idempotency-Key`` header.

Body shapes (``type`` tells them apart):

- release: ``{"type": "release", "release_id", "escrow", "amount", "currency", "payee", ...}``
- notify:  ``{"type": "notify", "message", ...}``, or ``{"text": message}`` for a target
  with ``format: slack`` (Slack-style incoming webhook)
- pipeline (generic webhook): ``{"type": "pipeline", "ref", "inputs", ...}``

Every JSON body (but the Slack one) also carries ``action_id``, ``rule_id``, ``project``,
``firing_id`` and ``fired_at``; the action of a per-item rule carries ``item`` (``{kind, id,
data}``, the instance's fact), and every action whose rule read facts by id carries them
as ``facts`` (``{"kind.id": data}``, as the decision saw them), so a receiver needs no
second call. Amounts stay decimal strings.

Pipeline actions to a CI target get the request that service documents instead (unsigned:
the service authenticates gatekeeper by its token, read from ``token_env``):

- ``github_actions`` -- "Create a workflow dispatch event"
  (https://docs.github.com/en/rest/actions/workflows#create-a-workflow-dispatch-event):
  ``POST {api_url}/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches`` with
  ``Accept: application/vnd.github+json``, ``Authorization: Bearer <token>``,
  ``X-GitHub-Api-Version: 2022-11-28`` and the JSON body ``{"ref", "inputs"}``; GitHub
  answers ``204 No Content``.
- ``gitlab`` -- "Trigger a pipeline with a token"
  (https://docs.gitlab.com/api/pipeline_triggers/#trigger-a-pipeline-with-a-token):
  ``POST {api_url}/projects/{id or URL-encoded path}/trigger/pipeline`` with the form
  fields ``token``, ``ref`` and ``variables[KEY]=value`` per input; GitLab answers
  ``201 Created`` with the pipeline.
- ``jenkins`` -- Remote access API, "Launching a build with parameters"
  (https://www.jenkins.io/doc/book/using/remote-access-api/):
  ``POST {url}/job/{folder}/job/{name}/buildWithParameters?KEY=value...`` (the inputs, and
  the ref as the parameter ``ref_parameter``) with HTTP Basic auth ``user:api-token`` (no
  CSRF crumb is needed with an API token); Jenkins answers ``201 Created`` with the queue
  item in ``Location``.

Their documented limits (GitHub's 25 inputs, GitLab's variable names, the size of Jenkins'
request line) are checked when the rules load: see ``gatekeeper.rules.pipelines``.

None of these APIs takes an idempotency key, and gatekeeper adds nothing to the inputs the
rule wrote (a workflow rejects inputs it does not declare). Delivery therefore stays
at-least-once: when the service's answer is lost (a timeout after it started the run), the
retry starts a second run. Make such pipelines safe to run twice, or give the target
``delivery: {max_attempts: 1}`` to prefer at-most-once.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from gatekeeper import __version__
from gatekeeper.clock import format_rfc3339
from gatekeeper.config import Target
from gatekeeper.rules.pipelines import jenkins_request_target
from gatekeeper.store.records import OutboxEntry

USER_AGENT = f"gatekeeper/{__version__}"


@dataclass(frozen=True)
class OutgoingRequest:
    """A request ready to send: method, URL, headers and the exact body bytes signed."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes


def request_body(entry: OutboxEntry, target: Target) -> dict[str, Any]:
    """The JSON body for ``entry`` sent to ``target`` (see the module docstring)."""
    if entry.kind == "notify" and target.format == "slack":
        return {"text": entry.payload["message"]}
    return {
        "type": entry.kind,
        "action_id": entry.action_id,
        "rule_id": entry.rule_id,
        "firing_id": entry.firing_id,
        "fired_at": format_rfc3339(entry.created_at),
        **dict(entry.payload),
    }


def build_request(
    entry: OutboxEntry, target: Target, secret: str, now: datetime
) -> OutgoingRequest:
    """Build the request for ``entry`` to ``target`` (see the module docstring).

    For a webhook target, ``secret`` is its Standard Webhooks secret (``whsec_<base64>``, or
    any other string, which is then used as raw key bytes) and ``now`` becomes
    ``webhook-timestamp``. For a CI target, ``secret`` is its API token. Raises
    ``ValueError`` for an action a CI target cannot take (only pipelines).
    """
    if target.kind != "webhook":
        refusal = target.refusal(entry.kind)
        if refusal is not None:
            raise ValueError(refusal)
        builder = _PIPELINE_BUILDERS[target.kind]
        return builder(target, str(entry.payload["ref"]), _inputs(entry), secret)
    body = json.dumps(request_body(entry, target), separators=(",", ":"), sort_keys=True)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **sign(entry.action_id, body, secret, now),
    }
    if entry.kind == "release":
        headers["Idempotency-Key"] = str(entry.payload["release_id"])
    return OutgoingRequest("POST", target.url, headers, body.encode())


def sign(message_id: str, body: str, secret: str, now: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (``webhook-id``, ``-timestamp``,
    ``-signature``), signed with ``secret`` at ``now`` (whole seconds since the epoch)."""
    key: str | bytes = secret if secret.startswith("whsec_") else secret.encode()
    webhook = Webhook(key)
    timestamp = int(now.timestamp())
    signature = webhook.sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def github_dispatch_request(
    target: Target, ref: str, inputs: Mapping[str, str], token: str
) -> OutgoingRequest:
    """GitHub REST "Create a workflow dispatch event": ``POST /repos/{owner}/{repo}/actions/
    workflows/{workflow_id}/dispatches`` with ``{"ref", "inputs"}``; ``workflow_id`` may be
    the workflow's file name. GitHub answers 204.
    https://docs.github.com/en/rest/actions/workflows#create-a-workflow-dispatch-event
    """
    owner, _, repo = target.repo.partition("/")
    path = "/".join(
        _segment(part)
        for part in ("repos", owner, repo, "actions", "workflows", target.workflow, "dispatches")
    )
    body = json.dumps({"ref": ref, "inputs": dict(inputs)}, separators=(",", ":"))
    headers = {
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,  # GitHub refuses requests without one
    }
    return OutgoingRequest("POST", f"{target.base_url}/{path}", headers, body.encode())


def gitlab_trigger_request(
    target: Target, ref: str, inputs: Mapping[str, str], token: str
) -> OutgoingRequest:
    """GitLab "Trigger a pipeline with a token": ``POST /projects/:id/trigger/pipeline`` with
    the form fields ``token``, ``ref`` and ``variables[KEY]=value``; ``:id`` is the numeric
    id or the URL-encoded path. GitLab answers 201 with the pipeline.
    https://docs.gitlab.com/api/pipeline_triggers/#trigger-a-pipeline-with-a-token
    """
    project = _segment(urllib.parse.unquote(target.project_id))  # "a/b" and "a%2Fb" alike
    fields = [("token", token), ("ref", ref)]
    fields += [(f"variables[{key}]", value) for key, value in inputs.items()]
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    url = f"{target.base_url}/projects/{project}/trigger/pipeline"
    return OutgoingRequest("POST", url, headers, urllib.parse.urlencode(fields).encode())


def jenkins_build_request(
    target: Target, ref: str, inputs: Mapping[str, str], token: str
) -> OutgoingRequest:
    """Jenkins remote access API: ``POST /job/{folder}/job/{name}/buildWithParameters?KEY=
    value...`` with HTTP Basic auth ``user:api-token``. The rule's inputs are the build
    parameters, and its ref goes in ``ref_parameter`` unless an input has that name.
    Jenkins answers 201 with the queue item's URL in ``Location``.
    https://www.jenkins.io/doc/book/using/remote-access-api/
    """
    credentials = base64.b64encode(f"{target.user}:{token}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}", "User-Agent": USER_AGENT}
    url = f"{target.base_url}{jenkins_request_target(target, ref, inputs)}"
    return OutgoingRequest("POST", url, headers, b"")


GITHUB_API_VERSION = "2022-11-28"

_PipelineBuilder = Callable[[Target, str, Mapping[str, str], str], OutgoingRequest]
_PIPELINE_BUILDERS: Mapping[str, _PipelineBuilder] = {
    "github_actions": github_dispatch_request,
    "gitlab": gitlab_trigger_request,
    "jenkins": jenkins_build_request,
}


def _inputs(entry: OutboxEntry) -> dict[str, str]:
    inputs = entry.payload.get("inputs") or {}
    return {str(key): str(value) for key, value in inputs.items()}


def _segment(text: str) -> str:
    """``text`` as one URL path segment (``/`` and everything else reserved is encoded)."""
    return urllib.parse.quote(text, safe="")
