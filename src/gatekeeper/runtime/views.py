"""The JSON views the API serves, built from the writer's mirror and the store.

Plain functions returning JSON-ready values (dicts, lists, strings; amounts as decimal
strings, times as RFC 3339 text). They read only: nothing here writes or changes memory.
Who may see what is the caller's business: the views that list several projects' things
take a ``visible(project)`` predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

from gatekeeper.clock import format_rfc3339
from gatekeeper.config import Escrow
from gatekeeper.engine.evaluate import Engine, approval_key, lapses_at, rule_paused
from gatekeeper.engine.facts import ProjectFacts
from gatekeeper.engine.ledger import format_amount
from gatekeeper.engine.model import FactKey, RuleState
from gatekeeper.engine.signoffs import is_money_rule, signoff_status
from gatekeeper.expr import Item, next_change_at
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.rules.model import Rule, SetFactAction
from gatekeeper.runtime.ingest import Writer
from gatekeeper.runtime.recent import KEPT
from gatekeeper.store import Store
from gatekeeper.store.contract import RulesetReads
from gatekeeper.store.queries import AuditQuery, Projects
from gatekeeper.store.records import EscrowFigures, ShadowedReleases, StoredDecision

Visible = Callable[[str | None], bool]
"""Whether the asker may see the things of a project (None: things of no project)."""


def rule_view(
    writer: Writer,
    rule: Rule,
    *,
    explain: bool,
    item: str | None = None,
    shadowed: Sequence[ShadowedReleases] | None = None,
) -> dict[str, Any]:
    """A rule as ``GET /v1/rules`` shows it: what it is and its firing state; with
    ``explain`` also its source and current explanation (``Engine.explain``).

    ``mode`` is the mode the rule runs in (``live``, ``shadow``, ``awaiting_signoff``); a
    money rule under the two-person rule shows ``signoff`` (``signoff_status``: hash,
    required, missing, who signed off). With ``shadowed`` (``Store.shadowed_releases``),
    a rule not live, or one with shadowed releases of its current content hash, shows
    ``shadowed_releases``: per escrow and currency, what its shadowed firings would have
    released (count, sum, first release id).

    A per-item rule (``for_each``) also shows ``for_each`` and ``instances`` (how many it
    has); its state is that of instance ``item`` when given (``item`` then names it; a
    ``KeyError`` when there is no such instance), else the sum of its instances' firings
    (``gate_open`` null) and an explanation without an item. ``paused``: the rule is
    paused (a per-item rule without ``item``: as a whole; with it: that instance, by its
    item or with its rule). ``state`` says in a word where the rule (or instance ``item``)
    stands (``instance_status``; a per-item rule without ``item`` has none) and ``blocked``
    why its release is blocked (None when it is not), ``blocks`` how many of its firings were
    blocked by their release; a per-item rule without ``item`` counts its
    ``blocked_instances`` instead."""
    state = None
    fired_count = 0
    blocked_instances = 0
    last_fired_at = None
    whole = writer.states.get((rule.id, "")) if rule.for_each is not None else None
    if rule.for_each is None:
        state = writer.states.get((rule.id, ""))
    elif item:
        if writer.facts.get((rule.project, rule.for_each, item)) is None:
            raise KeyError(f"rule {rule.id} has no instance {item!r}")
        state = writer.states.get((rule.id, item))
    else:
        for found in instance_states(writer, rule):
            fired_count += found.fired_count
            blocked_instances += found.blocked is not None
            if found.last_fired_at and (
                last_fired_at is None or found.last_fired_at > last_fired_at
            ):
                last_fired_at = found.last_fired_at
    if state is not None:
        fired_count, last_fired_at = state.fired_count, state.last_fired_at
    view: dict[str, Any] = {
        "id": rule.id,
        "project": rule.project,
        "description": rule.description,
        "when": rule.condition.text.strip(),
        "fire": rule.fire,
        "file": rule.file,
        "line": rule.line,
        "content_hash": rule.content_hash,
        "actions": [
            {a.kind: {"kind": a.fact_kind}}
            if isinstance(a, SetFactAction)
            else {a.kind: {"target": a.target}}
            for a in rule.actions
        ],
        "fired_count": fired_count,
        "last_fired_at": last_fired_at,
        "gate_open": state.gate_open if state else None,
        "paused": (state is not None and state.paused) or (whole is not None and whole.paused),
    }
    engine = writer.live_engine()
    mode = engine.mode_of(rule)
    view["mode"] = mode
    signoff = signoff_status(rule, engine.signoffs)
    if signoff is not None:
        view["signoff"] = signoff
    if shadowed is not None:
        own = [
            s.to_json()
            for s in shadowed
            if (s.rule_id, s.rule_hash) == (rule.id, rule.content_hash)
        ]
        if own or (mode != "live" and is_money_rule(rule)):
            view["shadowed_releases"] = own
    if rule.for_each is None or item:
        shown = state or RuleState(rule.id, instance=item or "")
        if whole is not None and whole.paused and not shown.paused:
            shown = replace(shown, paused=True)
        view["state"] = instance_status(rule, shown)
        view["blocked"] = shown.blocked
        view["blocks"] = shown.blocks
    if rule.for_each is not None:
        view["for_each"] = rule.for_each
        view["instances"] = len(writer.facts.of_kind(rule.project, rule.for_each))
        if item:
            view["item"] = item
        else:
            view["blocked_instances"] = blocked_instances
    if explain:
        view["source"] = dict(rule.source)
        view["explanation"] = writer.live_engine().explain(
            rule,
            writer.facts,
            state,
            writer.clock.now(),
            writer.approvals,
            item=item or "",
            whole=whole,
        )
    return view


def gate_timing(writer: Writer, rule: Rule, item: str = "") -> dict[str, Any]:
    """When time alone changes instance ``item`` of ``rule`` (``""``: a rule without
    ``for_each``), as RFC 3339 text: ``changes_at``, the next instant its condition may
    change with its facts as they are (``next_change_at``; None when time cannot change
    it, or its item is gone), and ``lapses``, each standing approval's lapse
    (``expires_after``), by approver (only those that lapse)."""
    now = writer.clock.now()
    changes_at = None
    lookup = ProjectFacts(rule.project, writer.facts)
    if rule.for_each is None:
        changes_at = next_change_at(rule.condition, lookup, now)
    elif item:
        data = writer.facts.get((rule.project, rule.for_each, item))
        if data is not None:
            found = Item(rule.for_each, item, data)
            changes_at = next_change_at(rule.condition, lookup, now, item=found)
    standing = writer.approvals.get(approval_key(rule.id, item), {})
    lapses = {
        subject: format_rfc3339(at)
        for subject, stand in sorted(standing.items())
        if (at := lapses_at(rule, stand)) is not None
    }
    return {
        "changes_at": None if changes_at is None else format_rfc3339(changes_at),
        "lapses": lapses,
    }


async def recent_decisions(writer: Writer, project: str, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` latest decisions of ``project``, newest first (``RecentDecisions``:
    ``at``, ``rule_id``, ``instance``, ``what``, ``trigger``, ``reason``); the first call
    for a project after a start seeds them from the audit log."""
    recent = writer.recent
    if project not in recent.seeded:
        query = AuditQuery(
            project=project, kinds=("decision",), projects=frozenset({project}), limit=KEPT
        )
        entries = await writer.store.audit(query)
        recent.seed(
            project,
            [
                {
                    "at": format_rfc3339(e.at),
                    "rule_id": e.rule_id,
                    "instance": e.instance,
                    "what": e.what,
                    "trigger": e.trigger,
                    "reason": e.reason,
                }
                for e in reversed(entries)
            ],
        )
    return recent.latest(project, limit)


