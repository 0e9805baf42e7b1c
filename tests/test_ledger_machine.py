"""The ledger's invariants as a hypothesis state machine over the store and the engine: a
real SQLite file per example, written only through the Store contract, releases decided by
the real ``Engine`` against an ``EscrowBook`` kept as the daemon keeps it (committed
transitions applied, returns given back, reclaims counted again).

The steps: invoices approved (a release per invoice from ``esc``, or a split that releases
from ``esc`` and ``other`` at once, all or nothing), attempts begun and recorded (delivered,
failed and retried, dead), dead letters requeued, cancels, the bank's settlements (settled
or failed, of sent, dead and cancelled releases, repeated, or from the wrong target) and
changes of an escrow's limit. After every step:

- each escrow's ``escrow_totals()`` figures are its movements summed, and the live book's
  committed amounts agree with them;
- each release's movements, in order, are exactly those its state allows, and its state is
  the one the contract says the steps lead to;
- replaying the movements in order, no ``reserve`` took its escrow past the limit in force
  when it was made (a ``reclaim`` may: the bank paid);
- a cancelled release never gets an attempt begun (``begin_attempt`` returns False), no
  attempt is recorded after its cancel, and it is never ``send`` unless the bank settled it
  (after a ``reclaim``).

The daemon-level test (``test_ledger_properties``) checks the same over HTTP with a real
bank, for a few examples; this one runs many more. Its number of examples is the
``ledger-machine`` hypothesis profile (``HYPOTHESIS_LEDGER_EXAMPLES`` overrides it).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gatekeeper.config import Escrow
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput, RuleState, Transition
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.store import Store, open_store
from gatekeeper.store.errors import AttemptInFlight, Conflict
from gatekeeper.store.records import (
    Attempt,
    AttemptRecord,
    CancelRequest,
    EscrowFigures,
    LedgerMovement,
    SettlementCallback,
)

from .test_ledger_properties import ALLOWED

settings.register_profile(
    "ledger-machine",
    max_examples=int(os.environ.get("HYPOTHESIS_LEDGER_EXAMPLES", "120")),
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

RULES = {
    "pay.yaml": """\
        id: p/pay
        project: p
        for_each: invoice
        when: item.data.status == "approved"
        actions:
          - release: {target: bank, escrow: esc, amount: "${item.data.amount}",
                      max_amount: "1000.00", currency: USD, payee: acme}
        """,
    "split.yaml": """\
        id: p/split
        project: p
        for_each: split
        when: item.data.status == "approved"
        actions:
          - release: {target: bank, escrow: esc, amount: "${item.data.amount}",
                      max_amount: "1000.00", currency: USD, payee: acme}
          - release: {target: bank, escrow: other, amount: "30.00", currency: USD,
                      payee: builder}
        """,
}
AMOUNTS = ("0.01", "10.00", "40.00", "75.50", "120.00", "200.00", "12.345")
"""Release amounts an invoice gives (the last has more decimals than the escrow: blocked)."""
LIMITS = ("150.00", "250.00", "400.00", "1000.00")
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@dataclass
class Release:
    """What the steps did to one release, as the contract says they change it."""

    release_id: str
    escrow: str
    amount: str
    status: str = "pending"
    in_flight: bool = False
    attempts: int = 0
    settled: str | None = None
    """The bank's settlement recorded: "settled" or "failed"."""


def figures(movements: list[LedgerMovement], dead: set[str]) -> dict[str, EscrowFigures]:
    """Each escrow's figures summed from ``movements`` (in order) as ``EscrowFigures``
    defines them; ``dead``: the releases that are dead letters now (their reserve is
    unconfirmed)."""
    sums: dict[str, dict[str, Decimal]] = {}
    sent: set[str] = set()
    reserved_by: dict[str, Decimal] = {}
    for m in movements:
        s = sums.setdefault(m.escrow, {})
        amount = Decimal(m.amount)
        key = m.movement
        if m.movement == "send":
            sent.add(m.release_id)
        if m.movement == "fail":
            key = "fail_sent" if m.release_id in sent else "fail_unsent"
        s[key] = s.get(key, Decimal(0)) + amount
        if m.movement in ("reserve", "reclaim"):
            reserved_by[m.release_id] = reserved_by.get(m.release_id, Decimal(0)) + amount
        elif m.movement in ("send", "cancel") or key == "fail_unsent":
            reserved_by[m.release_id] = reserved_by.get(m.release_id, Decimal(0)) - amount
    escrow_of = {m.release_id: m.escrow for m in movements}
    result = {}
    for escrow, s in sums.items():

        def g(name: str, s: dict[str, Decimal] = s) -> Decimal:
            return s.get(name, Decimal(0))

        result[escrow] = EscrowFigures(
            reserved=g("reserve") + g("reclaim") - g("send") - g("cancel") - g("fail_unsent"),
            sent=g("send") - g("settle") - g("fail_sent"),
            settled=g("settle"),
            returned=g("return") - g("reclaim"),
            unconfirmed=sum(
                (reserved_by[r] for r in dead if escrow_of.get(r) == escrow), Decimal(0)
            ),
        )
    return result


