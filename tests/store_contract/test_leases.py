"""DeliveryQueue claims: due actions claimed with a lease by one daemon, hidden from the
others until the lease runs out, cleared by recording an attempt. On PostgreSQL each daemon
is a store of its own on the database (its own connections); SQLite takes one daemon per
database file, so there its daemons are daemon ids claiming through one store."""

from __future__ import annotations

import asyncio

from gatekeeper.store import Store
from gatekeeper.store.queries import OutboxFilter
from gatekeeper.store.records import Attempt, AttemptRecord

from . import build
from .conftest import Backend

A = "daemon-a"
B = "daemon-b"
LEASE_S = 30.0


async def _daemons(backend: Backend, n: int = 2) -> list[Store]:
    """The stores ``n`` daemons claim through (see the module)."""
    if backend.name == "sqlite":
        return [await backend.open()] * n
    return [await backend.open() for _ in range(n)]


async def _queue(store: Store, n: int) -> list[str]:
    """``n`` actions of tower-a/r due at T0, T0 + 1 s, ...; their ids in due order."""
    await store.commit_transitions(
        [build.firing("tower-a/r", i, build.at(i - 1)) for i in range(1, n + 1)]
    )
    return [build.action_id("tower-a/r", i) for i in range(1, n + 1)]


def _ids(entries: list) -> list[str]:  # type: ignore[type-arg]
    return [e.action_id for e in entries]


async def test_a_claim_hides_the_action_from_another_daemon_until_its_lease_runs_out(
    backend: Backend,
) -> None:
    a, b = await _daemons(backend)
    first, second = await _queue(a, 2)
    claimed = await a.claim_due(build.at(5), 1, daemon_id=A, lease_s=LEASE_S)
    assert _ids(claimed) == [first]
    assert claimed[0].lease_taken_from is None
    assert _ids(await b.claim_due(build.at(5), 10, daemon_id=B, lease_s=LEASE_S)) == [second]
    # both held: nothing for either other daemon, and both due again when the leases end
    assert await b.claim_due(build.at(34), 10, daemon_id="daemon-c", lease_s=LEASE_S) == []
    assert await a.next_attempt_at() == build.at(35)
    # a holder claims its own again (renewed): A's lease now ends at 36 s, then B takes over
    assert _ids(await a.claim_due(build.at(6), 10, daemon_id=A, lease_s=LEASE_S)) == [first]
    assert _ids(await b.claim_due(build.at(35), 10, daemon_id=B, lease_s=LEASE_S)) == [second]
    taken = await b.claim_due(build.at(36), 10, daemon_id=B, lease_s=LEASE_S)
    assert [(e.action_id, e.lease_taken_from) for e in taken] == [(first, A), (second, None)]
    assert await a.claim_due(build.at(40), 10, daemon_id=A, lease_s=LEASE_S) == []


async def test_recording_an_attempt_clears_the_claim(backend: Backend) -> None:
    a, b = await _daemons(backend)
    (first,) = await _queue(a, 1)
    assert _ids(await a.claim_due(build.T0, 10, daemon_id=A, lease_s=LEASE_S)) == [first]
    retry = AttemptRecord(
        Attempt(first, 1, build.at(1), 5.0, 503, "HTTP 503"), "pending", build.at(3)
    )
    await a.record_attempt(retry)
    # due again at its retry time, for any daemon: the lease is gone
    assert await b.next_attempt_at() == build.at(3)
    assert await b.claim_due(build.at(2), 10, daemon_id=B, lease_s=LEASE_S) == []
    again = await b.claim_due(build.at(3), 10, daemon_id=B, lease_s=LEASE_S)
    assert [(e.action_id, e.attempts, e.lease_taken_from) for e in again] == [(first, 1, None)]


async def test_begin_attempt_refuses_an_action_another_daemon_holds(backend: Backend) -> None:
    a, b = await _daemons(backend)
    (first,) = await _queue(a, 1)
    await a.claim_due(build.T0, 10, daemon_id=A, lease_s=LEASE_S)
    assert not await b.begin_attempt(first, build.at(1), daemon_id=B)
    assert await a.begin_attempt(first, build.at(1), daemon_id=A)
    # after the lease, B may (A stalled past it); without a daemon id no lease is looked at
    assert await b.begin_attempt(first, build.at(31), daemon_id=B)
    assert await b.begin_attempt(first, build.at(2))


async def test_claims_narrow_like_due_actions(store: Store) -> None:
    ids = await _queue(store, 3)
    only = OutboxFilter(ids=[ids[2], ids[0]])
    claimed = await store.claim_due(build.at(9), 10, daemon_id=A, lease_s=LEASE_S, only=only)
    assert _ids(claimed) == [ids[0], ids[2]]
    skip = OutboxFilter(exclude_ids=[ids[1]])
    assert await store.claim_due(build.at(9), 10, daemon_id=B, lease_s=LEASE_S, only=skip) == []
    assert (
        await store.claim_due(build.at(9), 10, daemon_id=A, lease_s=1, only=OutboxFilter(ids=[]))
        == []
    )
    # due_actions does not look at leases (what an operator's view reads)
    assert _ids(await store.due_actions(build.at(9), 10)) == ids


async def test_daemons_claiming_at_once_get_disjoint_actions(backend: Backend) -> None:
    stores = await _daemons(backend, 4)
    ids = await _queue(stores[0], 40)
    got: list[list[str]] = [[] for _ in stores]

    async def claim_all(n: int) -> None:  # its own claims excluded, as in flight
        mine = f"daemon-{n}"
        while batch := await stores[n].claim_due(
            build.at(60), 3, daemon_id=mine, lease_s=LEASE_S, only=OutboxFilter(exclude_ids=got[n])
        ):
            got[n] += _ids(batch)

    await asyncio.gather(*(claim_all(n) for n in range(len(stores))))
    every = [i for claimed in got for i in claimed]
    assert sorted(every) == sorted(ids)  # each once: no action at two daemons


async def test_reopening_a_sqlite_file_releases_the_claims_of_its_last_daemon(
    backend: Backend,
) -> None:
    store = await backend.open()
    (first,) = await _queue(store, 1)
    await store.claim_due(build.T0, 10, daemon_id=A, lease_s=LEASE_S)
    await store.close()
    again = await backend.open()
    claimed = await again.claim_due(build.at(1), 10, daemon_id=B, lease_s=LEASE_S)
    if backend.name == "sqlite":  # one daemon per file: A is gone
        assert [(e.action_id, e.lease_taken_from) for e in claimed] == [(first, None)]
    else:  # A may still run elsewhere: its lease holds
        assert claimed == []
        assert await again.next_attempt_at() == build.at(LEASE_S)
