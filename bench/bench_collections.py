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

Then the *stored size of a decision* (``--skip-stored`` skips it): for each rule, with 10
and with 10,000 facts of the kind, ``--stored-facts`` posted facts are planned and
committed one per transaction with the daemon's store (``open_store`` on a SQLite file in
a temporary directory), and the file is read back: the bytes per decision of the
``decisions`` table and its indexes (SQLite's ``dbstat``: pages and payload) and of the
stored evaluation JSON (average and largest). A collection stores counts and at most
``MAX_FALSE_IDS`` ids, never the facts it went over, so a decision over 10,000 facts must
not grow with the facts: target, payload bytes per decision with 10,000 facts ÷ with
1,000 **<= 1.05** (both past the cap on ids); ÷ with 10 facts **<= 1.2** is printed as
informational (``all`` lists up to 20 ids there, against 5 with 10 facts).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Mapping
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

from gatekeeper.engine.evaluate import Engine, apply_transition
from gatekeeper.engine.facts import FactTable
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput, InstanceKey, RuleState, Transition
from gatekeeper.expr import MAX_FALSE_IDS, compile_condition
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
    parser.add_argument(
        "--middle", type=int, default=1000, help="task facts in the stored-size middle case"
    )
    parser.add_argument("--facts", type=int, default=2000, help="facts posted per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the posted facts")
    parser.add_argument(
        "--stored-facts", type=int, default=300, help="facts committed per stored-size case"
    )
    parser.add_argument("--skip-stored", action="store_true", help="skip the stored-size part")
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
    return ingest_us_per_fact(case.engine, case.facts, case.states, case.inputs, NOW)


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


DECISION_OBJECTS = (
    "decisions",
    "decisions_rule",
    "decisions_time",
    "decisions_instance",
    "sqlite_autoindex_decisions_1",
)
"""The ``decisions`` table and its indexes in the SQLite file (for ``dbstat``)."""


async def commit_posts(database: Path, case: Case) -> None:
    """Commit the ruleset's first evaluation, then plan and commit each fact of ``case``
    as its own transaction, applying it after the commit, as the daemon does."""
    from gatekeeper.store import open_store

    store = await open_store(database)
    try:
        facts, states, engine = case.facts, case.states, case.engine
        book = EscrowBook({})
        approvals: dict[str, dict[str, str]] = {}
        seed = [
            FactInput(BENCH_PROJECT, "task", i, dict(facts.get((BENCH_PROJECT, "task", i)) or {}))
            for i in sorted(facts.of_kind(BENCH_PROJECT, "task"))
        ]
        for start in range(0, len(seed), 1000):  # the facts the collection goes over
            await store.commit_transitions(
                [Transition(facts=seed[start : start + 1000], planned_at=NOW)]
            )
        for fact in case.inputs:
            transition = engine.plan_ingest(facts, states, [fact], NOW, book)
            await store.commit_transition(transition)
            apply_transition(transition, facts, states, approvals, book)
    finally:
        await store.close()


def stored_sizes(database: Path) -> dict[str, float]:
    """Bytes per decision in ``database``: table + indexes on disk (pages), their payload,
    and the evaluation JSON (average, largest)."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        count = db.execute("SELECT count(*) FROM decisions").fetchone()[0]
        marks = ",".join("?" * len(DECISION_OBJECTS))
        pages, payload = db.execute(
            f"SELECT sum(pgsize), sum(payload) FROM dbstat WHERE name IN ({marks})",
            DECISION_OBJECTS,
        ).fetchone()
        average, largest = db.execute(
            "SELECT avg(length(evaluation)), max(length(evaluation)) FROM decisions"
        ).fetchone()
    finally:
        db.close()
    return {
        "decisions": count,
        "pages": pages / count,
        "payload": payload / count,
        "evaluation": average,
        "evaluation_max": largest,
    }


def run_stored(args: argparse.Namespace, targets: Targets) -> None:
    sizes = [args.small, args.middle, args.large]
    print(
        f"\n-- stored size of a decision: {args.stored_facts:,} facts committed one per "
        "transaction (SQLite, the daemon's store), then the file read back"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-collections-"))
    rows = []
    figures: dict[tuple[str, int], dict[str, float]] = {}
    try:
        rng = random.Random(args.seed)
        for function in CONDITIONS:
            for size in sizes:
                case = make_case(function, size, args.stored_facts, rng)
                database = folder / f"{function}-{size}.db"
                asyncio.run(commit_posts(database, case))
                stored = figures[(function, size)] = stored_sizes(database)
                base = figures[(function, args.small)]
                rows.append(
                    [
                        case.name,
                        f"{stored['decisions']:,.0f}",
                        f"{stored['pages']:,.0f}",
                        f"{stored['payload']:,.0f}",
                        f"{stored['evaluation']:,.0f} / {stored['evaluation_max']:,.0f}",
                        f"{stored['payload'] / base['payload']:.2f}",
                    ]
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        table(
            [
                "rule",
                "decisions",
                "bytes/decision on disk (pages)",
                "payload",
                "evaluation JSON avg / max",
                f"payload ÷ {args.small:,} facts",
            ],
            rows,
        )
    )
    print(
        f"   a collection stores counts and at most MAX_FALSE_IDS ({MAX_FALSE_IDS}) ids of "
        "facts its element is false for, never the facts"
    )
    for function in CONDITIONS:
        large, middle = figures[(function, args.large)], figures[(function, args.middle)]
        targets.check(
            f"stored payload bytes/decision {function}() over {args.large:,} ÷ "
            f"{args.middle:,} facts (bounded)",
            large["payload"] / middle["payload"],
            "<=",
            1.05,
        )
        targets.check(
            f"stored payload bytes/decision {function}() over {args.large:,} ÷ "
            f"{args.small:,} facts",
            large["payload"] / figures[(function, args.small)]["payload"],
            "<=",
            1.2,
            later=True,
        )


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
    if not args.skip_stored:
        run_stored(args, targets)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
