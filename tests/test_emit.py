"""``gatekeeper emit``: post a fact from a build, with retries under one Idempotency-Key, and
never fail the build unless ``--strict``."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gatekeeper.cli.emit import (
    MAX_RETRY_AFTER_S,
    add_emit_parser,
    build_fact,
    post_fact,
    run_emit,
)
from gatekeeper.clock import FixedClock

from .conftest import DEPLOY_RULE, Project, Receiver


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gatekeeper")
    add_emit_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["emit", *argv])


FACT_ARGS = ("--project", "tower-a", "--kind", "task", "--id", "T-17")


async def emit(*argv: str) -> int:
    """``run_emit`` in a thread, so a daemon or server in this event loop can answer."""
    return await asyncio.to_thread(run_emit, parse(*argv))


def test_build_fact_merges_data_and_typed_set_fields() -> None:
    fact = build_fact(
        "tower-a",
        "build",
        "docs-main",
        '{"status": "started", "log": "https://ci/1"}',
        ["status=completed", "passed=true", "count=3", "version=1.10", "zip=007", "note=a=b"],
    )
    assert fact == {
        "project": "tower-a",
        "kind": "build",
        "id": "docs-main",
        "data": {
            "status": "completed",
            "log": "https://ci/1",
            "passed": True,
            "count": 3,
            "version": "1.10",
            "zip": "007",
            "note": "a=b",
        },
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data", "{not json"), "--data is not valid JSON"),
        (("--data", "[1, 2]"), "--data must be a JSON object"),
        (("--set", "status"), "expected KEY=VALUE"),
    ],
)
def test_bad_arguments_are_usage_errors(
    extra: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_emit(parse(*FACT_ARGS, "--url", "http://127.0.0.1:9", *extra)) == 2
    assert message in capsys.readouterr().err


async def test_posts_a_fact_to_the_daemon(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    monkeypatch.setenv("GATEKEEPER_URL", gk.url + "/")
    monkeypatch.delenv("GATEKEEPER_TOKEN", raising=False)
    code = await emit(*FACT_ARGS, "--data", '{"status": "completed"}', "--set", "by=ci")
    assert code == 0
    assert "fact tower-a/task/T-17 accepted (seq 1)" in capsys.readouterr().out
    _, answer = await gk.get("/v1/facts?project=tower-a")
    [posted] = answer["facts"]
    assert (posted["kind"], posted["id"]) == ("task", "T-17")
    assert posted["data"] == {"status": "completed", "by": "ci"}
    [pipeline] = await receiver.wait_for(1)  # and it fired the rule that waited for it
    assert pipeline.path == "/ci" and pipeline.body["type"] == "pipeline"

    # the same key again (a retry whose first answer was lost) applies nothing twice
    twice = ("--idempotency-key", "job-42-completed", "--set", "status=failed")
    assert await emit(*FACT_ARGS, *twice) == 0
    assert await emit(*FACT_ARGS, *twice) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["gatekeeper emit: fact tower-a/task/T-17 accepted (seq 2)"] * 2

    # a fact the daemon refuses (4xx) is an error on stderr: exit 0, or 1 with --strict
    bad = ("--project", "tower-a", "--kind", "Not A Kind", "--id", "x")
    assert await emit(*bad) == 0
    err = capsys.readouterr().err
    assert "error: fact tower-a/Not A Kind/x refused: HTTP 400" in err and "$.kind" in err
    assert await emit(*bad, "--strict") == 1


@dataclass
class FlakyDaemon:
    """Answers ``statuses`` in turn (then 200), recording each request's headers and body."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            return web.json_response({"accepted": 1, "seqs": [7], "request_id": "r"})
        error = {"status": status, "message": "nope", "problems": []}
        return web.json_response({"error": error}, status=status)


