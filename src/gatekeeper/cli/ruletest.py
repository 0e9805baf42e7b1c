"""``gatekeeper test``: rule unit tests, in the spirit of ``promtool test rules`` and ``opa test``.

A test file (``*.test.yaml`` beside the rules, schema ``schemas/rule-tests.schema.json``)
holds cases; a case is a sequence of steps. Each case runs the real engine in memory, from
empty state, with an injected clock: no daemon, no database, no network. At each step:

1. the clock moves to the step's time (``at: 2026-03-01T09:00:00Z``, or ``after: 7d`` since
   the previous step) and the time-dependent rules are re-evaluated, as the daemon's clock
   does (a 7-day hold fires at the first step whose time passes it, stamped with that time);
2. the step's ``facts`` are applied as one batch (``POST /v1/facts``), re-evaluating the rules
   that read them;
3. its ``approvals`` are applied one by one (``POST /v1/approvals``);
4. what fired during the step is compared with ``expect``: the rules that must fire (with a
   subset of the fields of their rendered actions: amounts, targets, messages...), those that
   must not, and those whose firing must be blocked by an escrow limit.

Every transition the engine plans is applied to the in-memory state exactly as the daemon
applies a committed one (facts, rule states, standing approvals, escrow ledger), so ``once``
rules fire once, ``each_time`` rules on each closed -> open change, and escrow limits hold.

A test file is checked before it runs (schema, times that go backwards, rules, approvers and
projects it names); each problem is reported with file, line, column and key path, like
``gatekeeper check``. Results come as text, JSON or JUnit XML (``--format junit``: one
``<testsuite>`` per file, one ``<testcase>`` per case). A failure names the case, the step
(number, time, line), the expectation, what happened instead (a short ``-``/``+`` diff for
actions) and the rule's explanation: each sub-condition with its value, missing facts,
approvals, and the time left on its deadlines.

Exit codes: 0 every case passed, 1 a case failed, 2 a test file or the ruleset it runs
against is invalid (or a usage error).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml

from gatekeeper.cli.output import display_path, plural
from gatekeeper.cli.plan import (
    clause_deadlines,
    cli_config,
    describe_action,
    explanation_lines,
)
from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.config import Config, Escrow
from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import (
    ApprovalInput,
    Decision,
    FactInput,
    InstanceKey,
    QueuedAction,
    RuleState,
    Stand,
    Transition,
)
from gatekeeper.problems import Problem, format_path
from gatekeeper.rules.loader import TEST_SUFFIXES, LoadResult, load_rules_dir
from gatekeeper.rules.model import Rule, Ruleset
from gatekeeper.yamlsource import (
    PathParts,
    YamlDocument,
    parse_document,
    schema_problems,
    sorted_problems,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TEST_SCHEMA = "rule-tests.schema.json"
DEFAULT_START = datetime(1970, 1, 1, tzinfo=UTC)
"""Where a case's clock starts when neither ``start`` nor a first ``at`` says (as promtool)."""

TestFormat = Literal["text", "json", "junit"]
CaseStatus = Literal["passed", "failed", "skipped"]

_DURATION_PART = re.compile(r"([0-9]+)([dhms])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


# ---------------------------------------------------------------------------------------------
# Test files, typed


@dataclass(frozen=True)
class ExpectedAction:
    """An action a firing must include: ``fields`` is a subset of its rendered fields."""

    kind: str
    fields: Mapping[str, Any]
    line: int


@dataclass(frozen=True)
class ExpectedFiring:
    """A rule that must fire during a step, with actions its firing must include; ``item``
    names the instance of a per-item rule that must fire (None: any instance)."""

    rule: str
    actions: tuple[ExpectedAction, ...]
    line: int
    item: str | None = None


@dataclass(frozen=True)
class Expect:
    """What a step expects: rules that fire, rules that do not, rules blocked."""

    fired: tuple[ExpectedFiring, ...] = ()
    not_fired: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """One step of a case: its time, facts and approvals, and what it expects (``number``
    is 1-based, ``line`` where the step starts in the file)."""

    number: int
    at: datetime
    line: int
    facts: tuple[FactInput, ...]
    approvals: tuple[ApprovalInput, ...]
    expect: Expect


@dataclass(frozen=True)
class Case:
    """A named sequence of steps, run from empty state."""

    name: str
    line: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class RuleTestFile:
    """A checked test file: its cases, and the ruleset they run against."""

    file: str
    rules_dir: Path
    ruleset: Ruleset
    cases: tuple[Case, ...]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Failure:
    """One unmet expectation: the step, the rule, what was expected and what happened.

    ``diff`` holds ``-`` (expected) and ``+`` (got) lines; ``explanation`` is the rule's
    explanation at the end of the step (``Engine.explain``), ``explanation_text`` its lines;
    for a per-item rule, of the instance ``item`` that fired or was last decided in the step
    (``""``: none was, or the rule has no ``for_each``).
    """

    step: int
    at: str
    line: int
    rule_id: str
    message: str
    diff: tuple[str, ...] = ()
    explanation: Mapping[str, Any] | None = None
    explanation_text: tuple[str, ...] = ()
    item: str = ""
    """The item id of the instance of a per-item rule the failure is about (or ``""``)."""

    def lines(self, *, explain: bool = True) -> list[str]:
        """The failure as text: a heading, the diff, the explanation (unless ``explain`` is
        False, e.g. when an earlier failure of the same rule and step showed it)."""
        rule = instance_name(self.rule_id, self.item)
        out = [f"step {self.step} at {self.at} (line {self.line}): {rule}: {self.message}"]
        out += [f"  {line}" for line in self.diff]
        if explain and self.explanation_text:
            out.append(f"  explanation (item {self.item}):" if self.item else "  explanation:")
            out += [f"    {line}" for line in self.explanation_text]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "at": self.at,
            "line": self.line,
            "rule": self.rule_id,
            **({"item": self.item} if self.item else {}),
            "message": self.message,
            "diff": list(self.diff),
            "explanation": self.explanation,
            "item": self.item,
        }


