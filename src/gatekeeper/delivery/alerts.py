"""Alerts about what became of an action after it was queued, for the config's
``alert_target``: a dead letter (``dead_letter``) and a release whose settlement failed
(``settlement_failed``). Each is a notify action queued in the transaction that records
what it tells (the dead-letter transition, the failed settlement), so it reaches the alert
target once, at least once; it names the action (and the release) it is about and is filed
under the same rule, firing and instance.

The payload has the shape of the engine's blocked-firing alerts (``project``, ``message``,
``alert``, ``reason``) plus the ids (``action_id``, ``release_id``) and, for a dead letter,
the last ``error``; a failed settlement carries the provider's ``reference``. Inserted
values are escaped for a Slack-format target (``slack_escape``), never the text around
them. No alert is ever made about an alert (no loops).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.model import QueuedAction
from gatekeeper.rules.templates import slack_escape
from gatekeeper.store.records import OutboxEntry

MAX_ALERT_ERROR_CHARS = 300
"""The longest part of a dead letter's last error an alert's message repeats (the
``error`` field holds it whole)."""


def _same(text: str) -> str:
    return text


def _what(entry: OutboxEntry, escape: Callable[[str], str]) -> str:
    """``release act_1 of 5000.00 USD from escrow-a to acme`` or ``notify act_2``."""
    payload = entry.payload
    if entry.kind == "release":
        return (
            f"release {escape(entry.action_id)} of {escape(str(payload.get('amount')))} "
            f"{escape(str(payload.get('currency')))} from {escape(str(payload.get('escrow')))} "
            f"to {escape(str(payload.get('payee')))}"
        )
    return f"{escape(entry.kind)} {escape(entry.action_id)}"


def _alert(
    entry: OutboxEntry,
    alert_target: str,
    action_id: str,
    at: datetime,
    payload: dict[str, Any],
) -> QueuedAction:
    item = entry.payload.get("item")
    if isinstance(item, Mapping) and "id" in item:
        payload["item"] = {"kind": item.get("kind"), "id": item["id"]}
    return QueuedAction(
        action_id=action_id,
        kind="notify",
        target=alert_target,
        rule_id=entry.rule_id,
        firing_id=entry.firing_id,
        payload=payload,
        created_at=format_rfc3339(at),
        instance=entry.instance,
    )


def is_alert(entry: OutboxEntry) -> bool:
    """Whether ``entry`` is itself an alert (its payload has ``alert``)."""
    return "alert" in entry.payload


def dead_letter_alert(
    entry: OutboxEntry,
    *,
    attempts: int,
    reason: str,
    error: str | None,
    alert_target: str | None,
    slack: bool,
    action_id: str,
    at: datetime,
) -> QueuedAction | None:
    """The ``dead_letter`` alert about ``entry``, which became a dead letter at ``at`` after
    ``attempts`` attempts, for ``reason`` (a ``DeadReason``) with last ``error``; None when
    there is no alert target or ``entry`` is an alert itself. ``slack``: the alert target
    takes Slack-format messages. ``action_id`` is the alert's own id."""
    if alert_target is None or is_alert(entry):
        return None
    escape = slack_escape if slack else _same
    last = (error or "no answer")[:MAX_ALERT_ERROR_CHARS]
    message = (
        f"gatekeeper gave up on {_what(entry, escape)} to {escape(entry.target)} (rule "
        f"{escape(entry.rule_id)}, firing {escape(entry.firing_id)}) after {attempts} "
        f"attempt(s): {reason}; last error: {escape(last)}"
    )
    payload: dict[str, Any] = {
        "project": str(entry.payload.get("project", "")),
        "message": message,
        "alert": "dead_letter",
        "reason": reason,
        "action_id": entry.action_id,
        "error": error,
    }
    if entry.kind == "release":
        payload["release_id"] = entry.action_id
    return _alert(entry, alert_target, action_id, at, payload)


def settlement_failed_alert(
    release: OutboxEntry,
    *,
    reference: str,
    reason: str | None,
    alert_target: str | None,
    slack: bool,
    action_id: str,
    at: datetime,
) -> QueuedAction | None:
    """The ``settlement_failed`` alert about ``release`` (its outbox entry): the bank's
    callback said it failed, with ``reference`` and ``reason``, and its amount went back to
    its escrow. None when there is no alert target. ``slack`` and ``action_id`` as for
    ``dead_letter_alert``."""
    if alert_target is None:
        return None
    escape = slack_escape if slack else _same
    why = f": {escape(reason)}" if reason else ""
    message = (
        f"the settlement of {_what(release, escape)} failed at {escape(release.target)} "
        f"(reference {escape(reference)}){why}; the amount is back in escrow "
        f"{escape(str(release.payload.get('escrow')))}"
    )
    payload = _settlement_payload(release, "settlement_failed", message, reference)
    if reason:
        payload["reason"] = reason
    return _alert(release, alert_target, action_id, at, payload)


def settled_after_cancel_alert(
    release: OutboxEntry,
    *,
    reference: str,
    alert_target: str | None,
    slack: bool,
    action_id: str,
    at: datetime,
) -> QueuedAction | None:
    """The ``settled_after_cancel`` alert about ``release`` (its outbox entry, cancelled):
    the bank's callback says it settled it anyway (an attempt it processed before the
    cancel), with ``reference``; its amount was taken back out of its escrow. None when
    there is no alert target. ``slack`` and ``action_id`` as for ``dead_letter_alert``."""
    if alert_target is None:
        return None
    escape = slack_escape if slack else _same
    message = (
        f"{_what(release, escape)} was cancelled, but {escape(release.target)} settled it "
        f"(reference {escape(reference)}): the money moved; its amount is taken back out of "
        f"escrow {escape(str(release.payload.get('escrow')))}"
    )
    payload = _settlement_payload(release, "settled_after_cancel", message, reference)
    return _alert(release, alert_target, action_id, at, payload)


def _settlement_payload(
    release: OutboxEntry, alert: str, message: str, reference: str
) -> dict[str, Any]:
    """The payload of alert ``alert`` about a settlement of ``release`` (by ``reference``)."""
    return {
        "project": str(release.payload.get("project", "")),
        "message": message,
        "alert": alert,
        "release_id": release.action_id,
        "reference": reference,
    }
