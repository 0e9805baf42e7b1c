"""A deployment's recorded history, read for a replay (``gatekeeper backtest``): the events
the daemon committed, in its order, and the firings and decisions it recorded.

What is read (only through the Store contract's read methods, on a store opened
read-only): the whole fact log (posted facts, approvals as kind ``approval``, facts set by
rules), the decision log, the actions each decision queued, the admin acts of the audit
log and the stored ruleset versions. ``History`` holds them as the store's records.

Events (``events_of``; the records are ``gatekeeper.engine.replay``'s):

- a run of posted facts with the same request id and time (one request's batch) is one
  ``PostedFacts``; facts set by rules are not events (the replay sets them again);
- an approval in the fact log is an ``ApprovalGiven``;
- an admin act ``pause``, ``resume`` or ``rearm`` is an ``AdminActed`` (other acts, such
  as requeuing a dead letter, change nothing a rule decides); ``ADMIN_ACTS`` maps an act's
  name to the function that makes its event;
- each instant at which decisions were made by the clock (trigger ``time``) is a
  ``ClockTick``;
- each instant a ruleset version went live is an ``Activated``: the instants of the
  decisions a reload or start made (trigger ``reload``), and each version's first and
  last activation (what the rulesets table keeps). A start is told from a reload by what
  it decided: a start evaluates every rule, so every rule without ``for_each`` has a
  decision then (a version with none: taken as a start). A version live again between
  its first and last activation without deciding anything then is not seen;
- each ``return`` movement of the ledger (a release cancelled by an admin, act
  ``cancel_action``; or failed by the bank's settlement callback: ``fail`` then
  ``return``) is a ``Returned`` naming the release by where it was decided
  (``ReleaseSpot``), placed at the re-evaluation it made (decisions with trigger
  ``return`` at its instant), else by its time;
- each ``reclaim`` movement (the bank settled a cancelled release anyway) is a
  ``Reclaimed`` naming the release by its spot, placed by its time (it decides nothing).

Order: the daemon's commit order, which the decision ids give: each event is placed at its
first decision, an event that decided nothing just before the first decision made after
it (it changed nothing a later decision of another event reads, or it would have decided
something itself). Ties keep the order of each log.

A return that decided nothing is placed by its time only (after the log events recorded
at or before its millisecond): the daemon takes a cancel's and a settlement's time under
the writer's lock, so times follow the commit order, to the millisecond.

Request ids are given by clients (``X-Request-Id``): two batches posted with the same id
in the same millisecond (committed together) are replayed as one batch.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from gatekeeper.clock import format_rfc3339
from gatekeeper.config import Config
from gatekeeper.engine.backtest import (
    ActionNames,
    BacktestDiff,
    DecisionRecord,
    FiringRecord,
    SelfCheck,
    action_record,
    approvals_text,
    compare_decisions,
    decision_record,
    diff_firings,
    firings_of,
    mark_returned,
    shared,
)
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    CausedBy,
    FactInput,
    SignOff,
    Transition,
)
from gatekeeper.engine.replay import (
    Activated,
    AdminActed,
    ApprovalGiven,
    ClockTick,
    Event,
    PostedFacts,
    Reclaimed,
    ReleaseSpot,
    Replay,
    Returned,
    SignOffGiven,
    Step,
    counting_ids,
)
from gatekeeper.engine.signoffs import SignedOff
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.rules.model import Ruleset
from gatekeeper.store.queries import AuditQuery, Projects
from gatekeeper.store.records import (
    AuditEntry,
    LedgerMovement,
    LoggedFact,
    OutboxEntry,
    ReleaseRecord,
    RulesetCursor,
    RulesetSummary,
    StoredDecision,
    StoredRuleset,
)

PAGE = 5000
"""Records read per call."""


class HistoryReads(Protocol):
    """The read methods a history is read with: the Store contract's (a store opened
    read-only), or the same through a daemon's HTTP API (``cli.backtest.ApiHistory``)."""

    async def fact_log(self, after_seq: int = 0, limit: int = 1000) -> list[LoggedFact]: ...

    async def decision_log(
        self,
        after_id: int = 0,
        limit: int = 1000,
        *,
        evaluations: bool = True,
        quiet: bool = True,
    ) -> list[StoredDecision]: ...

    async def actions_of_decisions(self, first_id: int, last_id: int) -> list[OutboxEntry]: ...

    async def fact_log_positions(self, decision_ids: Sequence[int]) -> dict[int, int]: ...

    async def audit(self, query: AuditQuery) -> list[AuditEntry]: ...

    async def list_rulesets(
        self, limit: int = 100, *, after: RulesetCursor | None = None
    ) -> list[RulesetSummary]: ...

    async def get_ruleset(self, version: str) -> StoredRuleset | None: ...

    async def release_record(self, release_id: str) -> ReleaseRecord | None: ...

    async def ledger_movements(
        self,
        escrow: str | None = None,
        *,
        release_id: str | None = None,
        after: int = 0,
        limit: int = 1000,
        projects: Projects = None,
    ) -> list[LedgerMovement]: ...


