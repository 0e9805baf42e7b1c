"""``gatekeeper backtest``: replaying a recorded fact log against a ruleset, beside ingest.

Run: ``python bench/bench_backtest.py`` (about 2-3 min on 2 cores: most of it is recording
the history through the daemon); ``--help`` for the knobs.

What runs (everything on 127.0.0.1, in a temporary directory that is removed afterwards):

1. **posting to a daemon** (the baseline the target is set against): ``python -m
   gatekeeper serve`` in its own process with 1,000 generated rules (each fact is read by
   5 of them; 1 fact in 100 is ``completed``, which fires its ``each_time`` rules: their
   notify actions go to a closed local port, ``max_attempts: 1``). ``--facts`` facts
   (default 100,000) are posted one per request over ``--connections`` connections by an
   aiohttp client in this process; the wall time until the last answer is the figure.
   That daemon's database is the recorded history the other two figures replay.
2. **backtest**: ``gatekeeper backtest``'s work in this process, on that database (opened
   read-only): read the history through the Store contract, replay every event through an
   engine of the same 1,000 rules (``Replay.on_candidate``), diff the firings from the
   recorded ones. Wall time, median of ``--runs`` runs; the read and the replay+diff are
   also shown apart. Every run must find no difference (same rules).
3. **plain ingest in memory**: the same facts planned and applied one by one through the
   engine (``Engine.plan_ingest`` + ``apply_transition``, what the daemon's writer does
   without the store and HTTP), median of ``--runs`` runs: the floor a replay can reach.

Also printed: ``--self-check`` on the same database (replay of the recorded version with
every decision compared).

Target (current): backtest facts/s >= 5x posting the same facts to a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    BENCH_PROJECT,
    Targets,
    add_strict_options,
    fact_count,
    fmt,
    machine_header,
    median,
    spread,
    table,
)
from bench_ingest import daemon_env, start_process, write_gatekeeper_setup

HOST = "127.0.0.1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=100_000, help="facts in the log")
    parser.add_argument("--rules", type=int, default=1000, help="rules in the ruleset")
    parser.add_argument("--runs", type=int, default=3, help="runs of the in-process figures")
    parser.add_argument("--connections", type=int, default=8, help="posting connections")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    add_strict_options(parser)
    return parser.parse_args(argv)


def fact_stream(count: int, rules: int) -> list[dict[str, Any]]:
    """``count`` facts going round the ``task`` ids the generated rules read; 1 in 100 is
    ``completed`` (each id once every 100 rounds, at its own round): its rules whose
    ``priority`` threshold it meets fire (``each_time``), and the id's next fact reopens
    it."""
    ids = fact_count(rules)
    facts = []
    for n in range(count):
        index, round_ = n % ids, n // ids
        status = "completed" if (round_ + index) % 100 == 0 else "open"
        facts.append(
            {
                "project": BENCH_PROJECT,
                "kind": "task",
                "id": f"T-{index}",
                "data": {"status": status, "priority": n % 5, "n": n},
            }
        )
    return facts


async def post_all(url: str, facts: list[dict[str, Any]], connections: int) -> float:
    """Post each fact as its own request over ``connections`` connections; seconds."""
    import aiohttp

    position = iter(facts)
    failures: list[str] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for fact in position:
            async with session.post(url, json=fact) as response:
                if response.status != 200:
                    failures.append(await response.text())
                await response.read()

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} facts refused, e.g. {failures[0]}")
    return elapsed


def record(folder: Path, args: argparse.Namespace, facts: list[dict[str, Any]]) -> float:
    """Post ``facts`` to a real daemon in ``folder``; returns the seconds it took. The
    daemon is stopped (SIGTERM) afterwards: its database is the history."""
    config, port = write_gatekeeper_setup(folder, args.rules, time_rules=False)
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", "warning"]
    server = start_process("gatekeeper", command, port, folder / "gatekeeper.log", env=daemon_env())
    try:
        server.wait_ready("/healthz")
        return asyncio.run(post_all(server.url, facts, args.connections))
    finally:
        server.stop()


def read_database(folder: Path, *, self_check: bool) -> tuple[Any, Any]:
    """The history and recorded rulesets of the benchmark's database, as the command reads
    them (read-only)."""
    from gatekeeper.cli import backtest

    return backtest.read_database(str(folder / "gatekeeper.db"), self_check=self_check)


def backtest_once(folder: Path) -> tuple[float, float, int, int]:
    """One backtest of the recorded database against the same rules: (read seconds,
    replay + diff seconds, firings compared, differences)."""
    from gatekeeper.config import load_config
    from gatekeeper.rules.loader import load_rules_dir
    from gatekeeper.store.history import run_backtest

    config = load_config(folder / "gatekeeper.yaml")
    loaded = load_rules_dir(folder / "rules", config)
    assert loaded.ruleset is not None

    started = time.perf_counter()
    history, files = read_database(folder, self_check=False)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    result = run_backtest(history, files, loaded.ruleset, config)
    replay_s = time.perf_counter() - started
    diff = result.diff
    differences = len(diff.added) + len(diff.gone) + len(diff.changed)
    return read_s, replay_s, diff.recorded_count, differences


def self_check_once(folder: Path) -> tuple[float, str]:
    from gatekeeper.config import load_config
    from gatekeeper.store.history import run_self_check

    config = load_config(folder / "gatekeeper.yaml")

    started = time.perf_counter()
    history, files = read_database(folder, self_check=True)
    check = run_self_check(history, files, config)
    return time.perf_counter() - started, f"{check.reproduced} of {check.total}"


def ingest_in_memory(folder: Path, facts: list[dict[str, Any]]) -> float:
    """Seconds to plan and apply every fact, one per batch, through a fresh engine."""
    from gatekeeper.config import load_config
    from gatekeeper.engine.evaluate import Engine, apply_transition
    from gatekeeper.engine.facts import FactTable
    from gatekeeper.engine.ledger import EscrowBook
    from gatekeeper.engine.model import FactInput
    from gatekeeper.engine.replay import counting_ids
    from gatekeeper.rules.loader import load_rules_dir

    config = load_config(folder / "gatekeeper.yaml")
    loaded = load_rules_dir(folder / "rules", config)
    assert loaded.ruleset is not None
    engine = Engine.for_config(loaded.ruleset, config, new_action_id=counting_ids())
    inputs = [FactInput(f["project"], f["kind"], f["id"], f["data"]) for f in facts]
    table_ = FactTable()
    states: dict[Any, Any] = {}
    approvals: dict[str, dict[str, Any]] = {}
    book = EscrowBook(config.escrows)
    now = datetime.now(UTC)
    started = time.perf_counter()
    for fact in inputs:
        transition = engine.plan_ingest(table_, states, [fact], now, book.copy())
        apply_transition(transition, table_, states, approvals, book)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(machine_header(f"gatekeeper backtest: {args.facts:,} facts, {args.rules:,} rules"))
    folder = Path(tempfile.mkdtemp(prefix="gk-bench-backtest-"))
    try:
        facts = fact_stream(args.facts, args.rules)
        print(f"   posting {args.facts:,} facts to the daemon ({args.connections} connections)...")
        posted_s = record(folder, args, facts)
        backtests = [backtest_once(folder) for _ in range(args.runs)]
        ingests = [ingest_in_memory(folder, facts) for _ in range(args.runs)]
        check_s, reproduced = self_check_once(folder)
    finally:
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    totals = [r + p for r, p, _, _ in backtests]
    compared = backtests[0][2]
    differences = {d for _, _, _, d in backtests}
    n = args.facts
    rows = [
        ["posting to a daemon (1 fact/request)", fmt(posted_s), fmt(n / posted_s), "1 run"],
        [
            "backtest: read + replay + diff",
            fmt(median(totals)),
            fmt(n / median(totals)),
            spread(totals),
        ],
        [
            "  of which: read the history",
            fmt(median([r for r, _, _, _ in backtests])),
            "",
            spread([r for r, _, _, _ in backtests]),
        ],
        [
            "  of which: replay + diff",
            fmt(median([p for _, p, _, _ in backtests])),
            fmt(n / median([p for _, p, _, _ in backtests])),
            spread([p for _, p, _, _ in backtests]),
        ],
        [
            "plain ingest in memory (engine)",
            fmt(median(ingests)),
            fmt(n / median(ingests)),
            spread(ingests),
        ],
        ["self-check (read + replay + compare)", fmt(check_s), fmt(n / check_s), "1 run"],
    ]
    print(table(["what", "seconds", "facts/s", "runs (s)"], rows))
    print(
        f"   firings compared: {compared:,}; differences: {sorted(differences)}; "
        f"self-check: {reproduced} decisions reproduced"
    )
    ratio = posted_s / median(totals)
    print(
        f"   backtest is {ratio:.1f}x faster than posting; {median(totals) / median(ingests):.2f}x "
        "the time of plain ingest in memory"
    )
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    targets.check("backtest speed / posting to a daemon", ratio, ">=", 5.0)
    if differences != {0}:
        print("   FAIL  the same rules must make no difference")
        return 1
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
