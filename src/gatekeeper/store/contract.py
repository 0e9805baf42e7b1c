"""The Store contract: what gatekeeper needs from durable storage, split by concern so a
component asks only for what it uses.

- ``StoreLifecycle``: open and close.
- ``StateStore``: the ingest/write path (commit transitions atomically, idempotency keys)
  and the state the daemon loads at start (facts, rule states, approvals, escrow totals,
  the last active ruleset).
- ``DeliveryQueue``: what the dispatcher uses: due actions (claimed with a lease, so
  daemons sharing a database deliver each action at one daemon at a time), when the next
  one is due, and recording attempts.
- ``OutboxAdmin``: reading the outbox and requeuing dead letters.
- ``LedgerBook``: the ledger's movements after the decision: cancels, settlements, and
  every movement listed for reconciling.
- ``AuditReads``: the fact log, current facts, decisions, the audit log, the ledger.
- ``RulesetReads``: stored ruleset versions.

``Store`` is all of them, for wiring. Every backend passes the contract test suite
(``tests/store_contract``).

Rules every method follows:

- Times are timezone-aware ``datetime``s (UTC) in and out. The store never reads a clock:
  the caller passes ``now``/``at`` (the engine's records carry their own times).
- Writes are atomic: all or nothing, durable (on disk) when the coroutine returns.
- Errors are the ``gatekeeper.store.errors`` family, never a driver's exception:
  ``StoreUnavailable`` (locked, disk full, I/O, not open), ``Conflict`` (a unique key
  already stored, a wrong state), ``StoreError`` for anything else. Every method may
  raise ``StoreUnavailable``; the others are named where they apply.
- Reads see only committed data.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from typing import Any, Protocol

from gatekeeper.engine.model import FactKey, InstanceKey, RuleState, Transition
from gatekeeper.engine.signoffs import SignedOff
from gatekeeper.store.queries import AuditQuery, OutboxFilter, Projects
from gatekeeper.store.records import (
    ActionStatus,
    Attempt,
    AttemptRecord,
    AuditEntry,
    CancelRequest,
    EscrowTotals,
    IdempotencyOutcome,
    LedgerMovement,
    LoggedFact,
    OutboxEntry,
    ReleaseRecord,
    RulesetCursor,
    RulesetSummary,
    SettlementCallback,
    SettlementResult,
    ShadowedReleases,
    StandingApprovals,
    StateChanges,
    StateCursor,
    StateFence,
    StoredDecision,
    StoredFact,
    StoredRuleset,
)


class StoreLifecycle(Protocol):
    """Opening and closing the store."""

    @property
    def is_open(self) -> bool:
        """Whether ``open`` succeeded and ``close`` has not been called since."""
        ...

    async def open(self) -> None:
        """Connect, creating the database if needed, and bring its schema up to date
        (migrations run in order, each recorded with its version).

        Raises ``StoreUnavailable`` when the database cannot be opened, ``SchemaTooNew``
        when it was written by a newer gatekeeper. A failed ``open`` leaves nothing open.
        """
        ...

    async def close(self) -> None:
        """Finish the writes already queued, then release every connection. Idempotent."""
        ...

    async def hold_daemon_lock(self) -> None:
        """Take the database's daemon lock for as long as the store is open (the daemon
        calls it at start). SQLite: the lock file ``open`` took already, one daemon per
        file (nothing more). PostgreSQL (``shared``): a session advisory lock on the
        writer connection, per schema, SHARED: daemons serve side by side (their deciding
        writes are serialised by the state version, ``StateFence``), while a migration or
        a copy, which take it exclusive, wait for them all to stop; taken again when that
        connection is opened again (it went with the old session). A daemon finding no
        other sharing it releases the delivery claims left in the outbox (their daemons are
        gone).

        Raises ``DatabaseInUse`` naming the holder (its ``application_name``, address and
        since when) when a session holds it exclusive (a migration, a copy, or a
        gatekeeper of before, which decides alone)."""
        ...

    async def ping(self) -> None:
        """One cheap round trip to the database (``SELECT 1``, no table read): returns
        when it answers. Raises ``StoreUnavailable`` (never naming a password) when the
        store is not open or the database does not answer."""
        ...


class StateStore(Protocol):
    """The write path of ingest, reloads, ticks and admin acts, and the state loaded at
    start."""

    async def commit_transition(self, transition: Transition) -> list[int]:
        """Commit everything ``transition`` changes in one transaction: facts (appended to
        the fact log, current facts upserted), approvals, admin acts, the ruleset version it
        activates, decisions, rule states (by ``InstanceKey``), queued actions (the outbox,
        each with its instance; a ``shadowed`` one with status ``shadowed``), ledger entries
        (each release's row and its ``reserve`` movement), sign-offs (admin acts
        ``signoff``) and its idempotency key. A fact with
        ``caused_by`` (set by a rule) keeps it in the fact log. Returns the sequence numbers
        of its facts then approvals, in order.

        Rows are stamped with the first decision's ``decided_at``, or else with
        ``transition.planned_at``. A decision's evaluation is stored by reference
        (``gatekeeper.store.evidence.stored_evaluation``): the ``seq`` of the current data
        of each fact it read by id (looked up without a statement per fact: a transition's
        own facts are known), the ``seq`` of a per-item decision's item, a count and the
        fact log's last ``seq`` for each kind read whole, clause values over
        ``MAX_STORED_VALUE_CHARS`` as their size. Raises ``ValueError`` (before writing)
        when a row needs a time and the transition has neither; ``Conflict`` when a unique
        key is already stored (a ``firing_id``, ``action_id``, release id or idempotency
        key: a double firing); nothing is written then. The idempotency key keeps the
        sequence numbers of the posted facts and approvals (not of facts rules set).
        """
        ...

    async def commit_transitions(
        self,
        transitions: Sequence[Transition],
        *,
        planned_with: str | None = None,
        fence: StateFence | None = None,
    ) -> list[list[int]]:
        """Commit several transitions in ONE transaction (group commit: one durable write
        for all), in order; return each one's sequence numbers as ``commit_transition``.
        All or nothing; raises as ``commit_transition``.

        ``fence``: the writer's position on a database other daemons share (see
        ``StateFence``). The transaction first takes the ``state_version`` row (checked
        writes of every daemon commit one at a time) and raises ``StateBehind``, writing
        nothing, unless the database is at ``fence.cursor.version``; the rule states it
        writes keep the new version; once committed, ``fence.cursor`` is the position
        reached (``state_cursor``). None: unchecked (one daemon per database: SQLite),
        nothing more is read or written.

        ``planned_with``: the ruleset version that planned them. The transaction then
        reads the active version (PostgreSQL: ``FOR SHARE``, so an activation committing
        meanwhile waits for this transaction, and this one for an activation in progress)
        and raises ``RulesetChanged``, writing nothing, when another version is active."""
        ...

    async def take_turn(self) -> None:
        """Take the database's decision turn for this daemon (a database other daemons
        share): until ``end_turn``, every checked write of the other daemons waits before
        it begins, so this daemon's next checked write, planned on memory caught up after
        this call, cannot be refused as behind. Taken by a writer refused as behind, so a
        daemon under contention is not refused again and again. Waits for a turn held by
        another daemon (PostgreSQL: ``lock_timeout`` at most, then ``StoreUnavailable``,
        condition ``locked``). A turn ends with the session, however it ends. A database
        one daemon serves (SQLite): nothing to do."""
        ...

    async def end_turn(self) -> None:
        """End the turn ``take_turn`` took (nothing when none is held). Never raises for a
        connection that broke meanwhile: the turn ended with its session."""
        ...

    async def state_cursor(self) -> StateCursor:
        """The database's position now (``StateCursor``: its state version and the last
        fact log ``seq``, decision, sign-off and escrow-changing ledger movement). Read
        before loading the state, it is where the memory loaded stands (at least)."""
        ...

    async def state_changes(self, since: StateCursor) -> StateChanges:
        """What checked deciding writes committed after ``since`` (``StateChanges``), read
        in one snapshot (PostgreSQL: ``REPEATABLE READ``), with the position reached: the
        facts appended to the fact log, the rule states written since ``since.version``,
        the whole standing approvals of every instance that may have changed, the sign-offs
        recorded, the committed amount of each escrow whose figures changed, and the
        decisions. Every part is current truth, so applying it over memory at least as new
        as ``since`` leaves that memory equal to the database's at the position reached.
        Nothing changed: every part empty, the cursor ``since``'s (as read)."""
        ...

    async def find_idempotency_key(self, key: str) -> IdempotencyOutcome | None:
        """What the request stored under ``Idempotency-Key`` ``key`` got, or None."""
        ...

    async def purge_idempotency_keys(self, before: datetime) -> int:
        """Forget the idempotency keys stored before ``before``; return how many."""
        ...

    async def load_facts(self) -> dict[FactKey, dict[str, Any]]:
        """Every current fact: ``{(project, kind, id): data}``."""
        ...

    async def load_rule_states(self) -> dict[InstanceKey, RuleState]:
        """Every rule instance's persisted state by ``(rule id, item id)`` (item id ``""``
        for a rule without ``for_each``; rules no longer loaded included)."""
        ...

    async def load_approvals(self) -> StandingApprovals:
        """Every standing approval: ``{rule id: {subject: Stand(decision, at)}}`` (the
        decision, ``"approve"`` or ``"reject"``, and when it was recorded), the approvals
        of one instance of a per-item rule under ``<rule id>[<item id>]``. Approvals a
        firing used up (``Transition.consumed``) are gone."""
        ...

    async def load_signoffs(self) -> SignedOff:
        """Every sign-off of a money rule's content hash (``Transition.signoffs``, kept as
        admin acts ``signoff``): ``{content hash: {actor: SignOff}}``, each with the time it
        was recorded."""
        ...

    async def escrow_totals(self) -> EscrowTotals:
        """Per escrow with a release, its ``EscrowFigures``: the ledger's movements summed
        exactly (``Decimal``, never floats; a ``fail`` of a release never sent comes off
        ``reserved``, a ``reclaim`` goes back from ``returned`` to ``reserved``).
        ``committed`` leaves out returned amounts (cancelled or failed releases) not
        reclaimed."""
        ...

    async def last_ruleset(self) -> StoredRuleset | None:
        """The ruleset version that was last activated, or None in a new database."""
        ...