@dataclass
class History:
    """The recorded history: the fact log (seq order), the decisions (id order, without
    their evaluations), the actions they queued (decision order), the engine's admin acts
    (oldest first), the ruleset versions, and (for the self-check) each release's ledger
    entry by release id."""

    facts: list[LoggedFact] = field(default_factory=list)
    decisions: list[StoredDecision] = field(default_factory=list)
    actions: list[OutboxEntry] = field(default_factory=list)
    admin_acts: list[AuditEntry] = field(default_factory=list)
    rulesets: list[RulesetSummary] = field(default_factory=list)
    ledger: dict[str, ReleaseRecord] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    """For each decision made by the clock, an admin act, a reload or a return: the fact
    log ``seq`` the daemon had committed before it (``fact_log_positions``)."""
    returns: list[LedgerMovement] = field(default_factory=list)
    """The ledger's ``return`` movements, in the order written."""
    reclaims: list[LedgerMovement] = field(default_factory=list)
    """The ledger's ``reclaim`` movements (a cancelled release the bank settled anyway),
    in the order written."""
    returned_as: dict[str, str] = field(default_factory=dict)
    """Release id -> ``cancelled`` or ``failed``, for each release returned."""

    @property
    def last_at(self) -> datetime | None:
        """The latest time recorded (a fact, a decision or an admin act)."""
        times = [
            *(f.received_at for f in self.facts[-1:]),
            *(d.decided_at for d in self.decisions[-1:]),
            *(a.at for a in self.admin_acts[-1:]),
        ]
        return max(times, default=None)


async def read_history(
    store: HistoryReads, *, every_decision: bool = False, ledger: bool = False
) -> History:
    """Read a history from ``store``, page by page (``PAGE`` records a call): the decisions
    a replay needs (``every_decision``: all of them, for the self-check); ``ledger`` also
    reads the ledger entry of every recorded release."""
    history = History()
    after = 0
    while page := await store.fact_log(after, PAGE):
        history.facts += page
        after = page[-1].seq
    after = 0
    while decisions := await store.decision_log(
        after, PAGE, evaluations=False, quiet=every_decision
    ):
        history.decisions += decisions
        history.actions += await store.actions_of_decisions(decisions[0].id, decisions[-1].id)
        after = decisions[-1].id
    history.positions = await store.fact_log_positions(
        [d.id for d in history.decisions if d.trigger not in ("fact", "approval")]
    )
    acts: list[AuditEntry] = []
    query = AuditQuery(kinds=("admin_act",), limit=PAGE)
    while entries := await store.audit(query):
        acts += entries
        query = AuditQuery(kinds=("admin_act",), limit=PAGE, after=entries[-1].cursor)
    history.admin_acts = acts[::-1]
    versions = await store.list_rulesets(PAGE)
    while versions:
        history.rulesets += versions
        versions = await store.list_rulesets(PAGE, after=versions[-1].cursor)
    after = 0
    while movements := await store.ledger_movements(after=after, limit=PAGE):
        for movement in movements:
            if movement.movement == "return":
                history.returns.append(movement)
            elif movement.movement == "reclaim":
                history.reclaims.append(movement)
            elif movement.movement in RETURN_CAUSES:
                history.returned_as[movement.release_id] = RETURN_CAUSES[movement.movement]
        after = movements[-1].id
    if ledger:
        for action in history.actions:
            if action.kind == "release":
                record = await store.release_record(action.action_id)
                if record is not None:
                    history.ledger[action.action_id] = record
    return history


