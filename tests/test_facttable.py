"""FactTable keeps facts' data in a compact form: equal to what was put, with repeated
strings shared, and the pool of shared strings bounded."""

from __future__ import annotations

import json
from typing import Any

from gatekeeper.engine.facts import FactTable


def decoded(i: int) -> dict[str, Any]:
    """Fact data as the store or the API hands it over: fresh strings from ``json.loads``."""
    data = {
        "status": "open",
        "title": f"a long title that is not shared {i}",
        "reviews": [{"by": "alice", "ok": True}],
        "meta": {"phase": "design", "n": i},
    }
    loaded: dict[str, Any] = json.loads(json.dumps(data))
    return loaded


def test_data_reads_back_equal_and_repeated_strings_are_shared() -> None:
    table = FactTable({("p", "task", f"T-{i}"): decoded(i) for i in range(3)})
    first, second = table.get(("p", "task", "T-0")), table.get(("p", "task", "T-1"))
    assert first == decoded(0) and second == decoded(1)
    assert table.of_kind("p", "task")["T-2"] == decoded(2)
    key_first, key_second = next(iter(first or {})), next(iter(second or {}))
    assert key_first == key_second == "status" and key_first is key_second
    assert first is not None and second is not None
    assert first["status"] is second["status"]  # short value: shared
    assert first["reviews"][0]["by"] is second["reviews"][0]["by"]  # nested too
    assert first["title"] is not second["title"]  # long values are kept as they are
    assert first["meta"]["n"] == 0 and second["meta"]["n"] == 1


def test_overlay_reads_through_and_keeps_its_own_writes_apart() -> None:
    table = FactTable({("p", "task", "T-0"): decoded(0)})
    view = table.overlay()
    view.put(("p", "task", "T-1"), decoded(1))
    assert view.get(("p", "task", "T-0")) == decoded(0)
    assert set(view.of_kind("p", "task")) == {"T-0", "T-1"}
    assert table.get(("p", "task", "T-1")) is None


def test_the_pool_of_shared_strings_is_bounded() -> None:
    table = FactTable()
    table.SHARED_MAX_STRINGS = 10
    for i in range(50):
        table.put(("p", "task", f"T-{i}"), {"code": f"c{i}"})
    assert len(table._strings) == 10
    assert table.get(("p", "task", "T-49")) == {"code": "c49"}


def test_snapshot_lists_the_tables_own_facts() -> None:
    table = FactTable({("p", "task", "T-0"): {"a": 1}, ("q", "gate", "g"): {"b": 2}})
    view = table.overlay()
    view.put(("p", "task", "T-1"), {"a": 3})
    assert table.snapshot() == {("p", "task", "T-0"): {"a": 1}, ("q", "gate", "g"): {"b": 2}}
    assert view.snapshot() == {("p", "task", "T-1"): {"a": 3}}


def test_evaluations_share_the_tables_data_and_an_overlay_keeps_its_own_copy() -> None:
    from datetime import UTC, datetime

    from gatekeeper.engine.facts import ProjectFacts
    from gatekeeper.expr import compile_condition

    now = datetime(2026, 11, 22, tzinfo=UTC)
    table = FactTable({("p", "task", "T-0"): decoded(0)})
    view = table.overlay()
    posted = decoded(1)
    view.put(("p", "task", "T-1"), posted)
    posted["status"] = "changed after the put"
    assert view.get(("p", "task", "T-1")) == decoded(1)  # the overlay's own copy
    condition = compile_condition('task["T-0"].status == "open" and task["T-1"].status == "open"')
    first = condition.evaluate(ProjectFacts("p", view), now)
    second = condition.evaluate(ProjectFacts("p", view), now)
    assert first.value and second.value
    for name, key in (("task.T-0", ("p", "task", "T-0")), ("task.T-1", ("p", "task", "T-1"))):
        assert first.seen[name] is second.seen[name] is view.get(key)  # one dict, no copies

    class Plain:  # a lookup that does not promise to leave its data alone
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def get(self, kind: str, id: str) -> dict[str, Any] | None:
            return self.data if (kind, id) == ("task", "T-0") else None

        def of_kind(self, kind: str) -> dict[str, dict[str, Any]]:
            return {"T-0": self.data} if kind == "task" else {}

    data = decoded(0)
    seen = compile_condition('task["T-0"].status == "open"').evaluate(Plain(data), now).seen
    assert seen["task.T-0"] == data and seen["task.T-0"] is not data  # copied
