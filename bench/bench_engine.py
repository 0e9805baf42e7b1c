"""Pure-engine benchmarks (no I/O): fan-out scaling of ingest, and ``when`` evaluation speed.

Run: ``python bench/bench_engine.py`` (about 30 s on 2 cores); ``--help`` for the knobs.

1. *Fan-out scaling* — CPU time of ``Engine.plan_ingest`` per fact, for facts that each
   touch exactly 5 rules, with a small ruleset loaded (the baseline) and with a large one.
   The brief promises that the cost of a fact does not grow with the size of the ruleset:
   target ratio large/small <= 1.2.
2. *Evaluation* — evaluations per second of a four-clause gate through
   ``CompiledCondition.evaluate``, beside simpleeval's ``EvalWithCompoundTypes`` on a
   pre-parsed AST over plain dicts (the baseline) and a plain Python lambda (the floor), with
   1 and with 400 records in a list held by the fact the gate reads. Later targets
   (informational): >= 10x simpleeval pre-parsed, within 3x of the plain lambda, and a
   1-vs-400 records cost ratio <= 1.2.

Every figure is the median of several runs measured in this process, with CPU time
(``time.process_time_ns``), the cases interleaved so that drift hits them alike.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from _common import (
    BENCH_PROJECT,
    RULES_PER_FACT,
    Targets,
    add_strict_options,
    fact_count,
    fmt,
    machine_header,
    median,
    ruleset_files,
    spread,
    table,
)
from simpleeval import EvalWithCompoundTypes

from gatekeeper.clock import parse_rfc3339
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.model import FactInput, InstanceKey, RuleState
from gatekeeper.expr import compile_condition
from gatekeeper.rules.loader import load_rule_texts

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

GATE = (
    'milestone.design.status == "approved"'
    " and quality_gate.qg1.passed"
    " and days_since(milestone.design.approved_at) >= 7"
    " and len(milestone.design.reviews) >= 1"
)
"""The gate of the evaluation benchmark: four clauses, three facts' fields, a time function."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10, help="rules in the baseline ruleset")
    parser.add_argument(
        "--middle", type=int, default=1000, help="rules in a middle ruleset (0: none)"
    )
    parser.add_argument("--large", type=int, default=10_000, help="rules in the large ruleset")
    parser.add_argument("--facts", type=int, default=1000, help="facts planned per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument(
        "--eval-seconds", type=float, default=0.2, help="CPU seconds per evaluation run"
    )
    parser.add_argument("--records", type=int, default=400, help="records in the large fact")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fact order")
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile of plan_ingest"
    )
    parser.add_argument("--skip-fanout", action="store_true", help="skip the fan-out part")
    parser.add_argument("--skip-eval", action="store_true", help="skip the evaluation part")
    add_strict_options(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Fan-out scaling


@dataclass
class FanoutCase:
    """One ruleset with its steady-state rule states and the facts to plan against it."""

    name: str
    engine: Engine
    states: dict[InstanceKey, RuleState]
    inputs: list[FactInput]


def task_data(n: int) -> dict[str, Any]:
    """A task fact that no generated rule fires on (the rules wait for ``completed``)."""
    return {"status": "open", "priority": n % 7, "updated_at": "2026-11-20T09:00:00Z", "n": n}


def build_engine(rule_count: int) -> tuple[Engine, float]:
    """An engine over ``rule_count`` generated rules and the seconds loading them took."""
    started = time.perf_counter()
    result = load_rule_texts(ruleset_files(rule_count), config=None)
    elapsed = time.perf_counter() - started
    if result.ruleset is None:
        raise SystemExit("generated rules are invalid:\n" + "\n".join(map(str, result.problems)))
    return Engine(result.ruleset), elapsed


def steady_states(engine: Engine, facts: FactTable) -> dict[InstanceKey, RuleState]:
    """The rule states after the ruleset went live (every rule evaluated once), as in the
    daemon after a reload."""
    transition = engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, "reload")
    return dict(transition.rule_states)


def fact_inputs(ids: list[str], count: int, rng: random.Random) -> list[FactInput]:
    """``count`` task facts with ids drawn at random from ``ids``."""
    return [FactInput(BENCH_PROJECT, "task", rng.choice(ids), task_data(n)) for n in range(count)]


def plan_us_per_fact(case: FanoutCase, facts: FactTable) -> float:
    """CPU microseconds per fact of planning each fact of the case as its own batch."""
    engine, states, inputs = case.engine, case.states, case.inputs
    started = time.process_time_ns()
    for fact in inputs:
        engine.plan_ingest(facts, states, [fact], NOW)
    return (time.process_time_ns() - started) / 1000 / len(inputs)


