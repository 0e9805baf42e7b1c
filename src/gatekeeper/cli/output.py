"""What the offline commands print: problem lines, GitHub Actions workflow commands, counts.

``check``, ``test`` and ``plan`` write their reports with these helpers, so a problem reads
the same whichever command found it:

- ``format_problems``: ``file:line:col: rule 'id': path: message``, one line per problem;
- ``github_commands`` / ``github_command``: one ``::error`` workflow command per problem
  (an annotation on the pull request), and ``workflow_command`` for any other level;
- ``escape_data`` / ``escape_property``: GitHub's escaping of a command's message and of
  its property values;
- ``plural``: ``1 rule``, ``2 rules``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gatekeeper.problems import Problem

PROBLEM_TITLE = "gatekeeper check"
"""The title of the annotation of a problem in rule files, whichever command found it."""


def plural(count: int, noun: str) -> str:
    """``"1 rule"``, ``"0 rules"``, ``"2 rules"``: the count and the noun, plural unless 1."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """One line per problem: ``file:line:col: rule 'id': path: message`` (for logs too)."""
    return [str(problem) for problem in problems]


def github_commands(problems: Iterable[Problem], title: str = PROBLEM_TITLE) -> list[str]:
    """A GitHub Actions ``::error`` workflow command per problem (see ``github_command``)."""
    return [github_command(problem, title) for problem in problems]


def github_command(problem: Problem, title: str = PROBLEM_TITLE) -> str:
    """``::error file=F,line=L,col=C,title=gatekeeper check::message`` for one problem
    (``line`` and ``col`` left out when unknown), escaped per GitHub's rules."""
    return workflow_command(
        "error",
        _located_message(problem),
        file=problem.file,
        line=problem.line or None,
        column=(problem.column or None) if problem.line else None,
        title=title,
    )


def workflow_command(
    level: str,
    message: str,
    *,
    file: str | None = None,
    line: int | None = None,
    column: int | None = None,
    title: str | None = None,
) -> str:
    """``::level file=F,line=L,col=C,title=T::message``: a GitHub Actions workflow command
    (``level``: ``error``, ``warning`` or ``notice``), the properties that are None left
    out, the message and property values escaped."""
    properties = []
    if file is not None:
        properties.append(f"file={escape_property(file)}")
    if line is not None:
        properties.append(f"line={line}")
    if column is not None:
        properties.append(f"col={column}")
    if title is not None:
        properties.append(f"title={escape_property(title)}")
    head = f"{level} {','.join(properties)}" if properties else level
    return f"::{head}::{escape_data(message)}"


def escape_data(text: str) -> str:
    """Escape a workflow command's message: ``%``, ``\\r``, ``\\n``."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command property value: as ``escape_data`` plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _located_message(problem: Problem) -> str:
    """The problem without its file position: ``rule 'id': path: message``."""
    parts = []
    if problem.rule_id:
        parts.append(f"rule {problem.rule_id!r}")
    if problem.path:
        parts.append(problem.path)
    return ": ".join([*parts, problem.message])


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, ``/``-separated."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()