class DeliveryQueue(Protocol):
    """What the dispatcher needs: the due actions and recording what became of them."""

    @property
    def shared(self) -> bool:
        """Whether other daemons may serve this database side by side (PostgreSQL): a
        daemon then checks each deciding write against the database's state version
        (``StateFence``), follows the active ruleset others activate, and claims an action
        before it sends it. False when the database is one daemon's file
        (SQLite, locked): an action can be sent without a claim, right after its commit."""
        ...

    async def due_actions(
        self, now: datetime, limit: int, *, only: OutboxFilter | None = None
    ) -> list[OutboxEntry]:
        """At most ``limit`` pending actions due at ``now`` (``next_attempt_at <= now``),
        the earliest due first (ties by ``action_id``), narrowed by ``only``."""
        ...

    async def claim_due(
        self,
        now: datetime,
        limit: int,
        *,
        daemon_id: str,
        lease_s: float,
        only: OutboxFilter | None = None,
    ) -> list[OutboxEntry]:
        """``due_actions``, claimed: at most ``limit`` pending actions due at ``now``
        (earliest first, ties by ``action_id``, narrowed by ``only``) that no other daemon
        holds a live lease on, each marked claimed by ``daemon_id`` until ``now +
        lease_s`` (seconds) in the same transaction. An action whose lease another daemon
        holds until after ``now`` is not returned; one whose lease ran out is taken over
        (its entry's ``lease_taken_from`` names the daemon that held it); one already
        claimed by ``daemon_id`` is claimed again (lease renewed). Stores claiming at
        once (daemons sharing a database) get disjoint actions: PostgreSQL takes the rows
        ``FOR UPDATE SKIP LOCKED``, SQLite has one writer. ``record_attempt`` clears the
        claim. A SQLite file has one daemon at a time (its lock file): opening it releases
        the claims an earlier daemon left. On PostgreSQL a daemon starting where no other
        serves releases them too (``hold_daemon_lock``); beside other daemons, one
        restarted under the same configured ``daemon_id`` claims its own at once, under a
        new one it waits for the leases like any other daemon."""
        ...

    async def next_attempt_at(self, *, only: OutboxFilter | None = None) -> datetime | None:
        """When the earliest pending action (narrowed by ``only``) falls due; None when no
        action is pending. An action under a lease falls due when the lease runs out, if
        that is later than its ``next_attempt_at`` (whoever holds it: the holder records
        its attempt, which clears the lease, or dies, and the action is due again)."""
        ...

    async def begin_attempt(
        self, action_id: str, at: datetime, *, daemon_id: str | None = None
    ) -> bool:
        """Mark an attempt of pending action ``action_id`` started at ``at``, before its
        request is sent (the dispatcher does it for releases): until the attempt's outcome
        is recorded the action cannot be cancelled, even across a crash. Returns False,
        writing nothing, when the action is not pending (cancelled meanwhile: do not send
        it) or does not exist, and, given ``daemon_id``, when another daemon holds a lease
        on it that runs past ``at`` (it took the action over after this daemon's lease ran
        out: it sends it, this daemon must not)."""
        ...

    async def record_attempt(self, record: AttemptRecord) -> None:
        """Record one delivery attempt and its action's new state (status, attempts,
        ``last_error``, ``next_attempt_at`` unless None, ``delivered_at`` for a delivery,
        ``dead_reason`` and ``dead_status`` for a dead letter), atomically, ending the
        attempt ``begin_attempt`` marked and clearing the action's claim (``claim_due``).
        A delivered release gets its ``send`` movement (once); a dead letter's
        ``record.alert`` is queued in the outbox (with the dead action's decision). A
        cancelled action keeps its status. Raises ``Conflict`` when the action does not
        exist."""
        ...

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """``record_attempt`` for several records in ONE transaction (one durable write):
        all or nothing. An empty sequence writes nothing."""
        ...


