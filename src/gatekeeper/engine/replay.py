"""Replaying a recorded history through an engine, in memory: what a ruleset does (or did)
with the facts, approvals, admin acts and clock of a deployment, as the daemon would have.

The history is a list of *events*, each with the time the daemon recorded it at (RFC 3339
with milliseconds, as the store keeps times), in the order the daemon committed them:

- ``PostedFacts``: a batch of facts applied atomically (``Engine.plan_ingest``);
- ``ApprovalGiven``: an approver's decision (``Engine.plan_approval``);
- ``AdminActed``: pause, resume or rearm (``Engine.plan_admin``);
- ``SignOffGiven``: an admin's sign-off of a money rule's content hash (the two-person
  rule: counted in the sign-offs the engines read, nothing evaluated, as the daemon does);
- ``ClockTick``: the deadline loop evaluated the rule instances that were due
  (``Engine.plan_instances``, trigger ``time``);
- ``Activated``: a ruleset version went live, at a start (``restart``) or a reload
  (``Engine.plan_rules``, trigger ``reload``);
- ``Returned``: a release's amount went back to its escrow (an admin cancelled it, or its
  settlement failed), and the releases blocked on that escrow were tried again
  (``Engine.plan_return``, trigger ``return``);
- ``Reclaimed``: the bank settled a cancelled release anyway: the amount its return gave
  back counts against the escrow again (nothing is evaluated, as in the daemon).

A return names a release of the record by where it was decided (``ReleaseSpot``: rule
instance, instant, which firing of that instance at that instant, which release of that
firing: the firings are matched as ``engine.backtest.diff_firings`` matches them). The
replay gives back the amount of the release *it* made there: on the recorded versions the
recorded one; on a candidate the candidate's, whatever its amount, when the candidate made
that firing with that release (not shadowed, not blocked). When it made none, nothing is
given back (the candidate never reserved it) and the step says so (``skipped``); the
releases blocked on the escrow are not tried again then either. The releases a return
applied to are in ``returned`` (firing id and place among its actions -> ``cancelled`` or
``failed``), to count them as such (``engine.backtest.mark_returned``). A reclaim takes
back what the return of the same spot gave back, and the release counts as released again
(out of ``returned``); with no such return in this replay it is ``skipped``.

``Replay`` keeps what the daemon's writer keeps (current facts, rule states, standing
approvals, the escrow book) and what its deadline loop keeps (a ``DeadlineSchedule``), and
drives the engine exactly as ``runtime.ingest``, ``runtime.ticker`` and
``runtime.rulesets`` do; each event gives a ``Step`` with the ``Transition`` applied.
Nothing is written anywhere. Adding an event kind is one dataclass and one handler
(``Replay._handlers``).

Two ways to replay:

- **the recorded versions** (``Replay.on_recorded_versions``): each ``Activated`` event
  makes its version's engine live, as it went live in the daemon, and only the recorded ticks are
  evaluated: a tick of the daemon that decided nothing changed nothing, so skipping it
  changes nothing either. This reproduces the recorded decisions (``gatekeeper backtest
  --self-check``).
- **a candidate ruleset** (``Replay.on_candidate``): one engine throughout; a start of the
  daemon (``Activated`` with ``restart``) is a start on the candidate, a reload of another
  version changes nothing. Besides the recorded ticks, the candidate's own deadlines are
  evaluated when they fall between two recorded events (the daemon's deadline loop would
  have woken then): at their exact instant. A deadline less than ``TICK_LAG`` before a
  recorded tick is left to that tick; none is evaluated between the last event before a
  start of the daemon and that start (the daemon was down then, for all the record says:
  what was due fires at the start).

Times: the daemon evaluated at its clock's microsecond; the store kept the millisecond. A
recorded tick at ``T`` is evaluated at the latest due instant up to the end of that
millisecond (never before what was due), so a threshold crossed just after a deadline is
crossed in the replay too; other events are evaluated at their recorded millisecond.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from gatekeeper.config import Escrow
from gatekeeper.engine.deadlines import (
    DeadlineSchedule,
    drop_rule,
    instances_of,
    mark_due,
    schedule_instances,
)
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import (
    AdminAct,
    ApprovalInput,
    FactInput,
    InstanceKey,
    RuleState,
    SignOff,
    Stand,
    Transition,
)
from gatekeeper.engine.signoffs import SignedOff

_MILLISECOND_END = timedelta(microseconds=999)
"""A recorded time is a millisecond: the daemon's instant was within it."""

