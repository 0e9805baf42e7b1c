"""Instances of per-item rules through a real daemon on 127.0.0.1: ``GET /v1/rules/{id}``
lists them (paged, each with its state) or shows one (``?item=``); the audit log and a rule's
decisions are filtered by item; admin acts take an ``item``; facts set by a rule show what
caused them; the command line clients pass ``--item``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from .conftest import Project, Receiver, fact

BUILDS = """
- id: tower-a/build-failed
  project: tower-a
  for_each: build
  when: item.data.status == "failed"
  fire: once
  actions:
    - notify: {target: ci, message: "build ${item.id} failed"}
    - set_fact: {kind: build_note, id: "${item.id}", data: {note: "failed"}}
- id: tower-a/plain
  project: tower-a
  when: milestone.design.status == "approved"
  actions:
    - notify: {target: ci, message: "design approved"}
"""
RULE = "/v1/rules/tower-a/build-failed"


async def started(project_factory: Any, start_daemon: Any, receiver: Receiver) -> Any:
    project: Project = project_factory(receiver.url)
    project.write_rule("builds.yaml", BUILDS)
    gk = await start_daemon(project)
    status, _ = await gk.post(
        "/v1/facts",
        {
            "facts": [
                fact("build", "b1", status="failed"),
                fact("build", "b2", status="passed"),
                fact("build", "b3", status="failed"),
            ]
        },
    )
    assert status == 200
    return gk


async def post_act(gk: Any, act: str, body: dict[str, Any], rule: str = RULE) -> Any:
    return await gk.post(f"{rule}/{act}", body)


async def test_a_per_item_rule_lists_its_instances_in_pages_with_their_states(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await started(project_factory, start_daemon, receiver)
    status, first = await gk.get(f"{RULE}?instances_limit=2")
    assert status == 200, first
    page = first["instance_page"]
    assert [(i["item"], i["state"], i["fired_count"]) for i in page["instances"]] == [
        ("b1", "fired", 1),
        ("b2", "armed", 0),
    ]
    assert page["instances"][0]["last_fired_at"] is not None
    assert page["instances"][1]["last_fired_at"] is None
    assert page["next_cursor"] is not None
    status, second = await gk.get(f"{RULE}?instances_limit=2&cursor={page['next_cursor']}")
    assert status == 200, second
    assert [i["item"] for i in second["instance_page"]["instances"]] == ["b3"]
    assert second["instance_page"]["next_cursor"] is None
    await post_act(gk, "pause", {"reason": "flaky", "item": "b2"})
    _, paused = await gk.get(RULE)
    assert [i["state"] for i in paused["instance_page"]["instances"]] == [
        "fired",
        "paused",
        "fired",
    ]
    status, plain = await gk.get("/v1/rules/tower-a/plain")
    assert status == 200 and "instance_page" not in plain
    status, bad = await gk.get(f"{RULE}?cursor=not-a-cursor")
    assert status == 400 and "cursor" in bad["error"]["message"]
    status, bad = await gk.get(f"{RULE}?instances_limit=0")
    assert status == 400 and "instances_limit" in bad["error"]["message"]


async def test_item_explains_one_instance_and_unknown_items_are_404(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await started(project_factory, start_daemon, receiver)
    status, one = await gk.get(f"{RULE}?item=b2")
    assert status == 200, one
    assert one["item"] == "b2" and "instance_page" not in one
    explanation = one["explanation"]
    assert explanation["item"] == {"kind": "build", "id": "b2", "data": {"status": "passed"}}
    assert explanation["gate_open"] is False and explanation["fired_count"] == 0
    assert explanation["condition"]["clauses"][0]["value"] is False
    assert "approvals" in explanation
    assert {d["instance"] for d in one["recent_decisions"]} == {"b2"}
    status, fired = await gk.get(f"{RULE}?item=b1&limit=1")
    assert status == 200 and fired["fired_count"] == 1
    [decision] = fired["recent_decisions"]
    assert decision["firing_id"] == "tower-a/build-failed[b1]#1"

    status, missing = await gk.get(f"{RULE}?item=b9")
    assert status == 404
    message = missing["error"]["message"]
    assert "tower-a/build-failed" in message and "'b9'" in message
    status, long = await gk.get(f"{RULE}?item={'x' * 3000}")
    assert status == 404 and len(long["error"]["message"]) < 400  # the item is cut
    status, plain = await gk.get("/v1/rules/tower-a/plain?item=b1")
    assert status == 400
    assert "tower-a/plain" in plain["error"]["message"]
    assert "for_each" in plain["error"]["message"]
    status, empty = await gk.get(f"{RULE}?item=")
    assert status == 400 and "item must be an item id" in empty["error"]["message"]
    status, both = await gk.get(f"{RULE}?item=b1&instances_limit=5")
    assert status == 400 and "without item" in both["error"]["message"]


async def test_admin_acts_take_an_item_and_the_audit_log_names_it(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await started(project_factory, start_daemon, receiver)
    await receiver.wait_for(2)  # b1 and b3 failed
    status, rearmed = await post_act(gk, "rearm", {"reason": "retry b3", "item": "b3"})
    assert status == 200, rearmed
    assert rearmed["item"] == "b3"
    assert rearmed["fired_count"] == 2  # re-armed with its gate open: fired again at once
    sent = await receiver.wait_for(3)
    assert [r.body["message"] for r in sent].count("build b3 failed") == 2
    assert [r.body["message"] for r in sent].count("build b1 failed") == 1
    states = gk.daemon.writer.states
    assert states[("tower-a/build-failed", "b1")].fired_count == 1

    status, audit = await gk.get("/v1/audit?item=b3&kind=admin_act")
    assert status == 200
    [act] = audit["entries"]
    assert (act["what"], act["instance"], act["reason"]) == ("rearm", "b3", "retry b3")
    status, decisions = await gk.get("/v1/audit?item=b3&kind=decision")
    assert status == 200
    assert [(e["what"], e["firing_id"]) for e in decisions["entries"]] == [
        ("fired", "tower-a/build-failed[b3]#2"),
        ("fired", "tower-a/build-failed[b3]#1"),
    ]
    assert all(e["instance"] == "b3" for e in decisions["entries"])
    status, none = await gk.get("/v1/audit?item=b2&kind=admin_act")
    assert status == 200 and none["entries"] == []

    status, missing = await post_act(gk, "pause", {"reason": "x", "item": "b9"})
    assert status == 404
    assert "tower-a/build-failed" in missing["error"]["message"]
    assert "'b9'" in missing["error"]["message"]
    status, plain = await post_act(
        gk, "pause", {"reason": "x", "item": "b1"}, rule="/v1/rules/tower-a/plain"
    )
    assert status == 400 and "for_each" in plain["error"]["message"]
    assert not any(s.paused for (r, _), s in gk.daemon.writer.states.items() if r != RULE[10:])
    status, _ = await post_act(gk, "pause", {"reason": "x", "item": ""})
    assert status == 400
    status, audit = await gk.get("/v1/audit?kind=admin_act")
    assert len(audit["entries"]) == 1  # the refused acts changed nothing


async def test_facts_set_by_a_rule_show_what_caused_them(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await started(project_factory, start_daemon, receiver)
    status, listing = await gk.get("/v1/facts")
    assert status == 200
    notes = {f["id"]: f for f in listing["facts"] if f["kind"] == "build_note"}
    assert set(notes) == {"b1", "b3"}
    assert notes["b3"]["caused_by"] == {
        "rule_id": "tower-a/build-failed",
        "instance": "b3",
        "firing_id": "tower-a/build-failed[b3]#1",
        "depth": 1,
    }
    posted = next(f for f in listing["facts"] if f["id"] == "b1" and f["kind"] == "build")
    assert "caused_by" not in posted
    status, snapshot = await gk.get("/v1/export")
    assert status == 200
    exported = {f["id"]: f for f in snapshot["facts"] if f["kind"] == "build_note"}
    assert exported["b1"]["caused_by"]["firing_id"] == "tower-a/build-failed[b1]#1"


async def test_the_cli_passes_item_to_audit_and_admin_acts(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("builds.yaml", BUILDS)
    gk = await start_daemon(project)
    await gk.post(
        "/v1/facts",
        {"facts": [fact("build", "b1", status="failed"), fact("build", "b2", status="failed")]},
    )
    base = [sys.executable, "-m", "gatekeeper"]
    url = ["--url", gk.url, "-c", str(project.config_path)]

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*base, *args, *url], capture_output=True, text=True
        )

    done = await run("rules", "pause", "tower-a/build-failed", "--reason", "noisy", "--item", "b2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tower-a/build-failed[b2]: pause done; paused")
    states = gk.daemon.writer.states
    assert states[("tower-a/build-failed", "b2")].paused
    assert not states[("tower-a/build-failed", "b1")].paused
    refused = await run("rules", "pause", "tower-a/build-failed", "--reason", "x", "--item", "b9")
    assert refused.returncode == 1 and "HTTP 404" in refused.stderr and "b9" in refused.stderr

    listing = await run("audit", "--item", "b2")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any("admin_act tower-a/build-failed[b2]  pause by" in line for line in lines)
    assert any("decision  tower-a/build-failed[b2]  fired" in line for line in lines)
    assert not any("[b1]" in line for line in lines)


async def test_metrics_carry_the_item_only_as_an_openmetrics_exemplar(
    project_factory: Any, start_daemon: Any, receiver: Receiver
) -> None:
    gk = await started(project_factory, start_daemon, receiver)
    async with gk.session.get(gk.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        classic = await response.text()
    assert 'gatekeeper_decisions_total{outcome="fired"} 2.0' in classic
    assert '"b1"' not in classic and '"b3"' not in classic  # never a label value
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with gk.session.get(gk.url + "/metrics", headers={"Accept": accept}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await response.text()
    [line] = [
        x for x in text.splitlines() if x.startswith('gatekeeper_decisions_total{outcome="fired"}')
    ]
    sample, _, example = line.partition(" # ")
    assert sample == 'gatekeeper_decisions_total{outcome="fired"} 2.0'
    assert example.startswith('{item="b3",rule_id="tower-a/build-failed"} 1.0 '), line
    assert text.rstrip().endswith("# EOF")
    assert '"b1"' not in text  # only the latest firing's item, and only as an exemplar
    refused = {"Accept": "application/openmetrics-text;q=0, text/plain"}
    async with gk.session.get(gk.url + "/metrics", headers=refused) as response:
        assert response.headers["Content-Type"].startswith("text/plain")


def test_exemplar_labels_stay_within_the_openmetrics_bound() -> None:
    from gatekeeper.metrics import MAX_EXEMPLAR_CHARS, exemplar

    assert exemplar(item="b1", rule_id="r") == {"item": "b1", "rule_id": "r"}
    long_item = "b" * 120
    assert exemplar(item=long_item, rule_id="tower-a/build-failed") == {"item": long_item}
    assert exemplar(item="x" * MAX_EXEMPLAR_CHARS) is None