class LedgerMachine(RuleBasedStateMachine):
    """One gatekeeper's ledger: a store on a fresh SQLite file and the engine's state."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.TemporaryDirectory()
        self.store: Store = self.run(open_store(Path(self.folder.name) / "gatekeeper.db"))
        result = load_rule_texts({k: textwrap.dedent(v) for k, v in RULES.items()}, config=None)
        assert result.ruleset is not None, result.problems
        ids = iter(range(1, 1_000_000))
        self.engine = Engine(
            result.ruleset, alert_target="ops", new_action_id=lambda: f"act-{next(ids):05d}"
        )
        self.limits = {"esc": Decimal("250.00"), "other": Decimal("100.00")}
        self.book = EscrowBook(self._escrows())
        self.facts = FactTable()
        self.states: dict[Any, RuleState] = {}
        self.approvals: dict[str, Any] = {}
        self.releases: dict[str, Release] = {}
        self.items = 0
        self.ticks = 0
        self.callbacks = 0
        self.limits_in_force: dict[str, list[tuple[int, Decimal]]] = {
            escrow: [(1, limit)] for escrow, limit in self.limits.items()
        }
        self.last_movement = 0

    # -- plumbing -----------------------------------------------------------------------------

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def now(self) -> datetime:
        self.ticks += 1
        return T0 + timedelta(seconds=self.ticks)

    def _escrows(self) -> dict[str, Escrow]:
        return {name: Escrow(name, "USD", limit) for name, limit in self.limits.items()}

    def commit(self, transition: Transition) -> None:
        """Commit ``transition`` and apply it, as the daemon's writer does."""
        self.run(self.store.commit_transition(transition))
        self.commit_applied(transition)

    def plan_return(self, release: Release, now: datetime) -> Transition | None:
        """What giving ``release``'s amount back decides (``Writer.plan_return``)."""
        book = self.book.copy()
        book.give_back(release.escrow, release.amount)
        then = self.engine.plan_return(
            self.facts, self.states, release.escrow, now, book, self.approvals
        )
        return then if then.decisions else None

    def give_back(self, movements: list[LedgerMovement], then: Transition | None) -> None:
        """Apply committed movements to the book (``Daemon._give_back``)."""
        for movement in movements:
            if movement.movement == "return":
                self.book.give_back(movement.escrow, movement.amount)
                if then is not None:
                    self.commit_applied(then)
                    then = None
            elif movement.movement == "reclaim":
                self.book.commit(movement.escrow, movement.amount)

    def commit_applied(self, transition: Transition) -> None:
        """Apply a committed transition (one the store committed with a return too:
        ``then``), noting the releases it decided."""
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        for entry in transition.ledger:
            self.releases[entry.release_id] = Release(entry.release_id, entry.escrow, entry.amount)

    def pick(self, k: int) -> Release:
        """The ``k``-th release decided so far (round the list); there is one."""
        return list(self.releases.values())[k % len(self.releases)]

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            self.folder.cleanup()

    # -- steps --------------------------------------------------------------------------------

    @initialize(amount=st.sampled_from(AMOUNTS[:-1]))
    def first_invoice(self, amount: str) -> None:
        """Every example starts with one release decided (the other steps need one)."""
        self.approve(amount, split=False)

    @rule(amount=st.sampled_from(AMOUNTS), split=st.booleans())
    def approve(self, amount: str, split: bool) -> None:
        """A new invoice (or split) is approved: its release fires exactly when it fits."""
        self.items += 1
        kind = "split" if split else "invoice"
        wanted = [("esc", amount)] + ([("other", "30.00")] if split else [])
        fits = len(amount.partition(".")[2]) <= 2 and all(
            Decimal(a) <= (self.book.remaining(e) or 0) for e, a in wanted
        )
        fact = FactInput("p", kind, f"i{self.items}", {"status": "approved", "amount": amount})
        transition = self.engine.plan_ingest(
            self.facts, self.states, [fact], self.now(), self.book.copy(), self.approvals
        )
        [decision] = transition.decisions
        assert decision.outcome == ("fired" if fits else "blocked"), (decision, wanted)
        assert [(e.escrow, e.amount) for e in transition.ledger] == (wanted if fits else [])
        event(f"approve: {decision.outcome}")
        self.commit(transition)

    @precondition(lambda self: self.releases)
    @rule(k=st.integers(0, 30))
    def begin(self, k: int) -> None:
        """The dispatcher marks an attempt before sending: only a pending release gets one."""
        release = self.pick(k)
        begun = self.run(self.store.begin_attempt(release.release_id, self.now()))
        assert begun == (release.status == "pending"), release
        if begun:
            release.in_flight = True

    @precondition(lambda self: any(r.in_flight for r in self.releases.values()))
    @rule(k=st.integers(0, 30), outcome=st.sampled_from(["delivered", "pending", "dead"]))
    def record(self, k: int, outcome: str) -> None:
        """An attempt in flight ends: 2xx, a failure to retry, or a dead letter."""
        in_flight = [r for r in self.releases.values() if r.in_flight]
        self.end_attempt(in_flight[k % len(in_flight)], outcome)

    @precondition(lambda self: self.releases)
    @rule(k=st.integers(0, 30), outcome=st.sampled_from(["delivered", "pending", "dead"]))
    def attempt(self, k: int, outcome: str) -> None:
        """A whole attempt of a release: begun (when pending), then its outcome recorded."""
        release = self.pick(k)
        if release.in_flight:
            self.end_attempt(release, outcome)
        elif self.run(self.store.begin_attempt(release.release_id, self.now())):
            assert release.status == "pending", release
            self.end_attempt(release, outcome)
        else:
            assert release.status != "pending", release

    def end_attempt(self, release: Release, outcome: str) -> None:
        """Record the outcome of ``release``'s attempt in flight."""
        release.attempts += 1
        at = self.now()
        code = {"delivered": 200, "pending": 503, "dead": 422}[outcome]
        attempt = Attempt(
            release.release_id, release.attempts, at, 5.0, code, None if code == 200 else "no"
        )
        retry = at + timedelta(seconds=1) if outcome == "pending" else None
        dead = "refused" if outcome == "dead" else None
        self.run(self.store.record_attempt(AttemptRecord(attempt, outcome, retry, dead)))  # type: ignore[arg-type]
        release.in_flight = False
        release.status = outcome

    @precondition(lambda self: self.releases)
    @rule(k=st.integers(0, 30))
    def requeue(self, k: int) -> None:
        """An admin retries a dead letter (only a dead one)."""
        release = self.pick(k)
        try:
            entry = self.run(
                self.store.requeue_action(release.release_id, self.now(), "ops", "again")
            )
        except Conflict:
            assert release.status != "dead", release
            return
        assert entry is not None and release.status == "dead", release
        release.status = "pending"

    @precondition(lambda self: self.releases)
    @rule(k=st.integers(0, 30))
    def cancel(self, k: int) -> None:
        """An admin cancels a release: pending (no attempt in flight) or dead ones only."""
        release = self.pick(k)
        now = self.now()
        then = self.plan_return(release, now)
        request = CancelRequest(release.release_id, now, "ops", "stop it", then)
        try:
            cancelled = self.run(self.store.cancel_release(request))
        except AttemptInFlight:
            assert release.in_flight, release
            event("cancel: refused, in flight")
            return
        except Conflict:
            assert release.status in ("delivered", "cancelled"), release
            event("cancel: refused")
            return
        event(f"cancel: {release.status} cancelled")
        assert release.status in ("pending", "dead") and not release.in_flight, release
        assert cancelled is not None
        entry, movements = cancelled
        assert entry.status == "cancelled"
        assert [m.movement for m in movements] == ["cancel", "return"]
        release.status = "cancelled"
        self.give_back(movements, then)

    @precondition(lambda self: self.releases)
    @rule(
        k=st.integers(0, 30),
        sent=st.booleans(),
        outcome=st.sampled_from(["settled", "failed"]),
        to=st.sampled_from(["bank", "bank", "bank", "chat"]),
    )
    def settle(self, k: int, sent: bool, outcome: str, to: str) -> None:
        """The bank's settlement callback: of a sent, dead or cancelled release (one of
        those when ``sent``), or of any release (those others must be refused)."""
        release = self.pick(k)
        others = [r for r in self.releases.values() if r.status not in ("pending",)]
        if sent and others:
            release = others[k % len(others)]
        now = self.now()
        self.callbacks += 1
        then = None
        if outcome == "failed" and release.status != "cancelled":
            then = self.plan_return(release, now)
        callback = SettlementCallback(
            to,
            release.release_id,
            outcome,  # type: ignore[arg-type]
            f"ref-{self.callbacks}",
            None,
            f"msg-{self.callbacks}",
            f"sha-{self.callbacks}",
            now,
            None,
            then,
        )
        try:
            result = self.run(self.store.settle_release(callback))
        except AttemptInFlight:
            assert release.in_flight and to == "bank", release
            event("settle: refused, in flight")
            return
        except Conflict:
            assert to == "bank" and (
                release.status == "pending"
                or (release.settled is not None and release.settled != outcome)
            ), release
            return
        if to != "bank":
            assert result is None
            return
        assert result is not None
        assert release.status in ("delivered", "dead", "cancelled"), release
        moved = [m.movement for m in result.movements]
        event(f"settle: {release.status} {outcome} {' '.join(moved) or 'nothing'}")
        if release.settled is not None:
            assert release.settled == outcome and moved == [], (release, moved)
            return
        if release.status == "cancelled":
            assert moved == (["reclaim", "send", "settle"] if outcome == "settled" else [])
        elif outcome == "failed":
            assert moved == ["fail", "return"]
        else:
            assert moved == (["settle"] if release.status == "delivered" else ["send", "settle"])
        release.settled = outcome
        if release.status == "dead":
            release.status = "delivered"
        self.give_back(list(result.movements), then)

    @rule(escrow=st.sampled_from(["esc", "other"]), limit=st.sampled_from(LIMITS))
    def change_limit(self, escrow: str, limit: str) -> None:
        """``gatekeeper.yaml`` changes a limit: the blocked releases from it try again."""
        movements = self.run(self.store.ledger_movements(limit=100_000))
        first = (movements[-1].id + 1) if movements else 1
        self.limits[escrow] = Decimal(limit)
        self.limits_in_force[escrow].append((first, Decimal(limit)))
        self.book = EscrowBook(self._escrows(), self.book.committed)
        rules = list(self.engine.rules.values())
        transition = self.engine.plan_rules(
            self.facts,
            self.states,
            rules,
            self.now(),
            "reload",
            book=self.book.copy(),
            approvals=self.approvals,
            record_first=False,
            retry={r.id for r in rules},
        )
        event(f"limit: {len(transition.ledger)} releases fired")
        self.commit(transition)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def the_ledger_reconciles(self) -> None:
        movements: list[LedgerMovement] = self.run(self.store.ledger_movements(limit=100_000))
        totals = self.run(self.store.escrow_totals())
        by_release: dict[str, list[str]] = {}
        for m in movements:
            by_release.setdefault(m.release_id, []).append(m.movement)
        assert set(by_release) == set(self.releases)
        dead = set()
        for release_id, release in self.releases.items():
            entry = self.run(self.store.get_action(release_id))
            assert entry is not None
            assert (entry.status, entry.attempts) == (release.status, release.attempts), release
            assert tuple(by_release[release_id]) in ALLOWED[release.status], (
                release,
                by_release[release_id],
            )
            if release.status == "dead":
                dead.add(release_id)
        # the figures, line by line
        assert totals == figures(movements, dead)
        for escrow in set(totals) | set(self.book.committed):
            expected = totals[escrow].committed if escrow in totals else Decimal(0)
            assert self.book.committed.get(escrow, Decimal(0)) == expected, escrow
        # no reserve past the limit in force when it was made
        running: dict[str, Decimal] = {}
        for m in movements:
            amount = Decimal(m.amount)
            if m.movement in ("reserve", "reclaim"):
                running[m.escrow] = running.get(m.escrow, Decimal(0)) + amount
            elif m.movement in ("cancel", "fail"):
                running[m.escrow] = running.get(m.escrow, Decimal(0)) - amount
            if m.movement == "reserve":
                limit = [lim for first, lim in self.limits_in_force[m.escrow] if first <= m.id][-1]
                assert running[m.escrow] <= limit, (m, running[m.escrow], limit)

    @invariant()
    def a_cancelled_release_is_never_sent(self) -> None:
        for release in self.releases.values():
            if release.status != "cancelled":
                continue
            assert not self.run(self.store.begin_attempt(release.release_id, self.now()))
            attempts = self.run(self.store.list_attempts(release.release_id))
            assert len(attempts) == release.attempts


LedgerMachine.TestCase.settings = settings.get_profile("ledger-machine")
test_the_ledger_reconciles_step_by_step = LedgerMachine.TestCase
