"""Rule files to a Ruleset: bad files as data (each with the exact place and message it must
produce, like Prometheus' testdata/*.bad.yaml), good files, hashes, versions, git."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatekeeper import yamlsource
from gatekeeper.config import Config, load_config
from gatekeeper.rules import loader
from gatekeeper.rules.loader import (
    LoadResult,
    canonical_rule,
    git_commit_of,
    load_rule_paths,
    load_rule_texts,
    load_rules_dir,
    rule_content_hash,
    rule_files,
    ruleset_version,
)
from gatekeeper.rules.model import NotifyAction, PipelineAction, ReleaseAction
from gatekeeper.schemas import schema_path
from gatekeeper.yamlsource import schema_validator

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad_rules"
GOOD = DATA / "good_rules"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(GOOD / "gatekeeper.yaml")


@pytest.fixture(params=["libyaml", "python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with libyaml's CSafeLoader and again with PyYAML's pure-Python SafeLoader."""
    if request.param == "python":
        monkeypatch.setattr(yamlsource, "YAML_LOADER", yaml.SafeLoader)
    return str(request.param)


def load_bad(name: str, config: Config | None, monkeypatch: pytest.MonkeyPatch) -> LoadResult:
    """Load one bad case with file names relative to tests/data/bad_rules."""
    monkeypatch.chdir(BAD)
    path = Path(name)
    return load_rules_dir(path, config) if path.is_dir() else load_rule_paths([path], config)


