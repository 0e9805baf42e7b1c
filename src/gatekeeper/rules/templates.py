"""``${name}`` templates in actions, built on ``string.Template``'s syntax.

User text is never given to ``str.format`` and names are never looked up as attributes: a
placeholder is a *path* resolved step by step through JSON data, so a template cannot reach
anything but the values below.

Syntax: ``$name`` and ``${name}`` as in ``string.Template``; ``$$`` is a literal ``$``.
Inside braces a name may go on with steps: ``.field`` (letters, digits and ``_``, not
starting with a digit or with ``__``), ``["key"]`` / ``['key']`` (any key without its quote
or a backslash) and ``[0]`` (a list index): ``${item.data.commit}``,
``${task["T-17"].status}``, ``${item.data.stages[0].name}``. The bare ``$name`` form takes no
steps (``$item.id`` is ``$item`` followed by the text ``.id``).

Names (see ``TemplateScope``):

- ``rule_id``, ``project``, ``fired_at`` (``COMMON_NAMES``) in every rule, and the fields of
  the rule's own release action (``RELEASE_NAMES``: ``amount``, ``currency``, ``payee``,
  ``escrow``) in rules that have one. These names are reserved in templates.
- In a ``for_each`` rule: ``item.id``, ``item.kind``, ``item.data`` and any path below
  ``item.data`` (the current item). Elsewhere ``item`` is an ordinary kind.
- ``KIND.ID`` and any path below it, for every fact the rule's ``when`` reads by id
  (``${milestone.design.approved_at}`` when ``when`` reads ``milestone.design``); a kind read
  only as a whole (``len(task)``, a collection) gives no names.

Where: notify ``message``, pipeline ``ref`` and ``inputs`` values, set_fact ``id`` and the
string values of set_fact ``data`` (``TEMPLATE_FIELDS``, ``action_templates``); and a
release ``amount`` written as one placeholder naming a fact field (``${item.data.amount}``,
``${invoice.i7.total}``: no reserved name, ``check_amount_template``), whose raw value
``amount_value`` gives (the engine checks it is a decimal amount within ``max_amount``).

Rendering (``render_template``): each value through ``render_value`` (strings as they are,
numbers and booleans as JSON, ``null``, objects and lists as compact JSON, each cut at
``MAX_VALUE_CHARS``), then through the target's ``escape`` (``slack_escape`` for Slack),
which touches only the inserted values, never the template's own text. A name without a
value raises ``TemplateMissing`` (never an empty string); a template that inserts values and
renders to over ``MAX_RENDERED_CHARS`` raises ``TemplateTooLong`` (text without placeholders,
as rules could always write it, is not bounded here).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from string import Template
from typing import Any, Final, Protocol

from gatekeeper.clock import format_rfc3339
from gatekeeper.expr import FactRef
from gatekeeper.rules.model import (
    Action,
    NotifyAction,
    PipelineAction,
    ReleaseAction,
    Rule,
    SetFactAction,
)

COMMON_NAMES: tuple[str, ...] = ("rule_id", "project", "fired_at")
RELEASE_NAMES: tuple[str, ...] = ("amount", "currency", "payee", "escrow")
TEMPLATE_NAMES: tuple[str, ...] = COMMON_NAMES + RELEASE_NAMES
"""The reserved names (``RELEASE_NAMES`` only in rules with a release action)."""
ITEM_NAME = "item"
ITEM_FIELDS: tuple[str, ...] = ("id", "kind", "data")
"""What a ``for_each`` rule's templates may name under ``item``."""
MAX_VALUE_CHARS = 1024
"""Each inserted value is cut to this many characters, the last one ``…``."""
MAX_RENDERED_CHARS = 16_384
"""A template that inserts values renders to at most this many characters (else
``TemplateTooLong``); a template without placeholders is its own text, whatever its length."""
ELLIPSIS = "…"

