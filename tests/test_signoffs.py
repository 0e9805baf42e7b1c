"""The two-person rule for money rules (``money_rule_approvals: 2``) through a real daemon on
127.0.0.1, with real API tokens and a receiver that records every request: a new release
rule runs shadowed (``awaiting_signoff``) and the alert target hears of it once per content
hash; sign-offs are audited admin acts on an exact content hash, refused (with nothing
changed) for bad input, an unknown hash, a rule that moves no money, or a second sign-off
of the same admin; the second admin's sign-off lets the next firing be sent while the
earlier ones stay shadowed; a change of the rule needs new sign-offs; a restart keeps them;
``gatekeeper rules signoff`` does the same from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.http.auth import hash_token

from .conftest import ENV, Project, Receiver, Running, fact
from .test_plan import gatekeeper

TOKENS = {
    "ops": "gk_ops-token-for-signoff-tests-000000000000000",
    "dana": "gk_dana-token-for-signoff-tests-00000000000000",
    "alice": "gk_alice-token-for-signoff-tests-0000000000000",
    "feeder": "gk_feeder-token-for-signoff-tests-000000000000",
}
SCOPES = {
    "ops": ["admin", "read"],
    "dana": ["admin", "read"],
    "alice": ["approve", "read"],
    "feeder": ["facts:write"],
}
PAY = """
- id: tower-a/pay
  project: tower-a
  fire: each_time
  when: milestone.design.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "10.00",
                currency: USD, payee: acme}
- id: tower-a/tell
  project: tower-a
  when: milestone.design.status == "approved"
  actions:
    - notify: {target: ci, message: "design approved"}