async def read_rulesets(store: HistoryReads, history: History) -> dict[str, Mapping[str, str]]:
    """The files of every recorded ruleset version, by version."""
    files: dict[str, Mapping[str, str]] = {}
    for summary in history.rulesets:
        stored = await store.get_ruleset(summary.version)
        if stored is not None:
            files[summary.version] = stored.files
    return files


RETURN_CAUSES = {"cancel": "cancelled", "fail": "failed"}
"""The ledger movements a ``return`` follows, and what the release is then."""


# -- events --------------------------------------------------------------------------------


def _pause_resume_rearm(entry: AuditEntry) -> Event:
    return AdminActed(
        entry.at,
        AdminAct(
            entry.what,  # type: ignore[arg-type]
            entry.rule_id or "",
            entry.actor or "",
            entry.reason or "",
            entry.project or "",
            entry.instance or None,
        ),
    )


def _signoff(entry: AuditEntry) -> Event:
    return SignOffGiven(
        entry.at,
        SignOff(
            content_hash=entry.rule_hash or "",
            rule_id=entry.rule_id or "",
            actor=entry.actor or "",
            comment=entry.reason,
            project=entry.project or "",
            at=entry.at,
        ),
    )


ADMIN_ACTS: dict[str, Callable[[AuditEntry], Event]] = {
    "pause": _pause_resume_rearm,
    "resume": _pause_resume_rearm,
    "rearm": _pause_resume_rearm,
    "signoff": _signoff,
}
"""The admin acts that change what rules decide, by name: the event each one is."""


def _approval(fact: LoggedFact) -> ApprovalGiven:
    data = fact.data
    return ApprovalGiven(
        fact.received_at,
        ApprovalInput(
            rule_id=str(data.get("rule")),
            project=fact.project,
            subject=fact.id,
            decision=data.get("decision"),  # type: ignore[arg-type]
            comment=data.get("comment"),
            instance=str(data.get("instance") or ""),
        ),
        fact.seq,
    )


def _log_events(facts: Iterable[LoggedFact]) -> Iterator[Event]:
    """The events of the fact log, in seq order: batches of posted facts, approvals."""
    batch: list[LoggedFact] = []

    def flush() -> Iterator[Event]:
        if batch:
            yield PostedFacts(
                batch[0].received_at,
                tuple(FactInput(f.project, f.kind, f.id, f.data) for f in batch),
                batch[0].seq,
            )
            batch.clear()

    for fact in facts:
        if fact.caused_by is not None:
            yield from flush()
        elif fact.kind == "approval":
            yield from flush()
            yield _approval(fact)
        else:
            if batch and (
                fact.request_id != batch[-1].request_id
                or fact.received_at != batch[-1].received_at
                or fact.seq != batch[-1].seq + 1
            ):
                yield from flush()
            batch.append(fact)
    yield from flush()


