"""Release amounts read from facts, capped by ``max_amount``, and blocked releases that wait
(``fire: once`` not consumed): through the real daemon, HTTP API, SQLite file and a real
receiver."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from gatekeeper.config import Escrow
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput, RuleState, Transition
from gatekeeper.rules.loader import load_rule_texts

from .conftest import SECRET, Project, Receiver, fact

PAY_INVOICE = """\
id: tower-a/pay-invoice
project: tower-a
for_each: invoice
when: item.data.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${item.data.amount}",
              max_amount: "10000.00", currency: USD, payee: acme}
  - notify: {target: ci, message: "released ${amount} ${currency} for invoice ${item.id}"}
"""


def verified(recorded: Any) -> dict[str, Any]:
    body: dict[str, Any] = Webhook(SECRET).verify(recorded.raw, recorded.headers)
    return body


async def test_amount_from_the_item_within_its_cap_is_released_and_booked(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("pay.yaml", PAY_INVOICE)
    gk = await start_daemon(project)
    status, _ = await gk.post(
        "/v1/facts", fact("invoice", "i1", status="approved", amount="1234.5")
    )
    assert status == 200
    await receiver.wait_for(2)
    await asyncio.sleep(0.2)
    by_path = {r.path: verified(r) for r in receiver.received}
    assert set(by_path) == {"/bank", "/ci"}
    release = by_path["/bank"]
    assert (release["amount"], release["currency"], release["payee"]) == ("1234.5", "USD", "acme")
    assert by_path["/ci"]["message"] == "released 1234.5 USD for invoice i1"
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    ledger = db.execute("SELECT release_id, amount, firing_id FROM ledger").fetchall()
    assert ledger == [(release["release_id"], "1234.5", "tower-a/pay-invoice[i1]#1")]
    _, escrows = await gk.get("/v1/escrows")
    assert escrows["escrows"][0]["remaining"] == "18765.50"


async def test_bad_amounts_are_blocked_each_with_one_alert_and_nothing_sent(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("pay.yaml", PAY_INVOICE)
    gk = await start_daemon(project)
    bad: dict[str, Any] = {
        "over": "10000.01",
        "negative": "-5.00",
        "word": "abc",
        "decimals": "10.005",
        "float": 99.5,
        "zero": "0",
        "long": "9" * 200,
    }
    facts = [fact("invoice", item, status="approved", amount=v) for item, v in bad.items()]
    facts.append(fact("invoice", "none", status="approved"))  # no amount at all
    status, _ = await gk.post("/v1/facts", {"facts": facts})
    assert status == 200
    await receiver.wait_for(len(facts))
    await asyncio.sleep(0.3)
    assert {r.path for r in receiver.received} == {"/chat"}  # nothing to the bank
    alerts = [verified(r)["text"] for r in receiver.received]
    assert len(alerts) == len(facts)
    reasons = {}
    for item in [*bad, "none"]:
        _, rule = await gk.get(f"/v1/rules/tower-a/pay-invoice?item={item}")
        decision = rule["recent_decisions"][0]
        assert decision["outcome"] == "blocked"
        reasons[item] = decision["reason"]
    where = "release amount item.data.amount of rule tower-a/pay-invoice"
    assert reasons["over"] == (
        f"{where} is '10000.01': above the release's max_amount 10000.00 (release action 1)"
    )
    assert reasons["negative"] == f"{where} is '-5.00': not above zero (release action 1)"
    assert reasons["word"] == (
        f"{where} is 'abc': not a decimal amount (digits, a point and at most 2 decimals, "
        'e.g. "1500.00") (release action 1)'
    )
    assert reasons["decimals"] == (
        f"{where} is '10.005': 3 decimals, more than the escrow's 2 (release action 1)"
    )
    assert reasons["float"].startswith(f"{where} is 99.5: a JSON number, not a decimal string")
    assert reasons["zero"] == f"{where} is '0': not above zero (release action 1)"
    assert reasons["long"] == (
        f"{where} is '{'9' * 63}…': above the release's max_amount 10000.00 (release action 1)"
    )
    assert reasons["none"] == f"{where} has no value (release action 1)"
    for reason in reasons.values():
        assert any(reason in text for text in alerts)
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    assert db.execute("SELECT COUNT(*) FROM ledger").fetchone() == (0,)
    _, escrows = await gk.get("/v1/escrows")
    assert escrows["escrows"][0]["remaining"] == "20000.00"


def release_rule(name: str, milestone: str, amount: str) -> str:
    return f"""\
    id: tower-a/{name}
    project: tower-a
    when: milestone.{milestone}.status == "approved"
    actions:
      - release: {{target: escrow-bank, escrow: tower-a-escrow, amount: "{amount}",
                  currency: USD, payee: {name}}}
    """


async def wait_until(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def test_a_once_release_blocked_by_the_limit_waits_and_fires_when_the_limit_is_raised(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="ci")  # JSON: every field arrives
    project.write_rule("first.yaml", release_rule("first", "m1", "15000.00"))
    project.write_rule("second.yaml", release_rule("second", "m2", "8000.00"))
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("milestone", "m1", status="approved"))
    await gk.post("/v1/facts", fact("milestone", "m2", status="approved"))
    await receiver.wait_for(2)
    await asyncio.sleep(0.3)
    [bank] = [verified(r) for r in receiver.received if r.path == "/bank"]
    assert bank["payee"] == "first"
    [alert] = [verified(r) for r in receiver.received if r.path == "/ci"]
    reason = (
        "release of 8000.00 USD exceeds what is left of escrow 'tower-a-escrow': "
        "5000.00 of 20000.00 USD"
    )
    assert (alert["alert"], alert["firing_id"], alert["reason"]) == (
        "release_blocked",
        "tower-a/second#1",
        reason,
    )
    _, rule = await gk.get("/v1/rules/tower-a/second")
    assert (rule["state"], rule["blocked"], rule["fired_count"]) == ("blocked", reason, 0)
    assert rule["explanation"]["blocked"] == reason
    _, listing = await gk.get("/v1/rules")
    [summary] = [r for r in listing["rules"] if r["id"] == "tower-a/second"]
    assert (summary["state"], summary["blocked"]) == ("blocked", reason)

    # later facts that keep its gate open neither try again nor alert again
    for note in ("first look", "second look"):
        await gk.post("/v1/facts", fact("milestone", "m2", status="approved", note=note))
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2
    _, rule = await gk.get("/v1/rules/tower-a/second")
    assert [d["outcome"] for d in rule["recent_decisions"]][:3] == [
        "still_blocked",
        "still_blocked",
        "blocked",
    ]
    assert rule["recent_decisions"][0]["reason"] == reason

    # a restart keeps the blocked state (and still no new attempt)
    await gk.stop()
    gk = await start_daemon(project, watch=True)
    _, rule = await gk.get("/v1/rules/tower-a/second")
    assert (rule["state"], rule["blocked"], rule["fired_count"]) == ("blocked", reason, 0)
    await gk.post("/v1/facts", fact("milestone", "m2", status="approved", note="restarted"))
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2

    # finance raises the limit in gatekeeper.yaml: the watcher reloads, and it fires
    text = project.config_path.read_text()
    project.config_path.write_text(text.replace('limit: "20000.00"', 'limit: "25000.00"'))
    await receiver.wait_for(3, timeout_s=15)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 3
    released = verified(receiver.received[-1])
    assert (released["payee"], released["amount"]) == ("second", "8000.00")
    _, rule = await gk.get("/v1/rules/tower-a/second")
    assert (rule["state"], rule["blocked"], rule["fired_count"]) == ("fired", None, 1)
    assert rule["recent_decisions"][0]["outcome"] == "fired"
    assert rule["recent_decisions"][0]["trigger"] == "reload"
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    firings = db.execute(
        "SELECT firing_id, outcome FROM decisions WHERE rule_id = 'tower-a/second'"
        " AND firing_id IS NOT NULL ORDER BY id"
    ).fetchall()
    assert firings == [("tower-a/second#1", "blocked"), ("tower-a/second#2", "fired")]
    assert db.execute("SELECT firing_id FROM ledger WHERE payee = 'second'").fetchall() == [
        ("tower-a/second#2",)
    ]
    _, escrows = await gk.get("/v1/escrows")
    assert escrows["escrows"][0]["remaining"] == "2000.00"
    # fired once: once holds
    await gk.post("/v1/facts", fact("milestone", "m2", status="approved", note="after"))
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 3


PAY_TOTAL = """\
id: tower-a/pay-total
project: tower-a
when: invoice.i7.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${invoice.i7.total}",
              max_amount: "1000.00", currency: USD, payee: acme}
