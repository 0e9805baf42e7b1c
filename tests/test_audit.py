"""The audit API: the log of decisions, admin acts and approvals (filtered, cursor-paged),
the stored ruleset versions, and the whole story of a release from its id."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

from .conftest import DEPLOY_RULE, DESIGN_RULE, Project, Receiver, fact
from .test_delivery import wait_status

BATCH = {
    "facts": [
        fact("milestone", "design", status="approved"),
        fact("quality_gate", "qg1", passed=True),
    ]
}


async def test_release_story_from_its_id(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    receiver.path_responses["/bank"] = [503]
    _, posted = await gk.post("/v1/facts", BATCH)
    delivered = await wait_status(gk, "delivered", 2)
    release_id = next(a["action_id"] for a in delivered if a["kind"] == "release")

    status, story = await gk.get(f"/v1/releases/{release_id}")
    assert status == 200
    assert story["release"]["amount"] == "5000.00"
    assert story["release"]["payee"] == "acme-architects"
    decision = story["decision"]
    assert decision["outcome"] == "fired"
    assert decision["request_id"] == posted["request_id"]
    assert decision["evaluation"]["seen"]["quality_gate.qg1"] == {"passed": True}
    assert story["triggered_by"]["seq"] == posted["seqs"][-1]
    assert story["rule"]["file"] == "design.yaml"
    assert story["rule"]["file_text"] == (project.rules_dir / "design.yaml").read_text()
    assert story["rule"]["content_hash"] == decision["rule_hash"]
    assert [a["status_code"] for a in story["delivery_attempts"]] == [503, 200]
    assert (await gk.get("/v1/releases/act_nope"))[0] == 404


async def test_audit_log_filters_and_pages(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    for status in ("completed", "reopened", "completed", "reopened"):
        await gk.post("/v1/facts", fact("task", "T-17", status=status))
    await gk.post("/v1/facts", BATCH)
    await gk.post("/v1/rules/tower-a/deploy-docs/pause", {"reason": "handover freeze"})
    status, log = await gk.get("/v1/audit")
    assert status == 200
    # the act and the decision it caused share their instant, the newest of the log
    act = next(e for e in log["entries"][:2] if e["kind"] == "admin_act")
    assert (act["what"], act["actor"], act["reason"]) == ("pause", "local", "handover freeze")
    assert act["project"] == "tower-a"

    _, fired = await gk.get("/v1/audit?kind=decision&outcome=fired&rule=tower-a/deploy-docs")
    assert [e["firing_id"] for e in fired["entries"]] == [
        "tower-a/deploy-docs#2",
        "tower-a/deploy-docs#1",
    ]

    # page through every decision two at a time: same entries as one big page, no repeats
    _, everything = await gk.get("/v1/audit?kind=decision&limit=1000")
    seen: list[int] = []
    cursor = ""
    for _ in range(50):
        _, page = await gk.get(f"/v1/audit?kind=decision&limit=2{cursor}")
        seen += [e["id"] for e in page["entries"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == [e["id"] for e in everything["entries"]]
    assert len(seen) == len(set(seen)) >= 7

    first = everything["entries"][-1]["at"]
    _, later = await gk.get(f"/v1/audit?kind=decision&since={first}&until=2999-01-01T00:00:00Z")
    assert len(later["entries"]) == len(everything["entries"])
    _, none = await gk.get("/v1/audit?project=tower-b")
    assert none["entries"] == []
    assert (await gk.get("/v1/audit?kind=gossip"))[0] == 400
    assert (await gk.get("/v1/audit?since=yesterday"))[0] == 400
    assert (await gk.get("/v1/audit?cursor=not-a-cursor"))[0] == 400
    for forged in (10**30, -1, True, 1.5):  # a position no row can have: 400, never a 500
        text = json.dumps(["2026-01-01T00:00:00Z", "decision", forged])
        cursor = base64.urlsafe_b64encode(text.encode()).decode()
        status, body = await gk.get(f"/v1/audit?item=b1&cursor={cursor}")
        assert status == 400, (forged, body)
        assert body["error"]["message"] == "cursor is not a next_cursor this API gave out"


async def test_rulesets_are_stored_content_addressed(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    _, first = await gk.get("/v1/rules")
    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("T-17", "T-18"))
    assert await gk.daemon.reload()
    await asyncio.sleep(0.01)
    status, listing = await gk.get("/v1/rulesets")
    assert status == 200
    versions = [r["version"] for r in listing["rulesets"]]
    assert len(versions) == 2 and versions[1] == first["ruleset"]["version"]
    status, old = await gk.get(f"/v1/rulesets/{versions[1]}")
    assert status == 200
    assert 'task["T-17"]' in old["files"]["deploy.yaml"]
    assert (await gk.get("/v1/rulesets/deadbeef"))[0] == 404


async def test_export_is_a_snapshot_plan_reads_and_audit_cli(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    tmp_path: Any,
) -> None:
    import json
    import subprocess
    import sys

    from gatekeeper.cli.snapshot import load_snapshot

    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", BATCH)
    await wait_status(gk, "delivered", 2)
    out = tmp_path / "snapshot.json"
    base = [sys.executable, "-m", "gatekeeper"]
    url = ["--url", gk.url, "-c", str(project.config_path)]
    done = await asyncio.to_thread(
        subprocess.run, [*base, "export", "-o", str(out), *url], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(out.read_text())
    assert [s["fired_count"] for s in snapshot["rule_states"]] == [1]
    assert snapshot["escrows"][0]["released"] == "5000.00"
    loaded = load_snapshot(out)  # what gatekeeper plan --snapshot reads
    assert loaded is not None

    listing = await asyncio.to_thread(
        subprocess.run,
        [*base, "audit", "--kind", "decision", "--outcome", "fired", *url],
        capture_output=True,
        text=True,
    )
    assert listing.returncode == 0, listing.stderr
    assert "tower-a/design-release  fired" in listing.stdout
    release_id = next(
        a["action_id"]
        for a in (await gk.get("/v1/actions"))[1]["actions"]
        if a["kind"] == "release"
    )
    story = await asyncio.to_thread(
        subprocess.run,
        [*base, "audit", "--release", release_id, *url],
        capture_output=True,
        text=True,
    )
    assert json.loads(story.stdout)["release"]["amount"] == "5000.00"
