"""``gatekeeper plan`` and ``gatekeeper explain``: what a ruleset would do, and why, against
the current state of a deployment, without touching it.

``plan`` is the terraform-plan of rules. Given a candidate ruleset (a pull request's) and the
state of a deployment (a snapshot file, or a running daemon with ``--from URL``), it lists the
rules added, removed and changed (by content hash) and every rule that would fire the moment
the ruleset is deployed, with its rendered actions and the total released per escrow. It
evaluates exactly what the daemon evaluates on a reload: the rules that are new or whose
content hash changed (``Engine.plan_rules(..., trigger="reload")``), with the deployment's
firing counts (so a ``once`` rule that already fired stays quiet), standing approvals and the
amounts already committed against each escrow. ``--fail-on release`` exits 1 when a release
would be sent, ``--fail-on any`` when anything would fire, so CI can stop a pull request that
would move money on merge.

``explain RULE`` shows one rule's explanation against the same kind of state: each
sub-condition with its value, the facts that are missing, the approvals counted, whether the
rule is paused or already fired, and for time conditions (``days_since(...) >= 7``) when they
change and how long is left.

The state is a snapshot (``gatekeeper.cli.snapshot``: a file or a running daemon).

Nothing here writes anywhere but the output stream: the engine is pure and the daemon is only
read. Exit codes: 0 done (nothing tripped ``--fail-on``), 1 ``--fail-on`` tripped, 2 usage
error (bad arguments, config, snapshot or ruleset, or the daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from gatekeeper.cli.client import ClientError, base_url, call
from gatekeeper.cli.output import (
    display_path,
    format_problems,
    github_commands,
    plural,
    workflow_command,
)
from gatekeeper.cli.snapshot import Snapshot, SnapshotError, fetch_snapshot, load_snapshot
from gatekeeper.clock import SystemClock, format_rfc3339, parse_rfc3339
from gatekeeper.config import Config, ConfigError, find_default_config, load_config
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import Decision, QueuedAction, RuleState
from gatekeeper.engine.signoffs import signoff_status
from gatekeeper.expr import TIME_RECHECK, ExpressionError, compile_condition, next_change_at
from gatekeeper.rules.loader import LoadResult, load_rule_texts, load_rules_dir
from gatekeeper.rules.model import Rule, Ruleset

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PlanFormat = Literal["text", "json", "github"]
FailOn = Literal["never", "release", "any"]
GITHUB_TITLE = "gatekeeper plan"

# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class PlannedFiring:
    """A rule that would fire (or be blocked) on deploy, with the actions it would queue."""

    rule: Rule
    decision: Decision
    actions: tuple[QueuedAction, ...]

    @property
    def blocked(self) -> bool:
        return self.decision.outcome == "blocked"

    @property
    def shadowed(self) -> bool:
        """It would fire in shadow (``mode: shadow``, or a money rule awaiting sign-off):
        nothing of it would be sent."""
        return self.decision.outcome == "shadowed"


@dataclass(frozen=True)
class EscrowTotal:
    """What the planned firings would release from one escrow."""

    escrow: str
    currency: str
    amount: Decimal
    limit: Decimal | None
    remaining_after: Decimal | None


@dataclass
class Plan:
    """What deploying ``ruleset`` on top of a snapshot would do, at ``at``.

    ``added``, ``removed``, ``changed`` and ``unchanged`` are empty when the snapshot does not
    say what is deployed (``deployment_known`` False); then every rule is ``evaluated``.
    """

    ruleset: Ruleset
    rules_dir: Path
    snapshot: Snapshot
    at: datetime
    added: list[Rule]
    removed: list[str]
    changed: list[Rule]
    unchanged: list[Rule]
    evaluated: list[Rule]
    decisions: list[Decision]
    firings: list[PlannedFiring]
    releases: list[EscrowTotal]
    item: str | None = None
    """``--item``: list only this instance of each per-item rule (the totals, the summary
    and ``--fail-on`` still count every firing)."""
    awaiting_signoff: list[dict[str, Any]] = field(default_factory=list)
    """The money rules of the ruleset that would await sign-off (``money_rule_approvals``):
    ``signoff_status`` with the rule id and what their shadowed firings of the same content
    hash would have released so far (``shadowed_releases``, from the snapshot)."""
    waiting: list[RuleState] = field(default_factory=list)
    """The instances of rules not evaluated (unchanged) whose release is blocked in the
    deployment (``RuleState.blocked``): they stay blocked on deploy."""

    def shows_state(self, state: RuleState) -> bool:
        """``shows`` for an instance's state."""
        return self.item is None or not state.instance or state.instance == self.item

    def shows(self, decision: Decision) -> bool:
        """Whether the plan's listing shows ``decision`` (``item`` narrows the instances of
        per-item rules; a rule without ``for_each`` is always shown)."""
        return self.item is None or not decision.item_kind or decision.instance == self.item

    @property
    def deployment_known(self) -> bool:
        """True when the snapshot says which rules (and which texts) are deployed."""
        return self.snapshot.deployed is not None

    @property
    def sends_release(self) -> bool:
        """True when some firing would send a release (blocked and shadowed ones send
        none)."""
        return any(a.kind == "release" and not a.shadowed for f in self.firings for a in f.actions)

    def trips(self, fail_on: FailOn) -> bool:
        """Whether ``--fail-on fail_on`` makes the plan fail (a firing in shadow, which
        sends nothing, never does)."""
        if fail_on == "release":
            return self.sends_release
        return fail_on == "any" and any(not f.shadowed for f in self.firings)


