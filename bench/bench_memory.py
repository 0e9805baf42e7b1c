"""Peak memory of the daemon with 10,000 rules and 100,000 current facts, beside baselines.

Run: ``python bench/bench_memory.py`` (about 35 s on 2 cores); ``--help`` for the knobs;
``--where`` adds a tracemalloc breakdown of the daemon's startup (top allocation sites).

What runs (everything on 127.0.0.1, in a temporary directory that is removed afterwards):

1. A project with ``--rules`` generated rules (``_common.ruleset_files``: rule *i* reads
   ``task["T-<i//5>"]``, with a ``days_since`` clause, so they are time-dependent and
   scheduled) and a database holding ``--facts`` current facts ``task`` ``T-0`` ..
   ``T-<facts-1>`` of project ``bench`` (the first ``rules/5`` of them read by the rules),
   each ``{"status", "priority", "updated_at", "title", "assignee", "estimate_h"}`` (about
   150 bytes of JSON). The facts are written with the daemon's own store API
   (``Store.commit_transitions``, batches of 1,000) before the daemon starts, so the
   daemon *loads* them at start: the realistic peak of a restart with a full database, and
   much faster than posting 100,000 facts through the HTTP API.
2. ``python -m gatekeeper serve`` is started on that project (``--runs`` times, one after
   the other, on the same database), then exercised: ``--posts`` facts posted one per
   request over 8 connections (updates of facts the rules read, so the count of current
   facts stays the same), then ``GET /v1/rules`` and ``GET /v1/facts`` (each a JSON
   document of every rule or fact). Peak (``VmHWM``) and current (``VmRSS``) RSS are read
   from ``/proc/<pid>/status`` after each stage.

Baselines, measured in the same run: a bare process that imports what the daemon imports
(``gatekeeper.cli.main``, ``gatekeeper.runtime.daemon``, ``gatekeeper.http.app``); the same
facts as plain Python dicts in a bare process (``json.loads`` of each row, keyed by
``(project, kind, id)``, as ``Store.load_facts`` builds them); and the raw sizes
(rule files, facts' JSON, database file). Target: the daemon's peak RSS under 250 MB.

3. *Memory per loaded rule* (``--per-rule-only`` runs only this part): a child process
   imports what the daemon imports, reads its RSS, then does what the daemon's start does
   with the rules: ``load_rules_dir`` with a ``RuleFileCache`` and the config, an engine
   (``Engine.for_config``), a ``FactTable`` of the facts the rules read (``rules/5``), every
   rule evaluated once and its state applied; after ``gc.collect()`` its RSS again: the
   growth divided by the number of rules. Same run: the same child with the facts only, and,
   when the ``zen-engine`` wheel is importable (``zen``), zen-engine's cost of the same
   conditions (``zen.compile_expression`` of each, over the facts as plain dicts, each
   evaluated once) and of one decision graph per rule (``ZenEngine.create_decision`` of an
   input -> expression -> output graph). Target: **<= 2.2 KiB** per rule.
   ``--per-rule-where`` adds two more such children, which say where the bytes are: the
   RSS growth after each stage, split into anonymous memory and pages of mapped files (the
   libraries' code that loading rules runs for the first time); then, under tracemalloc
   (8 frames, which adds its own memory to the RSS), the bytes Python objects hold per rule
   after each stage and at the peak of the first plan, and the allocation sites holding
   the most at the end, each by the innermost gatekeeper line that asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from _common import (
    BENCH_PROJECT,
    RULES_PER_FACT,
    Targets,
    add_strict_options,
    fact_count,
    fact_id_of_rule,
    fmt,
    machine_header,
    median,
    spread,
    table,
)
from bench_ingest import (
    HOST,
    Server,
    daemon_env,
    start_process,
    write_gatekeeper_setup,
)

TARGET_PEAK_MB = 250.0
TARGET_KIB_PER_RULE = 2.2
MIB = 1024 * 1024
DAEMON_IMPORTS = "import gatekeeper.cli.main, gatekeeper.runtime.daemon, gatekeeper.http.app"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=10_000, help="generated rules")
    parser.add_argument("--facts", type=int, default=100_000, help="current facts in the db")
    parser.add_argument("--posts", type=int, default=3_000, help="facts posted to exercise it")
    parser.add_argument("--runs", type=int, default=3, help="daemon starts (median)")
    parser.add_argument(
        "--where", action="store_true", help="also a tracemalloc breakdown of the startup"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--per-rule-only", action="store_true", help="only the memory per loaded rule"
    )
    parser.add_argument(
        "--per-rule-runs", type=int, default=3, help="child processes per per-rule figure"
    )
    parser.add_argument(
        "--per-rule-where",
        action="store_true",
        help="also where the memory per rule goes (tracemalloc and RSS by stage)",
    )
    add_strict_options(parser)
    # Internal modes.
    parser.add_argument("--dicts-of", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--trace-config", metavar="YAML", help=argparse.SUPPRESS)
    parser.add_argument(
        "--per-rule-child", nargs=2, metavar=("WHAT", "YAML"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# /proc


def rss_split_mib() -> tuple[float, float]:
    """(anonymous RSS ``RssAnon``, RSS of mapped files ``RssFile``) of this process, MiB."""
    values: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values["RssAnon"], values["RssFile"]


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    """(peak RSS ``VmHWM``, current RSS ``VmRSS``) of process ``pid`` in MiB (Linux)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values["VmHWM"], values["VmRSS"]