class OutboxAdmin(Protocol):
    """Reading the outbox (dead letters included) and requeuing dead letters."""

    async def get_action(self, action_id: str) -> OutboxEntry | None:
        """One outbox entry, or None."""
        ...

    async def list_actions(
        self,
        status: ActionStatus | None = None,
        limit: int = 100,
        *,
        projects: Projects = None,
    ) -> list[OutboxEntry]:
        """At most ``limit`` entries, newest first (``created_at`` descending, ties by
        ``action_id``), optionally of one ``status``, only of ``projects`` (the payload's
        project; entries without one are visible to all)."""
        ...

    async def count_actions(self) -> dict[str, int]:
        """How many entries the outbox holds by status (an ``ActionStatus``; absent
        statuses: none)."""
        ...

    async def list_attempts(self, action_id: str) -> list[Attempt]:
        """Every recorded attempt of ``action_id``, first first (empty when none or no such
        action)."""
        ...

    async def requeue_action(
        self, action_id: str, at: datetime, actor: str, reason: str | None
    ) -> OutboxEntry | None:
        """Put dead letter ``action_id`` back in the queue, due at ``at``, with a fresh
        allowance of attempts and age (``requeued_at = at``, ``attempts_at_requeue =
        attempts``, ``dead_reason``/``dead_status`` cleared) and record the admin act
        ``retry_action`` by ``actor``, atomically. Returns the updated entry, None when
        there is no such action. Raises ``Conflict`` when the action is not dead."""
        ...


