"""Abuse cases for fact data: what the API accepts, every read endpoint can serve back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gatekeeper.config import Hook, HookFact
from gatekeeper.jsonwire import MAX_FACT_DEPTH, too_deep
from gatekeeper.runtime.hooks import HookRejected, map_event

from .conftest import Project, Receiver

DEEP_RULE = """\
id: tower-a/deep
project: tower-a
when: len(deep) >= 1 and deep.d1.level == 1
fire: each_time
actions:
  - notify: {target: finance-chat, message: "deep data seen"}
"""


def nested(depth: int) -> dict[str, Any]:
    """Fact data nesting objects and arrays ``depth`` levels deep (the data is level 1)."""
    value: Any = {"leaf": True}
    for level in range(depth - 1, 0, -1):
        value = {"level": level, "inner": value} if level % 2 else [value]
    assert not too_deep(value, depth) and too_deep(value, depth - 1)
    return dict(value)


def test_depth_counts_objects_and_arrays() -> None:
    assert not too_deep(5, 0)
    assert too_deep({}, 0) and not too_deep({}, 1)
    assert too_deep({"a": [1]}, 1) and not too_deep({"a": [1]}, 2)
    assert too_deep(nested(10_000))  # iterative: any depth can be asked about


async def read_back_everywhere(gk: Any, data: dict[str, Any]) -> None:
    status, facts = await gk.get("/v1/facts")
    assert status == 200, facts
    assert [f["data"] for f in facts["facts"] if f["kind"] == "deep"] == [data]
    status, export = await gk.get("/v1/export")
    assert status == 200, export
    assert data in [f["data"] for f in export["facts"] if f["kind"] == "deep"]
    status, rule = await gk.get("/v1/rules/tower-a/deep")
    assert status == 200, rule
    assert rule["explanation"]["gate_open"] is True


async def test_fact_data_at_the_depth_limit_reads_back_everywhere_and_after_restart(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deep.yaml", DEEP_RULE)
    gk = await start_daemon(project)
    data = nested(MAX_FACT_DEPTH)
    status, body = await gk.post(
        "/v1/facts", {"project": "tower-a", "kind": "deep", "id": "d1", "data": data}
    )
    assert status == 200, body
    await read_back_everywhere(gk, data)
    await gk.stop()
    gk2 = await start_daemon(project)
    await read_back_everywhere(gk2, data)


@pytest.mark.parametrize("depth", [MAX_FACT_DEPTH + 1, 500])
async def test_fact_data_over_the_depth_limit_is_refused_naming_it(
    project_factory: Callable[..., Project], start_daemon: Any, depth: int
) -> None:
    project = project_factory()
    project.write_rule("deep.yaml", DEEP_RULE)
    gk = await start_daemon(project)
    fine = '{"project": "tower-a", "kind": "deep", "id": "ok", "data": {"level": 1}}'
    data = '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)  # text: any depth
    deep = '{"project": "tower-a", "kind": "deep", "id": "d1", "data": ' + data + "}"
    raw = ('{"facts": [' + fine + ", " + deep + "]}").encode()
    headers = {"Content-Type": "application/json"}
    async with gk.session.post(gk.url + "/v1/facts", data=raw, headers=headers) as response:
        status, body = response.status, await response.json()
    assert status == 400, body
    assert f"limited to {MAX_FACT_DEPTH} levels" in body["error"]["message"]
    assert body["error"]["problems"] == [
        {
            "path": "$.facts[1].data",
            "message": f"is nested more than {MAX_FACT_DEPTH} levels deep "
            f"(the limit is {MAX_FACT_DEPTH})",
        }
    ]
    status, facts = await gk.get("/v1/facts")
    assert status == 200 and facts["facts"] == []  # all or nothing


def test_a_hook_mapping_a_too_deep_object_is_422_naming_the_limit() -> None:
    mapping = HookFact("push", "ci_run", "${id}", {"tree": "${tree}"})
    hook = Hook("github", "github", "S", "tower-a", (mapping,))
    fits = {"id": "1", "tree": nested(MAX_FACT_DEPTH - 1)}  # data {"tree": ...} adds a level
    assert map_event(hook, "push", fits)[0].data == {"tree": fits["tree"]}
    with pytest.raises(HookRejected) as rejected:
        map_event(hook, "push", {"id": "1", "tree": nested(MAX_FACT_DEPTH)})
    assert rejected.value.status == 422
    assert f"nested more than {MAX_FACT_DEPTH} levels deep" in str(rejected.value)
