"""``mode: shadow`` through a real daemon on 127.0.0.1 with a receiver that records every
request: a shadow rule is decided and recorded as a live one, but nothing it queues reaches
a target, the escrow is untouched, no fact is set; its actions are listed as shadowed, its
decisions and audit entries say so, the metrics count them, the rule views show its mode
and what it would have released. A live rule beside it is sent as usual."""

from __future__ import annotations

import asyncio
from typing import Any

from gatekeeper.rules.loader import canonical_rule, rule_content_hash

from .conftest import Project, Receiver, fact

RULES = """
- id: tower-a/shadow-pay
  project: tower-a
  mode: shadow
  when: milestone.design.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "5000.00",
                currency: USD, payee: acme}
    - notify: {target: finance-chat, message: "released ${amount} (${rule_id})"}
    - set_fact: {kind: payment, id: design, data: {status: paid}}
- id: tower-a/live-docs
  project: tower-a
  when: milestone.design.status == "approved"
  actions:
    - pipeline: {target: ci, ref: main, inputs: {stage: docs}}
- id: tower-a/after-payment
  project: tower-a
  when: payment.design.status == "paid"
  actions:
    - notify: {target: finance-chat, message: "paid"}
"""
SHADOW = "tower-a/shadow-pay"


def test_mode_live_is_the_default_and_keeps_the_hash() -> None:
    rule = {"id": "r", "project": "p", "when": "x.y.z", "actions": [{"notify": {}}]}
    assert rule_content_hash(rule) == rule_content_hash({**rule, "mode": "live"})
    assert rule_content_hash(rule) != rule_content_hash({**rule, "mode": "shadow"})
    assert "mode" not in canonical_rule({**rule, "mode": "live"})


async def test_a_shadow_rule_fires_and_nothing_reaches_a_target(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("rules.yaml", RULES)
    gk = await start_daemon(project)
    status, _ = await gk.post("/v1/facts", fact("milestone", "design", status="approved"))
    assert status == 200
    [sent] = await receiver.wait_for(1)  # the live rule's pipeline
    assert sent.path == "/ci"
    await asyncio.sleep(0.3)  # time for anything else to arrive (nothing may)
    assert [r.path for r in receiver.received] == ["/ci"]

    status, shadowed = await gk.get("/v1/actions?status=shadowed")
    assert status == 200
    rows = sorted(shadowed["actions"], key=lambda a: a["kind"])
    assert [(a["kind"], a["target"], a["status"]) for a in rows] == [
        ("notify", "finance-chat", "shadowed"),
        ("release", "escrow-bank", "shadowed"),
        ("set_fact", "", "shadowed"),
    ]
    assert all(a["rule_id"] == SHADOW and a["attempts"] == 0 for a in rows)
    assert rows[0]["payload"]["message"] == f"released 5000.00 ({SHADOW})"
    assert rows[2]["payload"] == {
        "project": "tower-a",
        "kind": "payment",
        "id": "design",
        "data": {"status": "paid"},
    }
    release = rows[1]
    status, one = await gk.get(f"/v1/actions/{release['action_id']}")
    assert status == 200 and one["status"] == "shadowed" and one["delivery_attempts"] == []

    # never in the ledger, never counted against the escrow
    status, escrows = await gk.get("/v1/escrows")
    [escrow] = escrows["escrows"]
    assert (escrow["pending"], escrow["released"], escrow["remaining"]) == (
        "0.00",
        "0.00",
        "20000.00",
    )
    status, _ = await gk.get(f"/v1/releases/{release['action_id']}")
    assert status == 404
    # the fact it would set is not set, so nothing downstream fired
    status, facts = await gk.get("/v1/facts")
    assert [f["kind"] for f in facts["facts"]] == ["milestone"]

    # decided and recorded as a live rule: state, firing id, a once firing used up
    status, detail = await gk.get(f"/v1/rules/{SHADOW}")
    assert status == 200
    assert detail["mode"] == "shadow" and detail["fired_count"] == 1
    decision = detail["recent_decisions"][0]  # the newest
    assert decision["outcome"] == "shadowed" and decision["mode"] == "shadow"
    assert decision["firing_id"] == f"{SHADOW}#1"
    assert detail["shadowed_releases"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "count": 1,
            "amount": "5000.00",
            "first_release_id": release["action_id"],
        }
    ]
    status, listing = await gk.get("/v1/rules")
    modes = {r["id"]: r["mode"] for r in listing["rules"]}
    assert modes == {SHADOW: "shadow", "tower-a/live-docs": "live", "tower-a/after-payment": "live"}
    status, audit = await gk.get(f"/v1/audit?rule={SHADOW}&outcome=shadowed")
    assert [e["what"] for e in audit["entries"]] == ["shadowed"]

    # a once rule: its condition going false and true again fires nothing more
    await gk.post("/v1/facts", fact("milestone", "design", status="draft"))
    await gk.post("/v1/facts", fact("milestone", "design", status="approved"))
    status, shadowed = await gk.get("/v1/actions?status=shadowed")
    assert len(shadowed["actions"]) == 3

    async with gk.session.get(gk.url + "/metrics") as response:
        metrics = await response.text()
    for kind in ("release", "notify", "set_fact"):
        line = f'gatekeeper_shadowed_actions_total{{kind="{kind}",rule_id="{SHADOW}"}} 1.0'
        assert line in metrics, kind
    assert 'gatekeeper_decisions_total{outcome="shadowed"} 1.0' in metrics
    assert 'gatekeeper_actions_total{status="queued",target="escrow-bank"}' not in metrics


async def test_shadowed_actions_are_never_due_after_a_restart(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("rules.yaml", RULES)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("milestone", "design", status="approved"))
    await receiver.wait_for(1)
    await gk.stop()
    gk = await start_daemon(project)
    await asyncio.sleep(0.5)  # the dispatcher looked at the outbox at start
    assert [r.path for r in receiver.received] == ["/ci"]
    status, shadowed = await gk.get("/v1/actions?status=shadowed")
    assert status == 200 and len(shadowed["actions"]) == 3
    assert await gk.daemon.store.due_actions(gk.daemon.clock.now(), 100) == []


async def test_going_live_is_a_change_and_a_shadow_firing_stays_shadowed(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    rule = """
    id: tower-a/each-pay
    project: tower-a
    mode: shadow
    fire: each_time
    when: milestone.design.status == "approved"
    actions:
      - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "10.00",
                  currency: USD, payee: acme}
    """
    project.write_rule("pay.yaml", rule)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("milestone", "design", status="approved"))
    _, before = await gk.get("/v1/rules/tower-a/each-pay")
    assert before["mode"] == "shadow"
    project.write_rule("pay.yaml", rule.replace("    mode: shadow\n", ""))
    assert await gk.daemon.reload()
    _, after = await gk.get("/v1/rules/tower-a/each-pay")
    assert after["mode"] == "live" and after["content_hash"] != before["content_hash"]
    assert "shadowed_releases" not in after
    await gk.post("/v1/facts", fact("milestone", "design", status="draft"))
    await gk.post("/v1/facts", fact("milestone", "design", status="approved"))
    [paid] = await receiver.wait_for(1)
    assert paid.path == "/bank"
    actions = (await gk.get("/v1/actions"))[1]["actions"]
    assert sorted(a["status"] for a in actions if a["kind"] == "release")[-1] == "shadowed"
    assert len([a for a in actions if a["status"] == "shadowed"]) == 1  # never sent later
