"""Regression tests for bugs found in the daemon, store, delivery and server: each test
reproduced its bug before the fix (its docstring tells the failure it guards against)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from .conftest import DEPLOY_RULE, DESIGN_RULE, Project, Receiver, fact

APPROVED = fact("milestone", "design", status="approved", approved_at="2026-11-01T09:00:00Z")
QA_PASSED = fact("quality_gate", "qg1", passed=True)
RELEASE_ONLY = DESIGN_RULE.split("  - notify:")[0]


async def _slow_receiver(
    delay_s: float, slow_paths: tuple[str, ...] = (), shutdown_timeout_s: float = 60.0
) -> tuple[Any, Any]:
    """A receiver whose handler sleeps ``delay_s`` (for every path, or only ``slow_paths``);
    its cleanup waits at most ``shutdown_timeout_s`` for handlers still sleeping."""
    seen: list[tuple[str, float]] = []
    done: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        seen.append((request.path, time.monotonic()))
        if not slow_paths or request.path in slow_paths:
            await asyncio.sleep(delay_s)
        done.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, (f"http://127.0.0.1:{port}", seen, done)


# -- 1. the dispatcher reads (and sends) uncommitted outbox rows --------------------------------


async def test_dispatcher_never_sends_an_action_whose_transaction_did_not_commit(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store shares ONE aiosqlite connection between the writer and every reader, so a
    SELECT queued while ``commit_transition`` is between its outbox INSERT and its COMMIT sees
    the uncommitted rows. Here the commit is slow (fsync) and then fails: the release is sent
    although the fact, decision and action were rolled back (a crash in that window is the
    same thing: money moved with no record, and a client retry fires the rule again with a
    new release_id)."""
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", RELEASE_ONLY)
    gk = await start_daemon(project)
    store = gk.daemon.store
    original = store._write_transition

    def slow_commit_then_fail(db: Any, transition: Any) -> list[int]:
        seqs = original(db, transition)  # on the writer thread, inside the transaction
        if transition.actions:
            time.sleep(0.5)  # the COMMIT's fsync taking its time ...
            raise sqlite3.OperationalError("disk I/O error")  # ... and failing
        return seqs

    monkeypatch.setattr(store, "_write_transition", slow_commit_then_fail)
    gk.daemon.dispatcher._idle_poll_s = 0.05  # its periodic look at the outbox (5 s in prod)
    gk.daemon.dispatcher.wake()
    await asyncio.sleep(0.1)

    status, _ = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert status == 503  # the commit failed (the database's I/O error): nothing accepted
    await asyncio.sleep(0.5)
    _, facts = await gk.get("/v1/facts")
    assert facts["facts"] == []
    _, actions = await gk.get("/v1/actions")
    assert actions["actions"] == []
    assert [r.path for r in receiver.received] == []  # FAILS: the release went out anyway


# -- 2. SIGTERM aborts deliveries in flight instead of letting them finish ---------------------


