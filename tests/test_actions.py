"""Outgoing requests: body shapes and Standard Webhooks signatures, verified with the spec's
own library."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gatekeeper.config import Target
from gatekeeper.delivery.requests import build_request
from gatekeeper.store.records import OutboxEntry

from .conftest import SECRET, outbox_entry


def entry(kind: str, payload: dict[str, object]) -> OutboxEntry:
    entry: OutboxEntry = outbox_entry(kind, dict(payload), rule_id="tower-a/design-release")
    return entry


RELEASE = {
    "project": "tower-a",
    "release_id": "act_0123",
    "escrow": "tower-a-escrow",
    "amount": "5000.00",
    "currency": "USD",
    "payee": "acme-architects",
}


def test_release_is_signed_and_carries_idempotency_key() -> None:
    target = Target(name="bank", url="http://127.0.0.1:1/bank", secret_env="X")
    now = datetime.now(UTC)
    request = build_request(entry("release", RELEASE), target, SECRET, now)
    assert request.method == "POST"
    assert request.headers["Idempotency-Key"] == "act_0123"
    assert request.headers["webhook-id"] == "act_0123"
    assert request.headers["webhook-timestamp"] == str(int(now.timestamp()))
    body = Webhook(SECRET).verify(request.body.decode(), dict(request.headers))
    assert body["type"] == "release"
    assert body["amount"] == "5000.00"  # a decimal string, never a float
    assert body["release_id"] == "act_0123"
    assert body["rule_id"] == "tower-a/design-release"


def test_signature_fails_with_another_secret_or_tampered_body() -> None:
    target = Target(name="bank", url="http://127.0.0.1:1/bank", secret_env="X")
    request = build_request(entry("release", RELEASE), target, SECRET, datetime.now(UTC))
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body.decode(), dict(request.headers))
    tampered = request.body.decode().replace("5000.00", "9000.00")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, dict(request.headers))


def test_notify_slack_format_is_text_only() -> None:
    target = Target(name="chat", url="http://x/", secret_env="X", format="slack")
    request = build_request(
        entry("notify", {"project": "tower-a", "message": "hello"}),
        target,
        SECRET,
        datetime.now(UTC),
    )
    assert json.loads(request.body) == {"text": "hello"}
    assert "Idempotency-Key" not in request.headers
    Webhook(SECRET).verify(request.body.decode(), dict(request.headers))


def test_pipeline_generic_webhook_body() -> None:
    target = Target(name="ci", url="http://x/", secret_env="X")
    payload = {"project": "tower-a", "ref": "main", "inputs": {"stage": "docs"}}
    request = build_request(entry("pipeline", payload), target, SECRET, datetime.now(UTC))
    body = json.loads(request.body)
    assert body["type"] == "pipeline"
    assert body["ref"] == "main"
    assert body["inputs"] == {"stage": "docs"}
    assert body["project"] == "tower-a"


def test_raw_secret_without_prefix_is_used_as_key_bytes() -> None:
    target = Target(name="ci", url="http://x/", secret_env="X")
    payload = {"project": "tower-a", "ref": "main", "inputs": {}}
    request = build_request(entry("pipeline", payload), target, "plain-secret", datetime.now(UTC))
    Webhook(b"plain-secret").verify(request.body.decode(), dict(request.headers))