def child_rss(code: str) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter that then prints its own RSS figures (MiB) as
    JSON ``{"peak", "rss"}`` (read from ``/proc/self/status`` with nothing else imported)."""
    probe = (
        f"{code}\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "print(int(status['VmHWM'].split()[0]) / 1024, int(status['VmRSS'].split()[0]) / 1024)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        raise SystemExit(f"baseline process failed:\n{done.stdout}\n{done.stderr}")
    peak, rss = done.stdout.split()
    return {"peak": float(peak), "rss": float(rss)}


# ---------------------------------------------------------------------------------------------
# The project


def fact_data(i: int) -> dict[str, Any]:
    """The data of fact ``task`` ``T-<i>``: an open task (no rule fires)."""
    return {
        "status": "open",
        "priority": i % 7,
        "updated_at": f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:00:00.000Z",
        "title": f"Inspect level {i % 40} formwork, bay {i % 97}",
        "assignee": f"crew-{i % 50}",
        "estimate_h": (i % 16) / 2,
    }


async def write_facts(database: Path, count: int) -> None:
    """``count`` current facts through the daemon's store API, 1,000 per transaction."""
    from datetime import UTC, datetime

    from gatekeeper.engine.model import FactInput, Transition
    from gatekeeper.store import open_store

    store = await open_store(database)
    try:
        for start in range(0, count, 1000):
            facts = [
                FactInput(BENCH_PROJECT, "task", f"T-{i}", fact_data(i))
                for i in range(start, min(count, start + 1000))
            ]
            now = datetime.now(UTC)  # the store reads no clock: rows are stamped with this
            await store.commit_transitions([Transition(facts=facts, planned_at=now)])
    finally:
        await store.close()


def start_gatekeeper(folder: Path, config: Path, port: int, run: int) -> Server:
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", "warning"]
    log = folder / f"gatekeeper-{run}.log"
    server = start_process("gatekeeper", command, port, log, env=daemon_env())
    server.wait_ready("/healthz")
    return server


# ---------------------------------------------------------------------------------------------
# Exercising the daemon


async def post_facts(url: str, count: int, facts_read: int, offset: int) -> int:
    """Post ``count`` facts one per request over 8 connections; returns how many were
    accepted. The ids cycle over the facts the rules read (updates, not new facts)."""
    import aiohttp

    accepted = 0
    queue = list(range(offset, offset + count))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while queue:
            n = queue.pop()
            body = {
                "project": BENCH_PROJECT,
                "kind": "task",
                "id": f"T-{n % facts_read}",
                "data": {**fact_data(n % facts_read), "n": n},
            }
            async with session.post(url, json=body) as response:
                await response.read()
                accepted += response.status == 200

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(8)))
    return accepted