async def test_stop_lets_a_delivery_in_flight_finish(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``Dispatcher.stop`` sets ``_stopping``, which makes ``run`` leave its loop and close the
    aiohttp session at once, while ``stop`` is still "waiting up to grace_s" for deliveries in
    flight: they are torn down and recorded as failed attempts (on the last attempt: a dead
    letter for a release the bank may well have executed)."""
    runner, (url, seen, _done) = await _slow_receiver(1.0)
    try:
        project = project_factory(url)
        project.write_rule("design.yaml", RELEASE_ONLY)
        gk = await start_daemon(project)
        await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert seen, "the release never reached the receiver"
        await gk.runner.cleanup()
        await gk.daemon.stop(grace_s=5)  # SIGTERM path: 5 s is plenty for a 1 s answer

        db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
        rows = db.execute("SELECT status, attempts, last_error FROM outbox").fetchall()
        db.close()
        assert rows == [("delivered", 1, None)], rows  # FAILS: ('pending', 1, 'Server...')
    finally:
        await runner.cleanup()


# -- 3. an exception in _deliver re-sends the action in a tight loop ---------------------------


async def test_failed_bookkeeping_does_not_resend_in_a_tight_loop(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When ``record_attempt`` raises (database locked by another process, disk full, ...)
    the delivery task dies, the action stays pending and due, ``_finished`` wakes the loop,
    and the same release is POSTed again immediately, over and over, with no backoff and no
    attempt recorded. (The same loop, without the POST, comes from a ``secret_env`` holding
    ``whsec_`` with no valid key: ``Webhook()`` raises in ``build_request``.)"""
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", RELEASE_ONLY)
    gk = await start_daemon(project)

    async def locked(*_args: Any, **_kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(gk.daemon.store, "record_attempt", locked)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # "exception never retrieved"
    await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    await asyncio.sleep(1.0)
    monkeypatch.undo()
    sends = len(receiver.received)
    assert sends <= 2, f"the same release was POSTed {sends} times in one second"


# -- 4. bad input that gets a 500 instead of a 4xx ---------------------------------------------


async def _raw_post(gk: Any, body: bytes) -> tuple[int, Any]:
    async with gk.session.post(
        gk.url + "/v1/facts", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        return response.status, await response.json()


async def test_huge_integer_is_a_400_not_a_500(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``json.loads`` raises plain ``ValueError`` (int max-str-digits, 4300) which
    ``read_json`` does not catch."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    body = b'{"project":"tower-a","kind":"task","id":"T-1","data":{"n":' + b"9" * 5000 + b"}}"
    status, answer = await _raw_post(gk, body)
    assert status == 400, answer


async def test_deeply_nested_json_is_a_400_not_a_500(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``json.loads`` raises ``RecursionError`` on deep nesting (well under 1 MiB)."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    status, answer = await _raw_post(gk, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400, answer


async def test_unicode_digit_limit_is_a_400_not_a_500(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``_limit`` checks ``str.isdigit()``, which is true for "²", then ``int("²")`` raises."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    status, answer = await gk.get("/v1/actions?limit=%C2%B2")
    assert status == 400, answer


# -- 5. a rule re-added unchanged is not evaluated, although its condition holds ---------------


async def test_rule_removed_then_restored_fires_when_its_condition_holds(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    """``_activate`` evaluates only rules whose content hash differs from the stored state.
    A rule taken out of the ruleset and put back unchanged keeps its stale ``gate_open``
    and is not evaluated, so facts that arrived while it was out never fire it (until one
    of its facts is posted again); GET /v1/rules shows gate_open false meanwhile."""
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    design = project.write_rule("design.yaml", RELEASE_ONLY)
    gk = await start_daemon(project)

    design.unlink()
    assert await gk.daemon.reload()
    await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})  # no active rule reads them
    project.write_rule("design.yaml", RELEASE_ONLY)
    assert await gk.daemon.reload()

    await asyncio.sleep(0.5)
    _, rule = await gk.get("/v1/rules/tower-a/design-release")
    assert rule["explanation"]["gate_open"] is True
    assert rule["gate_open"] is True, rule["gate_open"]  # FAILS: stale False
    assert [r.path for r in receiver.received] == ["/bank"]  # FAILS: never fired


# -- 6. reload is not all-or-nothing when activation fails ------------------------------------


async def test_failed_activation_keeps_the_old_config(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``reload`` assigns ``self.config`` and ``self.secrets`` before ``_activate`` commits;
    when that commit fails the new targets are live with the old ruleset (and
    ``reload_status`` still says ok)."""
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    before = gk.daemon.config

    text = project.config_path.read_text().replace(f"{receiver.url}/ci", "http://127.0.0.1:9/x")
    project.config_path.write_text(text)
    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("stage: docs", "stage: docs2"))

    async def failing_commit(_transition: Any) -> list[int]:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(gk.daemon.store, "commit_transition", failing_commit)
    assert await gk.daemon.reload() is False
    assert gk.daemon.config is before  # FAILS: the new config went live
    assert gk.daemon.rulesets.status.ok is False


# -- 7. 32 deliveries in flight to one slow target hold up every other target ------------------


async def test_slow_target_does_not_hold_up_other_targets(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``due_actions`` returns the 32 oldest pending rows, in-flight ones included; with 32
    actions stuck on a slow target that query returns only those, so a notify to a healthy
    target waits for them (the module promises the opposite). The dispatcher also spins at
    100 queries/s meanwhile (``_sleep_until_due`` waits 0.01 s while anything is in flight)."""
    # the slow target answers after 30 s (its requests time out after 15 s): a notify that
    # waited for it would arrive 15 s late at the earliest
    slow = _slow_receiver(30.0, slow_paths=("/ci",), shutdown_timeout_s=1.0)
    runner, (url, seen, _done) = await slow
    try:
        project = project_factory(url)
        project.write_rule("deploy.yaml", DEPLOY_RULE)
        project.write_rule(
            "notify.yaml",
            """\
            id: tower-a/notify
            project: tower-a
            when: task.ping.ok
            fire: once
            actions:
              - notify: {target: finance-chat, message: "ping ${rule_id}"}
            """,
        )
        gk = await start_daemon(project)
        for _ in range(32):  # 32 firings of the each_time rule -> 32 pipeline actions
            await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
            await gk.post("/v1/facts", fact("task", "T-17", status="open"))
        await asyncio.sleep(0.3)
        posted = time.monotonic()
        await gk.post("/v1/facts", fact("task", "ping", ok=True))
        for _ in range(500):
            if any(path == "/chat" for path, _ in seen):
                break
            await asyncio.sleep(0.02)
        chat = [t for path, t in seen if path == "/chat"]
        assert chat and chat[0] - posted < 10.0, "the notify waited for the slow target"
    finally:
        await runner.cleanup()


# -- 8. more bad input that gets a 500 or is stored as invalid JSON ---------------------------


async def test_idempotency_key_with_lone_surrogate_is_a_400_not_a_500(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``idempotency_record`` hashes ``json.dumps(..., ensure_ascii=False).encode()``, which
    raises ``UnicodeEncodeError`` for a ``"\\ud800"`` escape in the data (the same body
    without the header is accepted)."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    body = b'{"project":"tower-a","kind":"task","id":"T-1","data":{"x":"\\ud800"}}'
    async with gk.session.post(
        gk.url + "/v1/facts",
        data=body,
        headers={"Content-Type": "application/json", "Idempotency-Key": "k-1"},
    ) as response:
        assert response.status != 500, await response.text()


async def test_nan_is_refused_not_stored(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """``json.loads`` accepts ``NaN``/``Infinity``; the fact is stored and every later
    ``GET /v1/facts`` answers with a body that is not JSON (RFC 8259 has no NaN)."""
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    status, _ = await _raw_post(
        gk, b'{"project":"tower-a","kind":"task","id":"T-1","data":{"x":NaN}}'
    )
    assert status == 400


# -- 9. a cancellation that lands in COMMIT is turned into an OperationalError ------------------

LATE_RULE = """\
id: tower-a/late
project: tower-a
when: minutes_since(task.t.at) >= 1
fire: each_time
actions:
  - pipeline: {target: ci, ref: main}
"""


async def test_cancel_during_commit_is_not_swallowed(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    """aiosqlite runs the COMMIT in its thread whatever happens to the awaiting task. When
    the task is cancelled while the COMMIT (fsync) is in progress, ``commit_transitions``
    runs ROLLBACK, which fails ("no transaction is active") and replaces the CancelledError
    with an OperationalError. The tick loop catches it as an ordinary failure, so the task
    survives ``cancel()`` and ``Daemon.stop`` (which awaits it) hangs; and the transaction
    that did commit is not applied in memory, so the rule fires again on the next tick with
    the same firing id and hits the UNIQUE constraint on every tick until a restart."""
    from datetime import UTC, datetime, timedelta

    from gatekeeper.clock import FixedClock

    clock = FixedClock(datetime(2026, 11, 1, 9, 0, tzinfo=UTC))
    project = project_factory()
    project.write_rule("late.yaml", LATE_RULE)
    gk = await start_daemon(project, clock=clock, tick_s=0.05)
    await gk.post("/v1/facts", fact("task", "t", at="2026-11-01T09:00:00Z"))

    store = gk.daemon.store
    original_transact = store._transact
    in_commit = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_commit(body: Any) -> Any:  # on the writer thread: BEGIN ... COMMIT
        result = original_transact(body)  # committed (and fsynced) ...
        loop.call_soon_threadsafe(in_commit.set)
        time.sleep(0.5)  # ... but the awaiting task has not resumed yet
        return result

    store._transact = slow_commit  # type: ignore[method-assign]
    ticks = next(t for t in gk.daemon._tasks if t.get_name() == "clock-ticks")
    clock.advance(timedelta(minutes=2))
    await asyncio.wait_for(in_commit.wait(), 5)
    ticks.cancel()  # what Daemon.stop does to its tasks
    store._transact = original_transact  # type: ignore[method-assign]
    done, _ = await asyncio.wait({ticks}, timeout=2)
    async with gk.daemon.writer.lock:  # the shielded write goes on to its end
        pass
    state = gk.daemon.writer.states.get(("tower-a/late", ""))
    stored = await gk.daemon.store.load_rule_states()
    assert ticks in done, "the tick task survived cancel(): Daemon.stop would hang"
    assert state == stored[("tower-a/late", "")]


# -- 10. a rule with two releases is checked against the escrow limit for the first only --------

TWO_RELEASES = """\
id: tower-a/two-releases
project: tower-a
when: milestone.design.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "15000.00",
              currency: USD, payee: acme-architects}
  - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "15000.00",
              currency: USD, payee: acme-engineers}
"""


async def test_every_release_of_a_firing_is_checked_against_the_limit(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    """``Engine._decide`` asks ``book.refusal(rule.release)``: ``Rule.release`` is the FIRST
    release action only. The loader accepts any number of releases per rule (each one alone
    within the limit), and ``_queue_firing`` commits them all: 30,000 USD leave an escrow
    whose limit is 20,000."""
    project = project_factory(receiver.url)  # tower-a-escrow: USD, limit 20000.00
    project.write_rule("two.yaml", TWO_RELEASES)
    gk = await start_daemon(project)
    status, _ = await gk.post("/v1/facts", APPROVED)
    assert status == 200
    await asyncio.sleep(0.5)
    _, escrows = await gk.get("/v1/escrows")
    remaining = {e["escrow"]: e["remaining"] for e in escrows["escrows"]}
    assert not remaining["tower-a-escrow"].startswith("-"), escrows  # FAILS: -10000.00
    assert len([r for r in receiver.received if r.path == "/bank"]) <= 1


# -- YAML anchors chained into data deeper than the text shows ----------------------------------


def _chained_anchor_rule() -> str:
    """A rule file whose anchors each nest 60 levels around the previous one: about 2,400
    levels once expanded, while no line of the text nests more than 61."""
    anchors = ["a0: &a0 x"] + [
        f"a{i}: &a{i} " + "[" * 60 + f"*a{i - 1}" + "]" * 60 for i in range(1, 40)
    ]
    return (
        "id: tower-a/anchors\nproject: tower-a\nwhen: milestone.design.status == 'x'\n"
        "actions: [{notify: {target: site-chat, message: m}}]\nx:\n  " + "\n  ".join(anchors) + "\n"
    )


def test_chained_anchors_are_a_problem_of_the_file_not_a_crash(tmp_path: Any) -> None:
    """jsonschema's message for the unknown key ``x`` took the repr of the expanded data and
    raised RecursionError out of ``load_rules_dir`` (documented never to raise for bad input):
    ``gatekeeper check`` printed a traceback."""
    from gatekeeper.rules.loader import load_rules_dir

    (tmp_path / "anchors.yaml").write_text(_chained_anchor_rule())
    result = load_rules_dir(tmp_path, None)
    assert result.ruleset is None
    assert [p.message for p in result.problems] == [
        "nested more than 64 levels deep once aliases are expanded"
    ]


async def test_chained_anchors_at_restart_fall_back_to_the_last_good_ruleset(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    """The same file at start stopped the daemon (RecursionError out of the load) instead of
    running the last good ruleset stored in the database."""
    project = project_factory(receiver.url)
    (project.rules_dir / "design.yaml").write_text(DESIGN_RULE)
    first = await start_daemon(project)
    await first.stop()
    (project.rules_dir / "anchors.yaml").write_text(_chained_anchor_rule())
    second = await start_daemon(project)
    status, rules = await second.get("/v1/rules")
    assert status == 200
    assert [rule["id"] for rule in rules["rules"]] == ["tower-a/design-release"]
    assert second.daemon.rulesets.status.ok is False


# -- a failure applying a committed transition in memory ---------------------------------------


async def test_a_committed_transition_that_fails_to_apply_is_not_committed_again(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_commit_and_apply`` committed, then ``_apply`` raised: the caller took it for a failed
    commit (500 for facts that were durable; a group was committed again one by one) and
    memory lacked the transition, so posting the facts again fired the once rule a second
    time: a second release. Now memory is rebuilt from the database."""
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", RELEASE_ONLY)
    gk = await start_daemon(project)
    daemon = gk.daemon.writer
    original = daemon._apply
    failures: list[int] = []

    def apply_failing_once(transition: Any) -> None:
        if transition.actions and not failures:
            failures.append(1)
            raise RuntimeError("bookkeeping bug")
        original(transition)

    monkeypatch.setattr(daemon, "_apply", apply_failing_once)
    status, body = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert failures == [1]
    assert status == 200, body  # committed: accepted, not an error
    await receiver.wait_for(1)
    status, again = await gk.post("/v1/facts", {"facts": [APPROVED, QA_PASSED]})
    assert status == 200, again
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 1  # one release, not two
    _, facts = await gk.get("/v1/facts")
    assert len(facts["facts"]) == 2
    db = sqlite3.connect(project.root / "state" / "gatekeeper.db")
    try:
        releases = db.execute("SELECT count(*) FROM ledger").fetchone()[0]
        logged = db.execute("SELECT count(*) FROM fact_log").fetchone()[0]
    finally:
        db.close()
    assert (releases, logged) == (1, 4)
