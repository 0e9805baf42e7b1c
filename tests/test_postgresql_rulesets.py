"""The daemons of one PostgreSQL database decide with one active ruleset: a daemon taking
over on a stale rules directory adopts the version active in the database; side by side, a
ruleset one daemon's directory activates is adopted by the other on a notification, and a
batch planned with a replaced ruleset is planned again with the active one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook

from .conftest import DESIGN_RULE, SECRET, Project, Receiver, Running, config_text
from .test_daemon import APPROVED, QA_PASSED
from .test_daemon_postgresql import on_postgres

ADOPTED = "database (activated by another daemon)"


def deployment(root: Path, receiver_url: str, database: str) -> Project:
    """A deployment folder of its own (config, rules) on the shared ``database``, checking
    the active ruleset only every 60 s: within the test, only notifications switch it."""
    project = Project(root)
    project.rules_dir.mkdir(parents=True)
    project.config_path.write_text(config_text(receiver_url, ruleset_check_s=60))
    project.write_rule("design.yaml", DESIGN_RULE)
    return on_postgres(project, database)


async def active_version(gk: Running) -> tuple[str, str]:
    """The version ``gk`` decides with and where it came from (``GET /v1/rules``)."""
    _, body = await gk.get("/v1/rules")
    return body["ruleset"]["version"], body["reload"]["source"]


async def until_version(
    gk: Running, done: Callable[[str], bool], within_s: float
) -> tuple[str, str]:
    """``active_version(gk)`` once ``done`` holds for its version, or after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not done((seen := await active_version(gk))[0]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return seen


async def test_a_daemon_taking_over_on_a_stale_directory_adopts_the_active_ruleset(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    a = deployment(tmp_path / "a", receiver.url, postgres_url)
    b = deployment(tmp_path / "b", receiver.url, postgres_url)
    gk_a = await start_daemon(a, watch=True)
    first, _ = await active_version(gk_a)
    a.write_rule("design.yaml", DESIGN_RULE.replace('"5000.00"', '"6000.00"'))
    new, source = await until_version(gk_a, lambda v: v != first, within_s=5)
    assert new != first and source == "rules directory"
    await gk_a.stop()  # A is gone; B takes over on its own, older directory

    gk_b = await start_daemon(b)
    assert await active_version(gk_b) == (new, ADOPTED)
    assert (b.rules_dir / "design.yaml").read_text() == DESIGN_RULE  # B's own is unchanged
    status, body = await gk_b.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    received = await receiver.wait_for(2)
    release = next(r for r in received if r.path == "/bank")
    assert Webhook(SECRET).verify(release.raw, release.headers)["amount"] == "6000.00"


async def test_a_ruleset_one_daemon_activates_is_adopted_by_the_other(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    a = deployment(tmp_path / "a", receiver.url, postgres_url)
    b = deployment(tmp_path / "b", receiver.url, postgres_url)
    gk_a = await start_daemon(a, watch=True)
    gk_b = await start_daemon(b, watch=True)
    first, _ = await active_version(gk_a)
    assert (await active_version(gk_b))[0] == first

    a.write_rule("design.yaml", DESIGN_RULE.replace('"5000.00"', '"6000.00"'))
    new, source = await until_version(gk_a, lambda v: v != first, within_s=5)
    assert new != first and source == "rules directory"

    assert await until_version(gk_b, lambda v: v == new, within_s=2) == (new, ADOPTED)
    assert (b.rules_dir / "design.yaml").read_text() == DESIGN_RULE  # B's own is unchanged
    _, rule_a = await gk_a.get("/v1/rules/tower-a/design-release")
    _, rule_b = await gk_b.get("/v1/rules/tower-a/design-release")
    assert rule_b["content_hash"] == rule_a["content_hash"]

    status, body = await gk_b.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    received = await receiver.wait_for(2)
    release = next(r for r in received if r.path == "/bank")
    assert Webhook(SECRET).verify(release.raw, release.headers)["amount"] == "6000.00"
    _, rule_b = await gk_b.get("/v1/rules/tower-a/design-release")
    fired = [d for d in rule_b["recent_decisions"] if d["outcome"] == "fired"]
    assert [(d["rule_hash"], d["ruleset_version"]) for d in fired] == [
        (rule_a["content_hash"], new)
    ]

    await gk_b.stop()  # B restarts on its stale directory: it adopts the active version
    again = await start_daemon(b)
    assert await active_version(again) == (new, ADOPTED)
    assert (await active_version(gk_a))[0] == new  # and A was not switched back


async def test_a_batch_planned_with_a_replaced_ruleset_is_planned_again_with_the_active_one(
    tmp_path: Path, receiver: Receiver, start_daemon: Any, postgres_url: str
) -> None:
    """B misses the announcement (its follower stopped, its periodic check 60 s off): its
    commit, planned with the old version, is refused by the database, and B adopts the
    active version and decides the batch with it."""
    a = deployment(tmp_path / "a", receiver.url, postgres_url)
    b = deployment(tmp_path / "b", receiver.url, postgres_url)
    gk_a = await start_daemon(a, watch=True)
    gk_b = await start_daemon(b)
    [follower] = [t for t in gk_b.daemon._tasks if t.get_name() == "ruleset-follower"]
    follower.cancel()
    first, _ = await active_version(gk_b)

    a.write_rule("design.yaml", DESIGN_RULE.replace('"5000.00"', '"6000.00"'))
    new, _ = await until_version(gk_a, lambda v: v != first, within_s=5)
    assert new != first
    await asyncio.sleep(0.3)
    assert (await active_version(gk_b))[0] == first  # B has not switched by itself

    status, body = await gk_b.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert (status, body["accepted"]) == (200, 2), body
    assert await active_version(gk_b) == (new, ADOPTED)
    received = await receiver.wait_for(2)
    release = next(r for r in received if r.path == "/bank")
    assert Webhook(SECRET).verify(release.raw, release.headers)["amount"] == "6000.00"