async def get_size(url: str) -> int:
    """``GET url``; the size of the answer in bytes (raises on a non-200 answer)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        return len(await response.read())


STAGES = ("started", "after posts", "after GET /v1/rules", "after GET /v1/facts")


def exercise(server: Server, args: argparse.Namespace, run: int) -> dict[str, Any]:
    """RSS after each stage (``STAGES``), and what each stage did."""
    pid = server.process.pid
    base = f"http://{HOST}:{server.port}"
    out: dict[str, Any] = {"stages": {}}
    out["stages"]["started"] = rss_mib(pid)
    t0 = time.perf_counter()
    facts_read = max(1, min(args.facts, fact_count(args.rules)))
    accepted = asyncio.run(post_facts(f"{base}/v1/facts", args.posts, facts_read, run * args.posts))
    out["posted"] = accepted
    out["post_rate"] = accepted / (time.perf_counter() - t0)
    out["stages"]["after posts"] = rss_mib(pid)
    out["rules_bytes"] = asyncio.run(get_size(f"{base}/v1/rules"))
    out["stages"]["after GET /v1/rules"] = rss_mib(pid)
    out["facts_bytes"] = asyncio.run(get_size(f"{base}/v1/facts"))
    out["stages"]["after GET /v1/facts"] = rss_mib(pid)
    return out


# ---------------------------------------------------------------------------------------------
# Baselines and the breakdown (their own processes)


def dicts_of(database: str) -> None:
    """Print the cost of the current facts as plain dicts built as ``load_facts`` builds them
    (``json.loads`` of each row, keyed by ``(project, kind, id)``), in a bare interpreter
    (sqlite3 and json only): the RSS growth, and the bytes tracemalloc counts for a second
    copy built the same way."""
    import sqlite3

    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    sql = "SELECT project, kind, id, data FROM facts"
    json_bytes = db.execute("SELECT coalesce(sum(length(data)), 0) FROM facts").fetchone()[0]
    before = rss_mib()[1]
    facts = {(r[0], r[1], r[2]): json.loads(r[3]) for r in db.execute(sql)}
    grown = rss_mib()[1] - before
    tracemalloc.start()
    copy = {(r[0], r[1], r[2]): json.loads(r[3]) for r in db.execute(sql)}
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    db.close()
    print(
        json.dumps(
            {
                "facts": len(facts),
                "copy": len(copy),
                "json_bytes": json_bytes,
                "delta": grown,
                "traced_mib": traced / MIB,
            }
        )
    )


def trace_startup(config_path: str, top: int = 20) -> None:
    """Start the daemon in this process under tracemalloc (8 frames); print where the
    memory still allocated after ``start()`` was allocated: by the innermost gatekeeper
    line on the way (what asked for it) and the allocating line, then by file."""
    from collections import Counter

    from gatekeeper.config import load_config
    from gatekeeper.runtime.daemon import Daemon

    config = load_config(Path(config_path))

    async def start_stop() -> tracemalloc.Snapshot:
        daemon = Daemon(config, daemon_env(), watch=False)
        await daemon.start()
        snapshot = tracemalloc.take_snapshot()
        await daemon.stop()
        return snapshot

    tracemalloc.start(8)
    snapshot = asyncio.run(start_stop())
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    snapshot = snapshot.filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<unknown>")]
    )
    sizes: Counter[tuple[str, str]] = Counter()
    counts: Counter[tuple[str, str]] = Counter()
    for stat in snapshot.statistics("traceback"):
        ours = [f for f in stat.traceback if "/gatekeeper/" in f.filename]
        site = stat.traceback[-1]  # oldest first: the last frame allocated
        asker = f"{short(ours[-1].filename)}:{ours[-1].lineno}" if ours else "-"
        key = (asker, f"{short(site.filename)}:{site.lineno}")
        sizes[key] += stat.size
        counts[key] += stat.count
    total = sum(sizes.values())
    print(
        f"   held after start(): {total / MIB:.1f} MiB traced "
        f"(traced peak during start: {traced_peak / MIB:.1f} MiB); top sites:"
    )
    rows = [
        [asker, site, f"{size / MIB:.1f}", f"{counts[(asker, site)]:,}"]
        for (asker, site), size in sizes.most_common(top)
    ]
    print(table(["gatekeeper line", "allocated at", "MiB", "blocks"], rows))
    print()
    rows = []
    for stat in snapshot.statistics("filename")[:10]:
        frame = stat.traceback[0]
        rows.append([short(frame.filename), f"{stat.size / MIB:.1f}", f"{stat.count:,}"])
    print(table(["allocated in (file)", "MiB", "blocks"], rows))


def zen_expression(index: int) -> str:
    """The condition of generated rule ``index`` in zen-engine's expression language."""
    task = f'task["{fact_id_of_rule(index)}"]'
    return (
        f'{task}.status == "completed" and {task}.priority >= {index % RULES_PER_FACT} '
        f'and d(now).diff(d({task}.updated_at), "day") >= 1'
    )


