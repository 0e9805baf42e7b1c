"""Abuse cases for the HTTP front door: query parameters a route does not take, slow and
too many clients, TLS, and per-token rate limits."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from gatekeeper.http.routes import ROUTES

from .conftest import DEPLOY_RULE, Project


def _project(project_factory: Callable[..., Project], **extra: Any) -> Project:
    project = project_factory(**extra)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    return project


# ---------------------------------------------------------------------------------------------
# Unknown query parameters

GET_ROUTES = [route for route in ROUTES if route.method == "GET"]


def _concrete(path: str) -> str:
    """A path of the route with a value in each path parameter."""
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: f"x-{m.group(1)}", path)


@pytest.mark.parametrize("route", GET_ROUTES, ids=[r.operation_id for r in GET_ROUTES])
async def test_every_get_route_refuses_an_unknown_query_parameter(
    route: Any, project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    live = await start_daemon(_project(project_factory))
    status, body = await live.get(_concrete(route.path) + "?bogus_filter=1")
    assert status == 400, body
    assert "'bogus_filter'" in body["error"]["message"]


async def test_audit_release_filter_is_refused_not_ignored(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    live = await start_daemon(_project(project_factory))
    status, body = await live.get("/v1/audit?release=act_1&limit=5")
    assert status == 400
    assert "'release'" in body["error"]["message"]
    assert "'limit'" not in body["error"]["message"]
    # the parameters a route declares are taken, with or without a query string
    assert (await live.get("/v1/audit?limit=5&kind=decision"))[0] == 200
    assert (await live.get("/v1/audit"))[0] == 200


def test_declared_query_parameters_are_the_documented_ones() -> None:
    from gatekeeper.http.openapi import build_openapi

    doc = build_openapi()
    for route in ROUTES:
        operation = doc["paths"][route.openapi_path][route.method.lower()]
        documented = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
        assert documented == route.query_names
        assert "400" in operation["responses"]