def events_of(history: History, plain_rules: Callable[[str], frozenset[str] | None]) -> list[Event]:
    """The replay events of ``history`` in the daemon's order (see the module docstring).
    ``plain_rules(version)`` gives the ids of the rules without ``for_each`` of a recorded
    version (None when it is unknown), to tell a start from a reload."""
    ticks: dict[datetime, int] = {}
    admins: dict[tuple[datetime, str], int] = {}
    reloads: dict[datetime, tuple[int, str, set[str]]] = {}
    for d in history.decisions:
        if d.trigger == "admin":
            admins.setdefault((d.decided_at, d.rule_id), d.id)
        elif d.trigger == "time":
            ticks.setdefault(d.decided_at, d.id)
        elif d.trigger == "reload":
            reloads.setdefault(d.decided_at, (d.id, d.ruleset_version, set()))[2].add(d.rule_id)
    returns_at: dict[datetime, int] = {}
    for d in history.decisions:
        if d.trigger == "return":
            returns_at.setdefault(d.decided_at, d.id)
    log = list(_log_events(history.facts))
    keys = [e.first_seq if isinstance(e, PostedFacts) else e.seq for e in log]  # type: ignore[union-attr]
    times: list[datetime] = []
    for e in log:  # monotone, whatever a wall clock did
        times.append(e.at if not times else max(times[-1], e.at))

    def position(first_id: int | None, at: datetime) -> float:
        """Just after the log events committed before decision ``first_id`` (the last
        one a decision before it was made on), or else recorded at or before ``at``."""
        seq = history.positions.get(first_id) if first_id is not None else None
        if seq is not None:
            return bisect.bisect_right(keys, seq) - 0.5
        return bisect.bisect_right(times, at) - 0.5

    never = float("inf")
    placed: list[tuple[float, int, datetime, float, int, Event]] = [
        (index, 0, event.at, 0, 0, event) for index, event in enumerate(log)
    ]
    for entry in history.admin_acts:
        make = ADMIN_ACTS.get(entry.what or "")
        if make is None:
            continue
        found = admins.get((entry.at, entry.rule_id or ""))
        event = make(entry)
        placed.append(
            (position(found, entry.at), 1, entry.at, never if found is None else found, 2, event)
        )
    for at, tick in ticks.items():
        placed.append((position(tick, at), 1, at, tick, 1, ClockTick(at)))
    for at, restart, version in _activations(history, reloads, plain_rules):
        reload = reloads.get(at)
        reload_id = reload[0] if reload is not None else None
        event = Activated(at, version, restart)
        placed.append(
            (position(reload_id, at), 1, at, never if reload_id is None else reload_id, 0, event)
        )
    spots = release_spots(history)
    for movement in history.returns:
        spot = spots.get(movement.release_id)
        if spot is None:
            continue  # a release not in the decision log read: nothing to replay
        found = returns_at.get(movement.at)
        event = Returned(
            movement.at,
            spot,
            history.returned_as.get(movement.release_id, "cancelled"),
            movement.release_id,
        )
        placed.append(
            (
                position(found, movement.at),
                1,
                movement.at,
                never if found is None else found,
                3,
                event,
            )
        )
    for movement in history.reclaims:
        spot = spots.get(movement.release_id)
        if spot is not None:
            event = Reclaimed(movement.at, spot, movement.release_id)
            placed.append((position(None, movement.at), 1, movement.at, never, 4, event))
    placed.sort(key=lambda p: p[:5])
    return [p[5] for p in placed]


def release_spots(history: History) -> dict[str, ReleaseSpot]:
    """Where each recorded release was decided, by release id: its firing's rule
    instance and millisecond, the firing's number among that instance's firings then, and
    the release's place among the firing's releases (``ReleaseSpot``)."""
    spots: dict[str, tuple[str, str, str, int]] = {}
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for d in history.decisions:
        if d.firing_id is None:
            continue
        slot = (d.rule_id, d.instance, format_rfc3339(d.decided_at))
        spots[d.firing_id] = (*slot, counts[slot])
        counts[slot] += 1
    found: dict[str, ReleaseSpot] = {}
    numbers: dict[str, int] = defaultdict(int)
    for action in history.actions:
        if action.kind != "release":
            continue
        number = numbers[action.firing_id]
        numbers[action.firing_id] += 1
        where = spots.get(action.firing_id)
        if where is not None:
            found[action.action_id] = ReleaseSpot(*where, number)
    return found