def zen_decision(index: int) -> str:
    """A JDM graph (input -> expression -> output) deciding generated rule ``index``."""
    node = {"x": 0, "y": 0}
    graph = {
        "nodes": [
            {"id": "in", "type": "inputNode", "name": "facts", "position": node},
            {
                "id": "gate",
                "type": "expressionNode",
                "name": f"bench/r{index}",
                "position": node,
                "content": {
                    "expressions": [{"id": "e", "key": "open", "value": zen_expression(index)}]
                },
            },
            {"id": "out", "type": "outputNode", "name": "out", "position": node},
        ],
        "edges": [
            {"id": "a", "sourceId": "in", "targetId": "gate", "type": "edge"},
            {"id": "b", "sourceId": "gate", "targetId": "out", "type": "edge"},
        ],
    }
    return json.dumps(graph)


def per_rule_child(what: str, config_path: str) -> None:
    """Print JSON ``{"before", "after"}`` (RSS MiB) and ``rules``: the RSS of this process
    after the daemon's imports (or zen's), then after loading what ``what`` names:
    ``gatekeeper`` (rules, engine, facts, states), ``facts`` (the facts only),
    ``zen-expressions`` or ``zen-decisions`` (see the module's docstring);
    ``gatekeeper-where`` and ``gatekeeper-traced`` (under tracemalloc) are ``gatekeeper``
    printing the breakdown of ``--per-rule-where`` instead."""
    import gc
    from datetime import UTC, datetime

    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    config_file = Path(config_path)
    rule_count = sum(
        text.count("\n- id: ") + text.startswith("- id: ")
        for text in (p.read_text() for p in (config_file.parent / "rules").iterdir())
    )
    read = fact_count(rule_count)
    if what.startswith("zen"):
        import zen

        gc.collect()
        before = rss_mib()[1]
        tasks = {f"T-{i}": fact_data(i) for i in range(read)}

        def context(index: int) -> dict[str, Any]:
            # zen-engine converts the whole context at each call: give each rule its fact
            task_id = fact_id_of_rule(index)
            return {"now": "2026-11-22T12:00:00Z", "task": {task_id: tasks[task_id]}}

        if what == "zen-expressions":
            kept: list[Any] = [zen.compile_expression(zen_expression(i)) for i in range(rule_count)]
            results = [expression.evaluate(context(i)) for i, expression in enumerate(kept)]
        else:
            engine = zen.ZenEngine()
            kept = [engine.create_decision(zen_decision(i)) for i in range(rule_count)]
            results = [d.evaluate(context(i))["result"]["open"] for i, d in enumerate(kept)]
        assert not any(results), "no generated rule holds"
    else:
        exec(DAEMON_IMPORTS)
        from gatekeeper.config import load_config
        from gatekeeper.engine.evaluate import Engine, apply_transition
        from gatekeeper.engine.facts import FactTable
        from gatekeeper.engine.ledger import EscrowBook
        from gatekeeper.rules.loader import RuleFileCache, load_rules_dir

        config = load_config(config_file)
        where = what != "gatekeeper"
        traced = what == "gatekeeper-traced"
        stages: dict[str, tuple[float, float, float]] = {}

        def stage(name: str) -> None:
            if where:
                gc.collect()
                stages[name] = (*rss_split_mib(), tracemalloc.get_traced_memory()[0] / MIB)

        gc.collect()
        if traced:
            tracemalloc.start(8)
        before = rss_mib()[1]
        stage("the daemon's imports")
        facts = FactTable({(BENCH_PROJECT, "task", f"T-{i}"): fact_data(i) for i in range(read)})
        stage("+ the facts")
        if what.startswith("gatekeeper"):
            cache = RuleFileCache()
            result = load_rules_dir(config.rules_dir, config, cache)
            if result.ruleset is None:
                raise SystemExit("\n".join(map(str, result.problems)))
            stage("+ rules loaded (load_rules_dir)")
            engine = Engine.for_config(result.ruleset, config)
            stage("+ engine")
            states: dict[Any, Any] = {}
            book = EscrowBook(config.escrows)
            if traced:
                tracemalloc.reset_peak()
            plan = engine.plan_rules(facts, states, result.ruleset.rules, now, "reload")
            assert not plan.fired, "no generated rule holds"
            plan_peak = tracemalloc.get_traced_memory()[1] / MIB if traced else 0.0
            stage("+ first plan (every rule evaluated once)")
            apply_transition(plan, facts, states, {}, book)
            del plan
            stage("+ states applied, plan dropped")
            if traced:
                snapshot = tracemalloc.take_snapshot()
                tracemalloc.stop()
                print_traced(stages, plan_peak, snapshot, rule_count)
                return
            if where:
                print_stages(stages, rule_count)
                return
    gc.collect()
    after = rss_mib()[1]
    print(json.dumps({"before": before, "after": after, "rules": rule_count}))


