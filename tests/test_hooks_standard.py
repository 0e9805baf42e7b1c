"""Inbound events from other senders (``kind: standard``), verified per Standard Webhooks with
the ``standardwebhooks`` library: ``webhook-signature`` over ``webhook-id``,
``webhook-timestamp`` and the body, a 5-minute timestamp tolerance, the event taken from the
payload's ``type``, and ``webhook-id`` as the delivery id; ``check`` of its mappings."""

from __future__ import annotations

import base64
import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from gatekeeper.config import ConfigError, Hook, HookFact, load_config, resolve_hook_secrets
from gatekeeper.engine.model import FactInput
from gatekeeper.runtime.hooks import HookRejected, delivery_id, handle, hook_problems

SECRET = "whsec_" + base64.b64encode(b"standard-hook-secret-2f8a1c").decode()
BUILD = HookFact(
    event="build.completed",
    kind="ci_build",
    id="jenkins-${data.job}",
    match={"data.job": "tower-docs"},
    data={"result": "${data.result}", "build": "${data.number}"},
)
JENKINS = Hook("jenkins", "standard", "JENKINS_HOOK_SECRET", "tower-a", (BUILD,))
EVENT = {
    "type": "build.completed",
    "timestamp": "2026-12-07T05:00:00Z",
    "data": {"job": "tower-docs", "number": 42, "result": "SUCCESS"},
}


def signed(
    body: bytes, msg_id: str = "tower-docs-42", *, at: datetime | None = None, secret: str = SECRET
) -> dict[str, str]:
    """The headers a Standard Webhooks sender puts on ``body``."""
    when = at or datetime.now(UTC)
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
    }


def rejected(body: bytes, headers: dict[str, str], hook: Hook = JENKINS) -> HookRejected:
    with pytest.raises(HookRejected) as caught:
        handle(hook, SECRET, headers, body)
    assert SECRET not in caught.value.message
    signature = headers.get("webhook-signature")
    assert not signature or signature not in caught.value.message
    return caught.value


def test_a_signed_event_maps_by_its_type() -> None:
    body = json.dumps(EVENT).encode()

    facts = handle(JENKINS, SECRET, signed(body), body)

    assert facts == [
        FactInput("tower-a", "ci_build", "jenkins-tower-docs", {"result": "SUCCESS", "build": 42})
    ]


def test_a_raw_text_secret_is_used_as_key_bytes() -> None:
    body = json.dumps(EVENT).encode()
    when = datetime.now(UTC)
    signature = Webhook(b"plain text secret").sign("m-1", when, body)
    headers = {**signed(body, "m-1", at=when), "webhook-signature": signature}

    assert len(handle(JENKINS, "plain text secret", headers, body)) == 1


def test_several_signatures_pass_when_one_matches() -> None:
    """Key rotation: the spec sends space-separated signatures."""
    body = json.dumps(EVENT).encode()
    headers = signed(body)
    headers["webhook-signature"] = "v1,AAAA " + headers["webhook-signature"]

    assert len(handle(JENKINS, SECRET, headers, body)) == 1


def test_a_bad_signature_or_a_tampered_body_is_401() -> None:
    body = json.dumps(EVENT).encode()
    wrong = "whsec_" + base64.b64encode(b"another secret").decode()

    assert rejected(body, signed(body, secret=wrong)).status == 401
    assert rejected(body + b" ", signed(body)).status == 401
    other_id = {**signed(body), "webhook-id": "tower-docs-43"}  # the id is signed too
    assert rejected(body, other_id).status == 401


@pytest.mark.parametrize("minutes", [-6, 6])
def test_a_timestamp_more_than_5_minutes_away_is_401(minutes: int) -> None:
    body = json.dumps(EVENT).encode()
    error = rejected(body, signed(body, at=datetime.now(UTC) + timedelta(minutes=minutes)))
    assert error.status == 401 and "5 minutes" in error.message


def test_a_timestamp_within_the_tolerance_passes() -> None:
    body = json.dumps(EVENT).encode()
    headers = signed(body, at=datetime.now(UTC) - timedelta(minutes=4))

    assert len(handle(JENKINS, SECRET, headers, body)) == 1


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_each_missing_header_is_401(name: str) -> None:
    body = json.dumps(EVENT).encode()
    headers = {k: v for k, v in signed(body).items() if k != name}
    error = rejected(body, headers)
    assert error.status == 401 and name in error.message


