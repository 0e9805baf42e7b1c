"""``${name}`` message templates for notify actions, built on ``string.Template``.

User text is only ever substituted with ``string.Template`` (never ``str.format``), so a
message cannot reach attributes or format specs. ``$name`` and ``${name}`` both work; ``$$``
is a literal ``$``. The names a rule may use are fixed: ``COMMON_NAMES`` in every rule, plus
``RELEASE_NAMES`` (the fields of the rule's own release action) in rules that have one.
``gatekeeper check`` reports an unknown name or a malformed placeholder.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from string import Template

from gatekeeper.clock import format_rfc3339
from gatekeeper.rules.model import Rule

COMMON_NAMES: tuple[str, ...] = ("rule_id", "project", "fired_at")
RELEASE_NAMES: tuple[str, ...] = ("amount", "currency", "payee", "escrow")
TEMPLATE_NAMES: tuple[str, ...] = COMMON_NAMES + RELEASE_NAMES
"""Every name a template may use (``RELEASE_NAMES`` only in rules with a release action)."""

_FRAGMENT_CHARS = 40


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


def allowed_names(*, has_release: bool) -> tuple[str, ...]:
    """The names a rule's templates may use: ``COMMON_NAMES`` (+ ``RELEASE_NAMES``)."""
    return TEMPLATE_NAMES if has_release else COMMON_NAMES


def rule_template_names(rule: Rule) -> tuple[str, ...]:
    """The names ``rule``'s templates may use."""
    return allowed_names(has_release=rule.release is not None)


def template_names(text: str) -> list[str]:
    """The names ``text`` uses, in order of first use, without repeats.

    Raises ``TemplateError`` listing every malformed placeholder (``${1x}``, a lone ``$``).
    """
    problems = _syntax_problems(text)
    if problems:
        raise TemplateError(problems)
    return list(dict.fromkeys(name for name, _ in _placeholders(text)))


def check_template(text: str, allowed: tuple[str, ...] | frozenset[str]) -> list[TemplateProblem]:
    """Every problem with ``text`` as a template whose names must be in ``allowed``:
    malformed placeholders and unknown names (each use reported at its own offset)."""
    problems = _syntax_problems(text)
    for name, offset in _placeholders(text):
        if name not in allowed:
            fragment = _fragment(text, offset)
            problems.append(TemplateProblem(_unknown_name_message(name, allowed), offset, fragment))
    return sorted(problems, key=lambda p: p.offset)


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${name}``/``$name`` replaced by ``values[name]`` and ``$$`` by ``$``.

    Raises ``TemplateError`` for a malformed placeholder or a name missing from ``values``.
    """
    problems = _syntax_problems(text)
    for name, offset in _placeholders(text):
        if name not in values:
            message = f"template name {name!r} has no value"
            problems.append(TemplateProblem(message, offset, _fragment(text, offset)))
    if problems:
        raise TemplateError(sorted(problems, key=lambda p: p.offset))
    return Template(text).substitute(values)


def template_values(rule: Rule, fired_at: datetime) -> dict[str, str]:
    """The values of every name ``rule``'s templates may use, for a firing at ``fired_at``."""
    values = {"rule_id": rule.id, "project": rule.project, "fired_at": format_rfc3339(fired_at)}
    release = rule.release
    if release is not None:
        values.update(
            amount=release.amount,
            currency=release.currency,
            payee=release.payee,
            escrow=release.escrow,
        )
    return values


def _placeholders(text: str) -> list[tuple[str, int]]:
    """(name, offset of its ``$``) for every valid placeholder in ``text``."""
    found = []
    for match in Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if name is not None:
            found.append((name, match.start()))
    return found


def _syntax_problems(text: str) -> list[TemplateProblem]:
    problems = []
    for match in Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            offset = match.start()
            fragment = _fragment(text, offset)
            message = (
                f"invalid placeholder {fragment!r}: write ${{name}} with a name of letters, "
                "digits and _ not starting with a digit, or $$ for a literal $"
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


def _unknown_name_message(name: str, allowed: tuple[str, ...] | frozenset[str]) -> str:
    if name in RELEASE_NAMES:
        return f"template name {name!r} is only available in rules with a release action"
    known = [n for n in TEMPLATE_NAMES if n in allowed]
    message = f"unknown template name {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" (known: {', '.join(known)})"
