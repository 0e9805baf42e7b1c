"""`gatekeeper test`: the bundled rules' tests pass, a broken rule fails with a readable diff
and its explanation, the three formats (JUnit XML parses with the standard attributes), and
malformed test files are reported with file:line (exit 2)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import xml.etree.ElementTree as ET
from datetime import timedelta
from pathlib import Path

import pytest

from gatekeeper.cli.ruletest import add_test_parser, is_subset, parse_duration, run_test
from gatekeeper.expr import CompiledCondition

REPO = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data" / "ruletests"
CONFIG = REPO / "gatekeeper.yaml"


def gatekeeper_test(*argv: str | Path) -> tuple[int, str]:
    """Run ``gatekeeper test ARGV`` in-process; (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="gatekeeper")
    add_test_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["test", *map(str, argv)])
    out = io.StringIO()
    return run_test(args, out), out.getvalue()


@pytest.fixture
def broken_rules(tmp_path: Path) -> Path:
    """A copy of the bundled rules (tests included) with the design release's amount changed
    and the structure release's hold made one day longer."""
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    milestones = rules / "tower-a" / "milestones.yaml"
    text = milestones.read_text()
    text = text.replace('amount: "5000.00"', 'amount: "6000.00"')
    text = text.replace("approved_at) >= 14", "approved_at) >= 15")
    milestones.write_text(text)
    return rules


def test_bundled_rules_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, out = gatekeeper_test("-c", CONFIG, "rules")
    lines = out.splitlines()
    assert code == 0, out
    assert lines[-1].startswith("SUCCESS: ") and lines[-1].endswith(" passed in 3 files")
    assert "rules/tower-a/milestones.test.yaml (rules: rules)" in lines
    assert not [line for line in lines if "FAIL" in line]
    assert sum(line.startswith("  PASS  ") for line in lines) >= 10


def test_no_paths_runs_the_tests_in_the_configured_rules_dir() -> None:
    code, out = gatekeeper_test("-c", CONFIG)
    assert code == 0, out
    assert out.splitlines()[-1].endswith(" passed in 3 files")


def test_broken_rule_fails_with_a_diff_and_the_explanation(broken_rules: Path) -> None:
    code, out = gatekeeper_test("-c", CONFIG, "--rules", broken_rules, broken_rules)
    assert code == 1
    assert "  FAIL  design release waits for QA and the 7-day hold, then fires once" in out
    assert (
        "step 4 at 2026-03-08T09:00:00.000Z (line 22): tower-a/design-release: "
        "its release action differs from the expected one (line 27):\n"
        '          - amount: "5000.00"\n'
        '          + amount: "6000.00"\n'
        "          explanation:\n"
        "            gate open at 2026-03-08T09:00:00.000Z: condition true\n"
        '              [true ] milestone.design.status == "approved"\n'
    ) in out
    assert '- message: "Released 5000.00 USD to acme-architects' in out
    assert '+ message: "Released 6000.00 USD to acme-architects' in out
    # the longer hold: the rule did not fire, the explanation says which clause and when
    assert "tower-a/structure-release: expected to fire, but it did not (not met)" in out
    assert "[false] days_since(milestone.structure.approved_at) >= 15" in out
    assert "approvals: 2 of 2 required (approved by alice, bob; from alice, bob, carol)" in out
    if hasattr(CompiledCondition, "next_change_at"):
        assert "(deadline 2026-04-16T09:00:00.000Z: 22h 0m left)" in out
    assert "  PASS  the docs pipeline starts each time T-17 is completed" in out
    assert out.splitlines()[-1] == "FAILED: 4 of 10 cases failed in 3 files"


def test_junit_is_valid_junit_xml(broken_rules: Path) -> None:
    code, out = gatekeeper_test(
        "-c", CONFIG, "--rules", broken_rules, "--format", "junit", broken_rules
    )
    assert code == 1
    assert out.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(out)
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 3
    for suite in suites:
        for attribute in ("name", "tests", "failures", "errors", "skipped", "time", "timestamp"):
            assert attribute in suite.attrib, attribute
        float(suite.attrib["time"])
        cases = suite.findall("testcase")
        assert int(suite.attrib["tests"]) == len(cases)
        failed = [c for c in cases if c.find("failure") is not None]
        assert int(suite.attrib["failures"]) == len(failed)
        for case in cases:
            assert {"name", "classname", "time"} <= set(case.attrib)
    totals = {key: sum(int(s.attrib[key]) for s in suites) for key in ("tests", "failures")}
    assert (int(root.attrib["tests"]), int(root.attrib["failures"])) == (10, 4)
    assert totals == {"tests": 10, "failures": 4}
    milestones = next(s for s in suites if s.attrib["name"].endswith("milestones.test.yaml"))
    first = milestones.findall("testcase")[0]
    failure = first.find("failure")
    assert failure is not None
    assert failure.attrib["message"].startswith(
        "step 4 at 2026-03-08T09:00:00.000Z: tower-a/design-release: its release action differs"
    )
    assert '+ amount: "6000.00"' in (failure.text or "")