_FRAGMENT_CHARS = 40
_NAME = r"(?a:[_a-z][_a-z0-9]*)"
_FIELD = r"(?a:(?!__)[_a-z][_a-z0-9]*)"
_INDEX = r"\[[0-9]{1,9}\]"
_KEY = r"""\["[^"\\]*"\]|\['[^'\\]*'\]"""
_STEP = rf"(?:\.{_FIELD}|{_INDEX}|{_KEY})"
_STEPS = re.compile(
    rf"""\.(?P<field>{_FIELD})|\[(?P<index>[0-9]{{1,9}})\]"""
    r"""|\["(?P<dq>[^"\\]*)"\]|\['(?P<sq>[^'\\]*)'\]""",
    re.IGNORECASE,
)


class _PathTemplate(Template):
    """``string.Template`` whose braced names may go on with path steps."""

    braceidpattern = _NAME + _STEP + "*"


@dataclass(frozen=True)
class TemplatePath:
    """One placeholder's name, parsed: ``text`` as written inside ``${...}`` (e.g.
    ``task["T-17"].status``), ``root`` its first name (``task``) and ``steps`` the rest, keys
    as ``str`` and list indexes as ``int`` (``("T-17", "status")``)."""

    text: str
    root: str
    steps: tuple[str | int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TemplatePath:
        """The path of a well-formed placeholder name (raises ``ValueError`` otherwise)."""
        root = re.match(_NAME, text, re.IGNORECASE)
        if root is None:
            raise ValueError(f"not a template name: {text!r}")
        steps: list[str | int] = []
        at = root.end()
        while at < len(text):
            step = _STEPS.match(text, at)
            if step is None:
                raise ValueError(f"not a template name: {text!r}")
            index = step.group("index")
            if index is not None:
                steps.append(int(index))
            else:
                steps.append(step.group("field") or step.group("dq") or step.group("sq") or "")
            at = step.end()
        return cls(text, root.group(), tuple(steps))


class _Missing:
    """The type of ``MISSING``."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""What a resolver returns for a name without a value (JSON ``null`` is a value: ``None``)."""

Resolve = Callable[[TemplatePath], Any]
"""Given a placeholder's path, its value (any JSON value) or ``MISSING``; it may also raise
``TemplateMissing``."""


@dataclass(frozen=True)
class TemplateProblem:
    """One thing wrong with a template: ``offset`` is the 0-based position of ``fragment``."""

    message: str
    offset: int
    fragment: str


class TemplateError(ValueError):
    """Raised for a malformed template or a name without a value; ``problems`` lists each."""

    def __init__(self, problems: list[TemplateProblem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


class TemplateMissing(TemplateError):
    """A name without a value when rendering: ``name`` is the first such name as written
    (``item.data.commit``), ``names`` every one, in order; ``str()`` is
    ``template name item.data.commit has no value``."""

    def __init__(
        self,
        name: str,
        problems: list[TemplateProblem] | None = None,
        names: list[str] | None = None,
    ) -> None:
        problems = problems or [TemplateProblem(missing_message(name), 0, "${" + name + "}")]
        super().__init__(problems)
        self.name = name
        self.names = names or [name]

    def __str__(self) -> str:
        return missing_message(self.name)


class TemplateTooLong(TemplateError):
    """A rendered text of ``length`` characters, over ``MAX_RENDERED_CHARS``."""

    def __init__(self, length: int) -> None:
        message = (
            f"the rendered text is {length:,} characters, over the limit of {MAX_RENDERED_CHARS:,}"
        )
        super().__init__([TemplateProblem(message, 0, "")])
        self.length = length


def missing_message(name: str) -> str:
    """``template name NAME has no value``."""
    return f"template name {name} has no value"


@dataclass(frozen=True)
class TemplateScope:
    """The names one rule's templates may use.

    ``has_release``: the rule has a release action (``RELEASE_NAMES``). ``item_kind``: the
    ``for_each`` kind of a per-item rule (``item.*`` names), None for a plain rule.
    ``facts``: the ``(kind, id)`` of every fact the rule's ``when`` reads by id; None when
    unknown (a ``when`` that does not compile), in which case fact names are not checked.
    """

    has_release: bool = False
    item_kind: str | None = None
    facts: frozenset[tuple[str, str]] | None = frozenset()

    @classmethod
    def of_rule(cls, rule: Rule) -> TemplateScope:
        """The scope of a loaded rule."""
        return cls.of(
            has_release=rule.release is not None,
            item_kind=rule.for_each,
            reads=rule.condition.reads,
        )

    @classmethod
    def of(
        cls, *, has_release: bool, item_kind: str | None, reads: frozenset[FactRef] | None
    ) -> TemplateScope:
        """A scope from its parts; ``reads`` is ``Condition.reads`` (None: unknown)."""
        facts = (
            None
            if reads is None
            else frozenset((ref.kind, ref.id) for ref in reads if ref.id is not None)
        )
        return cls(has_release, item_kind, facts)

    @property
    def names(self) -> tuple[str, ...]:
        """The reserved names this scope allows."""
        return allowed_names(has_release=self.has_release)

    def known(self) -> list[str]:
        """Every name this scope allows, as shown in messages."""
        shown = list(self.names)
        if self.item_kind is not None:
            shown += ["item.id", "item.kind", "item.data.FIELD"]
        shown += [_fact_text(kind, id) for kind, id in sorted(self.facts or ())]
        return shown


def allowed_names(*, has_release: bool) -> tuple[str, ...]:
    """The reserved names a rule's templates may use: ``COMMON_NAMES`` (+ ``RELEASE_NAMES``)."""
    return TEMPLATE_NAMES if has_release else COMMON_NAMES


def rule_template_names(rule: Rule) -> tuple[str, ...]:
    """The reserved names ``rule``'s templates may use."""
    return allowed_names(has_release=rule.release is not None)


def template_names(text: str) -> list[str]:
    """The names ``text`` uses, as written (``item.data.commit``), in order of first use,
    without repeats.

    Raises ``TemplateError`` listing every malformed placeholder (``${1x}``, a lone ``$``).
    """
    problems = _syntax_problems(text)
    if problems:
        raise TemplateError(problems)
    return list(dict.fromkeys(path.text for path, _ in _placeholders(text)))


def check_template(
    text: str, scope: TemplateScope | tuple[str, ...] | frozenset[str]
) -> list[TemplateProblem]:
    """Every problem with ``text`` as a template of a rule with ``scope`` (or, given a set of
    plain names, allowing exactly those): malformed placeholders and names the rule cannot
    use, each use at its own offset, in order; a template with placeholders whose own text
    is already over ``MAX_RENDERED_CHARS``."""
    problems = _syntax_problems(text)
    for path, offset in _placeholders(text):
        message = (
            _scope_problem(path, scope)
            if isinstance(scope, TemplateScope)
            else _names_problem(path, scope)
        )
        if message is not None:
            problems.append(TemplateProblem(message, offset, _fragment(text, offset)))
    literal = len(_PathTemplate.pattern.sub(lambda m: "$" if m.group("escaped") else "", text))
    if literal > MAX_RENDERED_CHARS and _placeholders(text):
        message = (
            f"the template's own text is {literal:,} characters: a rendered text may be at "
            f"most {MAX_RENDERED_CHARS:,}"
        )
        problems.append(TemplateProblem(message, 0, ""))
    return sorted(problems, key=lambda p: p.offset)


def render_template(
    text: str,
    resolve: Resolve | Mapping[str, Any],
    *,
    escape: Callable[[str], str] | None = None,
) -> str:
    """``text`` with each placeholder replaced by its value and ``$$`` by ``$``.

    ``resolve(path)`` gives the value of a ``TemplatePath`` (any JSON value), ``MISSING``
    when it has none, or raises ``TemplateMissing``; see ``template_resolver`` for the one a
    rule's firing uses. A mapping stands for the resolver of its keys (plain names only).
    Each value is inserted as ``render_value`` gives it, passed through ``escape`` when given
    (``slack_escape`` for Slack targets); the template's own text is never escaped.

    Raises ``TemplateError`` for a malformed placeholder, ``TemplateMissing`` (a
    ``TemplateError``) naming every name without a value, ``TemplateTooLong`` when ``text``
    has a placeholder and the result is over ``MAX_RENDERED_CHARS`` characters.
    """
    problems = _syntax_problems(text)
    if problems:
        raise TemplateError(problems)
    lookup = _mapping_resolver(resolve) if isinstance(resolve, Mapping) else resolve
    missing: list[TemplateProblem] = []
    missing_names: list[str] = []
    out: list[str] = []
    at = 0
    for match in _PathTemplate.pattern.finditer(text):
        out.append(text[at : match.start()])
        at = match.end()
        if match.group("escaped") is not None:
            out.append("$")
            continue
        path = TemplatePath.parse(match.group("named") or match.group("braced"))
        try:
            value = lookup(path)
        except TemplateMissing:
            value = MISSING
        if value is MISSING:
            fragment = _fragment(text, match.start())
            missing.append(TemplateProblem(missing_message(path.text), match.start(), fragment))
            missing_names.append(path.text)
            continue
        shown = render_value(value)
        out.append(escape(shown) if escape is not None else shown)
    if missing:
        raise TemplateMissing(missing_names[0], missing, missing_names)
    out.append(text[at:])
    rendered = "".join(out)
    inserted = any(m.group("escaped") is None for m in _PathTemplate.pattern.finditer(text))
    if inserted and len(rendered) > MAX_RENDERED_CHARS:
        raise TemplateTooLong(len(rendered))
    return rendered


def render_value(value: Any) -> str:
    """One value as a template inserts it: a string as it is; a number or boolean as JSON
    (``3``, ``2.5``, ``true``); None as ``null``; a mapping or list as compact JSON (UTF-8,
    keys in their order). Cut at ``MAX_VALUE_CHARS`` characters, the last one ``…``."""
    if isinstance(value, str):
        shown = value
    else:
        shown = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
        )
    if len(shown) > MAX_VALUE_CHARS:
        return shown[: MAX_VALUE_CHARS - 1] + ELLIPSIS
    return shown


def slack_escape(text: str) -> str:
    """``text`` with ``&``, ``<`` and ``>`` as Slack's ``&amp;``, ``&lt;``, ``&gt;`` (for the
    ``escape`` of ``render_template``: the inserted values of a Slack-format target)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def template_values(rule: Rule, fired_at: datetime, amount: str | None = None) -> dict[str, str]:
    """The values of the reserved names ``rule``'s templates may use, for a firing at
    ``fired_at``; ``amount`` is the rendered amount of the rule's release when it is a
    template (else its amount as written is used)."""
    values = {"rule_id": rule.id, "project": rule.project, "fired_at": format_rfc3339(fired_at)}
    release = rule.release
    if release is not None:
        values.update(
            amount=amount if amount is not None else release.amount,
            currency=release.currency,
            payee=release.payee,
            escrow=release.escrow,
        )
    return values


class ItemLike(Protocol):
    """The current item of a per-item rule (``gatekeeper.expr.Item`` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def data(self) -> Mapping[str, Any]: ...


FactData = Callable[[str, str], Mapping[str, Any] | None]
"""``(kind, id)`` -> the fact's data, or None when there is no such fact."""


def template_resolver(
    rule: Rule,
    fired_at: datetime,
    *,
    item: ItemLike | None,
    fact: FactData,
    amount: str | None = None,
) -> Resolve:
    """The resolver of ``rule``'s templates for one firing (for ``render_template``).

    Reserved names give ``template_values(rule, fired_at, amount)`` (``amount``: the rule's
    release amount as rendered, when it is a template); in a ``for_each`` rule,
    ``item.id``, ``item.kind``, ``item.data...`` read ``item`` (None: every ``item`` name is
    missing); any other ``KIND.ID...`` reads ``fact(KIND, ID)`` and then each step through the
    data (a key of a mapping, an index of a list). Anything absent on the way is ``MISSING``.
    """
    values = template_values(rule, fired_at, amount)
    per_item = rule.for_each is not None

    def resolve(path: TemplatePath) -> Any:
        if path.root in TEMPLATE_NAMES:
            return values.get(path.root, MISSING) if not path.steps else MISSING
        if per_item and path.root == ITEM_NAME:
            if item is None or not path.steps:
                return MISSING
            whole = {"kind": item.kind, "id": item.id, "data": item.data}
            return walk(whole, path.steps)
        if not path.steps or not isinstance(path.steps[0], str):
            return MISSING
        data = fact(path.root, path.steps[0])
        return MISSING if data is None else walk(data, path.steps[1:])

    return resolve


def walk(value: Any, steps: Sequence[str | int]) -> Any:
    """``value`` followed through ``steps`` (a ``str`` step into a mapping, an ``int`` step
    into a list); ``MISSING`` when a step finds nothing."""
    for step in steps:
        if isinstance(step, str) and isinstance(value, Mapping):
            value = value.get(step, MISSING)
        elif isinstance(step, int) and isinstance(value, list) and step < len(value):
            value = value[step]
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


TEMPLATE_FIELDS = {
    "notify": ("message",),
    "pipeline": ("ref", "inputs.*"),
    "set_fact": ("id", "data.*"),
}
"""The template fields of each action kind (``inputs.*``: every value of ``inputs``;
``data.*``: every string value of ``data``). A release ``amount`` is a template of its own
kind (one placeholder, see ``check_amount_template``)."""


def action_templates(action: Action) -> list[tuple[tuple[str, ...], str]]:
    """(key path inside the action's body, template text) of every template of ``action``:
    ``(("message",), ...)``, ``(("inputs", "env"), ...)``, ``(("data", "status"), ...)``;
    a release's amount when it is a template (``(("amount",), "${item.data.amount}")``)."""
    if isinstance(action, ReleaseAction):
        return [(("amount",), action.amount)] if action.templated else []
    if isinstance(action, NotifyAction):
        return [(("message",), action.message)]
    if isinstance(action, PipelineAction):
        return [(("ref",), action.ref)] + [
            (("inputs", key), value) for key, value in action.inputs.items()
        ]
    if isinstance(action, SetFactAction):
        return [(("id",), action.fact_id)] + [
            (("data", key), value) for key, value in action.data.items() if isinstance(value, str)
        ]
    return []


AMOUNT_TEMPLATE = re.compile(r"\$\{[^{}]+\}")
"""A release amount written as a template: exactly one braced placeholder, nothing else."""


def check_amount_template(text: str, scope: TemplateScope) -> list[TemplateProblem]:
    """Every problem with ``text`` as the template ``amount`` of a release in a rule with
    ``scope`` (see ``check_template``): it must name a fact field the rule's templates may
    use (``${item.data.FIELD}``, ``${KIND.ID.FIELD}``), not a reserved name
    (``${amount}`` would be the amount itself); its shape (one placeholder, nothing else)
    is the schema's to check."""
    problems = check_template(text, scope)
    for path, offset in _placeholders(text):
        if path.root in TEMPLATE_NAMES:
            message = (
                f"a release amount names a fact field, not {path.root!r}: e.g. "
                "${item.data.amount} or ${invoice.i7.total}"
            )
            problems = [p for p in problems if p.offset != offset]
            problems.append(TemplateProblem(message, offset, _fragment(text, offset)))
    return sorted(problems, key=lambda p: p.offset)


def amount_value(text: str, resolve: Resolve) -> Any:
    """The raw value of the one placeholder of a release amount template (any JSON value),
    or ``MISSING``. Raises ``TemplateError`` when ``text`` is not one placeholder."""
    placeholders = _placeholders(text)
    if len(placeholders) != 1 or not AMOUNT_TEMPLATE.fullmatch(text):
        raise TemplateError([TemplateProblem(f"not an amount template: {text!r}", 0, text)])
    try:
        return resolve(placeholders[0][0])
    except TemplateMissing:
        return MISSING


def _mapping_resolver(values: Mapping[str, Any]) -> Resolve:
    def resolve(path: TemplatePath) -> Any:
        return values.get(path.root, MISSING) if not path.steps else MISSING

    return resolve


def _placeholders(text: str) -> list[tuple[TemplatePath, int]]:
    """(path, offset of its ``$``) for every valid placeholder in ``text``."""
    found = []
    for match in _PathTemplate.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name is not None:
            found.append((TemplatePath.parse(name), match.start()))
    return found


def _syntax_problems(text: str) -> list[TemplateProblem]:
    problems = []
    for match in _PathTemplate.pattern.finditer(text):
        if match.group("invalid") is not None:
            offset = match.start()
            fragment = _fragment(text, offset)
            message = (
                f"invalid placeholder {fragment!r}: write ${{name}} with a name of letters, "
                "digits and _ not starting with a digit, then steps such as .field, "
                '["key"] or [0] (for example ${item.data.commit}), or $$ for a literal $'
            )
            problems.append(TemplateProblem(message, offset, fragment))
    return problems


def _fragment(text: str, offset: int) -> str:
    """The placeholder starting at ``offset``: up to its ``}`` when braced, else ``$word``."""
    if text.startswith("${", offset):
        end = text.find("}", offset)
        end = offset + _FRAGMENT_CHARS if end < 0 else min(end + 1, offset + _FRAGMENT_CHARS)
        return text[offset:end]
    end = offset + 1
    while (
        end < len(text)
        and end - offset < _FRAGMENT_CHARS
        and (text[end].isalnum() or text[end] == "_")
    ):
        end += 1
    return text[offset:end] if end > offset + 1 else text[offset : offset + 2].rstrip()


def _fact_text(kind: str, id: str) -> str:
    return f"{kind}.{id}" if re.fullmatch(_FIELD, id, re.IGNORECASE) else f'{kind}["{id}"]'


def _names_problem(path: TemplatePath, allowed: tuple[str, ...] | frozenset[str]) -> str | None:
    """The problem of ``path`` where only the plain names ``allowed`` exist."""
    if not path.steps and path.root in allowed:
        return None
    if not path.steps and path.root in RELEASE_NAMES:
        return f"template name {path.root!r} is only available in rules with a release action"
    return _unknown_name_message(path.text, [n for n in TEMPLATE_NAMES if n in allowed])


def _scope_problem(path: TemplatePath, scope: TemplateScope) -> str | None:
    """The problem of ``path`` in a rule with ``scope``, or None when the rule may use it."""
    if path.root in TEMPLATE_NAMES:
        if path.root not in scope.names:
            return f"template name {path.root!r} is only available in rules with a release action"
        if path.steps:
            return f"template name {path.root!r} has no fields: write ${{{path.root}}}"
        return None
    if scope.item_kind is not None and path.root == ITEM_NAME:
        return _item_problem(path)
    if not path.steps:
        if scope.facts is not None and any(kind == path.root for kind, _ in scope.facts):
            example = next(
                _fact_text(kind, id) for kind, id in sorted(scope.facts) if kind == path.root
            )
            return (
                f"template name {path.root!r} is a kind: name one fact the rule reads, and a "
                f"field of it, e.g. ${{{example}.FIELD}}"
            )
        return _unknown_name_message(path.text, scope.known())
    fact_id = path.steps[0]
    if not isinstance(fact_id, str):
        return f'template name {path.text!r}: a fact is named by its id, e.g. {path.root}["ID"]'
    if scope.facts is None or (path.root, fact_id) in scope.facts:
        return None
    read = ", ".join(_fact_text(kind, id) for kind, id in sorted(scope.facts)) or "none"
    message = (
        f"template name {path.text!r} is not read by this rule: a template may use the "
        f"facts its 'when' reads by id (here: {read})"
    )
    if scope.item_kind is None and path.root == ITEM_NAME:
        message += "; 'item' is the current item only in a for_each rule"
    elif path.root == scope.item_kind:
        message += f"; the current {scope.item_kind} is item: ${{item.id}}, ${{item.data.FIELD}}"
    elif all(kind != path.root for kind, _ in scope.facts):
        close = difflib.get_close_matches(path.text, scope.known(), n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return message


def _item_problem(path: TemplatePath) -> str | None:
    steps = path.steps
    if steps and steps[0] == "data":
        return None
    if len(steps) == 1 and steps[0] in ("id", "kind"):
        return None
    if steps and steps[0] in ("id", "kind"):
        return f"template name {path.text!r}: item.{steps[0]} is a text and has no fields"
    return (
        f"template name {path.text!r}: the current item has id, kind and data; write "
        "${item.id}, ${item.kind} or ${item.data.FIELD}"
    )


def _unknown_name_message(name: str, known: list[str]) -> str:
    message = f"unknown template name {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" (known: {', '.join(known)})"
