"""The engine in shadow, without the daemon: a firing in shadow is decided and recorded as a
live one, but queues only shadowed actions (no ledger entry, nothing committed to the
escrow book, no fact set); a money rule awaiting sign-off tells the alert target once per
content hash, across instances and batches; a sign-off counts from the next plan on."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from gatekeeper.config import Escrow
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput, InstanceKey, RuleState, SignOff, Stand
from gatekeeper.engine.signoffs import SignOffBook
from gatekeeper.rules.loader import load_rule_texts

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RULES = """
- id: pay-build
  project: p
  for_each: build
  when: item.data.status == "passed"
  actions:
    - release: {target: bank, escrow: e, amount: "100.00", currency: USD, payee: acme}
    - set_fact: {kind: paid, id: "${item.id}", data: {by: "${rule_id}"}}
- id: on-paid
  project: p
  for_each: paid
  when: item.data.by == "pay-build"
  actions:
    - notify: {target: chat, message: "paid ${item.id}"}
- id: big
  project: p
  mode: shadow
  when: order.o1.ok
  actions:
    - release: {target: bank, escrow: e, amount: "999.00", currency: USD, payee: acme}
"""


def engine(required: int) -> tuple[Engine, SignOffBook]:
    result = load_rule_texts({"rules.yaml": RULES}, config=None)
    assert result.ruleset is not None, result.problems
    book = SignOffBook(required, {})
    return Engine(result.ruleset, alert_target="chat", signoffs=book), book


def build(item: str) -> FactInput:
    return FactInput("p", "build", item, {"status": "passed"})


def test_awaiting_signoff_shadows_everything_and_alerts_once_per_hash() -> None:
    gk, signoffs = engine(required=1)
    facts = FactTable()
    states: dict[InstanceKey, RuleState] = {}
    approvals: dict[str, dict[str, Stand]] = {}
    escrows = EscrowBook({"e": Escrow("e", "USD", Decimal("500.00"))})
    plan = gk.plan_ingest(facts, states, [build("b1"), build("b2")], NOW, escrows.copy())
    fired = [d for d in plan.decisions if d.firing_id]
    assert [(d.rule_id, d.outcome, d.mode) for d in fired] == [
        ("pay-build", "shadowed", "awaiting_signoff"),
        ("pay-build", "shadowed", "awaiting_signoff"),
    ]
    assert plan.ledger == [] and [f.kind for f in plan.facts] == ["build", "build"]
    shadowed = [a for a in plan.actions if a.shadowed]
    assert sorted(a.kind for a in shadowed) == ["release", "release", "set_fact", "set_fact"]
    [alert] = [a for a in plan.actions if not a.shadowed]
    pay = gk.rules["pay-build"]
    first_release = next(a for a in plan.actions if a.kind == "release")
    assert alert.payload["alert"] == "money_rule_awaiting_signoff"
    assert (alert.payload["content_hash"], alert.payload["release_id"]) == (
        pay.content_hash,
        first_release.action_id,
    )
    assert plan.rule_states[("pay-build", "")].signoff_alerted == pay.content_hash
    apply_transition(plan, facts, states, approvals, escrows)
    assert escrows.committed == {}

    # a later batch: shadowed again, no second alert for the same hash
    plan = gk.plan_ingest(facts, states, [build("b3")], NOW, escrows.copy())
    assert [a.shadowed for a in plan.actions] == [True, True]
    apply_transition(plan, facts, states, approvals, escrows)

    # signed off: the next firing is live, its fact is set and fires the next rule
    signoffs.add(SignOff(pay.content_hash, pay.id, "ops"))
    plan = gk.plan_ingest(facts, states, [build("b4")], NOW, escrows.copy())
    outcomes = [(d.rule_id, d.outcome, d.mode) for d in plan.decisions if d.firing_id]
    assert outcomes == [("pay-build", "fired", "live"), ("on-paid", "fired", "live")]
    assert [e.amount for e in plan.ledger] == ["100.00"]
    assert not any(a.shadowed for a in plan.actions)


def test_a_shadow_release_that_would_not_fit_is_blocked_and_its_alert_shadowed() -> None:
    gk, _ = engine(required=0)
    escrows = EscrowBook({"e": Escrow("e", "USD", Decimal("500.00"))})
    plan = gk.plan_ingest(
        FactTable(), {}, [FactInput("p", "order", "o1", {"ok": True})], NOW, escrows
    )
    [decision] = plan.decisions
    assert (decision.outcome, decision.mode) == ("blocked", "shadow")
    [alert] = plan.actions
    assert alert.shadowed and alert.payload["alert"] == "release_blocked"
    assert plan.ledger == [] and escrows.committed == {}


def test_without_signoffs_required_a_money_rule_is_live() -> None:
    gk, _ = engine(required=0)
    assert gk.mode_of(gk.rules["pay-build"]) == "live"
    assert gk.mode_of(gk.rules["big"]) == "shadow"
    gk, _ = engine(required=2)
    assert gk.mode_of(gk.rules["pay-build"]) == "awaiting_signoff"
    assert gk.mode_of(gk.rules["on-paid"]) == "live"  # no release: not a money rule
