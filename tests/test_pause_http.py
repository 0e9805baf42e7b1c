"""Pausing a per-item rule as a whole, through a real daemon on 127.0.0.1: a pause without
``item`` holds every instance, those whose item is posted later too, and works before the
rule has any instance; it is kept across a restart; resume lifts it (an instance paused by
its item stays paused); the rule views show the pause; acts on a rule as a whole say in
their answer, the audit log and the command line how many instances they changed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from .conftest import Project, Receiver, fact

PAY = """
- id: tower-a/pay-build
  project: tower-a
  for_each: build
  when: item.data.status == "passed"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "100.00", currency: USD,
                payee: acme}
"""
RULE = "/v1/rules/tower-a/pay-build"
RULE_ID = "tower-a/pay-build"


async def releases(gk: Any) -> list[str]:
    """The instances whose releases are in the outbox, sorted."""
    return sorted(a.instance for a in await gk.daemon.store.list_actions() if a.kind == "release")


async def last_outcome(gk: Any, item: str) -> str:
    [decision] = await gk.daemon.store.list_decisions(RULE_ID, 1, instance=item)
    return str(decision.outcome)


async def admin_acts(gk: Any) -> list[tuple[str, str | None, int | None]]:
    """The admin acts in the audit log, oldest first: (act, item, instances)."""
    status, audit = await gk.get("/v1/audit?kind=admin_act")
    assert status == 200, audit
    return [(e["what"], e.get("instance"), e.get("instances")) for e in audit["entries"]][::-1]


async def test_a_paused_per_item_rule_holds_items_posted_later_across_a_restart(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    assert (await gk.post("/v1/facts", fact("build", "b1", status="queued")))[0] == 200

    status, paused = await gk.post(f"{RULE}/pause", {"reason": "bank incident"})
    assert status == 200, paused
    assert paused["paused"] is True and paused["explanation"]["paused"] is True
    assert paused["acted_on"] == 1
    status, listing = await gk.get("/v1/rules")
    assert status == 200
    [listed] = [r for r in listing["rules"] if r["id"] == RULE_ID]
    assert listed["paused"] is True

    assert (await gk.post("/v1/facts", fact("build", "b2", status="passed")))[0] == 200
    assert (await gk.post("/v1/facts", fact("build", "b1", status="passed")))[0] == 200
    assert await releases(gk) == []
    assert [await last_outcome(gk, item) for item in ("b1", "b2")] == ["paused", "paused"]
    status, detail = await gk.get(RULE)
    assert status == 200 and detail["paused"] is True
    rows = detail["instance_page"]["instances"]
    assert [(r["item"], r["state"], r["paused"]) for r in rows] == [
        ("b1", "paused", True),
        ("b2", "paused", True),
    ]
    status, one = await gk.get(f"{RULE}?item=b2")
    assert status == 200 and one["paused"] is True and one["explanation"]["paused"] is True
    assert one["explanation"]["gate_open"] is True and one["fired_count"] == 0
    status, again = await gk.post(f"{RULE}/pause", {"reason": "twice"})
    assert status == 409 and "already paused" in again["error"]["message"]
    status, one_only = await gk.post(f"{RULE}/resume", {"reason": "just b1", "item": "b1"})
    assert status == 409 and "paused as a whole" in one_only["error"]["message"]
    await gk.stop()

    gk = await start_daemon(project)  # the pause is in the database, not only in memory
    assert gk.daemon.writer.states[(RULE_ID, "")].paused
    status, detail = await gk.get(RULE)
    assert status == 200 and detail["paused"] is True
    assert (await gk.post("/v1/facts", fact("build", "b3", status="passed")))[0] == 200
    assert await last_outcome(gk, "b3") == "paused"
    assert await releases(gk) == []

    status, resumed = await gk.post(f"{RULE}/resume", {"reason": "bank back"})
    assert status == 200, resumed
    assert resumed["paused"] is False and resumed["acted_on"] == 3
    assert await releases(gk) == ["b1", "b2", "b3"]  # held gates that opened fire now
    sent = await receiver.wait_for(3)
    assert sorted(r.body["item"]["id"] for r in sent if r.path == "/bank") == ["b1", "b2", "b3"]
    assert await admin_acts(gk) == [("pause", None, 1), ("resume", None, 3)]
    status, again = await gk.post(f"{RULE}/resume", {"reason": "twice"})
    assert status == 409 and "not paused" in again["error"]["message"]
    assert len(await admin_acts(gk)) == 2  # the refused acts changed nothing


async def test_a_per_item_rule_is_paused_before_it_has_any_item(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    status, paused = await gk.post(f"{RULE}/pause", {"reason": "bank incident"})
    assert status == 200, paused
    assert (paused["paused"], paused["instances"], paused["acted_on"]) == (True, 0, 0)
    assert await admin_acts(gk) == [("pause", None, 0)]
    assert (await gk.post("/v1/facts", fact("build", "b1", status="passed")))[0] == 200
    assert await last_outcome(gk, "b1") == "paused"
    assert await releases(gk) == []
    status, one = await gk.get(f"{RULE}?item=b1")
    assert status == 200 and one["paused"] is True
    status, export = await gk.get("/v1/export")
    assert status == 200
    assert {"rule_id": RULE_ID, "paused": True}.items() <= next(
        s for s in export["rule_states"] if s["rule_id"] == RULE_ID and "instance" not in s
    ).items()


async def test_an_instance_paused_by_its_item_stays_paused_when_the_rule_resumes(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    queued = [fact("build", b, status="queued") for b in ("b1", "b2")]
    assert (await gk.post("/v1/facts", {"facts": queued}))[0] == 200
    assert (await gk.post(f"{RULE}/pause", {"reason": "b1 disputed", "item": "b1"}))[0] == 200
    status, paused = await gk.post(f"{RULE}/pause", {"reason": "bank incident"})
    assert status == 200 and paused["acted_on"] == 1  # b1 was held already
    passed = [fact("build", b, status="passed") for b in ("b1", "b2")]
    assert (await gk.post("/v1/facts", {"facts": passed}))[0] == 200
    assert await releases(gk) == []

    status, resumed = await gk.post(f"{RULE}/resume", {"reason": "bank back"})
    assert status == 200 and resumed["acted_on"] == 1
    assert await releases(gk) == ["b2"]  # b1 keeps the pause its item was given
    status, detail = await gk.get(RULE)
    rows = detail["instance_page"]["instances"]
    assert [(r["item"], r["state"]) for r in rows] == [("b1", "paused"), ("b2", "fired")]
    assert detail["paused"] is False

    status, b1 = await gk.post(f"{RULE}/resume", {"reason": "dispute settled", "item": "b1"})
    assert status == 200 and b1["paused"] is False and "acted_on" not in b1
    assert await releases(gk) == ["b1", "b2"]
    assert await admin_acts(gk) == [
        ("pause", "b1", None),
        ("pause", None, 1),
        ("resume", None, 1),
        ("resume", "b1", None),
    ]


NOTIFY = """
- id: tower-a/build-failed
  project: tower-a
  for_each: build
  when: item.data.status == "failed"
  actions:
    - notify: {target: ci, message: "build ${item.id} failed"}
