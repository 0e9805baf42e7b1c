"""Command-line clients of a running daemon's HTTP API (``gatekeeper actions ...``).

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

from gatekeeper.config import Config

TIMEOUT_S = 10.0
TOKEN_ENV = "GATEKEEPER_TOKEN"
"""The environment variable the command-line clients read their API token from."""


class ClientError(Exception):
    """The daemon could not be reached or refused the request; the message says which."""


def base_url(config: Config, given: str | None) -> str:
    """``given`` or ``http://<listen host>:<listen port>``, without a trailing slash."""
    if given:
        return given.rstrip("/")
    host = config.listen_host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.listen_port}"


def call(url: str, method: str = "GET", body: Any = None) -> Any:
    """One JSON request; raises ``ClientError`` with the daemon's error message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    token = os.environ.get(TOKEN_ENV)
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
        raise ClientError(f"HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach gatekeeper at {url}: {reason}") from None


def run_actions_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper actions list|retry``; returns the exit code (0 ok, 1 failed)."""
    url = base_url(config, args.url)
    try:
        if args.actions_command == "list":
            return _list(url, args)
        return _retry(url, args)
    except ClientError as exc:
        print(f"gatekeeper actions: {exc}", file=sys.stderr)
        return 1


def run_rules_command(args: argparse.Namespace, config: Config) -> int:
    """``gatekeeper rules pause|resume|rearm RULE --reason ...``; 0 done, 1 refused."""
    url = base_url(config, args.url)
    path = f"{url}/v1/rules/{urllib.parse.quote(args.rule_id, safe='/')}/{args.rules_command}"
    try:
        view = call(path, "POST", {"reason": args.reason})
    except ClientError as exc:
        print(f"gatekeeper rules {args.rules_command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        state = "paused" if view["explanation"]["paused"] else "active"
        print(
            f"{view['id']}: {args.rules_command} done; {state}, fired {view['fired_count']} "
            f"time(s), gate {'open' if view['explanation']['gate_open'] else 'closed'}"
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
