"""`gatekeeper check`: exit codes, the three formats, GitHub escaping, every problem shown."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gatekeeper.cli.check import run_check
from gatekeeper.cli.output import escape_data, escape_property, format_problems, github_command
from gatekeeper.config import Config, load_config
from gatekeeper.problems import Problem

REPO = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data"
MULTI = """\
id: multi
project: tower-a
when: opn(task.t1.done)
fire: always
actions:
  - notify: {target: nowhere, message: "hi ${nobody}"}
"""


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(DATA / "good_rules" / "gatekeeper.yaml")


def check(paths: list[Path], config: Config | None, fmt: str = "text") -> tuple[int, str]:
    out = io.StringIO()
    code = run_check(paths, config, fmt, out)  # type: ignore[arg-type]
    return code, out.getvalue()


@pytest.fixture
def multi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    Path("multi.yaml").write_text(MULTI)
    return Path("multi.yaml")


def test_bundled_rules_pass(config: Config) -> None:
    code, out = check([REPO / "rules"], config)
    assert code == 0
    assert out == "SUCCESS: 5 rules found in 3 files\n"


def test_no_paths_checks_the_configured_rules_dir(config: Config) -> None:
    code, out = check([], config)
    assert (code, out) == (0, "SUCCESS: 4 rules found in 3 files\n")


def test_text_lists_every_problem_then_fails(config: Config, multi: Path) -> None:
    code, out = check([multi], config)
    assert code == 1
    lines = out.splitlines()
    assert lines[-1] == "FAILED: 4 problems in 1 file"
    assert [line.split(": ", 3)[:3] for line in lines[:-1]] == [
        ["multi.yaml:3:7", "rule 'multi'", "when"],
        ["multi.yaml:4:7", "rule 'multi'", "fire"],
        ["multi.yaml:6:22", "rule 'multi'", "actions[0].notify.target"],
        ["multi.yaml:6:44", "rule 'multi'", "actions[0].notify.message"],
    ]


def test_json_report_parses(config: Config, multi: Path) -> None:
    code, out = check([multi], config, "json")
    report = json.loads(out)
    assert code == 1
    assert (report["valid"], report["rules"], report["files"]) == (False, 1, 1)
    assert len(report["problems"]) == 4
    assert set(report["problems"][0]) == {"file", "line", "column", "path", "rule_id", "message"}
    code, out = check([REPO / "rules"], config, "json")
    assert (code, json.loads(out)) == (0, {"valid": True, "rules": 5, "files": 3, "problems": []})


def test_github_annotations(config: Config, multi: Path) -> None:
    code, out = check([multi], config, "github")
    lines = out.splitlines()
    assert code == 1
    assert lines[-1] == "FAILED: 4 problems in 1 file"
    assert all(line.startswith("::error file=multi.yaml,line=") for line in lines[:-1])
    assert lines[2].startswith(
        "::error file=multi.yaml,line=6,col=22,title=gatekeeper check::"
        "rule 'multi': actions[0].notify.target: unknown target 'nowhere'"
    )
    code, out = check([REPO / "rules"], config, "github")
    assert (code, out) == (0, "SUCCESS: 5 rules found in 3 files\n")


def test_github_escaping() -> None:
    assert escape_data("100% done\r\nnext: a, b") == "100%25 done%0D%0Anext: a, b"
    assert escape_property("dir: a,b%\n") == "dir%3A a%2Cb%25%0A"
    problem = Problem("odd,name:1.yaml", 3, 4, "bad\nthing: 50%", "when", "r,1")
    assert github_command(problem) == (
        "::error file=odd%2Cname%3A1.yaml,line=3,col=4,title=gatekeeper check::"
        "rule 'r,1': when: bad%0Athing: 50%25"
    )
    no_line = Problem("gone.yaml", 0, 0, "no such file or directory")
    assert github_command(no_line) == (
        "::error file=gone.yaml,title=gatekeeper check::no such file or directory"
    )


def test_without_config_references_are_not_checked(multi: Path) -> None:
    code, out = check([multi], None)
    assert code == 1
    assert "unknown target" not in out
    assert out.splitlines()[-1] == "FAILED: 3 problems in 1 file"


def test_several_paths_and_files(config: Config, tmp_path: Path) -> None:
    bad = DATA / "bad_rules"
    code, out = check([bad / "bad_fire.yaml", bad / "duplicate_id", tmp_path / "gone.yaml"], config)
    assert code == 1
    assert out.splitlines()[-1] == "FAILED: 3 problems in 3 files"
    assert "already used at" in out


def test_format_problems_is_one_line_each() -> None:
    problems = [Problem("a.yaml", 1, 2, "m", "id", "r"), Problem("b.yaml", 0, 0, "gone")]
    assert format_problems(problems) == ["a.yaml:1:2: rule 'r': id: m", "b.yaml: gone"]


RULES_OVER_MANY_THINGS_BAD = {
    "set_fact_other_project.yaml": (
        "set_fact_other_project.yaml:7:58: rule 'bad/set-fact-project': "
        "actions[0].set_fact.project: set_fact has no 'project' key: a rule records facts "
        "only in its own project (the rule's 'project'); to act on another project, post the "
        "fact to it from outside"
    ),
    "for_each_malformed.yaml": (
        "for_each_malformed.yaml:4:11: rule 'bad/for-each-kind': for_each: 'Build-Runs' is "
        "not a valid fact kind for for_each (a lowercase letter, then lowercase letters, "
        "digits and _; e.g. build or test_run)"
    ),
    "template_not_read.yaml": (
        "template_not_read.yaml:11:83: rule 'bad/template-not-read': "
        "actions[0].notify.message: template name 'build.b9.commit' is not read by this "
        "rule: a template may use the facts its 'when' reads by id (here: milestone.m1); "
        "the current build is item: ${item.id}, ${item.data.FIELD}"
    ),
    "collection_unsafe.yaml": (
        "collection_unsafe.yaml:5:54: rule 'bad/collection-unsafe': when: names starting "
        "with '_' are not allowed: '__class__'"
    ),
    "collection_call.yaml": (
        "collection_call.yaml:5:64: rule 'bad/collection-call': when: unknown function "
        "'open'; available: days_since, hours_since, minutes_since, now, len, min, max, abs, "
        "round"
    ),
    "self_trigger.yaml": (
        "self_trigger.yaml:8:22: rule 'bad/self-trigger': actions[0].set_fact.kind: this "
        "rule sets a fact of kind 'build', its for_each kind, so it can re-trigger itself: "
        "each fact it sets can fire it again (fire: each_fact), a loop only max_chain_depth "
        "would stop; set a kind this rule does not read and let another rule read it"
    ),
    "loop_across_rules": (
        "loop_across_rules/1-pay.yaml:9:22: rule 'bad/pay': actions[1].set_fact.kind: this "
        "rule sets a fact of kind 'pong', which rule 'bad/bounce' reads, and the rules feed "
        "each other in a loop: bad/pay -> bad/bounce -> bad/pay; bad/pay fires again at each "
        "fact that comes round (fire: each_fact), so one fact from outside fires it more "
        "than once, a loop gatekeeper would only cut when it runs, blocking the firing; "
        "break the cycle: let one rule of it set a kind no rule of the cycle reads"
    ),
}


@pytest.mark.parametrize("name", sorted(RULES_OVER_MANY_THINGS_BAD))
def test_per_item_rule_mistakes_point_home(
    name: str, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(DATA / "bad_rules")
    code, out = check([Path(name)], config)
    assert code == 1
    assert out.splitlines() == [RULES_OVER_MANY_THINGS_BAD[name], "FAILED: 1 problem in 1 file"]


RELEASE_AMOUNT_BAD = {
    "amount_template_without_cap.yaml": [
        "amount_template_without_cap.yaml:7:68: rule 'bad/amount-without-cap': "
        "actions[0].release.amount: an amount read from a fact needs max_amount, the most "
        'one firing may release (a decimal string such as "10000.00")'
    ],
    "max_amount_zero.yaml": [
        "max_amount_zero.yaml:11:19: rule 'bad/max-amount-zero': actions[0].release.max_amount: "
        'max_amount must be above zero (a decimal string such as "10000.00")'
    ],
    "amount_over_max.yaml": [
        "amount_over_max.yaml:9:15: rule 'bad/amount-over-max': actions[0].release.amount: "
        "amount 1500.00 is above this release's max_amount 1000.00"
    ],
    "amount_template_not_a_field.yaml": [
        "amount_template_not_a_field.yaml:7:71: rule 'bad/amount-reserved': "
        "[0].actions[0].release.amount: a release amount names a fact field, not 'amount': "
        "e.g. ${item.data.amount} or ${invoice.i7.total}",
        "amount_template_not_a_field.yaml:13:71: rule 'bad/amount-not-read': "
        "[1].actions[0].release.amount: template name 'invoice.i7.total' is not read by this "
        "rule: a template may use the facts its 'when' reads by id (here: milestone.design)",
    ],
    "amount_template_with_text.yaml": [
        "amount_template_with_text.yaml:10:15: rule 'bad/amount-with-text': "
        "actions[0].release.amount: '${item.data.amount}.00' is not a valid amount (a decimal "
        'string such as "5000.00": digits, no leading zeros, at most eight decimals; or one '
        'placeholder naming a fact field, such as "${item.data.amount}")'
    ],
    "max_amount_over_limit.yaml": [
        "max_amount_over_limit.yaml:12:19: rule 'bad/max-amount-over-limit': "
        "actions[0].release.max_amount: max_amount 2500.00 is above the limit of escrow "
        "'tower-b-escrow' (1000.00 EUR): a release that large could never be sent; lower "
        "max_amount to at most 1000.00"
    ],
    "payee_template.yaml": [
        "payee_template.yaml:8:37: rule 'bad/payee-from-fact': actions[0].release.payee: a "
        "release's payee is written as it is, never read from a fact (only its amount may be, "
        "under max_amount): a fact could otherwise send signed-off money elsewhere"
    ],
}


@pytest.mark.parametrize("name", sorted(RELEASE_AMOUNT_BAD))
def test_release_amount_mistakes_point_home(
    name: str, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(DATA / "bad_rules")
    code, out = check([Path(name)], config)
    assert code == 1
    expected = RELEASE_AMOUNT_BAD[name]
    noun = "problem" if len(expected) == 1 else "problems"
    assert out.splitlines() == [*expected, f"FAILED: {len(expected)} {noun} in 1 file"]


def test_release_amount_from_a_fact_with_a_cap_is_valid(config: Config, tmp_path: Path) -> None:
    rule = tmp_path / "pay.yaml"
    rule.write_text(
        """\
- id: ok/pay-invoice
  project: tower-a
  for_each: invoice
  when: item.data.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${item.data.amount}",
                max_amount: "10000.00", currency: USD, payee: "acme"}
    - notify: {target: finance-chat, message: "released ${amount} for ${item.id}"}
- id: ok/pay-total
  project: tower-a
  when: invoice.i7.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${invoice.i7.total}",
                max_amount: "10000.00", currency: USD, payee: "acme"}
- id: ok/literal-under-cap
  project: tower-a
  when: invoice.i8.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "10000.00",
                max_amount: "10000.00", currency: USD, payee: "acme"}
""",
        encoding="utf-8",
    )
    code, out = check([rule], config)
    assert (code, out.splitlines()[-1]) == (0, "SUCCESS: 3 rules found in 1 file")