def print_stages(stages: dict[str, tuple[float, float, float]], rules: int) -> None:
    """The RSS part of the ``--per-rule-where`` breakdown: growth per rule after each stage."""
    per_rule = MIB / rules
    base = next(iter(stages.values()))
    rows = [
        [
            name,
            f"{(anon + files - base[0] - base[1]) * per_rule:,.0f}",
            f"{(anon - base[0]) * per_rule:,.0f}",
            f"{(files - base[1]) * per_rule:,.0f}",
        ]
        for name, (anon, files, _) in stages.items()
    ]
    print(f"\n-- where the memory per rule goes: {rules:,} rules, RSS growth after each stage")
    print(table(["stage", "RSS B/rule", "anonymous", "mapped files"], rows))


def print_traced(
    stages: dict[str, tuple[float, float, float]],
    plan_peak: float,
    snapshot: tracemalloc.Snapshot,
    rules: int,
    top: int = 22,
) -> None:
    """The tracemalloc part of the ``--per-rule-where`` breakdown; bytes per rule."""
    from collections import Counter

    per_rule = MIB / rules
    base = next(iter(stages.values()))
    rows = [[name, f"{(held - base[2]) * per_rule:,.0f}"] for name, (*_, held) in stages.items()]
    print("\n   the same under tracemalloc: bytes Python objects hold per rule after each stage")
    print(table(["stage", "traced B/rule"], rows))
    loaded = stages["+ rules loaded (load_rules_dir)"][2]
    print(
        f"   traced peak of the first plan: {(plan_peak - loaded) * per_rule:,.0f} B/rule "
        "over the rules loaded (held, and the plan's decisions while it is alive)"
    )
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sizes: Counter[tuple[str, str]] = Counter()
    counts: Counter[tuple[str, str]] = Counter()
    for stat in snapshot.statistics("traceback"):
        ours = [f for f in stat.traceback if "/gatekeeper/" in f.filename]
        site = stat.traceback[-1]  # oldest first: the last frame allocated
        asker = f"{short(ours[-1].filename)}:{ours[-1].lineno}" if ours else "-"
        key = (asker, f"{short(site.filename)}:{site.lineno}")
        sizes[key] += stat.size
        counts[key] += stat.count
    print(f"   held at the end, by site ({sum(sizes.values()) / rules:,.0f} B/rule traced):")
    rows = [
        [asker, site, f"{size / rules:,.1f}", f"{counts[(asker, site)] / rules:.2f}"]
        for (asker, site), size in sizes.most_common(top)
    ]
    print(table(["gatekeeper line", "allocated at", "B/rule", "blocks/rule"], rows))


