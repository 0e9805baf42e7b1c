"""Durability under ``kill -9``: the real daemon (``python -m gatekeeper serve``) is killed at
random moments (mid-request, right after a firing, while starting, anywhere) and restarted on
the same database, at least 10 times, while two clients stream facts, a back office cancels
held releases and settles delivered ones, and a real receiver records every webhook; then
the database and the receiver's records are checked against every guarantee (see
``crashkit.analyse``): nothing cancelled is sent, the ledger's movements reconcile, no escrow
goes over its limit.

On PostgreSQL, three daemons share one database and any of them is killed, at least 30
times (``crashkit_pg``): with the one-daemon lock one serves and a standby takes over; once
several daemons serve one database, the survivors go on serving. The same checks, plus: what
a killed daemon was delivering is sent again within its lease.

The plan of the run comes from a seed, printed in the summary: ``GATEKEEPER_CRASH_SEED=N``
replays the plan (the timing still varies). ``bench/soak_crash.py`` is the long version
(``--postgres``: the three daemons).
"""

from __future__ import annotations

import asyncio
import io
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from gatekeeper.cli.backtest import run_backtest_command
from gatekeeper.cli.main import build_parser
from gatekeeper.expr import Item, compile_condition

from .crashkit import TASKS, ruleset, run_crash_test, run_slow_commit_test
from .crashkit_pg import run_pg_crash_test

CYCLES = 16
PG_CYCLES = 30
DEFAULT_SEED = 20261122


@pytest.mark.timeout(120)
async def test_kill_9_loses_nothing_and_fires_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("GATEKEEPER_CRASH_SEED", DEFAULT_SEED))
    report = await run_crash_test(
        tmp_path, seed=seed, cycles=CYCLES, max_window_s=0.5, drain_timeout_s=20.0
    )
    print(report.summary())
    assert sum(report.kills.values()) >= 10
    assert report.facts_acked > 0 and report.once_found > 0 and report.each_found > 0
    assert report.event_found > 0 and report.instance_found > 0 and report.facts_set > 0
    assert report.cancelled > 0 and report.settled + report.failed > 0  # the back office
    assert not report.violations, report.summary()
    # every decision of the killed and restarted daemons is explained by its recorded rules
    out = io.StringIO()
    args = build_parser().parse_args(
        ["backtest", "--self-check", "-c", str(tmp_path / "gatekeeper.yaml"),
         "--database", str(tmp_path / "state" / "gatekeeper.db")]
    )  # fmt: skip
    code = await asyncio.to_thread(run_backtest_command, args, out)
    print(out.getvalue())
    assert code == 0, out.getvalue()
    decisions = out.getvalue().split()[0]
    assert (
        int(decisions) > 0 and f"{decisions} of {decisions} decisions reproduced" in out.getvalue()
    )


@pytest.mark.timeout(300)
async def test_kill_9_of_any_of_three_daemons_on_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    """Three daemons on one PostgreSQL database, 30 of them killed (the one serving, the one
    delivering, one starting, one mid-request...) while clients move from daemon to daemon:
    no acknowledged fact lost, no once-rule fired twice, each release sent under one id, no
    escrow over its limit, and what a killed daemon was delivering sent again within its
    lease (or, with one daemon at a time, as soon as a standby serves)."""
    seed = int(os.environ.get("GATEKEEPER_CRASH_SEED", DEFAULT_SEED))
    report = await run_pg_crash_test(
        tmp_path, postgres_url, seed=seed, cycles=PG_CYCLES, drain_timeout_s=30.0
    )
    print(report.summary())
    assert sum(report.kills.values()) >= PG_CYCLES
    assert report.facts_acked > 0 and report.once_found > 0 and report.each_found > 0
    assert report.releases_received > 0 and report.settled + report.failed > 0
    assert report.figures["serving_kills"] > 0 and report.figures["resumed"] > 0
    assert not report.violations, report.summary()
    out = io.StringIO()
    args = build_parser().parse_args(
        ["backtest", "--self-check", "-c", str(tmp_path / "gatekeeper.yaml"),
         "--database", postgres_url]
    )  # fmt: skip
    code = await asyncio.to_thread(run_backtest_command, args, out)
    print(out.getvalue())
    assert code == 0, out.getvalue()
    decisions = out.getvalue().split()[0]
    assert f"{decisions} of {decisions} decisions reproduced" in out.getvalue()


@pytest.mark.timeout(120)
async def test_kill_during_a_slow_commit_sends_nothing_uncommitted(tmp_path: Path) -> None:
    """A transaction that queued a release is written but its COMMIT is slow (injected); the
    dispatcher, polling the outbox meanwhile, must not send a release that is not committed
    yet: the daemon is killed before the COMMIT, and the release must never have been sent
    (else the once-rule fires again after the restart and the escrow pays twice)."""
    seed = int(os.environ.get("GATEKEEPER_CRASH_SEED", DEFAULT_SEED))
    report = await run_slow_commit_test(tmp_path, seed=seed, commit_delay_s=1.5, tries=3)
    print(report.summary())
    assert report.kills["slow_commit"] >= 1
    assert not report.violations, report.summary()


def test_the_harness_model_of_each_rule_agrees_with_the_language() -> None:
    """The crash check replays the fact log through a Python model of each rule (``holds``);
    that model must give what the real condition gives on every state the run can reach,
    missing facts included (``a or b`` with ``a`` missing is false: the language's
    short-circuit rule), or the check reports firings the daemon rightly did not make."""

    class Lookup:
        def __init__(self, facts: dict[tuple[str, str], dict[str, object]]) -> None:
            self.facts = facts

        def get(self, kind: str, id: str) -> dict[str, object] | None:
            return self.facts.get((kind, id))

        def of_kind(self, kind: str) -> dict[str, dict[str, object]]:
            return {i: d for (k, i), d in self.facts.items() if k == kind}

    values: dict[str, list[dict[str, object]]] = {
        "task": [{"status": s} for s in ("open", "in_progress", "completed")],
        "milestone": [{"status": s} for s in ("draft", "in_review", "approved")],
        "quality_gate": [{"passed": True}, {"passed": False}],
        "mirror": [{"status": "completed"}, {"status": "open"}],
    }
    rng = random.Random(20261207)
    now = datetime(2026, 12, 7, tzinfo=UTC)
    for spec in ruleset():
        condition = compile_condition(yaml.safe_load(spec.yaml)[0]["when"], item_kind=spec.for_each)
        for _ in range(300):
            reads = set(spec.reads)
            if spec.for_each is not None:
                reads |= {(spec.for_each, f"T-{k}") for k in range(TASKS)}
            state = {
                key: rng.choice(values[key[0]])
                for key in sorted(reads)
                if rng.random() < 0.75  # a quarter of the facts do not exist yet
            }
            if spec.for_each is None:
                real = condition.evaluate(Lookup(state), now).value
                assert bool(spec.holds(state)) == bool(real), (spec.id, state)
                continue
            for (kind, item), data in state.items():  # every instance that exists
                if kind == spec.for_each:
                    real = condition.evaluate(Lookup(state), now, item=Item(kind, item, data))
                    assert spec.holds_for(state, item) == bool(real.value), (spec.id, state)
