"""The example end to end: a construction project's facts fire signed escrow releases,
notifications and a CI pipeline; then the money safety rails: a new money rule in shadow
until two admins sign it off, a backtest of a changed rule against what happened, a release
cancelled while the bank is down, and a signed settlement from the bank.

    python examples/construction/demo.py

What it does, all on 127.0.0.1 and in a temporary folder (your files are not touched):

1. makes three API tokens with ``gatekeeper token new`` (the site office posts facts; the
   admins finance-anna and finance-ben sign off money rules), writes the example
   ``gatekeeper.yaml`` with their SHA-256 and ``money_rule_approvals: 2`` into the folder,
   copies ``rules/`` there and runs ``gatekeeper check`` on it;
2. starts the example receiver (``receiver.py``, which verifies every Standard Webhooks
   signature and plays the bank) and the daemon (``gatekeeper serve``) with a fresh random
   signing secret; the two admins sign off the content hash of each money rule of ``rules/``;
3. posts the facts of ``facts.json`` step by step, showing what each step fires;
4. restarts the daemon and posts the design approval again, to show that a ``fire: once``
   release is never sent twice;
5. the money rails: a new money rule (``retention.yaml``) is added to the copy of
   ``rules/``; its first firing is shadowed (nothing reaches the bank, the alert target is
   told it awaits sign-off); two admins sign off its content hash with ``gatekeeper rules
   signoff``; its next firing is sent; ``gatekeeper backtest`` replays the daemon's history
   against a candidate paying retentions net of back-charges and shows what would have
   been released differently, and ``--self-check`` reproduces every recorded decision;
   the bank goes down (503) as another retention is released, an admin cancels it while
   it waits for its retry (``gatekeeper actions cancel``): its amount is back in the
   escrow and it is never sent; the bank settles the design release with a signed
   callback (sent twice: the replay changes nothing); the escrow's figures and its ledger
   movements (``gatekeeper escrows tower-a-escrow``);
6. stops the daemon with SIGTERM and exits 0 only if every expectation held.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import shutil
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
MONEY_RULE_APPROVALS = 2
"""How many admins must sign off a money rule's content hash before it runs live."""
TOKENS = {
    "site-office": (["facts:write", "read"], ["tower-a"]),
    "finance-anna": (["admin", "read"], []),
    "finance-ben": (["admin", "read"], []),
}
"""The API tokens the demo makes: subject -> (scopes, projects; none: every project). The
site office posts the facts and reads the views; the two admins sign off money rules (and
read the history a backtest replays: ``admin`` for ``/v1/history/*``, ``read`` for the
audit log and the stored rulesets)."""
OFFICE, ADMINS = "site-office", ("finance-anna", "finance-ben")
NEW_RULE = HERE / "retention.yaml"
NEW_RULE_ID = "tower-a/retention-release"
CANDIDATE = ('amount: "${item.data.amount}"', 'amount: "${item.data.net_amount}"')
"""The change the backtest's candidate makes to the new rule: pay the retention net of the
back-charges the fact records."""
FIGURES = ("limit", "reserved", "sent", "settled", "returned", "remaining")
"""An escrow's figures as GET /v1/escrows gives them (decimal strings)."""
ESCROW = {
    "today": {"reserved": "0.00", "sent": "5000.00", "remaining": "45000.00"},
    "held": {"reserved": "2000.00", "sent": "7500.00", "remaining": "40500.00"},
    "cancelled": {"reserved": "0.00", "returned": "2000.00", "remaining": "42500.00"},
    "settled": {
        "reserved": "0.00",
        "sent": "2500.00",
        "settled": "5000.00",
        "returned": "2000.00",
        "remaining": "42500.00",
    },
}
"""What tower-a-escrow must show: after today's steps (the design release sent), while the
glazing retention waits for the bank, once it is cancelled, and at the end (the design
release settled, the MEP retention sent, the glazing retention returned)."""


def gatekeeper(*args: str) -> list[str]:
    """The command line of ``gatekeeper ARGS`` with this Python."""
    return [sys.executable, "-m", "gatekeeper", *args]


def token_variable(subject: str) -> str:
    """The environment variable holding ``subject``'s token, e.g. ``FINANCE_ANNA_TOKEN``."""
    return subject.upper().replace("-", "_") + "_TOKEN"


