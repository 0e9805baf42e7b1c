"""State snapshots for ``gatekeeper plan``: what a deployment knows (facts, rule states,
approvals, the deployed ruleset's hashes, escrow totals), read from a file that
``gatekeeper export`` wrote or fetched from a running daemon (``GET /v1/export``, every
page), and checked against ``SNAPSHOT_SCHEMA``.

Snapshot file (JSON)::

    {
      "facts": [{"project", "kind", "id", "data", ...}],         # as GET /v1/facts answers
      "rule_states": [{"rule_id", "fired_count", "gate_open",
                       "rearms"?, "paused"?, "last_fired_at"?,
                       "blocked"?, "blocks"?}],                 # which rules fired
      "approvals": {rule_id: {subject: "approve" | "reject"}},  # standing decisions
      "ruleset": {"version", "rules": {rule_id: content_hash}},   # what is deployed
      "escrows": [{"escrow", "released", "pending", "unconfirmed", ...}], # GET /v1/escrows
      "signoffs": {content_hash: [{"actor", "at", "comment"}]},    # money rules signed off
      "shadowed_releases": [{"rule_id", "rule_hash", "escrow", "currency", "count",
                             "amount", "first_release_id"}]        # what shadow firings held
    }

Only ``facts`` is required, so a plain ``GET /v1/facts`` body is a snapshot too; what it does
not say is reported as unknown (no ``rule_states``: every ``once`` rule is taken as never
fired; no ``ruleset``: every rule is evaluated as if new; no ``escrows``: nothing is taken as
committed). ``--from URL`` builds the same snapshot from ``GET /v1/facts``, ``GET /v1/rules``,
``GET /v1/rules/{id}`` (paused, re-arms and approvals of the rules the plan evaluates) and
``GET /v1/escrows``, sending ``Authorization: Bearer $GATEKEEPER_TOKEN`` when it is set.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped, unused-ignore]

from gatekeeper.cli.client import call, call_pages
from gatekeeper.cli.output import display_path
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.model import InstanceKey, RuleState, SignOff, Stand
from gatekeeper.engine.signoffs import SignedOff
from gatekeeper.jsonwire import json_path
from gatekeeper.store.records import ShadowedReleases

SNAPSHOT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "gatekeeper state snapshot",
    "type": "object",
    "additionalProperties": False,
    "required": ["facts"],
    "properties": {
        "taken_at": {"type": "string", "description": "When the snapshot was taken."},
        "source": {"type": "string", "description": "Where it was taken from."},
        "next_cursor": {
            "type": "null",
            "description": "null or absent: a page of GET /v1/facts or /v1/export with a "
            "next_cursor is not a whole snapshot (gatekeeper export follows the pages).",
        },
        "facts": {
            "type": "array",
            "description": "Current facts, as GET /v1/facts answers (extra keys ignored).",
            "items": {
                "type": "object",
                "required": ["project", "kind", "id", "data"],
                "properties": {
                    "project": {"type": "string", "minLength": 1},
                    "kind": {"type": "string", "minLength": 1},
                    "id": {"type": "string", "minLength": 1},
                    "data": {"type": "object"},
                },
            },
        },
        "rule_states": {
            "type": "array",
            "description": "What the deployment remembers of each rule.",
            "items": {
                "type": "object",
                "required": ["rule_id"],
                "properties": {
                    "rule_id": {"type": "string", "minLength": 1},
                    "instance": {
                        "type": "string",
                        "description": "The item id of an instance of a per-item rule.",
                    },
                    "fired_count": {"type": "integer", "minimum": 0},
                    "gate_open": {"type": ["boolean", "null"]},
                    "rearms": {"type": "integer", "minimum": 0},
                    "paused": {"type": "boolean"},
                    "last_fired_at": {"type": ["string", "null"]},
                    "blocked": {
                        "type": "string",
                        "description": "Why its last firing's release was refused (it has "
                        "not fired; it waits).",
                    },
                    "blocks": {"type": "integer", "minimum": 0},
                },
            },
        },
        "approvals": {
            "type": "object",
            "description": "rule id -> approver -> standing decision.",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {"enum": ["approve", "reject"]},
            },
        },
        "ruleset": {
            "type": ["object", "null"],
            "description": "The deployed ruleset: its version and each rule's content hash.",
            "properties": {
                "version": {"type": ["string", "null"]},
                "rules": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "signoffs": {
            "type": "object",
            "description": "content hash -> the admins who signed off that money rule.",
            "additionalProperties": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["actor"],
                    "properties": {
                        "actor": {"type": "string", "minLength": 1},
                        "at": {"type": ["string", "null"]},
                        "comment": {"type": ["string", "null"]},
                    },
                },
            },
        },
        "shadowed_releases": {
            "type": "array",
            "description": "What shadowed firings would have released, per rule version.",
            "items": {
                "type": "object",
                "required": ["rule_id", "rule_hash", "escrow", "currency", "count", "amount"],
                "properties": {
                    "rule_id": {"type": "string"},
                    "rule_hash": {"type": "string"},
                    "escrow": {"type": "string"},
                    "currency": {"type": "string"},
                    "count": {"type": "integer", "minimum": 1},
                    "amount": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"},
                    "first_release_id": {"type": "string"},
                },
            },
        },
        "escrows": {
            "type": "array",
            "description": "Per escrow, as GET /v1/escrows answers (decimal strings).",
            "items": {
                "type": "object",
                "required": ["escrow"],
                "properties": {
                    "escrow": {"type": "string"},
                    "released": {"type": ["string", "null"]},
                    "pending": {"type": ["string", "null"]},
                    "unconfirmed": {"type": ["string", "null"]},
                },
            },
        },
    },
}


class SnapshotError(Exception):
    """A snapshot that cannot be used; ``problems`` lists each thing wrong, with its JSON path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


