"""The OpenAPI description (``GET /openapi.json``) is valid, lists exactly the server's
routes, and the live daemon keeps to it under generated good and bad input (schemathesis)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gatekeeper import __version__
from gatekeeper.config import load_config
from gatekeeper.http.app import create_app
from gatekeeper.http.openapi import build_openapi
from gatekeeper.runtime.daemon import Daemon

from .conftest import DEPLOY_RULE, DESIGN_RULE, ENV, Project, Running, fact


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """A JSON body is RFC 8259 JSON: no NaN or Infinity (Python's json would read them).
    (/metrics answers Prometheus text, which content_type_conformance checks.)"""
    content_type = response.headers.get("Content-Type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.content and content_type.startswith("application/json"):
        try:
            json.loads(response.content, parse_constant=reject_constant)
        except ValueError as error:
            raise AssertionError(f"the response body is not JSON: {error}") from None
    return None


CHECKS = [
    not_a_server_error,
    strict_json,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 50
"""Generated requests per operation and generation mode (positive, negative)."""
HTTP_TIMEOUT_S = 5.0
DOC_URI = "urn:gatekeeper:openapi"


# ---------------------------------------------------------------------------------------------
# The document itself


def iter_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def resolve_pointer(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_document_is_valid_openapi_3_1() -> None:
    doc = build_openapi()
    assert doc["openapi"].startswith("3.1.")
    assert doc["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["info"]["version"] == __version__
    # the OpenAPI 3.1 meta-schema, as schemathesis checks it before testing
    schemathesis.openapi.from_dict(build_openapi()).validate()
    # every schema is a valid JSON Schema 2020-12 ...
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as error:  # pragma: no cover - the message is the point
            pytest.fail(f"components/schemas/{name}: {error.message}")
    # ... and every reference resolves inside the document
    for ref in set(iter_refs(doc)):
        resolve_pointer(doc, ref)
    assert not any("$defs" in ref for ref in iter_refs(doc))


def test_callers_cannot_change_the_cached_document() -> None:
    first = build_openapi()
    first["info"]["version"] = "changed"
    first["paths"].clear()
    again = build_openapi()
    assert again["info"]["version"] == __version__
    assert "/v1/facts" in again["paths"]


def test_facts_request_schema_is_the_one_the_server_validates_with() -> None:
    from gatekeeper.schemas import load_schema

    doc = build_openapi()
    source = load_schema("facts-request.schema.json")
    assert doc["components"]["schemas"]["fact"] == source["$defs"]["fact"]
    body = doc["paths"]["/v1/facts"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/FactsRequest"}
    assert doc["components"]["schemas"]["FactsRequest"]["oneOf"][0] == {
        "$ref": "#/components/schemas/fact"
    }


def test_every_route_is_documented_and_nothing_else(
    project_factory: Callable[..., Project],
) -> None:
    project = project_factory()
    app = create_app(Daemon(load_config(project.config_path), ENV, watch=False))
    routes = set()
    for route in app.router.routes():
        assert route.resource is not None
        routes.add((route.method, route.resource.canonical))
    served = {(method, path) for method, path in routes if method != "HEAD"}
    # aiohttp answers HEAD for every GET (the document says so once, in its description)
    assert {path for method, path in routes if method == "HEAD"} == {
        path for method, path in served if method == "GET"
    }
    doc = build_openapi()
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert served == documented


# ---------------------------------------------------------------------------------------------
# The live daemon against the document


def schema_validator(doc: dict[str, Any], pointer: str) -> jsonschema.Draft202012Validator:
    """A validator of the schema at ``pointer`` in ``doc`` (references resolved in ``doc``)."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{DOC_URI}{pointer}"},
        registry=registry,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def error_validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return schema_validator(doc, f"#/components/responses/{name}/content/application~1json/schema")


async def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def live(project_factory: Callable[..., Project], start_daemon: Any) -> Running:
    """A daemon with rules that fired: a release dead-lettered (its target refuses
    connections), notifications and a pipeline still pending."""
    project = project_factory(max_body_bytes=65536)  # targets at 127.0.0.1:9: refused
    project.write_rule("design.yaml", DESIGN_RULE)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    running: Running = await start_daemon(project)
    status, _ = await running.post(
        "/v1/facts",
        {
            "facts": [
                fact("milestone", "design", status="approved"),
                fact("quality_gate", "qg1", passed=True),
                fact("task", "T-17", status="completed"),
            ]
        },
    )
    assert status == 200

    async def release_is_dead() -> bool:
        _, body = await running.get("/v1/actions?status=dead")
        return any(action["kind"] == "release" for action in body["actions"])

    await wait_for(release_is_dead)
    return running