"""
PAY_ID = "tower-a/pay"
ALERT = "money_rule_awaiting_signoff"


def tokens_yaml() -> list[dict[str, Any]]:
    return [
        {"subject": s, "sha256": hash_token(TOKENS[s]), "scopes": SCOPES[s], "projects": ["*"]}
        for s in TOKENS
    ]


async def call(gk: Running, method: str, path: str, who: str | None, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    async with gk.session.request(method, gk.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def post_fact(gk: Running, status: str) -> None:
    design = fact("milestone", "design", status=status)
    answer = await call(gk, "POST", "/v1/facts", "feeder", design)
    assert answer[0] == 200, answer


async def pay_rule(gk: Running) -> dict[str, Any]:
    status, rule = await call(gk, "GET", f"/v1/rules/{PAY_ID}", "ops")
    assert status == 200, rule
    return dict(rule)


async def signoff(gk: Running, who: str | None, content_hash: str, body: Any = None) -> Any:
    return await call(gk, "POST", f"/v1/money-rules/{content_hash}/signoffs", who, body)


def alerts(receiver: Receiver) -> list[dict[str, Any]]:
    """The sign-off alerts the alert target (finance-chat, Slack format) received."""
    return [r.body for r in receiver.received if r.path == "/chat"]


def bank(receiver: Receiver) -> list[dict[str, Any]]:
    return [r.body for r in receiver.received if r.path == "/bank"]


async def audited_signoffs(gk: Running) -> list[tuple[str, str, str | None]]:
    status, audit = await call(gk, "GET", "/v1/audit?kind=admin_act", "ops")
    assert status == 200, audit
    return [
        (e["actor"], e["rule_hash"], e["reason"])
        for e in reversed(audit["entries"])
        if e["what"] == "signoff"
    ]


@pytest.fixture
def project(project_factory: Any, receiver: Receiver) -> Project:
    made: Project = project_factory(
        receiver.url, tokens=tokens_yaml(), money_rule_approvals=2, alert_target="finance-chat"
    )
    made.write_rule("pay.yaml", PAY)
    return made


async def test_two_admins_sign_off_then_the_next_firing_is_sent(
    project: Project, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await start_daemon(project)
    rule = await pay_rule(gk)
    first_hash = rule["content_hash"]
    assert rule["mode"] == "awaiting_signoff"
    assert rule["signoff"] == {
        "content_hash": first_hash,
        "required": 2,
        "missing": 2,
        "signed_by": [],
    }
    assert rule["shadowed_releases"] == []

    # awaiting sign-off: the release is shadowed; the alert target is told once
    await post_fact(gk, "approved")
    await receiver.wait_for(2)  # the live notify rule and the alert
    await post_fact(gk, "draft")
    await post_fact(gk, "approved")
    await asyncio.sleep(0.3)
    assert bank(receiver) == []
    [alert] = alerts(receiver)
    shadowed = (await call(gk, "GET", "/v1/actions?status=shadowed", "ops"))[1]["actions"]
    releases = sorted(shadowed, key=lambda a: a["created_at"])
    assert [a["kind"] for a in releases] == ["release", "release"]
    assert first_hash[:12] in alert["text"] and releases[0]["action_id"] in alert["text"]
    status, stored_alert = await call(gk, "GET", "/v1/actions?limit=100", "ops")
    [told] = [a for a in stored_alert["actions"] if a["payload"].get("alert") == ALERT]
    assert told["status"] != "shadowed"
    named = ("rule_id", "content_hash", "required", "release_id")
    assert {k: told["payload"][k] for k in named} == {
        "rule_id": PAY_ID,
        "content_hash": first_hash,
        "required": 2,
        "release_id": releases[0]["action_id"],
    }
    rule = await pay_rule(gk)
    assert rule["shadowed_releases"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "count": 2,
            "amount": "20.00",
            "first_release_id": releases[0]["action_id"],
        }
    ]
    assert [d["outcome"] for d in rule["recent_decisions"][:3]] == [
        "shadowed",
        "not_met",
        "shadowed",
    ]
    assert rule["recent_decisions"][0]["mode"] == "awaiting_signoff"
    _, escrows = await call(gk, "GET", "/v1/escrows", "ops")
    assert escrows["escrows"][0]["remaining"] == "20000.00"

    # the first admin signs off; the same admin again is refused and changes nothing
    status, signed = await signoff(gk, "ops", first_hash, {"comment": "checked the payee"})
    assert status == 200, signed
    assert signed["mode"] == "awaiting_signoff" and signed["signoff"]["missing"] == 1
    assert [s["actor"] for s in signed["signoff"]["signed_by"]] == ["ops"]
    status, again = await signoff(gk, "ops", first_hash, {"comment": "twice"})
    assert status == 409
    assert "already signed off" in again["error"]["message"]
    assert "another admin" in again["error"]["message"]
    assert await audited_signoffs(gk) == [("ops", first_hash, "checked the payee")]

    # the second admin: live from the next evaluation; earlier firings stay shadowed
    status, signed = await signoff(gk, "dana", first_hash)
    assert status == 200, signed
    assert signed["mode"] == "live" and signed["signoff"]["missing"] == 0
    await asyncio.sleep(0.2)
    assert bank(receiver) == []
    await post_fact(gk, "draft")
    await post_fact(gk, "approved")
    [paid] = await wait_for_bank(receiver, 1)
    assert paid["amount"] == "10.00"
    await asyncio.sleep(0.2)
    assert len(bank(receiver)) == 1  # the shadowed ones are never sent later
    status, still = await call(gk, "GET", "/v1/actions?status=shadowed", "ops")
    assert len(still["actions"]) == 2
    assert await audited_signoffs(gk) == [
        ("ops", first_hash, "checked the payee"),
        ("dana", first_hash, None),
    ]
    assert len(alerts(receiver)) == 1

    # a change of the rule is a new hash: shadowed again until two admins sign it off
    project.write_rule("pay.yaml", PAY.replace('"10.00"', '"12.00"'))
    assert await gk.daemon.reload()
    rule = await pay_rule(gk)
    second_hash = rule["content_hash"]
    assert second_hash != first_hash
    assert rule["mode"] == "awaiting_signoff" and rule["signoff"]["missing"] == 2
    assert rule["shadowed_releases"] == []
    await post_fact(gk, "draft")
    await post_fact(gk, "approved")
    await asyncio.sleep(0.3)
    assert len(bank(receiver)) == 1
    told = alerts(receiver)
    assert len(told) == 2 and second_hash[:12] in told[1]["text"]

    # a restart keeps the sign-offs: going back to the signed text runs live at once
    await gk.stop()
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    rule = await pay_rule(gk)
    assert rule["content_hash"] == first_hash and rule["mode"] == "live"
    assert [s["actor"] for s in rule["signoff"]["signed_by"]] == ["dana", "ops"]
    await post_fact(gk, "draft")
    await post_fact(gk, "approved")
    await wait_for_bank(receiver, 2)


async def wait_for_bank(receiver: Receiver, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        if len(bank(receiver)) >= count:
            return bank(receiver)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the bank got {len(bank(receiver))} release(s), not {count}")


@pytest.mark.parametrize(
    ("who", "content_hash", "body", "status", "message"),
    [
        ("ops", "not-a-hash", {}, 400, "64 lowercase hex digits"),
        ("ops", "A" * 64, {}, 400, "64 lowercase hex digits"),
        ("ops", "0" * 64, {}, 404, "no rule of the active ruleset"),
        ("ops", "TELL", {}, 422, "only money rules are signed off"),
        ("ops", "PAY", {"comment": 7}, 400, "not a valid sign-off"),
        ("ops", "PAY", {"comment": "x" * 2001}, 400, "not a valid sign-off"),
        ("ops", "PAY", {"who": "dana"}, 400, "not a valid sign-off"),
        ("alice", "PAY", {}, 403, "scope"),
        (None, "PAY", {}, 401, ""),
    ],
)
async def test_bad_signoffs_are_refused_and_change_nothing(
    project: Project,
    start_daemon: Any,
    who: str | None,
    content_hash: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    gk = await start_daemon(project)
    hashes = {r.id: r.content_hash for r in gk.daemon.rules()}
    content_hash = {"PAY": hashes[PAY_ID], "TELL": hashes["tower-a/tell"]}.get(
        content_hash, content_hash
    )
    got, answer = await signoff(gk, who, content_hash, body)
    assert got == status, answer
    assert message in answer["error"]["message"]
    assert await audited_signoffs(gk) == []
    assert (await pay_rule(gk))["signoff"]["missing"] == 2
    assert await gk.daemon.store.load_signoffs() == {}


async def test_a_shadow_money_rule_takes_no_signoff(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url, tokens=tokens_yaml(), money_rule_approvals=1)
    project.write_rule("pay.yaml", PAY.replace("  fire: each_time\n", "  mode: shadow\n", 1))
    gk = await start_daemon(project)
    rule = await pay_rule(gk)
    assert rule["mode"] == "shadow"
    status, answer = await signoff(gk, "ops", rule["content_hash"])
    assert status == 422 and "mode: shadow" in answer["error"]["message"]
    assert await audited_signoffs(gk) == []


async def test_signoffs_need_tokens(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url, money_rule_approvals=1)
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    [pay] = [r for r in gk.daemon.rules() if r.id == PAY_ID]
    status, answer = await gk.post(f"/v1/money-rules/{pay.content_hash}/signoffs", {})
    assert status == 403 and "need API tokens" in answer["error"]["message"]
    assert await gk.daemon.store.load_signoffs() == {}


async def test_the_cli_signs_off_and_exits_2_on_bad_input(
    project: Project, start_daemon: Any
) -> None:
    gk = await start_daemon(project)
    content_hash = (await pay_rule(gk))["content_hash"]
    base = [sys.executable, "-m", "gatekeeper", "rules", "signoff"]
    options = ["--url", gk.url, "-c", str(project.config_path)]

    async def run(who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **ENV, "GATEKEEPER_TOKEN": TOKENS[who]}
        return await asyncio.to_thread(
            subprocess.run, [*base, *args, *options], capture_output=True, text=True, env=env
        )

    done = await run("ops", content_hash, "--comment", "payee checked")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{PAY_ID} ({content_hash[:12]}): signed off; 1 of 2 (ops)")
    assert "1 more needed" in done.stdout
    twice = await run("ops", content_hash)
    assert twice.returncode == 2
    assert "HTTP 409" in twice.stderr and "already signed off" in twice.stderr
    unknown = await run("dana", "f" * 64)
    assert unknown.returncode == 2 and "HTTP 404" in unknown.stderr
    done = await run("dana", content_hash)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 (dana, ops); it runs live from its next evaluation" in done.stdout
    assert [actor for actor, _, _ in await audited_signoffs(gk)] == ["ops", "dana"]


BONUS = """
id: tower-a/bonus
project: tower-a
when: milestone.design.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "99.00",
              currency: USD, payee: acme}
