"""Helpers shared by the gatekeeper benchmarks: rulesets, statistics, reporting.

House rules (see ``bench/README.md``): every figure is printed beside a baseline measured in
the same run on the same machine, each figure is the median of several runs, and a speed
target is printed as PASS/FAIL without failing the run unless ``--strict`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RULES_PER_FACT = 5
"""How many rules read each fact in the generated rulesets."""

BENCH_PROJECT = "bench"
BENCH_TARGET = "bench-chat"


def fact_id_of_rule(index: int) -> str:
    """The id of the one ``task`` fact rule ``index`` reads (rules 5k..5k+4 read ``T-k``)."""
    return f"T-{index // RULES_PER_FACT}"


def fact_count(rule_count: int) -> int:
    """How many distinct facts a generated ruleset of ``rule_count`` rules reads."""
    return (rule_count + RULES_PER_FACT - 1) // RULES_PER_FACT


def rules_yaml(count: int, *, time_clause: bool = True, start: int = 0) -> str:
    """A rule file (a YAML list) of ``count`` rules ``bench/r<i>`` for ``i`` from ``start``.

    Rule ``i`` reads only fact ``task["T-<i // 5>"]`` of project ``bench``, so each fact is
    read by exactly 5 rules. A rule fires only when its task is ``completed``; the facts the
    benchmarks post are ``open``, so nothing fires and ingest is what is measured.
    ``time_clause`` adds a ``days_since`` clause (which makes the rule time-dependent).
    """
    lines = []
    for i in range(start, start + count):
        task = f'task["{fact_id_of_rule(i)}"]'
        when = f'{task}.status == "completed" and {task}.priority >= {i % RULES_PER_FACT}'
        if time_clause:
            when += f" and days_since({task}.updated_at) >= 1"
        lines += [
            f"- id: bench/r{i}",
            f"  project: {BENCH_PROJECT}",
            f"  when: '{when}'",
            "  fire: each_time",
            "  actions:",
            f'    - notify: {{target: {BENCH_TARGET}, message: "rule ${{rule_id}} fired"}}',
        ]
    return "\n".join(lines) + "\n"


def ruleset_files(count: int, *, time_clause: bool = True, per_file: int = 1000) -> dict[str, str]:
    """``{relative path: text}`` of ``count`` generated rules (see ``rules_yaml``), at most
    ``per_file`` per file (the YAML reader refuses documents over 100,000 nodes)."""
    return {
        f"bench-{start:06d}.yaml": rules_yaml(
            min(per_file, count - start), time_clause=time_clause, start=start
        )
        for start in range(0, count, per_file)
    }


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (which must not be empty)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min..max`` of ``values``, to show how noisy the runs were."""
    return f"{fmt(min(values))}..{fmt(max(values))}"


def fmt(value: float) -> str:
    """A number with about three significant digits and thousands separators."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def machine_header(title: str) -> str:
    """The first lines of a benchmark's output: what ran, where and when."""
    cpu = _cpu_model()
    return (
        f"== {title}\n"
        f"   date {_dt.date.today().isoformat()}, nproc {os.cpu_count()}, {cpu}, "
        f"Python {platform.python_version()} ({sys.implementation.name}), {platform.system()}, "
        f"gatekeeper at {_git_revision()}\n"
        f"   {_load_note()}"
    )


def _load_note() -> str:
    """The load average, with a warning when other work is keeping the CPUs busy."""
    try:
        one_minute = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    note = f"load average {one_minute:.2f} at start"
    if one_minute > 0.5:
        note += " -- WARNING: the machine is busy with other work; figures will be noisy"
    return note


def _git_revision() -> str:
    """The checkout's short HEAD commit, with ``+changes`` when the tree is not clean."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"
    return head + (" +changes" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[c])) for row in [headers, *rows]) for c in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


@dataclass
class Targets:
    """Prints target verdicts and decides the exit code.

    A *current* target fails the run under ``--strict``; a *later* target (one the brief
    sets for a later milestone) is informational and fails the run only under
    ``--strict-later``. Without either flag the exit code is 0 whatever the figures.
    """

    strict: bool = False
    strict_later: bool = False
    failed: int = 0
    failed_later: int = 0

    def check(self, name: str, value: float, op: str, limit: float, *, later: bool = False) -> bool:
        """Print ``PASS``/``FAIL`` for ``value <op> limit`` (``op`` is ``<=`` or ``>=``)."""
        ok = value <= limit if op == "<=" else value >= limit
        if not ok:
            if later:
                self.failed_later += 1
            else:
                self.failed += 1
        verdict = "PASS" if ok else "FAIL"
        kind = "later target (informational)" if later else "target"
        print(f"   {verdict}  {kind} {name}: {fmt(value)} {op} {fmt(limit)}")
        return ok

    def exit_code(self) -> int:
        """1 when a target failed that the flags make binding, else 0."""
        if self.strict and self.failed:
            return 1
        if self.strict_later and (self.failed or self.failed_later):
            return 1
        return 0


def add_strict_options(parser: argparse.ArgumentParser) -> None:
    """``--strict`` and ``--strict-later`` (see ``Targets``)."""
    parser.add_argument("--strict", action="store_true", help="exit 1 when a current target fails")
    parser.add_argument(
        "--strict-later",
        action="store_true",
        help="exit 1 when any target fails, the brief's later (informational) ones included",
    )


def ingest_us_per_fact(
    engine: Any, facts: Any, states: Any, inputs: Sequence[Any], now: Any
) -> float:
    """CPU microseconds per fact of planning (``Engine.plan_ingest``) and applying
    (``apply_transition``) each of ``inputs`` as its own batch at ``now``, as the daemon
    does after a commit; ``facts`` and ``states`` are updated in place."""
    from gatekeeper.engine.evaluate import apply_transition
    from gatekeeper.engine.ledger import EscrowBook

    approvals: dict[str, dict[str, Any]] = {}
    book = EscrowBook({})
    started = time.process_time_ns()
    for fact in inputs:
        transition = engine.plan_ingest(facts, states, [fact], now, book)
        apply_transition(transition, facts, states, approvals, book)
    return (time.process_time_ns() - started) / 1000 / len(inputs)


class GroupCommitter:
    """Group commit for the benchmarks' bare durable endpoints: queues fact bodies and
    commits them in groups through ``commit``.

    ``commit(bodies)`` stores the JSON texts in one transaction and returns their ``seq``s
    once committed. ``submit(body)`` returns the body's ``seq`` after its transaction has
    committed (or raises what ``commit`` raised). While a commit is in flight, new bodies
    wait; the next transaction takes all of them (at most ``max_group``; None: no limit).
    ``commits`` and ``facts`` count what has been committed.
    """

    def __init__(
        self, commit: Callable[[list[str]], Awaitable[list[int]]], max_group: int | None = None
    ) -> None:
        self._commit = commit
        self._max_group = max_group
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[int]]] = asyncio.Queue()
        self.commits = 0
        self.facts = 0

    async def submit(self, body: str) -> int:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((body, done))
        return await done

    async def run(self) -> None:
        """Commit queued bodies, group after group, until cancelled."""
        while True:
            group = [await self._queue.get()]
            while not self._queue.empty() and len(group) != self._max_group:
                group.append(self._queue.get_nowait())
            try:
                seqs = await self._commit([body for body, _ in group])
            except Exception as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.commits += 1
            self.facts += len(group)
            for (_, done), seq in zip(group, seqs, strict=True):
                if not done.done():
                    done.set_result(seq)
