"""``gatekeeper backtest`` on real histories: a real daemon records the construction
example's facts, approvals, admin acts, deadlines, a restart and a reload over real HTTP
into a real SQLite file; the backtest then replays that file (read-only, the daemon still
running) against candidate rulesets, and the self-check against the recorded versions."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatekeeper.cli.backtest import run_backtest_command
from gatekeeper.cli.main import build_parser
from gatekeeper.clock import FixedClock

from .conftest import ENV, Project, Receiver, Running
from .test_auth import TOKENS, tokens_yaml

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

ITEMS = """\
- id: tower-a/task-done
  project: tower-a
  for_each: task
  when: item.data.status == "completed"
  actions:
    - set_fact: {kind: task_status, id: "${item.id}", data: {status: done, by: "${item.id}"}}
- id: tower-a/task-paid
  project: tower-a
  for_each: task_status
  when: item.data.status == "done"
  approvals: {required: 1, from: [alice, bob], notify: finance-chat}
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "100.00",
                currency: USD, payee: site-crew}
    - notify: {target: finance-chat, message: "task ${item.id} paid"}
"""


def write_deployment(root: Path, receiver_url: str) -> Project:
    """The construction example (its rules and gatekeeper.yaml, targets moved to the
    receiver) plus per-item rules that set facts and wait for approvals."""
    project = Project(root)
    shutil.copytree(REPO / "rules", project.rules_dir)
    (project.rules_dir / "tower-a" / "items.yaml").write_text(ITEMS)
    config = yaml.safe_load((REPO / "gatekeeper.yaml").read_text())
    config["listen"] = "127.0.0.1:0"
    config["database"] = "state/gatekeeper.db"
    config["rules_dir"] = "rules"
    for target in config["targets"].values():
        target["url"] = target["url"].replace("http://127.0.0.1:8090", receiver_url)
        target["secret_env"] = "BANK_SECRET"
        target.pop("delivery", None)
    config["tokens"] = tokens_yaml()
    project.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return project


@dataclass
class Recorder:
    """Drives a daemon over HTTP with a clock that moves one second per step."""

    gk: Running
    clock: FixedClock

    async def call(self, path: str, who: str, body: Any) -> dict[str, Any]:
        self.clock.advance(timedelta(seconds=1))
        headers = {"Authorization": f"Bearer {TOKENS[who]}"}
        async with self.gk.session.post(self.gk.url + path, json=body, headers=headers) as r:
            answer: dict[str, Any] = await r.json()
            assert r.status == 200, answer
            return answer

    async def facts(self, *facts: tuple[str, str, dict[str, Any]]) -> None:
        body = {
            "facts": [{"project": "tower-a", "kind": k, "id": i, "data": d} for k, i, d in facts]
        }
        await self.call("/v1/facts", "ci", body)

    async def approve(self, who: str, rule: str, item: str | None = None) -> None:
        body = {"rule": rule, "decision": "approve", **({"item": item} if item else {})}
        await self.call("/v1/approvals", who, body)

    async def act(self, act: str, rule: str) -> None:
        await self.call(f"/v1/rules/{rule}/{act}", "ops", {"reason": f"{act} for the test"})

    async def wait_until(self, at: datetime, firing_id: str) -> None:
        """Move the clock to ``at`` (a deadline: the daemon's loop wakes at its instant)
        and wait until the deadline loop fired ``firing_id``."""
        self.clock.set(at)
        for _ in range(100):
            if await self.gk.daemon.store.decision_of_firing(firing_id) is not None:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{firing_id} did not fire")


async def record_history(
    project: Project, start_daemon: Callable[..., Any], *, reload: bool
) -> tuple[Running, Path]:
    """Record the construction project's month: design approval and QA, a task completed
    (a pipeline, a per-item rule setting a fact, an approvals notice, an approval and its
    release), a failing quality gate while its alert rule is paused, the 7-day hold passing
    (a deadline), a rearm, a restart, (with ``reload``) a rule edited while running, and the
    structure milestone's approvals and 14-day hold. Returns the running daemon and its
    database."""
    clock = FixedClock(T0)
    gk = await start_daemon(project, clock=clock, env=ENV)
    rec = Recorder(gk, clock)
    approved = clock.now()
    await rec.facts(
        ("milestone", "design", {"status": "approved", "approved_at": approved.isoformat()}),
        ("quality_gate", "qg_design", {"passed": True}),
    )
    await rec.facts(("task", "T-17", {"status": "completed"}))
    await rec.approve("alice", "tower-a/task-paid", "T-17")
    await rec.facts(("quality_gate", "qg_structure", {"passed": False}))
    await rec.act("pause", "tower-a/structure-qa-failed")
    await rec.facts(("quality_gate", "qg_structure", {"passed": True}))
    await rec.facts(("quality_gate", "qg_structure", {"passed": False}))
    await rec.act("resume", "tower-a/structure-qa-failed")
    await rec.facts(("task", "T-17", {"status": "reopened"}))
    await rec.wait_until(approved + timedelta(days=7), "tower-a/design-release#1")
    await rec.act("rearm", "tower-a/design-release")
    await gk.stop()
    clock.advance(timedelta(hours=1))
    gk = await start_daemon(project, clock=clock, env=ENV)
    rec = Recorder(gk, clock)
    if reload:
        pipelines = project.rules_dir / "tower-a" / "pipelines.yaml"
        pipelines.write_text(pipelines.read_text().replace("stage: docs", "stage: as-built"))
        clock.advance(timedelta(seconds=1))
        assert await gk.daemon.reload()
    await rec.facts(
        ("task", "T-17", {"status": "completed"}), ("task", "T-18", {"status": "completed"})
    )
    await rec.approve("bob", "tower-a/task-paid", "T-18")
    structure = clock.now()
    await rec.facts(
        ("milestone", "structure", {"status": "approved", "approved_at": structure.isoformat()}),
        ("quality_gate", "qg_structure", {"passed": True}),
    )
    await rec.approve("alice", "tower-a/structure-release")
    await rec.approve("carol", "tower-a/structure-release")
    await rec.wait_until(structure + timedelta(days=14), "tower-a/structure-release#1")
    await rec.facts(("task", "T-19", {"status": "completed"}))
    return gk, project.root / "state" / "gatekeeper.db"


@pytest.fixture
async def recorded(
    tmp_path: Path, receiver: Receiver, start_daemon: Callable[..., Any]
) -> tuple[Project, Path, str]:
    """The recorded deployment, its database and the URL of its daemon (still running)."""
    project = write_deployment(tmp_path / "deployment", receiver.url)
    gk, database = await record_history(project, start_daemon, reload=False)
    return project, database, gk.url


def candidate(project: Project, tmp_path: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of the deployment's rules, edited by ``edit``."""
    rules = tmp_path / "candidate"
    shutil.rmtree(rules, ignore_errors=True)
    shutil.copytree(project.rules_dir, rules)
    if edit is not None:
        edit(rules)
    return rules


def copy_database(database: Path, to: Path) -> Path:
    """A consistent copy of a live SQLite database (the backup API: WAL content included)."""
    with (
        contextlib.closing(sqlite3.connect(database)) as source,
        contextlib.closing(sqlite3.connect(to)) as copy,
    ):
        source.backup(copy)
    return to


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


async def backtest(project: Project, *argv: str) -> tuple[int, str]:
    """``gatekeeper backtest -c <config> ARGV`` in a thread (it runs its own event loop)."""
    args: argparse.Namespace = build_parser().parse_args(
        ["backtest", "-c", str(project.config_path), *argv]
    )
    out = io.StringIO()
    code = await asyncio.to_thread(run_backtest_command, args, out)
    return code, out.getvalue()


async def test_the_same_rules_make_no_difference(
    recorded: tuple[Project, Path, str], tmp_path: Path
) -> None:
    project, database, _ = recorded
    rules = candidate(project, tmp_path)
    code, out = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 0, out
    assert "SUCCESS: no differences" in out
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 0 and report["fails"] is False
    assert report["added"] == report["gone"] == report["changed"] == []
    assert report["firings"]["recorded"] == report["firings"]["replayed"] >= 8
    [escrow] = report["escrows"]
    assert escrow == {
        "escrow": "tower-a-escrow",
        "currency": "USD",
        "recorded": "35200.00",
        "replayed": "35200.00",
        "delta": "0.00",
    }


async def test_a_changed_amount_is_an_action_changed_with_the_escrow_total(
    recorded: tuple[Project, Path, str], tmp_path: Path
) -> None:
    project, database, _ = recorded
    rules = candidate(
        project,
        tmp_path,
        lambda r: replace_in(r / "tower-a" / "milestones.yaml", '"5000.00"', '"6000.00"'),
    )
    code, out = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 1, out
    assert "actions changed (2):" in out
    assert 'release actions[0].payload.amount: "5000.00" -> "6000.00"' in out
    assert "tower-a-escrow: 35200.00 -> 37200.00 USD (+2000.00)" in out
    assert "FAILED: 0 added, 0 gone, 2 changed (--fail-on release)" in out
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 1 and report["fails"] is True
    first = report["changed"][0]
    assert first["rule"] == "tower-a/design-release"
    assert first["recorded_firing_id"] == first["replayed_firing_id"] == "tower-a/design-release#1"
    assert {"field": "release actions[0].payload.amount", "old": "5000.00", "new": "6000.00"} in (
        first["changes"]
    )
    # the rendered message follows the amount
    assert any(c["field"] == "actions[1].payload.message" for c in first["changes"])
    assert report["escrows"][0]["delta"] == "+2000.00"
    assert report["rules"] == {
        "tower-a/design-release": {
            "added": 0,
            "gone": 0,
            "changed": 2,
            "now_blocked": 0,
            "no_longer_blocked": 0,
        }
    }
    # --fail-on none reports and exits 0
    code, _ = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--fail-on", "none"
    )
    assert code == 0