def run_fanout(args: argparse.Namespace, targets: Targets) -> None:
    print(
        f"\n-- fan-out scaling: Engine.plan_ingest, 1 fact per batch, each fact read by "
        f"exactly {RULES_PER_FACT} rules"
    )
    sizes = [args.small, *([args.middle] if args.middle else []), args.large]
    engines: dict[int, Engine] = {}
    for size in sizes:
        engines[size], load_s = build_engine(size)
        print(
            f"   loaded {size:,} rules in {load_s:.2f} s (load_rule_texts: YAML, schema, "
            "expressions)"
        )
    # One fact table for every case (each fact the large ruleset reads), so that what
    # differs between the cases is the rules loaded and the facts' ids.
    all_ids = [f"T-{k}" for k in range(fact_count(args.large))]
    facts = FactTable({(BENCH_PROJECT, "task", i): task_data(0) for i in all_ids})
    rng = random.Random(args.seed)
    small_ids = all_ids[: fact_count(args.small)]
    cases = [
        FanoutCase(
            f"{size:,} rules{' (baseline)' if size == args.small else ''}, facts over "
            f"{fact_count(size):,} ids",
            engines[size],
            steady_states(engines[size], facts),
            fact_inputs(all_ids[: fact_count(size)], args.facts, rng),
        )
        for size in sizes
    ]
    cases.append(
        FanoutCase(
            f"{args.large:,} rules, facts over the baseline's {len(small_ids)} ids",
            engines[args.large],
            cases[-1].states,
            fact_inputs(small_ids, args.facts, rng),
        )
    )
    for case in cases:
        for fact in case.inputs[:50]:
            touched = len(case.engine.rules_reading(fact.key))
            assert touched == RULES_PER_FACT, f"{fact.key} is read by {touched} rules"
            plan = case.engine.plan_ingest(facts, case.states, [fact], NOW)
            assert not plan.fired, "the benchmark facts must not fire rules"
        plan_us_per_fact(case, facts)  # warm-up
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.runs):
        for case in cases:
            samples[case.name].append(plan_us_per_fact(case, facts))
    base = median(samples[cases[0].name])
    rows = []
    for case in cases:
        value = median(samples[case.name])
        rows.append(
            [
                case.name,
                fmt(value),
                spread(samples[case.name]),
                f"{value / base:.2f}",
                f"{value - base:+.1f}",
            ]
        )
    print(
        table(
            [
                "ruleset",
                "µs/fact (median)",
                f"min..max of {args.runs}",
                "÷ baseline",
                "µs − baseline",
            ],
            rows,
        )
    )
    large = cases[len(sizes) - 1]
    ratio = median(samples[large.name]) / base
    targets.check(f"µs/fact {args.large:,} rules ÷ {args.small:,} rules", ratio, "<=", 1.2)
    if args.profile:
        profile_plan(large, facts)


def profile_plan(case: FanoutCase, facts: FactTable, top: int = 15) -> None:
    """Print where ``plan_ingest`` spends its time (cProfile, by own time)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for fact in case.inputs:
        case.engine.plan_ingest(facts, case.states, [fact], NOW)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    print(f"\n-- cProfile of plan_ingest ({case.name}), top {top} by own time")
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join("   " + line for line in lines[start:] if line.strip()))


# ---------------------------------------------------------------------------------------------
# Evaluation


def gate_facts(records: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {id: data}}`` for which the gate holds; ``milestone.design.reviews`` holds
    ``records`` review records."""
    reviews = [
        {"by": f"reviewer-{i}", "verdict": "approve", "at": "2026-11-01T08:00:00Z", "n": i}
        for i in range(records)
    ]
    return {
        "milestone": {
            "design": {
                "status": "approved",
                "approved_at": "2026-11-01T09:00:00Z",
                "reviews": reviews,
            }
        },
        "quality_gate": {"qg1": {"passed": True, "score": 97}},
        "task": {f"T-{i}": {"status": "open"} for i in range(20)},
    }


def days_since(timestamp: str, now: datetime = NOW) -> float:
    """The same time function the gate uses, for the baselines."""
    return (now - parse_rfc3339(timestamp)).total_seconds() / 86400


Evaluator = Callable[[], bool]


