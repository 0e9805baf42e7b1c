"""Abuse cases for the rules side: limits that must not surprise, special files in the rules
directory, secrets written where a variable name belongs, and CI request limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatekeeper.expr import ExpressionError, compile_condition
from gatekeeper.rules.loader import load_rule_texts

# ---------------------------------------------------------------------------------------------
# Limits that surprise


def test_eight_thousand_rules_without_aliases_are_accepted() -> None:
    rule = (
        "- id: many/r{i}\n"
        "  project: tower-a\n"
        "  when: task.t{i}.done and milestone.m{i}.status == 'approved'\n"
        "  actions:\n"
        "    - notify: {{target: site-ops, message: 'rule {i} fired'}}\n"
    )
    text = "".join(rule.format(i=i) for i in range(8_000))
    result = load_rule_texts({"many.yaml": text}, None)
    assert not result.problems
    assert result.ruleset is not None
    assert len(result.ruleset.rules) == 8_000


def test_many_rules_with_one_alias_are_accepted_but_a_bomb_is_not() -> None:
    rule = "- id: many/r{i}\n  project: tower-a\n  when: task.t{i}.done\n  actions: *acts\n"
    head = "- id: many/first\n  project: tower-a\n  when: task.t.done\n"
    head += "  actions: &acts\n    - pipeline: {target: ci-construction-docs, ref: main}\n"
    text = head + "".join(rule.format(i=i) for i in range(8_000))
    result = load_rule_texts({"many.yaml": text}, None)
    assert not [p for p in result.problems if "aliases" in p.message]
    bomb = ["- id: many/bomb", "  bomb:", "    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    result = load_rule_texts({"bomb.yaml": text + "\n".join(bomb) + "\n"}, None)
    assert "too large once aliases are expanded" in result.problems[0].message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("len('a' * 10**8) > 1", "result would hold 100000000 items; the limit is 10000"),
        ("len([1] * 10**9) > 1", "the limit is 10000"),
        ("len(10**9 * (1, 2)) > 1", "the limit is 10000"),
        ("('x' * 6000) + ('y' * 6000) == ''", "the limit is 10000"),
        ("((2**64)**64)**64 > 0", "exceed 10000 bits"),
        ("-(2**64)**64 * (2**64)**64 * (2**64)**64 < 0", "exceed 10000 bits"),
    ],
)
def test_literal_unbounded_work_is_refused_by_check(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as raised:
        compile_condition(text)
    assert any(message in problem.message for problem in raised.value.problems)


def test_bounded_literal_work_still_compiles() -> None:
    for text in ("len('a' * 10000) == 10000", "2 ** 64 > 1", "[0] * 100 + [1] * 100 != []"):
        compile_condition(text)


def test_check_refuses_what_run_time_refuses(tmp_path: Path) -> None:
    text = 'id: big/x\nproject: tower-a\nwhen: len("a"*10**8) > 1\n'
    text += "actions:\n  - pipeline: {target: ci-construction-docs, ref: main}\n"
    result = load_rule_texts({"big.yaml": text}, None)
    assert [p.message for p in result.problems if "limit is 10000" in p.message]