TICK_LAG = timedelta(seconds=1)
"""A candidate's deadline less than this before a recorded tick is taken as evaluated by
that tick (the daemon's deadline loop is milliseconds late; polled conditions a second)."""


@dataclass(frozen=True)
class PostedFacts:
    """A batch of facts posted together (one request), applied atomically at ``at``;
    ``first_seq`` is the fact log ``seq`` of the first (the others follow it)."""

    at: datetime
    facts: tuple[FactInput, ...]
    first_seq: int


@dataclass(frozen=True)
class ApprovalGiven:
    """An approver's decision recorded at ``at`` under fact log ``seq``."""

    at: datetime
    approval: ApprovalInput
    seq: int


@dataclass(frozen=True)
class AdminActed:
    """An admin act (pause, resume, rearm) recorded at ``at``."""

    at: datetime
    act: AdminAct


@dataclass(frozen=True)
class SignOffGiven:
    """An admin signed off a money rule's content hash at ``at``."""

    at: datetime
    signoff: SignOff


@dataclass(frozen=True)
class ClockTick:
    """The deadline loop evaluated what was due at ``at``. ``simulated``: not recorded,
    a deadline of a candidate ruleset between two recorded events."""

    at: datetime
    simulated: bool = False


@dataclass(frozen=True)
class Activated:
    """Ruleset ``version`` went live at ``at``: at a start of the daemon (``restart``:
    every rule is evaluated and every time-dependent one is due) or at a reload (the
    rules new or changed since the version before)."""

    at: datetime
    version: str
    restart: bool


@dataclass(frozen=True)
class ReleaseSpot:
    """Where a release was decided: rule instance ``rule_id``/``instance``, at ``fired_at``
    (RFC 3339 with milliseconds, as firings are compared), the ``nth`` firing (from 0) of
    that instance at that instant, and its ``place``th release (from 0, among the
    firing's releases)."""

    rule_id: str
    instance: str
    fired_at: str
    nth: int
    place: int


@dataclass(frozen=True)
class Returned:
    """The amount of release ``release_id`` (recorded at ``spot``) went back to its
    escrow at ``at``: ``cause`` ``cancelled`` (an admin act) or ``failed`` (the bank's
    settlement callback)."""

    at: datetime
    spot: ReleaseSpot
    cause: str
    release_id: str


@dataclass(frozen=True)
class Reclaimed:
    """Release ``release_id`` (recorded at ``spot``), cancelled, was settled by the bank
    anyway at ``at``: the amount its cancel returned counts against its escrow again."""

    at: datetime
    spot: ReleaseSpot
    release_id: str


Event = (
    PostedFacts
    | ApprovalGiven
    | AdminActed
    | SignOffGiven
    | ClockTick
    | Activated
    | Returned
    | Reclaimed
)


@dataclass(frozen=True)
class Step:
    """What one event did: the ``transition`` applied (None when it changed nothing), or
    why it was ``skipped`` (an approval or act the ruleset refuses, as the daemon would
    answer it: the text says why)."""

    event: Event
    transition: Transition | None
    skipped: str | None = None


