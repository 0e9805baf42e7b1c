"""The rule file cache (a reload checks only the files whose bytes changed), the fast
schema gate (``jsonschema_rs``) agreeing with ``jsonschema``, and hook templates in
``gatekeeper check``."""

from __future__ import annotations

import copy
import gc
import io
import textwrap
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatekeeper.cli.check import run_check
from gatekeeper.cli.main import main
from gatekeeper.clock import FixedClock
from gatekeeper.config import Config, load_config
from gatekeeper.rules import loader
from gatekeeper.rules.loader import RuleFileCache, load_rule_texts, load_rules_dir
from gatekeeper.rules.model import Rule
from gatekeeper.yamlsource import fast_schema_check, schema_validator

from .conftest import Project, fact

DATA = Path(__file__).parent / "data"
GOOD_CONFIG = DATA / "good_rules" / "gatekeeper.yaml"


def rule(rule_id: str, task: str = "T-1", target: str = "site-ops") -> str:
    return textwrap.dedent(
        f"""\
        id: {rule_id}
        project: tower-a
        when: >
          task["{task}"].status == "completed"
          and task["{task}"].priority >= 2
        actions:
          - notify: {{target: {target}, message: "rule ${{rule_id}} fired"}}
        """
    )


@pytest.fixture
def config() -> Config:
    return load_config(GOOD_CONFIG)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.yaml").write_text(rule("c/a"))
    (folder / "b.yaml").write_text(rule("c/b"))
    (folder / "sub" / "c.yaml").write_text(rule("c/c"))
    return folder


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the loader parses and checks, in order."""
    names: list[str] = []
    check_file = loader._check_file

    def spy(name: str, text: str, digest: str) -> loader.CheckedFile:
        names.append(name)
        return check_file(name, text, digest)

    monkeypatch.setattr(loader, "_check_file", spy)
    return names


def when_of(result: loader.LoadResult, rule_id: str) -> str:
    assert result.ruleset is not None, result.problems
    return result.ruleset.by_id()[rule_id].condition.text


def test_only_a_changed_file_is_parsed_again(
    rules_dir: Path, config: Config, parsed: list[str]
) -> None:
    cache = RuleFileCache()
    first = load_rules_dir(rules_dir, config, cache)
    assert first.ok and parsed == ["a.yaml", "b.yaml", "sub/c.yaml"]

    parsed.clear()
    (rules_dir / "b.yaml").write_text(rule("c/b", task="T-2"))
    second = load_rules_dir(rules_dir, config, cache)

    assert parsed == ["b.yaml"]
    assert (cache.checked, cache.reused) == (4, 2)
    assert 'task["T-2"]' in when_of(second, "c/b")
    assert second.ruleset is not None and first.ruleset is not None
    assert second.ruleset.version != first.ruleset.version
    # the rules of unchanged files are the very same objects: nothing was compiled again
    assert second.ruleset.by_id()["c/a"] is first.ruleset.by_id()["c/a"]


def test_a_cached_load_equals_a_fresh_one(rules_dir: Path, config: Config) -> None:
    cache = RuleFileCache()
    load_rules_dir(rules_dir, config, cache)
    (rules_dir / "b.yaml").write_text(rule("c/b", task="T-9"))
    cached = load_rules_dir(rules_dir, config, cache).ruleset
    fresh = load_rules_dir(rules_dir, config).ruleset
    assert cached is not None and fresh is not None
    assert cached.version == fresh.version

    def shown(rules: tuple[Rule, ...]) -> list[tuple[Any, ...]]:
        return [(r.id, r.content_hash, r.file, r.line, r.actions, r.condition.text) for r in rules]

    assert shown(cached.rules) == shown(fresh.rules)


def test_a_file_changed_back_and_forth(rules_dir: Path, config: Config, parsed: list[str]) -> None:
    cache = RuleFileCache()
    load_rules_dir(rules_dir, config, cache)
    for task in ("T-5", "T-1", "T-5", "T-1"):
        parsed.clear()
        (rules_dir / "a.yaml").write_text(rule("c/a", task=task))
        result = load_rules_dir(rules_dir, config, cache)
        assert parsed == ["a.yaml"]
        assert f'task["{task}"]' in when_of(result, "c/a")
    assert len(cache) == 3  # only the files of the latest load are kept


def test_a_bad_change_is_refused_and_the_fix_is_checked_again(
    rules_dir: Path, config: Config, parsed: list[str]
) -> None:
    cache = RuleFileCache()
    load_rules_dir(rules_dir, config, cache)
    (rules_dir / "a.yaml").write_text(rule("c/a").replace("priority >= 2", "priority >="))
    refused = load_rules_dir(rules_dir, config, cache)
    assert not refused.ok
    [problem] = refused.problems
    assert (problem.file, problem.line, problem.path) == ("a.yaml", 5, "when")

    parsed.clear()
    (rules_dir / "a.yaml").write_text(rule("c/a"))
    assert load_rules_dir(rules_dir, config, cache).ok
    assert parsed == ["a.yaml"]


def test_a_config_change_checks_references_again(
    rules_dir: Path, config: Config, parsed: list[str]
) -> None:
    cache = RuleFileCache()
    assert load_rules_dir(rules_dir, config, cache).ok
    parsed.clear()

    without = replace(config, targets={k: v for k, v in config.targets.items() if k != "site-ops"})
    refused = load_rules_dir(rules_dir, without, cache)

    assert parsed == []  # no file changed: the references are checked on the cached data
    fresh = load_rules_dir(rules_dir, without)
    assert refused.problems == fresh.problems  # located exactly as without a cache
    assert [(p.file, p.line, p.column, p.path) for p in refused.problems] == [
        ("a.yaml", 7, 22, "actions[0].notify.target"),
        ("b.yaml", 7, 22, "actions[0].notify.target"),
        ("sub/c.yaml", 7, 22, "actions[0].notify.target"),
    ]
    assert "unknown target 'site-ops'" in refused.problems[0].message
    assert load_rules_dir(rules_dir, config, cache).ok


def test_a_duplicate_id_in_an_unchanged_file_is_located(
    rules_dir: Path, config: Config, parsed: list[str]
) -> None:
    cache = RuleFileCache()
    load_rules_dir(rules_dir, config, cache)
    (rules_dir / "b.yaml").write_text("# now a copy of c/a\n" + rule("c/a"))
    result = load_rules_dir(rules_dir, config, cache)
    assert parsed[-1:] == ["b.yaml"]
    [problem] = result.problems
    assert (problem.file, problem.line, problem.column) == ("b.yaml", 2, 5)
    assert problem.message == "duplicate rule id 'c/a': already used at a.yaml:1:5"


def test_stored_texts_use_the_cache_too(config: Config, parsed: list[str]) -> None:
    cache = RuleFileCache()
    files = {"a.yaml": rule("c/a"), "b.yaml": rule("c/b")}
    assert load_rule_texts(files, config, cache=cache).ok
    assert load_rule_texts({**files, "b.yaml": rule("c/b", "T-3")}, config, cache=cache).ok
    assert parsed == ["a.yaml", "b.yaml", "b.yaml"]


# --- the fast schema gate -----------------------------------------------------------------


VALUES: list[Any] = [
    None, True, 0, 1, -1, 2.5, 1.0, 10**20, "", "x", "T-1", "a\n", "tower-a", "USD", "usd",
    "5000.00", "5000.001", "05", [], ["a"], ["a", "a"], {}, {"x": 1}, {"target": "t"},
]  # fmt: skip


def mutations(document: dict[str, Any]) -> list[Any]:
    """``document`` with each value (at any depth) replaced by each of ``VALUES``, each
    key removed, and an unknown key added at each mapping."""
    out: list[Any] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            for replacement in VALUES:
                out.append(_set(document, (*path, key), replacement))
            if isinstance(node, dict):
                out.append(_set(document, (*path, key), _DELETE))
            if isinstance(value, dict | list):
                walk(value, (*path, key))
        if isinstance(node, dict):
            out.append(_set(document, (*path, "surprise"), "x"))

    walk(document, ())
    return out


_DELETE = object()


def _set(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    copied = copy.deepcopy(document)
    node = copied
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copied


def corpus() -> list[Any]:
    """Every rule document of the test data and the bundled rules, and their mutations."""
    docs = []
    for path in sorted([*DATA.rglob("*.y*ml"), *(DATA.parent.parent / "rules").rglob("*.y*ml")]):
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        docs.append(data)
        rules = data if isinstance(data, list) else [data]
        for item in rules:
            if isinstance(item, dict) and "actions" in item:
                docs += mutations(item)
    return docs


def test_the_fast_gate_never_passes_what_jsonschema_refuses() -> None:
    fast = fast_schema_check("rules.schema.json")
    if fast is None:
        pytest.skip("jsonschema_rs is not installed")
    slow = schema_validator("rules.schema.json")
    documents = corpus()
    assert len(documents) > 2000
    disagree = [doc for doc in documents if fast(doc) != slow.is_valid(doc)]
    assert disagree == []
    assert any(slow.is_valid(doc) for doc in documents)
    assert any(not slow.is_valid(doc) for doc in documents)


def test_the_fast_gate_is_not_used_where_regex_dialects_differ() -> None:
    # the config schema's patterns use \\s, which Python and Rust define differently
    assert fast_schema_check("config.schema.json") is None


def test_data_the_fast_gate_cannot_take_goes_to_jsonschema() -> None:
    text = rule("c/d").replace("project: tower-a", "project: 2024-01-01")  # a YAML date
    result = load_rule_texts({"d.yaml": text}, None)
    [problem] = result.problems
    assert problem.path == "project" and "must be a string" in problem.message


# --- hook templates in gatekeeper check -------------------------------------------------------


BROKEN_HOOK = """\
hooks:
  github:
    kind: github
    secret_env: GH_HOOK_SECRET
    project: tower-a
    facts:
      - event: workflow_run
        kind: ci_run
        id: "$workflow_run.name"
