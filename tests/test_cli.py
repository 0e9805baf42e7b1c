"""The ``gatekeeper`` command as a user runs it: real subprocesses, exit codes, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .conftest import DEPLOY_RULE, ENV, Project

REPO = Path(__file__).resolve().parent.parent


def gatekeeper(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatekeeper", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_check_bundled_rules_with_bundled_config() -> None:
    result = gatekeeper("check", "rules/", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("SUCCESS")


def test_check_reports_bad_rule_with_file_and_line(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE.replace("target: ci", "target: cj"))
    result = gatekeeper("check", "-c", str(project.config_path), str(project.rules_dir))
    assert result.returncode == 1
    assert "deploy.yaml:" in result.stdout
    assert "cj" in result.stdout
    as_json = gatekeeper(
        "check", "--format", "json", "-c", str(project.config_path), str(project.rules_dir)
    )
    report = json.loads(as_json.stdout)
    assert report["valid"] is False
    assert report["problems"][0]["line"] == 6


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    assert gatekeeper("check", str(tmp_path / "nope")).returncode == 2
    assert gatekeeper("check", "-c", str(tmp_path / "missing.yaml")).returncode == 2
    assert gatekeeper("check", "--format", "xml").returncode == 2
    assert gatekeeper("frobnicate").returncode == 2


def test_serve_refuses_non_loopback_without_tokens(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    result = gatekeeper("serve", "-c", str(project.config_path), "--listen", "0.0.0.0:8080")
    assert result.returncode == 1
    assert "refusing to listen on 0.0.0.0" in result.stderr


def test_serve_names_missing_secret_and_exits_1(project_factory: Callable[..., Project]) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    result = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "BANK_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_answers_and_exits_0_on_sigterm(project_factory: Callable[..., Project]) -> None:
    project = project_factory()
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gatekeeper",
            "serve",
            "-c",
            str(project.config_path),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env={**os.environ, **ENV},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        body = None
        ready_by = time.monotonic() + 30  # a loaded CI machine can take a while to start it
        while time.monotonic() < ready_by and process.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/healthz"
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.1)
        assert body is not None and body["status"] == "ok"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/facts",
            data=json.dumps(
                {"project": "tower-a", "kind": "task", "id": "T-1", "data": {"status": "x"}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            assert json.loads(response.read())["seqs"] == [1]
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
        assert process.returncode == 0
        assert "shutting down on SIGTERM" in log
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
