"""``gatekeeper check``: dry-run validation of rule files for CI, like ``promtool check rules``.

Every problem is printed (not just the first), then one summary line; the exit code is 0
when the rules are valid and 1 when they are not. Three formats:

- ``text``: ``file:line:col: rule 'id': path: message`` per problem, then
  ``SUCCESS: N rules found in M files`` or ``FAILED: N problems in M files``.
- ``json``: ``{"valid": bool, "rules": N, "files": M, "problems": [...]}``.
- ``github``: one ``::error file=...,line=...,col=...,title=gatekeeper check::message``
  workflow command per problem (annotations on the pull request), then the text summary.

The problem lines and workflow commands come from ``output``; the command-line wiring
lives in ``main``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TextIO

from gatekeeper.cli.output import format_problems, github_commands, plural
from gatekeeper.config import DEFAULT_RULES_DIR, Config
from gatekeeper.rules.loader import LoadResult, collector_paused, load_rule_paths
from gatekeeper.runtime.hooks import hook_problems
from gatekeeper.yamlsource import sorted_problems

OutputFormat = Literal["text", "json", "github"]
FORMATS: tuple[OutputFormat, ...] = ("text", "json", "github")


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


def summary_line(result: LoadResult) -> str:
    """``SUCCESS: N rules found in M files`` or ``FAILED: N problems in M files`` (M: the
    files with problems)."""
    if result.ok:
        rules = plural(result.rule_count, "rule")
        return f"SUCCESS: {rules} found in {plural(result.file_count, 'file')}"
    files = len({problem.file for problem in result.problems})
    return f"FAILED: {plural(len(result.problems), 'problem')} in {plural(files, 'file')}"