def rule_status(writer: Writer, rule: Rule) -> str | None:
    """``instance_status`` of a rule without ``for_each`` (None for a per-item rule), read
    straight from the writer's states: what ``rule_view`` says as ``state``, without the
    rest of the view."""
    if rule.for_each is not None:
        return None
    return instance_status(rule, writer.states.get((rule.id, "")) or RuleState(rule.id))


def instance_states(writer: Writer, rule: Rule) -> list[RuleState]:
    """The states of the current instances of ``rule`` the writer holds (one lookup per
    fact of its ``for_each`` kind, not a pass over every rule's states)."""
    if rule.for_each is None:
        state = writer.states.get((rule.id, ""))
        return [] if state is None else [state]
    states = writer.states
    items = writer.facts.of_kind(rule.project, rule.for_each)
    found = (states.get((rule.id, item)) for item in items)
    return [state for state in found if state is not None]


def instances_view(
    writer: Writer, rule: Rule, *, after: str | None = None, limit: int = 100
) -> dict[str, Any]:
    """A page of the instances of per-item rule ``rule``, by item id: each item id with
    its state (``gate_open`` null: never evaluated), at most ``limit``, those after item id
    ``after``; ``next_cursor`` is the last item id of a full page (None on the last page).
    A rule without ``for_each`` has the one instance ``""``. Each row's ``state`` says in a
    word where the instance stands (``instance_status``); a per-item rule paused as a whole
    shows every instance ``paused``."""
    if rule.for_each is None:
        ids = [""]
    else:
        ids = sorted(writer.facts.of_kind(rule.project, rule.for_each))
    held = rule.for_each is not None and rule_paused(writer.states, rule.id)
    if after is not None:
        ids = [i for i in ids if i > after]
    page = ids[:limit]
    rows = []
    for item in page:
        state = writer.states.get((rule.id, item)) or RuleState(rule.id, instance=item)
        if held and not state.paused:
            state = replace(state, paused=True)
        rows.append(
            {
                "item": item,
                "state": instance_status(rule, state),
                "gate_open": state.gate_open,
                "fired_count": state.fired_count,
                "last_fired_at": state.last_fired_at,
                "paused": state.paused,
                "rearms": state.rearms,
                "blocked": state.blocked,
            }
        )
    more = len(ids) > limit
    return {
        "rule_id": rule.id,
        "for_each": rule.for_each,
        "instances": rows,
        "next_cursor": page[-1] if more and page else None,
    }


