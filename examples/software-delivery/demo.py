"""The software-delivery example end to end: a Makefile and GitHub Actions tell gatekeeper
about tasks, builds, tests and deployments; per-item rules notify the developers of every
failed test, start the deploy pipeline at the commit that passed, and release a milestone's
escrow once all of its tasks are done and two approvers agreed.

    python examples/software-delivery/demo.py

What it does, all on 127.0.0.1 and in a temporary folder (your files are not touched):

1. runs ``gatekeeper check`` and ``gatekeeper test`` on this folder's ``rules/`` and
   ``gatekeeper.yaml``;
2. starts a webhook receiver that verifies every Standard Webhooks signature
   (``examples/construction/receiver.py``) and the daemon (``gatekeeper serve``), with a
   fresh random signing secret, GitHub webhook secret and API token for each of the
   config's ``tokens`` (its copy of ``gatekeeper.yaml`` keeps their SHA-256; each token is
   handed to its client in the environment: ``GATEKEEPER_TOKEN`` for ``make``,
   ``FINANCE_LEAD_TOKEN`` and so on for the approvers, never printed);
3. plays ``steps.json``: ``make`` targets of this folder's ``Makefile`` (each posts facts
   with ``gatekeeper emit``), GitHub ``workflow_run`` deliveries to
   ``POST /v1/hooks/github``, made from GitHub's published example payload
   (``github/workflow_run.json``) and signed with ``X-Hub-Signature-256`` as GitHub signs
   them, and approvals posted to ``POST /v1/approvals`` with the approver's token (printed
   as the equivalent ``curl``); after each step it waits for what must have arrived at the
   receiver;
4. prints what arrived (per type, the notification texts, the pipeline refs, the releases)
   and the escrow, stops the daemon with SIGTERM, and exits 0 only if every expectation of
   ``steps.json`` held (1 otherwise; 2 when ``make`` is not installed).

``--steps FILE`` plays another steps file of the same shape; ``--wait-s`` is how long a step
waits for what it expects (10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "construction"))
from receiver import Received, Receiver
from serve import free_port, start_daemon, stop_daemon

HERE = Path(__file__).resolve().parent

TARGET_SECRET = "DELIVERY_WEBHOOK_SECRET"
HOOK_SECRET = "GITHUB_WEBHOOK_SECRET"
TEMPLATE = HERE / "github" / "workflow_run.json"
TEMPLATE_RUN_ID, TEMPLATE_WORKFLOW_ID = 289782451, 2823525
TEMPLATE_SHA = "3484a3fb816e0859fd6e1cea078d76385ff50625"
WORKFLOW_IDS = {"build": 7215530, "e2e": 7215531}
"""GitHub's ids of the shop's workflows, ``.github/workflows/<name>.yml``."""
EMIT_SUBJECT = "shop-ci"
"""The token subject whose token ``make`` (``gatekeeper emit``) posts facts with."""
READ_SUBJECT = "finance-lead"
"""The token subject the demo reads the escrows and the outbox with."""
WAIT_S = 10.0
"""How long a step waits for what it expects at the receiver (``--wait-s``)."""


def token_variable(subject: str) -> str:
    """The environment variable holding ``subject``'s API token: ``GATEKEEPER_TOKEN`` for
    the Makefile's ``gatekeeper emit``, else e.g. ``FINANCE_LEAD_TOKEN``."""
    if subject == EMIT_SUBJECT:
        return "GATEKEEPER_TOKEN"
    return re.sub(r"[^A-Z0-9]", "_", subject.upper()) + "_TOKEN"


