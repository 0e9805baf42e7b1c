"""Deadlines versus clock ticks: firing lag and CPU of time-dependent rules, on the real clock.

Run: ``python bench/bench_deadlines.py`` (about 100 s); ``--seconds 10 --idle-seconds 5
--baseline-seconds 3`` for a quick look; ``--help`` for the knobs.

The product issue: a rule that becomes true through the passing of time alone fires within
1 s of that instant, and with 10,000 time-dependent rules loaded an idle daemon stays near
0 % CPU. This benchmark builds 10,000 time-dependent rules (``--rules``), one ``task`` fact
each, in one ``FactTable``, and runs three phases in one asyncio event loop against
``SystemClock`` (the real wall clock):

1. **ticks (baseline)**: the first daemon's approach, ``sleep(1)`` then re-evaluate every
   time-dependent rule (``Engine.plan_rules(..., trigger="time", record_unchanged=False)``),
   for ``--baseline-seconds`` while the rules' deadlines fall due over that window.
2. **deadlines**: ``gatekeeper.engine.deadlines``: ``schedule_rules`` computes each rule's next
   change (``CompiledCondition.next_change_at``), the loop sleeps until
   ``DeadlineSchedule.next_due()``, plans ``pop_due(now)`` with the same ``plan_rules`` call
   and reschedules those rules. The deadlines are spread at random over ``--seconds``.
3. **idle**: the same loop for ``--idle-seconds`` with every rule scheduled but none due
   (the nearest deadline is 90 minutes away).

Per phase: wall time, process CPU time (``time.process_time``: user + system, all threads),
CPU %, rule evaluations, wake-ups, and the firing lag of each rule: the wall-clock time at
which its decision was made (after ``plan_rules`` returned) minus the instant its condition
became true, p50 / p99 / max over all firings. Correctness is checked too: every rule fires
exactly once, never before its instant, and the deadline loop evaluates no rule in vain.

``--slack-ms N`` makes the deadline loop sleep N ms past ``next_due()``, so that deadlines
close together are planned in one wake-up: fewer wake-ups (each costs a few hundred µs of
CPU on a VM, more than the rule's evaluation) for N ms more lag.

Not measured here: the SQLite commit of each firing (see ``bench_ingest.py``). Each figure
comes from one long run (thousands of samples for the lags), not the median of several:
the phases are long, and the CPU % of a quiet loop is not a per-operation figure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from _common import Targets, add_strict_options, fmt, machine_header, table

from gatekeeper.clock import Clock, SystemClock
from gatekeeper.engine.deadlines import DeadlineSchedule, schedule_rules
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.model import InstanceKey, RuleState
from gatekeeper.expr import compile_condition
from gatekeeper.rules.model import NotifyAction, Rule, Ruleset

PROJECT = "bench"
MAX_SLEEP_S = 60.0
"""Longest sleep of the deadline loop (bounds the effect of a wall-clock jump)."""

# (function, threshold, unit): rule i uses SHAPES[i % 3], with ">=" or ">" alternately
SHAPES = (
    ("days_since", 1, timedelta(days=1)),
    ("hours_since", 24, timedelta(hours=1)),
    ("minutes_since", 90, timedelta(minutes=1)),
)
ZONES = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))
US = timedelta(microseconds=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=10_000, help="time-dependent rules")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="deadline phase: deadlines spread over it"
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle phase length")
    parser.add_argument(
        "--baseline-seconds", type=float, default=5.0, help="tick (baseline) phase length"
    )
    parser.add_argument(
        "--slack-ms",
        type=float,
        default=0.0,
        help="deadline loop: sleep this much past next_due() to batch nearby deadlines",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the deadlines")
    add_strict_options(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Rules and facts


def build_rules(count: int) -> list[Rule]:
    """Rule i: ``task["T-i"].status == "open" and <unit>_since(task["T-i"].started_at)
    >= / > <threshold>`` (days, hours and minutes in turn), ``fire: each_time``."""
    rules = []
    for i in range(count):
        function, threshold, _ = SHAPES[i % len(SHAPES)]
        op = ">=" if i % 2 == 0 else ">"
        task = f'task["T-{i}"]'
        when = f'{task}.status == "open" and {function}({task}.started_at) {op} {threshold}'
        rules.append(
            Rule(
                id=f"bench/d{i}",
                project=PROJECT,
                description="a deadline",
                condition=compile_condition(when),
                fire="each_time",
                actions=(NotifyAction(target="bench-chat", message="${rule_id} fired"),),
                approvals=None,
                content_hash=f"hash-d{i}",
                file="bench.yaml",
                line=i + 1,
            )
        )
    return rules


def facts_due_at(due: Sequence[datetime]) -> FactTable:
    """Task facts that make rule i's condition become true exactly at ``due[i]`` (a
    ``>`` rule one microsecond after its threshold), with timestamps in several zones."""
    facts = FactTable()
    for i, when in enumerate(due):
        _, threshold, unit = SHAPES[i % len(SHAPES)]
        started = when - threshold * unit - (US if i % 2 else timedelta(0))
        data = {"status": "open", "started_at": started.astimezone(ZONES[i % 3]).isoformat()}
        facts.put((PROJECT, "task", f"T-{i}"), data)
    return facts


def idle_facts(now: datetime, count: int) -> FactTable:
    """Facts whose deadlines are one threshold ahead of ``now``: 90 minutes to 1 day."""
    return facts_due_at([now + SHAPES[i % 3][1] * SHAPES[i % 3][2] for i in range(count)])


def spread_deadlines(count: int, start: datetime, seconds: float, seed: int) -> list[datetime]:
    """``count`` instants at random (whole microseconds) in ``[start, start + seconds)``."""
    rng = random.Random(seed)
    span_us = max(1, int(seconds * 1_000_000))
    return [start + rng.randrange(span_us) * US for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    evaluations: int = 0
    wakeups: int = 0
    lags_s: list[float] = field(default_factory=list)
    fired: Counter[str] = field(default_factory=Counter)
    early: int = 0

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.wall_s if self.wall_s else 0.0


def record(
    phase: Phase,
    engine: Engine,
    states: dict[InstanceKey, RuleState],
    rules: list[Rule],
    now: datetime,
    clock: Clock,
    due: dict[str, datetime],
    facts: FactTable,
) -> None:
    """Plan ``rules`` at ``now`` as the daemon would, apply the states, note firings."""
    transition = engine.plan_rules(facts, states, rules, now, "time", record_unchanged=False)
    states.update(transition.rule_states)
    decided = clock.now()
    phase.evaluations += len(rules)
    for decision in transition.fired:
        phase.fired[decision.rule_id] += 1
        phase.lags_s.append((decided - due[decision.rule_id]).total_seconds())
        if now < due[decision.rule_id]:
            phase.early += 1


async def run_ticks(
    engine: Engine,
    facts: FactTable,
    states: dict[InstanceKey, RuleState],
    clock: Clock,
    due: dict[str, datetime],
    seconds: float,
) -> Phase:
    """The baseline: every second, re-evaluate every time-dependent rule."""
    phase = Phase(f"ticks every 1 s (baseline), {seconds:g} s")
    started, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(1.0)
        phase.wakeups += 1
        record(phase, engine, states, list(engine.time_dependent), clock.now(), clock, due, facts)
    phase.wall_s, phase.cpu_s = time.monotonic() - started, time.process_time() - cpu
    return phase


async def run_deadlines(
    name: str,
    engine: Engine,
    facts: FactTable,
    states: dict[InstanceKey, RuleState],
    schedule: DeadlineSchedule,
    clock: Clock,
    due: dict[str, datetime],
    seconds: float,
    slack_s: float = 0.0,
) -> Phase:
    """The deadline loop: sleep until ``next_due()`` (plus ``slack_s``), plan what is due,
    reschedule it."""
    phase = Phase(name)
    started, cpu = time.monotonic(), time.process_time()
    while True:
        remaining = seconds - (time.monotonic() - started)
        if remaining <= 0:
            break
        wait = schedule.seconds_until_next(clock.now(), cap=min(MAX_SLEEP_S, remaining))
        if wait is not None and len(schedule):
            wait = min(wait + slack_s, remaining)
        if wait:
            await asyncio.sleep(wait)
        phase.wakeups += 1
        now = clock.now()
        rules = [engine.rules[rule_id] for rule_id, _ in schedule.pop_due(now)]
        if rules:
            record(phase, engine, states, rules, now, clock, due, facts)
            schedule_rules(schedule, rules, facts, now)  # the same now as the plan
    phase.wall_s, phase.cpu_s = time.monotonic() - started, time.process_time() - cpu
    return phase


# ---------------------------------------------------------------------------------------------
# Reporting


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def row(phase: Phase) -> list[str]:
    lags = [lag * 1000 for lag in phase.lags_s]

    def ms(fraction: float) -> str:
        return fmt(percentile(lags, fraction)) if lags else "-"

    return [
        phase.name,
        f"{phase.wall_s:.1f}",
        f"{phase.cpu_s:.3f}",
        f"{phase.cpu_percent:.2f}",
        f"{phase.evaluations:,}",
        f"{phase.wakeups:,}",
        f"{len(phase.lags_s):,}",
        ms(0.5),
        ms(0.99),
        fmt(max(lags)) if lags else "-",
    ]


def check_firings(phase: Phase, count: int, targets: Targets, *, exact: bool) -> None:
    """Every rule fired exactly once and none early; with ``exact``, no evaluation in vain."""
    once = sum(1 for n in phase.fired.values() if n == 1)
    targets.check(f"{phase.name}: rules that fired exactly once", once, ">=", count)
    targets.check(f"{phase.name}: firings before their instant", phase.early, "<=", 0)
    if exact:
        targets.check(f"{phase.name}: evaluations per rule", phase.evaluations / count, "<=", 1)


async def run(args: argparse.Namespace, targets: Targets) -> None:
    clock = SystemClock()
    count = args.rules

    started = time.process_time()
    rules = build_rules(count)
    engine = Engine(Ruleset(rules=tuple(rules), files={}, version="bench-deadlines"))
    assert len(engine.time_dependent) == count
    print(f"   compiled {count:,} rules in {time.process_time() - started:.2f} s CPU")

    # Rule states as after a reload: every rule evaluated once, none true (all deadlines
    # ahead); each phase starts from them.
    cpu = time.process_time()
    live = engine.plan_rules(idle_facts(clock.now(), count), {}, rules, clock.now(), "reload")
    full_pass_s = time.process_time() - cpu
    initial_states = dict(live.rule_states)
    assert not live.fired
    print(
        f"   one evaluation of all {count:,} rules (plan_rules): {full_pass_s * 1000:,.0f} ms CPU"
    )

    # Phase 1: ticks. The deadlines fall due over the phase (from 0.5 s in).
    due_times = spread_deadlines(
        count, clock.now() + timedelta(seconds=0.5), args.baseline_seconds - 1.0, args.seed
    )
    facts = facts_due_at(due_times)
    due = {rule.id: when for rule, when in zip(rules, due_times, strict=True)}
    ticks = await run_ticks(engine, facts, dict(initial_states), clock, due, args.baseline_seconds)

    # Phase 2: deadlines spread over the phase (from 1 s in, after scheduling).
    due_times = spread_deadlines(
        count, clock.now() + timedelta(seconds=1), args.seconds - 1.5, args.seed + 1
    )
    facts = facts_due_at(due_times)
    due = {rule.id: when for rule, when in zip(rules, due_times, strict=True)}
    schedule = DeadlineSchedule()
    cpu = time.process_time()
    schedule_rules(schedule, rules, facts, clock.now())
    schedule_s = time.process_time() - cpu
    exact = sum(1 for rule in rules if schedule.due_at(rule.id) == due[rule.id])
    print(
        f"   schedule_rules for {count:,} rules: {schedule_s * 1000:,.0f} ms CPU "
        f"({schedule_s / count * 1e6:.1f} µs/rule); {exact:,} due times exact to the µs"
    )
    targets.check("rules scheduled at exactly their instant", exact, ">=", count)
    slack = f", slack {args.slack_ms:g} ms" if args.slack_ms else ""
    deadlines = await run_deadlines(
        f"deadlines, due over {args.seconds:g} s{slack}",
        engine,
        facts,
        dict(initial_states),
        schedule,
        clock,
        due,
        args.seconds,
        args.slack_ms / 1000,
    )

    # Phase 3: idle; every rule scheduled, the nearest 90 minutes away.
    facts = idle_facts(clock.now(), count)
    schedule = DeadlineSchedule()
    schedule_rules(schedule, rules, facts, clock.now())
    assert len(schedule) == count
    idle = await run_deadlines(
        f"deadlines, idle {args.idle_seconds:g} s",
        engine,
        facts,
        dict(initial_states),
        schedule,
        clock,
        {},
        args.idle_seconds,
    )

    print()
    headers = [
        "phase",
        "wall s",
        "CPU s",
        "CPU %",
        "evaluations",
        "wake-ups",
        "firings",
        "lag p50 ms",
        "p99 ms",
        "max ms",
    ]
    print(table(headers, [row(ticks), row(deadlines), row(idle)]))
    print(
        f"\n   lag = wall-clock time of the decision (after plan_rules) - the instant the rule's "
        f"condition became true\n   ticks: {ticks.cpu_s / ticks.wall_s * 1000:,.0f} ms CPU per "
        f"second whether or not anything is due; deadlines idle: "
        f"{idle.cpu_s / idle.wall_s * 1000:.2f} ms CPU per second; deadlines busy: "
        f"{deadlines.cpu_s / max(1, deadlines.evaluations) * 1e6:,.0f} µs CPU per rule due "
        "(wake-up, plan_rules, reschedule)"
    )
    if idle.cpu_s > 0:
        print(f"   idle CPU, ticks ÷ deadlines: {ticks.cpu_percent / idle.cpu_percent:,.0f}x")
    print()
    check_firings(ticks, count, targets, exact=False)
    check_firings(deadlines, count, targets, exact=True)
    p99 = percentile(deadlines.lags_s, 0.99) if deadlines.lags_s else float("inf")
    targets.check("deadlines: firing lag p99 (ms)", p99 * 1000, "<=", 1000)
    targets.check("deadlines: idle CPU % with 10,000 rules scheduled", idle.cpu_percent, "<=", 1.0)
    lag_p99 = percentile(ticks.lags_s, 0.99) if ticks.lags_s else 0.0
    print(f"   (for comparison, the ticks' lag p99: {lag_p99 * 1000:,.0f} ms)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("bench_deadlines: time-dependent rules, deadlines vs 1-second ticks"))
    print(
        f"   {args.rules:,} rules; phases: ticks {args.baseline_seconds:g} s, deadlines "
        f"{args.seconds:g} s, idle {args.idle_seconds:g} s; real clock; no database"
    )
    started = time.perf_counter()
    asyncio.run(run(args, targets))
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
