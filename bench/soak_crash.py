"""Crash soak: ``kill -9`` the real daemon many times while facts stream in and releases are
cancelled and settled, then check that nothing acknowledged was lost, no once-rule fired
twice, every action was delivered with a stable id, nothing cancelled was sent, the ledger's
movements reconcile and no escrow went over its limit (the checks of ``tests/crashkit.py``).

Run: ``python bench/soak_crash.py [--cycles 100] [--seed N] [--workdir DIR]`` (about a second
per cycle). Prints the counts and every violation; exits 1 on any violation, 0 otherwise.
The seed (random unless given) is printed: it replays the plan of a run, not its timing.

``--postgres``: three daemons on one PostgreSQL database, any of them killed
(``tests/crashkit_pg.py``; default 200 cycles, about 2 s each), on the empty database or
schema ``--database URL`` names, else on a fresh schema of the test server
(``GATEKEEPER_TEST_POSTGRES``, default ``postgresql://postgres@127.0.0.1:5432/postgres``;
dropped at the end). Exits 2 when there is no server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crashkit import CrashFailure, Report, run_crash_test, run_slow_commit_test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, help="kill cycles (default 100; 200 with --postgres)")
    parser.add_argument("--seed", type=int, help="seed of every random choice (default: random)")
    parser.add_argument("--workdir", type=Path, help="keep the deployment and database here")
    parser.add_argument("--window", type=float, default=0.8, help="longest timer window, s")
    parser.add_argument(
        "--slow-commit",
        action="store_true",
        help="run the deterministic slow-COMMIT scenario instead of the kill cycles",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="three daemons on one PostgreSQL database, kill -9 of any (default 200 cycles)",
    )
    parser.add_argument(
        "--database", help="with --postgres: the URL of an empty database (or schema) to use"
    )
    args = parser.parse_args()
    if args.cycles is None:
        args.cycles = 200 if args.postgres else 100
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gatekeeper-soak-"))
    print(f"seed {seed}, {args.cycles} cycles, working in {workdir}", flush=True)
    try:
        if args.postgres:
            report = run_on_postgres(args, workdir, seed)
            if report is None:
                return 2
        elif args.slow_commit:
            report = asyncio.run(run_slow_commit_test(workdir, seed=seed))
        else:
            report = asyncio.run(
                run_crash_test(
                    workdir,
                    seed=seed,
                    cycles=args.cycles,
                    max_window_s=args.window,
                    drain_timeout_s=120.0,
                )
            )
    except CrashFailure as exc:
        print(f"FAILED (seed {seed}): {exc}")
        return 1
    print(report.summary())
    if report.violations:
        print(f"FAILED: {len(report.violations)} violation(s); files kept in {workdir}")
        return 1
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print("OK: every guarantee held")
    return 0


def run_on_postgres(args: argparse.Namespace, workdir: Path, seed: int) -> Report | None:
    """The failover run on ``--database``, or on a fresh schema of the test server (None
    when it cannot be reached)."""
    from crashkit_pg import run_pg_crash_test

    def run(url: str) -> Report:
        return asyncio.run(
            run_pg_crash_test(
                workdir,
                url,
                seed=seed,
                cycles=args.cycles,
                max_window_s=args.window,
                drain_timeout_s=120.0,
            )
        )

    if args.database:
        return run(args.database)
    import pg

    reason = pg.unreachable()
    if reason is not None:
        print(f"no PostgreSQL: {reason}; set GATEKEEPER_TEST_POSTGRES or --database")
        return None
    with pg.scratch_database() as url:
        return run(url)


if __name__ == "__main__":
    sys.exit(main())