def write_config(
    folder: Path, daemon_port: int, receiver_port: int, tokens: dict[str, str]
) -> Path:
    """This folder's gatekeeper.yaml, moved to free ports and a database in ``folder``,
    each configured token's SHA-256 replaced by that of ``tokens[subject]``."""
    config = yaml.safe_load((HERE / "gatekeeper.yaml").read_text())
    config["listen"] = f"127.0.0.1:{daemon_port}"
    config["database"] = str(folder / "gatekeeper.db")
    config["rules_dir"] = str(HERE / "rules")
    for target in config["targets"].values():
        target["url"] = target["url"].replace("127.0.0.1:8090", f"127.0.0.1:{receiver_port}")
    for entry in config.get("tokens", []):
        entry["sha256"] = hashlib.sha256(tokens[entry["subject"]].encode()).hexdigest()
    path = folder / "gatekeeper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def substitute(value: Any, names: dict[str, str]) -> Any:
    """``value`` (JSON) with every ``${NAME}`` in its strings replaced from ``names``."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)\}", lambda m: names[m.group(1)], value)
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    return value


def workflow_run_payload(spec: dict[str, Any]) -> dict[str, Any]:
    """A ``workflow_run`` event as GitHub sends it: GitHub's published example with the run,
    workflow, commit, branch, attempt and conclusion of ``spec``."""
    run_id, workflow = int(spec["run_id"]), spec["workflow"]
    text = TEMPLATE.read_text()
    text = text.replace(str(TEMPLATE_RUN_ID), str(run_id))
    text = text.replace(str(TEMPLATE_WORKFLOW_ID), str(WORKFLOW_IDS[workflow]))
    text = text.replace(TEMPLATE_SHA, spec["commit"])
    payload: dict[str, Any] = json.loads(text)
    action = spec.get("action", "completed")
    path = f".github/workflows/{workflow}.yml"
    payload["action"] = action
    payload["workflow"].update(name=workflow, path=path)
    payload["workflow"]["html_url"] = payload["workflow"]["html_url"].replace(
        ".github/workflows/test.yml", path
    )
    run = payload["workflow_run"]
    attempt = int(spec.get("run_attempt", 1))
    run.update(
        name=workflow,
        path=path,
        event="push",
        head_branch=spec["branch"],
        run_number=int(spec["run_number"]),
        run_attempt=attempt,
        status="completed" if action == "completed" else "queued",
        conclusion=spec.get("conclusion") if action == "completed" else None,
        previous_attempt_url=(f"{run['url']}/attempts/{attempt - 1}" if attempt > 1 else None),
    )
    return payload


def github_headers(body: bytes, secret: str, delivery: str) -> dict[str, str]:
    """The headers GitHub puts on a ``workflow_run`` delivery of ``body`` ("Webhook events
    and payloads", "Delivery headers"), signed with ``secret``."""
    sha256 = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    sha1 = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/7c1b4e2",
        "X-GitHub-Event": "workflow_run",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Hook-ID": "492711833",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
        "X-GitHub-Hook-Installation-Target-ID": "186853002",
        "X-Hub-Signature": f"sha1={sha1}",
        "X-Hub-Signature-256": f"sha256={sha256}",
    }


def kind_of(entry: Received) -> str:
    """release, pipeline or notify (a Slack body ``{"text": ...}`` is a notify)."""
    body = entry.body if isinstance(entry.body, dict) else {}
    return str(body.get("type", "notify"))


def delivered(receiver: Receiver) -> list[Received]:
    """The requests that arrived verified, once each (a repeated release is not counted)."""
    return [e for e in receiver.received if e.verified and not e.duplicate]


def kinds(receiver: Receiver) -> Counter[str]:
    """How many verified requests of each kind arrived."""
    return Counter(kind_of(e) for e in delivered(receiver))


def notify_text(entry: Received) -> str:
    body = entry.body if isinstance(entry.body, dict) else {}
    return str(body.get("message", body.get("text", "")))


def contains(got: Any, wanted: Any) -> bool:
    """Whether ``got`` holds every field of ``wanted`` (mappings compared as subsets)."""
    if isinstance(wanted, dict):
        return isinstance(got, dict) and all(
            k in got and contains(got[k], v) for k, v in wanted.items()
        )
    return bool(got == wanted)