@dataclass
class Snapshot:
    """The state of a deployment, as far as it is known.

    ``deployed`` maps each deployed rule id to its content hash (None: unknown). ``committed``
    is what each escrow has committed so far (released, pending and unconfirmed). ``notes``
    say what the snapshot did not tell.
    """

    source: str
    facts: FactTable
    states: dict[InstanceKey, RuleState]
    approvals: dict[str, dict[str, Stand]]
    """Standing decisions; a snapshot does not say when they were given, so none lapses."""
    deployed: dict[str, str] | None
    deployed_version: str | None
    committed: dict[str, Decimal]
    notes: list[str] = field(default_factory=list)
    fact_count: int = 0
    signed: SignedOff = field(default_factory=dict)
    """The sign-offs of money rules, by content hash (``money_rule_approvals``)."""
    shadowed: list[ShadowedReleases] = field(default_factory=list)
    """What shadowed firings would have released, per rule version, escrow and currency."""


def load_snapshot(path: Path) -> Snapshot:
    """Read a snapshot file (see the module docstring). Raises ``SnapshotError``."""
    source = display_path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise SnapshotError(source, [f"cannot read the file: {error.strerror or error}"]) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise SnapshotError(source, [f"not JSON: {error}"]) from None
    return snapshot_from_json(data, source)


