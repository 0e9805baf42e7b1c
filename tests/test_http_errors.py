"""Bad input over HTTP: always a JSON error with a clear message, never a traceback, and
nothing stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import DESIGN_RULE, Project, Running, fact


@pytest.fixture
async def gk(project_factory: Callable[..., Project], start_daemon: Any) -> Running:
    project = project_factory(max_body_bytes=4096)
    project.write_rule("design.yaml", DESIGN_RULE)
    running: Running = await start_daemon(project)
    return running


def fact_log_count(gk: Running) -> int:
    db = sqlite3.connect(gk.daemon.config.database)
    try:
        return int(db.execute("SELECT COUNT(*) FROM fact_log").fetchone()[0])
    finally:
        db.close()


async def raw_post(gk: Running, path: str, data: bytes, content_type: str) -> tuple[int, Any]:
    async with gk.session.post(
        gk.url + path, data=data, headers={"Content-Type": content_type}
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def test_malformed_json_is_400(gk: Running) -> None:
    status, body = await raw_post(gk, "/v1/facts", b'{"project": ', "application/json")
    assert status == 400
    assert body["error"]["message"].startswith("malformed JSON")
    assert fact_log_count(gk) == 0


async def test_wrong_shape_lists_each_problem_with_json_path(gk: Running) -> None:
    status, body = await gk.post(
        "/v1/facts",
        {"facts": [fact("task", "T-1"), {"project": "tower-a", "kind": "task", "data": []}]},
    )
    assert status == 400
    paths = {p["path"] for p in body["error"]["problems"]}
    assert paths == {"$.facts[1]", "$.facts[1].data"}
    assert fact_log_count(gk) == 0


@pytest.mark.parametrize(
    "body",
    [
        [],
        "a string",
        {"facts": []},
        {"project": "tower-a", "kind": "task", "id": "T-1", "data": {}, "extra": 1},
        {"project": "Tower A", "kind": "task", "id": "T-1", "data": {}},
        {"project": "tower-a", "kind": "task", "id": "../etc", "data": {}},
    ],
)
async def test_invalid_bodies_are_400(gk: Running, body: Any) -> None:
    status, answer = await gk.post("/v1/facts", body)
    assert status == 400
    assert answer["error"]["status"] == 400
    assert fact_log_count(gk) == 0


async def test_non_json_content_type_is_415(gk: Running) -> None:
    status, body = await raw_post(gk, "/v1/facts", b"project=tower-a", "text/plain")
    assert status == 415
    assert "application/json" in body["error"]["message"]


async def test_oversized_body_is_413(gk: Running) -> None:
    big = fact("task", "T-1", note="x" * 10_000)
    status, body = await gk.post("/v1/facts", big)
    assert status == 413
    assert body["error"]["message"] == "request body too large"
    assert fact_log_count(gk) == 0


async def test_unknown_route_is_json_404(gk: Running) -> None:
    status, body = await gk.get("/v1/nothing-here")
    assert status == 404
    assert body["error"]["status"] == 404
    status, body = await gk.get("/v1/rules/no/such-rule")
    assert status == 404
    assert "no/such-rule" in body["error"]["message"]


async def test_wrong_method_is_json_405(gk: Running) -> None:
    async with gk.session.delete(gk.url + "/v1/facts") as response:
        assert response.status == 405
        assert (await response.json())["error"]["status"] == 405


async def test_bad_query_parameters_are_400(gk: Running) -> None:
    status, _ = await gk.get("/v1/actions?status=lost")
    assert status == 400
    status, _ = await gk.get("/v1/actions?limit=-1")
    assert status == 400


async def test_healthz(gk: Running) -> None:
    status, body = await gk.get("/healthz")
    assert status == 200
    assert body["status"] == "ok"
    assert body["ruleset_ok"] is True


@pytest.mark.parametrize("key", ["hook:github:42", "approval:alice:k1"])
async def test_a_facts_client_may_not_take_the_daemons_own_idempotency_keys(
    gk: Running, key: str
) -> None:
    """A facts:write client that could send ``hook:<source>:<delivery>`` would make that
    hook delivery a conflict (422) and never applied; ``approval:...`` the same for an
    approver's retry."""
    async with gk.session.post(
        gk.url + "/v1/facts",
        json=fact("task", "T-1", status="done"),
        headers={"Idempotency-Key": key},
    ) as response:
        assert response.status == 400
        assert "must not start with" in (await response.json())["error"]["message"]
    assert fact_log_count(gk) == 0
    async with gk.session.post(
        gk.url + "/v1/facts",
        json=fact("task", "T-1", status="done"),
        headers={"Idempotency-Key": "deploy-" + key.replace(":", "-")},
    ) as response:
        assert response.status == 200