def fuzz(
    base_url: str, doc: dict[str, Any], known: dict[str, list[str]]
) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Run schemathesis on every operation of ``doc`` against ``base_url``: generated good
    and bad requests, plus requests for the rules and actions that exist (``known``).
    Returns the failures, each with its curl reproduction, and the statuses seen per
    operation."""
    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    session = requests.Session()

    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, timeout=HTTP_TIMEOUT_S)
        seen[(case.operation.label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if operation.path_parameters or operation.query or operation.headers or operation.body:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def generated(case: Any) -> None:
                run(case)

            try:
                generated()
            except Unsatisfiable:
                # nothing to negate: a path parameter that may be any non-empty string
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as error:
                failures.append(f"{operation.label} ({mode.value}): {error}")
        for name, ids in known.items():
            if name not in operation.path_parameters:
                continue
            for value in ids:
                try:
                    if operation.path.endswith("/cancel"):  # a dead release: 200
                        case = operation.Case(
                            path_parameters={name: value},
                            body={"reason": "fuzzing the live daemon"},
                            media_type="application/json",
                        )
                        run(case)
                        continue
                    if "act" in operation.path_parameters:  # pause, then resume: both 200
                        for act in ("pause", "resume"):
                            case = operation.Case(
                                path_parameters={name: value, "act": act},
                                body={"reason": "fuzzing the live daemon"},
                                media_type="application/json",
                            )
                            run(case)
                        continue
                    run(operation.Case(path_parameters={name: value}))
                except Exception as error:
                    failures.append(f"{operation.label} {name}={value!r}: {error}")
    session.close()
    return failures, seen


@pytest.mark.timeout(120)
async def test_live_daemon_keeps_to_the_document(live: Running) -> None:
    _, actions = await live.get("/v1/actions")
    _, rulesets = await live.get("/v1/rulesets")
    known = {
        "rule_id": ["tower-a/design-release", "tower-a/deploy-docs"],
        "action_id": [action["action_id"] for action in actions["actions"]],
        "release_id": [a["action_id"] for a in actions["actions"] if a["kind"] == "release"],
        "version": [r["version"] for r in rulesets["rulesets"]],
        "escrow": ["tower-a-escrow"],
        "target": ["escrow-bank"],
    }
    assert {a["status"] for a in actions["actions"]} >= {"dead", "pending"}
    started = time.monotonic()
    failures, seen = await asyncio.to_thread(fuzz, live.url, build_openapi(), known)
    elapsed = time.monotonic() - started
    assert not failures, "\n\n".join(failures)
    # not vacuous: every operation was answered 200 at least once, and bad input was refused
    statuses: dict[str, set[int]] = {}
    for (label, status), _count in seen.items():
        statuses.setdefault(label, set()).add(status)
    summary = {label: sorted(codes) for label, codes in statuses.items()}
    # these cannot succeed against this daemon: approvals and sign-offs need API tokens (the
    # approver is the token's subject), it has no hook sources, and a settlement must be
    # signed by the bank; tests/test_auth.py, tests/test_signoffs.py,
    # tests/test_hooks_http.py and tests/test_ledger_http.py cover their 200s
    cannot_succeed = {
        "POST /v1/approvals",
        "POST /v1/hooks/{source}",
        "POST /v1/money-rules/{content_hash}/signoffs",
        "POST /v1/settlements/{target}",
    }
    assert all(200 in codes for label, codes in statuses.items() if label not in cannot_succeed), (
        summary
    )
    assert {403} <= statuses["POST /v1/approvals"], summary
    assert {404} <= statuses["POST /v1/hooks/{source}"], summary
    assert {401, 404} <= statuses["POST /v1/settlements/{target}"], summary
    assert {400, 403} <= statuses["POST /v1/money-rules/{content_hash}/signoffs"], summary
    assert len(statuses) == 25, summary
    assert {200, 400, 422} <= statuses["POST /v1/facts"], summary
    assert {200, 404, 409} <= statuses["POST /v1/actions/{action_id}/retry"], summary
    assert {200, 404, 422} <= statuses["POST /v1/actions/{action_id}/cancel"], summary
    assert {200, 404} <= statuses["GET /v1/escrows/{escrow}/entries"], summary
    assert elapsed < 60, f"the fuzzing took {elapsed:.0f} s"


async def test_served_document_is_the_built_one(live: Running) -> None:
    status, body = await live.get("/openapi.json")
    assert status == 200
    assert body == json.loads(json.dumps(build_openapi()))


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "response"),
    [
        ("GET", "/nope", {}, 404, "NotFound"),
        ("GET", "/v1/facts/", {}, 404, "NotFound"),
        ("DELETE", "/v1/facts", {}, 405, "MethodNotAllowed"),
        ("POST", "/healthz", {}, 405, "MethodNotAllowed"),
        ("PUT", "/v1/rules/tower-a/design-release", {}, 405, "MethodNotAllowed"),
        ("GET", "/v1/actions/act_1/retry", {}, 405, "MethodNotAllowed"),
        ("POST", "/v1/facts", {"data": b'{"project": '}, 400, "BadRequest"),
        ("POST", "/v1/facts", {"data": b"\xff\xfe"}, 400, "BadRequest"),
        ("POST", "/v1/facts", {"data": b""}, 400, "BadRequest"),
        ("POST", "/v1/facts", {"data": b"[]"}, 400, "BadRequest"),
        ("POST", "/v1/facts", {"data": b'{"facts": []}'}, 400, "BadRequest"),
        (
            "POST",
            "/v1/facts",
            {"data": b"{}", "content_type": "text/plain"},
            415,
            "UnsupportedMediaType",
        ),
        ("POST", "/v1/facts", {"data": b"{}", "content_type": None}, 415, "UnsupportedMediaType"),
        ("POST", "/v1/facts", {"data": b"[" * 70000}, 413, "PayloadTooLarge"),
        ("POST", "/v1/actions/act_x/retry", {"data": b"nope"}, 400, "BadRequest"),
        ("POST", "/v1/actions/act_x/retry", {"data": b'{"reason": 1}'}, 400, "BadRequest"),
        (
            "POST",
            "/v1/actions/act_x/retry",
            {"data": b"{}", "content_type": "text/plain"},
            415,
            "UnsupportedMediaType",
        ),
        ("POST", "/v1/actions/act_x/retry", {"data": b"{}"}, 404, "NotFound"),
        ("GET", "/v1/actions?limit=0", {}, 400, "BadRequest"),
        ("GET", "/v1/actions?status=lost", {}, 400, "BadRequest"),
        ("GET", "/v1/rules/tower-a/design-release?limit=x", {}, 400, "BadRequest"),
        ("GET", "/v1/rules/nope", {}, 404, "NotFound"),
    ],
)
async def test_errors_have_the_documented_body(
    live: Running, method: str, path: str, kwargs: dict[str, Any], status: int, response: str
) -> None:
    headers = {}
    content_type = kwargs.get("content_type", "application/json")
    if "data" in kwargs and content_type is not None:
        headers["Content-Type"] = content_type
    async with live.session.request(
        method, live.url + path, data=kwargs.get("data"), headers=headers
    ) as answer:
        assert answer.status == status
        assert answer.content_type == "application/json"
        body = await answer.json()
    error_validator(build_openapi(), response).validate(body)


# ---------------------------------------------------------------------------------------------
# Bad input found by this testing (each was a server bug before its fix)


@pytest.mark.parametrize("path", ["/v1/actions", "/v1/rules/tower-a/design-release"])
async def test_a_limit_of_5000_digits_is_a_400(live: Running, path: str) -> None:
    async with live.session.get(f"{live.url}{path}?limit={'9' * 5000}") as answer:
        assert answer.status == 400
        error_validator(build_openapi(), "BadRequest").validate(await answer.json())


async def test_a_number_beyond_the_float_range_is_refused_or_kept_json(live: Running) -> None:
    body = b'{"project": "tower-a", "kind": "task", "id": "T-9", "data": {"x": 1e400}}'
    headers = {"Content-Type": "application/json"}
    async with live.session.post(live.url + "/v1/facts", data=body, headers=headers) as answer:
        status = answer.status
    if status == 200:
        async with live.session.get(live.url + "/v1/facts") as answer:
            json.loads(await answer.read(), parse_constant=reject_constant)
    else:
        assert status == 400


@pytest.mark.parametrize("field", ["project", "kind", "id"])
async def test_an_identifier_with_a_trailing_newline_is_a_400(live: Running, field: str) -> None:
    body = {**fact("task", "T-9"), "data": {}}
    body[field] += "\n"
    status, error = await live.post("/v1/facts", body)
    assert status == 400, error


async def test_a_405_says_which_methods_are_allowed(live: Running) -> None:
    async with live.session.delete(live.url + "/v1/facts") as answer:
        assert answer.status == 405
        assert set(answer.headers.get("Allow", "").replace(" ", "").split(",")) == {
            "GET",
            "HEAD",
            "POST",
        }