# (case, file, line, column, path, rule id, message fragment)
BAD_CASES: list[tuple[str, str, int, int, str, str | None, str]] = [
    (
        "unknown_key.yaml",
        "unknown_key.yaml",
        4,
        1,
        "whn",
        "bad/unknown-key",
        "unknown key 'whn'; did you mean 'when'? (allowed: id, description, project, when,",
    ),
    (
        "missing_when.yaml",
        "missing_when.yaml",
        2,
        1,
        "",
        "bad/missing-when",
        "missing required key 'when'",
    ),
    (
        "float_amount.yaml",
        "float_amount.yaml",
        9,
        15,
        "actions[0].release.amount",
        "bad/float-amount",
        "must be a string, not the number 5000.00 (YAML reads an unquoted 5000.00 as a float); "
        'quote it: "5000.00"',
    ),
    (
        "bad_fire.yaml",
        "bad_fire.yaml",
        5,
        7,
        "fire",
        "bad/fire",
        "must be one of: once, each_time, each_fact (got the string 'always')",
    ),
    (
        "unknown_target.yaml",
        "unknown_target.yaml",
        7,
        15,
        "actions[0].release.target",
        "bad/unknown-target",
        "unknown target 'escrow-bnak'; did you mean 'escrow-bank'?",
    ),
    (
        "unknown_escrow.yaml",
        "unknown_escrow.yaml",
        8,
        15,
        "actions[0].release.escrow",
        "bad/unknown-escrow",
        "unknown escrow 'tower-c-escrow'",
    ),
    (
        "currency_mismatch.yaml",
        "currency_mismatch.yaml",
        10,
        17,
        "actions[0].release.currency",
        "bad/currency-mismatch",
        "currency EUR does not match escrow 'tower-a-escrow', which holds USD",
    ),
    (
        "over_limit.yaml",
        "over_limit.yaml",
        6,
        68,
        "actions[0].release.amount",
        "bad/over-limit",
        "amount 1500.00 is above the limit of escrow 'tower-b-escrow' (1000.00 EUR)",
    ),
    (
        "max_amount_over_limit.yaml",
        "max_amount_over_limit.yaml",
        12,
        19,
        "actions[0].release.max_amount",
        "bad/max-amount-over-limit",
        "max_amount 2500.00 is above the limit of escrow 'tower-b-escrow' (1000.00 EUR)",
    ),
    # literal block scalar: the second content line, at the '='
    ("bad_expression.yaml", "bad_expression.yaml", 6, 37, "when", "bad/expression", "syntax"),
    # folded block scalar: the third content line, at 'opn'
    (
        "unknown_function.yaml",
        "unknown_function.yaml",
        7,
        7,
        "when",
        "bad/unknown-function",
        "unknown function 'opn'",
    ),
    ("dunder.yaml", "dunder.yaml", 4, 24, "when", "bad/dunder", "__class__"),
    (
        "unknown_template.yaml",
        "unknown_template.yaml",
        9,
        26,
        "actions[1].notify.message",
        "bad/unknown-template",
        "unknown template name 'amout'; did you mean 'amount'?",
    ),
    (
        "release_name_without_release.yaml",
        "release_name_without_release.yaml",
        6,
        47,
        "actions[0].notify.message",
        "bad/release-name-without-release",
        "template name 'amount' is only available in rules with a release action",
    ),
    (
        "duplicate_id",
        "sub/b.yaml",
        2,
        7,
        "[0].id",
        "bad/duplicate",
        "duplicate rule id 'bad/duplicate': already used at a.yaml:2:5",
    ),
    (
        "malformed.yaml",
        "malformed.yaml",
        4,
        7,
        "",
        None,
        "invalid YAML: mapping values are not allowed",
    ),
    ("empty.yaml", "empty.yaml", 1, 1, "", None, "the file is empty"),
    (
        "duplicate_key.yaml",
        "duplicate_key.yaml",
        5,
        1,
        "when",
        "bad/duplicate-key",
        "duplicate key 'when' (first given at line 4)",
    ),
    (
        "bad_id.yaml",
        "bad_id.yaml",
        2,
        5,
        "id",
        "design release",
        "'design release' is not a valid rule id (letters, digits and . _ / -",
    ),
    (
        "two_kinds_in_one_action.yaml",
        "two_kinds_in_one_action.yaml",
        6,
        5,
        "actions[0]",
        "bad/two-kinds",
        "must hold exactly one of: release, notify, pipeline, set_fact (found: notify, pipeline)",
    ),
    (
        "too_many_approvals.yaml",
        "too_many_approvals.yaml",
        5,
        23,
        "approvals.required",
        "bad/too-many-approvals",
        "requires 3 approvals but only 2 approvers are listed in 'from'",
    ),
    (
        "not_a_rule.yaml",
        "not_a_rule.yaml",
        2,
        1,
        "",
        None,
        "a rule file must hold a rule (a mapping) or a list of rules",
    ),
    (
        "second_rule_bad.yaml",
        "second_rule_bad.yaml",
        11,
        77,
        "[1].actions[0].pipeline.inputs.attempt",
        "bad/list-second",
        'must be a string, not the number 2; quote it: "2"',
    ),
    (
        "set_fact_other_project.yaml",
        "set_fact_other_project.yaml",
        7,
        58,
        "actions[0].set_fact.project",
        "bad/set-fact-project",
        "set_fact has no 'project' key: a rule records facts only in its own project "
        "(the rule's 'project'); to act on another project, post the fact to it from outside",
    ),
    (
        "collection_unsafe.yaml",
        "collection_unsafe.yaml",
        5,
        54,
        "when",
        "bad/collection-unsafe",
        "names starting with '_' are not allowed: '__class__'",
    ),
    (
        "collection_call.yaml",
        "collection_call.yaml",
        5,
        64,
        "when",
        "bad/collection-call",
        "unknown function 'open'",
    ),
    (
        "for_each_malformed.yaml",
        "for_each_malformed.yaml",
        4,
        11,
        "for_each",
        "bad/for-each-kind",
        "'Build-Runs' is not a valid fact kind for for_each (a lowercase letter, then "
        "lowercase letters, digits and _; e.g. build or test_run)",
    ),
    (
        "bad_duration.yaml",
        "bad_duration.yaml",
        5,
        56,
        "approvals.expires_after",
        "bad/duration",
        "'2w' is not a duration (a whole number of seconds, or a whole number followed by "
        "m, h or d, e.g. 30m, 12h, 7d)",
    ),
    (
        "template_not_read.yaml",
        "template_not_read.yaml",
        11,
        83,
        "actions[0].notify.message",
        "bad/template-not-read",
        "template name 'build.b9.commit' is not read by this rule: a template may use the "
        "facts its 'when' reads by id (here: milestone.m1); the current build is item: "
        "${item.id}, ${item.data.FIELD}",
    ),
    (
        "item_outside_for_each.yaml",
        "item_outside_for_each.yaml",
        6,
        52,
        "actions[0].pipeline.ref",
        "bad/item-outside-for-each",
        "template name 'item.data.commit' is not read by this rule: a template may use the "
        "facts its 'when' reads by id (here: build.b1); 'item' is the current item only in "
        "a for_each rule",
    ),
    (
        "self_trigger.yaml",
        "self_trigger.yaml",
        8,
        22,
        "actions[0].set_fact.kind",
        "bad/self-trigger",
        "this rule sets a fact of kind 'build', its for_each kind, so it can re-trigger "
        "itself: each fact it sets can fire it again (fire: each_fact), a loop only "
        "max_chain_depth would stop; set a kind this rule does not read and let another "
        "rule read it",
    ),
    (
        "loop_across_rules",
        "1-pay.yaml",
        9,
        22,
        "actions[1].set_fact.kind",
        "bad/pay",
        "this rule sets a fact of kind 'pong', which rule 'bad/bounce' reads, and the rules "
        "feed each other in a loop: bad/pay -> bad/bounce -> bad/pay; bad/pay fires again at "
        "each fact that comes round (fire: each_fact)",
    ),
    (
        "payee_template.yaml",
        "payee_template.yaml",
        8,
        37,
        "actions[0].release.payee",
        "bad/payee-from-fact",
        "a release's payee is written as it is, never read from a fact",
    ),
    (
        "amount_template_without_cap.yaml",
        "amount_template_without_cap.yaml",
        7,
        68,
        "actions[0].release.amount",
        "bad/amount-without-cap",
        "an amount read from a fact needs max_amount",
    ),
    (
        "max_amount_zero.yaml",
        "max_amount_zero.yaml",
        11,
        19,
        "actions[0].release.max_amount",
        "bad/max-amount-zero",
        "max_amount must be above zero",
    ),
    (
        "amount_over_max.yaml",
        "amount_over_max.yaml",
        9,
        15,
        "actions[0].release.amount",
        "bad/amount-over-max",
        "amount 1500.00 is above this release's max_amount 1000.00",
    ),
    (
        "amount_template_not_a_field.yaml",
        "amount_template_not_a_field.yaml",
        7,
        71,
        "[0].actions[0].release.amount",
        "bad/amount-reserved",
        "a release amount names a fact field, not 'amount'",
    ),
    (
        "amount_template_with_text.yaml",
        "amount_template_with_text.yaml",
        10,
        15,
        "actions[0].release.amount",
        "bad/amount-with-text",
        "'${item.data.amount}.00' is not a valid amount",
    ),
]


