"""Property tests of the rule loader: no input makes it raise, every problem is located, and
valid rules come back as written.

``load_rule_texts`` is what the daemon runs on every reload and on the stored last good
ruleset, so it must turn any text (random characters, random YAML documents, mutated copies
of the bundled rule files) into problems, never an exception. Hypothesis runs derandomized
(the same examples on every run) and bounded, so the file takes seconds.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatekeeper.config import Config, load_config
from gatekeeper.rules.loader import (
    LoadResult,
    load_rule_texts,
    rule_content_hash,
    rule_files,
    ruleset_version,
)
from gatekeeper.rules.model import NotifyAction, PipelineAction, ReleaseAction

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = {
    path.relative_to(REPO / "rules").as_posix(): path.read_text(encoding="utf-8")
    for path in rule_files(REPO / "rules")  # the loader's own choice: no *.test.yaml
}
CONFIG: Config = load_config(REPO / "gatekeeper.yaml")
WHERE = "the stored ruleset"  # what load_rule_texts names when there is no file at all

PROPERTY = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

configs = st.sampled_from([None, CONFIG])
file_names = st.sampled_from(["a.yaml", "tower-a/b.yml", "rules.yaml", "x/y/z.yaml"])


def assert_well_formed(result: LoadResult, files: dict[str, str]) -> None:
    """The result's invariants: a ruleset exactly when there is no problem, and every
    problem names one of the files (or the whole set) and a line inside it (0: unknown)."""
    assert isinstance(result, LoadResult)
    assert (result.ruleset is None) == bool(result.problems)
    assert result.file_count == len(files)
    for problem in result.problems:
        assert problem.file in files or problem.file == WHERE, problem
        assert problem.line >= 0 and problem.column >= 0, problem
        assert problem.message.strip(), problem
        if problem.file in files:
            lines = files[problem.file].count("\n") + 1
            assert problem.line <= lines + 1, (problem, lines)
        str(problem)  # printable, as check and the daemon's log print it
        problem.to_json()


def load(files: dict[str, str], config: Config | None) -> LoadResult:
    result = load_rule_texts(files, config)
    assert_well_formed(result, files)
    return result


# ---------------------------------------------------------------------------------------------
# Anything in, problems out

YAML_ALPHABET = string.ascii_letters + string.digits + " \t\n:-#[]{},'\"&*!|>%@`?.$~\\=<()_/"


@PROPERTY
@given(
    files=st.dictionaries(
        file_names,
        st.one_of(
            st.text(max_size=400),
            st.text(alphabet=YAML_ALPHABET, max_size=400),
        ),
        max_size=3,
    ),
    config=configs,
)
def test_arbitrary_text_gives_problems_not_exceptions(
    files: dict[str, str], config: Config | None
) -> None:
    load(files, config)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["id", "when", "project", "actions", "release", "notify", "yes", "~", ""]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "id",
            "project",
            "when",
            "fire",
            "actions",
            "approvals",
            "description",
            "release",
            "notify",
            "pipeline",
            "target",
            "message",
            "ref",
            "inputs",
            "required",
            "from",
        ]
    ),
    st.text(max_size=10),
    st.integers(),
    st.booleans(),
    st.none(),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)


@PROPERTY
@given(
    document=documents,
    flow=st.sampled_from([None, True, False]),
    config=configs,
)
def test_arbitrary_yaml_documents_give_problems_not_exceptions(
    document: Any, flow: bool | None, config: Config | None
) -> None:
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    load({"doc.yaml": text}, config)


# ---------------------------------------------------------------------------------------------
# Mutations of the bundled rule files

YAML_SIGNIFICANT = [
    ":",
    "-",
    " ",
    "  ",
    "\t",
    "\n",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    "&a",
    "*a",
    "!!",
    "#",
    "|",
    ">",
    "${",
    "$",
    "\\",
    "%",
    "\x00",
    "\ufeff",
    "é",
]


@st.composite
def text_mutations(draw: st.DrawFn, text: str) -> str:
    """``text`` after 1 to 4 random edits: deletions, insertions of YAML-significant text,
    duplicated or swapped lines, truncation."""
    for _ in range(draw(st.integers(1, 4))):
        size = len(text)
        at = draw(st.integers(0, size))
        edit = draw(st.sampled_from(["delete", "insert", "dup_line", "swap_lines", "truncate"]))
        if edit == "delete" and size:
            end = draw(st.integers(at, min(size, at + 20)))
            text = text[:at] + text[end:]
        elif edit == "insert":
            piece = draw(st.one_of(st.sampled_from(YAML_SIGNIFICANT), st.text(max_size=5)))
            text = text[:at] + piece + text[at:]
        elif edit in ("dup_line", "swap_lines"):
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if edit == "dup_line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        else:
            text = text[:at]
    return text


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(RULE_FILES)), config=configs)
def test_mutated_rule_files_give_problems_not_exceptions(
    data: st.DataObject, name: str, config: Config | None
) -> None:
    files = dict(RULE_FILES)
    files[name] = data.draw(text_mutations(RULE_FILES[name]))
    load(files, config)


@st.composite
def data_mutations(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """``value`` (parsed YAML) with one random change somewhere inside: a key dropped or
    added, a value replaced by a random document, a list item dropped or duplicated."""
    if isinstance(value, dict) and value and depth < 6 and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: draw(data_mutations(value[key], depth + 1))}
    if isinstance(value, list) and value and depth < 6 and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        changed = draw(data_mutations(value[index], depth + 1))
        return [*value[:index], changed, *value[index + 1 :]]
    if isinstance(value, dict) and value and draw(st.booleans()):
        drop = draw(st.sampled_from(sorted(value, key=str)))
        return {k: v for k, v in value.items() if k != drop}
    if isinstance(value, dict) and draw(st.booleans()):
        return {**value, draw(keys): draw(documents)}
    if isinstance(value, list) and value and draw(st.booleans()):
        return value + value[:1]
    return draw(documents)


@PROPERTY
@given(data=st.data(), name=st.sampled_from(sorted(RULE_FILES)), config=configs)
def test_structurally_mutated_rule_files_give_problems_not_exceptions(
    data: st.DataObject, name: str, config: Config | None
) -> None:
    original = yaml.safe_load(RULE_FILES[name])
    mutated = data.draw(data_mutations(original))
    files = dict(RULE_FILES)
    files[name] = yaml.safe_dump(mutated, allow_unicode=True, sort_keys=False)
    load(files, config)


# ---------------------------------------------------------------------------------------------
# Valid rules round-trip

identifier = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
CONDITIONS = [
    'milestone.design.status == "approved"',
    "quality_gate.qg1.passed",
    "not quality_gate.qg2.passed",
    'task["T-17"].status == "completed"',
    "days_since(milestone.design.approved_at) >= 7",
    "hours_since(task.t1.done_at) > 1.5",
    "len(task.t2.reviewers) >= 2",
    "max(task.t3.score, 0) + 1 > 3",
]
plain_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"], exclude_characters="$"),
    min_size=1,
    max_size=40,
)


@st.composite
def valid_rules(draw: st.DrawFn, rule_id: str) -> dict[str, Any]:
    """A rule valid against ``gatekeeper.yaml``'s targets and escrows."""
    release = draw(st.booleans())
    placeholders = ["${rule_id}", "${project}", "${fired_at}", "$$"]
    if release:
        placeholders += ["${amount}", "${currency}", "${payee}", "${escrow}"]
    message = draw(plain_text) + " " + " ".join(draw(st.lists(st.sampled_from(placeholders))))
    actions: list[dict[str, Any]] = []
    if release:
        amount = draw(st.decimals(min_value=0, max_value=50000, places=2))
        actions.append(
            {
                "release": {
                    "target": "escrow-bank",
                    "escrow": "tower-a-escrow",
                    "amount": str(amount),
                    "currency": "USD",
                    "payee": draw(plain_text),
                }
            }
        )
    actions.append(
        {
            "notify": {
                "target": draw(st.sampled_from(["finance-chat", "site-ops"])),
                "message": message,
            }
        }
    )
    if draw(st.booleans()):
        inputs = draw(st.dictionaries(identifier, plain_text, max_size=3))
        actions.append(
            {"pipeline": {"target": "ci-construction-docs", "ref": "main", "inputs": inputs}}
        )
    rule: dict[str, Any] = {
        "id": rule_id,
        "project": draw(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,10}", fullmatch=True)),
        "when": " and ".join(draw(st.lists(st.sampled_from(CONDITIONS), min_size=1, max_size=3))),
        "actions": draw(st.permutations(actions)),
    }
    if draw(st.booleans()):
        rule["description"] = draw(plain_text)
    if draw(st.booleans()):
        rule["fire"] = draw(st.sampled_from(["once", "each_time"]))
    if draw(st.booleans()):
        approvers = draw(st.lists(identifier, min_size=1, max_size=4, unique=True))
        required = draw(st.integers(1, len(approvers)))
        rule["approvals"] = {"required": required, "from": approvers}
    return rule


