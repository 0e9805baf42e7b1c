"""${name} message templates: names, rendering, checking; never str.format."""

from __future__ import annotations

from datetime import UTC, datetime
from string import Template

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatekeeper.clock import format_rfc3339
from gatekeeper.expr import FactRef, Item
from gatekeeper.rules.loader import load_rule_texts
from gatekeeper.rules.model import NotifyAction, Rule
from gatekeeper.rules.templates import (
    COMMON_NAMES,
    MAX_RENDERED_CHARS,
    MAX_VALUE_CHARS,
    MISSING,
    RELEASE_NAMES,
    TEMPLATE_NAMES,
    TemplateError,
    TemplateMissing,
    TemplatePath,
    TemplateScope,
    TemplateTooLong,
    action_templates,
    allowed_names,
    check_template,
    render_template,
    render_value,
    rule_template_names,
    slack_escape,
    template_names,
    template_resolver,
    template_values,
    walk,
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


# ---------------------------------------------------------------------------------------------
# Data in templates: item and fact paths, rendering, bounds, escaping


def test_paths_parse_into_steps() -> None:
    assert TemplatePath.parse("rule_id") == TemplatePath("rule_id", "rule_id", ())
    assert TemplatePath.parse('task["T-17"].status') == TemplatePath(
        'task["T-17"].status', "task", ("T-17", "status")
    )
    assert TemplatePath.parse("item.data.stages[2]['x y']").steps == ("data", "stages", 2, "x y")
    names = template_names('${item.id} ${task["T-1"].n} $$ ${item.id}')
    assert names == ["item.id", 'task["T-1"].n']
    with pytest.raises(ValueError, match="not a template name"):
        TemplatePath.parse("a..b")


@pytest.mark.parametrize(
    "text",
    ["${item.data.__class__}", "${item.data[-1]}", "${item.data[x]}", '${task["a\\"b"]}'],
)
def test_malformed_paths_are_invalid_placeholders(text: str) -> None:
    [problem] = check_template(text, SCOPE)
    assert problem.message.startswith("invalid placeholder")


SCOPE = TemplateScope.of(
    has_release=False,
    item_kind="build",
    reads=frozenset(
        {FactRef("milestone", "design"), FactRef("task", "T-17"), FactRef("task", None)}
    ),
)


@pytest.mark.parametrize(
    "text",
    [
        "${item.id} ${item.kind} ${item.data} ${item.data.commit} ${item.data['x-y'][0]}",
        '${milestone.design.approved_at} ${milestone.design} ${task["T-17"].status}',
        "${task['T-17']} $rule_id ${project} ${fired_at} $$5",
    ],
)
def test_names_a_per_item_rule_may_use(text: str) -> None:
    assert check_template(text, SCOPE) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "${build.b9.commit}",
            "template name 'build.b9.commit' is not read by this rule: a template may use the "
            "facts its 'when' reads by id (here: milestone.design, task[\"T-17\"]); the current "
            "build is item: ${item.id}, ${item.data.FIELD}",
        ),
        ("${task.t2.status}", "template name 'task.t2.status' is not read by this rule"),
        ("${item}", "template name 'item': the current item has id, kind and data; write "),
        ("$item.id", "template name 'item': the current item has id, kind and data"),
        ("${item.status}", "template name 'item.status': the current item has id, kind and data"),
        ("${item.id.x}", "template name 'item.id.x': item.id is a text and has no fields"),
        ("${milestone}", "template name 'milestone' is a kind: name one fact the rule reads"),
        ("${task[0]}", "template name 'task[0]': a fact is named by its id"),
        ("${rule_id.x}", "template name 'rule_id' has no fields: write ${rule_id}"),
        ("${amount}", "template name 'amount' is only available in rules with a release action"),
        ("${itm.id}", "template name 'itm.id' is not read by this rule"),
        ("${itm.id}", "did you mean 'item.id'?"),
    ],
)
def test_names_a_per_item_rule_may_not_use(text: str, message: str) -> None:
    [problem] = check_template(text, SCOPE)
    assert problem.message.startswith(message) or problem.message.endswith(message)
    assert problem.offset == 0


def test_item_is_a_kind_outside_per_item_rules() -> None:
    scope = TemplateScope.of(
        has_release=True, item_kind=None, reads=frozenset({FactRef("item", "i1")})
    )
    assert check_template("${item.i1.size} ${amount}", scope) == []
    [problem] = check_template("${item.data.x}", scope)
    assert problem.message.endswith("'item' is the current item only in a for_each rule")


def test_unknown_reads_check_no_fact_names() -> None:
    scope = TemplateScope.of(has_release=False, item_kind=None, reads=None)
    assert check_template("${anything.at.all}", scope) == []
    assert check_template("${amount}", scope) != []


def test_a_template_too_long_to_ever_render_is_a_problem() -> None:
    assert check_template("x" * (MAX_RENDERED_CHARS - 1) + "$$", SCOPE) == []
    [problem] = check_template("x" * (MAX_RENDERED_CHARS + 1) + "${item.id}", SCOPE)
    assert "16,385 characters" in problem.message
    assert check_template("x" * (MAX_RENDERED_CHARS + 1), SCOPE) == []


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("text as is", "text as is"),
        ("", ""),
        (3, "3"),
        (2.5, "2.5"),
        (-0.0, "-0.0"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ({"b": [1, "x"], "a": None}, '{"b":[1,"x"],"a":null}'),
        (["é", {}], '["é",{}]'),
    ],
)
def test_render_value(value: object, shown: str) -> None:
    assert render_value(value) == shown