def per_rule(config: Path, runs: int, targets: Targets, where: bool = False) -> None:
    """The memory per loaded rule (see the module's docstring), medians of ``runs``."""
    kinds = ["facts", "gatekeeper"]
    try:
        import zen  # noqa: F401

        kinds += ["zen-expressions", "zen-decisions"]
        zen_note = ""
    except ImportError:
        zen_note = "   zen-engine: not importable here (pip install zen-engine), not measured"
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    rules = 0
    for _ in range(runs):
        for kind in kinds:
            command = [sys.executable, str(Path(__file__).resolve()), "--per-rule-child", kind]
            done = subprocess.run(
                [*command, str(config)], capture_output=True, text=True, timeout=900, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"per-rule child {kind} failed:\n{done.stdout}\n{done.stderr}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rules = figures["rules"]
            samples[kind].append(figures["after"] - figures["before"])
    labels = {
        "facts": f"baseline: the {fact_count(rules):,} facts the rules read, no rules",
        "gatekeeper": "gatekeeper: rules (cache, engine, states) + their facts",
        "zen-expressions": "zen-engine: compile_expression per rule + the facts as dicts",
        "zen-decisions": "zen-engine: create_decision per rule + the facts as dicts",
    }
    rows = []
    for kind in kinds:
        grown = median(samples[kind])
        rows.append(
            [
                labels[kind],
                f"{grown:.1f}",
                spread(samples[kind]),
                f"{grown * 1024 / rules:.2f}",
            ]
        )
    print(f"\n-- memory per loaded rule: {rules:,} rules, RSS growth over the imports")
    print(table(["what", "RSS MiB grown", f"min..max of {runs}", "KiB per rule"], rows))
    if zen_note:
        print(zen_note)
    per = median(samples["gatekeeper"]) * 1024 / rules
    targets.check("KiB per loaded rule (rules + their facts)", per, "<=", TARGET_KIB_PER_RULE)
    for kind in ("gatekeeper-where", "gatekeeper-traced") if where else ():
        command = [sys.executable, str(Path(__file__).resolve()), "--per-rule-child", kind]
        done = subprocess.run(
            [*command, str(config)], capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"per-rule breakdown failed:\n{done.stdout}\n{done.stderr}")
        print(done.stdout.rstrip())


def short(filename: str) -> str:
    """A file name relative to site-packages, the source tree or the standard library."""
    for marker in ("/site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", filename)
    return f"stdlib {match.group(1)}" if match else filename


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(args: argparse.Namespace) -> int:
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("bench_memory: daemon RSS with many rules and facts"))
    print(
        f"   {args.rules:,} rules ({RULES_PER_FACT} per fact, days_since clause), "
        f"{args.facts:,} current facts written with the store API before start; "
        f"{args.runs} daemon starts, each exercised with {args.posts:,} posted facts"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-memory-"))
    started = time.perf_counter()
    servers: list[Server] = []
    try:
        config, port = write_gatekeeper_setup(folder, args.rules, time_rules=True)
        t0 = time.perf_counter()
        asyncio.run(write_facts(folder / "gatekeeper.db", args.facts))
        print(f"   wrote {args.facts:,} facts in {time.perf_counter() - t0:.1f} s")
        bare = child_rss("import sys")
        imports = child_rss(DAEMON_IMPORTS)
        dicts = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--dicts-of",
                    str(folder / "gatekeeper.db"),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rule_bytes = sum(p.stat().st_size for p in (folder / "rules").iterdir())
        runs: list[dict[str, Any]] = []
        start_s: list[float] = []
        for n in range(args.runs):
            t0 = time.perf_counter()
            server = start_gatekeeper(folder, config, port, n)
            servers.append(server)
            start_s.append(time.perf_counter() - t0)
            runs.append(exercise(server, args, n))
            server.stop()
            servers.remove(server)
        db_bytes = sum(
            p.stat().st_size for p in folder.iterdir() if p.name.startswith("gatekeeper.db")
        )
        per_rule(config, args.per_rule_runs, targets, args.per_rule_where)
        trace = None
        if args.where:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--trace-config", str(config)],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
                cwd=folder,
            )
            trace = done.stdout if done.returncode == 0 else done.stdout + done.stderr
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print(
        f"   daemon start (to /healthz answering): {fmt(median(start_s))} s median, "
        f"{spread(start_s)}; posts: {fmt(median([r['post_rate'] for r in runs]))} facts/s, "
        f"{sum(r['posted'] for r in runs):,} accepted of {args.posts * args.runs:,}"
    )
    print()
    rows = [
        ["baseline: bare interpreter", f"{bare['peak']:.1f}", "", f"{bare['rss']:.1f}", ""],
        [
            "baseline: interpreter + the daemon's imports",
            f"{imports['peak']:.1f}",
            "",
            f"{imports['rss']:.1f}",
            "",
        ],
    ]
    for stage in STAGES:
        peaks = [r["stages"][stage][0] for r in runs]
        now = [r["stages"][stage][1] for r in runs]
        rows.append(
            [
                f"gatekeeper daemon, {stage}",
                f"{median(peaks):.1f}",
                spread(peaks),
                f"{median(now):.1f}",
                spread(now),
            ]
        )
    print(
        table(
            [
                "process",
                "peak RSS MiB",
                f"min..max of {args.runs}",
                "RSS MiB",
                f"min..max of {args.runs}",
            ],
            rows,
        )
    )
    started_rss = median([r["stages"]["started"][1] for r in runs])
    print("\n-- raw size of the data")
    print(
        table(
            ["what", "MiB"],
            [
                [f"rule files ({args.rules:,} rules, YAML)", f"{rule_bytes / MIB:.1f}"],
                [
                    f"facts' data as JSON ({dicts['facts']:,} facts)",
                    f"{dicts['json_bytes'] / MIB:.1f}",
                ],
                ["database files (after the runs)", f"{db_bytes / MIB:.1f}"],
                [
                    "the facts as plain Python dicts: RSS growth of a bare process",
                    f"{dicts['delta']:.1f}",
                ],
                [
                    "the facts as plain Python dicts: bytes tracemalloc counts",
                    f"{dicts['traced_mib']:.1f}",
                ],
                ["GET /v1/rules answer", f"{median([r['rules_bytes'] for r in runs]) / MIB:.1f}"],
                ["GET /v1/facts answer", f"{median([r['facts_bytes'] for r in runs]) / MIB:.1f}"],
            ],
        )
    )
    over_imports = started_rss - imports["rss"]
    print(
        f"\n   daemon RSS after start - (imports): {over_imports:.1f} MiB: the ruleset (rules, "
        "compiled conditions, index, states, deadline schedule), the facts (which would take "
        f"{dicts['delta']:.1f} MiB\n   as plain dicts; FactTable keeps them compact) and "
        "caches; --where says which is which"
    )
    exercised_peak = median([r["stages"]["after posts"][0] for r in runs])
    api_peak = median([r["stages"]["after GET /v1/facts"][0] for r in runs])
    targets.check(
        "peak RSS MiB, started and exercised with posts", exercised_peak, "<=", TARGET_PEAK_MB
    )
    print(
        f"   the API reads: GET /v1/facts raised the peak to {api_peak:.1f} MiB "
        f"(+{api_peak - exercised_peak:.1f} MiB: the whole answer is built in memory); "
        "no target is set for it"
    )
    if trace is not None:
        print("\n-- where the memory goes: tracemalloc of Daemon.start() in-process (--where)")
        print(trace.rstrip())
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dicts_of is not None:
        dicts_of(args.dicts_of)
        return 0
    if args.trace_config is not None:
        trace_startup(args.trace_config)
        return 0
    if args.per_rule_child is not None:
        per_rule_child(*args.per_rule_child)
        return 0
    if args.per_rule_only:
        targets = Targets(strict=args.strict, strict_later=args.strict_later)
        print(machine_header("bench_memory: memory per loaded rule"))
        folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-memory-"))
        try:
            config, _ = write_gatekeeper_setup(folder, args.rules, time_rules=True)
            per_rule(config, args.per_rule_runs, targets, args.per_rule_where)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return targets.exit_code()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
