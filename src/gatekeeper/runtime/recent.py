"""The latest decisions of each project, kept in memory for the status page.

Reading "the last 20 decisions of a project" from the audit log is a sort of the whole log
(decisions of every rule, admin acts and approvals in one union): fine for the API's
paged audit, too slow for a page that many people keep open while facts pour in. So the
writer hands every decision it applies to ``RecentDecisions``, which keeps the last
``KEPT`` of each project (an append to a bounded deque per decision), and so does its
catch-up with the decisions other daemons sharing the database committed. After a start a
project's list is seeded once from the store (``seeded``), older entries first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from gatekeeper.engine.model import Decision
from gatekeeper.store.records import CaughtUpDecision

KEPT = 50
"""Decisions kept per project."""


class RecentDecisions:
    """The last ``KEPT`` decisions of each project, newest last, as JSON-ready dicts
    (``at``, ``rule_id``, ``instance``, ``what``: the outcome, ``trigger``, ``reason``)."""

    def __init__(self) -> None:
        self._by_project: dict[str, deque[dict[str, Any]]] = {}
        self.seeded: set[str] = set()
        """Projects whose list was seeded from the store since the start."""

    def add(self, decisions: Iterable[Decision | CaughtUpDecision]) -> None:
        """Keep ``decisions``, in the order they were decided: applied by this daemon, or
        committed by another one sharing the database (a catch-up read them)."""
        for decision in decisions:
            kept = self._by_project.get(decision.project)
            if kept is None:
                kept = self._by_project[decision.project] = deque(maxlen=KEPT)
            kept.append(
                {
                    "at": decision.decided_at,
                    "rule_id": decision.rule_id,
                    "instance": decision.instance,
                    "what": decision.outcome,
                    "trigger": decision.trigger,
                    "reason": decision.reason,
                }
            )

    def seed(self, project: str, stored: list[dict[str, Any]]) -> None:
        """Merge the project's latest ``stored`` decisions (oldest first, from the store:
        those kept since the start are among them, being committed before they were kept)
        with those kept, each once, in time order."""
        seen = {_identity(entry) for entry in stored}
        kept = self._by_project.get(project, ())
        merged = stored + [entry for entry in kept if _identity(entry) not in seen]
        merged.sort(key=lambda entry: str(entry["at"]))  # stable: same instant, same order
        self._by_project[project] = deque(merged, maxlen=KEPT)
        self.seeded.add(project)

    def latest(self, project: str, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` latest decisions of ``project``, newest first."""
        kept = self._by_project.get(project, ())
        return list(reversed(list(kept)[-limit:]))


def _identity(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What tells two kept decisions apart (a decision kept and read back from the store
    compare equal)."""
    return (entry["at"], entry["rule_id"], entry["instance"], entry["what"], entry["trigger"])