def _activations(
    history: History,
    reloads: Mapping[datetime, tuple[int, str, set[str]]],
    plain_rules: Callable[[str], frozenset[str] | None],
) -> list[tuple[datetime, bool, str]]:
    """Each activation ``(at, restart, version)``, oldest first (see the module doc)."""
    points: dict[datetime, str] = {}
    for summary in history.rulesets:
        points.setdefault(summary.first_activated_at, summary.version)
        points.setdefault(summary.last_activated_at, summary.version)
    for at, (_, version, _) in reloads.items():
        points[at] = version
    found = []
    for index, at in enumerate(sorted(points)):
        version = points[at]
        plain = plain_rules(version)
        decided = reloads[at][2] if at in reloads else set()
        restart = index == 0 or not plain or plain <= decided
        found.append((at, restart, version))
    return found


# -- what was recorded ---------------------------------------------------------------------


def recorded_firings(
    history: History, *, ledger: bool = False, until: datetime | None = None
) -> list[FiringRecord]:
    """The recorded firings (fired or blocked decisions) and approvals notices with the
    actions each queued, in the order recorded; ``ledger`` adds each release's ledger
    entry (read with ``read_history(ledger=True)``). A release whose amount returned
    before ``until`` (None: ever) has the status ``cancelled`` or ``failed``, unless it was
    reclaimed before ``until`` too (the bank settled it: released)."""

    def before(movements: list[LedgerMovement]) -> set[str]:
        return {m.release_id for m in movements if until is None or m.at < until}

    returned = before(history.returns) - before(history.reclaims)
    by_firing: dict[str, list[OutboxEntry]] = defaultdict(list)
    for action in history.actions:
        by_firing[action.firing_id].append(action)
    names = ActionNames()
    for firing_id, queued in by_firing.items():
        names.add(firing_id, (a.action_id for a in queued))

    def actions(firing_id: str) -> tuple[Any, ...]:
        found = []
        for a in by_firing.pop(firing_id, ()):
            record = history.ledger.get(a.action_id) if ledger else None
            book = (
                None
                if record is None
                else (record.escrow, record.amount, record.currency, record.payee)
            )
            status = "shadowed" if str(a.status) == "shadowed" else "queued"
            if a.action_id in returned:
                status = history.returned_as.get(a.action_id, "cancelled")
            found.append(action_record(a.kind, a.target, a.payload, status, book, names))
        return tuple(found)

    firings = [
        FiringRecord(
            d.rule_id,
            d.instance,
            d.firing_id,
            format_rfc3339(d.decided_at),
            d.outcome,
            d.reason,
            actions(d.firing_id),
        )
        for d in history.decisions
        if d.firing_id is not None
    ]
    for firing_id, queued in list(by_firing.items()):  # the rest: approvals notices
        first = queued[0]
        firings.append(
            FiringRecord(
                first.rule_id,
                first.instance,
                firing_id,
                format_rfc3339(first.created_at),
                "notice",
                None,
                actions(firing_id),
            )
        )
    return firings


def recorded_decisions(history: History) -> list[DecisionRecord]:
    """Every recorded decision as the self-check compares it."""
    return [
        DecisionRecord(
            shared(format_rfc3339(d.decided_at)),
            shared(d.rule_id),
            shared(d.instance),
            shared(d.trigger),
            shared(d.outcome),
            d.gate_open,
            d.firing_id,
            d.reason,
            shared(d.rule_hash),
            shared(d.ruleset_version),
            d.fact_seq,
            approvals_text(d.approvals),
            shared(d.mode),
        )
        for d in history.decisions
    ]


