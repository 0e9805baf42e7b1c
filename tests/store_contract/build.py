"""Transitions built by hand for the contract tests: exactly the rows a test needs, with
known times, ids and projects (no engine in between)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.ledger import LedgerEntry
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    Decision,
    FactInput,
    IdempotencyRecord,
    QueuedAction,
    RuleState,
    Transition,
)
from gatekeeper.expr import Evaluation
from gatekeeper.rules.model import Ruleset

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """``seconds`` after ``T0``."""
    return T0 + timedelta(seconds=seconds)


def iso(seconds: float) -> str:
    """``at(seconds)`` as the engine's records write times (RFC 3339)."""
    return format_rfc3339(at(seconds))


def facts(when: datetime, *items: tuple[str, str, str, dict[str, Any]], **extra: Any) -> Transition:
    """A transition that only appends facts ``(project, kind, id, data)``, planned at
    ``when``."""
    return Transition(
        facts=[FactInput(p, k, i, d) for p, k, i, d in items], planned_at=when, **extra
    )


def decision(
    rule_id: str,
    when: datetime,
    *,
    project: str = "tower-a",
    outcome: str = "fired",
    firing: int | None = 1,
    fact_index: int | None = None,
    reason: str | None = None,
) -> Decision:
    return Decision(
        rule_id=rule_id,
        rule_hash="h-" + rule_id,
        ruleset_version="v1",
        git_commit="abc123",
        trigger="fact",
        outcome=outcome,  # type: ignore[arg-type]
        gate_open=True,
        evaluation=Evaluation(True, (), seen={"task.T-1": {"done": True}}),
        decided_at=format_rfc3339(when),
        fact_index=fact_index,
        firing_id=f"{rule_id}#{firing}" if firing is not None else None,
        approvals={"required": 1} if outcome == "fired" else None,
        reason=reason,
        project=project,
    )


def firing(
    rule_id: str,
    n: int,
    when: datetime,
    *,
    project: str = "tower-a",
    target: str = "ci",
    kind: str = "pipeline",
    release: tuple[str, str] | None = None,
    request_id: str | None = None,
    with_fact: bool = True,
) -> Transition:
    """A fact (when ``with_fact``) that fires ``rule_id`` (its ``n``th firing), queuing one
    action ``act-<rule_id>-<n>`` to ``target``; a release ``(escrow, amount)`` also gets
    its ledger entry."""
    firing_id = f"{rule_id}#{n}"
    action_id = f"act-{rule_id.replace('/', '-')}-{n}"
    payload: dict[str, Any] = {"project": project, "rule_id": rule_id, "n": n}
    ledger = []
    if release is not None:
        kind = "release"
        escrow, amount = release
        payload |= {"release_id": action_id, "escrow": escrow, "amount": amount}
        ledger.append(
            LedgerEntry(
                action_id, escrow, amount, "USD", "acme", rule_id, firing_id, format_rfc3339(when)
            )
        )
    return Transition(
        facts=[FactInput(project, "task", f"{rule_id}-{n}", {"n": n})] if with_fact else [],
        decisions=[
            decision(rule_id, when, project=project, firing=n, fact_index=0 if with_fact else None)
        ],
        rule_states={
            (rule_id, ""): RuleState(rule_id, True, n, format_rfc3339(when), "h-" + rule_id)
        },
        actions=[
            QueuedAction(action_id, kind, target, rule_id, firing_id, payload, format_rfc3339(when))
        ],
        ledger=ledger,
        request_id=request_id,
        planned_at=when,
    )


def action_id(rule_id: str, n: int) -> str:
    return f"act-{rule_id.replace('/', '-')}-{n}"


def approval(
    rule_id: str, subject: str, choice: str, when: datetime, *, project: str = "tower-a"
) -> Transition:
    return Transition(
        approvals=[ApprovalInput(rule_id, project, subject, choice, f"{subject} says {choice}")],  # type: ignore[arg-type]
        planned_at=when,
    )


def admin_act(act: str, rule_id: str, when: datetime, *, project: str = "tower-a") -> Transition:
    return Transition(
        admin_acts=[AdminAct(act, rule_id, "ops", "because", project)],  # type: ignore[arg-type]
        planned_at=when,
    )


def ruleset(version: str, when: datetime, files: dict[str, str] | None = None) -> Transition:
    return Transition(
        ruleset=Ruleset((), files or {"b.yaml": "[]\n", "a.yaml": "[]\n"}, version, "c0ffee"),
        planned_at=when,
    )


def idempotent(
    key: str, when: datetime, *items: tuple[str, str, str, dict[str, Any]]
) -> Transition:
    return facts(when, *items, idempotency=IdempotencyRecord(key, "hash-" + key))
