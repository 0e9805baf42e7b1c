"""The latest decisions kept per project for the status page: kept as applied, and seeded
once from the store after a start without listing a decision twice."""

from __future__ import annotations

from collections import deque
from typing import Any

from gatekeeper.runtime.recent import KEPT, RecentDecisions


def entry(at: str, rule: str = "tower-a/r", what: str = "not_met") -> dict[str, Any]:
    return {"at": at, "rule_id": rule, "instance": "", "what": what, "trigger": "fact",
            "reason": None}  # fmt: skip


def test_seeding_merges_the_store_with_what_was_kept_each_once_in_time_order() -> None:
    recent = RecentDecisions()
    kept = [entry("2026-12-07T10:00:02Z"), entry("2026-12-07T10:00:03Z", what="fired")]
    recent._by_project["tower-a"] = deque(kept, maxlen=KEPT)
    stored = [entry("2026-12-07T09:00:00Z"), entry("2026-12-07T10:00:02Z")]
    recent.seed("tower-a", stored)
    assert [e["at"] for e in recent.latest("tower-a", 10)] == [
        "2026-12-07T10:00:03Z",
        "2026-12-07T10:00:02Z",
        "2026-12-07T09:00:00Z",
    ]
    assert recent.latest("tower-a", 1)[0]["what"] == "fired"
    assert "tower-a" in recent.seeded
    assert recent.latest("tower-b", 5) == []


def test_only_the_latest_are_kept() -> None:
    recent = RecentDecisions()
    recent.seed("tower-a", [entry(f"2026-12-07T10:{n // 60:02}:{n % 60:02}Z") for n in range(80)])
    latest = recent.latest("tower-a", 100)
    assert len(latest) == KEPT
    assert latest[0]["at"] == "2026-12-07T10:01:19Z"