class FactSeqs:
    """The fact log ``seq`` of each fact of a replayed transition: a posted fact's from its
    event, a fact set by a rule from the record of the facts that firing set (None when the
    record has no such fact), an approval's from its event."""

    def __init__(self, history: History) -> None:
        self.set_by: dict[str, list[LoggedFact]] = defaultdict(list)
        for fact in history.facts:
            if fact.caused_by is not None:
                self.set_by[str(fact.caused_by.get("firing_id"))].append(fact)

    def of(self, step: Step, transition: Transition) -> list[int | None]:
        """The seqs of ``transition.facts`` then (an approval's) of the approval."""
        event = step.event
        seqs: list[int | None] = []
        taken: dict[str, int] = defaultdict(int)
        for index, fact in enumerate(transition.facts):
            if fact.caused_by is None:
                first = event.first_seq if isinstance(event, PostedFacts) else None
                seqs.append(None if first is None else first + index)
                continue
            firing_id = fact.caused_by.firing_id
            number = taken[firing_id]
            taken[firing_id] += 1
            logged = self.set_by.get(firing_id, [])
            seqs.append(logged[number].seq if number < len(logged) else None)
        if isinstance(event, ApprovalGiven):
            seqs.append(event.seq)
        return seqs

    def differences(self, transition: Transition) -> list[str]:
        """Facts the transition set that the record does not have as set (data, key)."""
        found = []
        taken: dict[str, int] = defaultdict(int)
        for fact in transition.facts:
            if fact.caused_by is None:
                continue
            cause: CausedBy = fact.caused_by
            number = taken[cause.firing_id]
            taken[cause.firing_id] += 1
            logged = self.set_by.get(cause.firing_id, [])
            if number >= len(logged):
                found.append(f"{cause.firing_id}: set {fact.kind} {fact.id}, not recorded")
                continue
            old = logged[number]
            if (old.kind, old.id, _plain(old.data)) != (fact.kind, fact.id, _plain(fact.data)):
                found.append(
                    f"{cause.firing_id}: set {fact.kind} {fact.id} {_plain(fact.data)}, "
                    f"recorded {old.kind} {old.id} {_plain(old.data)}"
                )
        return found


def _plain(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)


# -- running a backtest --------------------------------------------------------------------


@dataclass
class BacktestResult:
    """A candidate replay's differences, and what the replay could not apply (approvals
    and admin acts the candidate refuses, counted by reason)."""

    diff: BacktestDiff
    skipped: dict[str, int]
    events: int


class RecordedVersions:
    """The recorded ruleset versions (``files``, by version), each loaded once against
    ``config`` when first asked for; ``known`` are versions already loaded (a candidate
    that is one of them is not loaded again)."""

    def __init__(
        self,
        files: Mapping[str, Mapping[str, str]],
        config: Config,
        known: Iterable[Ruleset] = (),
    ) -> None:
        self.files = files
        self.config = config
        self.loaded: dict[str, Ruleset | str] = {r.version: r for r in known}

    def ruleset(self, version: str) -> Ruleset:
        """Version ``version`` as it went live; ``ValueError`` when it is not stored, does
        not load against the config, or loads as another version."""
        if version not in self.loaded:
            self.loaded[version] = self._load(version)
        found = self.loaded[version]
        if isinstance(found, str):
            raise ValueError(found)
        return found

    def _load(self, version: str) -> Ruleset | str:
        texts = self.files.get(version)
        if texts is None:
            return f"ruleset version {version[:12]} is not stored"
        result = load_rule_texts(texts, self.config)
        if result.ruleset is None:
            problems = "; ".join(str(p) for p in result.problems[:3])
            return f"ruleset version {version[:12]} does not load against the config: {problems}"
        if result.ruleset.version != version:
            return f"ruleset version {version[:12]} loads as {result.ruleset.version[:12]}"
        return result.ruleset

    def plain_rules(self, version: str) -> frozenset[str] | None:
        """The ids of the rules without ``for_each`` of ``version`` (``events_of``'s
        ``plain_rules``), loaded without the config when it does not load against it
        (only the rules' kinds are needed); None when it cannot be loaded at all."""
        try:
            rules = self.ruleset(version).rules
        except ValueError:
            texts = self.files.get(version)
            result = None if texts is None else load_rule_texts(texts, None)
            if result is None or result.ruleset is None:
                return None
            rules = result.ruleset.rules
        return frozenset(r.id for r in rules if r.for_each is None)


