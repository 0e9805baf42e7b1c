"""What each page shows, built from the runtime's views (``Daemon`` reads) for one viewer.

Plain functions returning dicts for the templates; they read only. Who may see a project
is decided by the handlers (``Viewer.sees``); what a viewer may do here (``can_approve``,
``can_admin``) follows the API's scopes and projects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.config import Token
from gatekeeper.rules.model import ReleaseAction, Rule
from gatekeeper.runtime.daemon import Daemon
from gatekeeper.store.queries import AuditQuery

RECENT = 20
"""How many recent decisions and deliveries a project page lists."""
DEAD_LETTERS = 50
"""How many dead letters a project page lists at most."""
INSTANCES_PAGE = 50
"""How many instances of a per-item rule a rule page lists at a time."""
GATES_PAGE = 50
"""How many gates a project page shows at a time (its summary counts them all)."""
GATE_STATES = (
    "armed",
    "open",
    "waiting for approvals",
    "fired",
    "paused",
    "blocked",
    "new",
    "per item",
)
"""The words ``gate_state`` answers (with ``mode`` shown beside: shadow, awaiting
sign-off)."""


@dataclass(frozen=True)
class Filters:
    """What a list shows: items whose state is ``state`` and whose id contains
    ``search``, the page after id ``after`` (None: no filter, the first page)."""

    state: str | None = None
    search: str | None = None
    after: str | None = None

    def keeps(self, state: str, key: str) -> bool:
        """Whether an item in ``state`` with id ``key`` passes the filters."""
        return (not self.state or state == self.state) and (not self.search or self.search in key)


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page: their token (None when the daemon has no tokens: the page is
    read-only then) and the CSRF token their forms carry."""

    token: Token | None
    csrf: str = ""

    @property
    def subject(self) -> str | None:
        return self.token.subject if self.token else None

    @property
    def rights(self) -> str:
        """What a page shown to this viewer depends on, as one string: the token's hash,
        subject, scopes and projects ("" without tokens). A reload that changes any of
        them changes it, so no page rendered for the old rights is served."""
        token = self.token
        if token is None:
            return ""
        return repr((token.sha256, token.subject, sorted(token.scopes), token.projects))

    def sees(self, project: str) -> bool:
        """Whether this viewer may see ``project`` (as ``GET /v1/rules/{id}`` allows)."""
        return self.token is None or self.token.allows_project(project)

    def can_approve(self, rule: Rule) -> bool:
        """Approve, reject or withdraw on ``rule``: a token with ``approve`` for its
        project whose subject is one of the rule's approvers."""
        token = self.token
        return (
            token is not None
            and rule.approvals is not None
            and "approve" in token.scopes
            and token.allows_project(rule.project)
            and token.subject in rule.approvals.from_
        )

    def can_admin(self, project: str) -> bool:
        """Pause, resume, re-arm and retry dead letters in ``project``: a token with
        ``admin`` for it."""
        token = self.token
        return token is not None and "admin" in token.scopes and token.allows_project(project)

    def projects(self) -> frozenset[str] | None:
        """The projects the store may list for this viewer (None: all)."""
        if self.token is None or "*" in self.token.projects:
            return None
        return frozenset(self.token.projects)


def projects_of(daemon: Daemon, viewer: Viewer) -> list[dict[str, Any]]:
    """Each project of the live ruleset the viewer may see, by name: its number of rules
    and how many stand in each ``gate_state``."""
    counts: dict[str, dict[str, int]] = {}
    rules: dict[str, int] = {}
    for rule in daemon.rules():
        if not viewer.sees(rule.project):
            continue
        rules[rule.project] = rules.get(rule.project, 0) + 1
        state = summary_state(daemon, rule)
        per = counts.setdefault(rule.project, {})
        per[state] = per.get(state, 0) + 1
    return [
        {"name": name, "rules": rules[name], "states": sorted(counts[name].items())}
        for name in sorted(rules)
    ]


def gate_state(view: dict[str, Any]) -> str:
    """Where a gate stands in words (``GATE_STATES``), from ``Daemon.rule_view``: paused,
    blocked and fired first; then a condition that holds while approvals are missing is
    ``waiting for approvals``; else the view's state (armed, open, new). A per-item rule
    without an item says ``per item``."""
    state = view.get("state")
    if state is None:
        return "per item"
    if state in ("paused", "blocked", "fired"):
        return str(state)
    explanation = view.get("explanation")
    if explanation is not None:
        approvals = explanation["approvals"]
        if explanation["condition"]["value"] and not approvals["satisfied"]:
            return "waiting for approvals"
    return str(state)


