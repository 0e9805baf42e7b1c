"""``gatekeeper check``: dry-run validation of rule files for CI, like ``promtool check rules``.

Every problem is printed (not just the first), then one summary line; the exit code is 0
when the rules are valid and 1 when they are not. Three formats:

- ``text``: ``file:line:col: rule 'id': path: message`` per problem, then
  ``SUCCESS: N rules found in M files`` or ``FAILED: N problems in M files``.
- ``json``: ``{"valid": bool, "rules": N, "files": M, "problems": [...]}``.
- ``github``: one ``::error file=...,line=...,col=...,title=gatekeeper check::message``
  workflow command per problem (annotations on the pull request), then the text summary.

The command-line wiring lives in ``cli``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, TextIO

from gatekeeper.config import DEFAULT_RULES_DIR, Config
from gatekeeper.problems import Problem
from gatekeeper.rules.loader import LoadResult, collector_paused, load_rule_paths
from gatekeeper.runtime.hooks import hook_problems
from gatekeeper.yamlsource import sorted_problems

OutputFormat = Literal["text", "json", "github"]
FORMATS: tuple[OutputFormat, ...] = ("text", "json", "github")
GITHUB_TITLE = "gatekeeper check"


def run_check(paths: Sequence[Path], config: Config | None, fmt: OutputFormat, out: TextIO) -> int:
    """Check the rule files ``paths`` name and write the report to ``out`` in ``fmt``.

    No paths: the config's ``rules_dir`` (``./rules`` without a config). Targets and escrows
    are checked only when ``config`` is given. Returns the exit code: 0 valid, 1 invalid.
    """
    if not paths:
        paths = [config.rules_dir if config is not None else Path(DEFAULT_RULES_DIR)]
    with collector_paused():  # until the report is written: see loader.collector_paused
        result = load_rule_paths(paths, config)
        if config is not None:
            result = _with_hook_problems(result, config)
        if fmt == "json":
            out.write(json.dumps(check_report(result), indent=2) + "\n")
        else:
            lines = (
                github_commands(result.problems)
                if fmt == "github"
                else format_problems(result.problems)
            )
            for line in [*lines, summary_line(result)]:
                out.write(line + "\n")
        return 0 if result.ok else 1


def _with_hook_problems(result: LoadResult, config: Config) -> LoadResult:
    """``result`` plus the config's broken hook mappings (``hooks.hook_problems``), which
    the daemon would refuse at start or reload."""
    problems = hook_problems(config)
    if not problems:
        return result
    merged = tuple(sorted_problems([*result.problems, *problems]))
    return LoadResult(None, merged, result.rule_count, result.file_count)


def check_report(result: LoadResult) -> dict[str, object]:
    """The JSON report: ``{"valid", "rules", "files", "problems": [Problem.to_json()...]}``."""
    return {
        "valid": result.ok,
        "rules": result.rule_count,
        "files": result.file_count,
        "problems": [problem.to_json() for problem in result.problems],
    }


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """One line per problem: ``file:line:col: rule 'id': path: message`` (for logs too)."""
    return [str(problem) for problem in problems]


def summary_line(result: LoadResult) -> str:
    """``SUCCESS: N rules found in M files`` or ``FAILED: N problems in M files`` (M: the
    files with problems)."""
    if result.ok:
        rules = _plural(result.rule_count, "rule")
        return f"SUCCESS: {rules} found in {_plural(result.file_count, 'file')}"
    files = len({problem.file for problem in result.problems})
    return f"FAILED: {_plural(len(result.problems), 'problem')} in {_plural(files, 'file')}"


def github_commands(problems: Iterable[Problem]) -> list[str]:
    """A GitHub Actions ``::error`` workflow command per problem."""
    return [github_command(problem) for problem in problems]


def github_command(problem: Problem) -> str:
    """``::error file=F,line=L,col=C,title=gatekeeper check::message`` for one problem
    (``line`` and ``col`` left out when unknown), escaped per GitHub's rules."""
    properties = [f"file={escape_property(problem.file)}"]
    if problem.line:
        properties.append(f"line={problem.line}")
        if problem.column:
            properties.append(f"col={problem.column}")
    properties.append(f"title={escape_property(GITHUB_TITLE)}")
    return f"::error {','.join(properties)}::{escape_data(_located_message(problem))}"


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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
