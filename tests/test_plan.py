"""`gatekeeper plan` and `gatekeeper explain`: what deploying a ruleset would fire, against a
snapshot file or a live daemon, and why a rule stands where it does."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.cli.plan import add_explain_parser, add_plan_parser, run_explain, run_plan
from gatekeeper.config import load_config
from gatekeeper.engine.model import ApprovalInput
from gatekeeper.rules.loader import load_rules_dir

from .conftest import DESIGN_RULE, Project, Receiver, fact

REPO = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data" / "plan"
CONFIG = DATA / "gatekeeper.yaml"
DESIGN = "tower-a/design-release"
MILESTONES = REPO / "rules" / "tower-a" / "milestones.yaml"
DESIGN_LINE = next(
    number
    for number, text in enumerate(MILESTONES.read_text().splitlines(), start=1)
    if text.strip() == f"- id: {DESIGN}"
)
"""The line of the design rule's ``- id:`` in the bundled file, which plan and explain cite."""
AT = "2026-03-20T09:00:00Z"
DESIGN_FACTS = [
    fact("milestone", "design", status="approved", approved_at="2026-03-01T09:00:00Z"),
    fact("quality_gate", "qg_design", passed=True),
]


def gatekeeper(command: str, *argv: str | Path) -> tuple[int, str]:
    """Run ``gatekeeper plan|explain ARGV`` in-process; (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="gatekeeper")
    commands = parser.add_subparsers(dest="command")
    add_plan_parser(commands)
    add_explain_parser(commands)
    args = parser.parse_args([command, *map(str, argv)])
    out = io.StringIO()
    run = run_plan if command == "plan" else run_explain
    return run(args, out), out.getvalue()


def bundled_hashes() -> dict[str, str]:
    ruleset = load_rules_dir(REPO / "rules", load_config(CONFIG)).ruleset
    assert ruleset is not None
    return {rule.id: rule.content_hash for rule in ruleset.rules}


def write_snapshot(path: Path, **parts: Any) -> Path:
    path.write_text(json.dumps({"facts": DESIGN_FACTS, **parts}))
    return path


@pytest.fixture
def without_design(tmp_path: Path) -> Path:
    """A deployment running every bundled rule but the design release, in which the design
    milestone was approved 19 days ago and its QA gate passed."""
    deployed = {k: v for k, v in bundled_hashes().items() if k != DESIGN}
    states = [{"rule_id": rule_id, "fired_count": 0, "gate_open": False} for rule_id in deployed]
    return write_snapshot(
        tmp_path / "snapshot.json",
        rule_states=states,
        approvals={},
        ruleset={"version": "v1", "rules": deployed},
        escrows=[{"escrow": "tower-a-escrow", "released": "1000.00", "pending": "0.00"}],
    )


def test_adding_the_design_rule_shows_its_release(
    without_design: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    code, out = gatekeeper("plan", "-c", CONFIG, "--snapshot", without_design, "--at", AT)
    assert code == 0
    assert "Rules: 1 added, 0 removed, 0 changed, 4 unchanged" in out
    assert f"  + tower-a/design-release  (rules/tower-a/milestones.yaml:{DESIGN_LINE})" in out
    assert (
        "Would fire on deploy: 1 rule\n"
        f"  tower-a/design-release  (once, rules/tower-a/milestones.yaml:{DESIGN_LINE})\n"
        "    release escrow-bank: 5000.00 USD from tower-a-escrow to acme-architects\n"
        '    notify finance-chat: "Released 5000.00 USD to acme-architects from '
        'tower-a-escrow (tower-a/design-release)"\n'
    ) in out
    assert "  tower-a-escrow: 5000.00 USD (remaining after: 44000.00 of 50000.00)" in out
    assert out.splitlines()[-1] == (
        "PLAN: 1 rule would fire on deploy, releasing 5000.00 USD from tower-a-escrow"
    )

    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", without_design, "--at", AT, "--fail-on", "release"
    )
    assert code == 1
    assert out.splitlines()[-1].startswith("FAILED: 1 rule would fire on deploy, releasing")
    assert out.splitlines()[-1].endswith("(--fail-on release)")


def test_plan_json(without_design: Path) -> None:
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", without_design, "--at", AT, "--format", "json"
    )
    report = json.loads(out)
    assert code == 0
    assert [rule["id"] for rule in report["added"]] == [DESIGN]
    assert (report["removed"], report["changed"], report["unchanged"]) == ([], [], 4)
    (firing,) = report["fires"]
    assert (firing["id"], firing["outcome"], firing["line"]) == (DESIGN, "fired", DESIGN_LINE)
    release = firing["actions"][0]
    assert (release["kind"], release["target"]) == ("release", "escrow-bank")
    assert release["payload"]["amount"] == "5000.00"
    assert report["releases"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "amount": "5000.00",
            "limit": "50000.00",
            "remaining_after": "44000.00",
        }
    ]
    assert report["failed"] is False and report["notes"] == []


def test_github_annotations(without_design: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, out = gatekeeper(
        "plan",
        *("-c", CONFIG, "--snapshot", without_design, "--at", AT),
        *("--fail-on", "release", "--format", "github"),
    )
    lines = out.splitlines()
    assert code == 1
    assert lines[0].startswith(
        f"::error file=rules/tower-a/milestones.yaml,line={DESIGN_LINE},title=gatekeeper plan::"
        "rule tower-a/design-release would fire on deploy: release escrow-bank: 5000.00 USD"
    )
    assert lines[1] == (
        f"::notice file=rules/tower-a/milestones.yaml,line={DESIGN_LINE},title=gatekeeper plan::"
        "rule tower-a/design-release is added"
    )
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", without_design, "--at", AT, "--format", "github"
    )
    assert code == 0
    assert out.startswith(f"::warning file=rules/tower-a/milestones.yaml,line={DESIGN_LINE},")


def test_once_rule_that_already_fired_shows_nothing(tmp_path: Path) -> None:
    hashes = bundled_hashes()
    deployed = {**hashes, DESIGN: "0" * 64}  # an older text of the design rule
    snapshot = write_snapshot(
        tmp_path / "fired.json",
        rule_states=[{"rule_id": DESIGN, "fired_count": 1, "gate_open": True}],
        ruleset={"version": "v1", "rules": deployed},
        escrows=[],
    )
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", snapshot, "--at", AT, "--fail-on", "release"
    )
    assert code == 0
    assert "Rules: 0 added, 0 removed, 1 changed, 4 unchanged" in out
    assert "Would fire on deploy: 0 rules" in out
    assert "  tower-a/design-release: already fired (1 time; fire: once)" in out
    assert out.splitlines()[-1] == "PLAN: nothing would fire on deploy"


def test_added_removed_and_changed_rules_are_listed(tmp_path: Path) -> None:
    hashes = bundled_hashes()
    deployed = {k: v for k, v in hashes.items() if k != "tower-a/handover-release"}
    deployed["tower-a/docs-pipeline"] = "1" * 64
    deployed["tower-a/old-rule"] = "2" * 64
    snapshot = write_snapshot(
        tmp_path / "s.json",
        facts=[*DESIGN_FACTS, fact("task", "T-17", status="completed")],
        rule_states=[{"rule_id": "tower-a/docs-pipeline", "fired_count": 3, "gate_open": True}],
        ruleset={"version": "v1", "rules": deployed},
        escrows=[],
    )
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", snapshot, "--at", AT, "--format", "json"
    )
    report = json.loads(out)
    assert code == 0
    assert [r["id"] for r in report["added"]] == ["tower-a/handover-release"]
    assert [r["id"] for r in report["changed"]] == ["tower-a/docs-pipeline"]
    assert report["removed"] == ["tower-a/old-rule"]
    assert report["unchanged"] == 3
    assert report["fires"] == []
    why = {item["id"]: item["why"] for item in report["not_firing"]}
    assert why["tower-a/handover-release"].startswith("condition false: missing")
    assert why["tower-a/docs-pipeline"].startswith("its gate was already open")


def test_a_plain_facts_body_is_a_snapshot_with_notes() -> None:
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", DATA / "facts-only.json", "--at", AT,
        "--fail-on", "any",
    )  # fmt: skip
    assert code == 1
    assert "note: the snapshot holds no rule states" in out
    assert "note: the snapshot does not say which ruleset is deployed" in out
    assert "Rules:" not in out
    assert "  tower-a/design-release  (once, " in out
    assert "  tower-a/docs-pipeline  (each_time, " in out
    assert "    pipeline ci-construction-docs: ref main, inputs" in out
    code, out = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", DATA / "facts-only.json", "--at", AT,
        "--format", "json",
    )  # fmt: skip
    report = json.loads(out)
    assert (report["added"], report["removed"], report["changed"]) == (None, None, None)
    assert len(report["evaluated"]) == 5
    assert len(report["notes"]) == 3


def test_fail_on_release_ignores_firings_without_money(tmp_path: Path) -> None:
    snapshot = tmp_path / "docs.json"
    snapshot.write_text(json.dumps({"facts": [fact("task", "T-17", status="completed")]}))
    code, _ = gatekeeper("plan", "-c", CONFIG, "--snapshot", snapshot, "--fail-on", "release")
    assert code == 0
    code, _ = gatekeeper("plan", "-c", CONFIG, "--snapshot", snapshot, "--fail-on", "any")
    assert code == 1


def test_escrow_limit_from_the_snapshot_blocks_the_release(tmp_path: Path) -> None:
    snapshot = write_snapshot(
        tmp_path / "full.json",
        rule_states=[],
        escrows=[{"escrow": "tower-a-escrow", "released": "40000.00", "unconfirmed": "8000.00"}],
    )
    argv = ("-c", CONFIG, "--snapshot", snapshot, "--at", AT, "--fail-on")
    code, out = gatekeeper("plan", *argv, "release")
    assert code == 0
    assert "Would be blocked on deploy: 1 rule" in out
    assert (
        "    blocked: release of 5000.00 USD exceeds what is left of escrow "
        "'tower-a-escrow': 2000.00 of 50000.00 USD"
    ) in out
    assert "    notify site-ops: " in out  # the alert
    code, _ = gatekeeper("plan", *argv, "any")
    assert code == 1


def test_bad_snapshot_and_bad_time_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = gatekeeper("plan", "-c", CONFIG, "--snapshot", DATA / "bad-snapshot.json")
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid snapshot" in err
    assert "$.facts[0]: 'id' is a required property" in err
    assert "$.rule_states[0].fired_count: -1 is less than the minimum of 0" in err
    assert "Additional properties are not allowed ('extra' was unexpected)" in err
    code, _ = gatekeeper("plan", "-c", CONFIG, "--snapshot", DATA / "gone.json")
    assert code == 2
    code, _ = gatekeeper(
        "plan", "-c", CONFIG, "--snapshot", DATA / "facts-only.json", "--at", "yesterday"
    )
    assert code == 2
    assert "--at:" in capsys.readouterr().err


def test_explain_against_a_snapshot(without_design: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    at = "2026-03-05T09:00:00Z"
    code, out = gatekeeper(
        "explain", DESIGN, "-c", CONFIG, "--snapshot", without_design, "--at", at
    )
    assert code == 0
    assert (
        f"rule tower-a/design-release  (rules/tower-a/milestones.yaml:{DESIGN_LINE}, "
        "project tower-a)" in out
    )
    assert "gate closed at 2026-03-05T09:00:00.000Z: condition false" in out
    assert '  [true ] milestone.design.status == "approved"' in out
    assert "  [false] days_since(milestone.design.approved_at) >= 7" in out
    assert "fired 0 times (fire: once)" in out
    assert "(deadline 2026-03-08T09:00:00.000Z: 3d 0h 0m left)" in out
    code, out = gatekeeper(
        "explain", DESIGN, "-c", CONFIG, "--snapshot", without_design, "--at", at,
        "--format", "json",
    )  # fmt: skip
    report = json.loads(out)
    assert report["rule"]["id"] == DESIGN
    assert report["explanation"]["gate_open"] is False
    assert report["deadlines"] == [
        {
            "clause": "days_since(milestone.design.approved_at) >= 7",
            "changes_at": "2026-03-08T09:00:00.000Z",
            "left_s": 3 * 86400.0,
            "polled": False,
        }
    ]


def test_explain_missing_facts_and_unknown_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = tmp_path / "empty.json"
    snapshot.write_text('{"facts": []}')
    code, out = gatekeeper(
        "explain", "tower-a/structure-release", "-c", CONFIG, "--snapshot", snapshot
    )
    assert code == 0
    assert "missing: milestone.structure" in out
    assert "approvals: 0 of 2 required (approved by nobody; from alice, bob, carol)" in out
    code, _ = gatekeeper("explain", "tower-a/desing-release", "-c", CONFIG, "--snapshot", snapshot)
    assert code == 2
    assert "did you mean 'tower-a/design-release'?" in capsys.readouterr().err


SIGN_OFF = """\
id: tower-a/sign-off
project: tower-a
when: milestone.design.status == "approved"
approvals: {required: REQUIRED, from: [alice, bob]}
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "2000.00",
              currency: USD, payee: reviewers}