def plan_deploy(
    ruleset: Ruleset, rules_dir: Path, snapshot: Snapshot, config: Config, now: datetime
) -> Plan:
    """Plan deploying ``ruleset`` on top of ``snapshot`` at ``now``: evaluate, as the daemon does
    on a reload, every rule that is new or whose content hash changed."""
    engine = Engine.for_config(ruleset, config, signed=snapshot.signed)
    deployed = snapshot.deployed
    added: list[Rule] = []
    changed: list[Rule] = []
    unchanged: list[Rule] = []
    removed: list[str] = []
    if deployed is None:
        evaluated = list(ruleset.rules)  # nothing is known to be deployed: all may be new
    else:
        added = [r for r in ruleset.rules if r.id not in deployed]
        changed = [
            r for r in ruleset.rules if r.id in deployed and deployed[r.id] != r.content_hash
        ]
        unchanged = [r for r in ruleset.rules if deployed.get(r.id) == r.content_hash]
        removed = sorted(set(deployed) - set(engine.rules))
        evaluated = [r for r in ruleset.rules if deployed.get(r.id) != r.content_hash]
    book = EscrowBook(config.escrows, dict(snapshot.committed))
    transition = engine.plan_rules(
        snapshot.facts,
        snapshot.states,
        evaluated,
        now,
        "reload",
        book=book,
        approvals=snapshot.approvals,
    )
    firings = [
        PlannedFiring(
            engine.rules[d.rule_id],
            d,
            tuple(a for a in transition.actions if a.firing_id == d.firing_id),
        )
        for d in transition.fired
    ]
    return Plan(
        ruleset=ruleset,
        rules_dir=rules_dir,
        snapshot=snapshot,
        at=now,
        added=added,
        removed=removed,
        changed=changed,
        unchanged=unchanged,
        evaluated=evaluated,
        decisions=transition.decisions,
        firings=firings,
        releases=_release_totals(transition.ledger, book),
        awaiting_signoff=_awaiting_signoff(engine, snapshot),
        waiting=_waiting(snapshot, engine, evaluated),
    )


def _waiting(snapshot: Snapshot, engine: Engine, evaluated: Iterable[Rule]) -> list[RuleState]:
    """The blocked instances (``RuleState.blocked``) of the live rules not ``evaluated``, by
    rule id and item."""
    skip = {rule.id for rule in evaluated}
    return sorted(
        (
            state
            for state in snapshot.states.values()
            if state.blocked is not None and state.rule_id in engine.rules
            if state.rule_id not in skip
        ),
        key=lambda state: (state.rule_id, state.instance),
    )


def _awaiting_signoff(engine: Engine, snapshot: Snapshot) -> list[dict[str, Any]]:
    """The money rules of ``engine``'s ruleset that await sign-off, each with its sign-off
    status and what its shadowed firings of that content hash would have released."""
    awaiting = []
    for rule in engine.ruleset.rules:
        status = signoff_status(rule, engine.signoffs)
        if status is None or not status["missing"] or rule.mode == "shadow":
            continue
        shadowed = [
            s.to_json()
            for s in snapshot.shadowed
            if (s.rule_id, s.rule_hash) == (rule.id, rule.content_hash)
        ]
        awaiting.append({"id": rule.id, **status, "shadowed_releases": shadowed})
    return awaiting


def _release_totals(ledger: Iterable[Any], book: EscrowBook) -> list[EscrowTotal]:
    amounts: dict[tuple[str, str], Decimal] = {}
    for entry in ledger:
        key = (entry.escrow, entry.currency)
        amounts[key] = amounts.get(key, Decimal(0)) + Decimal(entry.amount)
    totals = []
    for (escrow, currency), amount in sorted(amounts.items()):
        account = book.escrows.get(escrow)
        totals.append(
            EscrowTotal(
                escrow,
                currency,
                amount,
                account.limit if account else None,
                book.remaining(escrow),
            )
        )
    return totals


# ---------------------------------------------------------------------------------------------
# Plan reports


