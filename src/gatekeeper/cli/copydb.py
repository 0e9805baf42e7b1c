"""``gatekeeper copy-db``: move a deployment to another database (SQLite to PostgreSQL, or
back, or to another database of the same backend), its whole history kept.

    gatekeeper copy-db --from SOURCE --to DEST [--format text|json]

SOURCE and DEST are ``database:`` settings (a path, ``sqlite:///...``,
``postgresql://user@host:port/dbname``; the password from ``PGPASSWORD`` or
``~/.pgpass``). What is copied, how it is verified and what is refused:
``gatekeeper.store.copy``. Stop the daemon serving SOURCE first: a database a daemon
serves is refused (on either backend, by the daemon's own lock).

Text output: one line per table (its rows), the total, the time and rows per second, then
``verified``. JSON: ``{"source", "destination", "schema_version", "tables": [{"table",
"rows", "digest"}], "rows", "seconds", "rows_per_second", "verified": true}``.

Exit codes: 0 copied and verified; 1 the copy failed part way or did not verify (rolled
back: DEST holds nothing of it); 2 usage or input error (a SOURCE that cannot be read or
has another schema version, a DEST that is not empty, cannot be opened, or was written
by a newer gatekeeper). Messages name the databases, never a password.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from gatekeeper.cli.output import plural

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TITLE = "gatekeeper copy-db"


def add_copy_db_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``gatekeeper copy-db`` to the subparsers ``commands``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "copy-db",
        help="copy a deployment's whole database to a new, empty one (e.g. to PostgreSQL)",
        description="Copy every table of SOURCE (facts, decisions, rule states, outbox, "
        "ledger, rulesets, audit...) into DEST, ids and sequence numbers kept, in one "
        "transaction, then verify row counts and a digest of every table. DEST is created "
        "or migrated, and must be empty. Stop the daemon serving SOURCE first.",
    )
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE")
    parser.add_argument("--to", dest="destination", required=True, metavar="DEST")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    return parser


def run_copy_db_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``gatekeeper copy-db``: returns 0 (copied, verified), 1 (failed or not verified,
    rolled back) or 2 (refused: nothing written)."""
    from gatekeeper.store.copy import CopyFailed, CopyMismatch, copy_database
    from gatekeeper.store.errors import StoreError

    out = out or sys.stdout
    try:
        report = copy_database(args.source, args.destination)
    except CopyMismatch as exc:
        print(f"{TITLE}: {exc}", file=sys.stderr)
        for line in exc.mismatches:
            print(f"  {line}", file=sys.stderr)
        return EXIT_FAILED
    except CopyFailed as exc:
        print(f"{TITLE}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except StoreError as exc:  # refused, or DEST cannot be opened: nothing written
        print(f"{TITLE}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        document = {
            "source": report.source,
            "destination": report.destination,
            "schema_version": report.version,
            "tables": [
                {"table": t.table, "rows": t.rows, "digest": t.digest} for t in report.tables
            ],
            "rows": report.rows,
            "seconds": round(report.seconds, 3),
            "rows_per_second": round(report.rows_per_second),
            "verified": True,
        }
        print(json.dumps(document, indent=2), file=out)
        return EXIT_OK
    width = max(len(t.table) for t in report.tables)
    print(f"copied {report.source} to {report.destination} (schema {report.version})", file=out)
    for table in report.tables:
        print(f"  {table.table:<{width}}  {table.rows:>9}", file=out)
    print(
        f"{plural(report.rows, 'row')} in {plural(len(report.tables), 'table')}, "
        f"{report.seconds:.2f} s, {report.rows_per_second:,.0f} rows/s",
        file=out,
    )
    print("verified: row counts and row digests equal on both sides", file=out)
    return EXIT_OK