class LedgerBook(Protocol):
    """The ledger's movements after a release was decided (its ``reserve`` is written by
    ``commit_transition``, its ``send`` by ``record_attempt``, or by a settlement of a dead
    or cancelled release the bank paid): cancels, settlements, and the movements listed
    for reconciling an escrow line by line."""

    async def cancel_release(
        self, cancel: CancelRequest, *, fence: StateFence | None = None
    ) -> tuple[OutboxEntry, list[LedgerMovement]] | None:
        """Cancel release ``cancel.release_id`` (pending, waiting for a retry, or dead),
        atomically: its outbox status becomes ``cancelled`` (never due again), the ledger
        gets its ``cancel`` and ``return`` movements (actor and reason), the admin act
        ``cancel_action`` is audited (subject: the action id), and ``cancel.then`` (what
        the return decided) is committed as ``commit_transition`` would. Returns the cancelled
        entry and the movements written, None when there is no such action.

        Raises ``Conflict`` (nothing written) when the action is not a release, is
        delivered or cancelled already; ``AttemptInFlight`` (a ``Conflict``) when an
        attempt of it is in flight (``begin_attempt`` without a recorded outcome: its
        outcome decides). ``fence``: checked as ``commit_transitions`` checks it (a return
        changes what the escrow has left: ``StateBehind``, nothing written)."""
        ...

    async def settle_release(
        self, callback: SettlementCallback, *, fence: StateFence | None = None
    ) -> SettlementResult | None:
        """Record the bank's settlement of a release, atomically, with the provider's
        reference (movements by ``callback.target``) and the callback's ``webhook-id`` and
        outcome:

        - sent (delivered): ``settle``, or ``fail`` then ``return``;
        - dead (the bank got it after all): ``send`` then ``settle``, or ``fail`` then
          ``return`` (never sent: the fail comes off ``reserved``); the action becomes
          ``delivered`` (``dead_reason``/``dead_status`` cleared) and the admin act
          ``dead_letter_settlement`` is audited (actor: the target; reason: the outcome,
          reference and the dead reason and status it had);
        - cancelled (an attempt the bank processed before the cancel): ``settled`` writes
          ``reclaim`` (the returned amount back out of the escrow), ``send`` and
          ``settle``; ``failed`` writes no movement (the amount was returned) but is
          recorded with the callback; the status stays ``cancelled`` and the admin act
          ``settlement_after_cancel`` is audited.

        ``callback.alert`` is queued in the outbox (under the release's decision) when
        movements are written; with a new ``return``, ``callback.then`` (what the return
        decided) is committed as ``commit_transition`` would. The same outcome recorded
        before: nothing new (``movements`` empty; the webhook-id is kept). A webhook-id
        applied before with the same body: ``replayed``, nothing written. Returns None
        when ``callback.target`` was sent no release ``callback.release_id``.

        Raises ``KeyReused`` when the webhook-id was applied with another body;
        ``AttemptInFlight`` (a ``Conflict``) when the release is pending with an attempt
        in flight (the bank called back before its answer was recorded: retry);
        ``Conflict`` when it was not sent (pending, shadowed) or was settled with the
        other outcome. Nothing is written on any error. ``fence``: checked as
        ``commit_transitions`` checks it (``StateBehind``)."""
        ...

    async def ledger_movements(
        self,
        escrow: str | None = None,
        *,
        release_id: str | None = None,
        after: int = 0,
        limit: int = 1000,
        projects: Projects = None,
    ) -> list[LedgerMovement]:
        """At most ``limit`` movements with ``id > after``, oldest first (``id``), of
        ``escrow`` and of release ``release_id`` when given, only of releases of
        ``projects`` (their action's project)."""
        ...