@PROPERTY
@given(
    data=st.data(),
    ids=st.lists(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,20}", fullmatch=True),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    flow=st.sampled_from([None, True, False]),
)
def test_valid_rules_round_trip(data: st.DataObject, ids: list[str], flow: bool | None) -> None:
    rules = [data.draw(valid_rules(rule_id)) for rule_id in ids]
    document: Any = rules[0] if len(rules) == 1 and data.draw(st.booleans()) else rules
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    files = {"tower-a/rules.yaml": text}

    result = load(files, CONFIG)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    assert result.ruleset.version == ruleset_version(files)
    assert [rule.id for rule in result.ruleset.rules] == ids
    lines = [rule.line for rule in result.ruleset.rules]
    assert lines == sorted(lines) and lines[0] >= 1
    for rule, written in zip(result.ruleset.rules, rules, strict=True):
        assert rule.source == written
        assert rule.file == "tower-a/rules.yaml"
        assert rule.project == written["project"]
        assert rule.condition.text == written["when"]
        assert rule.description == written.get("description", "")
        assert rule.fire == written.get("fire", "once")
        assert rule.content_hash == rule_content_hash(written)
        approvals = written.get("approvals")
        assert (rule.approvals is None) == (approvals is None)
        if rule.approvals is not None:
            assert rule.approvals.required == approvals["required"]
            assert list(rule.approvals.from_) == approvals["from"]
        kinds = {ReleaseAction: "release", NotifyAction: "notify", PipelineAction: "pipeline"}
        assert [kinds[type(a)] for a in rule.actions] == [next(iter(a)) for a in written["actions"]]
        for action, spec in zip(rule.actions, written["actions"], strict=True):
            body = spec[kinds[type(action)]]
            assert action.target == body["target"]
            if isinstance(action, ReleaseAction):
                assert action.amount == body["amount"] and isinstance(action.amount, str)
            elif isinstance(action, NotifyAction):
                assert action.message == body["message"]
            else:
                assert dict(action.inputs) == body.get("inputs", {})

    # the content hash ignores layout: the same rules written in another style hash the same
    restyled = yaml.safe_dump(document, default_flow_style=not flow, sort_keys=True, width=40)
    again = load({"elsewhere.yaml": restyled}, CONFIG)
    assert again.ruleset is not None
    assert [r.content_hash for r in again.ruleset.rules] == [
        r.content_hash for r in result.ruleset.rules
    ]


@pytest.mark.parametrize("name", sorted(RULE_FILES))
def test_bundled_rule_files_are_valid(name: str) -> None:
    assert load({name: RULE_FILES[name]}, CONFIG).ok
