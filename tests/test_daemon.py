"""The daemon end to end: real SQLite files, the real aiohttp app on 127.0.0.1 and a real
receiver that records what it gets and verifies the Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from standardwebhooks.webhooks import Webhook

from gatekeeper.clock import FixedClock

from .conftest import DEPLOY_RULE, DESIGN_RULE, SECRET, Project, Receiver, fact

APPROVED = fact("milestone", "design", status="approved", approved_at="2026-11-01T09:00:00Z")
QA_PASSED = fact("quality_gate", "qg1", passed=True)


async def settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


async def test_facts_fire_signed_release_and_notify_once(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)

    status, body = await gk.post("/v1/facts", APPROVED)
    assert status == 200, body
    assert body["accepted"] == 1
    assert len(receiver.received) == 0  # QA gate not passed yet

    status, body = await gk.post("/v1/facts", QA_PASSED)
    assert status == 200
    received = await receiver.wait_for(2)
    by_path = {r.path: r for r in received}
    release = by_path["/bank"]
    verified = Webhook(SECRET).verify(release.raw, release.headers)
    assert verified["type"] == "release"
    assert verified["amount"] == "5000.00"
    assert release.headers["Idempotency-Key"] == verified["release_id"]
    chat = by_path["/chat"]
    assert Webhook(SECRET).verify(chat.raw, chat.headers) == {
        "text": "Released 5000.00 USD to acme-architects (tower-a/design-release)"
    }

    # once means once: the condition staying true, going false and true again fires nothing
    await gk.post("/v1/facts", QA_PASSED)
    await gk.post("/v1/facts", fact("quality_gate", "qg1", passed=False))
    await gk.post("/v1/facts", QA_PASSED)
    await settle()
    assert len(receiver.received) == 2

    _, actions = await gk.get("/v1/actions")
    assert {a["status"] for a in actions["actions"]} == {"delivered"}
    assert len(actions["actions"]) == 2


async def test_fire_once_holds_across_restart(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    await receiver.wait_for(2)
    await gk.stop()

    gk2 = await start_daemon(project)
    await gk2.post("/v1/facts", fact("quality_gate", "qg1", passed=False))
    await gk2.post("/v1/facts", QA_PASSED)
    await settle()
    assert len(receiver.received) == 2
    _, rule = await gk2.get("/v1/rules/tower-a/design-release")
    assert rule["fired_count"] == 1
    assert rule["explanation"]["gate_open"] is True


async def test_each_time_fires_on_every_false_to_true_edge(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    done = fact("task", "T-17", status="completed")
    await gk.post("/v1/facts", done)
    await gk.post("/v1/facts", done)  # still true: no edge
    await receiver.wait_for(1)
    await gk.post("/v1/facts", fact("task", "T-17", status="reopened"))
    await gk.post("/v1/facts", done)
    received = await receiver.wait_for(2)
    await settle()
    assert len(received) == 2
    bodies = [Webhook(SECRET).verify(r.raw, r.headers) for r in received]
    assert [b["firing_id"] for b in bodies] == ["tower-a/deploy-docs#1", "tower-a/deploy-docs#2"]
    assert bodies[0]["inputs"] == {"stage": "docs"}
    assert len({b["action_id"] for b in bodies}) == 2


async def test_fact_only_reevaluates_rules_that_read_it(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", fact("task", "T-17", status="started"))
    _, design = await gk.get("/v1/rules/tower-a/design-release")
    _, deploy = await gk.get("/v1/rules/tower-a/deploy-docs")
    assert [d["trigger"] for d in deploy["recent_decisions"]] == ["fact", "reload"]
    assert [d["trigger"] for d in design["recent_decisions"]] == ["reload"]


async def test_decision_records_rule_version_facts_and_subconditions(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    _, posted = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    _, rule = await gk.get("/v1/rules/tower-a/design-release")
    fired = rule["recent_decisions"][0]
    assert fired["outcome"] == "fired"
    assert fired["rule_hash"] == rule["content_hash"]
    assert fired["ruleset_version"] == rule["ruleset_version"]
    assert fired["fact_seq"] == posted["seqs"][-1]
    assert fired["request_id"] == posted["request_id"]
    clauses = fired["evaluation"]["clauses"]
    assert [c["value"] for c in clauses] == [True, True]
    assert fired["evaluation"]["seen"]["milestone.design"]["status"] == "approved"


async def test_explanation_names_missing_fact(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", APPROVED)
    status, rule = await gk.get("/v1/rules/tower-a/design-release")
    assert status == 200
    explanation = rule["explanation"]
    assert explanation["gate_open"] is False
    assert any("quality_gate.qg1" in m for m in explanation["condition"]["missing"])


async def test_batch_is_atomic_and_bad_fact_changes_nothing(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    bad_kind = {"project": "tower-a", "kind": "Bad Kind", "id": "x", "data": {}}
    status, body = await gk.post("/v1/facts", {"facts": [APPROVED, bad_kind]})
    assert status == 400
    assert body["error"]["problems"][0]["path"] == "$.facts[1].kind"
    _, facts = await gk.get("/v1/facts")
    assert facts["facts"] == []
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    assert db.execute("SELECT COUNT(*) FROM fact_log").fetchone()[0] == 0


async def test_sequence_numbers_increase_and_log_keeps_history(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    _, a = await gk.post("/v1/facts", fact("task", "T-1", status="started"))
    _, b = await gk.post("/v1/facts", {"facts": [fact("task", "T-1", status="done"), QA_PASSED]})
    assert a["seqs"][0] < b["seqs"][0] < b["seqs"][1]
    _, facts = await gk.get("/v1/facts?project=tower-a")
    task = next(f for f in facts["facts"] if f["kind"] == "task")
    assert task["data"] == {"status": "done"}
    log = await gk.daemon.store.fact_log()
    assert [row.data for row in log if row.kind == "task"] == [
        {"status": "started"},
        {"status": "done"},
    ]


async def test_time_dependent_rule_fires_when_clock_passes_hold(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule(
        "hold.yaml",
        """\
        id: tower-a/hold
        project: tower-a
        when: >
          milestone.design.status == "approved"
          and days_since(milestone.design.approved_at) >= 7
        actions:
          - pipeline: {target: ci, ref: main}
        """,
    )
    clock = FixedClock(datetime(2026, 11, 5, tzinfo=UTC))
    gk = await start_daemon(project, clock=clock)
    await gk.post("/v1/facts", APPROVED)
    await gk.daemon.tick()
    await settle()
    assert receiver.received == []
    clock.set(datetime(2026, 11, 8, 8, 59, tzinfo=UTC))
    await gk.daemon.tick()
    await settle()
    assert receiver.received == []
    clock.advance(timedelta(minutes=1))
    await gk.daemon.tick()
    await receiver.wait_for(1)


async def test_new_rule_already_true_fires_on_load(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    project.write_rule("design.yaml", DESIGN_RULE)
    assert await gk.daemon.reload() is True
    await receiver.wait_for(2)


async def test_hot_reload_applies_edits_and_refuses_broken_ones(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project, watch=True)
    _, before = await gk.get("/v1/rules")
    await asyncio.sleep(0.3)  # let the watcher start

    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("T-17", "T-18"))
    for _ in range(40):
        await asyncio.sleep(0.05)
        _, after = await gk.get("/v1/rules")
        if after["ruleset"]["version"] != before["ruleset"]["version"]:
            break
    assert "T-18" in after["rules"][0]["when"]

    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("when:", "whn:"))
    for _ in range(40):
        await asyncio.sleep(0.05)
        _, broken = await gk.get("/v1/rules")
        if not broken["reload"]["ok"]:
            break
    assert broken["reload"]["ok"] is False
    assert broken["ruleset"]["version"] == after["ruleset"]["version"]
    problem = broken["reload"]["problems"][0]
    assert problem["file"] == "deploy.yaml"
    assert problem["line"] >= 1
    # the old ruleset still gates
    await gk.post("/v1/facts", fact("task", "T-18", status="completed"))
    await receiver.wait_for(1)


async def test_restart_on_broken_rules_runs_last_good_ruleset(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    _, good = await gk.get("/v1/rules")
    await gk.stop()
    project.write_rule("deploy.yaml", "id: [unclosed\n")
    gk2 = await start_daemon(project)
    _, rules = await gk2.get("/v1/rules")
    assert rules["ruleset"]["version"] == good["ruleset"]["version"]
    assert rules["reload"]["ok"] is False
    assert rules["reload"]["source"].startswith("database")
    await gk2.post("/v1/facts", fact("task", "T-17", status="completed"))
    await receiver.wait_for(1)


async def test_missing_secret_is_a_startup_error_naming_the_variable(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    from gatekeeper.runtime.daemon import StartupError

    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    try:
        await start_daemon(project, env={"BANK_SECRET": SECRET, "CHAT_SECRET": SECRET})
    except StartupError as exc:
        assert "CI_SECRET" in str(exc)
        assert SECRET not in str(exc)
    else:
        raise AssertionError("expected a StartupError")


async def test_rule_states_in_the_database_follow_memory_when_facts_change_no_gate(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    """A fact that leaves a rule's state as it was does not write its row again; the rows
    still equal the daemon's states after gates open and close, within one group commit
    too (facts posted together), and after a restart."""
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    posts = [
        fact("task", "T-17", status=status)
        for status in ("started", "started", "completed", "completed", "reopened", "started")
    ]
    for body in posts[:2]:
        await gk.post("/v1/facts", body)
    await asyncio.gather(*(gk.post("/v1/facts", body) for body in posts[2:]))
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    await receiver.wait_for(1)

    def stored() -> dict[tuple[str, str], tuple[Any, ...]]:
        db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
        try:
            rows = db.execute(
                "SELECT rule_id, instance, gate_open, fired_count, last_fired_at, rule_hash"
                " FROM rule_state"
            ).fetchall()
        finally:
            db.close()
        return {(r[0], r[1]): (bool(r[2]), r[3], r[4], r[5]) for r in rows}

    def in_memory(states: Any) -> dict[tuple[str, str], tuple[Any, ...]]:
        return {
            rule_id: (s.gate_open, s.fired_count, s.last_fired_at, s.rule_hash)
            for rule_id, s in states.items()
        }

    memory = in_memory(gk.daemon.writer.states)
    gate_open, fired_count, _, _ = memory[("tower-a/deploy-docs", "")]
    assert gate_open and fired_count >= 1
    assert stored() == memory
    await gk.stop()
    again = await start_daemon(project)
    assert in_memory(again.daemon.writer.states) == memory