INSTANCE_STATUSES = ("new", "armed", "open", "fired", "paused", "blocked")
"""The words ``instance_status`` answers."""


def instance_status(rule: Rule, state: RuleState) -> str:
    """Where one instance stands, in a word: ``paused`` (an admin paused it, or its rule as
    a whole: evaluated, never fired), ``new`` (never evaluated), ``fired`` (a ``once``
    instance that fired and was not re-armed: it fires no more), ``blocked`` (its last
    firing's release was refused: it has not fired, and waits for a re-arm, a change of its
    escrow, a new version of its rule or its gate opening again; ``RuleState.blocked`` says
    why), ``open`` (its gate is open: an ``each_time`` or ``each_fact`` instance that fired
    on the gate's opening), else ``armed`` (its gate is closed: it fires when its condition
    holds and its approvals are satisfied)."""
    if state.paused:
        return "paused"
    if state.gate_open is None:
        return "new"
    if rule.fire == "once" and state.fired_count > state.rearms:
        return "fired"
    if state.blocked is not None:
        return "blocked"
    return "open" if state.gate_open else "armed"


async def rule_detail(
    writer: Writer,
    rule_id: str,
    decisions: int,
    item: str | None = None,
    *,
    instances_after: str | None = None,
    instances_limit: int = 100,
) -> dict[str, Any]:
    """A rule's full view: state, source, explanation, the ruleset version and its
    ``decisions`` most recent decisions (of instance ``item`` when given). A per-item rule
    shown without ``item`` also has ``instance_page``: a page of its instances with their
    states (``instances_view``: at most ``instances_limit`` after item id
    ``instances_after``; ``next_cursor`` the last item id of a full page). ``KeyError``
    when the live ruleset has no rule ``rule_id`` (or the rule no instance ``item``)."""
    engine = writer.live_engine()
    rule = engine.rules[rule_id]
    shadowed = await writer.store.shadowed_releases()
    view = rule_view(writer, rule, explain=True, item=item, shadowed=shadowed)
    view["ruleset_version"] = engine.ruleset.version
    if rule.for_each is not None and not item:
        page = instances_view(writer, rule, after=instances_after, limit=instances_limit)
        view["instance_page"] = {
            "instances": page["instances"],
            "next_cursor": page["next_cursor"],
        }
    recent = await writer.store.list_decisions(rule_id, limit=decisions, instance=item or None)
    view["recent_decisions"] = [d.to_json() for d in recent]
    return view


def ruleset_view(engine: Engine | None) -> dict[str, Any] | None:
    """The live ruleset: version, git commit, number of rules, file names (None before a
    ruleset went live)."""
    if engine is None:
        return None
    ruleset = engine.ruleset
    return {
        "version": ruleset.version,
        "git_commit": ruleset.git_commit,
        "rules": len(ruleset.rules),
        "files": sorted(ruleset.files),
    }


async def escrow_report(store: Store, escrows: Mapping[str, Escrow]) -> list[dict[str, Any]]:
    """Per escrow, by name, as decimal strings with the escrow's precision (``decimals``,
    also given; ``format_amount``): currency, limit, the ledger's figures
    (``EscrowFigures``: reserved, sent, settled, returned) and remaining = limit -
    (reserved + sent + settled); and, as before, released (sent + settled), pending
    (reserved, queued) and unconfirmed (reserved, dead-lettered: counted as possibly paid).
    An escrow with releases but no longer configured has None for currency, limit and
    remaining."""
    totals = await store.escrow_totals()
    report = []
    for name in sorted(set(escrows) | set(totals)):
        account = escrows.get(name)
        figures = totals.get(name, EscrowFigures())
        decimals = account.decimals if account else Escrow.decimals

        def shown(amount: Decimal, decimals: int = decimals) -> str:
            return format_amount(amount, decimals)

        report.append(
            {
                "escrow": name,
                "currency": account.currency if account else None,
                "limit": shown(account.limit) if account else None,
                "decimals": decimals if account else None,
                "reserved": shown(figures.reserved),
                "sent": shown(figures.sent),
                "settled": shown(figures.settled),
                "returned": shown(figures.returned),
                "remaining": shown(account.limit - figures.committed) if account else None,
                "released": shown(figures.sent + figures.settled),
                "pending": shown(figures.reserved - figures.unconfirmed),
                "unconfirmed": shown(figures.unconfirmed),
            }
        )
    return report