async def test_a_stricter_condition_is_firings_gone_and_a_new_rule_firings_added(
    recorded: tuple[Project, Path, str], tmp_path: Path
) -> None:
    project, database, _ = recorded

    def edit(rules: Path) -> None:
        replace_in(
            rules / "tower-a" / "pipelines.yaml",
            'when: task["T-17"].status == "completed"',
            'when: task["T-17"].status == "completed" and task["T-17"].reviewed == true',
        )
        (rules / "tower-a" / "qa-passed.yaml").write_text(
            "id: tower-a/qa-design-passed\n"
            "project: tower-a\n"
            "when: quality_gate.qg_design.passed\n"
            "actions:\n"
            "  - notify: {target: site-ops, message: design QA passed}\n"
        )

    rules = candidate(project, tmp_path, edit)
    code, out = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 0, out  # no release changed: --fail-on release does not fail
    assert "firings gone (2):" in out and "firings added (1):" in out
    assert "- " in out and "tower-a/docs-pipeline#1 fired: pipeline ci-construction-docs" in out
    assert "+ " in out and "tower-a/qa-design-passed#1 fired: notify site-ops" in out
    assert "DIFFERENCES: 1 added, 2 gone, 0 changed (--fail-on release)" in out
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--fail-on", "any"
    )
    assert code == 1
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "github"
    )
    lines = out.splitlines()
    gone = [line for line in lines if "docs-pipeline" in line]
    assert len(gone) == 2 and all(line.startswith("::warning file=") for line in gone)
    assert "pipelines.yaml,line=" in gone[0] and "title=gatekeeper backtest::" in gone[0]
    [added] = [line for line in lines if "qa-design-passed" in line]
    assert added.startswith("::warning file=") and "would fire at" in added
    assert lines[-1].startswith("DIFFERENCES:")


