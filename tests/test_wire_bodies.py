"""Approval, admin-act and retry bodies are decoded by the wire models (``http.models``):
a body of the wrong shape is a 400 worded as before, deep nesting is a 400 (msgspec raises
``RecursionError`` there, which must not become a 500), and malformed JSON is a 400."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from gatekeeper.http.wire import new_request_id

from .conftest import Running
from .test_auth import TOKENS, call, gk  # noqa: F401 (gk is a fixture)

RULE = "tower-a/structure-release"


async def post_raw(
    gk: Running,  # noqa: F811
    path: str,
    who: str,
    raw: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    sent = {
        "Authorization": f"Bearer {TOKENS[who]}",
        "Content-Type": "application/json",
        **(headers or {}),
    }
    async with gk.session.post(gk.url + path, data=raw.encode(), headers=sent) as response:
        return response.status, await response.json(), dict(response.headers)


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], {"path": "$", "message": "must be an object"}),
        (
            {"rule": RULE, "decision": "approve", "approver": "alice"},
            {"path": "$.approver", "message": "unknown key 'approver'"},
        ),
        ({"decision": "approve"}, {"path": "$.rule", "message": "must be a rule id (a string)"}),
        (
            {"rule": "", "decision": "approve"},
            {"path": "$.rule", "message": "must be a rule id (a string)"},
        ),
        (
            {"rule": RULE, "decision": "maybe"},
            {"path": "$.decision", "message": "must be one of: approve, reject, withdraw"},
        ),
        (  # every problem, unknown keys first (as before the wire model)
            {"approver": "alice", "decision": "maybe", "comment": 7},
            [
                {"path": "$.approver", "message": "unknown key 'approver'"},
                {"path": "$.rule", "message": "must be a rule id (a string)"},
                {"path": "$.decision", "message": "must be one of: approve, reject, withdraw"},
                {
                    "path": "$.comment",
                    "message": "must be a string of at most 2000 characters",
                },
            ],
        ),
        (
            {"rule": RULE, "decision": "approve", "comment": "x" * 2001},
            {"path": "$.comment", "message": "must be a string of at most 2000 characters"},
        ),
    ],
)
async def test_an_approval_of_the_wrong_shape_is_a_worded_400(
    gk: Running,  # noqa: F811
    body: Any,
    problem: dict[str, str] | list[dict[str, str]],
) -> None:
    status, answer = await call(gk, "POST", "/v1/approvals", "alice", body)
    assert status == 400, answer
    assert answer["error"]["message"] == "the request body is not a valid approval"
    assert answer["error"]["problems"] == (problem if isinstance(problem, list) else [problem])


@pytest.mark.parametrize(
    ("path", "who"),
    [
        ("/v1/approvals", "alice"),
        (f"/v1/rules/{RULE}/pause", "ops"),
        ("/v1/actions/act_1/retry", "ops"),
        ("/v1/facts", "ci"),
    ],
)
@pytest.mark.parametrize("raw", [DEEP, '{"reason": ' + DEEP + "}", "{", "NaN"])
async def test_deep_or_malformed_bodies_are_400_not_500(
    gk: Running,  # noqa: F811
    path: str,
    who: str,
    raw: str,
) -> None:
    status, answer, _ = await post_raw(gk, path, who, raw)
    assert status == 400, answer
    assert answer["error"]["message"].startswith("malformed JSON"), answer


async def test_an_admin_act_needs_a_reason_that_is_not_blank(gk: Running) -> None:  # noqa: F811
    for body in ({}, {"reason": "   "}, {"reason": 7}, [], {"reason": "x" * 2001}):
        status, answer = await call(gk, "POST", f"/v1/rules/{RULE}/pause", "ops", body)
        assert status == 400, (body, answer)
        assert answer["error"]["message"].startswith('the body must be {"reason": "..."}')
    status, answer = await call(
        gk, "POST", f"/v1/rules/{RULE}/pause", "ops", {"reason": " audit ", "extra": 1}
    )
    assert status == 200, answer
    assert answer["explanation"]["paused"] is True


async def test_an_approval_is_idempotent_on_its_json_not_its_bytes(gk: Running) -> None:  # noqa: F811
    key = {"Idempotency-Key": "approval-1"}
    first = json.dumps({"rule": RULE, "decision": "approve"})
    again = json.dumps({"decision": "approve", "rule": RULE}, indent=2)
    status, answer, _ = await post_raw(gk, "/v1/approvals", "alice", first, key)
    assert status == 200, answer
    status, replay, headers = await post_raw(gk, "/v1/approvals", "alice", again, key)
    assert status == 200, replay
    assert headers.get("Idempotent-Replayed") == "true"
    assert replay["seq"] == answer["seq"]
    other = json.dumps({"rule": RULE, "decision": "reject"})
    status, refused, _ = await post_raw(gk, "/v1/approvals", "alice", other, key)
    assert status == 422, refused


def test_a_new_request_id_is_a_uuid4_in_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