def test_json_report(broken_rules: Path) -> None:
    code, out = gatekeeper_test(
        "-c", CONFIG, "--rules", broken_rules, "--format", "json", broken_rules
    )
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False
    assert report["summary"] == {
        "files": 3,
        "passed": 6,
        "failed": 4,
        "skipped": 0,
        "problems": 0,
    }
    milestones = next(f for f in report["files"] if f["file"].endswith("milestones.test.yaml"))
    case = milestones["cases"][0]
    assert case["status"] == "failed"
    failure = case["failures"][0]
    assert failure["step"] == 4 and failure["line"] == 22
    assert failure["rule"] == "tower-a/design-release"
    assert failure["diff"] == ['- amount: "5000.00"', '+ amount: "6000.00"']
    assert failure["explanation"]["gate_open"] is True
    assert failure["explanation"]["condition"]["clauses"][0]["value"] is True


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("both_times", "6:16: cases[0].steps[0].after: give either `at` or `after`, not both"),
        ("backwards", "6:13: cases[0].steps[1].at: time goes backwards: before 2026-06-02"),
        (
            "unknown_rule",
            "7:21: cases[0].steps[0].expect.fired[0].rule: no rule 'site-b/foundation-relase' "
            "in the ruleset; did you mean 'site-b/foundation-release'?",
        ),
        (
            "no_project",
            "6:13: cases[0].steps[0].facts[0]: missing key 'project': the ruleset has several "
            "(site-b, site-c)",
        ),
        (
            "not_an_approver",
            "6:45: cases[0].steps[0].approvals[0].by: 'mallory' is not one of the approvers "
            "of rule 'site-b/roof-signoff' (alice, bob)",
        ),
        (
            "unknown_key",
            "6:9: cases[0].steps[0].expct: unknown key 'expct'; did you mean 'expect'?",
        ),
        ("bad_yaml", "4:1: invalid YAML: did not find expected ',' or ']'"),
        ("bad_time", "5:13: cases[0].steps[0].at: not an RFC 3339 time with a zone"),
        ("bad_duration", "5:16: cases[0].steps[0].after: '1w' is not a duration"),
        (
            "approval_without_item",
            "6:13: cases[0].steps[0].approvals[0]: missing key 'item': rule "
            "'site-b/section-signoff' is per item (for_each: section); an approval names the "
            "item it approves",
        ),
        (
            "approval_item_of_plain_rule",
            "6:77: cases[0].steps[0].approvals[0].item: rule 'site-b/roof-signoff' has no "
            "for_each: item names an instance of a per-item rule, and this rule has none",
        ),
    ],
)
def test_malformed_test_files_exit_2_with_file_and_line(
    name: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(DATA)
    code, out = gatekeeper_test("-c", "gatekeeper.yaml", f"bad/{name}.test.yaml")
    assert code == 2
    assert f"  bad/{name}.test.yaml:{expected}" in out
    assert out.splitlines()[-1].startswith("ERROR: ")


def test_malformed_file_in_json_and_junit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)
    code, out = gatekeeper_test(
        "-c", "gatekeeper.yaml", "--format", "json", "bad/backwards.test.yaml"
    )
    problems = json.loads(out)["files"][0]["problems"]
    assert code == 2
    assert (problems[0]["file"], problems[0]["line"], problems[0]["path"]) == (
        "bad/backwards.test.yaml",
        6,
        "cases[0].steps[1].at",
    )
    code, out = gatekeeper_test("-c", "gatekeeper.yaml", "--format", "junit", "bad", "rules")
    root = ET.fromstring(out)
    assert code == 2
    assert int(root.attrib["errors"]) == 11
    error = root.find("testsuite/testcase/error")
    assert error is not None and error.attrib["message"].startswith("1 problem: bad/")


def test_blocked_releases_and_several_projects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)
    code, out = gatekeeper_test("-c", "gatekeeper.yaml")
    assert code == 0, out
    assert out.splitlines()[-1] == "SUCCESS: 3 cases passed in 1 file"