@pytest.mark.parametrize(
    ("case", "file", "line", "column", "path", "rule_id", "fragment"),
    BAD_CASES,
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_rule_file_reports_where_and_what(
    case: str,
    file: str,
    line: int,
    column: int,
    path: str,
    rule_id: str | None,
    fragment: str,
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    yaml_loader: str,
) -> None:
    result = load_bad(case, config, monkeypatch)
    assert result.ruleset is None
    assert not result.ok
    matching = [p for p in result.problems if fragment in p.message]
    assert matching, f"no problem mentions {fragment!r}: {[str(p) for p in result.problems]}"
    problem = matching[0]
    assert (problem.file, problem.line, problem.column) == (file, line, column)
    assert problem.path == path
    assert problem.rule_id == rule_id


def test_every_bad_file_is_covered_by_a_case() -> None:
    cases = {case[0] for case in BAD_CASES}
    on_disk = {path.name for path in BAD.iterdir()}
    assert on_disk == cases


def test_typo_reports_the_unknown_key_and_the_missing_one(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = load_bad("unknown_key.yaml", config, monkeypatch)
    assert [(p.line, p.message.split(";")[0]) for p in result.problems] == [
        (2, "missing required key 'when'"),
        (4, "unknown key 'whn'"),
    ]


def test_every_problem_of_a_file_is_reported_in_order() -> None:
    text = """\
- id: multi/one
  project: Tower A
  when: opn(task.t1.done)
  fire: sometimes
  actions:
    - release: {target: nowhere, escrow: tower-a-escrow, amount: 12.5, currency: EUR, payee: x}
- id: multi/one
  project: tower-a
  when: task.t1.done
  actions: []
"""
    result = load_rule_texts({"multi.yaml": text}, load_config(GOOD / "gatekeeper.yaml"))
    found = [(p.line, p.path) for p in result.problems]
    assert found == [
        (2, "[0].project"),
        (3, "[0].when"),
        (4, "[0].fire"),
        (6, "[0].actions[0].release.target"),
        (6, "[0].actions[0].release.amount"),
        (6, "[0].actions[0].release.currency"),
        (7, "[1].id"),
        (10, "[1].actions"),
    ]
    assert {p.rule_id for p in result.problems} == {"multi/one"}
    assert result.rule_count == 2


def test_good_rules_load_into_a_ruleset(config: Config) -> None:
    result = load_rules_dir(config.rules_dir, config)
    assert result.problems == ()
    ruleset = result.ruleset
    assert ruleset is not None
    assert (result.rule_count, result.file_count) == (4, 3)
    assert list(ruleset.files) == ["list.yml", "nested/deep.yaml", "single.yaml"]
    rules = ruleset.by_id()
    assert [r.id for r in ruleset.rules] == [
        "good/release",
        "good/alert",
        "good/nested",
        "good/single",
    ]
    release = rules["good/release"]
    assert (release.file, release.line, release.fire) == ("list.yml", 2, "once")
    assert release.approvals is not None and release.approvals.from_ == ("alice", "bob", "carol")
    assert isinstance(release.actions[0], ReleaseAction)
    assert release.actions[0].amount == "5000.00"
    assert isinstance(release.actions[1], NotifyAction)
    assert release.condition.text.startswith('milestone.design.status == "approved"\n')
    alert = rules["good/alert"]
    assert alert.fire == "each_time"
    assert alert.approvals is not None and alert.approvals.required == 1  # merge key override
    single = rules["good/single"]
    assert single.actions == (PipelineAction(target="ci-construction-docs", ref="main"),)
    assert single.description.startswith("Start the docs pipeline")
    assert single.source["id"] == "good/single"
    assert rules["good/nested"].file == "nested/deep.yaml"


def test_rule_files_skip_tests_hidden_and_other_files() -> None:
    found = [p.relative_to(GOOD / "rules").as_posix() for p in rule_files(GOOD / "rules")]
    assert found == ["list.yml", "nested/deep.yaml", "single.yaml"]


def test_stored_texts_give_the_same_ruleset_version(config: Config) -> None:
    from_dir = load_rules_dir(config.rules_dir, config).ruleset
    assert from_dir is not None
    from_texts = load_rule_texts(from_dir.files, config, git_commit="abc")
    assert from_texts.ruleset is not None
    assert from_texts.ruleset.version == from_dir.version == ruleset_version(from_dir.files)
    assert from_texts.ruleset.git_commit == "abc"
    hashes = {r.id: r.content_hash for r in from_texts.ruleset.rules}
    assert hashes == {r.id: r.content_hash for r in from_dir.rules}


def test_version_changes_with_any_text() -> None:
    files = {"a.yaml": "x", "b.yaml": "y"}
    assert ruleset_version(files) == ruleset_version(dict(reversed(files.items())))
    assert ruleset_version(files) != ruleset_version({"a.yaml": "x ", "b.yaml": "y"})
    assert ruleset_version(files) != ruleset_version({"a.yaml": "x", "c.yaml": "y"})


RULE = """\
id: hash/me
project: tower-a
when: task.t1.done
actions:
  - pipeline: {target: ci-construction-docs, ref: main}
"""


def rule_hash(text: str) -> str:
    result = load_rule_texts({"r.yaml": text}, None)
    assert result.ruleset is not None, result.problems
    return result.ruleset.rules[0].content_hash


def test_content_hash_ignores_defaults_order_style_and_comments() -> None:
    base = rule_hash(RULE)
    explicit = (
        "# same rule, defaults written out and keys reordered\n"
        "fire: once\n"
        'description: ""\n'
        "actions:\n"
        "  - pipeline:\n"
        "      ref: main\n"
        "      target: ci-construction-docs\n"
        "      inputs: {}\n"
        "when: >\n"
        "  task.t1.done\n"
        "project: tower-a\n"
        "id: hash/me\n"
    )
    assert rule_hash(explicit) == base
    assert rule_hash(RULE.replace("ref: main", "ref: release")) != base
    assert rule_hash(RULE + "fire: each_time\n") != base
    assert rule_hash(RULE + "description: why\n") != base


def test_content_hash_is_sha256_of_canonical_json() -> None:
    import hashlib

    rule: dict[str, Any] = {"id": "x", "project": "p", "when": "a", "actions": []}
    expected = json.dumps(canonical_rule(rule), sort_keys=True, separators=(",", ":"))
    assert rule_content_hash(rule) == hashlib.sha256(expected.encode()).hexdigest()
    assert canonical_rule(rule)["fire"] == "once"


def test_references_are_checked_only_with_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_bad("unknown_target.yaml", None, monkeypatch).ok
    assert load_bad("currency_mismatch.yaml", None, monkeypatch).ok


def test_bundled_example_rules_are_valid(config: Config) -> None:
    result = load_rules_dir(REPO / "rules", config)
    assert result.problems == ()
    assert result.ruleset is not None
    rules = result.ruleset.by_id()
    assert {r.project for r in rules.values()} == {"tower-a"}
    releases = [r.release for r in rules.values() if r.release is not None]
    assert len(releases) == 3
    assert {(r.target, r.escrow, r.currency) for r in releases} == {
        ("escrow-bank", "tower-a-escrow", "USD")
    }
    assert rules["tower-a/docs-pipeline"].fire == "each_time"
    assert rules["tower-a/structure-qa-failed"].fire == "each_time"


def test_paths_name_files_as_given(
    config: Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shutil.copytree(GOOD / "rules", tmp_path / "rules")
    monkeypatch.chdir(tmp_path)
    result = load_rule_paths([Path("rules/nested"), tmp_path / "rules" / "single.yaml"], config)
    assert result.ruleset is not None
    assert list(result.ruleset.files) == ["rules/nested/deep.yaml", "rules/single.yaml"]
    assert result.ruleset.by_id()["good/single"].file == "rules/single.yaml"


def test_missing_path_and_missing_dir_are_problems(tmp_path: Path) -> None:
    result = load_rule_paths([tmp_path / "nope.yaml"], None)
    assert [p.message for p in result.problems] == ["no such file or directory"]
    result = load_rules_dir(tmp_path / "nope", None)
    assert "does not exist" in result.problems[0].message


def test_empty_directory_has_no_rules(tmp_path: Path) -> None:
    result = load_rules_dir(tmp_path, None)
    assert result.ruleset is None
    assert [p.message for p in result.problems] == [f"no rules found in {tmp_path}"]


def test_unreadable_bytes_are_a_problem(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"id: caf\xe9\n")
    result = load_rules_dir(tmp_path, None)
    assert result.problems[0].file == "latin1.yaml"
    assert "not UTF-8" in result.problems[0].message


def test_empty_list_and_non_string_keys_are_problems() -> None:
    result = load_rule_texts({"a.yaml": "[]\n", "b.yaml": RULE + "yes: 1\n"}, None)
    messages = [(p.file, p.message) for p in result.problems]
    assert ("a.yaml", "the list of rules is empty") in messages
    assert (
        "b.yaml",
        "key 'yes' is read by YAML as a boolean, not a string; quote it: 'yes'",
    ) in messages


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    result = load_rule_texts({"bomb.yaml": "\n".join(lines) + "\n"}, None)
    assert "too large once aliases are expanded" in result.problems[0].message


def test_position_inside_double_quoted_and_indented_block_scalars(yaml_loader: str) -> None:
    text = (
        "id: pos/x\n"
        "project: tower-a\n"
        "when: |2\n"
        "    task.t1.done\n"
        "      and opn(1)\n"
        "actions:\n"
        '  - notify: {target: site-ops, message: "say \\"hi\\" to ${nobody}"}\n'
    )
    problems = {p.path: p for p in load_rule_texts({"p.yaml": text}, None).problems}
    assert (problems["when"].line, problems["when"].column) == (5, 11)
    message = problems["actions[0].notify.message"]
    assert message.line == 7
    assert "unknown template name 'nobody'" in message.message


def test_deep_nesting_is_refused_before_composing() -> None:
    depth = 100_000
    result = load_rule_texts({"deep.yaml": "[" * depth + "]" * depth}, None)
    [problem] = result.problems
    assert (problem.line, problem.column) == (1, 65)
    assert problem.message == "nested more than 64 levels deep"


def test_python_tags_are_refused() -> None:
    text = "!!python/object/apply:os.system [echo hi]\n"
    [problem] = load_rule_texts({"tag.yaml": text}, None).problems
    assert problem.message.startswith("invalid YAML: could not determine a constructor")
    assert problem.line == 1


def test_overlong_when_is_one_problem() -> None:
    text = RULE.replace("when: task.t1.done", "when: " + "a and " * 700 + "a")
    [problem] = load_rule_texts({"long.yaml": text}, None).problems
    assert problem.path == "when"
    assert problem.message == "is too long (4201 characters; at most 4096)"


def test_git_commit_of_a_checkout(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "r.yaml").write_text(RULE)
    subprocess.run([*git, "add", "r.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "rules"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git_commit_of(tmp_path) == head.strip()
    result = load_rules_dir(tmp_path, None)
    assert result.ruleset is not None and result.ruleset.git_commit == head.strip()


def test_git_commit_of_elsewhere_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit_of(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_commit_of(tmp_path) is None


@pytest.mark.parametrize("name", ["rules.schema.json", "config.schema.json"])
def test_schemas_are_valid_strict_and_documented(name: str) -> None:
    schema = json.loads(schema_path(name).read_text())
    schema_validator(name)  # compiles, checks against the 2020-12 metaschema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(name) and schema["title"]
    for where, node in walk_schema(schema):
        if node.get("type") == "object" and "additionalProperties" not in node:
            pytest.fail(f"{where}: object without additionalProperties")
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{where}.properties.{key} has no description"


def walk_schema(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((where, node))
        for key, value in node.items():
            found += walk_schema(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += walk_schema(value, f"{where}/{index}")
    return found


# ---------------------------------------------------------------------------------------------
# Long lists of rules, checked a part at a time


def _long_rule_file(count: int, *, comment: str = "") -> str:
    lines = ["# generated rules", ""]
    for i in range(count):
        lines += [
            f"- id: long/r{i}",
            "  project: p",
            f'  when: \'task["T-{i // 5}"].status == "done" and task["T-{i // 5}"].n >= {i % 5}\'',
            "  fire: each_time",
            "  actions:",
            '    - notify: {target: chat, message: "rule ${rule_id} fired"}',
            comment,
        ]
    return "\n".join(lines) + "\n"


def _rules_of(result: LoadResult) -> list[tuple[Any, ...]]:
    assert result.ruleset is not None, result.problems
    return [
        (r.id, r.line, r.content_hash, r.condition.text, dict(r.source), r.actions)
        for r in result.ruleset.rules
    ]


def test_a_long_list_of_rules_is_checked_in_parts_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _long_rule_file(300, comment="  # a comment line")
    chunks = loader._chunks(text)
    assert chunks is not None and len(chunks) == 5  # 300 rules, 64 at a time
    assert "".join(chunk for _, chunk in chunks) == text
    assert [lines for lines, _ in chunks] == [0, 450, 898, 1346, 1794]
    parsed = load_rule_texts({"long.yaml": text}, None)
    monkeypatch.setattr(loader, "CHUNK_MIN_CHARS", 10**9)  # the whole file at once
    assert loader._chunks(text) is None
    whole = load_rule_texts({"long.yaml": text}, None)
    assert _rules_of(parsed) == _rules_of(whole)
    assert parsed.ruleset is not None and whole.ruleset is not None
    assert parsed.ruleset.version == whole.ruleset.version
    assert [r.line for r in parsed.ruleset.rules][64:66] == [451, 458]  # as the whole file says


@pytest.mark.parametrize(
    ("change", "chunked"),
    [
        ("", True),
        ("- id: base\n  project: &p p\n", False),  # an anchor: an alias may reach across
        ("%YAML 1.1\n---\n", False),  # a directive
        ("\r", False),  # a line break \n does not count
        ("id: one\n", False),  # not a list at column 0
    ],
)
def test_only_a_plain_list_at_column_0_is_cut(change: str, chunked: bool) -> None:
    text = _long_rule_file(200)
    text = text.replace("\n  fire", "\r  fire", 1) if change == "\r" else change + text
    assert (loader._chunks(text) is not None) is chunked


def test_a_problem_in_a_later_part_is_reported_as_in_the_whole_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = _long_rule_file(200).replace("long/r150", "long/r149", 1)  # a duplicate id
    bad_expression = text.replace("n >= 2'", "n >= '", 1)  # in the first part
    not_yaml = text.replace("- id: long/r100\n", '- id: long/r100\n  x: "unclosed\n', 1)
    found = [load_rule_texts({"long.yaml": t}, None) for t in (text, bad_expression, not_yaml)]
    monkeypatch.setattr(loader, "CHUNK_MIN_CHARS", 10**9)  # the whole file at once
    whole = [load_rule_texts({"long.yaml": t}, None) for t in (text, bad_expression, not_yaml)]
    assert found == whole
    assert all(result.ruleset is None and result.problems for result in found)
    assert any("duplicate rule id" in p.message for p in found[0].problems)
    assert any(p.rule_id == "long/r2" for p in found[1].problems)


def test_a_quoted_scalar_across_a_cut_makes_the_file_checked_whole() -> None:
    text = _long_rule_file(250)
    lines = text.split("\n")
    at = lines.index("- id: long/r64")
    lines.insert(at, '  description: "a description')  # the last key of long/r63
    lines.insert(at + 1, '- still the description"')  # the 65th line starting with "- "
    text = "\n".join(lines)
    assert loader._chunks(text) is not None  # cut at the line that is inside the string
    result = load_rule_texts({"long.yaml": text}, None)
    assert result.ruleset is not None, result.problems
    rule = next(r for r in result.ruleset.rules if r.id == "long/r63")
    assert rule.description == "a description - still the description"
    assert len(result.ruleset.rules) == 250