def run_backtest(
    history: History,
    files: Mapping[str, Mapping[str, str]],
    candidate: Ruleset,
    config: Config,
    since: datetime | None = None,
    until: datetime | None = None,
) -> BacktestResult:
    """Replay ``history`` against ``candidate`` (with ``config``'s escrows, alert target,
    chain depth and target formats), in memory, and diff its firings from the recorded
    ones within ``[since, until)``. The replay starts at the beginning of the history
    (the state before ``since`` is rebuilt by replaying everything before it) and stops at
    ``until`` (default: the last recorded time)."""
    versions = RecordedVersions(files, config, [candidate])
    events = [e for e in events_of(history, versions.plain_rules) if until is None or e.at < until]
    # a candidate rule the history knows (a recorded content hash) follows its recorded
    # sign-offs, so unchanged rules replay as they ran; a new or changed money rule is
    # presumed signed off: the backtest shows what it would decide, live
    known = {d.rule_hash for d in history.decisions}
    presumed = frozenset(r.content_hash for r in candidate.rules if r.content_hash not in known)
    signed: SignedOff = {}
    engine = Engine.for_config(
        candidate,
        config,
        new_action_id=counting_ids(),
        signed=signed,
        presumed_signed=presumed,
    )
    replay = Replay.on_candidate(config.escrows, engine, signed)
    replayed: list[FiringRecord] = []
    names = ActionNames()
    skipped: dict[str, int] = defaultdict(int)
    end = until if until is not None else history.last_at
    for step in replay.run(events, end):
        if step.skipped is not None:
            skipped[_skip_kind(step)] += 1
        if step.transition is not None:
            replayed += firings_of(step.transition, names)
    replayed = mark_returned(replayed, replay.returned)
    currencies = {name: escrow.currency for name, escrow in config.escrows.items()}
    recorded = recorded_firings(history, until=until)
    diff = diff_firings(recorded, replayed, currencies, since, until)
    return BacktestResult(diff, dict(skipped), len(events))


def _skip_kind(step: Step) -> str:
    what = type(step.event).__name__
    return {
        "ApprovalGiven": "approval",
        "AdminActed": "admin act",
        "Returned": "return",
        "Reclaimed": "return",
    }.get(what, what)


def run_self_check(
    history: History, files: Mapping[str, Mapping[str, str]], config: Config
) -> SelfCheck:
    """Replay ``history`` on its recorded ruleset versions (``files``, by version) with
    ``config`` and compare every decision, firing, action and ledger entry with the
    record. ``history`` must be read with ``every_decision`` and ``ledger``; its decisions
    and actions are released once turned into records (a long history's take memory).
    Raises ``ValueError`` when a recorded version is missing or does not load against
    ``config``."""
    versions = RecordedVersions(files, config)
    engines: dict[str, Engine] = {}
    signed: SignedOff = {}

    def engine_of(version: str) -> Engine:
        if version not in engines:
            ruleset = versions.ruleset(version)
            engines[version] = Engine.for_config(
                ruleset, config, new_action_id=counting_ids(), signed=signed
            )
        return engines[version]

    events = events_of(history, versions.plain_rules)
    recorded = recorded_decisions(history)
    recorded_actions = recorded_firings(history, ledger=True)
    seqs = FactSeqs(history)
    history.decisions = []  # what was needed of them is in the records: memory back
    history.actions = []
    replay = Replay.on_recorded_versions(config.escrows, engine_of, signed)
    firings: list[FiringRecord] = []
    names = ActionNames()
    set_facts: list[str] = []
    skipped: list[str] = []

    def replayed() -> Iterator[DecisionRecord]:
        """The replayed decisions, as the replay makes them (compared as they come)."""
        for step in replay.run(events):
            if step.skipped is not None:
                skipped.append(f"{format_rfc3339(step.event.at)}: {step.skipped}")
            transition = step.transition
            if transition is None:
                continue
            positions = seqs.of(step, transition)
            for d in transition.decisions:
                seq = None if d.fact_index is None else positions[d.fact_index]
                yield decision_record(d, seq)
            firings.extend(firings_of(transition, names, ledger=True))
            set_facts.extend(seqs.differences(transition))

    def marked() -> Iterator[FiringRecord]:
        """The replayed firings once the replay is done (its returns known)."""
        yield from mark_returned(firings, replay.returned)

    check = compare_decisions(recorded, replayed(), recorded_actions, marked())
    extra = [f"skipped: {s}" for s in skipped] + set_facts
    if extra:
        check.differences = (check.differences + extra)[:20]
    return check