def test_unexpected_and_blocked_firings_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(DATA)
    test_file = tmp_path / "wrong.test.yaml"
    test_file.write_text(
        f"rules: {DATA / 'rules'}\n"
        "cases:\n"
        "  - name: wrong\n"
        "    steps:\n"
        "      - facts:\n"
        "          - {project: site-b, kind: milestone, id: foundation, data: {status: approved}}\n"
        "        expect:\n"
        "          not_fired: [site-b/foundation-release]\n"
        "          blocked: [site-b/foundation-release]\n"
        "      - facts:\n"
        "          - {project: site-b, kind: milestone, id: walls, data: {status: approved}}\n"
        "        expect:\n"
        "          fired:\n"
        "            - rule: site-b/walls-release\n"
        "              actions: [{notify: {message: hi}}]\n"
    )
    code, out = gatekeeper_test("-c", "gatekeeper.yaml", test_file)
    assert code == 1
    assert (
        "site-b/foundation-release: expected not to fire, but it fired "
        "(site-b/foundation-release#1)\n"
        "          + release escrow-bank: 5000.00 EUR from site-b-escrow to diggers\n"
    ) in out
    assert "expected to be blocked, but it fired and sent its actions" in out
    assert (
        "site-b/walls-release: expected to fire, but it was blocked: release of 5000.00 EUR "
        "exceeds what is left of escrow 'site-b-escrow': 1000.00 of 6000.00 EUR"
    ) in out


def test_missing_action_kind_is_named(tmp_path: Path) -> None:
    test_file = tmp_path / "kind.test.yaml"
    test_file.write_text(
        f"rules: {REPO / 'rules'}\n"
        "cases:\n"
        "  - name: docs\n"
        "    steps:\n"
        "      - facts: [{kind: task, id: T-17, data: {status: completed}}]\n"
        "        expect:\n"
        "          fired:\n"
        "            - rule: tower-a/docs-pipeline\n"
        "              actions: [{notify: {target: site-ops}}]\n"
    )
    code, out = gatekeeper_test("-c", CONFIG, test_file)
    assert code == 1
    assert (
        'expected a notify action {"target": "site-ops"} (line 9), but the firing has none '
        '(its actions: pipeline ci-construction-docs: ref main, inputs {"stage": "docs", '
        '"task": "T-17"})'
    ) in out


def test_run_filter_skips_other_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    code, out = gatekeeper_test("-c", CONFIG, "--run", "^structure", "rules")
    assert code == 0
    assert out.count("  PASS  ") == 1
    assert "  SKIP  design release waits for QA" in out
    assert out.splitlines()[-1] == "SUCCESS: 1 case passed in 3 files (9 skipped by --run)"
    code, out = gatekeeper_test("-c", CONFIG, "--run", "^structure", "--format", "junit", "rules")
    root = ET.fromstring(out)
    assert (root.attrib["tests"], root.attrib["skipped"]) == ("10", "9")
    assert len(root.findall("testsuite/testcase/skipped")) == 9


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = gatekeeper_test("-c", CONFIG, "--run", "(", "rules")
    assert code == 2
    assert "--run: invalid regular expression" in capsys.readouterr().err
    code, out = gatekeeper_test("-c", CONFIG, tmp_path / "gone")
    assert code == 2
    assert "gone: no such file or directory" in out
    code, out = gatekeeper_test("-c", CONFIG, tmp_path)
    assert code == 2
    assert "no rule test files (*.test.yaml) found here" in out
    code, _ = gatekeeper_test("-c", tmp_path / "missing.yaml")
    assert code == 2
    assert "config file" in capsys.readouterr().err


def test_invalid_rules_are_reported_with_their_location(broken_rules: Path) -> None:
    (broken_rules / "tower-a" / "quality.yaml").write_text("id: x\nproject: tower-a\n")
    code, out = gatekeeper_test("-c", CONFIG, "--rules", broken_rules, broken_rules)
    assert code == 2
    assert "cannot run: the rules in" in out
    assert "tower-a/quality.yaml:1:1: rule 'x': missing required key 'when'" in out


def test_parse_duration() -> None:
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("1d12h30m15s") == timedelta(days=1, hours=12, minutes=30, seconds=15)
    assert parse_duration("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")


def test_is_subset() -> None:
    got = {"target": "ci", "ref": "main", "inputs": {"stage": "docs", "task": "T-17"}}
    assert is_subset({"inputs": {"stage": "docs"}}, got)
    assert not is_subset({"inputs": {"stage": "build"}}, got)
    assert not is_subset({"amount": "1"}, got)