@dataclass(frozen=True)
class CaseResult:
    """How one case went."""

    name: str
    line: int
    status: CaseStatus
    time_s: float = 0.0
    failures: tuple[Failure, ...] = ()


@dataclass
class FileResult:
    """How one test file went: its problems (then no case ran) or its cases' results."""

    file: str
    rules_dir: str | None = None
    problems: list[Problem] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    time_s: float = 0.0

    def count(self, status: CaseStatus) -> int:
        return sum(1 for case in self.cases if case.status == status)


@dataclass
class TestReport:
    """Every file's result, and problems that belong to no single test file."""

    __test__ = False  # not a pytest test class

    files: list[FileResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def all_problems(self) -> list[Problem]:
        return self.problems + [p for f in self.files for p in f.problems]

    def count(self, status: CaseStatus) -> int:
        return sum(f.count(status) for f in self.files)

    @property
    def exit_code(self) -> int:
        if self.all_problems:
            return EXIT_USAGE
        return EXIT_FAILED if self.count("failed") else EXIT_OK


# ---------------------------------------------------------------------------------------------
# Running


def run_tests(
    paths: Sequence[Path],
    config: Config,
    *,
    rules_dir: Path | None = None,
    run: re.Pattern[str] | None = None,
) -> TestReport:
    """Find the test files under ``paths`` (default: the config's rules_dir), check them and
    run their cases (only those whose name ``run`` matches, when given)."""
    report = TestReport()
    files, report.problems = find_test_files(paths or [config.rules_dir])
    rulesets: dict[Path, LoadResult] = {}
    for path in files:
        report.files.append(run_test_file(path, config, rules_dir, run, rulesets))
    return report


def find_test_files(paths: Sequence[Path]) -> tuple[list[Path], list[Problem]]:
    """The test files ``paths`` name: a file as given, a folder's ``*.test.yaml`` and
    ``*.test.yml`` files (recursively, hidden folders skipped), in a stable order."""
    found: list[Path] = []
    problems: list[Problem] = []
    for path in paths:
        if path.is_dir():
            inside = []
            for current, dirs, names in os.walk(path):
                dirs[:] = [name for name in dirs if not name.startswith(".")]
                inside += [Path(current) / n for n in names if n.endswith(TEST_SUFFIXES)]
            if not inside:
                message = "no rule test files (*.test.yaml) found here"
                problems.append(Problem(display_path(path), 0, 0, message))
            found += sorted(inside)
        elif path.is_file():
            found.append(path)
        else:
            problems.append(Problem(display_path(path), 0, 0, "no such file or directory"))
    return list(dict.fromkeys(found)), problems


def run_test_file(
    path: Path,
    config: Config,
    rules_dir: Path | None,
    run: re.Pattern[str] | None,
    rulesets: dict[Path, LoadResult] | None = None,
) -> FileResult:
    """Check one test file against its ruleset, then run its cases."""
    started = time.perf_counter()
    rulesets = rulesets if rulesets is not None else {}
    result = FileResult(display_path(path))
    doc, problems = read_test_file(path)
    if doc is None or problems:
        result.problems = problems
        return result
    folder = _rules_dir_of(path, doc, rules_dir or config.rules_dir)
    result.rules_dir = display_path(folder)
    key = folder.resolve()
    if key not in rulesets:
        rulesets[key] = load_rules_dir(folder, config)
    loaded = rulesets[key]
    if loaded.ruleset is None:
        result.problems = _ruleset_problems(result.file, folder, loaded)
        return result
    suite, problems = build_test_file(doc, folder, loaded.ruleset)
    if suite is None:
        result.problems = problems
        return result
    # the rules' logic as written: a money rule as if signed off (sign-offs are a
    # deployment's, not a test's); a shadow rule's firings count as firings
    engine = Engine.for_config(loaded.ruleset, replace(config, money_rule_approvals=0))
    for case in suite.cases:
        if run is not None and not run.search(case.name):
            result.cases.append(CaseResult(case.name, case.line, "skipped"))
        else:
            result.cases.append(run_case(case, engine, config.escrows))
    result.time_s = time.perf_counter() - started
    return result


def _rules_dir_of(path: Path, doc: YamlDocument, default: Path) -> Path:
    given = doc.data.get("rules") if isinstance(doc.data, dict) else None
    return path.parent / given if isinstance(given, str) else default


def _ruleset_problems(test_file: str, folder: Path, loaded: LoadResult) -> list[Problem]:
    """The ruleset's problems with file names as seen from the working directory, after one
    that says which test file could not run."""
    head = Problem(test_file, 0, 0, f"cannot run: the rules in {display_path(folder)} are invalid")
    located = []
    for problem in loaded.problems:
        inside = folder / problem.file
        name = display_path(inside) if inside.exists() else problem.file
        located.append(replace(problem, file=name))
    return [head, *located]


class Simulation:
    """A deployment in memory: the engine with its facts, rule states, standing approvals and
    escrow book, and a clock that only moves when told. Each planned transition is applied
    as ``Writer.apply`` applies a committed one."""

    def __init__(self, engine: Engine, escrows: Mapping[str, Escrow], now: datetime) -> None:
        self.engine = engine
        self.facts = FactTable()
        self.states: dict[InstanceKey, RuleState] = {}
        self.approvals: dict[str, dict[str, Stand]] = {}
        self.book = EscrowBook(escrows)
        self.now = now

    def advance(self, now: datetime) -> Transition:
        """Move the clock to ``now`` and re-evaluate the time-dependent rules."""
        self.now = now
        transition = self.engine.plan_rules(
            self.facts,
            self.states,
            self.engine.time_dependent,
            now,
            "time",
            book=self.book.copy(),
            approvals=self.approvals,
            record_unchanged=False,
        )
        return self._apply(transition)

    def ingest(self, facts: Sequence[FactInput]) -> Transition:
        """Apply ``facts`` as one batch."""
        transition = self.engine.plan_ingest(
            self.facts, self.states, list(facts), self.now, self.book.copy(), self.approvals
        )
        return self._apply(transition)

    def approve(self, approval: ApprovalInput) -> Transition:
        """Record an approver's decision and re-evaluate its rule."""
        transition = self.engine.plan_approval(
            self.facts, self.states, self.approvals, approval, self.now, self.book.copy()
        )
        return self._apply(transition)

    def explain(self, rule: Rule, item: str = "") -> dict[str, Any]:
        """The rule's explanation now (of instance ``item`` of a per-item rule; one it has
        no instance of is explained without an item)."""
        if item and self.facts.get((rule.project, rule.for_each or "", item)) is None:
            item = ""
        state = self.states.get((rule.id, item))
        return self.engine.explain(rule, self.facts, state, self.now, self.approvals, item=item)

    def has_instance(self, rule: Rule, item: str) -> bool:
        """Whether per-item rule ``rule`` has an instance ``item`` now (a fact of its
        ``for_each`` kind with that id)."""
        return (
            rule.for_each is not None
            and self.facts.get((rule.project, rule.for_each, item)) is not None
        )

    def _apply(self, transition: Transition) -> Transition:
        apply_transition(transition, self.facts, self.states, self.approvals, self.book)
        return transition


@dataclass(frozen=True)
class Firing:
    """A rule's firing during a step (``outcome`` fired or blocked) and its queued actions;
    ``instance`` is the item id of a per-item rule's instance (``""`` otherwise)."""

    rule_id: str
    firing_id: str
    outcome: str
    reason: str | None
    actions: tuple[QueuedAction, ...]
    instance: str = ""


def run_case(case: Case, engine: Engine, escrows: Mapping[str, Escrow]) -> CaseResult:
    """Run ``case`` from empty state; every step's expectations are checked (a failing step
    does not stop the case, so one run shows every failure)."""
    started = time.perf_counter()
    first = case.steps[0].at
    sim = Simulation(engine, escrows, first)
    failures: list[Failure] = []
    for step in case.steps:
        transitions = [sim.advance(step.at)]
        if step.facts:
            transitions.append(sim.ingest(step.facts))
        for approval in step.approvals:
            rule = engine.rules[approval.rule_id]
            if approval.instance and not sim.has_instance(rule, approval.instance):
                failures.append(_unknown_approval_item(step, sim, rule, approval))
                continue
            transitions.append(sim.approve(approval))
        failures += check_step(step, transitions, sim)
    status: CaseStatus = "failed" if failures else "passed"
    return CaseResult(case.name, case.line, status, time.perf_counter() - started, tuple(failures))


def firings_of(transitions: Iterable[Transition]) -> list[Firing]:
    """Every firing (fired or blocked) the transitions hold, with its actions."""
    found = []
    for transition in transitions:
        for decision in transition.fired:
            assert decision.firing_id is not None
            actions = tuple(a for a in transition.actions if a.firing_id == decision.firing_id)
            found.append(
                Firing(
                    decision.rule_id,
                    decision.firing_id,
                    decision.outcome,
                    decision.reason,
                    actions,
                    decision.instance,
                )
            )
    return found


def check_step(step: Step, transitions: Sequence[Transition], sim: Simulation) -> list[Failure]:
    """Compare what fired during ``step`` with what it expects."""
    firings: dict[str, list[Firing]] = {}
    for firing in firings_of(transitions):
        firings.setdefault(firing.rule_id, []).append(firing)
    last: dict[tuple[str, str | None], Decision] = {}
    for decision in (d for t in transitions for d in t.decisions):
        last[(decision.rule_id, decision.instance)] = decision
        last[(decision.rule_id, None)] = decision
    failures: list[Failure] = []

    def fail(rule_id: str, message: str, diff: Sequence[str] = (), item: str | None = None) -> None:
        if item is None:  # the instance last decided in the step, if any
            decided = last.get((rule_id, None))
            item = decided.instance if decided is not None else ""
        failures.append(_failure(step, sim, rule_id, message, diff, item))

    for expected in step.expect.fired:
        got = firings.get(expected.rule, [])
        item = expected.item
        others = sorted({f.instance for f in got if item is not None and f.instance != item})
        if item is not None:
            got = [f for f in got if f.instance == item]
        fired = [f for f in got if f.outcome in ("fired", "shadowed")]
        if not fired and got:
            fail(
                expected.rule,
                f"expected to fire, but it was blocked: {got[0].reason}",
                (),
                got[0].instance,
            )
        elif not fired:
            why = _why_not(last, expected.rule, sim, item)
            message = f"expected to fire, but it did not ({why})"
            if others:
                message += f"; it fired for another item: {', '.join(others)}"
            fail(expected.rule, message, (), item)
        else:
            actions = [a for f in fired for a in f.actions]
            for wanted in expected.actions:
                diff = _match_action(wanted, actions, fired[0])
                if diff is not None:
                    fail(expected.rule, diff[0], diff[1:], item or fired[0].instance)
    for rule_id in step.expect.not_fired:
        for firing in firings.get(rule_id, []):
            verb = "was blocked" if firing.outcome == "blocked" else "fired"
            diff = [f"+ {describe_action(a)}" for a in firing.actions]
            fail(
                rule_id,
                f"expected not to fire, but it {verb} ({firing.firing_id})",
                diff,
                firing.instance,
            )
    for rule_id in step.expect.blocked:
        got = firings.get(rule_id, [])
        if not any(f.outcome == "blocked" for f in got):
            if got:
                diff = [f"+ {describe_action(a)}" for a in got[0].actions]
                fail(
                    rule_id,
                    "expected to be blocked, but it fired and sent its actions",
                    diff,
                    got[0].instance,
                )
            else:
                fail(
                    rule_id,
                    f"expected to be blocked, but it did not fire ({_why_not(last, rule_id, sim)})",
                )
    return failures


def instance_name(rule_id: str, item: str) -> str:
    """``rule`` or, for an instance of a per-item rule, ``rule[item]``."""
    return f"{rule_id}[{item}]" if item else rule_id


def _why_not(
    last: Mapping[tuple[str, str | None], Decision],
    rule_id: str,
    sim: Simulation,
    item: str | None = None,
) -> str:
    """Why ``rule_id`` (its instance ``item``, when given) did not fire: its last decision
    in the step, or (when no decision was kept: nothing it reads changed, or the clock did
    not change its gate) its state now."""
    decision = last.get((rule_id, item))
    if decision is not None:
        return decision.outcome.replace("_", " ")
    rule = sim.engine.rules[rule_id]
    if item is not None and not sim.has_instance(rule, item):
        return f"it has no instance {item!r}: there is no {rule.for_each} fact {item!r}"
    explanation = sim.explain(rule, item or "")
    state = sim.states.get((rule_id, item or ""), RuleState(rule_id))
    if not explanation["condition"]["value"]:
        return "not met"
    if not explanation["approvals"]["satisfied"]:
        return "awaiting approvals"
    if rule.fire == "once" and state.fired_count > state.rearms:
        return "already fired"
    if state.blocked is not None and not state.paused:
        return f"still blocked: {state.blocked}"
    return "paused" if state.paused else "its gate was already open"


def _unknown_approval_item(
    step: Step, sim: Simulation, rule: Rule, approval: ApprovalInput
) -> Failure:
    """The failure of an approval naming an item the rule has no instance of (the daemon
    answers 404 and records nothing)."""
    item = approval.instance
    message = (
        f"the approval by {approval.subject} names item {item!r}, but the rule has no "
        f"instance {item!r} (no {rule.for_each} fact {item!r}): the daemon would refuse it"
    )
    return _failure(step, sim, rule.id, message, (), item)


def _failure(
    step: Step,
    sim: Simulation,
    rule_id: str,
    message: str,
    diff: Sequence[str],
    item: str = "",
) -> Failure:
    """A failed expectation about ``rule_id``, explained for its instance ``item`` (not
    explained when the per-item rule has no such instance: the message says so)."""
    rule = sim.engine.rules[rule_id]
    explanation: dict[str, Any] | None = None
    text: tuple[str, ...] = ()
    if not item or sim.has_instance(rule, item):
        explanation = sim.explain(rule, item)
        deadlines = clause_deadlines(rule, explanation, sim.facts, sim.now)
        text = tuple(explanation_lines(rule, explanation, deadlines))
    return Failure(
        step=step.number,
        at=format_rfc3339(step.at),
        line=step.line,
        rule_id=rule_id,
        message=message,
        diff=tuple(diff),
        explanation=explanation,
        explanation_text=text,
        item=item,
    )


def action_fields(action: QueuedAction) -> dict[str, Any]:
    """The fields an expected action is compared with: the target and the rendered payload
    (the release id, random per firing, left out)."""
    payload = {k: v for k, v in action.payload.items() if k != "release_id"}
    return {"target": action.target, **payload}


def is_subset(expected: Mapping[str, Any], got: Mapping[str, Any]) -> bool:
    """True when every field of ``expected`` is in ``got`` with the same value (mappings are
    compared as subsets too)."""
    for key, value in expected.items():
        if key not in got:
            return False
        if isinstance(value, Mapping) and isinstance(got[key], Mapping):
            if not is_subset(value, got[key]):
                return False
        elif value != got[key]:
            return False
    return True


def _match_action(
    wanted: ExpectedAction, actions: Sequence[QueuedAction], firing: Firing
) -> list[str] | None:
    """None when an action of the firing matches ``wanted``; else a message and diff lines
    against the closest action of the same kind."""
    same_kind = [action_fields(a) for a in actions if a.kind == wanted.kind]
    if any(is_subset(wanted.fields, fields) for fields in same_kind):
        return None
    if not same_kind:
        has = "; ".join(describe_action(a) for a in actions) or "none"
        return [
            f"expected a {wanted.kind} action {_compact(wanted.fields)} (line {wanted.line}), "
            f"but the firing has none (its actions: {has})"
        ]
    closest = min(same_kind, key=lambda fields: len(_differences(wanted.fields, fields)))
    diff = [f"its {wanted.kind} action differs from the expected one (line {wanted.line}):"]
    for key in _differences(wanted.fields, closest):
        diff.append(f"- {key}: {_compact(wanted.fields[key])}")
        diff.append(f"+ {key}: {_compact(closest[key]) if key in closest else '(absent)'}")
    return diff


def _differences(expected: Mapping[str, Any], got: Mapping[str, Any]) -> list[str]:
    return [
        key
        for key, value in expected.items()
        if key not in got
        or not (
            is_subset(value, got[key])
            if isinstance(value, Mapping) and isinstance(got[key], Mapping)
            else value == got[key]
        )
    ]


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _not_per_item(rule: Rule) -> str:
    return (
        f"rule {rule.id!r} has no for_each: item names an instance of a per-item rule, "
        "and this rule has none"
    )


# ---------------------------------------------------------------------------------------------
# Reading and checking test files


def read_test_file(path: Path) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse a test file and check it against the schema (timestamps written unquoted are
    kept as the text written)."""
    name = display_path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        return None, [Problem(name, 0, 0, f"cannot read the file: {error.strerror or error}")]
    except UnicodeDecodeError as error:
        return None, [Problem(name, 0, 0, f"not UTF-8 text (bad byte at offset {error.start})")]
    doc, problems = parse_document(text, name)
    if doc is None:
        return None, problems
    if not isinstance(doc.data, dict):
        what = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
        message = f"a rule test file must be a mapping with `cases`, not {what}"
        return None, [*problems, doc.problem((), message)]
    doc = replace(doc, data=_timestamps_as_text(doc, doc.data, ()))
    both = _steps_with_both_times(doc.data)
    for problem in schema_problems(doc, TEST_SCHEMA):
        if problem.path in both and problem.message.startswith("{"):
            continue  # the raw "should not be valid under" of the schema's `not`: said below
        problems.append(problem)
    for step_path in both.values():
        message = "give either `at` or `after`, not both"
        problems.append(doc.problem((*step_path, "after"), message))
    return doc, sorted_problems(problems)


def _steps_with_both_times(data: Mapping[str, Any]) -> dict[str, PathParts]:
    """The steps that give both ``at`` and ``after``, by formatted path."""
    found: dict[str, PathParts] = {}
    cases = data.get("cases")
    for i, case in enumerate(cases if isinstance(cases, list) else []):
        steps = case.get("steps") if isinstance(case, dict) else None
        for j, step in enumerate(steps if isinstance(steps, list) else []):
            if isinstance(step, dict) and "at" in step and "after" in step:
                path: PathParts = ("cases", i, "steps", j)
                found[format_path(path)] = path
    return found


def _timestamps_as_text(doc: YamlDocument, value: Any, path: PathParts) -> Any:
    """``value`` with every YAML timestamp (read as a date or datetime) replaced by its text
    as written, as if it had been quoted."""
    if isinstance(value, dict):
        return {k: _timestamps_as_text(doc, v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_timestamps_as_text(doc, v, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, date | datetime):
        node = doc.node_at(path)
        return str(node.value) if isinstance(node, yaml.ScalarNode) else value.isoformat()
    return value


def build_test_file(
    doc: YamlDocument, rules_dir: Path, ruleset: Ruleset
) -> tuple[RuleTestFile | None, list[Problem]]:
    """The typed test file, checked against ``ruleset``: times in order, rules, approvers
    and projects that exist. Returns ``(None, problems)`` when anything is wrong."""
    builder = _Builder(doc, ruleset)
    cases = tuple(builder.case(index, raw) for index, raw in enumerate(doc.data["cases"]))
    seen: dict[str, int] = {}
    for index, case in enumerate(cases):
        if case.name in seen:
            message = f"duplicate case name {case.name!r} (first at line {seen[case.name]})"
            builder.problems.append(doc.problem(("cases", index, "name"), message))
        seen.setdefault(case.name, case.line)
    if builder.problems:
        return None, sorted_problems(builder.problems)
    return RuleTestFile(doc.file, rules_dir, ruleset, cases), []


class _Builder:
    """Turns a schema-valid test document into typed cases, collecting located problems."""

    def __init__(self, doc: YamlDocument, ruleset: Ruleset) -> None:
        self.doc = doc
        self.rules = ruleset.by_id()
        projects = sorted({rule.project for rule in ruleset.rules})
        self.projects = projects
        self.problems: list[Problem] = []

    def problem(self, path: PathParts, message: str) -> None:
        self.problems.append(self.doc.problem(path, message))

    def case(self, index: int, raw: Mapping[str, Any]) -> Case:
        path: PathParts = ("cases", index)
        now = self.time(raw.get("start"), (*path, "start")) or DEFAULT_START
        steps = []
        for number, step in enumerate(raw["steps"], start=1):
            built = self.step(number, step, (*path, "steps", number - 1), now)
            steps.append(built)
            now = built.at
        return Case(raw["name"], self.doc.position(path)[0], tuple(steps))

    def time(self, text: str | None, path: PathParts) -> datetime | None:
        if text is None:
            return None
        try:
            return parse_rfc3339(text)
        except ValueError as error:
            self.problem(path, f"not an RFC 3339 time with a zone: {error}")
            return None

    def step(self, number: int, raw: Mapping[str, Any], path: PathParts, now: datetime) -> Step:
        at = now
        if "at" in raw:
            given = self.time(raw["at"], (*path, "at"))
            if given is not None and given < now:
                previous = format_rfc3339(now)
                self.problem((*path, "at"), f"time goes backwards: before {previous}")
            at = given or now
        elif "after" in raw:
            at = now + parse_duration(raw["after"])
        facts = tuple(
            self.fact(item, (*path, "facts", i)) for i, item in enumerate(raw.get("facts", []))
        )
        approvals = tuple(
            self.approval(item, (*path, "approvals", i))
            for i, item in enumerate(raw.get("approvals", []))
        )
        expect = self.expect(raw.get("expect", {}), (*path, "expect"))
        return Step(number, at, self.doc.position(path)[0], facts, approvals, expect)

    def fact(self, raw: Mapping[str, Any], path: PathParts) -> FactInput:
        project = raw.get("project")
        if project is None and len(self.projects) == 1:
            project = self.projects[0]
        if project is None:
            known = ", ".join(self.projects)
            self.problem(path, f"missing key 'project': the ruleset has several ({known})")
            project = ""
        return FactInput(project, raw["kind"], raw["id"], dict(raw["data"]))

    def approval(self, raw: Mapping[str, Any], path: PathParts) -> ApprovalInput:
        rule = self.rule(raw["rule"], (*path, "rule"))
        by = raw["by"]
        if rule is not None and rule.approvals is None:
            self.problem((*path, "rule"), f"rule {rule.id!r} takes no approvals")
        elif rule is not None and rule.approvals is not None and by not in rule.approvals.from_:
            approvers = ", ".join(rule.approvals.from_)
            self.problem(
                (*path, "by"),
                f"{by!r} is not one of the approvers of rule {rule.id!r} ({approvers}); "
                "the daemon would refuse the approval",
            )
        item = raw.get("item", "")
        if rule is not None and rule.for_each is not None and not item:
            self.problem(
                path,
                f"missing key 'item': rule {rule.id!r} is per item (for_each: "
                f"{rule.for_each}); an approval names the item it approves",
            )
        elif item and rule is not None and rule.for_each is None:
            self.problem((*path, "item"), _not_per_item(rule))
        project = rule.project if rule is not None else ""
        return ApprovalInput(
            raw["rule"], project, by, raw["decision"], raw.get("comment"), instance=item
        )

    def expect(self, raw: Mapping[str, Any], path: PathParts) -> Expect:
        fired = []
        for i, item in enumerate(raw.get("fired", [])):
            rule = self.rule(item["rule"], (*path, "fired", i, "rule"))
            if "item" in item and rule is not None and rule.for_each is None:
                self.problem((*path, "fired", i, "item"), _not_per_item(rule))
            actions = tuple(
                self.action(action, (*path, "fired", i, "actions", j))
                for j, action in enumerate(item.get("actions", []))
            )
            line = self.doc.position((*path, "fired", i))[0]
            fired.append(ExpectedFiring(item["rule"], actions, line, item.get("item")))
        for key in ("not_fired", "blocked"):
            for i, rule_id in enumerate(raw.get(key, [])):
                self.rule(rule_id, (*path, key, i))
        return Expect(tuple(fired), tuple(raw.get("not_fired", [])), tuple(raw.get("blocked", [])))

    def action(self, raw: Mapping[str, Any], path: PathParts) -> ExpectedAction:
        kind, fields = next(iter(raw.items()))
        return ExpectedAction(kind, dict(fields), self.doc.position(path)[0])

    def rule(self, rule_id: str, path: PathParts) -> Rule | None:
        rule = self.rules.get(rule_id)
        if rule is None:
            message = f"no rule {rule_id!r} in the ruleset"
            close = difflib.get_close_matches(rule_id, list(self.rules), n=1)
            self.problem(path, message + (f"; did you mean {close[0]!r}?" if close else ""))
        return rule


def parse_duration(text: str) -> timedelta:
    """``7d``, ``36h``, ``90m``, ``30s`` or a sum such as ``1d12h`` as a ``timedelta``.

    Raises ``ValueError`` for anything else."""
    if not re.fullmatch(r"(?:[0-9]+[dhms])+", text):
        raise ValueError(f"not a duration: {text!r} (e.g. 7d, 36h, 90m, 30s, 1d12h)")
    seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Reports


def report_text(report: TestReport) -> list[str]:
    """The report as text: each problem, then per file each case (PASS, FAIL with details,
    SKIP), then one summary line."""
    lines = [str(problem) for problem in report.problems]
    for file in report.files:
        rules = f" (rules: {file.rules_dir})" if file.rules_dir else ""
        lines.append(f"{file.file}{rules}")
        lines += [f"  {problem}" for problem in file.problems]
        for case in file.cases:
            mark = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[case.status]
            lines.append(f"  {mark}  {case.name}  (line {case.line})")
            lines += [f"        {line}" for line in case_failure_lines(case)]
    lines.append(summary_line(report))
    return lines


def case_failure_lines(case: CaseResult) -> list[str]:
    """Every failure of a case as text, each rule's explanation shown once per step."""
    lines: list[str] = []
    explained: set[tuple[int, str, str]] = set()
    for failure in case.failures:
        key = (failure.step, failure.rule_id, failure.item)  # each instance's own
        lines += failure.lines(explain=key not in explained)
        explained.add(key)
    return lines


def summary_line(report: TestReport) -> str:
    """``SUCCESS: N cases passed in M files``, ``FAILED: K of N cases failed ...`` or
    ``ERROR: P problems ...``."""
    passed, failed = report.count("passed"), report.count("failed")
    skipped = report.count("skipped")
    files = plural(len(report.files), "file")
    tail = f" ({skipped} skipped by --run)" if skipped else ""
    problems = report.all_problems
    if problems:
        return (
            f"ERROR: {plural(len(problems), 'problem')} in the test files or rules; "
            f"{passed} passed, {failed} failed{tail}"
        )
    if failed:
        return f"FAILED: {failed} of {plural(passed + failed, 'case')} failed in {files}{tail}"
    return f"SUCCESS: {plural(passed, 'case')} passed in {files}{tail}"


def report_json(report: TestReport) -> dict[str, Any]:
    """The report as JSON."""
    return {
        "ok": report.exit_code == EXIT_OK,
        "summary": {
            "files": len(report.files),
            "passed": report.count("passed"),
            "failed": report.count("failed"),
            "skipped": report.count("skipped"),
            "problems": len(report.all_problems),
        },
        "problems": [problem.to_json() for problem in report.problems],
        "files": [
            {
                "file": file.file,
                "rules_dir": file.rules_dir,
                "problems": [problem.to_json() for problem in file.problems],
                "cases": [
                    {
                        "name": case.name,
                        "line": case.line,
                        "status": case.status,
                        "time_s": round(case.time_s, 6),
                        "failures": [failure.to_json() for failure in case.failures],
                    }
                    for case in file.cases
                ],
            }
            for file in report.files
        ],
    }


def report_junit(report: TestReport) -> str:
    """The report as JUnit XML: ``<testsuites>`` with one ``<testsuite>`` per test file and a
    ``<testcase>`` per case (``<failure>`` with the details, ``<skipped>`` for cases --run
    left out). A file that could not run is one ``<testcase>`` with an ``<error>``."""
    root = ET.Element("testsuites", name="gatekeeper test")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if report.problems:
        suite = _suite(root, "gatekeeper test", 1, 0, 1, 0, 0.0, stamp)
        _error_case(suite, "gatekeeper test", "finding the test files", report.problems)
        totals["tests"] += 1
        totals["errors"] += 1
    for file in report.files:
        errors = 1 if file.problems else 0
        counts = (len(file.cases) + errors, file.count("failed"), errors, file.count("skipped"))
        suite = _suite(root, file.file, *counts, file.time_s, stamp)
        if file.problems:
            _error_case(suite, file.file, "loading the test file", file.problems)
        for case in file.cases:
            _case_element(suite, file.file, case)
        for key, value in zip(("tests", "failures", "errors", "skipped"), counts, strict=True):
            totals[key] += value
        total_time += file.time_s
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", f"{total_time:.6f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _suite(
    root: ET.Element,
    name: str,
    tests: int,
    failures: int,
    errors: int,
    skipped: int,
    time_s: float,
    stamp: str,
) -> ET.Element:
    return ET.SubElement(
        root,
        "testsuite",
        name=name,
        tests=str(tests),
        failures=str(failures),
        errors=str(errors),
        skipped=str(skipped),
        time=f"{time_s:.6f}",
        timestamp=stamp,
        file=name,
    )


def _case_element(suite: ET.Element, file: str, case: CaseResult) -> None:
    element = ET.SubElement(
        suite,
        "testcase",
        name=case.name,
        classname=_classname(file),
        file=file,
        line=str(case.line),
        time=f"{case.time_s:.6f}",
    )
    if case.status == "skipped":
        ET.SubElement(element, "skipped", message="not selected by --run")
    elif case.failures:
        first = case.failures[0]
        rule = instance_name(first.rule_id, first.item)
        message = f"step {first.step} at {first.at}: {rule}: {first.message}"
        if len(case.failures) > 1:
            message += f" (and {plural(len(case.failures) - 1, 'more failure')})"
        failure = ET.SubElement(element, "failure", message=message, type="ExpectationFailed")
        failure.text = "\n".join(case_failure_lines(case))


def _error_case(suite: ET.Element, file: str, name: str, problems: Sequence[Problem]) -> None:
    element = ET.SubElement(suite, "testcase", name=name, classname=_classname(file), time="0")
    message = f"{plural(len(problems), 'problem')}: {problems[0]}"
    error = ET.SubElement(element, "error", message=message, type="InvalidTestFile")
    error.text = "\n".join(str(problem) for problem in problems)


def _classname(file: str) -> str:
    """A JUnit class name for a test file: its path with ``.`` for ``/`` and no suffix."""
    stem = file
    for suffix in (*TEST_SUFFIXES, ".yaml", ".yml"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.strip("/.").replace("/", ".")


# ---------------------------------------------------------------------------------------------
# Command line


def add_test_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``gatekeeper test`` to the subparsers ``commands``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "test",
        help="run rule unit tests (*.test.yaml)",
        description="Run the rule unit tests found under PATH (files, or folders searched for "
        "*.test.yaml): the real engine in memory with an injected clock. Exit 0 all passed, "
        "1 a case failed, 2 a test file or the ruleset is invalid.",
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="gatekeeper.yaml (default: ./gatekeeper.yaml when present)",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="test files or folders (default: rules_dir)",
    )
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="DIR",
        help="the rules the tests run against, unless a test file says `rules:` "
        "(default: the config's rules_dir)",
    )
    parser.add_argument("--run", metavar="REGEX", help="run only the cases whose name matches")
    parser.add_argument("--format", choices=["text", "json", "junit"], default="text")
    return parser


def run_test(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``gatekeeper test``: returns 0 (all passed), 1 (a case failed) or 2 (invalid input)."""
    out = out or sys.stdout
    config = cli_config(args.config, "test")
    if config is None:
        return EXIT_USAGE
    try:
        pattern = re.compile(args.run) if args.run else None
    except re.error as error:
        print(f"gatekeeper test: --run: invalid regular expression: {error}", file=sys.stderr)
        return EXIT_USAGE
    report = run_tests(args.paths, config, rules_dir=args.rules, run=pattern)
    if args.format == "json":
        out.write(json.dumps(report_json(report), indent=2, default=str) + "\n")
    elif args.format == "junit":
        out.write(report_junit(report))
    else:
        out.write("\n".join(report_text(report)) + "\n")
    return report.exit_code
