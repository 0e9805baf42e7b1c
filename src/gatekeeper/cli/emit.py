"""``gatekeeper emit``: post one fact to a running daemon from a Makefile or a CI script.

::

    gatekeeper emit --project tower-a --kind task --id T-17 --set status=completed
    gatekeeper emit --project tower-a --kind build --id docs-main \\
        --data '{"status": "failed", "log": "https://ci.example/runs/42"}' --strict

The daemon's URL comes from ``$GATEKEEPER_URL`` (default ``http://127.0.0.1:8080``, or
``--url``), its API token from ``$GATEKEEPER_TOKEN`` (sent as ``Authorization: Bearer``
when set; it needs the ``facts:write`` scope for the project).

- One ``Idempotency-Key`` is made per invocation (or given with ``--idempotency-key``) and
  sent with every retry, so a retry after a lost answer applies nothing twice: the daemon
  replays its first answer (``POST /v1/facts``, see the README).
- Connection errors, timeouts, 408, 429 and 5xx are retried ``--retries`` times with
  exponential backoff (``--backoff-s``, doubled each time, with jitter: between half and
  all of it); a longer ``Retry-After`` (seconds or an HTTP-date) is honoured up to
  ``MAX_RETRY_AFTER_S`` (``gatekeeper.delivery.retry``).
- By default emit never fails the build that calls it: when the daemon cannot be reached,
  or refuses the fact (a 4xx: a bad kind or id, a token without the scope), it prints a
  warning or the error on stderr and exits 0. ``--strict`` makes those exit 1.
- Exit 2 is a usage error of emit's own arguments (``--data`` not a JSON object,
  ``--set`` without ``=``), found before anything is sent.

``python -m gatekeeper.cli.emit`` runs this command on its own.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.delivery.retry import backoff_delay_s, parse_retry_after, retry_delay_s

URL_ENV = "GATEKEEPER_URL"
"""The environment variable holding the daemon's base URL."""
TOKEN_ENV = "GATEKEEPER_TOKEN"
"""The environment variable holding the API token (the same one the other clients read)."""
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_RETRY_AFTER_S = 30.0
BACKOFF_JITTER = 0.5
"""Each delay is between half and all of ``--backoff-s`` doubled per attempt."""
RETRYABLE_STATUS = frozenset({408, 429})
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "gatekeeper emit"


class UsageError(ValueError):
    """An argument of emit itself is wrong (exit 2)."""


@dataclass(frozen=True)
class EmitOutcome:
    """How posting went: ``ok`` (accepted), else ``refused`` (a 4xx, retrying cannot help)
    or unreachable (retries used up); ``message`` says what happened, ``answer`` is the
    daemon's JSON answer when accepted."""

    ok: bool
    attempts: int
    message: str
    refused: bool = False
    answer: Mapping[str, Any] | None = None