@pytest.fixture
async def flaky() -> AsyncIterator[FlakyDaemon]:
    server = FlakyDaemon()
    app = web.Application()
    app.router.add_post("/v1/facts", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


async def test_retries_send_one_idempotency_key_and_the_token(
    flaky: FlakyDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky.statuses = [503, 429, 500]
    monkeypatch.setenv("GATEKEEPER_URL", flaky.url)
    monkeypatch.setenv("GATEKEEPER_TOKEN", "gk_secret-token")
    assert await emit(*FACT_ARGS, "--set", "status=started", "--backoff-s", "0.01") == 0
    assert len(flaky.requests) == 4
    keys = {headers["Idempotency-Key"] for headers, _ in flaky.requests}
    assert len(keys) == 1 and keys.pop().startswith("emit-")
    assert {body for _, body in flaky.requests} == {flaky.requests[0][1]}
    assert all(h["Authorization"] == "Bearer gk_secret-token" for h, _ in flaky.requests)

    # each invocation gets its own key
    await emit(*FACT_ARGS, "--backoff-s", "0.01")
    assert flaky.requests[-1][0]["Idempotency-Key"] != flaky.requests[0][0]["Idempotency-Key"]


async def test_out_of_retries_warns_and_4xx_is_not_retried(
    flaky: FlakyDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEKEEPER_URL", flaky.url)
    monkeypatch.delenv("GATEKEEPER_TOKEN", raising=False)
    flaky.statuses = [503, 503]
    assert await emit(*FACT_ARGS, "--retries", "1", "--backoff-s", "0.01") == 0
    err = capsys.readouterr().err
    assert "warning: fact tower-a/task/T-17 not posted after 2 attempts: HTTP 503" in err
    assert "use --strict" in err
    assert len(flaky.requests) == 2 and "Authorization" not in flaky.requests[0][0]

    flaky.statuses = [403]
    assert await emit(*FACT_ARGS, "--strict", "--backoff-s", "0.01") == 1
    assert len(flaky.requests) == 3  # refused: no retry
    assert "refused: HTTP 403" in capsys.readouterr().err


async def test_retry_after_in_either_form_is_honoured_up_to_the_limit() -> None:
    now = datetime(2026, 11, 9, 9, 0, 0, tzinfo=UTC)
    answers = [
        {"Retry-After": "3"},
        {"Retry-After": email.utils.format_datetime(now + timedelta(seconds=7), usegmt=True)},
        {"Retry-After": email.utils.format_datetime(now - timedelta(hours=1), usegmt=True)},
        {"Retry-After": "3600"},
        {"Retry-After": "whenever"},
    ]

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if not answers:
            return web.json_response({"accepted": 1, "seqs": [7], "request_id": "r"})
        return web.json_response({"error": {}}, status=429, headers=answers.pop(0))

    app = web.Application()
    app.router.add_post("/v1/facts", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sleeps: list[float] = []
    try:
        outcome = await asyncio.to_thread(
            post_fact,
            f"http://127.0.0.1:{port}",
            {"project": "tower-a", "kind": "task", "id": "T-17", "data": {}},
            token=None,
            idempotency_key="k",
            retries=5,
            timeout_s=5,
            backoff_s=0.001,
            sleep=sleeps.append,
            clock=FixedClock(now),
        )
    finally:
        await runner.cleanup()
    assert outcome.ok and outcome.attempts == 6
    # seconds; an HTTP-date from the clock's now; a past date: the backoff alone; the
    # limit; garbage: the backoff alone
    assert sleeps[:2] == [3.0, 7.0]
    assert sleeps[2] < 0.1 and sleeps[4] < 0.1
    assert sleeps[3] == MAX_RETRY_AFTER_S


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize(("strict", "code"), [((), 0), (("--strict",), 1)])
def test_unreachable_daemon_never_fails_the_build_unless_strict(
    strict: tuple[str, ...], code: int
) -> None:
    env = {**os.environ, "GATEKEEPER_URL": f"http://127.0.0.1:{free_port()}"}
    env.pop("GATEKEEPER_TOKEN", None)
    argv = [*FACT_ARGS, "--set", "status=completed", "--retries", "2", "--backoff-s", "0.01"]
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper.cli.emit", *argv, *strict],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == code, done.stderr
    assert "warning: fact tower-a/task/T-17 not posted after 3 attempts" in done.stderr
    assert "cannot reach gatekeeper at http://127.0.0.1:" in done.stderr
    assert done.stdout == ""


# -- CI integration files ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_pre_commit_hook_checks_changed_rule_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gatekeeper.cli.main import main

    [hook] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "gatekeeper-check" and hook["language"] == "python"
    assert hook["entry"] == "gatekeeper check" and hook["pass_filenames"] is True
    files, exclude = re.compile(hook["files"]), re.compile(hook["exclude"])
    rule_files = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "rules").rglob("*.y*ml")
        if files.search(str(path.relative_to(ROOT)))
        and not exclude.search(str(path.relative_to(ROOT)))
    )
    assert rule_files and not any(name.endswith(".test.yaml") for name in rule_files)
    assert not files.search("gatekeeper.yaml") and not files.search("src/rules.yaml")
    # what pre-commit runs, from the repository root: entry, args, then the file names
    monkeypatch.chdir(ROOT)
    assert main([*hook["entry"].split()[1:], *hook["args"], *rule_files]) == 0, capsys.readouterr()


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples_run_check_test_and_plan(name: str) -> None:
    text = (ROOT / "examples" / "ci" / name).read_text()
    assert isinstance(yaml.safe_load(text), dict)
    for command in (
        "pip install -e .",
        "gatekeeper check",
        "gatekeeper test rules/",
        'gatekeeper plan --from "$GATEKEEPER_URL" --fail-on release --rules rules/',
    ):
        assert command in text, command
    assert "GATEKEEPER_TOKEN" in text
