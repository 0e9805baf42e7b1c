"""Metrics (``metrics_response``, the Prometheus text format) and the logs: request ids carried
into the decision and delivery log lines, and ``serve --log-format json``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatekeeper.http.app import metrics_response
from gatekeeper.metrics import Metrics

from .conftest import DEPLOY_RULE, DESIGN_RULE, ENV, SECRET, Project, Receiver, fact
from .test_cli import free_port

APPROVED = fact("milestone", "design", status="approved", approved_at="2026-11-01T09:00:00Z")
QA_PASSED = fact("quality_gate", "qg1", passed=True)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(daemon: Any) -> tuple[str, Samples]:
    response = await metrics_response(daemon)
    assert response.body is not None
    text = bytes(response.body).decode()  # type: ignore[arg-type]
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return response.headers["Content-Type"], samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_after_a_release_is_delivered(
    project_factory: Callable[..., Project],
    start_daemon: Callable[..., Any],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gatekeeper")
    project = project_factory(receiver.url)
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    async with gk.session.post(
        gk.url + "/v1/facts",
        json={"facts": [APPROVED, QA_PASSED]},
        headers={"X-Request-Id": "req-metrics-1"},
    ) as response:
        assert response.status == 200, await response.text()
    await receiver.wait_for(2)
    for _ in range(100):  # the outcome is recorded just after the receiver answers
        content_type, samples = await scrape(gk.daemon)
        delivered = [
            value(samples, "gatekeeper_actions_total", target=target, status="delivered")
            for target in ("escrow-bank", "finance-chat")
        ]
        if all(delivered) and value(samples, "gatekeeper_outbox_pending") == 0:
            break
        await asyncio.sleep(0.05)

    assert content_type.startswith("text/plain")
    assert value(samples, "gatekeeper_facts_accepted_total") == 2
    assert value(samples, "gatekeeper_decisions_total", outcome="fired") == 1
    for target in ("escrow-bank", "finance-chat"):
        assert value(samples, "gatekeeper_actions_total", target=target, status="queued") == 1
        assert value(samples, "gatekeeper_actions_total", target=target, status="delivered") == 1
        attempts = value(samples, "gatekeeper_delivery_attempts_total", target=target, result="2xx")
        assert attempts == 1
        assert value(samples, "gatekeeper_delivery_seconds_count", target=target) == 1
    assert value(samples, "gatekeeper_escrow_released", escrow="tower-a-escrow") == 5000.0
    assert value(samples, "gatekeeper_escrow_remaining", escrow="tower-a-escrow") == 15000.0
    assert value(samples, "gatekeeper_outbox_pending") == 0
    assert value(samples, "gatekeeper_dead_letters") == 0
    assert value(samples, "gatekeeper_ruleset_reloads_total", result="success") == 1
    assert value(samples, "gatekeeper_ruleset_reloads_total", result="failure") == 0
    version = gk.daemon.writer.engine.ruleset.version
    assert value(samples, "gatekeeper_ruleset_info", version=version) == 1
    assert (value(samples, "gatekeeper_ruleset_last_success_timestamp_seconds") or 0) > 0
    assert (value(samples, "gatekeeper_evaluations_total", trigger="fact") or 0) >= 1
    assert (value(samples, "gatekeeper_evaluation_seconds_count", trigger="fact") or 0) >= 1
    assert value(samples, "gatekeeper_deadlines_pending") == 0
    # handed over in memory on a SQLite file (this daemon's alone): sent without a claim
    assert value(samples, "gatekeeper_delivery_claims_total") == 0
    assert value(samples, "gatekeeper_delivery_lease_expired_total") == 0
    daemon_id = gk.daemon.dispatcher.daemon_id
    assert value(samples, "gatekeeper_daemon_info", daemon_id=daemon_id) == 1

    # the request id is carried into the decision and the delivery log lines
    fired = [r for r in caplog.records if r.getMessage().startswith("rule fired")]
    assert [getattr(r, "request_id", None) for r in fired] == ["req-metrics-1"]
    lines = [r for r in caplog.records if r.getMessage().startswith("action delivered")]
    assert len(lines) == 2
    assert {getattr(r, "request_id", None) for r in lines} == {"req-metrics-1"}
    assert all(SECRET not in r.getMessage() for r in caplog.records)


async def test_refused_reload_and_dead_letters_are_counted(
    project_factory: Callable[..., Project],
    start_daemon: Callable[..., Any],
    receiver: Receiver,
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    receiver.responses = [400]  # not retryable: a dead letter at once
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    await receiver.wait_for(1)
    project.write_rule("broken.yaml", "id: [unclosed\n")
    assert await gk.daemon.reload() is False
    for _ in range(100):
        _, samples = await scrape(gk.daemon)
        dead = value(samples, "gatekeeper_actions_total", target="ci", status="dead")
        if dead and value(samples, "gatekeeper_dead_letters") == 1:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "gatekeeper_dead_letters") == 1
    assert value(samples, "gatekeeper_actions_total", target="ci", status="dead") == 1
    assert value(samples, "gatekeeper_delivery_attempts_total", target="ci", result="4xx") == 1
    assert value(samples, "gatekeeper_ruleset_reloads_total", result="failure") == 1
    assert value(samples, "gatekeeper_ruleset_reloads_total", result="success") == 1


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.fact_rejected("invalid")
    assert b'gatekeeper_facts_rejected_total{reason="invalid"} 1.0' in first.render()
    assert b"gatekeeper_facts_rejected_total{" not in second.render()


def test_serve_logs_json_lines_without_secrets(project_factory: Callable[..., Project]) -> None:
    project = project_factory()  # the targets point at a closed port: deliveries fail
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "gatekeeper", "serve", "-c", str(project.config_path)),
            *("--listen", f"127.0.0.1:{port}", "--log-format", "json"),
        ],
        env={**os.environ, **ENV},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready_by = time.monotonic() + 30  # a loaded CI machine can take a while to start it
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                assert process.poll() is None, "gatekeeper serve exited at start"
                assert time.monotonic() < ready_by, "gatekeeper serve not ready in 30 s"
                time.sleep(0.1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/facts",
            data=json.dumps(fact("task", "T-17", status="completed")).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": "req-json-1"},
        )
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        time.sleep(0.5)  # a delivery attempt fails and is logged
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert SECRET not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
        assert line["time"].endswith("Z") and "T" in line["time"]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("ruleset ") and " loaded from " in m for m in messages)
    fired = [line for line in lines if line["message"].startswith("rule fired")]
    assert fired and fired[0]["request_id"] == "req-json-1"
    assert fired[0]["rule_id"] == "tower-a/deploy-docs"
    assert any(m.startswith("shutting down on SIGTERM") for m in messages)


async def test_healthz_names_the_daemon_and_says_whether_its_database_answers(
    project_factory: Callable[..., Project], start_daemon: Callable[..., Any]
) -> None:
    project = project_factory(daemon_id="gk-test-1")
    project.write_rule("design.yaml", DESIGN_RULE)
    gk = await start_daemon(project)
    status, body = await gk.get("/healthz")
    assert status == 200
    assert (body["status"], body["daemon_id"], body["database"]) == ("ok", "gk-test-1", "ok")
    _, samples = await scrape(gk.daemon)
    assert value(samples, "gatekeeper_daemon_info", daemon_id="gk-test-1") == 1
    await gk.daemon.store.close()  # the database is gone from under the daemon
    status, body = await gk.get("/healthz")
    assert status == 503
    assert (body["status"], body["database"], body["daemon_id"]) == (
        "degraded",
        "unreachable",
        "gk-test-1",
    )
    await gk.daemon.store.open()  # back, for the daemon's own stop
    assert (await gk.get("/healthz"))[0] == 200


def test_a_daemon_without_a_configured_id_makes_one() -> None:
    from gatekeeper.delivery.dispatcher import new_daemon_id

    host, pid, suffix = new_daemon_id().rsplit(":", 2)
    assert host and pid == str(os.getpid()) and len(suffix) == 6
    assert new_daemon_id() != new_daemon_id()
