"""`gatekeeper test` with per-item rules: an expected firing and an approval name their item;
the right item passes, a wrong one fails naming the instance and what fired instead, and an
item on a rule without for_each is a problem of the test file (exit 2)."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from .test_ruletest import CONFIG, gatekeeper_test

RULES = """
- id: tower-a/build-failed
  project: tower-a
  for_each: build
  when: item.data.status == "failed"
  actions:
    - notify: {target: site-ops, message: "build ${item.id} failed"}
- id: tower-a/ship
  project: tower-a
  for_each: build
  when: item.data.status == "passed"
  approvals: {required: 1, from: [alice]}
  actions:
    - pipeline: {target: ci-construction-docs, ref: "${item.data.commit}"}
- id: tower-a/plain
  project: tower-a
  when: milestone.design.status == "approved"
  actions:
    - notify: {target: site-ops, message: "design approved"}
"""


def write(tmp_path: Path, steps: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "builds.yaml").write_text(RULES)
    test_file = tmp_path / "items.test.yaml"
    test_file.write_text(
        f"rules: {rules}\ncases:\n  - name: items\n    steps:\n"
        + textwrap.indent(textwrap.dedent(steps), "      ")
    )
    return test_file


FACTS = """\
- facts:
    - {kind: build, id: b1, data: {status: passed, commit: c1}}
    - {kind: build, id: b2, data: {status: failed, commit: c2}}
"""


def test_a_firing_and_an_approval_name_their_item(tmp_path: Path) -> None:
    test_file = write(
        tmp_path,
        FACTS
        + """\
  expect:
    fired:
      - rule: tower-a/build-failed
        item: b2
        actions: [{notify: {message: "build b2 failed"}}]
    not_fired: [tower-a/ship]
- approvals: [{rule: tower-a/ship, by: alice, decision: approve, item: b1}]
  expect:
    fired:
      - {rule: tower-a/ship, item: b1, actions: [{pipeline: {ref: c1}}]}
""",
    )
    code, out = gatekeeper_test("-c", CONFIG, test_file)
    assert code == 0, out


def test_a_wrong_item_fails_naming_the_instance_and_what_fired(tmp_path: Path) -> None:
    test_file = write(
        tmp_path,
        FACTS
        + """\
  expect:
    fired:
      - {rule: tower-a/build-failed, item: b1}
- approvals: [{rule: tower-a/ship, by: alice, decision: approve, item: b2}]
  expect:
    fired: [{rule: tower-a/ship, item: b1}]
- approvals: [{rule: tower-a/ship, by: alice, decision: approve, item: b7}]
""",
    )
    code, out = gatekeeper_test("-c", CONFIG, test_file)
    assert code == 1, out
    assert (
        "tower-a/build-failed[b1]: expected to fire, but it did not (not met); "
        "it fired for another item: b2"
    ) in out
    # approving b2 (not passed) fired nothing; b1 still awaits its approval
    assert "tower-a/ship[b1]: expected to fire, but it did not (awaiting approvals)" in out
    assert (
        "tower-a/ship[b7]: the approval by alice names item 'b7', but the rule has no "
        "instance 'b7' (no build fact 'b7'): the daemon would refuse it"
    ) in out
    code, out = gatekeeper_test("-c", CONFIG, "--format", "json", test_file)
    report = json.loads(out)
    failures = report["files"][0]["cases"][0]["failures"]
    assert [(f["rule"], f.get("item")) for f in failures] == [
        ("tower-a/build-failed", "b1"),
        ("tower-a/ship", "b1"),
        ("tower-a/ship", "b7"),
    ]
    assert failures[0]["explanation"]["item"]["id"] == "b1"
    code, out = gatekeeper_test("-c", CONFIG, "--format", "junit", test_file)
    [failure] = ET.fromstring(out).findall("testsuite/testcase/failure")
    assert failure.attrib["message"].startswith(
        "step 1 at 1970-01-01T00:00:00.000Z: tower-a/build-failed[b1]: expected to fire"
    )
    # b1 and ship[b1] are explained for their instance; b7 has none to explain
    assert failure.text is not None and failure.text.count("explanation (item b1):") == 2
    assert "missing: item" not in failure.text


def test_an_item_on_a_rule_without_for_each_is_a_problem(tmp_path: Path) -> None:
    test_file = write(
        tmp_path,
        """\
- facts: [{kind: milestone, id: design, data: {status: approved}}]
  expect:
    fired: [{rule: tower-a/plain, item: design}]
""",
    )
    code, out = gatekeeper_test("-c", CONFIG, test_file)
    assert code == 2, out
    assert "expect.fired[0].item" in out
    assert "rule 'tower-a/plain' has no for_each" in out