class AuditReads(Protocol):
    """The history: the fact log, current facts, decisions, the audit log, the ledger."""

    async def list_facts(
        self,
        project: str | None = None,
        *,
        projects: Projects = None,
        after: FactKey | None = None,
        limit: int | None = None,
    ) -> list[StoredFact]:
        """Current facts ordered by ``(project, kind, id)``, of ``project`` when given, only
        of ``projects``; a page: those strictly after the key ``after`` (keyset paging: the
        key of the last fact of the page before), at most ``limit`` (None: all)."""
        ...

    async def fact_log(
        self, after_seq: int = 0, limit: int = 1000, *, projects: Projects = None
    ) -> list[LoggedFact]:
        """At most ``limit`` fact log entries with ``seq > after_seq``, in ``seq`` order,
        only of ``projects``."""
        ...

    async def fact_at(self, seq: int) -> LoggedFact | None:
        """The fact log entry ``seq``, or None."""
        ...

    async def list_decisions(
        self, rule_id: str | None = None, limit: int = 100, *, instance: str | None = None
    ) -> list[StoredDecision]:
        """At most ``limit`` decisions, newest first (id descending), of ``rule_id`` when
        given, and of its instance ``instance`` (an item id) when given too. A decision
        keeps what it saw by reference (``gatekeeper.store.evidence``): its ``evaluation``
        is shown with ``seen`` rebuilt from the fact log (and a per-item decision's
        ``item``), so what one decision stores is bounded whatever its rule reads."""
        ...

    async def decision_log(
        self,
        after_id: int = 0,
        limit: int = 1000,
        *,
        evaluations: bool = True,
        quiet: bool = True,
        projects: Projects = None,
    ) -> list[StoredDecision]:
        """At most ``limit`` decisions with ``id > after_id``, oldest first (id ascending:
        the order they were committed in), only of ``projects`` (their rule's project;
        decisions without one are visible to all), as ``list_decisions`` shows them; with
        ``evaluations`` False their ``evaluation`` is ``{}`` (nothing is rebuilt from the
        fact log: what a replay of the history reads). With ``quiet`` False, the decisions
        made on a fact or an approval that neither fired (nor was blocked) nor told
        approvers are left out: the bulk of the log, which a replay makes again."""
        ...

    async def fact_log_positions(self, decision_ids: Sequence[int]) -> dict[int, int]:
        """For each of ``decision_ids``: the largest fact log ``seq`` that a decision
        before it (by id) made on a fact or an approval was made on (0 when none): where
        the decision falls in the fact log. Unknown ids are left out."""
        ...

    async def actions_of_decisions(self, first_id: int, last_id: int) -> list[OutboxEntry]:
        """Every outbox entry queued by the decisions ``first_id`` to ``last_id``
        (inclusive; a firing's actions and alert, or an approvals notice), by decision
        id, then in the order they were queued; dead letters included. The alerts queued
        later about an entry (``dead_letter``, ``settlement_failed``: filed under its
        decision) are not the decision's and are left out."""
        ...

    async def decision_of_firing(self, firing_id: str) -> StoredDecision | None:
        """The decision that fired (or blocked) ``firing_id``, or None."""
        ...

    async def audit(self, query: AuditQuery) -> list[AuditEntry]:
        """At most ``query.limit`` audit entries (decisions, admin acts, approvals) matching
        ``query``, newest first: ``at``, then ``kind``, then ``id``, all descending. A page
        continues strictly after ``query.after``."""
        ...

    async def release_record(self, release_id: str) -> ReleaseRecord | None:
        """A release's ledger row, or None."""
        ...

    async def shadowed_releases(self) -> list[ShadowedReleases]:
        """What the shadowed release actions would have released (never sent, never in the
        ledger): per rule id, the content hash of the rule that queued them (its decision's
        ``rule_hash``), escrow and currency, their number and exact sum and the first
        release id; ordered by those four."""
        ...