async def export_view(
    writer: Writer,
    escrows: Mapping[str, Escrow],
    visible: Visible,
    projects: Projects,
    *,
    after: FactKey | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """A snapshot of the state, in the format ``gatekeeper plan --snapshot`` reads: current
    facts, every rule's firing state, standing approvals, the live ruleset's content
    hashes, the escrows, the sign-offs of money rules by content hash and what shadowed
    firings would have released; facts, states and approvals only of ``visible`` projects (facts
    filtered by the store, by ``projects``: the same set).

    The facts are paged: at most ``limit`` (None: all) in ``(project, kind, id)`` order,
    after ``after``. The first page (``after`` None) holds everything else too; a later
    page only ``facts``."""
    facts = await writer.store.list_facts(projects=projects, after=after, limit=limit)
    if after is not None:
        return {"facts": [f.to_json() for f in facts]}
    engine = writer.engine
    rules = engine.rules if engine else {}
    return {
        "facts": [f.to_json() for f in facts],
        "rule_states": [
            {
                "rule_id": s.rule_id,
                **({"instance": s.instance} if s.instance else {}),
                "fired_count": s.fired_count,
                "gate_open": s.gate_open,
                "rearms": s.rearms,
                "paused": s.paused,
                "last_fired_at": s.last_fired_at,
                **({"blocked": s.blocked} if s.blocked is not None else {}),
                **({"blocks": s.blocks} if s.blocks else {}),
            }
            for s in sorted(writer.states.values(), key=lambda s: (s.rule_id, s.instance))
            if s.rule_id not in rules or visible(rules[s.rule_id].project)
        ],
        "approvals": {
            rule_id: {subject: stand.decision for subject, stand in standing.items()}
            for rule_id, standing in sorted(writer.approvals.items())
            if standing
            and ((of := rule_id.split("[", 1)[0]) not in rules or visible(rules[of].project))
        },
        "ruleset": {
            "version": engine.ruleset.version if engine else None,
            "rules": {r.id: r.content_hash for r in rules.values()},
        },
        "escrows": await escrow_report(writer.store, escrows),
        "signoffs": {
            content_hash: [
                {
                    "actor": actor,
                    "at": None if signoff.at is None else format_rfc3339(signoff.at),
                    "comment": signoff.comment,
                }
                for actor, signoff in sorted(signed.items())
            ]
            for content_hash, signed in sorted(writer.signed.items())
            if signed and any(visible(s.project or None) for s in signed.values())
        },
        "shadowed_releases": [
            {"rule_id": s.rule_id, "rule_hash": s.rule_hash, **s.to_json()}
            for s in await writer.store.shadowed_releases()
            if s.rule_id not in rules or visible(rules[s.rule_id].project)
        ],
    }


async def release_view(store: Store, release_id: str) -> tuple[str, dict[str, Any]] | None:
    """The whole story of one release, with the project it belongs to ("" when its action
    is gone): the ledger entry and its movements (reserve, send, ...), the decision that
    made it, the fact that triggered it, the exact rule text of the ruleset version in
    force, the action and every delivery attempt. None when there is no such release."""
    release = await store.release_record(release_id)
    if release is None:
        return None
    decision = await store.decision_of_firing(release.firing_id)
    action = await store.get_action(release_id)
    project = action.payload.get("project", "") if action else ""
    attempts = await store.list_attempts(release_id)
    movements = await store.ledger_movements(release_id=release_id)
    fact = await store.fact_at(decision.fact_seq) if decision and decision.fact_seq else None
    rule_text = await _rule_text(store, decision) if decision else None
    return project, {
        "release": release.to_json(),
        "movements": [m.to_json() for m in movements],
        "decision": decision.to_json() if decision else None,
        "triggered_by": fact.to_json() if fact else None,
        "rule": rule_text,
        "action": action.to_json() if action else None,
        "delivery_attempts": [a.to_json() for a in attempts],
    }


async def _rule_text(store: RulesetReads, decision: StoredDecision) -> dict[str, Any] | None:
    """The file and source of the decision's rule in the ruleset version it ran under."""
    stored = await store.get_ruleset(decision.ruleset_version)
    if stored is None:
        return None
    rules = load_rule_texts(stored.files, None).ruleset
    rule = rules.by_id().get(decision.rule_id) if rules else None
    if rule is None:
        return None
    return {
        "ruleset_version": stored.version,
        "git_commit": stored.git_commit,
        "file": rule.file,
        "line": rule.line,
        "content_hash": rule.content_hash,
        "source": dict(rule.source),
        "file_text": stored.files[rule.file],
    }
