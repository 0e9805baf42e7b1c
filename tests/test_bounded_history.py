"""What the history keeps stays bounded by what was posted, not by what rules read: a rule
reading a whole kind records its decisions by reference, not a copy of every fact."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import Project, fact

KIND_RULE = """\
id: tower-a/all-tasks
project: tower-a
when: len(task) >= 1000 and task["T-1"].status == "open"
fire: each_time
actions:
  - notify: {target: finance-chat, message: "all tasks in"}
"""

TASKS = 500
POSTS = 200
MAX_BYTES_PER_POST = 2_000
"""A post of one small fact that makes one decision: the fact log entry, the current fact
and the decision with its indexes, in pages. Copying the 500 tasks the rule reads into the
decision took about 30,000 bytes a post."""


def _used_bytes(path: Path) -> int:
    """The bytes of the database's pages in use (WAL included, free pages not)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _task(i: int, posted: int) -> dict[str, Any]:
    return fact("task", f"T-{i}", status="open", owner=f"owner-{i % 7}", posted=posted)


async def test_a_rule_reading_a_whole_kind_stores_bounded_decisions(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("all.yaml", KIND_RULE)
    gk = await start_daemon(project)
    status, _ = await gk.post("/v1/facts", {"facts": [_task(i, 0) for i in range(TASKS)]})
    assert status == 200
    path = project.root / "state" / "gatekeeper.db"
    before = _used_bytes(path)
    for n in range(POSTS):
        status, _ = await gk.post("/v1/facts", _task(n % TASKS, n + 1))
        assert status == 200
    per_post = (_used_bytes(path) - before) / POSTS
    kind_chars = len(json.dumps({f"T-{i}": _task(i, 0)["data"] for i in range(TASKS)}))
    print(f"\n{per_post:,.0f} bytes per post (one decision); the kind is {kind_chars:,} chars")
    assert per_post < MAX_BYTES_PER_POST

    status, view = await gk.get("/v1/rules/tower-a/all-tasks")
    assert status == 200
    decisions = view["recent_decisions"]
    assert len(decisions) == 20
    latest = decisions[0]["evaluation"]
    assert latest["seen"] == {"task.T-1": _task(1, 2)["data"]}  # T-1 as last posted
    assert latest["seen_kinds"]["task"]["facts"] == TASKS
    view_chars = len(json.dumps(view))
    recent_chars = len(json.dumps(decisions))
    print(f"rule view {view_chars:,} chars, of which recent decisions {recent_chars:,}")
    assert recent_chars < 20 * 1_000  # 20 decisions; each copied the kind before
    assert view_chars < kind_chars + 40_000  # the live explanation shows the kind once


async def test_facts_and_the_export_are_paged_and_the_clients_follow_the_pages(
    project_factory: Callable[..., Project], start_daemon: Any, tmp_path: Path
) -> None:
    import asyncio
    import subprocess
    import sys

    from gatekeeper.cli.snapshot import fetch_snapshot, load_snapshot

    project = project_factory()
    project.write_rule("all.yaml", KIND_RULE)
    gk = await start_daemon(project)
    count = 2_345
    for start in range(0, count, 1000):
        batch = [_task(i, 0) for i in range(start, min(count, start + 1000))]
        assert (await gk.post("/v1/facts", {"facts": batch}))[0] == 200

    status, first = await gk.get("/v1/facts")
    assert status == 200
    assert len(first["facts"]) == 1000 and first["next_cursor"]  # the documented default
    keys = []
    page = first
    while True:
        keys += [(f["project"], f["kind"], f["id"]) for f in page["facts"]]
        if page["next_cursor"] is None:
            break
        status, page = await gk.get(f"/v1/facts?limit=700&cursor={page['next_cursor']}")
        assert status == 200 and len(page["facts"]) <= 700
    assert keys == sorted({("tower-a", "task", f"T-{i}") for i in range(count)})
    assert (await gk.get("/v1/facts?cursor=bm90LWEtY3Vyc29y"))[0] == 400
    assert (await gk.get("/v1/facts?limit=1001"))[0] == 400

    status, export = await gk.get("/v1/export?limit=1000")
    assert status == 200 and len(export["facts"]) == 1000 and "rule_states" in export
    status, later = await gk.get(f"/v1/export?cursor={export['next_cursor']}")
    assert status == 200 and set(later) == {"facts", "next_cursor"}

    out = tmp_path / "snapshot.json"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "gatekeeper",
            "export",
            "-o",
            str(out),
            "--url",
            gk.url,
            "-c",
            str(project.config_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert len(written["facts"]) == count and "next_cursor" not in written
    assert load_snapshot(out).fact_count == count
    fetched = await asyncio.to_thread(fetch_snapshot, gk.url, lambda hashes: [])
    assert fetched.fact_count == count


async def test_rulesets_are_listed_by_page(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    project = project_factory()
    project.write_rule("all.yaml", KIND_RULE)
    gk = await start_daemon(project)
    for n in range(3):
        project.write_rule("all.yaml", KIND_RULE.replace("1000", str(2000 + n)))
        assert await gk.daemon.reload()
    versions = []
    status, page = await gk.get("/v1/rulesets?limit=3")
    assert status == 200 and len(page["rulesets"]) == 3 and page["next_cursor"]
    versions += [r["version"] for r in page["rulesets"]]
    status, page = await gk.get(f"/v1/rulesets?limit=3&cursor={page['next_cursor']}")
    assert status == 200 and page["next_cursor"] is None
    versions += [r["version"] for r in page["rulesets"]]
    assert len(set(versions)) == 4
    assert (await gk.get("/v1/rulesets?cursor=WyJ4IiwgInkiXQ=="))[0] == 400  # ["x", "y"]