PER_ITEM_RULE = """\
id: dev/test-failed
project: dev
for_each: test_run
when: item.data.result == "failed"
fire: each_fact
actions:
  - notify: {target: finance-chat, message: "${item.data.suite} failed at ${item.data.commit}"}
"""

PER_ITEM_CASES = """\
cases:
  - name: wrong expectations about one instance
    steps:
      - at: 2026-11-02T09:00:00Z
        facts:
          - {kind: test_run, id: unit-c1, data: {suite: unit, result: failed, commit: c1}}
        expect:
          not_fired: [dev/test-failed]
      - after: 1h
        facts:
          - {kind: test_run, id: e2e-c2, data: {suite: e2e, result: passed, commit: c2}}
        expect:
          fired: [{rule: dev/test-failed}]
      - after: 1h
        facts:
          - {kind: test_run, id: lint-c3, data: {suite: lint, result: failed, commit: c3}}
        expect:
          fired:
            - rule: dev/test-failed
              actions: [{notify: {message: "lint failed at c4"}}]
"""


def test_a_per_item_rule_failure_explains_the_instance_concerned(tmp_path: Path) -> None:
    """The explanation of a failed expectation about a per-item rule is that of the item that
    fired or was decided (its data read), never the rule without an item ("missing: item")."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tests.yaml").write_text(PER_ITEM_RULE)
    (rules / "tests.test.yaml").write_text(PER_ITEM_CASES)
    code, out = gatekeeper_test("-c", CONFIG, "--rules", rules, rules)
    assert code == 1, out
    assert "missing: item" not in out
    fired, not_fired, wrong_action = out.split("\n        step ")[1:]
    assert "expected not to fire, but it fired (dev/test-failed[unit-c1]#1)" in fired
    assert '[true ] item.data.result == "failed"' in fired
    assert "explanation (item unit-c1):" in fired
    assert "expected to fire, but it did not (not met)" in not_fired
    assert "explanation (item e2e-c2):" in not_fired
    assert '[false] item.data.result == "failed"' in not_fired
    assert "its notify action differs" in wrong_action
    assert '[true ] item.data.result == "failed"' in wrong_action
    code, out = gatekeeper_test("-c", CONFIG, "--rules", rules, "--format", "json", rules)
    [case] = json.loads(out)["files"][0]["cases"]
    assert [f["item"] for f in case["failures"]] == ["unit-c1", "e2e-c2", "lint-c3"]


def test_approvals_of_a_per_item_rule_name_their_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(DATA)
    section = "{project: site-b, kind: section, id: s1, data: {status: %s}}"
    signoff = "site-b/section-signoff"
    test_file = tmp_path / "sections.test.yaml"
    test_file.write_text(
        f"rules: {DATA / 'rules'}\n"
        "cases:\n"
        "  - name: each opening needs its own approval\n"
        "    steps:\n"
        f"      - facts: [{section % 'done'}]\n"
        f"        expect: {{not_fired: [{signoff}]}}\n"
        f"      - approvals: [{{rule: {signoff}, by: alice, decision: approve, item: s1}}]\n"
        "        expect:\n"
        f"          fired: [{{rule: {signoff},\n"
        "                   actions: [{notify: {message: Section s1 signed off}}]}]\n"
        f"      - facts: [{section % 'open'}]\n"
        f"      - facts: [{section % 'done'}]\n"
        f"        expect: {{not_fired: [{signoff}]}}\n"
        f"      - approvals: [{{rule: {signoff}, by: bob, decision: approve, item: s1}}]\n"
        f"        expect: {{fired: [{{rule: {signoff}}}]}}\n"
    )
    code, out = gatekeeper_test("-c", "gatekeeper.yaml", test_file)
    assert code == 0, out
    assert out.splitlines()[-1] == "SUCCESS: 1 case passed in 1 file"

    # an approval naming an item whose fact does not exist yet fails the step
    test_file.write_text(
        f"rules: {DATA / 'rules'}\n"
        "cases:\n"
        "  - name: too early\n"
        "    steps:\n"
        f"      - approvals: [{{rule: {signoff}, by: alice, decision: approve, item: s1}}]\n"
    )
    code, out = gatekeeper_test("-c", "gatekeeper.yaml", test_file)
    assert code == 1, out
    assert (
        "the approval by alice names item 's1', but the rule has no instance 's1' "
        "(no section fact 's1'): the daemon would refuse it"
    ) in out