def gatekeeper_evaluator(facts: Mapping[str, Mapping[str, Any]]) -> Evaluator:
    condition = compile_condition(GATE)
    table_ = FactTable(
        {
            (BENCH_PROJECT, kind, fact_id): data
            for kind, by_id in facts.items()
            for fact_id, data in by_id.items()
        }
    )
    lookup = ProjectFacts(BENCH_PROJECT, table_)
    return lambda: condition.evaluate(lookup, NOW).value


def simpleeval_evaluator(facts: Mapping[str, Mapping[str, Any]]) -> Evaluator:
    evaluator = EvalWithCompoundTypes(
        names=dict(facts), functions={"days_since": days_since, "len": len}
    )
    parsed = evaluator.parse(GATE)
    return lambda: bool(evaluator.eval(GATE, previously_parsed=parsed))


def lambda_evaluator(facts: Mapping[str, Mapping[str, Any]]) -> Evaluator:
    gate: Callable[[Mapping[str, Any]], bool] = lambda f: bool(  # noqa: E731
        f["milestone"]["design"]["status"] == "approved"
        and f["quality_gate"]["qg1"]["passed"]
        and days_since(f["milestone"]["design"]["approved_at"]) >= 7
        and len(f["milestone"]["design"]["reviews"]) >= 1
    )
    return lambda: gate(facts)


def evals_per_s(evaluate: Evaluator, calls: int) -> float:
    started = time.process_time_ns()
    for _ in range(calls):
        evaluate()
    return calls / ((time.process_time_ns() - started) / 1e9)


def calibrate(evaluate: Evaluator, seconds: float) -> int:
    """How many calls take about ``seconds`` of CPU time."""
    calls = 10
    while True:
        started = time.process_time_ns()
        for _ in range(calls):
            evaluate()
        elapsed = (time.process_time_ns() - started) / 1e9
        if elapsed >= seconds / 4:
            return max(1, int(calls * seconds / elapsed))
        calls *= 4


def run_evaluation(args: argparse.Namespace, targets: Targets) -> None:
    print(f"\n-- evaluation of a four-clause gate:\n   {GATE}")
    makers = {
        "gatekeeper CompiledCondition.evaluate": gatekeeper_evaluator,
        "simpleeval EvalWithCompoundTypes, pre-parsed (baseline)": simpleeval_evaluator,
        "plain Python lambda (floor)": lambda_evaluator,
    }
    sizes = (1, args.records)
    evaluators: dict[tuple[str, int], Evaluator] = {}
    for size in sizes:
        facts = gate_facts(size)
        for name, make in makers.items():
            evaluate = make(facts)
            assert evaluate() is True, f"{name}: the gate should hold"
            evaluators[(name, size)] = evaluate
    calls = {key: calibrate(evaluate, args.eval_seconds) for key, evaluate in evaluators.items()}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in evaluators}
    for _ in range(args.runs):
        for key, evaluate in evaluators.items():
            samples[key].append(evals_per_s(evaluate, calls[key]))
    rate = {key: median(values) for key, values in samples.items()}
    rows = []
    for name in makers:
        one, many = rate[(name, 1)], rate[(name, args.records)]
        rows.append(
            [
                name,
                fmt(one),
                f"{1e6 / one:.2f}",
                fmt(many),
                f"{one / many:.2f}",
            ]
        )
    print(
        table(
            [
                "evaluator",
                "evals/s, 1 record",
                "µs/eval",
                f"evals/s, {args.records} records",
                f"cost {args.records}÷1",
            ],
            rows,
        )
    )
    names = list(makers)
    ours, baseline, floor = (rate[(name, 1)] for name in names)
    print(
        f"   gatekeeper ÷ simpleeval pre-parsed: {ours / baseline:.3f}x the evaluations/s; "
        f"plain lambda ÷ gatekeeper: {floor / ours:.1f}x"
    )
    targets.check(
        "gatekeeper evals/s ÷ simpleeval pre-parsed", ours / baseline, ">=", 10, later=True
    )
    targets.check("plain lambda evals/s ÷ gatekeeper", floor / ours, "<=", 3, later=True)
    growth = rate[(names[0], 1)] / rate[(names[0], args.records)]
    targets.check(
        f"gatekeeper cost with {args.records} records ÷ 1 record", growth, "<=", 1.2, later=True
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("bench_engine: gatekeeper's engine, no I/O"))
    print(f"   CPU time per figure, median of {args.runs} interleaved runs; gc enabled")
    started = time.perf_counter()
    if not args.skip_fanout:
        run_fanout(args, targets)
        gc.collect()
    if not args.skip_eval:
        run_evaluation(args, targets)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
