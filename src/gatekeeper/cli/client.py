"""Command-line clients of a running daemon's HTTP API (``gatekeeper actions ...``,
``rules ...``, ``escrows``, ``audit``, ``export``).

They talk HTTP rather than opening the database, so every write still goes through the
daemon's single writer. The URL defaults to the config's ``listen`` address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gatekeeper.cli.output import plural
from gatekeeper.config import Config

TIMEOUT_S = 10.0
TOKEN_ENV = "GATEKEEPER_TOKEN"
"""The environment variable the command-line clients read their API token from."""


class ClientError(Exception):
    """The daemon could not be reached or refused the request; the message says which.
    ``status`` is the HTTP status of a refusal (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def base_url(config: Config, given: str | None) -> str:
    """``given`` or ``http(s)://<listen host>:<listen port>`` (https when the config has
    ``tls``), without a trailing slash."""
    if given:
        return given.rstrip("/")
    host = config.listen_host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if config.tls is not None else "http"
    return f"{scheme}://{host}:{config.listen_port}"


def call_pages(url: str, key: str, token: str | None = None) -> dict[str, Any]:
    """A paged listing (``GET url``, then ``url?cursor=<next_cursor>`` until there is none)
    as one answer: the first page with the ``key`` lists of the others appended, without
    ``next_cursor``. Raises ``ClientError`` as ``call``, and for an answer that is not a
    page of ``key``."""
    answer = call(url, token=token)
    seen: set[str] = set()
    while True:
        if not isinstance(answer, dict) or not isinstance(answer.get(key), list):
            raise ClientError(f"{url} did not answer a list of {key}")
        cursor = answer.pop("next_cursor", None)
        if cursor is None:
            return answer
        if not isinstance(cursor, str) or cursor in seen:
            raise ClientError(f"{url} gave a bad next_cursor")
        seen.add(cursor)
        separator = "&" if "?" in url else "?"
        page = call(f"{url}{separator}cursor={urllib.parse.quote(cursor, safe='')}", token=token)
        if not isinstance(page, dict) or not isinstance(page.get(key), list):
            raise ClientError(f"{url} did not answer a list of {key}")
        answer[key].extend(page[key])
        answer["next_cursor"] = page.get("next_cursor")


def call(url: str, method: str = "GET", body: Any = None, token: str | None = None) -> Any:
    """One JSON request with ``token`` (default: ``$GATEKEEPER_TOKEN``); raises
    ``ClientError`` with the daemon's error message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ClientError(f"HTTP {exc.code}: {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach gatekeeper at {url}: {reason}") from None


def refusal_exit_code(exc: ClientError) -> int:
    """The exit code of a failed request: 2 when the daemon refused it as bad input (a 4xx:
    nothing changed), 1 when it could not be reached or failed (no answer, a 5xx)."""
    return 2 if exc.status is not None and 400 <= exc.status < 500 else 1


def run_actions_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper actions list|retry|cancel``; returns the exit code (0 ok, 1 failed; a
    cancel refused as bad input is 2)."""
    url = base_url(config, args.url)
    try:
        if args.actions_command == "list":
            return _list(url, args)
        if args.actions_command == "cancel":
            return _cancel(url, args)
        return _retry(url, args)
    except ClientError as exc:
        print(f"gatekeeper actions: {exc}", file=sys.stderr)
        return 1


def run_rules_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper rules pause|resume|rearm RULE --reason ... [--item ID]``; 0 done,
    1 refused. ``gatekeeper rules signoff HASH [--comment ...]``: see ``run_signoff``."""
    url = base_url(config, args.url)
    if args.rules_command == "signoff":
        return run_signoff(url, args)
    path = f"{url}/v1/rules/{urllib.parse.quote(args.rule_id, safe='/')}/{args.rules_command}"
    body = {"reason": args.reason, **({"item": args.item} if args.item else {})}
    try:
        view = call(path, "POST", body)
    except ClientError as exc:
        print(f"gatekeeper rules {args.rules_command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        state = "paused" if view["explanation"]["paused"] else "active"
        name = f"{view['id']}[{view['item']}]" if view.get("item") else view["id"]
        acted = ""
        if "acted_on" in view:  # a per-item rule as a whole
            verb = {"pause": "paused", "resume": "resumed"}.get(args.rules_command, "re-armed")
            acted = f", {plural(view['acted_on'], 'instance')} {verb}"
            if args.rules_command != "rearm":
                acted += f" of {view['instances']}"
        blocked = f"; blocked: {view['blocked']}" if view.get("blocked") else ""
        print(
            f"{name}: {args.rules_command} done{acted}; {state}, fired {view['fired_count']} "
            f"time(s), gate {'open' if view['explanation']['gate_open'] else 'closed'}{blocked}"
        )
    return 0


def run_signoff(url: str, args: argparse.Namespace) -> int:
    """``gatekeeper rules signoff HASH [--comment TEXT]``: sign off the money rule with that
    content hash, as the admin whose token is in ``GATEKEEPER_TOKEN``. Exit 0 signed off;
    2 refused as bad input (a 4xx: not a content hash, no such rule, not a money rule,
    signed by this admin before; nothing changed); 1 the daemon could not be reached or
    failed."""
    path = f"{url}/v1/money-rules/{urllib.parse.quote(args.content_hash, safe='')}/signoffs"
    body = {"comment": args.comment} if args.comment else {}
    try:
        view = call(path, "POST", body)
    except ClientError as exc:
        print(f"gatekeeper rules signoff: {exc}", file=sys.stderr)
        return refusal_exit_code(exc)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    status = view.get("signoff") or {}
    signed = ", ".join(s["actor"] for s in status.get("signed_by", []))
    missing = status.get("missing", 0)
    now = "it runs live from its next evaluation" if view["mode"] == "live" else view["mode"]
    more = f"{missing} more needed" if missing else now
    print(
        f"{view['id']} ({view['content_hash'][:12]}): signed off; "
        f"{len(status.get('signed_by', []))} of {status.get('required', 0)} ({signed}); {more}"
    )
    return 0


def _list(url: str, args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit), **({"status": args.status} if args.status else {})}
    answer = call(f"{url}/v1/actions?{urllib.parse.urlencode(query)}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for action in answer["actions"]:
        error = f"  last error: {action['last_error']}" if action["last_error"] else ""
        if action.get("dead_reason"):
            status = f" (HTTP {action['dead_status']})" if action.get("dead_status") else ""
            error = f"  dead: {action['dead_reason']}{status}{error}"
        print(
            f"{action['action_id']}  {action['status']:<9} {action['kind']:<8} "
            f"-> {action['target']}  rule {action['rule_id']}  "
            f"attempts {action['attempts']}{error}"
        )
    print(f"{len(answer['actions'])} action(s)")
    return 0


def _retry(url: str, args: argparse.Namespace) -> int:
    failed = 0
    for action_id in args.action_ids:
        path = f"{url}/v1/actions/{urllib.parse.quote(action_id, safe='')}/retry"
        try:
            answer = call(path, "POST", {"reason": args.reason} if args.reason else {})
        except ClientError as exc:
            print(f"{action_id}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(answer) if args.json else f"{action_id}: requeued")
    return 1 if failed else 0


def _cancel(url: str, args: argparse.Namespace) -> int:
    """Cancel each release; exit 0 all cancelled, 2 one was refused (a 4xx: delivered,
    unknown, not a release, an attempt in flight), 1 the daemon failed or was unreachable."""
    code = 0
    for action_id in args.action_ids:
        path = f"{url}/v1/actions/{urllib.parse.quote(action_id, safe='')}/cancel"
        try:
            answer = call(path, "POST", {"reason": args.reason})
        except ClientError as exc:
            print(f"{action_id}: {exc}", file=sys.stderr)
            code = max(code, refusal_exit_code(exc))
            continue
        if args.json:
            print(json.dumps(answer))
            continue
        payload = answer["action"]["payload"]
        print(
            f"{action_id}: cancelled; {payload.get('amount')} {payload.get('currency')} "
            f"back in {payload.get('escrow')}"
        )
    return code


ESCROW_FIGURES = ("limit", "reserved", "sent", "settled", "returned", "remaining")


def run_escrows_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper escrows [ESCROW]``: the escrows' figures, or every ledger movement of
    one escrow (all pages); 0 done, 1 the daemon refused or could not be reached."""
    url = base_url(config, args.url)
    try:
        if args.escrow is None:
            answer = call(f"{url}/v1/escrows")
        else:
            path = f"{url}/v1/escrows/{urllib.parse.quote(args.escrow, safe='')}/entries"
            answer = call_pages(path, "entries")
    except ClientError as exc:
        print(f"gatekeeper escrows: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if args.escrow is None:
        for escrow in answer["escrows"]:
            figures = ", ".join(
                f"{name} {escrow[name]}" for name in ESCROW_FIGURES if escrow[name] is not None
            )
            print(f"{escrow['escrow']} ({escrow['currency'] or 'not configured'}): {figures}")
        print(f"{plural(len(answer['escrows']), 'escrow')}")
        return 0
    for entry in answer["entries"]:
        extra = "".join(
            f"  {name} {entry[name]}"
            for name in ("actor", "reference", "reason")
            if entry.get(name)
        )
        print(
            f"{entry['id']:>6}  {entry['at']}  {entry['movement']:<7} {entry['amount']:>12} "
            f"{entry['currency']}  {entry['release_id']}{extra}"
        )
    print(f"{plural(len(answer['entries']), 'movement')}")
    return 0


def add_audit_parsers(commands: Any, add_client_options: Any) -> None:
    """``gatekeeper audit`` and ``gatekeeper export`` (clients of a running daemon)."""
    audit = commands.add_parser("audit", help="the audit log of a running daemon")
    audit.add_argument("--release", metavar="RELEASE_ID", help="the whole story of a release")
    audit.add_argument("--rule", help="only this rule")
    audit.add_argument(
        "--item", help="only entries about this instance (item id) of a per-item rule"
    )
    audit.add_argument("--project", help="only this project")
    audit.add_argument("--kind", help="decision, admin_act, approval (comma-separated)")
    audit.add_argument("--outcome", help="only decisions with this outcome, e.g. fired")
    audit.add_argument("--since", help="from this RFC 3339 time")
    audit.add_argument("--until", help="before this RFC 3339 time")
    audit.add_argument("--limit", type=int, default=100)
    export = commands.add_parser(
        "export", help="a snapshot of a running daemon's state (what plan --snapshot reads)"
    )
    export.add_argument("-o", "--output", help="write to this file (default: standard output)")
    for parser in (audit, export):
        add_client_options(parser)


def run_audit_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper audit [filters] | --release ID``; 0 done, 1 the daemon refused."""
    url = base_url(config, args.url)
    try:
        if args.release:
            path = f"{url}/v1/releases/{urllib.parse.quote(args.release, safe='')}"
            print(json.dumps(call(path), indent=2))
            return 0
        query = {
            key: value
            for key, value in (
                ("rule", args.rule),
                ("item", args.item),
                ("project", args.project),
                ("kind", args.kind),
                ("outcome", args.outcome),
                ("since", args.since),
                ("until", args.until),
                ("limit", str(args.limit)),
            )
            if value
        }
        page = call(f"{url}/v1/audit?{urllib.parse.urlencode(query)}")
    except ClientError as exc:
        print(f"gatekeeper audit: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for entry in page["entries"]:
        who = f" by {entry['actor']}" if entry["actor"] else ""
        why = f": {entry['reason']}" if entry["reason"] else ""
        rule = entry["rule_id"]
        if entry.get("instance"):
            rule = f"{rule}[{entry['instance']}]"
        what = entry["what"]
        if entry.get("instances") is not None:  # an act on a per-item rule as a whole
            what = f"{what} ({plural(entry['instances'], 'instance')})"
        if entry.get("rule_hash"):  # a sign-off: of which content hash
            what = f"{what} {entry['rule_hash'][:12]}"
        print(f"{entry['at']}  {entry['kind']:<9} {rule}  {what}{who}{why}")
    more = (
        " (more: narrow the filters or use --json for next_cursor)" if page["next_cursor"] else ""
    )
    print(f"{len(page['entries'])} entr{'y' if len(page['entries']) == 1 else 'ies'}{more}")
    return 0


def run_export_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper export [-o FILE]``: GET /v1/export, every page, as one JSON snapshot;
    0 done, 1 failed."""
    try:
        snapshot = call_pages(f"{base_url(config, args.url)}/v1/export", "facts")
    except ClientError as exc:
        print(f"gatekeeper export: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(snapshot, indent=2) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0