def snapshot_from_json(data: Any, source: str) -> Snapshot:
    """Build a ``Snapshot`` from its JSON form. Raises ``SnapshotError`` listing every problem
    (each with its JSON path, e.g. ``$.facts[1].kind``)."""
    validator = Draft202012Validator(SNAPSHOT_SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise SnapshotError(source, [f"{json_path(e.absolute_path)}: {e.message}" for e in errors])
    facts = FactTable()
    for item in data["facts"]:
        facts.put((item["project"], item["kind"], item["id"]), item["data"])
    ruleset = data.get("ruleset") or None
    deployed = dict(ruleset["rules"]) if ruleset and "rules" in ruleset else None
    notes: list[str] = []
    states = {
        (item["rule_id"], item.get("instance", "")): RuleState(
            rule_id=item["rule_id"],
            gate_open=item.get("gate_open"),
            fired_count=item.get("fired_count", 0),
            last_fired_at=item.get("last_fired_at"),
            rule_hash=(deployed or {}).get(item["rule_id"]),
            paused=item.get("paused", False),
            rearms=item.get("rearms", 0),
            instance=item.get("instance", ""),
            blocked=item.get("blocked"),
            blocks=item.get("blocks", 0),
        )
        for item in data.get("rule_states", [])
    }
    if "rule_states" not in data:
        notes.append(
            "the snapshot holds no rule states (a plain GET /v1/facts body?): which once rules "
            "already fired is unknown, so every rule is taken as never fired"
        )
    if deployed is None:
        notes.append(
            "the snapshot does not say which ruleset is deployed: every rule is evaluated "
            "as if new, and added, removed and changed rules cannot be listed"
        )
    if "escrows" not in data:
        notes.append(
            "the snapshot holds no escrow totals: nothing is taken as already committed "
            "against the escrow limits"
        )
    return Snapshot(
        source=source,
        facts=facts,
        states=states,
        approvals={
            rule: {subject: Stand(decision) for subject, decision in standing.items()}
            for rule, standing in data.get("approvals", {}).items()
        },
        deployed=deployed,
        deployed_version=ruleset.get("version") if ruleset else None,
        committed=_committed(data.get("escrows", []), source),
        notes=notes,
        fact_count=len(data["facts"]),
        signed={
            content_hash: {
                s["actor"]: SignOff(content_hash, "", s["actor"], s.get("comment"))
                for s in signoffs
            }
            for content_hash, signoffs in data.get("signoffs", {}).items()
        },
        shadowed=[
            ShadowedReleases(
                s["rule_id"],
                s["rule_hash"],
                s["escrow"],
                s["currency"],
                s["count"],
                Decimal(s["amount"]),
                s.get("first_release_id", ""),
            )
            for s in data.get("shadowed_releases", [])
        ],
    )


def _committed(escrows: Iterable[Mapping[str, Any]], source: str) -> dict[str, Decimal]:
    """Per escrow, the amount committed: released + pending + unconfirmed (dead) releases."""
    committed: dict[str, Decimal] = {}
    problems = []
    for index, item in enumerate(escrows):
        total = Decimal(0)
        for key in ("released", "pending", "unconfirmed"):
            text = item.get(key)
            if text is None:
                continue
            try:
                total += Decimal(text)
            except InvalidOperation:
                problems.append(f"$.escrows[{index}].{key}: {text!r} is not a decimal amount")
        committed[item["escrow"]] = total
    if problems:
        raise SnapshotError(source, problems)
    return committed


def _add_instances(
    export: Mapping[str, Any],
    rules: Iterable[Mapping[str, Any]],
    states: dict[str, dict[str, Any]],
    approvals: dict[str, dict[str, str]],
) -> None:
    """Add the instance states and standing approvals of the per-item rules of ``rules``
    from the first page of ``GET /v1/export`` (``states`` keyed ``<rule>[<item>]``; the
    state of such a rule as a whole, which holds its pause, keyed by the rule id)."""
    per_item = {rule["id"] for rule in rules if "for_each" in rule}
    for row in export.get("rule_states", []):
        if row["rule_id"] in per_item and row.get("instance"):
            states[f"{row['rule_id']}[{row['instance']}]"] = dict(row)
        elif row["rule_id"] in per_item:
            states[row["rule_id"]] = dict(row)
    for key, standing in export.get("approvals", {}).items():
        if key.split("[", 1)[0] in per_item and "[" in key:
            approvals[key] = dict(standing)


def fetch_snapshot(url: str, detail: Callable[[Mapping[str, str]], Iterable[str]]) -> Snapshot:
    """Build a snapshot from the running daemon at ``url`` (``GET /v1/facts``, ``/v1/rules``,
    ``/v1/escrows``, and ``/v1/rules/{id}`` for each rule id ``detail`` picks from the deployed
    ``{rule id: content hash}``: those get their paused state, re-arms and approvals).

    Raises ``ClientError`` when the daemon cannot be reached or refuses, ``SnapshotError``
    when it answers something unexpected.
    """
    facts = call_pages(f"{url}/v1/facts", "facts")
    rules = call(f"{url}/v1/rules")
    escrows = call(f"{url}/v1/escrows")
    try:
        hashes = {rule["id"]: rule["content_hash"] for rule in rules["rules"]}
        states: dict[str, dict[str, Any]] = {
            rule["id"]: {
                "rule_id": rule["id"],
                "fired_count": rule["fired_count"],
                "gate_open": rule["gate_open"],
                "last_fired_at": rule.get("last_fired_at"),
                **({"blocked": rule["blocked"]} if rule.get("blocked") is not None else {}),
                **({"blocks": rule["blocks"]} if rule.get("blocks") else {}),
            }
            for rule in rules["rules"]
            if "for_each" not in rule  # a per-item rule's states are its instances'
        }
        approvals: dict[str, dict[str, str]] = {}
        if any("for_each" in rule for rule in rules["rules"]):
            _add_instances(call(f"{url}/v1/export?limit=1"), rules["rules"], states, approvals)
        for rule_id in (r for r in detail(hashes) if r in states):
            view = call(f"{url}/v1/rules/{urllib.parse.quote(rule_id, safe='/')}")
            explanation = view["explanation"]
            states[rule_id]["paused"] = bool(explanation.get("paused", False))
            states[rule_id]["rearms"] = int(explanation.get("rearms", 0))
            standing = explanation.get("approvals") or {}
            approvals[rule_id] = {
                **{subject: "approve" for subject in standing.get("approved_by", [])},
                **{subject: "reject" for subject in standing.get("rejected_by", [])},
            }
        ruleset = rules.get("ruleset") or {}
        data = {
            "facts": facts["facts"],
            "rule_states": list(states.values()),
            "approvals": approvals,
            "ruleset": {"version": ruleset.get("version"), "rules": hashes},
            "escrows": escrows["escrows"],
            "signoffs": {
                rule["signoff"]["content_hash"]: rule["signoff"]["signed_by"]
                for rule in rules["rules"]
                if rule.get("signoff")
            },
            "shadowed_releases": [
                {"rule_id": rule["id"], "rule_hash": rule["content_hash"], **shadowed}
                for rule in rules["rules"]
                for shadowed in rule.get("shadowed_releases", [])
            ],
        }
    except (KeyError, TypeError, ValueError) as error:
        raise SnapshotError(url, [f"unexpected answer from the daemon: {error!r}"]) from None
    return snapshot_from_json(data, url)
