"""A webhook receiver for the example: prints every request gatekeeper sends and verifies
its Standard Webhooks signature with the spec's own ``standardwebhooks`` library.

Run it alone (the README tour) with the same secret the daemon signs with:

    WEBHOOK_SECRET=whsec_... python examples/construction/receiver.py --port 8090

Every path is accepted (``/bank``, ``/chat``, ``/ci`` ...). A request whose signature does not
verify is answered 401 and printed as such. A release is deduplicated on its
``Idempotency-Key``, as a bank would. While ``bank_down`` is set, every request under
``/bank`` is answered 503 (gatekeeper retries it later). ``settle`` plays the bank's other
half: a Standard Webhooks signed settlement callback telling gatekeeper what became of a
release it was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request as received: path, headers, parsed body, whether its signature held,
    and the HTTP status it was answered with."""

    path: str
    headers: dict[str, str]
    body: Any
    verified: bool
    duplicate: bool = False
    status: int = 200


@dataclass
class Receiver:
    """Records what arrives; ``verify_with`` is the shared Standard Webhooks secret.
    ``bank_down``: answer every request under ``/bank`` with 503 (nothing is paid)."""

    verify_with: str
    received: list[Received] = field(default_factory=list)
    quiet: bool = False
    bank_down: bool = False
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
        down = self.bank_down and request.path.startswith("/bank")
        status = 401 if not verified else 503 if down else 200
        key = headers.get("Idempotency-Key")
        duplicate = key is not None and key in self._idempotency_keys
        if key is not None and status == 200:
            self._idempotency_keys.add(key)
        entry = Received(request.path, headers, body, verified, duplicate, status)
        self.received.append(entry)
        if not self.quiet:
            print(describe(entry), flush=True)
        if status == 401:
            return web.json_response({"error": "bad signature"}, status=401)
        if status == 503:
            return web.json_response({"error": "the bank is unavailable"}, status=503)
        return web.json_response({"ok": True, "duplicate": duplicate})

    async def settle(
        self, url: str, body: dict[str, str], webhook_id: str | None = None
    ) -> tuple[int, Any]:
        """Post the bank's settlement callback ``body`` (``{"release_id", "status":
        "settled" | "failed", "reference"[, "reason"]}``) to gatekeeper at ``url``
        (``<daemon>/v1/settlements/<target>``, no API token), signed per Standard Webhooks
        with this receiver's secret under ``webhook_id`` (a fresh one by default; the same id
        again is a replay). Returns the HTTP status and the parsed JSON answer."""
        raw = json.dumps(body)
        msg_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(self.verify_with).sign(msg_id, now, raw),
            "Content-Type": "application/json",
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=raw, headers=headers) as response,
        ):
            return response.status, await response.json()

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
    down = " -> 503, the bank is down" if entry.status == 503 else ""
    return f"[receiver] {mark} POST {entry.path}: {what}{dup}{down}"


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