async def test_a_shorter_hold_fires_at_the_candidates_own_deadline(
    recorded: tuple[Project, Path, str], tmp_path: Path
) -> None:
    project, database, _ = recorded
    rules = candidate(
        project,
        tmp_path,
        lambda r: replace_in(
            r / "tower-a" / "milestones.yaml",
            "days_since(milestone.design.approved_at) >= 7",
            "days_since(milestone.design.approved_at) >= 3",
        ),
    )
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 1, out  # the release moved: a change in releases
    [added] = report["added"]
    [gone] = report["gone"]
    assert added["firing_id"] == gone["firing_id"] == "tower-a/design-release#1"
    assert added["at"] == "2026-11-05T09:00:00.000Z"  # approved_at + 3 days, to the instant
    assert gone["at"] == "2026-11-09T09:00:00.000Z"  # the recorded tick after the 7-day hold
    assert added["actions"][0]["payload"]["amount"] == "5000.00"
    assert report["escrows"][0]["delta"] == "0.00"  # released earlier, not more
    assert report["changed"] == []  # the re-armed firing is the same


async def test_the_window_bounds_what_is_compared(
    recorded: tuple[Project, Path, str], tmp_path: Path
) -> None:
    project, database, _ = recorded
    rules = candidate(
        project,
        tmp_path,
        lambda r: replace_in(r / "tower-a" / "milestones.yaml", '"5000.00"', '"6000.00"'),
    )
    base = ["--rules", str(rules), "--database", str(database), "--format", "json"]
    week = (T0 + timedelta(days=7)).isoformat()
    code, out = await backtest(project, *base, "--until", week)
    report = json.loads(out)
    assert code == 0 and report["changed"] == [] and report["escrows"][0]["delta"] == "0.00"
    assert report["window"] == {"since": None, "until": "2026-11-09T09:00:00.000Z"}
    code, out = await backtest(project, *base, "--since", week)
    report = json.loads(out)
    assert code == 1 and len(report["changed"]) == 2
    # the state at --since was rebuilt: the design release fired once before the window
    code, out = await backtest(project, *base, "--since", week, "--until", week)
    assert code == 2