"""
BONUS = """\
id: tower-a/bonus
project: tower-a
when: milestone.design.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "1000.00",
              currency: USD, payee: acme-architects}
"""


async def test_plan_and_explain_from_a_live_daemon(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    tmp_path: Path,
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("sign-off.yaml", SIGN_OFF.replace("REQUIRED", "2"))
    gk = await start_daemon(project)
    approved = fact("milestone", "design", status="approved")
    status, _ = await gk.post(
        "/v1/facts", {"facts": [approved, fact("quality_gate", "qg1", passed=True)]}
    )
    assert status == 200
    await receiver.wait_for(2)  # the design release fired: 5000.00 committed
    await gk.daemon.approve(ApprovalInput("tower-a/sign-off", "tower-a", "alice", "approve"))

    candidate = tmp_path / "candidate"
    candidate.mkdir()
    changed_design = DESIGN_RULE.replace('amount: "5000.00"', 'amount: "5500.00"')
    (candidate / "design.yaml").write_text(changed_design)  # changed, but already fired
    (candidate / "sign-off.yaml").write_text(SIGN_OFF.replace("REQUIRED", "1"))  # alice's counts
    (candidate / "bonus.yaml").write_text(BONUS)  # new
    argv = ["-c", project.config_path, "--rules", candidate, "--from", gk.url]
    code, out = await asyncio.to_thread(
        gatekeeper, "plan", *argv, "--fail-on", "release", "--format", "json"
    )
    report = json.loads(out)
    assert code == 1
    assert [r["id"] for r in report["added"]] == ["tower-a/bonus"]
    assert sorted(r["id"] for r in report["changed"]) == [DESIGN, "tower-a/sign-off"]
    assert sorted(f["id"] for f in report["fires"]) == ["tower-a/bonus", "tower-a/sign-off"]
    assert {i["id"]: i["outcome"] for i in report["not_firing"]} == {DESIGN: "already_fired"}
    assert report["releases"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "amount": "3000.00",
            "limit": "20000.00",
            "remaining_after": "12000.00",
        }
    ]
    assert report["snapshot"]["source"] == gk.url
    assert report["notes"] == []
    assert len(receiver.received) == 2  # planning sent nothing

    code, out = await asyncio.to_thread(
        gatekeeper, "explain", "tower-a/sign-off", "-c", project.config_path, "--from", gk.url
    )
    assert code == 0
    assert "gate closed at " in out
    assert "approvals: 1 of 2 required (approved by alice; from alice, bob)" in out
    assert f"against: {gk.url}" in out


def test_unreachable_daemon_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "gatekeeper.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen: 127.0.0.1:9
            rules_dir: {REPO / "rules"}
            targets:
              escrow-bank: {{url: "http://127.0.0.1:9/b", secret_env: A}}
              finance-chat: {{url: "http://127.0.0.1:9/c", secret_env: A}}
              site-ops: {{url: "http://127.0.0.1:9/s", secret_env: A}}
              ci-construction-docs: {{url: "http://127.0.0.1:9/ci", secret_env: A}}
            escrows:
              tower-a-escrow: {{currency: USD, limit: "50000.00"}}
            """
        )
    )
    code, _ = gatekeeper("plan", "-c", config)
    assert code == 2
    assert "cannot reach gatekeeper at http://127.0.0.1:9/v1/facts" in capsys.readouterr().err