"""


def test_check_reports_a_broken_hook_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.yaml").write_text(rule("c/a"))
    config_path = tmp_path / "gatekeeper.yaml"
    text = GOOD_CONFIG.read_text().replace("rules_dir: rules\n", "rules_dir: rules\n" + BROKEN_HOOK)
    config_path.write_text(text)

    assert main(["check", "-c", str(config_path)]) == 1
    out = capsys.readouterr().out
    assert "hooks.github.facts[0].id: invalid placeholder in '$workflow_run.name'" in out
    assert out.endswith("FAILED: 1 problem in 1 file\n")

    config_path.write_text(text.replace('"$workflow_run.name"', '"${workflow_run.name}"'))
    assert main(["check", "-c", str(config_path)]) == 0
    assert capsys.readouterr().out == "SUCCESS: 1 rule found in 1 file\n"


def test_check_without_a_config_has_no_hooks_to_check(rules_dir: Path) -> None:
    out = io.StringIO()
    assert run_check([rules_dir], None, "text", out) == 0


# --- deadlines across a reload ----------------------------------------------------------------


def timed_rule(rule_id: str, days: int) -> str:
    return textwrap.dedent(
        f"""\
        id: {rule_id}
        project: tower-a
        when: days_since(task["T-1"].started_at) >= {days}
        actions:
          - pipeline: {{target: ci, ref: main}}
        """
    )


async def test_a_reload_keeps_the_deadlines_of_unchanged_rules(
    project_factory: Callable[..., Project], start_daemon: Any
) -> None:
    start = datetime(2026, 11, 5, tzinfo=UTC)
    clock = FixedClock(start)
    project = project_factory()
    project.write_rule("a.yaml", timed_rule("t/a", 3))
    project.write_rule("b.yaml", timed_rule("t/b", 5))
    project.write_rule("c.yaml", timed_rule("t/c", 7))
    gk = await start_daemon(project, clock=clock)
    await gk.post("/v1/facts", fact("task", "T-1", started_at="2026-11-05T00:00:00Z"))
    await gk.daemon.tick()
    deadlines = gk.daemon.ticker.deadlines
    assert deadlines.due_at(("t/b", "")) == start + timedelta(days=5)

    clock.advance(timedelta(hours=1))
    project.write_rule("a.yaml", timed_rule("t/a", 4))
    (project.rules_dir / "c.yaml").unlink()
    assert await gk.daemon.reload()

    assert deadlines.due_at(("t/a", "")) == clock.now()  # changed: evaluated at once
    assert deadlines.due_at(("t/b", "")) == start + timedelta(days=5)  # unchanged: kept
    assert deadlines.due_at(("t/c", "")) is None  # gone
    await gk.daemon.tick()
    assert deadlines.due_at(("t/a", "")) == start + timedelta(days=4)


async def test_a_large_ruleset_going_live_is_frozen_out_of_the_collector(
    project_factory: Callable[..., Project], start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatekeeper.runtime import rulesets

    monkeypatch.setattr(rulesets, "FREEZE_AT_RULES", 1)  # "large" for the test
    project = project_factory()
    project.write_rule("a.yaml", timed_rule("t/a", 3))
    gc.unfreeze()
    try:
        gk = await start_daemon(project)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        project.write_rule("a.yaml", timed_rule("t/a", 4))
        assert await gk.daemon.reload()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("tag", ["!!pairs", "!!omap"])
def test_yaml_pairs_are_lists_so_both_validators_read_them_alike(tag: str) -> None:
    """The safe loader builds ``!!pairs``/``!!omap`` items as tuples, which jsonschema_rs
    takes as arrays and Python's jsonschema does not: a schema accepting arrays of arrays
    would have been passed by the fast gate and refused by the real one."""
    from jsonschema import Draft202012Validator

    from gatekeeper.yamlsource import parse_document

    doc, problems = parse_document(f"from: {tag} [{{alice: bob}}]\n", "f.yaml")
    assert problems == [] and doc is not None
    assert doc.data == {"from": [["alice", "bob"]]}
    schema = {
        "type": "object",
        "properties": {"from": {"type": "array", "items": {"type": "array"}}},
    }
    assert Draft202012Validator(schema).is_valid(doc.data)
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    assert jsonschema_rs.Draft202012Validator(schema).is_valid(doc.data)