def plan_report(plan: Plan, fail_on: FailOn) -> dict[str, Any]:
    """The JSON report of a plan."""
    return {
        "at": format_rfc3339(plan.at),
        "ruleset": {
            "version": plan.ruleset.version,
            "rules_dir": display_path(plan.rules_dir),
            "rules": len(plan.ruleset.rules),
        },
        "snapshot": {
            "source": plan.snapshot.source,
            "deployed_version": plan.snapshot.deployed_version,
            "facts": plan.snapshot.fact_count,
        },
        **_changes_report(plan),
        "evaluated": [r.id for r in plan.evaluated],
        "fires": [
            {
                **_rule_ref(plan, f.rule),
                **({"item": f.decision.instance} if f.decision.instance else {}),
                "fire": f.rule.fire,
                "mode": f.decision.mode,
                "outcome": f.decision.outcome,
                "firing_id": f.decision.firing_id,
                "reason": f.decision.reason,
                "actions": [
                    {"kind": a.kind, "target": a.target, "payload": dict(a.payload)}
                    for a in f.actions
                ],
            }
            for f in plan.firings
            if plan.shows(f.decision)
        ],
        "not_firing": [
            {
                "id": d.rule_id,
                **({"item": d.instance} if d.instance else {}),
                "outcome": d.outcome,
                "why": _why_not(plan, d),
            }
            for d in plan.decisions
            if d.firing_id is None and plan.shows(d)
        ],
        "blocked": [
            {
                "id": state.rule_id,
                **({"item": state.instance} if state.instance else {}),
                "reason": state.blocked,
            }
            for state in plan.waiting
            if plan.shows_state(state)
        ],
        "releases": [
            {
                "escrow": t.escrow,
                "currency": t.currency,
                "amount": str(t.amount),
                "limit": None if t.limit is None else str(t.limit),
                "remaining_after": None if t.remaining_after is None else str(t.remaining_after),
            }
            for t in plan.releases
        ],
        "awaiting_signoff": plan.awaiting_signoff,
        "notes": plan.snapshot.notes,
        "item": plan.item,
        "fail_on": fail_on,
        "failed": plan.trips(fail_on),
    }


def _changes_report(plan: Plan) -> dict[str, Any]:
    """Added, removed, changed and unchanged rules; None each when the deployment is unknown."""
    if not plan.deployment_known:
        return dict.fromkeys(("added", "removed", "changed", "unchanged"))
    return {
        "added": [_rule_ref(plan, r) for r in plan.added],
        "removed": plan.removed,
        "changed": [_rule_ref(plan, r) for r in plan.changed],
        "unchanged": len(plan.unchanged),
    }


def plan_text(plan: Plan, fail_on: FailOn) -> list[str]:
    """The plan as lines of text for a terminal or a CI log."""
    snapshot = plan.snapshot
    deployed = f" (deployed {snapshot.deployed_version[:12]})" if snapshot.deployed_version else ""
    lines = [
        f"Plan: ruleset {plan.ruleset.version[:12]} from {display_path(plan.rules_dir)} "
        f"against {snapshot.source}{deployed}, at {format_rfc3339(plan.at)}",
        *(f"note: {note}" for note in snapshot.notes),
        "",
    ]
    if plan.deployment_known:
        lines.append(
            f"Rules: {len(plan.added)} added, {len(plan.removed)} removed, "
            f"{len(plan.changed)} changed, {len(plan.unchanged)} unchanged"
        )
        lines += [f"  + {r.id}  ({_location(plan, r)})" for r in plan.added]
        lines += [f"  ~ {r.id}  ({_location(plan, r)})" for r in plan.changed]
        lines += [f"  - {rule_id}" for rule_id in plan.removed]
        lines.append("")
    if plan.item is not None:
        lines.append(f"Instances of per-item rules: only item {plan.item!r} (--item)")
    shown = [f for f in plan.firings if plan.shows(f.decision)]
    fired = [f for f in shown if not f.blocked and not f.shadowed]
    blocked = [f for f in shown if f.blocked]
    shadowed = [f for f in shown if f.shadowed]
    lines.append(f"Would fire on deploy: {plural(len(fired), 'rule')}")
    for firing in fired:
        name = decision_name(firing.decision)
        lines.append(f"  {name}  ({firing.rule.fire}, {_location(plan, firing.rule)})")
        lines += [f"    {describe_action(a)}" for a in firing.actions]
    if shadowed:
        lines.append(
            f"Would fire in shadow on deploy (nothing sent): {plural(len(shadowed), 'rule')}"
        )
        for firing in shadowed:
            name = decision_name(firing.decision)
            lines.append(f"  {name}  ({firing.decision.mode}, {_location(plan, firing.rule)})")
            lines += [f"    {describe_action(a)}" for a in firing.actions]
    if blocked:
        lines.append(f"Would be blocked on deploy: {plural(len(blocked), 'rule')}")
        for firing in blocked:
            lines.append(f"  {decision_name(firing.decision)}  ({_location(plan, firing.rule)})")
            lines.append(f"    blocked: {firing.decision.reason}")
            lines += [f"    {describe_action(a)}" for a in firing.actions]
    if plan.awaiting_signoff:
        lines.append(f"Money rules awaiting sign-off: {plural(len(plan.awaiting_signoff), 'rule')}")
        lines += [f"  {line}" for rule in plan.awaiting_signoff for line in _awaiting_lines(rule)]
    quiet = [d for d in plan.decisions if d.firing_id is None and plan.shows(d)]
    if quiet:
        lines.append(f"Evaluated, would not fire: {plural(len(quiet), 'rule')}")
        lines += [f"  {decision_name(d)}: {_why_not(plan, d)}" for d in quiet]
    waiting = [state for state in plan.waiting if plan.shows_state(state)]
    if waiting:
        lines.append(f"Blocked in the deployment, unchanged: {plural(len(waiting), 'rule')}")
        lines += [f"  {_state_name(state)}: blocked: {state.blocked}" for state in waiting]
    if plan.releases:
        lines.append("Releases by escrow:")
        for total in plan.releases:
            left = (
                f" (remaining after: {total.remaining_after} of {total.limit})"
                if total.limit is not None
                else ""
            )
            lines.append(f"  {total.escrow}: {total.amount} {total.currency}{left}")
    lines.append(plan_summary(plan, fail_on))
    return lines