"""


async def test_the_cli_says_how_many_instances_an_act_on_the_whole_rule_changed(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("builds.yaml", NOTIFY)
    gk = await start_daemon(project)
    builds = [fact("build", "b1", status="failed"), fact("build", "b2", status="failed")]
    await gk.post("/v1/facts", {"facts": [*builds, fact("build", "b3", status="passed")]})
    await receiver.wait_for(2)
    base = [sys.executable, "-m", "gatekeeper"]
    url = ["--url", gk.url, "-c", str(project.config_path)]

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*base, *args, *url], capture_output=True, text=True
        )

    done = await run("rules", "rearm", "tower-a/build-failed", "--reason", "ci fixed")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tower-a/build-failed: rearm done, 2 instances re-armed;")
    await receiver.wait_for(4)  # re-armed with their gates open: b1 and b2 fired again
    done = await run("rules", "pause", "tower-a/build-failed", "--reason", "noisy")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tower-a/build-failed: pause done, 3 instances paused of 3;")
    assert "; paused," in done.stdout

    listing = await run("audit", "--kind", "admin_act")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any("tower-a/build-failed  rearm (2 instances) by" in line for line in lines)
    assert any("tower-a/build-failed  pause (3 instances) by" in line for line in lines)
    status, audit = await gk.get("/v1/audit?kind=admin_act")
    assert status == 200
    assert [e["instances"] for e in audit["entries"]] == [3, 2]


async def test_plan_and_explain_from_a_live_daemon_see_the_rule_paused_as_a_whole(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    from .test_plan import gatekeeper

    project: Project = project_factory(receiver.url)
    project.write_rule("builds.yaml", NOTIFY)
    gk = await start_daemon(project)
    status, _ = await gk.post("/v1/rules/tower-a/build-failed/pause", {"reason": "x"})
    assert status == 200
    await gk.post("/v1/facts", fact("build", "b1", status="failed"))
    argv = ["-c", project.config_path, "--from", gk.url]
    code, out = await asyncio.to_thread(
        gatekeeper, "explain", "tower-a/build-failed", *argv, "--item", "b1"
    )
    assert code == 0, out
    assert "PAUSED" in out
    candidate = project.root / "candidate"
    candidate.mkdir()
    (candidate / "builds.yaml").write_text(NOTIFY.replace("build ${", "b ${"))
    code, out = await asyncio.to_thread(
        gatekeeper, "plan", *argv, "--rules", candidate, "--format", "json"
    )
    report = json.loads(out)
    assert report["fires"] == [], report["fires"]
    assert {(n["id"], n.get("item")): n["outcome"] for n in report["not_firing"]} == {
        ("tower-a/build-failed", "b1"): "paused"
    }
