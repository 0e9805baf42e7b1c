"""``gatekeeper backtest``: what a candidate ruleset would have done with a deployment's
recorded history, and how that differs from what was recorded.

    gatekeeper backtest --rules DIR [-c gatekeeper.yaml]
                        (--database PATH | --url URL [--token-env VAR])
                        [--since T] [--until T] [--format text|json|github]
                        [--fail-on release|any|none]
    gatekeeper backtest --self-check --database PATH [-c gatekeeper.yaml]

The recorded fact log (facts and approvals), the admin acts (pause, resume, rearm,
signoff), the returns of the ledger (cancels, failed settlements), the deadline ticks and
the starts of the daemon are replayed with their recorded times through
the candidate's engine, in memory (``gatekeeper.engine.replay``; the database is opened
read-only, a daemon may be running on it; or read from a running daemon with ``--url``:
``GET /v1/history/facts``, ``/v1/history/decisions`` (scope ``history``, or ``admin``),
``/v1/audit``, ``/v1/rulesets`` and the escrows' entries (scope ``read``), with a token
from ``$GATEKEEPER_TOKEN`` or the variable ``--token-env`` names;
nothing is written anywhere). The firings are
then compared with the recorded ones (``gatekeeper.engine.backtest``): firings added,
firings gone, firings changed (outcome, actions: amounts, payees, escrows, targets,
rendered messages and inputs), firings whose release is now blocked (and why) or no longer
blocked, per rule instance, with what each escrow would release more or less (a blocked
release releases nothing). The config (``-c``, default ``./gatekeeper.yaml``) gives the escrows, the
alert target and the targets' formats: they are not part of the recorded history.

``--since``/``--until`` (RFC 3339) bound the window compared: the replay always starts at
the beginning of the history (the state at ``--since`` is rebuilt by replaying everything
before it, with the candidate) and stops at ``--until`` (default: the last recorded time);
only firings decided in ``[since, until)`` are compared.

``--self-check`` replays the history on the recorded ruleset versions (each as it went
live) and must reproduce every recorded decision: its rule, instance, trigger, outcome,
gate, firing id, reason, rule hash, ruleset version, triggering fact and approvals, and
each firing's actions (kind, target, rendered payload) and ledger entries. Left out, being
random by design or given outside the engine: action and release ids (fresh UUIDs: a
release id is its action's id; where a payload names one, as an alert names its release,
both sides name it by its firing and place), decision row ids and request ids. Prints
``N of N decisions reproduced`` or the first differences.

Shadow mode and sign-offs: a recorded shadowed action (a rule in ``mode: shadow``, or a
money rule awaiting sign-off) counts as ``shadowed``, never as released; the self-check
replays the recorded sign-offs (admin acts ``signoff``), and so does a candidate: its rules
whose content hash the history knows follow their recorded sign-offs (unchanged rules
replay as they ran: no difference), while a money rule the history never saw (new or
changed) is presumed signed off (the backtest shows what it would decide, live); rules in
``mode: shadow`` stay shadowed.

Returns: each ``return`` movement of the ledger (an admin's ``cancel_action``, or a failed
settlement: ``fail`` then ``return``) is replayed at its recorded time: the amount goes
back to the replay's escrow book, then the releases blocked on that escrow are tried again
(trigger ``return``), as the daemon does. A return names the recorded release by its
firing, matched as the diff matches firings (rule instance and instant, the how-manieth
firing of that instance then) and the release's place among the firing's releases. The
self-check returns the recorded release. A candidate returns its own release at that spot,
whatever its amount; when it has none there (the firing is gone, blocked or shadowed, or
has fewer releases) nothing is returned, nothing is re-tried, and the report counts the
return in ``skipped`` (``"return": N``): the candidate never reserved that money. A
release whose amount returned has the status ``cancelled`` or ``failed`` (a recorded one:
returned before ``--until``; a replayed one: when a return applied to it) and, like a
shadowed one, is never counted as released: not in the escrow totals, and a firing whose
only release was cancelled, added or gone, does not fail ``--fail-on release``; a status
that differs between the two sides (cancelled in the record, sent in the replay) is a
change of a release. A ``reclaim`` (a cancelled release the bank settled anyway) takes
back, at its recorded time, what the return at that spot gave back in the replay, and the
release counts as released again; with no such return it is skipped (``"return"``).

Formats: ``text``; ``json`` (one object, below); ``github`` (``::error`` for each
difference that fails ``--fail-on``, ``::warning`` for the others, on the rule's file and
line in the candidate; the workflow commands of ``gatekeeper check``).

The JSON report: ``{"ruleset": {"dir", "version", "rules"}, "database", "window":
{"since", "until"}, "events", "firings": {"recorded", "replayed"}, "added": [FIRING],
"gone": [FIRING], "changed": [{"rule", "item", "at", "recorded_firing_id",
"replayed_firing_id", "changes": [{"field", "old", "new"}]}], "blocks": [{"rule", "item",
"at", "recorded_firing_id", "replayed_firing_id", "change": "now_blocked" |
"no_longer_blocked", "reason" (why the blocked side was blocked), "actions" (the fired
side's)}], "rules": {NAME: {"added", "gone", "changed", "now_blocked",
"no_longer_blocked"}}, "escrows": [{"escrow", "currency", "recorded", "replayed",
"delta"}], "skipped": {"approval": N, "admin act": N, "return": N}, "fail_on", "fails"}``
where
FIRING is ``{"rule", "item", "firing_id", "at", "outcome", "reason", "actions": [{"kind",
"target", "status", "payload"}]}``; amounts are decimal strings. The self-check's:
``{"ok", "decisions", "reproduced", "differences": [TEXT]}``.

Exit codes: 0 no difference that fails ``--fail-on`` (self-check: every decision
reproduced), 1 differences that fail it (default ``release``: any change in releases;
``any``: any difference; ``none``: never), 2 usage or input error (bad rules, config or
time, a database that is missing, unreadable, or written by a newer gatekeeper).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from gatekeeper.cli.output import display_path, plural, workflow_command
from gatekeeper.cli.plan import _print_load_problems, cli_config, describe_action, rule_path
from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.config import Config
from gatekeeper.engine.backtest import (
    BacktestDiff,
    BlockChange,
    FailOn,
    FiringRecord,
    SelfCheck,
)
from gatekeeper.rules.loader import load_rules_dir
from gatekeeper.rules.model import Ruleset

if TYPE_CHECKING:
    from gatekeeper.store.history import History
    from gatekeeper.store.queries import AuditQuery
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

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TITLE = "gatekeeper backtest"


def add_backtest_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``gatekeeper backtest`` to the subparsers ``commands``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "backtest",
        help="replay the recorded history against a ruleset and show the differences",
        description="Replay a deployment's recorded facts, approvals, admin acts and "
        "deadlines with their recorded times against a candidate ruleset, in memory, and "
        "show the firings added, gone and changed, with what each escrow would release "
        "more or less. --self-check replays the recorded rule versions instead and must "
        "reproduce every recorded decision.",
    )
    parser.add_argument(
        "-c", "--config", type=Path, help="gatekeeper.yaml (default: ./gatekeeper.yaml)"
    )
    parser.add_argument("--rules", type=Path, metavar="DIR", help="the candidate ruleset")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--database", metavar="PATH", help="the deployment's database (opened read-only)"
    )
    source.add_argument(
        "--url",
        metavar="URL",
        help="a running daemon's base URL (its history API: a token of scopes history, or "
        "admin, and read)",
    )
    parser.add_argument(
        "--token-env",
        metavar="VAR",
        help="the environment variable holding the API token for --url (default: GATEKEEPER_TOKEN)",
    )
    parser.add_argument("--since", metavar="TIME", help="compare from this time (RFC 3339)")
    parser.add_argument("--until", metavar="TIME", help="compare before this time (RFC 3339)")
    parser.add_argument("--format", choices=["text", "json", "github"], default="text")
    parser.add_argument(
        "--fail-on",
        choices=["release", "any", "none"],
        default="release",
        help="exit 1 on any change in releases (release, the default), any difference "
        "(any), or never (none)",
    )
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="replay the recorded rule versions; every recorded decision must come out",
    )
    return parser


def run_backtest_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``gatekeeper backtest``: returns 0, 1 (differences failing ``--fail-on``, or a
    self-check that did not reproduce everything) or 2 (usage or input error)."""
    out = out or sys.stdout
    config = cli_config(args.config, "backtest")
    if config is None:
        return EXIT_USAGE
    if args.database is None and args.url is None:
        return _usage("give the history to replay: --database PATH or --url URL")
    if args.token_env is not None and args.url is None:
        return _usage("--token-env goes with --url")
    if args.self_check:
        if args.rules is not None:
            return _usage("--self-check replays the recorded rules: leave out --rules")
        if args.database is None:
            return _usage("--self-check reads the database itself: --database PATH")
        return _self_check(args, config, out)
    if args.rules is None:
        return _usage("give the candidate ruleset: --rules DIR (or --self-check)")
    try:
        since = None if args.since is None else parse_rfc3339(args.since)
        until = None if args.until is None else parse_rfc3339(args.until)
    except ValueError as error:
        return _usage(f"--since/--until: {error}")
    if since is not None and until is not None and until <= since:
        return _usage("--until must be after --since")
    if not args.rules.is_dir():
        return _usage(f"--rules {args.rules}: no such directory")
    result = load_rules_dir(args.rules, config)
    if result.ruleset is None:
        _print_load_problems(result, args.format, out)
        return EXIT_USAGE
    ruleset = result.ruleset
    try:
        if args.url is not None:
            history, files = read_daemon(args.url.rstrip("/"), _token(args.token_env))
        else:
            history, files = read_database(args.database, self_check=False)
    except ReadError as error:
        return _usage(str(error))
    from gatekeeper.store.history import run_backtest

    outcome = run_backtest(history, files, ruleset, config, since, until)
    report = Report(
        ruleset=ruleset,
        rules_dir=args.rules,
        database=args.database or args.url,
        since=since,
        until=until,
        events=outcome.events,
        diff=outcome.diff,
        skipped=outcome.skipped,
        fail_on=args.fail_on,
    )
    if args.format == "json":
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        lines = report.github() if args.format == "github" else report.text()
        out.write("\n".join(lines) + "\n")
    return EXIT_FAILED if outcome.diff.trips(args.fail_on) else EXIT_OK