def add_emit_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``emit`` subcommand to the ``gatekeeper`` parser's ``commands``."""
    parser = commands.add_parser(
        "emit",
        help="post one fact to a running daemon (for Makefiles and CI scripts)",
        description=(
            "Post one fact to the daemon at $GATEKEEPER_URL (default "
            f"{DEFAULT_URL}) with the token in $GATEKEEPER_TOKEN, retrying with backoff. "
            "Never fails the calling build unless --strict: an unreachable daemon or a "
            "refused fact is a warning on stderr and exit 0."
        ),
    )
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, help="the fact's project, e.g. tower-a")
    parser.add_argument("--kind", required=True, help="the fact's kind, e.g. task or build")
    parser.add_argument("--id", required=True, dest="fact_id", help="the fact's id, e.g. T-17")
    parser.add_argument("--data", help='the fact\'s data, a JSON object: \'{"status": "done"}\'')
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="set_fields",
        metavar="KEY=VALUE",
        help=(
            "a data field (repeat for several; wins over --data). true, false, null and "
            "integers are typed; any other value is a string"
        ),
    )
    parser.add_argument(
        "--url", help=f"the daemon's base URL (default: ${URL_ENV}, else {DEFAULT_URL})"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the fact could not be posted (default: warn and exit 0)",
    )
    parser.add_argument(
        "--retries", type=_count, default=3, help="retries after the first attempt (default 3)"
    )
    parser.add_argument(
        "--timeout-s", type=_seconds, default=5.0, help="seconds per attempt (default 5)"
    )
    parser.add_argument(
        "--backoff-s",
        type=_seconds,
        default=0.5,
        help="delay before the first retry, doubled for each next one (default 0.5)",
    )
    parser.add_argument(
        "--idempotency-key",
        help="the Idempotency-Key to send (default: a fresh one for this invocation)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(config=None)  # no config file: emit reads the environment


def run_emit(args: argparse.Namespace) -> int:
    """Run ``gatekeeper emit`` with parsed ``args``; return the exit code (0 posted, or not
    posted without ``--strict``; 1 not posted with ``--strict``; 2 usage error)."""
    return _run(args, os.environ, sys.stdout, sys.stderr)


def _run(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    try:
        fact = build_fact(args.project, args.kind, args.fact_id, args.data, args.set_fields)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=err)
        return EXIT_USAGE
    url = (args.url or environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    outcome = post_fact(
        url,
        fact,
        token=environ.get(TOKEN_ENV) or None,
        idempotency_key=args.idempotency_key or f"emit-{uuid.uuid4().hex}",
        retries=args.retries,
        timeout_s=args.timeout_s,
        backoff_s=args.backoff_s,
        sleep=sleep,
    )
    name = f"{args.project}/{args.kind}/{args.fact_id}"
    if outcome.ok:
        if not args.quiet:
            seqs = (outcome.answer or {}).get("seqs") or []
            seq = f" (seq {seqs[0]})" if seqs else ""
            print(f"{PROG}: fact {name} accepted{seq}", file=out)
        return EXIT_OK
    if outcome.refused:
        print(f"{PROG}: error: fact {name} refused: {outcome.message}", file=err)
    else:
        tries = f"{outcome.attempts} attempt{'s' if outcome.attempts != 1 else ''}"
        print(f"{PROG}: warning: fact {name} not posted after {tries}: {outcome.message}", file=err)
    if args.strict:
        return EXIT_FAILED
    print(f"{PROG}: continuing without it (use --strict to fail instead)", file=err)
    return EXIT_OK


def build_fact(
    project: str, kind: str, fact_id: str, data: str | None, fields: Sequence[str]
) -> dict[str, Any]:
    """The fact to post: ``data`` (a JSON object text) updated with ``KEY=VALUE`` ``fields``.

    Raises ``UsageError`` when ``data`` is not a JSON object or a field has no ``=``. The
    daemon checks the rest (kind and id syntax, sizes) and says what is wrong."""
    values: dict[str, Any] = {}
    if data is not None:
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise UsageError(f"--data is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise UsageError(f"--data must be a JSON object ({{...}}), not {type(parsed).__name__}")
        values.update(parsed)
    for field in fields:
        key, equals, value = field.partition("=")
        if not equals or not key:
            raise UsageError(f"--set {field!r}: expected KEY=VALUE")
        values[key] = _typed(value)
    return {"project": project, "kind": kind, "id": fact_id, "data": values}


def _typed(value: str) -> Any:
    """``true``/``false``/``null`` and integers as JSON values, anything else as the string
    (so ``1.10`` or ``007`` stay as written)."""
    if value in ("true", "false", "null"):
        return json.loads(value)
    if value.lstrip("-").isdigit() and value == str(int(value)):
        return int(value)
    return value


def post_fact(
    url: str,
    fact: Mapping[str, Any],
    *,
    token: str | None,
    idempotency_key: str,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    clock: Clock | None = None,
) -> EmitOutcome:
    """POST ``fact`` to ``{url}/v1/facts``, retrying connection errors, timeouts, 408, 429
    and 5xx up to ``retries`` times; every attempt sends the same body and
    ``Idempotency-Key``. Never raises for network or HTTP trouble: the outcome says.
    ``timeout_s`` and ``backoff_s`` are seconds; ``clock`` (the system clock by default)
    dates an HTTP-date ``Retry-After``."""
    rng = rng or random.Random()
    clock = clock or SystemClock()
    body = json.dumps(fact, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Idempotency-Key": idempotency_key,
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = f"{url}/v1/facts"
    message = ""
    for attempt in range(1, retries + 2):
        retry_after: float | None = None
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = _json_or_empty(response.read())
                return EmitOutcome(True, attempt, "accepted", answer=answer)
        except urllib.error.HTTPError as exc:
            message = f"HTTP {exc.code} from {endpoint}: {_error_message(exc)}"
            if exc.code not in RETRYABLE_STATUS and exc.code < 500:
                return EmitOutcome(False, attempt, message, refused=True)
            retry_after = _retry_after(exc, clock.now())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            message = f"cannot reach gatekeeper at {url}: {reason}"
        if attempt <= retries:
            backoff = backoff_delay_s(
                attempt, base_s=backoff_s, cap_s=math.inf, rng=rng, jitter=BACKOFF_JITTER
            )
            sleep(retry_delay_s(backoff, retry_after, MAX_RETRY_AFTER_S))
    return EmitOutcome(False, retries + 1, message)


def _json_or_empty(raw: bytes) -> Mapping[str, Any]:
    try:
        answer = json.loads(raw)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The daemon's error message and problems (``{"error": {"message", "problems"}}``)."""
    try:
        error = json.loads(exc.read())["error"]
        text = str(error["message"])
        problems = error.get("problems") or []
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
    details = "; ".join(f"{p.get('path', '$')}: {p.get('message', '')}" for p in problems)
    return f"{text} ({details})" if details else text


def _retry_after(exc: urllib.error.HTTPError, now: datetime) -> float | None:
    """The answer's ``Retry-After`` in seconds from ``now`` (None when absent or unusable)."""
    return parse_retry_after(exc.headers.get("Retry-After"), now)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gatekeeper.cli.emit ...``: the same as ``gatekeeper emit ...``."""
    parser = argparse.ArgumentParser(prog=PROG, description="Post one fact to a running daemon.")
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run_emit(args)


if __name__ == "__main__":
    sys.exit(main())
