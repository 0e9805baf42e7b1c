"""Per-item rules benchmark: CPU per posted fact with 10 vs 10,000 items, and the peak
memory of 100,000 items x 10 per-item rules.

Run: ``python bench/bench_items.py`` (about 60 s on 2 cores); ``--help`` for the knobs;
``--skip-memory`` / ``--skip-cpu`` run one part only.

1. *CPU per posted fact.* Ten per-item rules ``bench/each-<k>`` (``for_each: task``, a
   ``when`` over ``item.data`` only, ``fire: each_time``, a notify action) over a table of
   ``--small`` (10, the baseline) and ``--large`` (10,000) ``task`` facts, every instance
   evaluated once (as after a reload). Each posted fact updates an existing item (an id
   drawn at random; the status stays ``open``, so nothing fires) and is planned with
   ``Engine.plan_ingest`` and applied with ``apply_transition``, one fact per batch, as the
   daemon does after a commit: a fact re-evaluates the 10 instances of its own item, so the
   cost must not grow with the number of items. Target: CPU µs per fact with 10,000 items
   ÷ with 10 items **<= 1.2**.
2. *Peak RSS, 100,000 items x 10 rules* (through the engine, in a child process): the
   process imports what the daemon imports, builds a ``FactTable`` of ``--items`` task
   facts (the daemon's ``load_facts`` shape), loads the 10 rules with ``load_rule_texts``,
   evaluates every instance once (``plan_rules(trigger="reload", record_first=False)``,
   as a daemon's first start with these rules plans them: 1,000,000 rule states, and a
   decision only where something was decided) and applies it, then plans and applies
   ``--posts`` facts. Peak (``VmHWM``) and current RSS are read from
   ``/proc/self/status`` after each stage. Baseline in the same run: the same process with
   the facts but no rules. Target: peak **< 500 MB**.

Every CPU figure is the median of several interleaved runs (``time.process_time_ns``).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    BENCH_PROJECT,
    BENCH_TARGET,
    Targets,
    add_strict_options,
    fmt,
    ingest_us_per_fact,
    machine_header,
    median,
    spread,
    table,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RULES = 10
TARGET_RATIO = 1.2
TARGET_PEAK_MB = 500.0
MB_PER_MIB = 1024 * 1024 / 1e6
DAEMON_IMPORTS = "import gatekeeper.cli.main, gatekeeper.runtime.daemon, gatekeeper.http.app"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10, help="items in the baseline")
    parser.add_argument("--large", type=int, default=10_000, help="items in the large case")
    parser.add_argument("--facts", type=int, default=2000, help="facts posted per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--items", type=int, default=100_000, help="items of the memory part")
    parser.add_argument("--posts", type=int, default=3000, help="facts posted, memory part")
    parser.add_argument("--seed", type=int, default=1, help="seed of the posted facts")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU part")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory part")
    add_strict_options(parser)
    parser.add_argument("--memory-child", metavar="MODE", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rules_yaml(count: int = RULES) -> str:
    """``count`` per-item rules over ``task``; rule ``k`` waits for a ``done`` item of
    priority ``>= k % 7``, so the ``open`` items the benchmark posts never fire them."""
    lines = []
    for k in range(count):
        lines += [
            f"- id: bench/each-{k}",
            f"  project: {BENCH_PROJECT}",
            "  for_each: task",
            f"  when: 'item.data.status == \"done\" and item.data.priority >= {k % 7}'",
            "  fire: each_time",
            "  actions:",
            f'    - notify: {{target: {BENCH_TARGET}, message: "${{item.id}} is done"}}',
        ]
    return "\n".join(lines) + "\n"


def task_data(n: int) -> dict[str, Any]:
    """An open task (no rule fires on it), about the size of a CI or tracker record."""
    return {"status": "open", "priority": n % 7, "assignee": f"crew-{n % 50}", "n": n}


def build_engine() -> Any:
    from gatekeeper.engine.evaluate import Engine
    from gatekeeper.rules.loader import load_rule_texts

    result = load_rule_texts({"bench.yaml": rules_yaml()}, config=None)
    if result.ruleset is None:
        raise SystemExit("the rules are invalid:\n" + "\n".join(map(str, result.problems)))
    return Engine(result.ruleset)


# ---------------------------------------------------------------------------------------------
# 1. CPU per posted fact


@dataclass
class Case:
    name: str
    size: int
    engine: Any
    facts: Any
    states: dict[Any, Any]
    inputs: list[Any]


def make_case(size: int, posts: int, rng: random.Random, posted_ids: int | None = None) -> Case:
    """``size`` items, every instance evaluated once, and ``posts`` facts updating items
    drawn from the first ``posted_ids`` (default: all of them)."""
    from gatekeeper.engine.facts import FactTable
    from gatekeeper.engine.model import FactInput

    ids = [f"T-{k}" for k in range(size)]
    facts = FactTable({(BENCH_PROJECT, "task", i): task_data(k) for k, i in enumerate(ids)})
    engine = build_engine()
    plan = engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, "reload")
    states = dict(plan.rule_states)
    assert len(states) == RULES * size, f"{len(states)} instances, not {RULES * size}"
    drawn = ids[: posted_ids or size]
    inputs = [
        FactInput(BENCH_PROJECT, "task", rng.choice(drawn), task_data(rng.randrange(1000)))
        for _ in range(posts)
    ]
    name = f"{RULES} per-item rules over {size:,} items"
    if posted_ids is not None:
        name += f", facts over the baseline's {posted_ids:,} ids"
    return Case(name, size, engine, facts, states, inputs)


def post_us_per_fact(case: Case) -> float:
    """CPU microseconds per fact of planning and applying each fact as its own batch."""
    return ingest_us_per_fact(case.engine, case.facts, case.states, case.inputs, NOW)


def run_cpu(args: argparse.Namespace, targets: Targets) -> None:
    print(
        f"\n-- CPU per posted fact: Engine.plan_ingest + apply_transition, 1 fact per batch, "
        f"{RULES} rules for_each: task"
    )
    rng = random.Random(args.seed)
    cases = [make_case(size, args.facts, rng) for size in (args.small, args.large)]
    # the large table, posting only the baseline's ids: the same per-fact work on a small
    # working set (separates the algorithm from CPU-cache effects)
    cases.append(make_case(args.large, args.facts, rng, posted_ids=args.small))
    for case in cases:
        for fact in case.inputs[:20]:
            plan = case.engine.plan_ingest(case.facts, case.states, [fact], NOW)
            assert not plan.fired, "the benchmark facts must not fire rules"
            assert len(plan.decisions) == RULES, f"{len(plan.decisions)} decisions, not {RULES}"
        post_us_per_fact(case)  # warm-up
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(args.runs):
        for case in cases:
            samples[case.name].append(post_us_per_fact(case))
    base = median(samples[cases[0].name])
    rows = []
    for case in cases:
        value = median(samples[case.name])
        label = case.name + (" (baseline)" if case is cases[0] else "")
        rows.append([label, fmt(value), spread(samples[case.name]), f"{value / base:.2f}"])
    print(f"   {args.facts:,} facts per run, median of {args.runs} interleaved runs")
    print(table(["case", "µs/fact (median)", f"min..max of {args.runs}", "÷ baseline"], rows))
    ratio = median(samples[cases[1].name]) / base
    targets.check(
        f"µs/fact, {args.large:,} items ÷ {args.small:,} items", ratio, "<=", TARGET_RATIO
    )


# ---------------------------------------------------------------------------------------------
# 2. Peak RSS with 100,000 items x 10 rules (engine, child process)


def rss_mib() -> tuple[float, float]:
    """(peak ``VmHWM``, current ``VmRSS``) of this process in MiB."""
    values: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmHWM"], values["VmRSS"]


def memory_child(mode: str, items: int, posts: int, seed: int) -> None:
    """Print JSON ``{stage: [peak MiB, RSS MiB]}`` and counts; ``mode`` is ``rules`` or
    ``facts-only`` (the baseline: the same facts, no rules)."""
    import gc

    exec(DAEMON_IMPORTS)  # what the daemon imports, before anything is measured
    from gatekeeper.engine.evaluate import apply_transition
    from gatekeeper.engine.facts import FactTable
    from gatekeeper.engine.ledger import EscrowBook
    from gatekeeper.engine.model import FactInput

    out: dict[str, Any] = {"stages": {"imports": rss_mib()}}
    started = time.process_time()
    facts = FactTable({(BENCH_PROJECT, "task", f"T-{k}"): task_data(k) for k in range(items)})
    out["stages"]["facts loaded"] = rss_mib()
    if mode == "rules":
        engine = build_engine()
        states: dict[Any, Any] = {}
        book = EscrowBook({})
        approvals: dict[str, dict[str, str]] = {}
        t0 = time.process_time()
        plan = engine.plan_rules(
            facts, states, engine.ruleset.rules, NOW, "reload", book=book, record_first=False
        )  # as the daemon's reload plans it
        out["decisions"] = len(plan.decisions)
        out["plan_s"] = time.process_time() - t0
        out["stages"]["every instance planned"] = rss_mib()
        apply_transition(plan, facts, states, approvals, book)
        del plan
        gc.collect()
        out["instances"] = len(states)
        out["stages"]["states applied"] = rss_mib()
        rng = random.Random(seed)
        for n in range(posts):
            fact = FactInput(BENCH_PROJECT, "task", f"T-{rng.randrange(items)}", task_data(n))
            transition = engine.plan_ingest(facts, states, [fact], NOW, book)
            apply_transition(transition, facts, states, approvals, book)
        out["stages"]["after posts"] = rss_mib()
    out["cpu_s"] = time.process_time() - started
    print(json.dumps(out))


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", mode]
    command += ["--items", str(args.items), "--posts", str(args.posts), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"memory child ({mode}) failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_memory(args: argparse.Namespace, targets: Targets) -> None:
    print(
        f"\n-- peak RSS: {args.items:,} items x {RULES} per-item rules, through the engine "
        "(a child process importing what the daemon imports)"
    )
    baseline = child("facts-only", args)
    measured = child("rules", args)
    rows = [
        [f"baseline: {stage}", f"{peak:.1f}", f"{rss:.1f}"]
        for stage, (peak, rss) in baseline["stages"].items()
    ]
    rows += [
        [f"{RULES} rules: {stage}", f"{peak:.1f}", f"{rss:.1f}"]
        for stage, (peak, rss) in measured["stages"].items()
    ]
    print(table(["process, stage", "peak RSS MiB", "RSS MiB"], rows))
    instances = measured["instances"]
    states_mib = measured["stages"]["states applied"][1] - baseline["stages"]["facts loaded"][1]
    print(
        f"   {measured['decisions']:,} decisions planned in {measured['plan_s']:.1f} s CPU; "
        f"{instances:,} instance states held: {states_mib:.1f} MiB over the facts alone "
        f"({states_mib * 1024 * 1024 / max(1, instances):.0f} bytes per instance)"
    )
    peak = max(peak for peak, _ in measured["stages"].values())
    targets.check("peak RSS MB (10^6 bytes)", peak * MB_PER_MIB, "<=", TARGET_PEAK_MB)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.items, args.posts, args.seed)
        return 0
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("per-item rules: CPU per posted fact, and memory of many items"))
    started = time.perf_counter()
    if not args.skip_cpu:
        run_cpu(args, targets)
    if not args.skip_memory:
        run_memory(args, targets)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