def test_render_value_cuts_long_values() -> None:
    assert render_value("x" * MAX_VALUE_CHARS) == "x" * MAX_VALUE_CHARS
    cut = render_value("y" * (MAX_VALUE_CHARS + 1))
    assert len(cut) == MAX_VALUE_CHARS == 1024
    assert cut == "y" * 1023 + "…"
    assert render_value(list(range(1000))).endswith("…")


ITEM = {"kind": "build", "id": "b<7>", "data": {"commit": "abc&d", "n": 3, "ok": None}}


def item_resolver(path: TemplatePath) -> object:
    return walk(ITEM, path.steps) if path.root == "item" else MISSING


def test_render_with_a_resolver_and_escape() -> None:
    text = "<b>${item.id}</b> $$ ${item.data.commit} ${item.data.n} ${item.data.ok} & <x>"
    assert render_template(text, item_resolver) == "<b>b<7></b> $ abc&d 3 null & <x>"
    assert render_template(text, item_resolver, escape=slack_escape) == (
        "<b>b&lt;7&gt;</b> $ abc&amp;d 3 null & <x>"
    )
    assert slack_escape("a&b<c>&amp;") == "a&amp;b&lt;c&gt;&amp;amp;"


def test_a_name_without_a_value_is_never_an_empty_string() -> None:
    with pytest.raises(TemplateMissing) as caught:
        render_template("${item.id} ${item.data.gone} ${item.data.n[0]}", item_resolver)
    assert caught.value.name == "item.data.gone"
    assert caught.value.names == ["item.data.gone", "item.data.n[0]"]
    assert str(caught.value) == "template name item.data.gone has no value"
    assert [p.offset for p in caught.value.problems] == [11, 29]

    def raising(path: TemplatePath) -> object:
        raise TemplateMissing(path.text)

    with pytest.raises(TemplateMissing, match=r"template name item\.id has no value"):
        render_template("${item.id}", raising)


def test_a_rendered_text_over_the_limit_blocks() -> None:
    def long(path: TemplatePath) -> str:
        return "z" * 5000

    four = "${item.id}" * 4  # 4 x 1,024 characters
    assert len(render_template(four * 4, long)) == MAX_RENDERED_CHARS
    with pytest.raises(TemplateTooLong) as caught:
        render_template(four * 4 + ".", long)
    assert caught.value.length == MAX_RENDERED_CHARS + 1
    plain = "p" * (4 * MAX_RENDERED_CHARS) + "$$"  # no placeholder: rendered as written
    assert render_template(plain, long) == plain[:-1]


_PIECES = st.sampled_from(
    ["$$", "${rule_id}", "$project", "${fired_at}", "$amount", "${payee}", "text ", "{x}", "é"]
)


@given(st.lists(st.one_of(_PIECES, st.text(alphabet="ab.[]{}\"' -_")), max_size=12))
def test_existing_templates_render_as_string_template_does(pieces: list[str]) -> None:
    text = "".join(pieces)
    values = {
        "rule_id": "t/r",
        "project": "tower-a",
        "fired_at": "2026-01-01T00:00:00Z",
        "amount": "12.50",
        "payee": "a&b <c>",
    }
    try:
        expected = Template(text).substitute(values)
    except (KeyError, ValueError):
        with pytest.raises(TemplateError):
            render_template(text, values)
    else:
        assert render_template(text, values) == expected


def test_resolver_of_a_per_item_rule() -> None:
    rule = rule_from(
        """\
id: dev/build-failed
project: dev
for_each: build
when: item.data.status == "failed" and milestone.m1.open
fire: each_fact
actions:
  - notify: {target: chat, message: "${item.id} at ${item.data.commit} (${milestone.m1.name})"}
  - pipeline: {target: ci, ref: "${item.data.commit}", inputs: {why: "${rule_id}"}}
  - set_fact: {kind: failure, id: "${item.id}", data: {commit: "${item.data.commit}", n: 1}}
"""
    )
    facts = {("milestone", "m1"): {"name": "M1", "open": True}}
    item = Item("build", "b7", {"status": "failed", "commit": "abc"})
    resolve = template_resolver(
        rule, datetime(2026, 1, 1, tzinfo=UTC), item=item, fact=lambda k, i: facts.get((k, i))
    )
    rendered = {
        (index, path): render_template(text, resolve)
        for index, action in enumerate(rule.actions)
        for path, text in action_templates(action)
    }
    assert rendered == {
        (0, ("message",)): "b7 at abc (M1)",
        (1, ("ref",)): "abc",
        (1, ("inputs", "why")): "dev/build-failed",
        (2, ("id",)): "b7",
        (2, ("data", "commit")): "abc",
    }
    assert check_template("${milestone.m1.name}", TemplateScope.of_rule(rule)) == []
    facts.clear()
    with pytest.raises(TemplateMissing, match=r"milestone\.m1\.name"):
        render_template("${milestone.m1.name}", resolve)
    no_item = template_resolver(
        rule, datetime(2026, 1, 1, tzinfo=UTC), item=None, fact=lambda k, i: None
    )
    assert no_item(TemplatePath.parse("item.id")) is MISSING
    assert no_item(TemplatePath.parse("rule_id")) == "dev/build-failed"
    assert no_item(TemplatePath.parse("rule_id.x")) is MISSING