def _awaiting_lines(rule: Mapping[str, Any]) -> list[str]:
    """A money rule awaiting sign-off in the plan's text: who signed, how many more are
    needed, and what its shadowed firings would have released so far."""
    signed = ", ".join(s["actor"] for s in rule["signed_by"]) or "nobody"
    lines = [
        f"{rule['id']}  (content hash {rule['content_hash'][:12]}): signed off by {signed}; "
        f"{rule['missing']} more of {rule['required']} needed "
        f"(gatekeeper rules signoff {rule['content_hash']})"
    ]
    for held in rule["shadowed_releases"]:
        lines.append(
            f"  shadowed meanwhile: {plural(held['count'], 'release')}, {held['amount']} "
            f"{held['currency']} from {held['escrow']} (not sent)"
        )
    return lines


def _state_name(state: RuleState) -> str:
    return f"{state.rule_id}[{state.instance}]" if state.instance else state.rule_id


def decision_name(decision: Decision) -> str:
    """The rule a decision is about, ``rule[item]`` for an instance of a per-item rule."""
    return f"{decision.rule_id}[{decision.instance}]" if decision.instance else decision.rule_id


def plan_summary(plan: Plan, fail_on: FailOn) -> str:
    """One line: what would happen, and whether ``--fail-on`` trips."""
    live = [f for f in plan.firings if not f.shadowed]
    if not live:
        text = "nothing would fire on deploy"
    else:
        text = f"{plural(len(live), 'rule')} would fire on deploy"
        money = ", ".join(f"{t.amount} {t.currency} from {t.escrow}" for t in plan.releases)
        text += f", releasing {money}" if money else ", releasing nothing"
    in_shadow = len(plan.firings) - len(live)
    if in_shadow:
        text += f" ({plural(in_shadow, 'more rule')} in shadow, sending nothing)"
    verdict = "FAILED" if plan.trips(fail_on) else "PLAN"
    if verdict == "FAILED":
        text += f" (--fail-on {fail_on})"
    return f"{verdict}: {text}"


def plan_github(plan: Plan, fail_on: FailOn) -> list[str]:
    """GitHub Actions workflow commands: an ``::error`` (when it trips ``--fail-on``) or
    ``::warning`` per firing, a ``::notice`` per added, changed and removed rule, then the
    summary line."""
    lines = []
    for firing in plan.firings:
        if not plan.shows(firing.decision):
            continue
        level = "error" if _firing_trips(firing, fail_on) else "warning"
        verb = "would be blocked on deploy" if firing.blocked else "would fire on deploy"
        if firing.shadowed:
            level, verb = "notice", f"would fire in shadow ({firing.decision.mode}) on deploy"
        what = "; ".join(describe_action(a) for a in firing.actions) or "no actions"
        message = f"rule {decision_name(firing.decision)} {verb}: {what}"
        if firing.blocked:
            message += f" ({firing.decision.reason})"
        lines.append(_github_line(level, plan, firing.rule, message))
    for rule in plan.added:
        lines.append(_github_line("notice", plan, rule, f"rule {rule.id} is added"))
    for rule in plan.changed:
        lines.append(_github_line("notice", plan, rule, f"rule {rule.id} is changed"))
    for rule_id in plan.removed:
        lines.append(workflow_command("notice", f"rule {rule_id} is removed", title=GITHUB_TITLE))
    lines += [workflow_command("notice", note) for note in plan.snapshot.notes]
    lines.append(plan_summary(plan, fail_on))
    return lines


def _firing_trips(firing: PlannedFiring, fail_on: FailOn) -> bool:
    if firing.shadowed:
        return False
    if fail_on == "any":
        return True
    return fail_on == "release" and any(a.kind == "release" for a in firing.actions)


def _github_line(level: str, plan: Plan, rule: Rule, message: str) -> str:
    file = rule_path(plan.rules_dir, rule)
    return workflow_command(level, message, file=file, line=rule.line, title=GITHUB_TITLE)


def _rule_ref(plan: Plan, rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "file": rule_path(plan.rules_dir, rule),
        "line": rule.line,
        "content_hash": rule.content_hash,
    }


def _location(plan: Plan, rule: Rule) -> str:
    return f"{rule_path(plan.rules_dir, rule)}:{rule.line}"