def summary_state(daemon: Daemon, rule: Rule) -> str:
    """``gate_state`` of ``rule`` at the least cost: a per-item rule is ``per item`` (its
    instances are not counted), and only a rule with approvals whose gate is closed is
    explained (to tell ``waiting for approvals`` from ``armed``)."""
    status = daemon.rule_status(rule)
    if status is None:
        return "per item"
    if rule.approvals is not None and status in ("armed", "new"):
        return gate_state(daemon.rule_view(rule, explain=True))
    return status


def mode_label(mode: str) -> str | None:
    """The badge of a rule not running live: ``shadow`` or ``awaiting sign-off``."""
    return {"shadow": "shadow", "awaiting_signoff": "awaiting sign-off"}.get(mode)


def gate(daemon: Daemon, rule: Rule, viewer: Viewer, item: str | None = None) -> dict[str, Any]:
    """One gate as a page shows it: the rule's view (with its explanation unless it is a
    per-item rule shown without an item), its state in words, its sub-conditions with
    ✓/✗ and the fact values each saw, its approvals (who approved or rejected, who is still
    needed, when each approval lapses), when time alone next changes it, and what the
    viewer may do. ``KeyError`` for an item the rule has no instance of."""
    explain = rule.for_each is None or item is not None
    view = daemon.rule_view(rule, explain=explain, item=item)
    shown: dict[str, Any] = {
        "rule": rule,
        "view": view,
        "item": item,
        "state": gate_state(view),
        "mode": mode_label(view["mode"]),
        "can_approve": viewer.can_approve(rule),
        "can_admin": viewer.can_admin(rule.project),
        "escrows": sorted({a.escrow for a in rule.actions if isinstance(a, ReleaseAction)}),
    }
    explanation = view.get("explanation")
    if explanation is not None:
        shown["clauses"] = clauses(explanation["condition"])
        shown["approvals"] = approvals(rule, explanation["approvals"], viewer)
        timing = daemon.gate_timing(rule, item or "")
        shown["lapses"] = timing["lapses"]
        shown["changes_at"] = countdown(timing["changes_at"], daemon.clock.now())
    return shown


def clauses(condition: dict[str, Any]) -> list[dict[str, Any]]:
    """The sub-conditions of an evaluation: text, value (True, False, or None when it could
    not be evaluated: an error; a missing fact makes it False), the facts it saw with their
    values, the names it missed."""
    seen: dict[str, Any] = condition.get("seen", {})
    shown = []
    for clause in condition["clauses"]:
        text = clause["text"]
        shown.append(
            {
                "text": text,
                "value": None if clause.get("error") else bool(clause["value"]),
                "seen": [(name, value) for name, value in seen.items() if _mentions(text, name)],
                "missing": clause.get("missing", []),
                "error": clause.get("error"),
            }
        )
    return shown


def _mentions(text: str, name: str) -> bool:
    """Whether clause ``text`` reads the fact value ``name`` (``milestone.design.status``,
    ``task["T-17"].status``): its kind and id both appear in the text."""
    parts = [p for p in name.replace('"', ".").replace("[", ".").replace("]", ".").split(".") if p]
    return all(part in text for part in parts[:2])


def approvals(rule: Rule, standing: dict[str, Any], viewer: Viewer) -> dict[str, Any] | None:
    """A rule's approvals (None when it takes none): required, approved_by, rejected_by,
    lapsed, and ``needed``: how many more approvals it needs and from whom they may come
    (the listed approvers who have not approved), and the viewer's own standing."""
    if rule.approvals is None:
        return None
    approved = list(standing.get("approved_by", []))
    rejected = list(standing.get("rejected_by", []))
    waiting = [s for s in rule.approvals.from_ if s not in approved and s not in rejected]
    mine = None
    if viewer.subject in approved:
        mine = "approve"
    elif viewer.subject in rejected:
        mine = "reject"
    return {
        "required": standing["required"],
        "approved_by": approved,
        "rejected_by": rejected,
        "lapsed": list(standing.get("lapsed", [])),
        "needed": max(0, rule.approvals.required - len(approved)),
        "from": waiting,
        "satisfied": standing["satisfied"],
        "mine": mine,
    }


def countdown(when: str | None, now: datetime) -> dict[str, Any] | None:
    """A time gate's next change as a page counts down to it: ``at`` (RFC 3339, UTC) and
    ``in_s`` (whole seconds from ``now``); None when time cannot change the gate, or only
    by a re-check every second (a condition whose instant cannot be solved)."""
    if when is None:
        return None
    seconds = (parse_rfc3339(when) - now).total_seconds()
    if seconds <= 1.0:
        return None
    return {"at": when, "in_s": int(seconds), "text": duration_text(int(seconds))}


def duration_text(seconds: int) -> str:
    """``3d 4h 0m 12s``, ``5m 10s`` or ``9s``: from the largest unit down to seconds (as
    the page's script counts down)."""
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for name, size in units:
        if parts or seconds >= size or name == "s":
            parts.append(f"{seconds // size}{name}")
            seconds %= size
    return " ".join(parts)


