"""Release amounts read from facts, capped by ``max_amount``, and blocked releases that wait
(``fire: once`` not consumed): through the real daemon, HTTP API, SQLite file and a real
receiver."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

from standardwebhooks.webhooks import Webhook

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