def _why_not(plan: Plan, decision: Decision) -> str:
    """Why a decision did not fire, in a few words."""
    state = plan.snapshot.states.get(
        (decision.rule_id, decision.instance), RuleState(decision.rule_id)
    )
    if decision.outcome == "already_fired":
        return f"already fired ({plural(state.fired_count, 'time')}; fire: once)"
    if decision.outcome == "still_met":
        return "its gate was already open (each_time fires on the next closed -> open change)"
    if decision.outcome == "still_blocked":
        return (
            f"blocked: {decision.reason} (it has not fired; a re-arm, a change of its escrow "
            "or its gate opening again tries its release again)"
        )
    if decision.outcome == "paused":
        return "paused"
    if decision.outcome == "awaiting_approvals":
        standing = decision.approvals or {}
        approved = standing.get("approved_by", [])
        rejected = standing.get("rejected_by", [])
        text = f"awaiting approvals ({len(approved)} of {standing.get('required', '?')}"
        return text + (f", rejected by {', '.join(rejected)})" if rejected else ")")
    evaluation = decision.evaluation
    if evaluation.missing:
        return f"condition false: missing {', '.join(evaluation.missing)}"
    if evaluation.error:
        return f"condition false: {evaluation.error}"
    false = [c.text for c in evaluation.clauses if c.value is False]
    return "condition false" + (f": `{_one_line(false[0])}` is false" if false else "")