@pytest.mark.parametrize("timestamp", ["soon", "1e400", "\udcff"])
def test_a_malformed_timestamp_or_header_is_401(timestamp: str) -> None:
    body = json.dumps(EVENT).encode()
    assert rejected(body, {**signed(body), "webhook-timestamp": timestamp}).status == 401
    assert rejected(body, {**signed(body), "webhook-signature": timestamp}).status == 401


def test_headers_are_case_insensitive() -> None:
    body = json.dumps(EVENT).encode()
    headers = {key.upper(): value for key, value in signed(body).items()}

    assert len(handle(JENKINS, SECRET, headers, body)) == 1
    assert delivery_id(JENKINS, headers) == "tower-docs-42"


@pytest.mark.parametrize(
    "payload", [{"data": {}}, {"type": "", "data": {}}, {"type": 7}, {"type": "  "}]
)
def test_a_payload_without_a_type_is_400(payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    error = rejected(body, signed(body))
    assert error.status == 400 and '"type"' in error.message


def test_an_unmapped_type_or_a_failed_match_is_ignored() -> None:
    started = json.dumps({**EVENT, "type": "build.started"}).encode()
    other = json.dumps({**EVENT, "data": {**EVENT["data"], "job": "tower-site"}}).encode()

    assert handle(JENKINS, SECRET, signed(started), started) == []
    assert handle(JENKINS, SECRET, signed(other), other) == []


def test_form_bodies_are_refused() -> None:
    body = b"payload=" + json.dumps(EVENT).encode()
    headers = {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}
    assert rejected(body, headers).status == 400


def test_the_delivery_id_is_webhook_id() -> None:
    body = json.dumps(EVENT).encode()
    assert delivery_id(JENKINS, signed(body, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")) == (
        "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    )
    assert delivery_id(JENKINS, {"webhook-id": ""}) is None


def test_the_readme_example_maps_the_readme_sender_body(tmp_path: Path) -> None:
    """The README's standard source, on the body its sender example posts."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("kind: standard", 1)[0].rsplit("```yaml\n", 1)[1]
    block += "kind: standard" + readme.split("kind: standard", 1)[1].split("```", 1)[0]
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(block)
    [hook] = load_config(path).hooks.values()
    body = json.dumps(EVENT).encode()

    facts = handle(hook, SECRET, signed(body), body)

    assert [(f.kind, f.id, f.data) for f in facts] == [
        ("ci_build", "jenkins-tower-docs", {"result": "SUCCESS", "build": 42})
    ]


CONFIG = """\
idempotency_window_s: {window}
hooks:
  jenkins:
    kind: standard
    secret_env: JENKINS_HOOK_SECRET
    project: tower-a
    facts:
      - event: build.completed
        kind: ci_build
        id: "jenkins-{template}"
"""


def test_check_reports_bad_templates_and_a_window_shorter_than_the_tolerance(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(CONFIG.format(window=86400, template="${data.job}"))
    assert hook_problems(load_config(path)) == []

    path.write_text(CONFIG.format(window=60, template="$data.job"))
    problems = {p.path: p.message for p in hook_problems(load_config(path))}
    assert set(problems) == {"hooks.jenkins.facts[0].id", "idempotency_window_s"}
    assert "replayed webhook-id" in problems["idempotency_window_s"]

    # a timestamp 300 s ahead is accepted at once and again 600 s later: the key must last
    for window, refused in ((599, True), (600, False)):
        path.write_text(CONFIG.format(window=window, template="${data.job}"))
        paths = {p.path for p in hook_problems(load_config(path))}
        assert ("idempotency_window_s" in paths) is refused, window


def test_an_unknown_kind_is_a_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(
        textwrap.dedent(CONFIG.format(window=600, template="x")).replace(
            "kind: standard", "kind: svix"
        )
    )
    with pytest.raises(ConfigError):
        load_config(path)


def test_a_whsec_secret_that_is_not_base64_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(CONFIG.format(window=600, template="x"))
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        resolve_hook_secrets(config, {"JENKINS_HOOK_SECRET": "whsec_!!!"})
    assert "JENKINS_HOOK_SECRET" in str(caught.value) and "whsec_!!!" not in str(caught.value)
    assert resolve_hook_secrets(config, {"JENKINS_HOOK_SECRET": SECRET}) == {"jenkins": SECRET}