"""


async def test_a_blocked_once_release_fires_when_re_armed(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("pay.yaml", PAY_TOTAL)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("invoice", "i7", status="approved", total="1,200"))
    [alert] = [verified(r) for r in await receiver.wait_for(1)]
    assert alert["text"].startswith(
        "gatekeeper blocked the release of the amount in invoice.i7.total (at most 1000.00 USD) "
        "from tower-a-escrow to acme "
        "by rule tower-a/pay-total (firing tower-a/pay-total#1): release amount "
        "invoice.i7.total of rule tower-a/pay-total is '1,200': not a decimal amount"
    )
    # the fact is corrected: the gate stayed open, so nothing is tried until someone says so
    await gk.post("/v1/facts", fact("invoice", "i7", status="approved", total="800.00"))
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1
    base = [sys.executable, "-m", "gatekeeper"]
    where = ["-c", str(project.config_path), "--from", gk.url]

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*base, *args, *where], capture_output=True, text=True
        )

    explained = await run("explain", "tower-a/pay-total")
    assert explained.returncode == 0, explained.stderr
    assert (
        "BLOCKED: release amount invoice.i7.total of rule tower-a/pay-total is '1,200': not a "
        "decimal amount"
    ) in explained.stdout
    unchanged = await run("plan")
    assert unchanged.returncode == 0, unchanged.stderr
    assert (
        "Blocked in the deployment, unchanged: 1 rule\n  tower-a/pay-total: blocked: release "
        "amount invoice.i7.total of rule tower-a/pay-total is '1,200'"
    ) in unchanged.stdout
    # a new version of the rule would try the release again: plan shows it would fire
    project.write_rule("pay.yaml", PAY_TOTAL.replace('"1000.00"', '"900.00"'))
    planned = await run("plan", "--format", "json")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["blocked"] == []
    [firing] = json.loads(planned.stdout)["fires"]
    assert (firing["id"], firing["outcome"], firing["firing_id"]) == (
        "tower-a/pay-total",
        "fired",
        "tower-a/pay-total#2",
    )
    assert firing["actions"][0]["payload"]["amount"] == "800.00"
    project.write_rule("pay.yaml", PAY_TOTAL)

    status, rearmed = await gk.post("/v1/rules/tower-a/pay-total/rearm", {"reason": "fixed"})
    assert status == 200, rearmed
    assert rearmed["fired_count"] == 1
    await receiver.wait_for(2)
    release = verified(receiver.received[-1])
    assert (release["amount"], release["payee"]) == ("800.00", "acme")
    _, rule = await gk.get("/v1/rules/tower-a/pay-total")
    assert (rule["state"], rule["blocked"]) == ("fired", None)
    assert [d["firing_id"] for d in rule["recent_decisions"] if d["firing_id"]] == [
        "tower-a/pay-total#2",
        "tower-a/pay-total#1",
    ]


async def test_a_blocked_once_release_tries_again_when_its_gate_opens_again(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("pay.yaml", PAY_TOTAL)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("invoice", "i7", status="approved", total="5000.00"))
    await receiver.wait_for(1)
    await gk.post("/v1/facts", fact("invoice", "i7", status="disputed", total="5000.00"))
    _, rule = await gk.get("/v1/rules/tower-a/pay-total")
    assert rule["state"] == "blocked"  # its gate closed, it still has not fired
    await gk.post("/v1/facts", fact("invoice", "i7", status="approved", total="500.00"))
    await receiver.wait_for(2)
    await asyncio.sleep(0.3)
    assert [r.path for r in receiver.received] == ["/chat", "/bank"]
    assert verified(receiver.received[1])["amount"] == "500.00"


# -- the engine alone: what each fire mode does with a blocked release -------------------------

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Sim:
    """One rule over real engine planning, each transition applied as the daemon does."""

    def __init__(self, fire: str, limit: str = "100.00") -> None:
        text = f"""\
        id: p/pay
        project: p
        when: invoice.i1.status == "approved"
        fire: {fire}
        actions:
          - release: {{target: bank, escrow: e, amount: "${{invoice.i1.total}}",
                      max_amount: "1000.00", currency: USD, payee: acme}}
        """
        result = load_rule_texts({"pay.yaml": textwrap.dedent(text)}, config=None)
        assert result.ruleset is not None, result.problems
        n = iter(range(1, 1000))
        self.engine = Engine(
            result.ruleset, alert_target="ops", new_action_id=lambda: f"a{next(n)}"
        )
        self.facts = FactTable()
        self.states: dict[Any, RuleState] = {}
        self.approvals: dict[str, Any] = {}
        self.book = EscrowBook({"e": Escrow("e", "USD", Decimal(limit))})

    def post(self, status: str, total: str) -> Transition:
        fact = FactInput("p", "invoice", "i1", {"status": status, "total": total})
        return self.apply(
            self.engine.plan_ingest(
                self.facts, self.states, [fact], NOW, self.book.copy(), self.approvals
            )
        )

    def raise_limit(self, limit: str) -> Transition:
        self.book = EscrowBook({"e": Escrow("e", "USD", Decimal(limit))}, self.book.committed)
        rules = list(self.engine.rules.values())
        planned = self.engine.plan_rules(
            self.facts, self.states, rules, NOW, "reload", book=self.book.copy(), retry={"p/pay"}
        )
        return self.apply(planned)

    def apply(self, transition: Transition) -> Transition:
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        return transition

    @property
    def state(self) -> RuleState:
        return self.states[("p/pay", "")]


def outcomes(transition: Transition) -> list[tuple[str, str | None, int]]:
    """(outcome, firing id, actions queued) of each decision."""
    return [(d.outcome, d.firing_id, len(transition.actions)) for d in transition.decisions]


@pytest.mark.parametrize("fire", ["once", "each_time"])
def test_a_blocked_release_waits_while_its_gate_stays_open(fire: str) -> None:
    sim = Sim(fire)
    assert outcomes(sim.post("approved", "150.00")) == [("blocked", "p/pay#1", 1)]  # the alert
    assert (sim.state.fired_count, sim.state.blocks) == (0, 1)
    assert sim.state.blocked is not None and "exceeds what is left" in sim.state.blocked
    assert outcomes(sim.post("approved", "150.00")) == [("still_blocked", None, 0)]
    assert outcomes(sim.post("approved", "90.00")) == [("still_blocked", None, 0)]
    # the limit is raised: it tries again, and fires with a new firing id
    fired = sim.raise_limit("500.00")
    assert outcomes(fired) == [("fired", "p/pay#2", 1)]
    assert [a.payload["amount"] for a in fired.actions] == ["90.00"]
    assert (sim.state.fired_count, sim.state.blocks, sim.state.blocked) == (1, 1, None)


@pytest.mark.parametrize("fire", ["once", "each_time"])
def test_a_blocked_release_tries_again_when_its_gate_opens_again(fire: str) -> None:
    sim = Sim(fire)
    sim.post("approved", "150.00")
    assert outcomes(sim.post("disputed", "150.00")) == [("not_met", None, 0)]
    assert sim.state.blocked is not None  # not fired yet: it still says why
    again = sim.post("approved", "abc")
    assert outcomes(again) == [("blocked", "p/pay#2", 1)]  # a new episode: a new alert
    assert again.actions[0].payload["firing_id"] == "p/pay#2"
    sim.post("disputed", "abc")
    assert outcomes(sim.post("approved", "60.00")) == [("fired", "p/pay#3", 1)]
    assert (sim.state.fired_count, sim.state.blocks, sim.state.blocked) == (1, 2, None)


def test_an_event_rule_tries_each_fact_and_alerts_each_blocked_one() -> None:
    sim = Sim("each_fact")
    assert outcomes(sim.post("approved", "150.00")) == [("blocked", "p/pay#1", 1)]
    assert outcomes(sim.post("approved", "150.00")) == [("blocked", "p/pay#2", 1)]
    assert outcomes(sim.post("approved", "60.00")) == [("fired", "p/pay#3", 1)]
    assert (sim.state.fired_count, sim.state.blocks, sim.state.blocked) == (1, 2, None)
    # a change of the escrow does not fire it: only a fact does
    assert outcomes(sim.raise_limit("500.00")) == [("still_met", None, 0)]


def test_a_once_rule_that_fired_is_not_tried_again_by_a_limit_raise() -> None:
    sim = Sim("once")
    sim.post("approved", "60.00")
    assert outcomes(sim.raise_limit("500.00")) == [("already_fired", None, 0)]


def test_a_new_version_of_the_rule_tries_a_blocked_release_again() -> None:
    sim = Sim("once", limit="100.00")
    sim.post("approved", "150.00")
    held = sim.states[("p/pay", "")]
    sim.states[("p/pay", "")] = replace(held, rule_hash="an earlier version")
    rules = list(sim.engine.rules.values())
    again = sim.engine.plan_rules(sim.facts, sim.states, rules, NOW, "reload", book=sim.book.copy())
    assert outcomes(again) == [("blocked", "p/pay#2", 1)]
