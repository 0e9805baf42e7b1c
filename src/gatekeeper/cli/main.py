"""The ``gatekeeper`` command (also ``python -m gatekeeper``).

Exit codes: 0 success (``check``: valid), 1 failure (``check``: invalid), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatekeeper import __version__
from gatekeeper.config import Config, ConfigError, Tls, find_default_config, load_config
from gatekeeper.http.auth import SCOPES

if TYPE_CHECKING:
    import ssl

    from gatekeeper.runtime.daemon import Daemon

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("gatekeeper")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="gatekeeper",
        description="Gate escrow releases, notifications and CI/CD pipelines on facts.",
    )
    parser.add_argument("--version", action="version", version=f"gatekeeper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. One daemon per database file: it holds <database>.lock "
        "while it runs. A new database is created only where no file exists; an existing "
        "file must be a gatekeeper database (an empty file or another application's is "
        "refused). SIGHUP reloads the config's reloadable parts and the rules, as an edit "
        "does.",
    )
    _add_config_option(serve)
    serve.add_argument("--listen", help="HOST:PORT to listen on (overrides the config)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not watch the rules directory and config: reload only on SIGHUP (for "
        "deployments that replace the rules as a whole and then signal)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line (time, level, logger, message, fields)",
    )

    check = commands.add_parser("check", help="validate rule files (dry run, for CI)")
    _add_config_option(check)
    check.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders")
    check.add_argument("--format", choices=["text", "json", "github"], default="text")

    from gatekeeper.cli.backtest import add_backtest_parser
    from gatekeeper.cli.copydb import add_copy_db_parser
    from gatekeeper.cli.emit import add_emit_parser
    from gatekeeper.cli.plan import add_explain_parser, add_plan_parser
    from gatekeeper.cli.ruletest import add_test_parser

    add_emit_parser(commands)
    add_test_parser(commands)
    add_plan_parser(commands)
    add_explain_parser(commands)
    add_backtest_parser(commands)
    add_copy_db_parser(commands)

    token = commands.add_parser("token", help="API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    new = token_commands.add_parser(
        "new", help="print a fresh token (once) and the gatekeeper.yaml entry holding its hash"
    )
    new.add_argument("--subject", required=True, help="who holds it (the approver name)")
    new.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        help="repeat for several",
    )
    new.add_argument(
        "--project", action="append", help="repeat for several (default: every project)"
    )

    actions = commands.add_parser("actions", help="the outbox of a running daemon")
    actions_commands = actions.add_subparsers(dest="actions_command", required=True)
    listing = actions_commands.add_parser("list", help="list queued, delivered and dead actions")
    listing.add_argument(
        "--status", choices=["pending", "delivered", "dead", "shadowed", "cancelled"]
    )
    listing.add_argument("--limit", type=int, default=100)
    retry = actions_commands.add_parser("retry", help="requeue dead letters")
    retry.add_argument("action_ids", nargs="+", metavar="ACTION_ID")
    retry.add_argument("--reason", help="why (kept in the audit log)")
    cancel = actions_commands.add_parser(
        "cancel",
        help="cancel releases before they are sent (pending or dead): never sent, their "
        "amounts back in their escrows",
    )
    cancel.add_argument("action_ids", nargs="+", metavar="ACTION_ID")
    cancel.add_argument("--reason", required=True, help="why (kept in the audit log)")
    escrows = commands.add_parser(
        "escrows",
        help="a running daemon's escrows, or one escrow's ledger movements",
        description="Without ESCROW: each escrow's limit, reserved, sent, settled, returned "
        "and remaining. With ESCROW: every ledger movement of it, oldest first (reserve, "
        "send, settle, fail, cancel, return, reclaim), to reconcile line by line.",
    )
    escrows.add_argument("escrow", nargs="?", metavar="ESCROW")
    rules = commands.add_parser("rules", help="admin acts on a running daemon's rules")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    rule_acts = []
    for act, text in (
        ("pause", "evaluate and explain the rule, but do not fire it"),
        ("resume", "let a paused rule fire again"),
        ("rearm", "let a once rule that fired fire once more"),
    ):
        parser_act = rules_commands.add_parser(act, help=text)
        parser_act.add_argument("rule_id", metavar="RULE")
        parser_act.add_argument("--reason", required=True, help="why (kept in the audit log)")
        parser_act.add_argument(
            "--item", help="only this instance (item id) of a per-item rule (for_each)"
        )
        rule_acts.append(parser_act)
    signoff = rules_commands.add_parser(
        "signoff",
        help="sign off a money rule's content hash (the two-person rule, money_rule_approvals)",
    )
    signoff.add_argument("content_hash", metavar="HASH", help="the rule's content_hash")
    signoff.add_argument("--comment", help="why (kept in the audit log)")
    rule_acts.append(signoff)
    for sub in (listing, retry, cancel, escrows, *rule_acts):
        _add_client_options(sub)

    from gatekeeper.cli.client import add_audit_parsers

    add_audit_parsers(commands, _add_client_options)
    return parser


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    _add_config_option(parser)
    parser.add_argument(
        "--url", help="the daemon's base URL (default: from the config's listen address)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="gatekeeper.yaml (default: ./gatekeeper.yaml when present)",
    )


def _load_config(path: Path | None) -> Config:
    return load_config(path if path is not None else find_default_config(Path.cwd()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "token":
        return _new_token(args)
    if args.command == "emit":  # a client: reads GATEKEEPER_URL and GATEKEEPER_TOKEN
        from gatekeeper.cli.emit import run_emit

        emitted: int = run_emit(args)
        return emitted
    if args.command == "copy-db":  # two databases named on the command line, no config
        from gatekeeper.cli.copydb import run_copy_db_command

        copied: int = run_copy_db_command(args)
        return copied
    if args.command in ("test", "plan", "explain", "backtest"):  # they load their config
        from gatekeeper.cli.backtest import run_backtest_command
        from gatekeeper.cli.plan import run_explain, run_plan
        from gatekeeper.cli.ruletest import run_test

        runner = {
            "test": run_test,
            "plan": run_plan,
            "explain": run_explain,
            "backtest": run_backtest_command,
        }[args.command]
        exit_code: int = runner(args)
        return exit_code
    if args.config is not None and not args.config.is_file():
        print(f"gatekeeper: config file {args.config} not found", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = _load_config(args.config)
    except ConfigError as exc:
        print("gatekeeper: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE if args.command == "check" else EXIT_FAILED
    if args.command == "check":
        return _check(args, config)
    if args.command == "actions":
        from gatekeeper.cli.client import run_actions_command

        return run_actions_command(args, config)
    if args.command == "escrows":
        from gatekeeper.cli.client import run_escrows_command

        return run_escrows_command(args, config)
    if args.command == "rules":
        from gatekeeper.cli.client import run_rules_command

        return run_rules_command(args, config)
    if args.command in ("audit", "export"):
        from gatekeeper.cli.client import run_audit_command, run_export_command

        run = run_audit_command if args.command == "audit" else run_export_command
        return run(args, config)
    return _serve(args, config)


def _new_token(args: argparse.Namespace) -> int:
    from gatekeeper.http.auth import config_entry, new_token

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}", args.subject):
        print(f"gatekeeper token new: {args.subject!r} is not a valid subject", file=sys.stderr)
        return EXIT_USAGE
    token = new_token()
    projects = args.project or ["*"]
    print(f"token (shown once; give it to {args.subject}, keep it secret):")
    print(f"  {token}")
    print("gatekeeper.yaml entry (under tokens:):")
    print(config_entry(args.subject, token, sorted(set(args.scope)), projects))
    return EXIT_OK


def _check(args: argparse.Namespace, config: Config) -> int:
    from gatekeeper.cli.check import run_check

    paths: list[Path] = args.paths or [config.rules_dir]
    missing = [p for p in paths if not p.exists()]
    if missing:
        for path in missing:
            print(f"gatekeeper check: {path}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE
    exit_code: int = run_check(paths, config, args.format, sys.stdout)
    return exit_code


_LOG_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``,
    ``message``, the fields given with ``extra=`` (``request_id``, ``rule_id``,
    ``action_id``, ...), and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _LOG_RECORD_FIELDS and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str, log_format: str) -> None:
    """Log to stderr at ``level``, as text lines or JSON lines (``log_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _serve(args: argparse.Namespace, config: Config) -> int:
    setup_logging(args.log_level, args.log_format)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            print(f"gatekeeper serve: --listen must be HOST:PORT, got {args.listen!r}")
            return EXIT_USAGE
        from dataclasses import replace

        config = replace(config, listen_host=host, listen_port=int(port))
    if not config.tokens and not _is_loopback(config.listen_host):
        print(
            f"gatekeeper serve: refusing to listen on {config.listen_host}: no API tokens are "
            "configured, so only a loopback address (127.0.0.1, ::1, localhost) is allowed "
            "(see gatekeeper token new)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    loop_factory = event_loop_factory(os.environ.get(LOOP_ENV, "auto"))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve_async(config, watch=args.watch))


LOOP_ENV = "GATEKEEPER_EVENT_LOOP"
"""``auto`` (default): uvloop when it is installed, else asyncio's; ``asyncio``: always
asyncio's own loop; ``uvloop``: uvloop, or exit with an error when it is not installed."""


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``serve`` runs on (None: asyncio's default). uvloop (a
    dependency wherever it builds) takes about a fifth off the CPU of an ingested fact
    (bench/bench_ingest.py). Raises ``SystemExit`` for an unknown choice, or ``uvloop``
    when it is not installed."""
    if choice not in ("auto", "asyncio", "uvloop"):
        raise SystemExit(f"gatekeeper serve: {LOOP_ENV} must be auto, asyncio or uvloop")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                f"gatekeeper serve: {LOOP_ENV}=uvloop but uvloop is not installed"
            ) from None
        return None
    log.debug("serving on uvloop")
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def tls_context(tls: Tls) -> ssl.SSLContext:
    """A server ``SSLContext`` (TLS 1.2 at least, the stdlib's secure defaults) with the
    certificate chain and key of ``tls``. Raises ``OSError`` for an unreadable file and
    ``ssl.SSLError`` for a bad certificate or a key that does not match it."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _serve_async(config: Config, *, watch: bool = True) -> int:
    # the HTTP stack is imported only to serve: check, test and plan start faster without it
    from aiohttp import web

    from gatekeeper.http.app import create_app
    from gatekeeper.http.limits import (
        CONNECTIONS_KEY,
        KEEPALIVE_TIMEOUT_S,
        GuardedSite,
        effective_max_connections,
    )
    from gatekeeper.runtime.daemon import Daemon, StartupError
    from gatekeeper.store.errors import StoreError
    from gatekeeper.ui import mount as mount_status_page

    debug = log.isEnabledFor(logging.DEBUG)  # a traceback only with --log-level debug
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []
    serving: list[Daemon] = []
    reloads: set[asyncio.Task[None]] = set()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    def on_hangup() -> None:
        if not serving:
            log.info("SIGHUP ignored: still starting (the ruleset being loaded is current)")
            return
        task = loop.create_task(_reload_on_hangup(serving[0]), name="sighup-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # SIGHUP from the start: a daemon never dies of it, even while starting
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        daemon = Daemon(config, os.environ, watch=watch)
    except StoreError as exc:  # a database: no backend serves
        log.error("cannot start: %s", exc, exc_info=debug)
        return EXIT_FAILED
    # the application starts the daemon at setup and stops it at cleanup (cleanup_ctx)
    app = create_app(
        daemon,
        header_read_timeout_s=config.header_read_timeout_s,
        body_read_timeout_s=config.body_read_timeout_s,
        max_connections=config.max_connections,
    )
    mount_status_page(app)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.shutdown_grace_s,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,  # an idle kept-alive connection holds a place
    )
    try:
        await runner.setup()
    except (StartupError, StoreError) as exc:
        log.error("cannot start: %s", exc, exc_info=debug)
        return EXIT_FAILED
    except Exception as exc:  # anything else: still one line, an exit, no hang
        log.error("cannot start: %s: %s", type(exc).__name__, exc, exc_info=debug)
        return EXIT_FAILED
    try:
        ssl_context = tls_context(config.tls) if config.tls is not None else None
    except OSError as exc:  # ssl.SSLError included
        log.error("cannot start: TLS certificate or key: %s", exc)
        await runner.cleanup()
        return EXIT_FAILED
    connections = runner.app[CONNECTIONS_KEY]
    connections.max_connections = effective_max_connections(config.max_connections)
    site = GuardedSite(
        runner, config.listen_host, config.listen_port, connections, ssl_context=ssl_context
    )
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.listen_host, config.listen_port, exc)
        await runner.cleanup()
        return EXIT_FAILED
    log.info(
        "gatekeeper %s listening on %s://%s:%d (database %s, rules %s)",
        __version__,
        "https" if ssl_context else "http",
        config.listen_host,
        site.port,
        config.database,
        config.rules_dir,
    )
    serving.append(daemon)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    serving.clear()
    log.info("shutting down on %s", received[0] if received else "request")
    for task in list(reloads):
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
    await runner.cleanup()  # the requests in progress, then the daemon's stop()
    log.info(
        "shutdown complete: %d action(s) delivered, %d dead-lettered in this run",
        daemon.dispatcher.delivered,
        daemon.dispatcher.dead,
    )
    return EXIT_OK


async def _reload_on_hangup(daemon: Daemon) -> None:
    """SIGHUP: reload the rules and the config's reloadable parts, as the watcher does
    (all-or-nothing; listen and database changes wait for a restart)."""
    log.info("reloading the config and rules on SIGHUP")
    try:
        good = await daemon.reload()
    except Exception:
        log.exception("reload on SIGHUP failed; the last good ruleset stays active")
        return
    if good:
        log.info("reload on SIGHUP done")
    else:
        log.error("reload on SIGHUP refused; the last good ruleset stays active")