"""


async def test_plan_and_explain_show_the_money_rules_awaiting_signoff(
    project: Project,
    start_daemon: Any,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gk = await start_daemon(project)
    await post_fact(gk, "approved")
    first_hash = (await pay_rule(gk))["content_hash"]
    assert (await signoff(gk, "ops", first_hash, {"comment": "ok"}))[0] == 200
    await receiver.wait_for(2)  # the notify rule and the alert
    monkeypatch.setenv("GATEKEEPER_TOKEN", TOKENS["ops"])
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "pay.yaml").write_text(textwrap.dedent(PAY))
    (candidate / "bonus.yaml").write_text(textwrap.dedent(BONUS))
    argv = ["-c", project.config_path, "--rules", candidate, "--from", gk.url]

    code, out = await asyncio.to_thread(
        gatekeeper, "plan", *argv, "--fail-on", "release", "--format", "json"
    )
    assert code == 0, out  # the new release would run shadowed: nothing would be sent
    report = json.loads(out)
    [bonus] = report["fires"]
    assert (bonus["id"], bonus["mode"], bonus["outcome"]) == (
        "tower-a/bonus",
        "awaiting_signoff",
        "shadowed",
    )
    assert report["releases"] == []
    awaiting = {rule["id"]: rule for rule in report["awaiting_signoff"]}
    assert set(awaiting) == {PAY_ID, "tower-a/bonus"}
    pay = awaiting[PAY_ID]
    assert (pay["content_hash"], pay["required"], pay["missing"]) == (first_hash, 2, 1)
    assert [(s["actor"], s["comment"]) for s in pay["signed_by"]] == [("ops", "ok")]
    [held] = pay["shadowed_releases"]
    assert (held["count"], held["amount"], held["escrow"]) == (1, "10.00", "tower-a-escrow")
    assert awaiting["tower-a/bonus"]["missing"] == 2
    assert awaiting["tower-a/bonus"]["shadowed_releases"] == []

    code, out = await asyncio.to_thread(gatekeeper, "plan", *argv)
    assert code == 0, out
    assert "Would fire in shadow on deploy (nothing sent): 1 rule" in out
    assert "Money rules awaiting sign-off: 2 rules" in out
    assert f"{PAY_ID}  (content hash {first_hash[:12]}): signed off by ops; 1 more of 2" in out
    assert "shadowed meanwhile: 1 release, 10.00 USD from tower-a-escrow (not sent)" in out
    assert "PLAN: nothing would fire on deploy (1 more rule in shadow, sending nothing)" in out

    code, out = await asyncio.to_thread(
        gatekeeper, "explain", PAY_ID, "-c", project.config_path, "--from", gk.url
    )
    assert code == 0, out
    assert "mode: awaiting_signoff (its firings are stored as shadowed, never sent)" in out
    assert f"sign-offs of content hash {first_hash[:12]}: 1 of 2 (ops)" in out
    assert bank(receiver) == []