def counting_ids(prefix: str = "replay_") -> Callable[[], str]:
    """An action id generator for a replay: ``replay_1``, ``replay_2``, ... (the daemon's
    are random; a replay needs none of its ids to be unique beyond itself)."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


class Replay:
    """The state a daemon keeps, replayed event by event (see the module docstring).

    Build with ``Replay.on_recorded_versions`` or ``Replay.on_candidate``; ``run(events,
    until)`` yields a ``Step`` per event (and per simulated tick). ``escrows`` are the
    configured escrows (limits and currencies: the config is not part of the recorded
    history).
    """

    def __init__(
        self,
        escrows: Mapping[str, Escrow],
        *,
        engine_of: Callable[[str], Engine] | None = None,
        candidate: Engine | None = None,
        signed: SignedOff | None = None,
    ) -> None:
        if (engine_of is None) == (candidate is None):
            raise ValueError("give engine_of (recorded versions) or candidate, not both")
        self.engine_of = engine_of
        self.candidate = candidate
        self.signed: SignedOff = signed if signed is not None else {}
        """The sign-offs recorded so far (the mapping the engines read: build them with
        ``Engine.for_config(..., signed=...)``)."""
        self.engine: Engine | None = candidate
        self.facts = FactTable()
        self.states: dict[InstanceKey, RuleState] = {}
        self.approvals: dict[str, dict[str, Stand]] = {}
        self.book = EscrowBook(escrows)
        self.schedule: DeadlineSchedule[InstanceKey] = DeadlineSchedule()
        self.releases: dict[ReleaseSpot, tuple[str, str, str, int]] = {}
        """Each release this replay counted in its book, by spot: escrow, amount, firing
        id, place among the firing's actions (given back at most once: then removed)."""
        self.returned: dict[tuple[str, int], str] = {}
        """The releases a return applied to: (firing id, place among its actions) ->
        ``cancelled`` or ``failed``."""
        self.given_back: dict[ReleaseSpot, tuple[str, str, str, int]] = {}
        """The releases a return gave back, by spot (as ``releases``), for a reclaim."""
        self._firings_at: dict[tuple[str, str, str], int] = {}
        self._handlers: dict[type, Callable[[Event], Step]] = {
            PostedFacts: self._posted,  # type: ignore[dict-item]
            ApprovalGiven: self._approval,  # type: ignore[dict-item]
            AdminActed: self._admin,  # type: ignore[dict-item]
            SignOffGiven: self._signoff,  # type: ignore[dict-item]
            ClockTick: self._tick,  # type: ignore[dict-item]
            Activated: self._activated,  # type: ignore[dict-item]
            Returned: self._returned,  # type: ignore[dict-item]
            Reclaimed: self._reclaimed,  # type: ignore[dict-item]
        }

    @classmethod
    def on_recorded_versions(
        cls,
        escrows: Mapping[str, Escrow],
        engine_of: Callable[[str], Engine],
        signed: SignedOff,
    ) -> Replay:
        """A replay on the recorded versions: ``engine_of(version)`` gives each version's
        engine (built once per version by the caller, reading the sign-offs ``signed``,
        which the replay adds to as they were recorded)."""
        return cls(escrows, engine_of=engine_of, signed=signed)

    @classmethod
    def on_candidate(
        cls, escrows: Mapping[str, Escrow], engine: Engine, signed: SignedOff | None = None
    ) -> Replay:
        """A replay of ``engine``'s ruleset in place of every recorded version; the recorded
        sign-offs are added to ``signed`` (the mapping ``engine`` reads) as they come."""
        return cls(escrows, candidate=engine, signed=signed)

    @property
    def simulates_deadlines(self) -> bool:
        """Whether deadlines between recorded events are evaluated (candidate replays)."""
        return self.candidate is not None

    def run(self, events: Iterable[Event], until: datetime | None = None) -> Iterator[Step]:
        """Replay ``events`` (in the daemon's order) and yield what each did; a candidate
        replay evaluates its own deadlines between them, up to ``until`` after the last
        one (None: up to the last event)."""
        for event in events:
            if self.simulates_deadlines:
                if isinstance(event, ClockTick):
                    yield from self._deadlines_until(event.at - TICK_LAG)
                elif not (isinstance(event, Activated) and event.restart):
                    yield from self._deadlines_until(event.at)
            yield self._handlers[type(event)](event)
        if until is not None and self.simulates_deadlines:
            yield from self._deadlines_until(until)

    def _deadlines_until(self, end: datetime) -> Iterator[Step]:
        """Simulated ticks at each deadline due at or before ``end``."""
        while self.engine is not None:
            due = self.schedule.next_due()
            if due is None or due > end:
                return
            yield self._tick(ClockTick(due, simulated=True))

    # -- handlers: one per event kind ------------------------------------------------------

    def _posted(self, event: PostedFacts) -> Step:
        engine = self.engine
        if engine is None:
            return Step(event, None, "no ruleset was live")
        transition = engine.plan_ingest(
            self.facts,
            self.states,
            list(event.facts),
            event.at,
            self.book.copy(),
            approvals=self.approvals,
        )
        self._apply(transition, engine)
        return Step(event, transition)

    def _approval(self, event: ApprovalGiven) -> Step:
        """As ``Writer.approve``: an approval the ruleset refuses is skipped."""
        engine = self.engine
        approval = event.approval
        rule = engine.rules.get(approval.rule_id) if engine is not None else None
        if engine is None or rule is None:
            return Step(event, None, f"rule {approval.rule_id} is not in the ruleset")
        if rule.approvals is None:
            return Step(event, None, f"rule {rule.id} takes no approvals")
        if approval.subject not in rule.approvals.from_:
            return Step(event, None, f"{approval.subject} is not an approver of {rule.id}")
        if approval.instance and (
            rule.for_each is None
            or self.facts.get((rule.project, rule.for_each, approval.instance)) is None
        ):
            return Step(event, None, f"rule {rule.id} has no instance {approval.instance!r}")
        transition = engine.plan_approval(
            self.facts,
            self.states,
            self.approvals,
            replace(approval, project=rule.project),
            event.at,
            self.book.copy(),
        )
        self._apply(transition, engine)
        return Step(event, transition)

    def _admin(self, event: AdminActed) -> Step:
        """As ``Writer.administer``: an act that does not apply is skipped."""
        engine = self.engine
        act = event.act
        if engine is None or act.rule_id not in engine.rules:
            return Step(event, None, f"rule {act.rule_id} is not in the ruleset")
        try:
            transition = engine.plan_admin(
                self.facts, self.states, self.approvals, act, event.at, self.book.copy()
            )
        except KeyError as exc:
            return Step(event, None, str(exc.args[0]))
        except ValueError as exc:
            return Step(event, None, str(exc))
        self._apply(transition, engine)
        return Step(event, transition)

    def _signoff(self, event: SignOffGiven) -> Step:
        """As ``Writer.sign_off``: the sign-off counts from now on; nothing is evaluated. A
        candidate rule unchanged from a recorded one (the same content hash) follows its
        recorded sign-offs; a rule the history never saw is presumed signed off (see
        ``store.history.run_backtest``)."""
        signoff = event.signoff
        self.signed.setdefault(signoff.content_hash, {})[signoff.actor] = signoff
        return Step(event, None)

    def _tick(self, event: ClockTick) -> Step:
        """As ``Ticker.tick``: the instances due by the tick's instant, evaluated at the
        latest of their due times within its millisecond (a simulated tick: at its
        deadline); committed only when something was decided."""
        engine = self.engine
        if engine is None:
            return Step(event, None, "no ruleset was live")
        limit = event.at if event.simulated else event.at + _MILLISECOND_END
        now = event.at
        due: list[InstanceKey] = []
        while (next_due := self.schedule.next_due()) is not None and next_due <= limit:
            due += self.schedule.pop_due(next_due)
            now = max(now, next_due)
        due = [key for key in due if key[0] in engine.rules]
        transition = engine.plan_instances(
            self.facts,
            self.states,
            due,
            now,
            "time",
            book=self.book.copy(),
            approvals=self.approvals,
            record_unchanged=False,
        )
        applied = None
        if transition.decisions:
            self._apply(transition, engine)
            applied = transition
        schedule_instances(self.schedule, engine.rules, due, self.facts, now, self.approvals)
        return Step(event, applied)

    def _activated(self, event: Activated) -> Step:
        """As ``Rulesets.activate`` (and a daemon's start): the new or changed rules are
        evaluated (every rule at a start), then the deadlines follow ``Ticker.activated``.
        A candidate replay makes the candidate live at a start and ignores reloads."""
        if self.candidate is not None:
            if not event.restart:
                return Step(event, None)
            new = self.candidate
        else:
            assert self.engine_of is not None
            new = self.engine_of(event.version)
        previous = None if event.restart else self.engine
        before = previous.rules if previous is not None else {}
        changed = [
            rule
            for rule in new.ruleset.rules
            if rule.id not in before
            or before[rule.id].content_hash != rule.content_hash
            or (
                rule.for_each is None
                and (
                    (state := self.states.get((rule.id, ""))) is None
                    or state.rule_hash != rule.content_hash
                )
            )
        ]
        transition = new.plan_rules(
            self.facts,
            self.states,
            changed,
            event.at,
            "reload",
            book=self.book.copy(),
            approvals=self.approvals,
            record_first=False,
        )
        transition.ruleset = new.ruleset
        # the daemon applies it while the previous engine is still live (none at a start)
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        self._count_releases(transition)
        if previous is not None:
            self._reschedule(transition, previous)
        self.engine = new
        if previous is None:
            self.schedule.clear()
            mark_due(self.schedule, instances_of(new.time_dependent, self.facts), event.at)
        else:
            for rule in previous.time_dependent:
                if rule.id not in new.time_dependent_ids:
                    drop_rule(self.schedule, rule.id)
            changed_ids = {rule.id for rule in changed}
            due = [rule for rule in new.time_dependent if rule.id in changed_ids]
            mark_due(self.schedule, instances_of(due, self.facts), event.at)
        return Step(event, transition)

    def _returned(self, event: Returned) -> Step:
        """As ``Daemon.cancel_action`` and ``Daemon.settle`` after their commit
        (``Writer.returned``): the amount back in the book, then the releases blocked on
        its escrow tried again, committed when something was decided."""
        found = self.releases.pop(event.spot, None)
        if found is None:
            return _skipped(event, event.cause, "no such release in this replay")
        escrow, amount, firing_id, place = found
        self.book.give_back(escrow, amount)
        self.returned[(firing_id, place)] = event.cause
        self.given_back[event.spot] = found
        engine = self.engine
        if engine is None:
            return Step(event, None)
        transition = engine.plan_return(
            self.facts, self.states, escrow, event.at, self.book, self.approvals
        )
        if not transition.decisions:
            return Step(event, None)
        self._apply(transition, engine)
        return Step(event, transition)

    def _reclaimed(self, event: Reclaimed) -> Step:
        """As ``Daemon.settle`` for a cancelled release the bank settled
        (``Writer.reclaimed``): what its return gave back counts against the escrow again;
        nothing is evaluated."""
        found = self.given_back.pop(event.spot, None)
        if found is None:
            why = "no such release returned in this replay"
            return _skipped(event, "settled after its cancel", why)
        escrow, amount, firing_id, place = found
        self.book.commit(escrow, amount)
        self.returned.pop((firing_id, place), None)
        return Step(event, None)

    # -- applying --------------------------------------------------------------------------

    def _count_releases(self, transition: Transition) -> None:
        """Note where each release ``transition`` counts in the book was decided
        (``releases``), numbering the firings of each instance and instant as they come."""
        spots: dict[str, tuple[str, str, str, int]] = {}
        for d in transition.decisions:
            if d.firing_id is None:
                continue
            slot = (d.rule_id, d.instance, d.decided_at)
            nth = self._firings_at.get(slot, 0)
            self._firings_at[slot] = nth + 1
            spots[d.firing_id] = (*slot, nth)
        if not transition.ledger:
            return
        booked = {entry.release_id: entry for entry in transition.ledger}
        places: dict[str, int] = {}
        releases: dict[str, int] = {}
        for action in transition.actions:
            place = places.get(action.firing_id, 0)
            places[action.firing_id] = place + 1
            if action.kind != "release":
                continue
            number = releases.get(action.firing_id, 0)
            releases[action.firing_id] = number + 1
            entry = booked.get(action.action_id)
            where = spots.get(action.firing_id)
            if entry is None or where is None:
                continue
            rule_id, instance, at, nth = where
            spot = ReleaseSpot(rule_id, instance, at, nth, number)
            self.releases[spot] = (entry.escrow, entry.amount, action.firing_id, place)

    def _apply(self, transition: Transition, engine: Engine) -> None:
        """As ``Writer._apply`` after a commit: memory, then the deadlines."""
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        self._count_releases(transition)
        self._reschedule(transition, engine)

    def _reschedule(self, transition: Transition, engine: Engine) -> None:
        """As ``Ticker.reschedule``: the time-dependent instances the transition decided."""
        if transition.planned_at is None:
            return
        time_dependent = engine.time_dependent_ids
        keys = [
            (d.rule_id, d.instance) for d in transition.decisions if d.rule_id in time_dependent
        ]
        if keys:
            schedule_instances(
                self.schedule, engine.rules, keys, self.facts, transition.planned_at, self.approvals
            )


def _skipped(event: Returned | Reclaimed, what: str, why: str) -> Step:
    """The step of a return or reclaim of a release this replay cannot apply: ``why``."""
    spot = event.spot
    name = f"{spot.rule_id}[{spot.instance}]" if spot.instance else spot.rule_id
    return Step(
        event, None, f"release {event.release_id} ({what}) of {name} at {spot.fired_at}: {why}"
    )
