"""The example end to end: a construction project's facts fire signed escrow releases,
notifications and a CI pipeline.

    python examples/construction/demo.py

What it does, all on 127.0.0.1 and in a temporary folder (your files are not touched):

1. runs ``gatekeeper check`` on the bundled ``rules/`` against the example ``gatekeeper.yaml``;
2. starts the example receiver (``receiver.py``, which verifies every Standard Webhooks
   signature) and the daemon (``gatekeeper serve``) with a fresh random signing secret;
3. posts the facts of ``facts.json`` step by step, showing what each step fires;
4. restarts the daemon and posts the design approval again, to show that a ``fire: once``
   release is never sent twice;
5. stops the daemon with SIGTERM and exits 0 only if every expectation in ``facts.json`` held.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from receiver import Receiver
from serve import free_port, start_daemon, stop_daemon

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SECRET_VARIABLES = ("ESCROW_BANK_SECRET", "CHAT_SECRET", "CI_WEBHOOK_SECRET")


def write_config(folder: Path, daemon_port: int, receiver_port: int) -> Path:
    """The example gatekeeper.yaml, moved to free ports and a database in ``folder``."""
    config = yaml.safe_load((REPO / "gatekeeper.yaml").read_text())
    config["listen"] = f"127.0.0.1:{daemon_port}"
    config["database"] = str(folder / "gatekeeper.db")
    config["rules_dir"] = str(REPO / "rules")
    for target in config["targets"].values():
        target["url"] = target["url"].replace("127.0.0.1:8090", f"127.0.0.1:{receiver_port}")
    path = folder / "gatekeeper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def kinds(receiver: Receiver) -> Counter[str]:
    """How many verified requests of each kind arrived (a Slack body counts as notify)."""
    counts: Counter[str] = Counter()
    for entry in receiver.received:
        if entry.verified and not entry.duplicate:
            body = entry.body if isinstance(entry.body, dict) else {}
            counts[body.get("type", "notify")] += 1
    return counts


class Demo:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.daemon_port = free_port()
        self.receiver_port = free_port()
        self.config = write_config(folder, self.daemon_port, self.receiver_port)
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.env = {**os.environ, **dict.fromkeys(SECRET_VARIABLES, secret)}
        self.receiver = Receiver(secret)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.failures: list[str] = []
        self.url = f"http://127.0.0.1:{self.daemon_port}"

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def check_rules(self) -> None:
        self.say(f"gatekeeper check {REPO / 'rules'}")
        command = [sys.executable, "-m", "gatekeeper", "check", "-c", str(self.config)]
        result = subprocess.run(command, env=self.env, check=False)
        if result.returncode != 0:
            self.failures.append("gatekeeper check failed on the bundled rules")

    async def start_daemon(self, session: aiohttp.ClientSession) -> None:
        command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(self.config)]
        self.daemon = await start_daemon(command, self.env, session, self.url)

    def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        failure = stop_daemon(self.daemon)
        if failure:
            self.failures.append(failure)
        self.daemon = None

    async def post_step(self, session: aiohttp.ClientSession, step: dict[str, Any]) -> None:
        self.say(step["say"])
        body = {"facts": step["facts"]}
        for item in step["facts"]:
            print(f"   POST /v1/facts {item['kind']}.{item['id']} {json.dumps(item['data'])}")
        async with session.post(self.url + "/v1/facts", json=body) as response:
            answer = await response.json()
            print(f"   -> HTTP {response.status} {json.dumps(answer)}", flush=True)
            if response.status != 200:
                self.failures.append(f"step {step['say']!r}: HTTP {response.status}")
        await self.expect(step.get("expect", {}), step["say"])

    async def expect(self, expected: dict[str, int], where: str) -> None:
        """Wait (up to 10 s) until the receiver's counts reach ``expected``, then compare."""
        for _ in range(100):
            if all(kinds(self.receiver)[k] >= n for k, n in expected.items()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # anything unexpected would show up by now
        got = kinds(self.receiver)
        for kind, count in expected.items():
            if got[kind] != count:
                self.failures.append(f"after {where!r}: expected {count} {kind}, got {got[kind]}")

    async def show_escrows(self, session: aiohttp.ClientSession) -> None:
        self.say("GET /v1/escrows")
        async with session.get(self.url + "/v1/escrows") as response:
            for escrow in (await response.json())["escrows"]:
                print(
                    f"   {escrow['escrow']}: limit {escrow['limit']} {escrow['currency']}, "
                    f"released {escrow['released']}, pending {escrow['pending']}, "
                    f"remaining {escrow['remaining']}"
                )
                if escrow["released"] != "5000.00":
                    self.failures.append(f"expected 5000.00 released, got {escrow['released']}")

    async def run(self) -> int:
        self.check_rules()
        runner = web.AppRunner(self.receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.receiver_port).start()
        steps = json.loads((HERE / "facts.json").read_text())
        async with aiohttp.ClientSession() as session:
            self.say("starting the daemon: gatekeeper serve -c gatekeeper.yaml")
            await self.start_daemon(session)
            try:
                for step in steps["steps"]:
                    await self.post_step(session, step)
                self.say("restarting the daemon; fire: once must hold across restarts")
                self.stop_daemon()
                await self.start_daemon(session)
                await self.post_step(session, steps["after_restart"])
                async with session.get(self.url + "/v1/actions?status=dead") as response:
                    dead = (await response.json())["actions"]
                if dead:
                    self.failures.append(f"{len(dead)} action(s) were dead-lettered")
                await self.show_escrows(session)
            finally:
                self.stop_daemon()
        await runner.cleanup()
        return self.report()

    def report(self) -> int:
        got = kinds(self.receiver)
        bad = [e for e in self.receiver.received if not e.verified]
        self.say(
            f"receiver got {len(self.receiver.received)} requests: {got['release']} release, "
            f"{got['notify']} notify, {got['pipeline']} pipeline; "
            f"{len(bad)} with a bad signature"
        )
        if bad:
            self.failures.append(f"{len(bad)} request(s) failed signature verification")
        for failure in self.failures:
            print(f"FAILED: {failure}")
        if not self.failures:
            print("SUCCESS: every expectation of examples/construction/facts.json held")
        return 1 if self.failures else 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gatekeeper-demo-") as folder:
        return asyncio.run(Demo(Path(folder)).run())


if __name__ == "__main__":
    sys.exit(main())
