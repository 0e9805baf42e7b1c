"""`gatekeeper plan` and `gatekeeper explain` with per-item rules: the plan names the item
of each instance that would (not) fire and `--item` narrows the listing to one; explain
`--item` explains one instance (its item, state and approvals), and refuses an unknown item
or an item on a rule without for_each (exit 2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import Project, Receiver, fact
from .test_plan import CONFIG, gatekeeper

RULES = """
- id: tower-a/build-failed
  project: tower-a
  for_each: build
  when: item.data.status == "failed"
  actions:
    - notify: {target: site-ops, message: "build ${item.id} failed"}
- id: tower-a/plain
  project: tower-a
  when: milestone.design.status == "approved"
  actions:
    - notify: {target: site-ops, message: "design approved"}
"""
AT = "2026-03-20T09:00:00Z"


@pytest.fixture
def candidate(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "builds.yaml").write_text(RULES)
    return rules


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.json"
    facts = [
        fact("build", "b1", status="failed"),
        fact("build", "b2", status="passed"),
        fact("build", "b3", status="failed"),
    ]
    states = [
        {"rule_id": "tower-a/build-failed", "instance": "b3", "fired_count": 1, "gate_open": True}
    ]
    path.write_text(json.dumps({"facts": facts, "rule_states": states}))
    return path


def test_the_plan_names_items_and_item_narrows_it(candidate: Path, snapshot: Path) -> None:
    argv = ["-c", CONFIG, "--rules", candidate, "--snapshot", snapshot, "--at", AT]
    code, out = gatekeeper("plan", *argv)
    assert code == 0, out
    assert "  tower-a/build-failed[b1]  (once, " in out
    assert '    notify site-ops: "build b1 failed"' in out
    assert "  tower-a/build-failed[b2]: condition false" in out
    assert "  tower-a/build-failed[b3]: already fired (1 time; fire: once)" in out
    assert "  tower-a/plain: condition false: missing milestone.design" in out

    code, out = gatekeeper("plan", *argv, "--item", "b2", "--format", "json")
    report = json.loads(out)
    assert report["item"] == "b2"
    assert report["fires"] == []  # b1's firing is not listed...
    assert [(n["id"], n.get("item")) for n in report["not_firing"]] == [
        ("tower-a/build-failed", "b2"),
        ("tower-a/plain", None),
    ]
    code, out = gatekeeper("plan", *argv, "--item", "b2", "--fail-on", "any")
    assert code == 1  # ...but still counts
    assert "Instances of per-item rules: only item 'b2' (--item)" in out
    assert "[b1]" not in out

    code, out = gatekeeper("plan", *argv, "--format", "json")
    fires = json.loads(out)["fires"]
    assert [(f["id"], f["item"], f["firing_id"]) for f in fires] == [
        ("tower-a/build-failed", "b1", "tower-a/build-failed[b1]#1")
    ]


def test_explain_item_explains_one_instance(candidate: Path, snapshot: Path) -> None:
    argv = ["-c", CONFIG, "--rules", candidate, "--snapshot", snapshot, "--at", AT]
    code, out = gatekeeper("explain", "tower-a/build-failed", *argv, "--item", "b3")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("rule tower-a/build-failed[b3]  (")
    assert "for each build: 3 instances (b1, b2, b3)" in lines
    assert 'item: build b3 = {"status": "failed"}' in lines
    assert "fired 1 time (fire: once)" in lines
    code, out = gatekeeper("explain", "tower-a/build-failed", *argv, "--format", "json")
    report = json.loads(out)
    assert report["item"] is None and report["explanation"]["item"] is None
    assert report["instances"] == {"count": 3, "items": ["b1", "b2", "b3"]}
    code, out = gatekeeper("explain", "tower-a/build-failed", *argv)
    assert "(explained without an item: pass --item ID to explain one instance)" in out


def test_explain_refuses_unknown_items_and_items_of_plain_rules(
    candidate: Path, snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["-c", CONFIG, "--rules", candidate, "--snapshot", snapshot, "--at", AT]
    code, out = gatekeeper("explain", "tower-a/build-failed", *argv, "--item", "b9")
    assert code == 2 and out == ""
    err = capsys.readouterr().err
    assert "rule 'tower-a/build-failed' has no instance 'b9'" in err
    code, out = gatekeeper("explain", "tower-a/plain", *argv, "--item", "b1")
    assert code == 2 and out == ""
    assert "rule 'tower-a/plain' has no for_each" in capsys.readouterr().err


async def test_explain_an_instance_of_a_live_daemon(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("builds.yaml", RULES.replace("site-ops", "ci"))
    gk = await start_daemon(project)
    await gk.post(
        "/v1/facts",
        {"facts": [fact("build", "b1", status="failed"), fact("build", "b2", status="passed")]},
    )
    await receiver.wait_for(1)
    argv = ["-c", project.config_path, "--from", gk.url]
    code, out = await asyncio.to_thread(
        gatekeeper, "explain", "tower-a/build-failed", *argv, "--item", "b1"
    )
    assert code == 0, out
    assert "rule tower-a/build-failed[b1]" in out
    assert "fired 1 time (fire: once), last at " in out
    code, out = await asyncio.to_thread(
        gatekeeper, "explain", "tower-a/build-failed", *argv, "--item", "b2"
    )
    assert code == 0 and "fired 0 times" in out and "gate closed" in out

    # a plan against the daemon knows each instance's state: b1 fired already
    candidate = project.root / "candidate"
    candidate.mkdir()
    (candidate / "builds.yaml").write_text(
        RULES.replace("site-ops", "ci").replace("build ${", "b ${")
    )
    code, out = await asyncio.to_thread(
        gatekeeper, "plan", *argv, "--rules", candidate, "--format", "json"
    )
    report = json.loads(out)
    assert report["fires"] == [], report["fires"]
    assert {(n["id"], n.get("item")): n["outcome"] for n in report["not_firing"]} == {
        ("tower-a/build-failed", "b1"): "already_fired",
        ("tower-a/build-failed", "b2"): "not_met",
    }
