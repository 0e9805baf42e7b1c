"""${name} message templates: names, rendering, checking; never str.format."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.clock import format_rfc3339
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.rules.model import NotifyAction, Rule
from gatekeeper.rules.templates import (
    COMMON_NAMES,
    RELEASE_NAMES,
    TEMPLATE_NAMES,
    TemplateError,
    allowed_names,
    check_template,
    render_template,
    rule_template_names,
    template_names,
    template_values,
)


def test_names_in_order_of_first_use() -> None:
    text = "Released ${amount} ${currency} to $payee (${amount}); costs $$5"
    assert template_names(text) == ["amount", "currency", "payee"]
    assert template_names("no placeholders, {rule_id} is not one") == []


@pytest.mark.parametrize(
    ("text", "offset", "fragment"),
    [
        ("bad ${1x} name", 4, "${1x}"),
        ("lone $ sign", 5, "$"),
        ("attr ${rule_id.__class__}", 5, "${rule_id.__class__}"),
        ("unclosed ${rule_id", 9, "${rule_id"),
        ("format spec ${amount:>10}", 12, "${amount:>10}"),
    ],
)
def test_invalid_placeholders_are_reported(text: str, offset: int, fragment: str) -> None:
    with pytest.raises(TemplateError) as caught:
        template_names(text)
    [problem] = caught.value.problems
    assert (problem.offset, problem.fragment) == (offset, fragment)
    assert "invalid placeholder" in problem.message


def test_render_substitutes_and_unescapes() -> None:
    values = {"rule_id": "r1", "amount": "5000.00"}
    assert render_template("$$${amount} for $rule_id", values) == "$5000.00 for r1"


def test_render_never_formats_user_text() -> None:
    assert render_template("{rule_id} {0} {__class__}", {"rule_id": "x"}) == (
        "{rule_id} {0} {__class__}"
    )
    with pytest.raises(TemplateError):
        render_template("${rule_id.__class__}", {"rule_id": "x"})


def test_render_reports_every_missing_name() -> None:
    with pytest.raises(TemplateError) as caught:
        render_template("${payee} ${rule_id} ${escrow}", {"rule_id": "r"})
    assert [(p.offset, p.fragment) for p in caught.value.problems] == [
        (0, "${payee}"),
        (20, "${escrow}"),
    ]


@given(st.text().filter(lambda text: "$" not in text))
def test_text_without_dollar_renders_unchanged(text: str) -> None:
    assert render_template(text, {}) == text


def test_allowed_names_depend_on_release() -> None:
    assert allowed_names(has_release=False) == COMMON_NAMES == ("rule_id", "project", "fired_at")
    assert allowed_names(has_release=True) == TEMPLATE_NAMES == COMMON_NAMES + RELEASE_NAMES
    assert RELEASE_NAMES == ("amount", "currency", "payee", "escrow")


def test_check_reports_unknown_names_with_offsets() -> None:
    text = "${rule_id} ${amout} $projct ${amount} ${1}"
    problems = check_template(text, allowed_names(has_release=False))
    assert [(p.offset, p.fragment) for p in problems] == [
        (11, "${amout}"),
        (20, "$projct"),
        (28, "${amount}"),
        (38, "${1}"),
    ]
    assert problems[1].message.startswith("unknown template name 'projct'; did you mean 'project'?")
    assert problems[2].message == (
        "template name 'amount' is only available in rules with a release action"
    )
    assert check_template("${amount} $payee", TEMPLATE_NAMES) == []


def rule_from(text: str) -> Rule:
    result = load_rule_texts({"r.yaml": text}, None)
    assert result.ruleset is not None, result.problems
    return result.ruleset.rules[0]


def test_values_for_a_rule_with_a_release() -> None:
    rule = rule_from(
        """\
id: t/release
project: tower-a
when: task.t1.done
actions:
  - release: {target: bank, escrow: tower-a-escrow, amount: "12.50", currency: USD, payee: acme}
  - notify: {target: chat, message: "Paid ${amount} ${currency} to ${payee} from ${escrow}"}
"""
    )
    fired_at = datetime(2026, 11, 8, 9, 30, tzinfo=UTC)
    values = template_values(rule, fired_at)
    assert values == {
        "rule_id": "t/release",
        "project": "tower-a",
        "fired_at": format_rfc3339(fired_at),
        "amount": "12.50",
        "currency": "USD",
        "payee": "acme",
        "escrow": "tower-a-escrow",
    }
    assert rule_template_names(rule) == TEMPLATE_NAMES
    notify = rule.actions[1]
    assert isinstance(notify, NotifyAction)
    assert render_template(notify.message, values) == ("Paid 12.50 USD to acme from tower-a-escrow")


def test_values_for_a_rule_without_a_release() -> None:
    rule = rule_from(
        """\
id: t/notify
project: tower-a
when: task.t1.done
actions:
  - notify: {target: chat, message: "${rule_id} fired at ${fired_at}"}
"""
    )
    assert set(template_values(rule, datetime(2026, 1, 1, tzinfo=UTC))) == set(COMMON_NAMES)
    assert rule_template_names(rule) == COMMON_NAMES