class RenderedAction(Protocol):
    """What ``describe_action`` reads of an action: a ``QueuedAction``, or a backtest's
    ``ActionRecord``."""

    @property
    def kind(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def payload(self) -> Mapping[str, Any]: ...


def describe_action(action: RenderedAction) -> str:
    """One line for a rendered action, e.g. ``release escrow-bank: 5000.00 USD from
    tower-a-escrow to acme-architects``."""
    payload = action.payload
    if action.kind == "release":
        return (
            f"release {action.target}: {payload.get('amount')} {payload.get('currency')} "
            f"from {payload.get('escrow')} to {payload.get('payee')}"
        )
    if action.kind == "notify":
        return f"notify {action.target}: {json.dumps(payload.get('message'))}"
    if action.kind == "pipeline":
        inputs = json.dumps(payload.get("inputs", {}), sort_keys=True)
        return f"pipeline {action.target}: ref {payload.get('ref')}, inputs {inputs}"
    return f"{action.kind} {action.target}: {json.dumps(dict(payload), sort_keys=True)}"


# ---------------------------------------------------------------------------------------------
# Explanations (shared with ``gatekeeper test``)


@dataclass(frozen=True)
class ClauseDeadline:
    """When a time sub-condition next changes while the facts stay as they are.

    ``polled`` is True when no exact instant can be computed (``now()``, arithmetic on
    ``days_since``...): the daemon re-checks such a clause every second.
    """

    at: datetime
    left: timedelta
    polled: bool


def clause_deadlines(
    rule: Rule, explanation: Mapping[str, Any], facts: FactTable, now: datetime
) -> dict[int, ClauseDeadline]:
    """For each sub-condition (index into the explanation's clauses) that depends on time,
    when it next changes (``gatekeeper.expr.next_change_at``)."""
    if not rule.condition.uses_time:
        return {}
    lookup = ProjectFacts(rule.project, facts)
    found: dict[int, ClauseDeadline] = {}
    for index, clause in enumerate(explanation["condition"]["clauses"]):
        try:
            compiled = compile_condition(clause["text"])
        except ExpressionError:
            continue
        if not compiled.uses_time:
            continue
        at = next_change_at(compiled, lookup, now)
        if at is not None:
            found[index] = ClauseDeadline(at, at - now, at - now == TIME_RECHECK)
    return found


def explanation_lines(
    rule: Rule,
    explanation: Mapping[str, Any],
    deadlines: Mapping[int, ClauseDeadline] | None = None,
) -> list[str]:
    """A rule's explanation (``Engine.explain``) as lines of text: the gate, each
    sub-condition with its value (and deadline), missing facts, approvals and state."""
    condition = explanation["condition"]
    gate = "open" if explanation["gate_open"] else "closed"
    lines = [f"gate {gate} at {explanation['evaluated_at']}: condition {_json(condition['value'])}"]
    item = explanation.get("item")
    if isinstance(item, Mapping):
        lines.append(f"item: {item['kind']} {item['id']} = {_json(item['data'])}")
    for index, clause in enumerate(condition["clauses"]):
        text = f"  [{_clause_mark(clause)}] {_one_line(clause['text'])}"
        if clause.get("missing"):
            text += f"  (missing: {', '.join(clause['missing'])})"
        if clause.get("error"):
            text += f"  (error: {clause['error']})"
        deadline = (deadlines or {}).get(index)
        if deadline is not None:
            text += f"  {_deadline_text(deadline, clause.get('value'))}"
        lines.append(text)
    if condition.get("missing"):
        lines.append(f"missing: {', '.join(condition['missing'])}")
    if condition.get("error"):
        lines.append(f"error: {condition['error']}")
    approvals = explanation["approvals"]
    if rule.approvals is not None:
        approved = ", ".join(approvals["approved_by"]) or "nobody"
        text = f"approvals: {len(approvals['approved_by'])} of {approvals['required']} required"
        text += f" (approved by {approved}"
        if approvals["rejected_by"]:
            text += f"; rejected by {', '.join(approvals['rejected_by'])}: blocked"
        lines.append(text + f"; from {', '.join(approvals['from'])})")
    state = f"fired {plural(explanation['fired_count'], 'time')} (fire: {rule.fire})"
    if explanation.get("rearms"):
        state += f", re-armed {plural(explanation['rearms'], 'time')}"
    if explanation.get("last_fired_at"):
        state += f", last at {explanation['last_fired_at']}"
    lines.append(state + (", PAUSED" if explanation["paused"] else ""))
    if explanation.get("blocked"):
        lines.append(
            f"BLOCKED: {explanation['blocked']} (it has not fired; a re-arm, a change of its "
            "escrow or its gate opening again tries its release again)"
        )
    return lines


def _clause_mark(clause: Mapping[str, Any]) -> str:
    if clause.get("missing"):
        return "missing"
    if clause.get("error"):
        return "error"
    value = clause.get("value")
    return "true " if value is True else "false" if value is False else _json(value)


def _deadline_text(deadline: ClauseDeadline, value: Any) -> str:
    if deadline.polled:
        return "(depends on the time: re-checked every second)"
    when = format_rfc3339(deadline.at)
    left = format_duration(deadline.left)
    if value is False:
        return f"(deadline {when}: {left} left)"
    return f"(changes at {when}, in {left})"


def format_duration(delta: timedelta) -> str:
    """``3d 4h 5m``, ``2h 0m``, ``45m 10s``, ``12s`` (rounded down to the second)."""
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def explain_rule(
    rule: Rule,
    engine: Engine,
    snapshot: Snapshot,
    now: datetime,
    file: str | None = None,
    item: str = "",
) -> dict[str, Any]:
    """The JSON explanation ``gatekeeper explain`` prints: the rule (``file`` as shown,
    default the rule's own), its explanation (of instance ``item`` of a per-item rule;
    ``KeyError`` when it has no such instance) and the deadlines of its time
    sub-conditions (with the condition's next change). A per-item rule also lists its
    ``instances`` (item ids, at most ``INSTANCES_LISTED``) and how many it has."""
    state = snapshot.states.get((rule.id, item))
    whole = snapshot.states.get((rule.id, "")) if rule.for_each is not None else None
    explanation = engine.explain(
        rule, snapshot.facts, state, now, snapshot.approvals, item=item, whole=whole
    )
    deadlines = clause_deadlines(rule, explanation, snapshot.facts, now)
    changes_at = next_change_at(rule.condition, ProjectFacts(rule.project, snapshot.facts), now)
    return {
        "rule": {
            "id": rule.id,
            "project": rule.project,
            "description": rule.description,
            "when": rule.condition.text.strip(),
            "fire": rule.fire,
            "file": file or rule.file,
            "line": rule.line,
            "content_hash": rule.content_hash,
            "mode": engine.mode_of(rule),
            **({"for_each": rule.for_each} if rule.for_each is not None else {}),
            **(
                {"signoff": status}
                if (status := signoff_status(rule, engine.signoffs)) is not None
                else {}
            ),
        },
        **(_instances_report(rule, snapshot, item) if rule.for_each is not None else {}),
        "source": snapshot.source,
        "explanation": explanation,
        "deadlines": [
            {
                "clause": explanation["condition"]["clauses"][index]["text"],
                "changes_at": format_rfc3339(deadline.at),
                "left_s": deadline.left.total_seconds(),
                "polled": deadline.polled,
            }
            for index, deadline in sorted(deadlines.items())
        ],
        "next_change_at": format_rfc3339(changes_at) if changes_at is not None else None,
        "notes": snapshot.notes,
    }


INSTANCES_LISTED = 50
"""How many item ids ``gatekeeper explain`` lists for a per-item rule."""


def _instances_report(rule: Rule, snapshot: Snapshot, item: str) -> dict[str, Any]:
    items = sorted(snapshot.facts.of_kind(rule.project, rule.for_each or ""))
    return {
        "item": item or None,
        "instances": {"count": len(items), "items": items[:INSTANCES_LISTED]},
    }


# ---------------------------------------------------------------------------------------------
# Command line


def add_plan_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``gatekeeper plan`` to the subparsers ``commands``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "plan",
        help="show what a ruleset would fire the moment it is deployed (dry run, for CI)",
        description="Compare a ruleset with the state of a deployment (a snapshot file or a "
        "running daemon) and list the rules added, removed and changed and every rule that "
        "would fire on deploy, with its actions and the total released per escrow.",
    )
    _add_common_options(parser)
    parser.add_argument(
        "--rules", type=Path, metavar="DIR", help="the candidate ruleset (default: rules_dir)"
    )
    parser.add_argument(
        "--fail-on",
        choices=["never", "release", "any"],
        default="never",
        help="exit 1 when a release would be sent (release) or anything would fire (any)",
    )
    parser.add_argument("--format", choices=["text", "json", "github"], default="text")
    parser.add_argument(
        "--item",
        metavar="ID",
        help="list only this instance (item id) of each per-item rule; totals and --fail-on "
        "still count every firing",
    )
    return parser