def _self_check(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    from gatekeeper.store.history import run_self_check

    try:
        history, files = read_database(args.database, self_check=True)
    except ReadError as error:
        return _usage(str(error))
    try:
        check = run_self_check(history, files, config)
    except ValueError as error:
        return _usage(str(error))
    if args.format == "json":
        out.write(json.dumps(check.to_json(), indent=2) + "\n")
    else:
        out.write("\n".join(self_check_text(check)) + "\n")
    return EXIT_OK if check.ok else EXIT_FAILED


def self_check_text(check: SelfCheck) -> list[str]:
    """``N of N decisions reproduced``, after the first differences when there are any."""
    lines = [f"difference: {text}" for text in check.differences]
    lines.append(f"{check.reproduced} of {check.total} decisions reproduced")
    return lines


class ReadError(Exception):
    """The database cannot be read; the message says what and which file."""


def read_database(database: str, *, self_check: bool) -> tuple[History, dict[str, Any]]:
    """The history and the recorded ruleset files of ``database``, opened read-only:
    what a backtest replays, or (``self_check``) every decision and ledger entry too.
    Raises ``ReadError`` saying what and which file."""
    from gatekeeper.store import open_store
    from gatekeeper.store.errors import StoreError, UnsupportedDatabase
    from gatekeeper.store.history import read_history, read_rulesets

    read: list[tuple[History, dict[str, Any]]] = []

    async def read_all() -> None:  # returns nothing: asyncio would repr a large result
        store = await open_store(database, read_only=True)
        try:
            history = await read_history(store, every_decision=self_check, ledger=self_check)
            read.append((history, await read_rulesets(store, history)))
        finally:
            await store.close()

    try:
        asyncio.run(read_all())
    except (StoreError, UnsupportedDatabase) as error:
        raise ReadError(f"cannot read the database: {error}") from None
    return read[0]


def _token(variable: str | None) -> str | None:
    """The token in environment variable ``variable`` (None: the clients' default,
    ``GATEKEEPER_TOKEN``); ``ReadError`` when the variable named is not set."""
    if variable is None:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ReadError(f"--token-env {variable}: the variable is not set")
    return token


def read_daemon(url: str, token: str | None) -> tuple[History, dict[str, Any]]:
    """The history a running daemon at ``url`` serves (``GET /v1/history/facts``,
    ``/v1/history/decisions``, ``/v1/audit``, ``/v1/rulesets``), as ``read_database``
    reads a database. Raises ``ReadError`` when the daemon cannot be read."""
    from gatekeeper.cli.client import ClientError
    from gatekeeper.store.history import read_history, read_rulesets

    read: list[tuple[History, dict[str, Any]]] = []

    async def read_all() -> None:
        api = ApiHistory(url, token)
        history = await read_history(api)
        read.append((history, await read_rulesets(api, history)))

    try:
        asyncio.run(read_all())
    except (ClientError, KeyError, TypeError, ValueError) as error:
        raise ReadError(f"cannot read the history of {url}: {error}") from None
    return read[0]


class ApiHistory:
    """The Store reads a history is read with (``store.history.HistoryReads``), through a
    daemon's HTTP API. Each page of decisions brings the actions they queued and their
    fact log positions, kept for ``actions_of_decisions`` and ``fact_log_positions``;
    the admin acts and ruleset versions come whole at the first call.

    Each answer is decoded with the wire model the daemon encodes it with
    (``gatekeeper.http.models``: closed objects, so an answer that does not fit raises
    ``msgspec.ValidationError``, a ``ValueError``), then turned back into the store record
    the daemon encoded (``wire_record``): each shape is written once."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self._actions: list[OutboxEntry] = []
        self._positions: dict[int, int] = {}
        self._movements: list[LedgerMovement] | None = None

    def _get(self, path: str, model: type[W]) -> W:
        from gatekeeper.cli.client import call

        return wire(call(self.url + path, token=self.token), model)

    def _pages(self, path: str, key: str, model: type[W]) -> list[W]:
        """Every page of the listing at ``path`` (``call_pages``), its ``key`` rows as
        ``model``."""
        from gatekeeper.cli.client import call_pages

        return wire(call_pages(self.url + path, key, self.token)[key], list[model])  # type: ignore[valid-type]

    async def fact_log(self, after_seq: int = 0, limit: int = 1000) -> list[LoggedFact]:
        from gatekeeper.http.models import HistoryFacts
        from gatekeeper.store.records import LoggedFact

        path = f"/v1/history/facts?after={after_seq}&limit={min(limit, 1000)}"
        return [wire_record(f, LoggedFact) for f in self._get(path, HistoryFacts).facts]

    async def decision_log(
        self,
        after_id: int = 0,
        limit: int = 1000,
        *,
        evaluations: bool = True,
        quiet: bool = True,
    ) -> list[StoredDecision]:
        from gatekeeper.http.models import HistoryDecisions
        from gatekeeper.store.records import OutboxEntry, StoredDecision

        every = "true" if quiet else "false"
        page = self._get(
            f"/v1/history/decisions?after={after_id}&limit={min(limit, 1000)}&every={every}",
            HistoryDecisions,
        )
        self._actions = [wire_record(a, OutboxEntry) for a in page.actions]
        self._positions.update({int(k): v for k, v in page.positions.items()})
        return [wire_record(d, StoredDecision, evaluation={}) for d in page.decisions]

    async def actions_of_decisions(self, first_id: int, last_id: int) -> list[OutboxEntry]:
        return [
            a
            for a in self._actions
            if a.decision_id is not None and first_id <= a.decision_id <= last_id
        ]

    async def fact_log_positions(self, decision_ids: Sequence[int]) -> dict[int, int]:
        return {i: self._positions[i] for i in decision_ids if i in self._positions}

    async def audit(self, query: AuditQuery) -> list[AuditEntry]:
        from gatekeeper.http import models
        from gatekeeper.store.records import AuditEntry

        if query.after is not None:
            return []  # the first call brought every page
        path = f"/v1/audit?kind={','.join(query.kinds)}&limit=1000"
        return [wire_record(e, AuditEntry) for e in self._pages(path, "entries", models.AuditEntry)]

    async def list_rulesets(
        self, limit: int = 100, *, after: RulesetCursor | None = None
    ) -> list[RulesetSummary]:
        from gatekeeper.http.models import RulesetVersion
        from gatekeeper.store.records import RulesetSummary

        if after is not None:
            return []  # the first call brought every page
        found = self._pages("/v1/rulesets?limit=1000", "rulesets", RulesetVersion)
        return [wire_record(r, RulesetSummary) for r in found]

    async def get_ruleset(self, version: str) -> StoredRuleset | None:
        from gatekeeper.http.models import RulesetText
        from gatekeeper.store.records import StoredRuleset

        return wire_record(self._get(f"/v1/rulesets/{version}", RulesetText), StoredRuleset)

    async def release_record(self, release_id: str) -> ReleaseRecord | None:
        raise ReadError("the self-check reads the database itself")

    async def ledger_movements(
        self,
        escrow: str | None = None,
        *,
        release_id: str | None = None,
        after: int = 0,
        limit: int = 1000,
        projects: Any = None,
    ) -> list[LedgerMovement]:
        """Every escrow's movements (``GET /v1/escrows``, then each one's
        ``/entries``), read whole at the first call, in movement id order."""
        from gatekeeper.http import models
        from gatekeeper.store.records import LedgerMovement

        if self._movements is None:
            found: list[LedgerMovement] = []
            for row in self._get("/v1/escrows", models.EscrowList).escrows:
                name = urllib.parse.quote(row.escrow, safe="")
                path = f"/v1/escrows/{name}/entries?limit=1000"
                entries = self._pages(path, "entries", models.LedgerMovement)
                found += [wire_record(e, LedgerMovement) for e in entries]
            self._movements = sorted(found, key=lambda m: m.id)
        return [
            m
            for m in self._movements
            if m.id > after
            and (escrow is None or m.escrow == escrow)
            and (release_id is None or m.release_id == release_id)
        ][:limit]


W = TypeVar("W")
R = TypeVar("R")


def wire(value: Any, model: type[W]) -> W:
    """``value`` (an answer's parsed JSON) as the wire model ``model`` (a
    ``gatekeeper.http.models`` Struct, or a list of them). Raises
    ``msgspec.ValidationError`` (a ``ValueError``) naming the first place that does not
    fit: a missing or unknown key, a wrong type."""
    import msgspec

    return msgspec.convert(value, model)


def wire_record(row: Any, record: type[R], **extra: Any) -> R:
    """The store record ``record`` (a dataclass of ``gatekeeper.store.records``) that the
    daemon encoded as the wire model ``row`` (``http.models.convert``): the way back, field
    by field (times parsed from RFC 3339); a field the wire leaves out (unset) takes the
    record's default, ``extra`` gives those it never carries (a decision's evaluation).
    Raises ``msgspec.ValidationError`` when a field does not fit the record."""
    import msgspec

    return msgspec.convert({**msgspec.to_builtins(row), **extra}, record)


def _usage(message: str) -> int:
    print(f"gatekeeper backtest: {message}", file=sys.stderr)
    return EXIT_USAGE


class Report:
    """A backtest's report in each format."""

    def __init__(
        self,
        *,
        ruleset: Ruleset,
        rules_dir: Path,
        database: str,
        since: datetime | None,
        until: datetime | None,
        events: int,
        diff: BacktestDiff,
        skipped: dict[str, int],
        fail_on: FailOn,
    ) -> None:
        self.ruleset = ruleset
        self.rules_dir = rules_dir
        self.database = database
        self.since = since
        self.until = until
        self.events = events
        self.diff = diff
        self.skipped = skipped
        self.fail_on = fail_on
        self.rules = ruleset.by_id()

    def to_json(self) -> dict[str, Any]:
        diff = self.diff
        return {
            "ruleset": {
                "dir": display_path(self.rules_dir),
                "version": self.ruleset.version,
                "rules": len(self.ruleset.rules),
            },
            "database": self.database,
            "window": {"since": _time(self.since), "until": _time(self.until)},
            "events": self.events,
            "firings": {"recorded": diff.recorded_count, "replayed": diff.replayed_count},
            "added": [f.to_json() for f in diff.added],
            "gone": [f.to_json() for f in diff.gone],
            "changed": [c.to_json() for c in diff.changed],
            "blocks": [b.to_json() for b in diff.blocks],
            "rules": diff.by_rule(),
            "escrows": [e.to_json() for e in diff.escrows],
            "skipped": dict(self.skipped),
            "fail_on": self.fail_on,
            "fails": diff.trips(self.fail_on),
        }

    def text(self) -> list[str]:
        diff = self.diff
        lines = [
            f"backtest of {display_path(self.rules_dir)} (ruleset {self.ruleset.version[:12]}, "
            f"{plural(len(self.ruleset.rules), 'rule')}) against {self.database}: "
            f"{plural(self.events, 'event')} replayed"
        ]
        if self.since or self.until:
            lines.append(
                f"window: from {_time(self.since) or 'the start'} "
                f"until {_time(self.until) or 'the end'}"
            )
        lines.append(
            f"firings compared: {diff.recorded_count} recorded, {diff.replayed_count} replayed"
        )
        if diff.added:
            lines.append(f"firings added ({len(diff.added)}):")
            lines += [f"  + {_firing(f)}" for f in diff.added]
        if diff.gone:
            lines.append(f"firings gone ({len(diff.gone)}):")
            lines += [f"  - {_firing(f)}" for f in diff.gone]
        if diff.changed:
            lines.append(f"actions changed ({len(diff.changed)}):")
            for changed in diff.changed:
                lines.append(f"  ~ {changed.recorded.at} {changed.recorded.firing_id}:")
                lines += [
                    f"      {c.field}: {_value(c.old)} -> {_value(c.new)}" for c in changed.changes
                ]
        for title, blocks in (
            ("now blocked", diff.now_blocked),
            ("no longer blocked", diff.no_longer_blocked),
        ):
            if blocks:
                lines.append(f"firings {title} ({len(blocks)}):")
                lines += [f"  ~ {_block(b)}" for b in blocks]
        if not diff.empty:
            lines.append("per rule:")
            for name, counts in diff.by_rule().items():
                parts = [f"{n} {what}" for what, n in counts.items() if n]
                lines.append(f"  {name}: {', '.join(parts)}")
        if diff.escrows:
            lines.append("escrows (released in the window: recorded -> replayed):")
            for e in diff.escrows:
                lines.append(
                    f"  {e.escrow}: {e.recorded} -> {e.replayed} {e.currency} ({_signed(e.delta)})"
                )
        for what, count in sorted(self.skipped.items()):
            why = (
                "of a release the candidate does not make"
                if what == "return"
                else "the candidate refuses"
            )
            lines.append(f"skipped: {plural(count, what)} {why}")
        lines.append(self.summary())
        return lines

    def summary(self) -> str:
        diff = self.diff
        if diff.empty:
            text = "SUCCESS: no differences"
        else:
            text = f"{'FAILED' if diff.trips(self.fail_on) else 'DIFFERENCES'}: {diff.counts()}"
        return f"{text} (--fail-on {self.fail_on})"

    def github(self) -> list[str]:
        diff = self.diff
        lines = []
        for f in diff.added:
            lines.append(self._annotation(f, "would fire", f.releases or self.fail_on == "any"))
        for f in diff.gone:
            lines.append(
                self._annotation(f, "would no longer fire", f.releases or self.fail_on == "any")
            )
        for c in diff.changed:
            what = "; ".join(f"{x.field}: {_value(x.old)} -> {_value(x.new)}" for x in c.changes)
            trips = self.fail_on == "any" or (self.fail_on == "release" and c.money)
            lines.append(self._line(trips, c.replayed, f"would change: {what}"))
        for b in diff.blocks:
            trips = self.fail_on == "any" or (self.fail_on == "release" and b.money)
            lines.append(self._line(trips, b.replayed, f"at {b.recorded.at}: {_block_what(b)}"))
        for e in diff.escrows:
            if e.delta:
                lines.append(
                    workflow_command(
                        "error" if self.fail_on != "none" else "warning",
                        f"escrow {e.escrow} would release {_signed(e.delta)} {e.currency} "
                        f"({e.recorded} -> {e.replayed})",
                        title=TITLE,
                    )
                )
        lines.append(self.summary())
        return lines

    def _annotation(self, firing: FiringRecord, verb: str, money: bool) -> str:
        trips = self.fail_on == "any" or (self.fail_on == "release" and money)
        return self._line(trips, firing, f"{verb} at {firing.at}: {_actions(firing)}")

    def _line(self, trips: bool, firing: FiringRecord, message: str) -> str:
        level = "error" if trips else "warning"
        text = f"rule {firing.name} ({firing.firing_id}) {message}"
        rule = self.rules.get(firing.rule_id)
        if rule is None:
            return workflow_command(level, text, title=TITLE)
        return workflow_command(
            level, text, file=rule_path(self.rules_dir, rule), line=rule.line, title=TITLE
        )


def _firing(f: FiringRecord) -> str:
    text = f"{f.at} {f.firing_id} {f.outcome}: {_actions(f)}"
    return text + (f" ({f.reason})" if f.reason else "")


def _block(b: BlockChange) -> str:
    """A ``BlockChange`` on one line: when, the firing id, what changed and the actions of
    the side that fired."""
    return f"{b.recorded.at} {b.replayed.firing_id}: {_block_what(b)}"


def _block_what(b: BlockChange) -> str:
    """What changed and what the side that fired did: ``release now blocked: <why> (was:
    <actions>)`` or ``release no longer blocked (would now: <actions>)``."""
    return f"{b.what} ({'was' if b.now_blocked else 'would now'}: {_actions(b.fired)})"


def _actions(f: FiringRecord) -> str:
    """A firing's actions on one line (``describe_action``), or ``no actions``."""
    return "; ".join(describe_action(a) for a in f.actions) or "no actions"


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _signed(amount: Any) -> str:
    return f"+{amount}" if amount > 0 else str(amount)


def _time(when: datetime | None) -> str | None:
    return None if when is None else format_rfc3339(when)


__all__ = ["add_backtest_parser", "run_backtest_command"]