class Demo:
    def __init__(self, folder: Path, steps_file: Path, wait_s: float = WAIT_S) -> None:
        self.folder = folder
        self.wait_s = wait_s
        self.steps_file = steps_file
        self.steps: dict[str, Any] = json.loads(steps_file.read_text())
        self.names: dict[str, str] = self.steps.get("commits", {})
        self.daemon_port = free_port()
        self.receiver_port = free_port()
        subjects = [
            entry["subject"]
            for entry in yaml.safe_load((HERE / "gatekeeper.yaml").read_text()).get("tokens", [])
        ]
        self.tokens = {subject: "gk_" + secrets.token_urlsafe(32) for subject in subjects}
        self.config = write_config(folder, self.daemon_port, self.receiver_port, self.tokens)
        target_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.hook_secret = os.urandom(20).hex()
        self.env = {**os.environ, TARGET_SECRET: target_secret, HOOK_SECRET: self.hook_secret}
        self.env.update({token_variable(s): token for s, token in self.tokens.items()})
        self.env["GATEKEEPER_URL"] = f"http://127.0.0.1:{self.daemon_port}"
        self.receiver = Receiver(target_secret)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.failures: list[str] = []
        self.url = self.env["GATEKEEPER_URL"]

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def bearer(self, subject: str) -> dict[str, str]:
        """The ``Authorization`` header of ``subject``'s token."""
        return {"Authorization": f"Bearer {self.tokens[subject]}"}

    def gatekeeper(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gatekeeper", *args]

    def check_rules(self) -> None:
        self.say(f"gatekeeper check and gatekeeper test on {HERE / 'rules'}")
        for args in (("check", "-c", str(self.config)), ("test", "-c", str(self.config))):
            result = subprocess.run(self.gatekeeper(*args), env=self.env, check=False)
            if result.returncode != 0:
                self.failures.append(f"gatekeeper {args[0]} failed on the example's rules")

    async def start_daemon(self, session: aiohttp.ClientSession) -> None:
        command = self.gatekeeper("serve", "-c", str(self.config))
        self.daemon = await start_daemon(command, self.env, session, self.url)

    def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        failure = stop_daemon(self.daemon)
        if failure:
            self.failures.append(failure)
        self.daemon = None

    async def make(self, args: str, expected_exit: int, where: str) -> None:
        """``make ARGS`` in this folder, its emits pointed at the daemon, the build, test and
        deploy commands replaced by ``true`` unless ``args`` sets them."""
        emit = " ".join(shlex.quote(part) for part in self.gatekeeper("emit"))
        print(f"$ make {args}", flush=True)
        command = [
            "make",
            "--silent",  # emit says what it posted
            "--no-print-directory",
            "-C",
            str(HERE),
            f"EMIT={emit}",
            "EMIT_FLAGS=--strict",
            "BUILD_CMD=true",
            "TEST_CMD=true",
            "DEPLOY_CMD=true",
            *shlex.split(args),
        ]
        process = await asyncio.create_subprocess_exec(*command, env=self.env)
        code = await process.wait()
        if code != expected_exit:
            self.failures.append(f"{where}: make {args} exited {code}, expected {expected_exit}")

    async def github(
        self, session: aiohttp.ClientSession, spec: dict[str, Any], status: int, where: str
    ) -> None:
        """Deliver one ``workflow_run`` event to ``POST /v1/hooks/github``."""
        body = json.dumps(workflow_run_payload(spec)).encode()
        secret = os.urandom(20).hex() if spec.get("forged") else self.hook_secret
        headers = github_headers(body, secret, spec["delivery"])
        run = f"{spec['workflow']} run {spec['run_id']} attempt {spec.get('run_attempt', 1)}"
        what = spec.get("conclusion") or spec.get("action", "completed")
        forged = " (forged signature)" if spec.get("forged") else ""
        print(f"$ GitHub delivery {spec['delivery']}: workflow_run {run}: {what}{forged}")
        async with session.post(self.url + "/v1/hooks/github", data=body, headers=headers) as r:
            answer = await r.text()
            print(f"   -> HTTP {r.status} {answer.strip()}", flush=True)
            if r.status != status:
                self.failures.append(f"{where}: GitHub delivery answered {r.status}, not {status}")

    async def approve(
        self, session: aiohttp.ClientSession, spec: dict[str, Any], status: int, where: str
    ) -> None:
        """Post one approval to ``POST /v1/approvals`` with the approver's (``spec["by"]``)
        token, printing the equivalent ``curl`` (the token named by its variable)."""
        by = spec["by"]
        body: dict[str, Any] = {k: spec[k] for k in ("rule", "item") if k in spec}
        body["decision"] = spec.get("decision", "approve")
        body.update((k, v) for k, v in spec.items() if k != "by")
        print(
            f"$ curl -s $GATEKEEPER_URL/v1/approvals -H "
            f'"Authorization: Bearer ${token_variable(by)}" '
            f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'",
            flush=True,
        )
        async with session.post(
            self.url + "/v1/approvals", json=body, headers=self.bearer(by)
        ) as response:
            answer = await response.json()
            if response.status == 200:  # the answer, without its seq and request_id
                counted = answer["approvals"]
                shown = {k: answer[k] for k in ("rule", "item", "approver", "decision")}
                shown["approvals"] = {
                    k: counted[k] for k in ("required", "approved_by", "satisfied")
                }
                summary = json.dumps(shown)
            else:
                summary = answer["error"]["message"]
            print(f"   -> HTTP {response.status} {summary}", flush=True)
            if response.status != status:
                self.failures.append(f"{where}: approval answered {response.status}, not {status}")

    async def play(self, session: aiohttp.ClientSession, step: dict[str, Any]) -> None:
        where = step["say"]
        self.say(where)
        for action in substitute(step["do"], self.names):
            status = int(action.get("status", 200))
            if "make" in action:
                await self.make(action["make"], int(action.get("exit", 0)), where)
            elif "approve" in action:
                await self.approve(session, action["approve"], status, where)
            else:
                await self.github(session, action["github"], status, where)
        arrived = substitute(step.get("arrived", []), self.names)
        await self.expect(step.get("expect", {}), arrived)
        self.compare(step.get("expect", {}), where)
        self.failures += [f"after {where!r}: no {m} arrived" for m in self.missing(arrived)]

    async def expect(self, counts: dict[str, int], arrived: list[dict[str, Any]]) -> None:
        """Wait (up to ``wait_s``) until the receiver has ``counts`` and everything
        ``arrived`` lists, then a little longer: anything unexpected would show by then."""
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            got = kinds(self.receiver)
            if all(got[k] >= n for k, n in counts.items()) and not self.missing(arrived):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)

    def missing(self, arrived: list[dict[str, Any]]) -> list[str]:
        """The entries of ``arrived`` that no verified request matches, described."""
        absent = []
        for wanted in arrived:
            ((kind, value),) = wanted.items()
            entries = [e for e in delivered(self.receiver) if kind_of(e) == kind]
            if kind == "notify":
                found = any(notify_text(e) == value for e in entries)
            else:
                found = any(contains(e.body, value) for e in entries)
            if not found:
                absent.append(f"{kind} {json.dumps(value)}")
        return absent

    def compare(self, counts: dict[str, int], where: str) -> None:
        got = kinds(self.receiver)
        for kind, count in counts.items():
            if got[kind] != count:
                self.failures.append(f"after {where!r}: expected {count} {kind}, got {got[kind]}")

    async def show_escrows(self, session: aiohttp.ClientSession) -> None:
        self.say("GET /v1/escrows")
        async with session.get(
            self.url + "/v1/escrows", headers=self.bearer(READ_SUBJECT)
        ) as response:
            escrows = {e["escrow"]: e for e in (await response.json())["escrows"]}
        for name, escrow in escrows.items():
            print(
                f"   {name}: limit {escrow['limit']} {escrow['currency']}, released "
                f"{escrow['released']}, pending {escrow['pending']}, "
                f"remaining {escrow['remaining']}"
            )
        for name, wanted in self.steps.get("escrows", {}).items():
            if not contains(escrows.get(name), wanted):
                self.failures.append(f"escrow {name}: expected {wanted}, got {escrows.get(name)}")

    async def run(self) -> int:
        started = time.monotonic()
        self.check_rules()
        runner = web.AppRunner(self.receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.receiver_port).start()
        async with aiohttp.ClientSession() as session:
            self.say("starting the daemon: gatekeeper serve -c gatekeeper.yaml")
            await self.start_daemon(session)
            try:
                for step in self.steps["steps"]:
                    await self.play(session, step)
                async with session.get(
                    self.url + "/v1/actions?status=dead", headers=self.bearer(READ_SUBJECT)
                ) as response:
                    dead = (await response.json())["actions"]
                if dead:
                    self.failures.append(f"{len(dead)} action(s) were dead-lettered")
                await self.show_escrows(session)
            finally:
                self.stop_daemon()
        await runner.cleanup()
        return self.report(time.monotonic() - started)

    def report(self, elapsed_s: float) -> int:
        got = kinds(self.receiver)
        bad = [e for e in self.receiver.received if not e.verified]
        self.say(
            f"the receiver got {len(self.receiver.received)} requests: {got['release']} "
            f"release, {got['notify']} notify, {got['pipeline']} pipeline; "
            f"{len(bad)} with a bad signature"
        )
        for entry in delivered(self.receiver):
            body = entry.body if isinstance(entry.body, dict) else {}
            kind = kind_of(entry)
            if kind == "notify":
                print(f"   notify   {entry.path}: {notify_text(entry)}")
            elif kind == "pipeline":
                print(f"   pipeline {entry.path}: ref {body['ref']} inputs {body['inputs']}")
            elif kind == "release":
                print(
                    f"   release  {entry.path}: {body['amount']} {body['currency']} from "
                    f"{body['escrow']} to {body['payee']} ({body['rule_id']}, "
                    f"release_id {body['release_id']})"
                )
        if bad:
            self.failures.append(f"{len(bad)} request(s) failed signature verification")
        for failure in self.failures:
            print(f"FAILED: {failure}")
        if not self.failures:
            print(f"SUCCESS: every expectation of {self.steps_file} held ({elapsed_s:.1f} s)")
        return 1 if self.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=Path, default=HERE / "steps.json", help="the story")
    parser.add_argument(
        "--wait-s",
        type=float,
        default=WAIT_S,
        help=f"how long a step waits for what it expects (default {WAIT_S:g})",
    )
    args = parser.parse_args(argv)
    if shutil.which("make") is None:
        print(
            "this example runs its Makefile: install make (apt-get install make)", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="gatekeeper-delivery-") as folder:
        return asyncio.run(Demo(Path(folder), args.steps, args.wait_s).run())


if __name__ == "__main__":
    sys.exit(main())