def escrows(report: list[dict[str, Any]], names: set[str] | None) -> list[dict[str, Any]]:
    """The escrows of ``report`` (``Daemon.escrow_report``) named in ``names`` (None: all),
    each with its figures and the bar's shares of the limit in percent (settled, sent,
    reserved, remaining)."""
    shown = []
    for escrow in report:
        if names is not None and escrow["escrow"] not in names:
            continue
        shown.append({**escrow, "bar": bar(escrow)})
    return shown


def bar(escrow: dict[str, Any]) -> list[tuple[str, float]]:
    """The shares of the limit (percent, one decimal) of settled, sent, reserved and
    remaining; none when the escrow has no limit."""
    try:
        limit = Decimal(escrow["limit"])
    except (TypeError, InvalidOperation):
        return []
    if limit <= 0:
        return []
    parts = []
    for name in ("settled", "sent", "reserved", "remaining"):
        value = Decimal(escrow[name] or "0")
        parts.append((name, float(round(max(value, Decimal(0)) * 100 / limit, 1))))
    return parts


async def project_page(
    daemon: Daemon, viewer: Viewer, project: str, filters: Filters = Filters()
) -> dict[str, Any]:
    """The project page: how many gates stand in each state; a page of its gates that pass
    ``filters`` (``GATES_PAGE``, in ruleset order after rule id ``filters.after``); the
    escrows its rules release from; recent decisions,
    recent deliveries and dead letters with their reason."""
    rules = [rule for rule in daemon.rules() if rule.project == project]
    states = [(rule, summary_state(daemon, rule)) for rule in rules]
    counts: dict[str, int] = {}
    for _, found in states:
        counts[found] = counts.get(found, 0) + 1
    chosen = [rule for rule, found in states if filters.keeps(found, rule.id)]
    ids = [rule.id for rule in chosen]
    start = ids.index(filters.after) + 1 if filters.after in ids else 0
    shown = chosen[start : start + GATES_PAGE]
    more = start + GATES_PAGE < len(chosen)
    names = {a.escrow for rule in rules for a in rule.actions if isinstance(a, ReleaseAction)}
    only = frozenset({project})
    return {
        "project": project,
        "counts": sorted(counts.items(), key=lambda pair: GATE_STATES.index(pair[0])),
        "total": len(rules),
        "matching": len(chosen),
        "gates": [gate(daemon, rule, viewer) for rule in shown],
        "next_after": shown[-1].id if more and shown else None,
        "escrows": escrows(await daemon.escrow_report(), names),
        "decisions": await daemon.recent_decisions(project, RECENT),
        "deliveries": [a.to_json() for a in await daemon.list_actions(None, RECENT, projects=only)],
        "dead": [
            a.to_json() for a in await daemon.list_actions("dead", DEAD_LETTERS, projects=only)
        ],
        "can_admin": viewer.can_admin(project),
    }


async def rule_page(
    daemon: Daemon, viewer: Viewer, rule: Rule, item: str | None, filters: Filters = Filters()
) -> dict[str, Any]:
    """A rule's page (of instance ``item``): its gate, its recent decisions, and for a
    per-item rule shown without an item a page of its instances that pass ``filters``
    (``INSTANCES_PAGE`` after item id ``filters.after``).
    ``KeyError`` for an item the rule has no instance of."""
    shown = gate(daemon, rule, viewer, item)
    decisions = await daemon.audit(
        AuditQuery(
            rule_id=rule.id,
            instance=item,
            kinds=("decision", "admin_act", "approval"),
            projects=frozenset({rule.project}),
            limit=RECENT,
        )
    )
    page: dict[str, Any] = {"gate": shown, "history": [e.to_json() for e in decisions]}
    if rule.for_each is not None and item is None:
        page["instances"], page["next_after"] = instances(daemon, rule, filters)
    return page


def instances(
    daemon: Daemon, rule: Rule, filters: Filters
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the instances of per-item rule ``rule`` that pass ``filters`` (by item id,
    after ``filters.after``), and the item id to continue after (None on the last page)."""
    found: list[dict[str, Any]] = []
    cursor = filters.after
    while True:
        chunk = daemon.rule_instances(rule, after=cursor, limit=1000)
        for row in chunk["instances"]:
            if not filters.keeps(row["state"], row["item"]):
                continue
            found.append(row)
            if len(found) == INSTANCES_PAGE:
                return found, row["item"]
        cursor = chunk["next_cursor"]
        if cursor is None:
            return found, None


def utc_text(value: str | None) -> str:
    """An RFC 3339 time as UTC text for a page (``2026-11-01 09:00:00Z``), "" for None."""
    if not value:
        return ""
    return format_rfc3339(parse_rfc3339(value)).replace("T", " ")
