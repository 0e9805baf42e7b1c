"""Collections benchmark: CPU per posted fact of rules over a whole kind, with 10 facts of
the kind and with 10,000.

Run: ``python bench/bench_collections.py`` (about 20 s); ``--help`` for the knobs.

Three rules read every fact of kind ``task`` through a collection — ``count(...)``,
``all(...)`` and ``sum(...)`` — and never fire. Each posted fact (a ``task`` fact, an id
drawn at random from those already there, its status and hours changed) is planned with
``Engine.plan_ingest`` and applied with ``apply_transition``, as the daemon does after a
commit. The brief's target: CPU per fact with 10,000 facts <= 1.2x with 10 facts (the
collections follow the facts by deltas instead of going over all of them). For scale, the
same conditions evaluated by a full pass over the kind (a fact lookup without change
tracking) are timed too.

Every figure is the median of several runs measured in this process, with CPU time
(``time.process_time_ns``), the cases interleaved so that drift hits them alike.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from _common import (
    BENCH_PROJECT,
    BENCH_TARGET,
    Targets,
    add_strict_options,
    fmt,
    machine_header,
    median,
    spread,
    table,
)

from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput, InstanceKey, RuleState
from gatekeeper.expr import compile_condition
from gatekeeper.rules.loader import load_rule_texts

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

CONDITIONS = {
    "count": 'count(t for t in task if t.data.status == "done") >= 1000000000',
    "all": 'all(t.data.status == "done" for t in task)',
    "sum": 'sum(t.data.hours for t in task if t.data.status != "cancelled") > 1e12',
}
"""The rules' conditions: none ever holds (a task ``T-open`` stays open), so nothing fires
and what is measured is planning and applying the fact."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10, help="task facts in the baseline")
    parser.add_argument("--large", type=int, default=10_000, help="task facts in the large case")
    parser.add_argument("--facts", type=int, default=2000, help="facts posted per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the posted facts")
    add_strict_options(parser)
    return parser.parse_args(argv)


def rules_yaml(function: str) -> str:
    return "\n".join(
        [
            f"- id: bench/{function}",
            f"  project: {BENCH_PROJECT}",
            f"  when: '{CONDITIONS[function]}'",
            "  fire: each_time",
            "  actions:",
            f'    - notify: {{target: {BENCH_TARGET}, message: "rule ${{rule_id}} fired"}}',
            "",
        ]
    )


def build_engine(function: str) -> Engine:
    result = load_rule_texts({"bench.yaml": rules_yaml(function)}, config=None)
    if result.ruleset is None:
        raise SystemExit("the rules are invalid:\n" + "\n".join(map(str, result.problems)))
    return Engine(result.ruleset)


def task_data(n: int) -> dict[str, Any]:
    return {"status": ("open", "done")[n % 2], "hours": n % 5 + 0.5, "n": n}


@dataclass
class Case:
    """One rule over a table of ``size`` task facts, and the facts to post to it."""

    name: str
    function: str
    size: int
    engine: Engine
    facts: FactTable
    states: dict[InstanceKey, RuleState]
    inputs: list[FactInput]


def make_case(function: str, size: int, posts: int, rng: random.Random) -> Case:
    ids = [f"T-{k}" for k in range(size - 1)]
    facts = FactTable({(BENCH_PROJECT, "task", i): task_data(k) for k, i in enumerate(ids)})
    facts.put((BENCH_PROJECT, "task", "T-open"), {"status": "open", "hours": 1})
    engine = build_engine(function)
    states = dict(engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, "reload").rule_states)
    inputs = [
        FactInput(BENCH_PROJECT, "task", rng.choice(ids), task_data(rng.randrange(1000)))
        for _ in range(posts)
    ]
    name = f"{function}(...) over {size:,} facts"
    return Case(name, function, size, engine, facts, states, inputs)


def post_us_per_fact(case: Case) -> float:
    """CPU microseconds per fact of planning and applying each fact as its own batch."""
    engine, facts, states = case.engine, case.facts, case.states
    approvals: dict[str, dict[str, str]] = {}
    book = EscrowBook({})
    started = time.process_time_ns()
    for fact in case.inputs:
        transition = engine.plan_ingest(facts, states, [fact], NOW, book)
        apply_transition(transition, facts, states, approvals, book)
    return (time.process_time_ns() - started) / 1000 / len(case.inputs)


class PlainFacts:
    """A fact lookup with no change tracking: collections go over every fact."""

    def __init__(self, facts: Mapping[str, Mapping[str, Any]]) -> None:
        self.facts = facts

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        return self.facts.get(id) if kind == "task" else None

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return self.facts if kind == "task" else {}


def full_pass_us(function: str, size: int, repeats: int = 20) -> float:
    """CPU microseconds of one evaluation by a full pass over ``size`` facts."""
    condition = compile_condition(CONDITIONS[function])
    facts = PlainFacts({f"T-{k}": task_data(k) for k in range(size)})
    started = time.process_time_ns()
    for _ in range(repeats):
        condition.evaluate(facts, NOW)
    return (time.process_time_ns() - started) / 1000 / repeats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("collections: CPU per posted fact, 10 vs 10,000 facts of the kind"))
    rng = random.Random(args.seed)
    cases = [
        make_case(function, size, args.facts, rng)
        for function in CONDITIONS
        for size in (args.small, args.large)
    ]
    for case in cases:
        for fact in case.inputs[:20]:
            plan = case.engine.plan_ingest(case.facts, case.states, [fact], NOW)
            assert not plan.fired, "the benchmark facts must not fire rules"
        post_us_per_fact(case)  # warm-up: builds the collections' states
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.runs):
        for case in cases:
            samples[case.name].append(post_us_per_fact(case))
    rows = []
    for small, large in zip(cases[::2], cases[1::2], strict=True):
        base = median(samples[small.name])
        for case in (small, large):
            value = median(samples[case.name])
            rows.append(
                [
                    case.name,
                    fmt(value),
                    spread(samples[case.name]),
                    f"{value / base:.2f}",
                    fmt(full_pass_us(case.function, case.size)),
                ]
            )
    print(
        "\n-- Engine.plan_ingest + apply_transition, 1 fact per batch "
        f"({args.facts:,} facts per run, median of {args.runs} runs)"
    )
    print(
        table(
            [
                "rule",
                "µs/fact (median)",
                f"min..max of {args.runs}",
                "÷ 10 facts",
                "µs/evaluation by a full pass",
            ],
            rows,
        )
    )
    for small, large in zip(cases[::2], cases[1::2], strict=True):
        ratio = median(samples[large.name]) / median(samples[small.name])
        targets.check(
            f"µs/fact {small.function}() over {args.large:,} ÷ {args.small:,} facts",
            ratio,
            "<=",
            1.2,
        )
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