async def test_usage_and_input_errors_exit_2_and_change_nothing(
    recorded: tuple[Project, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, database, _ = recorded
    rules = candidate(project, tmp_path)
    newer = copy_database(database, tmp_path / "newer.db")
    with contextlib.closing(sqlite3.connect(newer)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute(f"PRAGMA user_version={version + 1}")
    before = newer.read_bytes()
    code, _ = await backtest(project, "--rules", str(rules), "--database", str(newer))
    assert code == 2
    assert "newer than this gatekeeper knows" in capsys.readouterr().err
    assert newer.read_bytes() == before
    code, _ = await backtest(project, "--rules", str(rules), "--database", str(tmp_path / "no.db"))
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no.db").exists()
    code, _ = await backtest(
        project, "--rules", str(tmp_path / "nowhere"), "--database", str(database)
    )
    assert code == 2 and "no such directory" in capsys.readouterr().err
    (rules / "tower-a" / "broken.yaml").write_text("id: x\nwhen: (\n")
    code, _ = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 2
    code, _ = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--since", "yesterday"
    )
    assert code == 2 and "--since/--until" in capsys.readouterr().err
    code, _ = await backtest(project, "--database", str(database))
    assert code == 2 and "--rules DIR" in capsys.readouterr().err


async def test_the_self_check_reproduces_every_recorded_decision(
    tmp_path: Path, receiver: Receiver, start_daemon: Callable[..., Any]
) -> None:
    project = write_deployment(tmp_path / "deployment", receiver.url)
    gk, database = await record_history(project, start_daemon, reload=True)
    with contextlib.closing(sqlite3.connect(database)) as db:
        versions = db.execute("SELECT COUNT(*) FROM rulesets").fetchone()[0]
        triggers = {t for (t,) in db.execute("SELECT DISTINCT trigger FROM decisions")}
        set_facts = db.execute("SELECT COUNT(*) FROM fact_log WHERE caused_by IS NOT NULL")
        notices = db.execute("SELECT COUNT(*) FROM decisions WHERE notice_id IS NOT NULL")
        assert set_facts.fetchone()[0] >= 3 and notices.fetchone()[0] >= 1
        total = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert versions == 2
    assert triggers == {"fact", "approval", "admin", "time", "reload"}
    code, out = await backtest(project, "--self-check", "--database", str(database))
    assert code == 0, out
    assert out.strip() == f"{total} of {total} decisions reproduced"
    await gk.stop()

    # a record that the rules cannot explain is found: a release amount changed in a copy
    tampered = copy_database(database, tmp_path / "tampered.db")
    with contextlib.closing(sqlite3.connect(tampered)) as db, db:
        db.execute(
            "UPDATE ledger SET amount = '5100.00' WHERE firing_id = 'tower-a/design-release#1'"
        )
    code, out = await backtest(project, "--self-check", "--database", str(tampered))
    assert code == 1, out
    assert "tower-a/design-release#1: release actions[0].ledger" in out
    assert out.strip().endswith(f"{total - 1} of {total} decisions reproduced")


async def test_the_history_through_the_daemons_api_is_the_databases(
    recorded: tuple[Project, Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project, database, url = recorded
    rules = candidate(
        project,
        tmp_path,
        lambda r: replace_in(r / "tower-a" / "milestones.yaml", '"5000.00"', '"6000.00"'),
    )
    monkeypatch.setenv("OPS_TOKEN", TOKENS["ops"])
    monkeypatch.setenv("ALICE_TOKEN", TOKENS["alice"])
    base = ["--rules", str(rules), "--format", "json"]
    code, out = await backtest(project, *base, "--database", str(database))
    from_database = json.loads(out)
    code_url, out = await backtest(project, *base, "--url", url, "--token-env", "OPS_TOKEN")
    from_api = json.loads(out)
    assert code == code_url == 1
    from_api.pop("database"), from_database.pop("database")
    assert from_api == from_database
    assert len(from_api["changed"]) == 2 and from_api["events"] > 15
    # a token of scopes history and read replays the same; without history (or admin) it
    # is refused; a missing variable is a usage error
    monkeypatch.setenv("BACKTEST_TOKEN", TOKENS["backtester"])
    code_history, out = await backtest(
        project, *base, "--url", url, "--token-env", "BACKTEST_TOKEN"
    )
    from_history = json.loads(out)
    from_history.pop("database")
    assert (code_history, from_history) == (1, from_database)
    code, _ = await backtest(project, *base, "--url", url, "--token-env", "ALICE_TOKEN")
    assert code == 2 and "HTTP 403" in capsys.readouterr().err
    code, _ = await backtest(project, *base, "--url", url, "--token-env", "NO_SUCH_TOKEN")
    assert code == 2 and "NO_SUCH_TOKEN" in capsys.readouterr().err


async def test_shadowed_firings_and_signoffs_replay_and_diff_as_shadowed(
    tmp_path: Path,
    receiver: Receiver,
    start_daemon: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``money_rule_approvals: 1`` the design release first fires in shadow (awaiting
    sign-off); an admin signs its content hash off; re-armed, it fires live. The
    self-check reproduces all of it; a candidate backtest takes its money rules as signed
    off, so the shadowed release shows as one that would have been sent."""
    project = write_deployment(tmp_path / "deployment", receiver.url)
    config = yaml.safe_load(project.config_path.read_text())
    config["money_rule_approvals"] = 1
    project.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    clock = FixedClock(T0)
    gk = await start_daemon(project, clock=clock, env=ENV)
    rec = Recorder(gk, clock)
    await rec.facts(
        ("milestone", "design", {"status": "approved", "approved_at": T0.isoformat()}),
        ("quality_gate", "qg_design", {"passed": True}),
    )
    await rec.wait_until(T0 + timedelta(days=7), "tower-a/design-release#1")
    headers = {"Authorization": f"Bearer {TOKENS['ops']}"}
    async with gk.session.get(gk.url + "/v1/rules/tower-a/design-release", headers=headers) as r:
        content_hash = (await r.json())["content_hash"]
    await rec.call(f"/v1/money-rules/{content_hash}/signoffs", "ops", {"comment": "checked"})
    await rec.act("rearm", "tower-a/design-release")
    database = project.root / "state" / "gatekeeper.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        modes = [m for (m,) in db.execute("SELECT mode FROM decisions WHERE firing_id IS NOT NULL")]
        statuses = {s for (s,) in db.execute("SELECT status FROM outbox WHERE kind = 'release'")}
        total = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert "awaiting_signoff" in modes and None in modes  # one shadowed firing, one live
    assert "shadowed" in statuses and statuses - {"shadowed"}  # and a live one, sent or not
    code, out = await backtest(project, "--self-check", "--database", str(database))
    assert code == 0, out
    assert out.strip() == f"{total} of {total} decisions reproduced"

    # the unchanged rules follow their recorded sign-off: nothing differs
    rules = candidate(project, tmp_path)
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 0, out
    assert report["changed"] == report["added"] == report["gone"] == []
    # a changed money rule (a new content hash) is presumed signed off: what it would decide,
    # live, so its shadowed release shows as one that would have been sent
    rules = candidate(
        project,
        tmp_path,
        lambda r: replace_in(r / "tower-a" / "milestones.yaml", '"5000.00"', '"6000.00"'),
    )
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 1, out
    [shadowed, live] = sorted(report["changed"], key=lambda c: c["recorded_firing_id"])
    assert shadowed["recorded_firing_id"] == "tower-a/design-release#1"
    assert live["recorded_firing_id"] == "tower-a/design-release#2"
    assert {c["field"]: (c["old"], c["new"]) for c in live["changes"]}[
        "release actions[0].payload.amount"
    ] == ("5000.00", "6000.00")
    fields = {c["field"]: (c["old"], c["new"]) for c in shadowed["changes"]}
    assert fields["outcome (release)"] == ("shadowed", "fired")
    assert fields["release actions[0].status"] == ("shadowed", "queued")
    assert report["escrows"][0]["recorded"] == "5000.00"  # the live firing only
    assert report["escrows"][0]["replayed"] == "12000.00"
    # the same history read through the daemon's API (its decisions name their mode)
    monkeypatch.setenv("OPS_TOKEN", TOKENS["ops"])
    code_url, out = await backtest(
        project,
        "--rules",
        str(rules),
        "--url",
        gk.url,
        "--token-env",
        "OPS_TOKEN",
        "--format",
        "json",
    )
    from_api = json.loads(out)
    assert code_url == 1, out
    from_api.pop("database"), report.pop("database")
    assert from_api == report


def ci_checkout(
    recorded: tuple[Project, Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A checkout as a CI job sees it (gatekeeper.yaml and rules/ of the recorded
    deployment, the working directory), with ``GATEKEEPER_URL`` set to its daemon."""
    project, _, url = recorded
    checkout = tmp_path / "checkout"
    shutil.copytree(project.rules_dir, checkout / "rules")
    shutil.copy(project.config_path, checkout / "gatekeeper.yaml")
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("GATEKEEPER_URL", url)
    return checkout


def ci_backtest_command(name: str) -> str:
    """The ``gatekeeper backtest`` command line of a CI example, as its YAML holds it: the
    GitHub workflow's step (run on pull requests only, with the backtest token), the line
    of the GitLab job's script (in merge request pipelines only)."""
    document = yaml.safe_load((REPO / "examples" / "ci" / name).read_text())
    if name == "github-actions.yml":
        job = document["jobs"]["rules"]
        assert job["env"]["GATEKEEPER_BACKTEST_TOKEN"] == "${{ secrets.GATEKEEPER_BACKTEST_TOKEN }}"
        [step] = [s for s in job["steps"] if "gatekeeper backtest" in s.get("run", "")]
        assert "github.event_name == 'pull_request'" in step["if"]
        assert "env.GATEKEEPER_BACKTEST_TOKEN != ''" in step["if"]
        return str(step["run"])
    [script] = [s for s in document["gatekeeper-rules"]["script"] if "gatekeeper backtest" in s]
    assert '"$CI_PIPELINE_SOURCE" = "merge_request_event"' in script
    [line] = [x.strip() for x in script.splitlines() if x.strip().startswith("gatekeeper backtest")]
    return line


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
async def test_the_ci_examples_backtest_command_runs_against_a_recorded_daemon(
    name: str,
    recorded: tuple[Project, Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CI examples' backtest command line, run as the CI job runs it (in a checkout
    holding gatekeeper.yaml and rules/, the variables set as the secrets would set them)
    against a daemon with a recorded history: the rules as deployed pass, a changed
    release amount fails with the job's report."""
    from gatekeeper.cli.main import main

    url = recorded[2]
    checkout = ci_checkout(recorded, tmp_path, monkeypatch)
    monkeypatch.setenv("GATEKEEPER_BACKTEST_TOKEN", TOKENS["ops"])  # admin and read
    monkeypatch.delenv("GATEKEEPER_TOKEN", raising=False)
    argv = [os.path.expandvars(arg) for arg in shlex.split(ci_backtest_command(name))]
    assert argv[:2] == ["gatekeeper", "backtest"] and url in argv
    capsys.readouterr()
    assert await asyncio.to_thread(main, argv[1:]) == 0, capsys.readouterr()
    assert "SUCCESS: no differences (--fail-on release)" in capsys.readouterr().out
    replace_in(checkout / "rules" / "tower-a" / "milestones.yaml", '"5000.00"', '"6000.00"')
    assert await asyncio.to_thread(main, argv[1:]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 0 added, 0 gone, 2 changed (--fail-on release)" in out
    if name == "github-actions.yml":  # annotations on the rule's file and line
        assert "::error file=rules/tower-a/milestones.yaml,line=8," in out
        assert "escrow tower-a-escrow would release +2000.00 USD" in out
    else:
        assert 'release actions[0].payload.amount: "5000.00" -> "6000.00"' in out


def ci_plan_command(name: str) -> str:
    """The ``gatekeeper plan`` command line of a CI example, as its YAML holds it."""
    document = yaml.safe_load((REPO / "examples" / "ci" / name).read_text())
    if name == "github-actions.yml":
        [step] = [
            s for s in document["jobs"]["rules"]["steps"] if "gatekeeper plan" in s.get("run", "")
        ]
        return str(step["run"])
    [script] = [s for s in document["gatekeeper-rules"]["script"] if "gatekeeper plan" in s]
    [line] = [x.strip() for x in script.splitlines() if x.strip().startswith("gatekeeper plan")]
    return line


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
async def test_the_ci_examples_plan_command_runs_against_a_recorded_daemon(
    name: str,
    recorded: tuple[Project, Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CI examples' plan command line parses and runs as the job runs it (it once
    passed the rules folder as a positional argument, which ``plan`` refuses: exit 2)."""
    from gatekeeper.cli.main import main

    url = recorded[2]
    ci_checkout(recorded, tmp_path, monkeypatch)
    monkeypatch.setenv("GATEKEEPER_TOKEN", TOKENS["ops"])
    argv = [os.path.expandvars(arg) for arg in shlex.split(ci_plan_command(name))]
    assert argv[:2] == ["gatekeeper", "plan"] and url in argv
    capsys.readouterr()
    code = await asyncio.to_thread(main, argv[1:])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert "unrecognized arguments" not in captured.err