def new_token(subject: str, scopes: list[str], projects: list[str]) -> tuple[str, dict[str, Any]]:
    """A fresh token from ``gatekeeper token new``: the token (for its holder only) and the
    ``tokens:`` entry of gatekeeper.yaml (its SHA-256, scopes and projects)."""
    args = ["token", "new", "--subject", subject]
    args += [f"--scope={scope}" for scope in scopes]
    args += [f"--project={project}" for project in projects]
    done = subprocess.run(gatekeeper(*args), capture_output=True, text=True, check=True)
    output = done.stdout.splitlines()  # "token (shown once ...):", the token, the entry
    first = next(i for i, line in enumerate(output) if line.startswith("token"))
    entry = yaml.safe_load(next(line for line in output if line.lstrip().startswith("- {")))
    return output[first + 1].strip(), entry[0]


def write_config(
    folder: Path, daemon_port: int, receiver_port: int, tokens: list[dict[str, Any]]
) -> Path:
    """The example gatekeeper.yaml, moved to free ports, a database and a copy of ``rules/``
    in ``folder``, with the API ``tokens`` and ``money_rule_approvals``."""
    config = yaml.safe_load((REPO / "gatekeeper.yaml").read_text())
    config["listen"] = f"127.0.0.1:{daemon_port}"
    config["database"] = str(folder / "gatekeeper.db")
    shutil.copytree(REPO / "rules", folder / "rules")
    config["rules_dir"] = str(folder / "rules")
    for target in config["targets"].values():
        target["url"] = target["url"].replace("127.0.0.1:8090", f"127.0.0.1:{receiver_port}")
    config["money_rule_approvals"] = MONEY_RULE_APPROVALS
    config["tokens"] = tokens
    path = folder / "gatekeeper.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def kinds(receiver: Receiver) -> Counter[str]:
    """How many verified requests of each kind arrived and were accepted (a Slack body
    counts as notify; a release the bank answered 503 is not counted)."""
    counts: Counter[str] = Counter()
    for entry in receiver.received:
        if entry.verified and not entry.duplicate and entry.status == 200:
            body = entry.body if isinstance(entry.body, dict) else {}
            counts[body.get("type", "notify")] += 1
    return counts


def paid(receiver: Receiver) -> list[dict[str, Any]]:
    """The releases the bank accepted (answered 200, verified, once each)."""
    return [
        e.body
        for e in receiver.received
        if e.verified
        and not e.duplicate
        and e.status == 200
        and isinstance(e.body, dict)
        and e.body.get("type") == "release"
    ]


