"""Turning a queued action into the signed HTTP request its target expects.

Every request is a JSON POST signed per the Standard Webhooks spec
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
``firing_id`` and ``fired_at``. Amounts stay decimal strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from gatekeeper import __version__
from gatekeeper.config import Target
from gatekeeper.store import OutboxEntry

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
        "fired_at": entry.created_at,
        **dict(entry.payload),
    }


def build_request(
    entry: OutboxEntry, target: Target, secret: str, now: datetime
) -> OutgoingRequest:
    """Build the signed POST for ``entry``.

    ``secret`` is the target's Standard Webhooks secret (``whsec_<base64>``, or any other
    string, which is then used as raw key bytes). ``now`` becomes ``webhook-timestamp``.
    """
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