class RulesetReads(Protocol):
    """Stored ruleset versions (content-addressed; each activation is recorded; each file
    text kept once per content hash)."""

    async def list_rulesets(
        self, limit: int = 100, *, after: RulesetCursor | None = None
    ) -> list[RulesetSummary]:
        """At most ``limit`` versions, the most recently activated first
        (``last_activated_at``, then ``version``, descending), without their files' text;
        a page continues strictly after ``after`` (the ``cursor`` of the last summary of
        the page before)."""
        ...

    async def get_ruleset(self, version: str) -> StoredRuleset | None:
        """One version with the text of its files, or None. Each file's text is stored
        once per content (SHA-256 of its text), whatever the number of versions holding
        it. Raises ``StoreError`` when a text the version names is not stored."""
        ...

    async def active_ruleset_version(self) -> str | None:
        """The version of the active ruleset (the one last activated, by any daemon), or
        None in a new database; without reading its files (``last_ruleset`` reads them)."""
        ...

    def ruleset_changes(self) -> AsyncGenerator[str, None]:
        """The versions activated from now on, by any session of the database, each as its
        activation commits (PostgreSQL: ``LISTEN gatekeeper_ruleset``, on a connection of
        its own, closed when the iteration ends). One activation may be announced after a
        later one's; a notification is lost while the connection is down: a listener
        checks ``active_ruleset_version`` too. Ends at once on a backend that is not
        ``shared``. Raises ``StoreUnavailable`` when the connection fails."""
        ...


class Store(
    StoreLifecycle,
    StateStore,
    DeliveryQueue,
    OutboxAdmin,
    LedgerBook,
    AuditReads,
    RulesetReads,
    Protocol,
):
    """The whole contract, for wiring: a backend implements all of it."""