class Demo:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.daemon_port = free_port()
        self.receiver_port = free_port()
        made = {subject: new_token(subject, *TOKENS[subject]) for subject in TOKENS}
        self.tokens = {subject: token for subject, (token, _) in made.items()}
        entries = [entry for _, entry in made.values()]
        self.config = write_config(folder, self.daemon_port, self.receiver_port, entries)
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        self.env = {**os.environ, **dict.fromkeys(SECRET_VARIABLES, secret)}
        self.env.update({token_variable(s): token for s, token in self.tokens.items()})
        self.receiver = Receiver(secret)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.failures: list[str] = []
        self.url = f"http://127.0.0.1:{self.daemon_port}"

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def bearer(self, subject: str) -> dict[str, str]:
        """The ``Authorization`` header of ``subject``'s token."""
        return {"Authorization": f"Bearer {self.tokens[subject]}"}

    def show_tokens(self) -> None:
        self.say(f"API tokens (gatekeeper token new), money_rule_approvals: {MONEY_RULE_APPROVALS}")
        for subject, (scopes, projects) in TOKENS.items():
            options = " ".join(
                [f"--scope {s}" for s in scopes] + [f"--project {p}" for p in projects]
            )
            print(f"   gatekeeper token new --subject {subject} {options}")
        print(
            "   (each token goes to its holder's environment, e.g. $FINANCE_ANNA_TOKEN, and is "
            "never printed; gatekeeper.yaml keeps its SHA-256)"
        )

    def check_rules(self) -> None:
        self.say("gatekeeper check (rules/, copied to the demo's folder)")
        command = gatekeeper("check", "-c", str(self.config))
        result = subprocess.run(command, env=self.env, check=False)
        if result.returncode != 0:
            self.failures.append("gatekeeper check failed on the bundled rules")

    async def cli(self, *args: str, subject: str | None = None) -> tuple[int, str]:
        """Run ``gatekeeper ARGS`` (as ``subject``: its token in ``GATEKEEPER_TOKEN``) without
        blocking the receiver; print the command (paths relative to the demo's folder) and
        its output, indented. Returns the exit code and the output."""
        shown = shlex.join(args).replace(f"{self.folder}{os.sep}", "")
        env = dict(self.env)
        if subject is not None:
            env["GATEKEEPER_TOKEN"] = self.tokens[subject]
            shown = f"GATEKEEPER_TOKEN=${token_variable(subject)} gatekeeper {shown}"
        else:
            shown = f"gatekeeper {shown}"
        print(f"   $ {shown}", flush=True)
        process = await asyncio.create_subprocess_exec(
            *gatekeeper(*args),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        text = output.decode()
        for line in text.splitlines():
            print(f"     {line}")
        return await process.wait(), text

    async def start_daemon(self, session: aiohttp.ClientSession) -> None:
        command = gatekeeper("serve", "-c", str(self.config))
        self.daemon = await start_daemon(command, self.env, session, self.url)

    async def show_status_page(self, session: aiohttp.ClientSession) -> None:
        """Say where the status page is (the daemon serves it) and check it answers."""
        self.say(f"the status page: {self.url}/ui/projects/tower-a")
        print(
            "   (sign in there with a token, e.g. $SITE_OFFICE_TOKEN to read; it follows the "
            "steps below live while the demo runs)"
        )
        async with session.get(self.url + "/ui/login") as response:
            if response.status != 200:
                self.failures.append(f"GET /ui/login: HTTP {response.status}")

    def stop_daemon(self) -> None:
        if self.daemon is None:
            return
        failure = stop_daemon(self.daemon)
        if failure:
            self.failures.append(failure)
        self.daemon = None

    async def get(self, session: aiohttp.ClientSession, path: str) -> Any:
        async with session.get(self.url + path) as response:
            if response.status != 200:
                self.failures.append(f"GET {path}: HTTP {response.status}")
            return await response.json()

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

    async def sign_off(
        self, session: aiohttp.ClientSession, rule: dict[str, Any], admin: str
    ) -> dict[str, Any]:
        """``POST /v1/money-rules/{hash}/signoffs`` as ``admin``: the rule's view after it."""
        path = f"/v1/money-rules/{rule['content_hash']}/signoffs"
        body = {"comment": "payee, amount and escrow checked"}
        async with session.post(self.url + path, json=body, headers=self.bearer(admin)) as r:
            answer: dict[str, Any] = await r.json()
            if r.status != 200:
                self.failures.append(f"sign-off of {rule['id']} by {admin}: HTTP {r.status}")
            return answer

    async def sign_off_bundled(self, session: aiohttp.ClientSession) -> None:
        """The two admins sign off every money rule of the bundled rules/, as they would
        have when those rules were deployed."""
        self.say(
            f"money_rule_approvals: {MONEY_RULE_APPROVALS}: a rule with a release runs in "
            "shadow until two admins sign off its content hash; finance-anna and finance-ben "
            "sign off the money rules of rules/ (POST /v1/money-rules/{hash}/signoffs)"
        )
        rules = (await self.get(session, "/v1/rules"))["rules"]
        for rule in rules:
            if rule.get("signoff") is None:
                continue
            view = rule
            for admin in ADMINS:
                view = await self.sign_off(session, rule, admin)
            signed = ", ".join(s["actor"] for s in view["signoff"]["signed_by"])
            print(
                f"   {rule['id']} ({rule['content_hash'][:12]}): signed off by {signed}: "
                f"{view['mode']}"
            )
            if view["mode"] != "live":
                self.failures.append(f"{rule['id']} is {view['mode']} after two sign-offs")

    async def show_escrows(self, session: aiohttp.ClientSession, moment: str) -> None:
        """Print each escrow's figures (``GET /v1/escrows``) and compare tower-a-escrow's
        with what ``ESCROW[moment]`` expects."""
        for escrow in (await self.get(session, "/v1/escrows"))["escrows"]:
            figures = ", ".join(f"{name} {escrow[name]}" for name in FIGURES)
            print(f"   GET /v1/escrows: {escrow['escrow']}: {figures} {escrow['currency']}")
            got = {name: escrow[name] for name in ESCROW[moment]}
            if escrow["escrow"] == "tower-a-escrow" and got != ESCROW[moment]:
                self.failures.append(f"escrow ({moment}): expected {ESCROW[moment]}, got {got}")

    # -- the money rails --------------------------------------------------------------------

    async def money_rails(self, session: aiohttp.ClientSession, steps: dict[str, Any]) -> None:
        rule = await self.add_money_rule(session)
        if rule is None:
            return
        await self.post_step(session, steps["shadowed"])
        await self.show_shadowed(session)
        for admin in ADMINS:
            await self.cli(
                *("rules", "signoff", rule["content_hash"], "--url", self.url),
                *("--comment", "retention payee and cap checked"),
                subject=admin,
            )
        view = await self.get(session, f"/v1/rules/{NEW_RULE_ID}")
        if view["mode"] != "live":
            self.failures.append(f"{NEW_RULE_ID} is {view['mode']} after two sign-offs")
        live_since = max(s["at"] for s in view["signoff"]["signed_by"])
        await self.post_step(session, steps["signed_off"])
        await self.show_shadowed(session)
        await self.backtest(live_since)
        await self.cancel_held_release(session, steps["cancelled"])
        await self.settle(session)

    async def add_money_rule(self, session: aiohttp.ClientSession) -> dict[str, Any] | None:
        """Write ``retention.yaml`` into the daemon's rules/ and wait (up to 10 s) until the
        daemon runs it; its view, or None (a failure) when it does not."""
        self.say(
            f"A new money rule appears: rules/tower-a/retention.yaml ({NEW_RULE_ID}: each "
            "subcontract's retention, its amount from the fact, at most 3000.00 USD); the "
            "daemon reloads it"
        )
        shutil.copy(NEW_RULE, self.folder / "rules" / "tower-a" / "retention.yaml")
        for _ in range(100):
            async with session.get(self.url + f"/v1/rules/{NEW_RULE_ID}") as response:
                if response.status == 200:
                    rule: dict[str, Any] = await response.json()
                    signoff = rule["signoff"]
                    print(
                        f"   GET /v1/rules/{NEW_RULE_ID}: mode {rule['mode']}, content hash "
                        f"{rule['content_hash']}, sign-offs {len(signoff['signed_by'])} of "
                        f"{signoff['required']}"
                    )
                    if rule["mode"] != "awaiting_signoff":
                        self.failures.append(
                            f"{NEW_RULE_ID} runs {rule['mode']}, not awaiting_signoff"
                        )
                    return rule
            await asyncio.sleep(0.1)
        self.failures.append(f"{NEW_RULE_ID} was not loaded within 10 s")
        return None

    async def show_shadowed(self, session: aiohttp.ClientSession) -> None:
        """The shadowed releases in the outbox: stored, never sent."""
        actions = (await self.get(session, "/v1/actions?status=shadowed"))["actions"]
        print("   GET /v1/actions?status=shadowed (stored, never sent, never counted):")
        for action in actions:
            payload = action["payload"]
            if action["kind"] == "release":
                print(
                    f"     {action['firing_id']}: release {payload['amount']} "
                    f"{payload['currency']} to {payload['payee']} ({action['action_id']})"
                )
        if [a["kind"] for a in actions] != ["release"]:
            self.failures.append(f"expected one shadowed release, got {len(actions)} action(s)")

    async def backtest(self, live_since: str) -> None:
        """``gatekeeper backtest`` of a candidate (the new rule paying net amounts) against the
        daemon's history since the new rule went live (``live_since``; a candidate's money
        rules are taken as signed off, so its shadowed firing before would show as sent),
        and ``--self-check`` of every recorded decision."""
        self.say(
            "gatekeeper backtest: what if retentions were paid net of back-charges? The "
            "daemon's history replayed against the candidate, in memory (nothing is written)"
        )
        candidate = self.folder / "candidate"
        shutil.copytree(self.folder / "rules", candidate)
        path = candidate / "tower-a" / "retention.yaml"
        path.write_text(path.read_text().replace(*CANDIDATE))
        print(f"   candidate/: rules/ with {CANDIDATE[0]} -> {CANDIDATE[1]}")
        code, output = await self.cli(
            *("backtest", "-c", str(self.config), "--rules", str(candidate)),
            *("--url", self.url, "--since", live_since),
            subject=ADMINS[0],
        )
        print(f"     (exit {code}: a release would differ; --fail-on release fails a pull request)")
        if code != 1 or "release actions[0].payload.amount" not in output:
            self.failures.append(f"the backtest of net amounts exited {code}, not 1")
        code, output = await self.cli(
            *("backtest", "-c", str(self.config), "--self-check"),
            *("--database", str(self.folder / "gatekeeper.db")),
        )
        print("     (the recorded rule versions replayed: every decision explained by its rules)")
        if code != 0:
            self.failures.append(f"the backtest's self-check exited {code}")

    async def cancel_held_release(
        self, session: aiohttp.ClientSession, step: dict[str, Any]
    ) -> None:
        """The bank is down (the receiver answers 503) when a retention is released: the
        release waits for its next attempt, an admin cancels it (``gatekeeper actions
        cancel``), its amount returns to the escrow, and it is never sent once the bank
        is back."""
        self.receiver.bank_down = True
        await self.post_step(session, step)
        release_id = await self.refused_release()
        if release_id is None:
            self.failures.append("no release reached the bank while it was down")
            return
        await self.show_escrows(session, "held")
        for _ in range(20):  # 409 while an attempt is in flight: its outcome decides
            code, _ = await self.cli(
                *("actions", "cancel", release_id, "--url", self.url),
                *("--reason", "glazing retention withheld: defect found"),
                subject=ADMINS[0],
            )
            if code == 0:
                break
            await asyncio.sleep(0.5)
        self.receiver.bank_down = False
        action = await self.get(session, f"/v1/actions/{release_id}")
        statuses = [a["status_code"] for a in action["delivery_attempts"]]
        print(f"   GET /v1/actions/{release_id}: {action['status']}, attempts {statuses}")
        await asyncio.sleep(1.0)  # the bank is back: nothing of the cancelled release comes
        sent = [r for r in paid(self.receiver) if r["release_id"] == release_id]
        if action["status"] != "cancelled" or sent:
            self.failures.append(f"release {release_id} was not cancelled before it was sent")
        await self.show_escrows(session, "cancelled")

    async def refused_release(self) -> str | None:
        """The release id of the first release the bank answered 503 (waits up to 10 s)."""
        for _ in range(100):
            for entry in self.receiver.received:
                if entry.status == 503 and isinstance(entry.body, dict):
                    return str(entry.body["release_id"])
            await asyncio.sleep(0.1)
        return None

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """The bank settles the design release with a signed callback, then sends the same
        callback again (a replay: answered as recorded, nothing applied); the escrow's
        figures and its ledger movements."""
        self.say(
            "The bank settles the design release: a Standard Webhooks signed callback to "
            "POST /v1/settlements/escrow-bank (the same webhook-id again is a replay)"
        )
        [design] = [r for r in paid(self.receiver) if r["payee"] == "acme-architects"]
        body = {
            "release_id": design["release_id"],
            "status": "settled",
            "reference": "BANK-2026-118842",
        }
        url = self.url + "/v1/settlements/escrow-bank"
        for attempt in ("", " again"):
            status, answer = await self.receiver.settle(url, body, "msg_settle_design_1")
            shown = {k: answer.get(k) for k in ("status", "applied", "replayed")}
            print(
                f"   [bank] POST /v1/settlements/escrow-bank{attempt} {json.dumps(body)}\n"
                f"          -> HTTP {status} {json.dumps(shown)}"
            )
            if status != 200 or answer.get("replayed") != bool(attempt):
                self.failures.append(f"settlement{attempt}: HTTP {status} {answer}")
        await self.show_escrows(session, "settled")
        await self.cli("escrows", "tower-a-escrow", "--url", self.url, subject=ADMINS[0])

    async def run(self) -> int:
        self.show_tokens()
        self.check_rules()
        runner = web.AppRunner(self.receiver.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.receiver_port).start()
        steps = json.loads((HERE / "facts.json").read_text())
        async with aiohttp.ClientSession(headers=self.bearer(OFFICE)) as session:
            self.say("starting the daemon: gatekeeper serve -c gatekeeper.yaml")
            await self.start_daemon(session)
            try:
                await self.show_status_page(session)
                await self.sign_off_bundled(session)
                for step in steps["steps"]:
                    await self.post_step(session, step)
                self.say("restarting the daemon; fire: once must hold across restarts")
                self.stop_daemon()
                await self.start_daemon(session)
                await self.post_step(session, steps["after_restart"])
                self.say("the escrow after today's steps")
                await self.show_escrows(session, "today")
                await self.money_rails(session, steps["money_rails"])
                dead = (await self.get(session, "/v1/actions?status=dead"))["actions"]
                if dead:
                    self.failures.append(f"{len(dead)} action(s) were dead-lettered")
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
