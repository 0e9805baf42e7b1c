"""A loaded rule keeps its data as written (``Rule.source``) packed: equal to the data, read
only, and kept as it is when it holds what cannot be packed (a YAML timestamp); a loaded
ruleset keeps its files' texts packed too."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping

import pytest

from gatekeeper.rules.loader import load_rule_texts, ruleset_version
from gatekeeper.rules.model import PACK_TEXT_MIN_CHARS, PackedData, PackedTexts, pack_data

RULES = """\
- id: site/one
  project: site
  when: task["T-1"].status == "done"
  actions:
    - notify: {target: chat, message: "T-1 done"}
    - pipeline: {target: ci, ref: main, inputs: {n: "1"}}
- id: site/two
  project: site
  description: 'two, with a list and numbers'
  for_each: task
  when: item.data.hours >= 2.5
  fire: each_time
  approvals: {required: 1, from: [alice, bob]}
  actions:
    - set_fact: {kind: flag, id: "${item.id}", data: {ok: true, n: 3, x: -0.0, none: null}}
"""

WRITTEN = [
    {
        "id": "site/one",
        "project": "site",
        "when": 'task["T-1"].status == "done"',
        "actions": [
            {"notify": {"target": "chat", "message": "T-1 done"}},
            {"pipeline": {"target": "ci", "ref": "main", "inputs": {"n": "1"}}},
        ],
    },
    {
        "id": "site/two",
        "project": "site",
        "description": "two, with a list and numbers",
        "for_each": "task",
        "when": "item.data.hours >= 2.5",
        "fire": "each_time",
        "approvals": {"required": 1, "from": ["alice", "bob"]},
        "actions": [
            {
                "set_fact": {
                    "kind": "flag",
                    "id": "${item.id}",
                    "data": {"ok": True, "n": 3, "x": -0.0, "none": None},
                }
            }
        ],
    },
]


def test_the_source_of_loaded_rules_is_packed_and_equal_to_what_was_written() -> None:
    result = load_rule_texts({"site.yaml": RULES}, config=None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    for rule, written in zip(result.ruleset.rules, WRITTEN, strict=True):
        assert isinstance(rule.source, PackedData)
        assert rule.source == written
        assert dict(rule.source) == written
        assert list(rule.source) == list(written)  # key order as written
        assert len(rule.source) == len(written)
        assert rule.source["id"] == rule.id
        assert rule.source.get("missing") is None
    two = result.ruleset.rules[1].source
    data = two["actions"][0]["set_fact"]["data"]
    assert data == {"ok": True, "n": 3, "x": -0.0, "none": None}
    assert type(data["ok"]) is bool and type(data["n"]) is int  # not 1, not 3.0


def test_reading_one_rule_then_another_gives_each_its_own_data() -> None:
    result = load_rule_texts({"site.yaml": RULES}, config=None)
    assert result.ruleset is not None
    one, two = result.ruleset.rules
    assert one.source["id"] == "site/one"
    assert two.source["id"] == "site/two"
    assert one.source["id"] == "site/one"


def test_packed_data_cannot_be_changed_through_a_copy() -> None:
    packed = pack_data({"id": "a", "actions": [{"notify": {"target": "t"}}]})
    assert isinstance(packed, PackedData)
    copy = packed.unpacked()
    copy["actions"].append("more")
    copy["id"] = "b"
    assert packed.unpacked() == {"id": "a", "actions": [{"notify": {"target": "t"}}]}
    with pytest.raises(TypeError):
        packed["id"] = "b"  # type: ignore[index]


def test_data_with_a_yaml_timestamp_is_kept_as_it_is() -> None:
    data = {"id": "a", "at": dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC), "on": dt.date.today()}
    kept = pack_data(data)
    assert kept is data
    assert isinstance(kept, Mapping)


def test_the_files_of_a_loaded_ruleset_are_kept_packed_and_read_back_equal() -> None:
    many = "".join(
        f"- id: site/r{i}\n  project: site\n  when: task.t{i}.done  # é\n"
        "  actions: [{notify: {target: t, message: m}}]\n"
        for i in range(100)
    )
    assert len(many) >= PACK_TEXT_MIN_CHARS > len(RULES)
    texts = {"site.yaml": RULES, "more/many.yml": many}
    result = load_rule_texts(texts, config=None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    files = result.ruleset.files
    assert isinstance(files, PackedTexts)
    assert files == texts and dict(files) == texts
    assert sorted(files) == sorted(texts) and len(files) == 2 and "site.yaml" in files
    assert files["more/many.yml"] == many and files["site.yaml"] == RULES
    packed = files.packed("more/many.yml")
    assert isinstance(packed, bytes) and len(packed) < len(many) / 4  # compressed
    assert files.packed("site.yaml") == RULES  # short: kept as it is
    assert result.ruleset.version == ruleset_version(texts)
    for files in (texts, {"b": "#" * 700_000, "a": 'é\u2028"' * 300_000, "c": "", "d": "x"}):
        pairs = sorted(files.items())  # over a MiB: hashed in pieces, the same digest
        canonical = json.dumps(pairs, separators=(",", ":"), ensure_ascii=False)
        assert ruleset_version(files) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "data",
    [
        {"when": "a.b.c", "project": "p", "id": "x/y"},  # key order as written
        {"id": 5, "when": None, "x": [1, {"id": "inner"}]},  # not strings: packed as they are
        {"project": "p"},
        {},
    ],
)
def test_packed_data_reads_back_equal_whatever_its_id_and_when(data: dict[str, object]) -> None:
    packed = pack_data(data)
    assert isinstance(packed, PackedData)
    assert packed.unpacked() == data and list(packed.unpacked()) == list(data)
    assert dict(packed) == data and list(packed) == list(data)


def test_rules_with_equal_actions_share_them() -> None:
    text = "".join(
        f"- id: site/r{i}\n  project: site\n  when: task.t{i}.done\n"
        f"  actions: [{{notify: {{target: chat, message: done}}}}, {action}]\n"
        for i, action in enumerate(
            [
                "{notify: {target: ops, message: m}}",
                "{notify: {target: ops, message: m}}",
                "{notify: {target: ops, message: other}}",
                "{set_fact: {kind: flag, id: f, data: {ok: true}}}",
                "{set_fact: {kind: flag, id: f, data: {ok: true}}}",
            ]
        )
    )
    result = load_rule_texts({"site.yaml": text}, config=None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    first, second, third, fourth, fifth = (rule.actions for rule in result.ruleset.rules)
    assert first == second and first is second  # one tuple
    assert third != first and third[0] is first[0]  # one object for the equal notify
    assert fourth == fifth


def test_rules_written_alike_share_their_packed_data() -> None:
    text = "".join(
        f"- id: site/r{i}\n  project: site\n  when: task.t{i}.done\n"
        "  actions: [{notify: {target: chat, message: done}}]\n"
        for i in range(3)
    )
    result = load_rule_texts({"site.yaml": text}, config=None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    sources = [rule.source for rule in result.ruleset.rules]
    assert all(isinstance(source, PackedData) for source in sources)
    assert sources[0]._packed is sources[1]._packed is sources[2]._packed  # type: ignore[attr-defined]
    assert [dict(source)["id"] for source in sources] == ["site/r0", "site/r1", "site/r2"]
    assert [dict(source)["when"] for source in sources] == [f"task.t{i}.done" for i in range(3)]


def test_rules_of_one_template_keep_their_data_as_one_packed_bytes_object() -> None:
    text = "".join(
        f"- id: t/r{i}\n  project: p\n  when: 'task.t{i}.done'\n"
        '  actions:\n    - notify: {target: chat, message: "hi"}\n'
        for i in range(3)
    )
    result = load_rule_texts({"t.yaml": text}, None)
    assert result.ruleset is not None, result.problems
    rules = result.ruleset.rules
    assert all(isinstance(rule.kept_source, bytes) for rule in rules)
    assert rules[0].kept_source is rules[2].kept_source  # one object for the template
    assert [dict(rule.source) for rule in rules] == [
        {
            "id": f"t/r{i}",
            "project": "p",
            "when": f"task.t{i}.done",
            "actions": [{"notify": {"target": "chat", "message": "hi"}}],
        }
        for i in range(3)
    ]