def add_explain_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``gatekeeper explain`` to the subparsers ``commands``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "explain",
        help="explain a rule against a snapshot or a running daemon",
        description="Show a rule's sub-conditions with their values, missing facts, approvals "
        "counted, its fired and paused state, and the time left on its deadlines.",
    )
    parser.add_argument("rule_id", metavar="RULE", help="the rule's id")
    _add_common_options(parser)
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="DIR",
        help="take the rule from this rules folder (default: the daemon's rule with --from, "
        "else rules_dir)",
    )
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument(
        "--item", metavar="ID", help="explain this instance (item id) of a per-item rule"
    )
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="gatekeeper.yaml (default: ./gatekeeper.yaml when present)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--snapshot", type=Path, metavar="FILE", help="a state snapshot (JSON)")
    source.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="a running daemon's base URL (default: the config's listen address)",
    )
    parser.add_argument(
        "--at", metavar="TIME", help="evaluate at this RFC 3339 time (default: now)"
    )


def run_plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``gatekeeper plan``: returns 0, 1 (``--fail-on`` tripped) or 2 (usage error)."""
    out = out or sys.stdout
    config = cli_config(args.config, "plan")
    now = _cli_time(args.at, "plan")
    if config is None or now is None:
        return EXIT_USAGE
    rules_dir: Path = args.rules or config.rules_dir
    result = load_rules_dir(rules_dir, config)
    if result.ruleset is None:
        _print_load_problems(result, args.format, out)
        return EXIT_USAGE
    candidate = result.ruleset.by_id()

    def changed_ids(deployed: Mapping[str, str]) -> list[str]:
        return [i for i, h in deployed.items() if i in candidate and candidate[i].content_hash != h]

    snapshot = _cli_snapshot(args, config, "plan", changed_ids)
    if snapshot is None:
        return EXIT_USAGE
    plan = plan_deploy(result.ruleset, rules_dir, snapshot, config, now)
    plan.item = args.item or None
    if args.format == "json":
        out.write(json.dumps(plan_report(plan, args.fail_on), indent=2) + "\n")
    else:
        lines = (
            plan_github(plan, args.fail_on)
            if args.format == "github"
            else plan_text(plan, args.fail_on)
        )
        out.write("\n".join(lines) + "\n")
    return EXIT_FAILED if plan.trips(args.fail_on) else EXIT_OK


def run_explain(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``gatekeeper explain RULE``: returns 0, or 2 (usage error, unknown rule, unreachable
    daemon)."""
    out = out or sys.stdout
    config = cli_config(args.config, "explain")
    now = _cli_time(args.at, "explain")
    if config is None or now is None:
        return EXIT_USAGE
    rule_id: str = args.rule_id
    local = args.rules is not None or args.snapshot is not None
    ruleset: Ruleset | None = None
    rules_dir: Path | None = None
    if local:
        rules_dir = args.rules or config.rules_dir
        result = load_rules_dir(rules_dir, config)
        if result.ruleset is None:
            _print_load_problems(result, "text", sys.stderr)
            return EXIT_USAGE
        ruleset = result.ruleset
        if rule_id not in ruleset.by_id():
            _unknown_rule(rule_id, [r.id for r in ruleset.rules], display_path(rules_dir))
            return EXIT_USAGE
    snapshot = _cli_snapshot(
        args, config, "explain", lambda deployed: [rule_id] if rule_id in deployed else []
    )
    if snapshot is None:
        return EXIT_USAGE
    if ruleset is None:
        if snapshot.deployed is None or rule_id not in snapshot.deployed:
            _unknown_rule(rule_id, list(snapshot.deployed or {}), snapshot.source)
            return EXIT_USAGE
        ruleset = _daemon_rule(base_url(config, args.from_url), rule_id)
        if ruleset is None:
            return EXIT_USAGE
    rule = ruleset.by_id()[rule_id]
    item: str = args.item or ""
    if item and rule.for_each is None:
        print(
            f"gatekeeper explain: rule {rule_id!r} has no for_each: --item names an instance "
            "of a per-item rule, and this rule has none",
            file=sys.stderr,
        )
        return EXIT_USAGE
    engine = Engine.for_config(ruleset, config, signed=snapshot.signed)
    file = rule_path(rules_dir, rule) if rules_dir is not None else None
    try:
        report = explain_rule(rule, engine, snapshot, now, file, item)
    except KeyError:
        print(
            f"gatekeeper explain: rule {rule_id!r} has no instance {item!r}: there is no "
            f"{rule.for_each} fact {item!r} in project {rule.project!r} in {snapshot.source}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.format == "json":
        out.write(json.dumps(report, indent=2) + "\n")
        return EXIT_OK
    out.write("\n".join(explain_text(rule, report, snapshot, now)) + "\n")
    return EXIT_OK


def explain_text(
    rule: Rule, report: Mapping[str, Any], snapshot: Snapshot, now: datetime
) -> list[str]:
    """``gatekeeper explain``'s text output."""
    info = report["rule"]
    name = f"{rule.id}[{report['item']}]" if report.get("item") else rule.id
    lines = [f"rule {name}  ({info['file']}:{info['line']}, project {rule.project})"]
    if rule.description:
        lines.append(f"  {rule.description}")
    lines.append(f"when: {_one_line(info['when'])}")
    if info["mode"] != "live":
        lines.append(f"mode: {info['mode']} (its firings are stored as shadowed, never sent)")
    signoff = info.get("signoff")
    if signoff is not None:
        signed = ", ".join(s["actor"] for s in signoff["signed_by"]) or "nobody"
        lines.append(
            f"sign-offs of content hash {signoff['content_hash'][:12]}: "
            f"{len(signoff['signed_by'])} of {signoff['required']} ({signed})"
        )
    instances = report.get("instances")
    if instances is not None:
        listed = ", ".join(instances["items"]) or "none"
        more = (
            f", ... ({instances['count']} in all)"
            if instances["count"] > len(instances["items"])
            else ""
        )
        lines.append(
            f"for each {rule.for_each}: {plural(instances['count'], 'instance')} ({listed}{more})"
        )
        if not report.get("item"):
            lines.append("  (explained without an item: pass --item ID to explain one instance)")
    lines.append(f"against: {snapshot.source}")
    lines += [f"note: {note}" for note in snapshot.notes]
    deadlines = clause_deadlines(rule, report["explanation"], snapshot.facts, now)
    lines += explanation_lines(rule, report["explanation"], deadlines)
    if report["next_change_at"] and not report["explanation"]["gate_open"]:
        lines.append(f"next re-evaluation by the clock: {report['next_change_at']}")
    seen = report["explanation"]["condition"].get("seen") or {}
    if seen:
        lines.append("facts seen:")
        lines += [f"  {name} = {_json(value)}" for name, value in sorted(seen.items())]
    return lines


def _daemon_rule(url: str, rule_id: str) -> Ruleset | None:
    """The daemon's own version of ``rule_id`` (from ``GET /v1/rules/{id}``'s source), as a
    one-rule ruleset."""
    try:
        view = call(f"{url}/v1/rules/{urllib.parse.quote(rule_id, safe='/')}")
    except ClientError as error:
        print(f"gatekeeper explain: {error}", file=sys.stderr)
        return None
    name = str(view.get("file") or "rule.yaml")
    result = load_rule_texts({name: json.dumps(view["source"])}, None)
    if result.ruleset is None:
        _print_load_problems(result, "text", sys.stderr)
        return None
    rule = result.ruleset.rules[0]
    located = replace(rule, line=int(view.get("line") or rule.line))
    return Ruleset((located,), result.ruleset.files, result.ruleset.version)


def cli_config(path: Path | None, command: str) -> Config | None:
    """Load the config as every command does (``-c FILE``, else ``./gatekeeper.yaml`` when
    present, else the defaults); print the problems and return None when it is unusable."""
    if path is not None and not path.is_file():
        print(f"gatekeeper {command}: config file {path} not found", file=sys.stderr)
        return None
    try:
        return load_config(path if path is not None else find_default_config(Path.cwd()))
    except ConfigError as error:
        print(f"gatekeeper {command}: invalid configuration:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _cli_time(text: str | None, command: str) -> datetime | None:
    if text is None:
        return SystemClock().now()
    try:
        return parse_rfc3339(text)
    except ValueError as error:
        print(f"gatekeeper {command}: --at: {error}", file=sys.stderr)
        return None


def _cli_snapshot(
    args: argparse.Namespace,
    config: Config,
    command: str,
    detail: Callable[[Mapping[str, str]], Iterable[str]],
) -> Snapshot | None:
    try:
        if args.snapshot is not None:
            return load_snapshot(args.snapshot)
        return fetch_snapshot(base_url(config, args.from_url), detail)
    except SnapshotError as error:
        print(f"gatekeeper {command}: invalid snapshot {error.source}:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
    except ClientError as error:
        print(f"gatekeeper {command}: {error}", file=sys.stderr)
    return None


def _print_load_problems(result: LoadResult, fmt: str, out: TextIO) -> None:
    lines = (
        github_commands(result.problems) if fmt == "github" else format_problems(result.problems)
    )
    if fmt == "json":
        body = {"valid": False, "problems": [p.to_json() for p in result.problems]}
        out.write(json.dumps(body, indent=2) + "\n")
        return
    count = len(result.problems)
    out.write(
        "\n".join([*lines, f"FAILED: the ruleset is invalid ({plural(count, 'problem')})"]) + "\n"
    )


def _unknown_rule(rule_id: str, known: Sequence[str], where: str) -> None:
    message = f"gatekeeper explain: no rule {rule_id!r} in {where}"
    close = difflib.get_close_matches(rule_id, list(known), n=1)
    print(message + (f"; did you mean {close[0]!r}?" if close else ""), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Small helpers


def rule_path(rules_dir: Path, rule: Rule) -> str:
    """The rule's file as seen from the working directory (for annotations and reports)."""
    return display_path(rules_dir / rule.file)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
