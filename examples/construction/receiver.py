"""A webhook receiver for the example: prints every request gatekeeper sends and verifies
its Standard Webhooks signature with the spec's own ``standardwebhooks`` library.

Run it alone (the README tour) with the same secret the daemon signs with:

    WEBHOOK_SECRET=whsec_... python examples/construction/receiver.py --port 8090

Every path is accepted (``/bank``, ``/chat``, ``/ci`` ...). A request whose signature does not
verify is answered 401 and printed as such. A release is deduplicated on its
``Idempotency-Key``, as a bank would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request as received: path, headers, parsed body, whether its signature held."""

    path: str
    headers: dict[str, str]
    body: Any
    verified: bool
    duplicate: bool = False


@dataclass
class Receiver:
    """Records what arrives; ``verify_with`` is the shared Standard Webhooks secret."""

    verify_with: str
    received: list[Received] = field(default_factory=list)
    quiet: bool = False
    _idempotency_keys: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.text()
        headers = dict(request.headers)
        try:
            Webhook(self.verify_with).verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        body = json.loads(raw) if raw else None
        key = headers.get("Idempotency-Key")
        duplicate = key is not None and key in self._idempotency_keys
        if key is not None and verified:
            self._idempotency_keys.add(key)
        entry = Received(request.path, headers, body, verified, duplicate)
        self.received.append(entry)
        if not self.quiet:
            print(describe(entry), flush=True)
        if not verified:
            return web.json_response({"error": "bad signature"}, status=401)
        return web.json_response({"ok": True, "duplicate": duplicate})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        return app


def describe(entry: Received) -> str:
    """One line for a received request: signature check, path, and what it asks for."""
    mark = "signature OK " if entry.verified else "BAD SIGNATURE"
    body = entry.body if isinstance(entry.body, dict) else {}
    kind = body.get("type", "slack" if "text" in body else "?")
    if kind == "release":
        what = (
            f"release {body['amount']} {body['currency']} from {body['escrow']} to "
            f"{body['payee']} (release_id {body['release_id']}, rule {body['rule_id']})"
        )
    elif kind in ("notify", "slack"):
        what = f"notify: {body.get('message', body.get('text'))}"
    elif kind == "pipeline":
        what = f"pipeline ref={body['ref']} inputs={body['inputs']} (rule {body['rule_id']})"
    else:
        what = json.dumps(body)
    dup = " [duplicate Idempotency-Key, ignored]" if entry.duplicate else ""
    return f"[receiver] {mark} POST {entry.path}: {what}{dup}"


async def _serve(port: int, secret: str) -> None:
    receiver = Receiver(secret)
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"[receiver] listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        print("set WEBHOOK_SECRET to the secret gatekeeper signs with", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
