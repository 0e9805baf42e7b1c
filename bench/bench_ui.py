"""The status page: how long the project page takes to render, and what live pollers cost
ingest.

Run: ``python bench/bench_ui.py`` (about 60 s on 2 cores); ``--help`` for the knobs.

What runs (on 127.0.0.1, in a temporary directory removed afterwards): ``gatekeeper serve``
in its own process (it serves the page under ``/ui/``; no tokens, so the page is read
without signing in) with one project of 1,000 rules: 990 generated as in
``bench_ingest.py`` (each ``task`` fact read by 5 of them, with a ``days_since`` clause,
none firing) and 10 per-item rules over the same 10,000 ``punch`` items (100,000 instances).

- **page** — 100 sequential ``GET /ui/projects/bench`` from this process, each rendered
  (a query of its own, so the page cache cannot answer): p50 and p99 (target: p50 < 200
  ms); then 100 the page cache answers (the state unchanged); beside ``GET /healthz`` as
  the baseline (the HTTP round trip). The page shows the first 50 gates and counts the
  states of all 1,000.
- **ingest** — ``POST /v1/facts`` of one fact each, from the aiohttp load generator of
  ``bench_ingest.py`` in a separate process, alone (baseline) and with 5 pollers in another
  process doing what the page's script does: ``GET /ui/live`` twice a second and, when its
  stamp is not the one the page shows, ``GET /ui/projects/bench`` again (at most once a
  second) (target: at most 5 % fewer facts/s).
  The runs alternate; each figure is the median of ``--runs`` runs. On a busy machine the
  facts/s of two runs differ by more than 5 % whatever runs beside them, so it also
  measures what the pollers cost the daemon directly: its CPU per second while 10 facts a
  second trickle in (the page changes all the time), with and without the pollers, set
  against the CPU per second of ingest alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import (
    BENCH_PROJECT,
    Targets,
    add_strict_options,
    fact_count,
    fmt,
    machine_header,
    median,
    spread,
    table,
)
from bench_ingest import (
    HOST,
    Server,
    cpu_seconds,
    daemon_env,
    fact_body,
    percentile,
    run_aiohttp_load,
    start_process,
    write_gatekeeper_setup,
)

PLAIN_RULES = 990
ITEM_RULES = 10
ITEMS = 10_000
PAGE = f"/ui/projects/{BENCH_PROJECT}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="page requests timed")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per ingest run")
    parser.add_argument("--runs", type=int, default=3, help="ingest runs per figure (median)")
    parser.add_argument("--connections", type=int, default=8, help="ingest connections")
    parser.add_argument("--pollers", type=int, default=5, help="live pollers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    add_strict_options(parser)
    parser.add_argument("--poll", metavar="BASE_URL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def item_rules_yaml() -> str:
    """``ITEM_RULES`` per-item rules over the ``punch`` items (none fires: no item is
    closed)."""
    lines = []
    for i in range(ITEM_RULES):
        lines += [
            f"- id: {BENCH_PROJECT}/punch-{i}",
            f"  project: {BENCH_PROJECT}",
            "  for_each: punch",
            f"  when: item.data.closed and item.data.severity >= {i}",
            "  actions:",
            '    - notify: {target: bench-chat, message: "closed (${rule_id})"}',
        ]
    return "\n".join(lines) + "\n"


def start(folder: Path) -> Server:
    """``gatekeeper serve`` with the page's project, its items posted."""
    config, port = write_gatekeeper_setup(folder, PLAIN_RULES, True)
    (folder / "rules" / "items.yaml").write_text(item_rules_yaml(), encoding="utf-8")
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", "warning"]
    server = start_process("gatekeeper", command, port, folder / "gatekeeper.log", env=daemon_env())
    server.wait_ready("/healthz")
    base = f"http://{HOST}:{port}"
    facts = [
        {"project": BENCH_PROJECT, "kind": "punch", "id": f"P-{n:05d}",
         "data": {"closed": False, "severity": n % 5}}
        for n in range(ITEMS)
    ] + [
        {"project": BENCH_PROJECT, "kind": "task", "id": f"T-{n}",
         "data": {"status": "open", "priority": 1, "updated_at": "2026-01-01T00:00:00Z"}}
        for n in range(fact_count(PLAIN_RULES))
    ]  # fmt: skip
    for start_at in range(0, len(facts), 1000):
        body = json.dumps({"facts": facts[start_at : start_at + 1000]}).encode()
        request = urllib.request.Request(
            base + "/v1/facts", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
    return server


def timed_gets(url: str, count: int, *, fresh: bool = False) -> list[float]:
    """Seconds each of ``count`` sequential GETs of ``url`` took (each must answer 200).
    ``fresh``: each asks for the first page with a query of its own (``after=`` an id no
    rule has), so that the page cache cannot answer: every one is rendered."""
    took = []
    for n in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url + (f"?after=x{n}" if fresh else ""), timeout=60) as answer:
            answer.read()
            assert answer.status == 200, answer.status
        took.append(time.perf_counter() - started)
    return sorted(took)


async def poll(base: str, pollers: int, seconds: float) -> dict[str, int]:
    """``pollers`` clients doing what the page's script does, for ``seconds``: how many
    stamps and pages they fetched."""
    import aiohttp

    counts = {"stamps": 0, "pages": 0}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:

        async def poller() -> None:
            shown = None  # the stamp of the page shown (its #live data-stamp)
            fetched_at = 0.0
            while time.monotonic() < deadline:
                async with session.get(base + "/ui/live") as answer:
                    now = (await answer.json())["stamp"]
                counts["stamps"] += 1
                if shown is None or (now != shown and time.monotonic() - fetched_at >= 1.0):
                    fetched_at = time.monotonic()
                    async with session.get(base + PAGE) as answer:
                        page = await answer.text()
                    shown = int(page.split('data-stamp="', 1)[1].split('"', 1)[0])
                    counts["pages"] += 1
                await asyncio.sleep(0.5)

        await asyncio.gather(*(poller() for _ in range(pollers)))
    return counts


def trickle_cpu(server: Server, base: str, seconds: float, pollers: int) -> float:
    """The daemon's CPU seconds per second while 10 facts a second are posted (so the page
    keeps changing) and ``pollers`` pollers follow the page."""
    process = None
    if pollers:
        command = [sys.executable, str(Path(__file__).resolve()), "--poll", base]
        command += ["--pollers", str(pollers), "--seconds", str(seconds + 1)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
    before = cpu_seconds(server.process.pid) or 0.0
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < seconds:
        n += 1
        body = json.dumps(fact_body(n, fact_count(PLAIN_RULES))).encode()
        request = urllib.request.Request(
            base + "/v1/facts", body, {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=60).read()
        time.sleep(max(0.0, started + n * 0.1 - time.monotonic()))
    used = (cpu_seconds(server.process.pid) or 0.0) - before
    elapsed = time.monotonic() - started
    if process is not None:
        process.wait(timeout=120)
    return used / elapsed


def run(args: argparse.Namespace) -> int:
    print(machine_header("bench_ui: the status page under load"))
    print(
        f"   {PLAIN_RULES + ITEM_RULES:,} rules in one project ({ITEM_RULES} per item over "
        f"{ITEMS:,} items), {args.requests} page requests, ingest {args.runs} x "
        f"{args.seconds:g} s at {args.connections} connections, {args.pollers} pollers"
    )
    targets = Targets(args.strict, args.strict_later)
    with tempfile.TemporaryDirectory(prefix="gk-bench-ui-") as tmp:
        folder = Path(tmp)
        server = start(folder)
        base = f"http://{HOST}:{server.port}"
        try:
            timed_gets(base + PAGE, 3, fresh=True)  # warm up
            page = timed_gets(base + PAGE, args.requests, fresh=True)
            cached = timed_gets(base + PAGE, args.requests)
            health = timed_gets(base + "/healthz", args.requests)
            size = len(urllib.request.urlopen(base + PAGE, timeout=60).read())
            print(f"\n-- page ({size / 1024:,.0f} KiB of HTML)")
            rows = [
                [name, fmt(percentile(took, 0.5) * 1000), fmt(percentile(took, 0.99) * 1000)]
                for name, took in (
                    ("GET /healthz (baseline)", health),
                    (f"GET {PAGE}, rendered", page),
                    (f"GET {PAGE}, from the page cache", cached),
                )
            ]
            print(table(["request", "p50 ms", "p99 ms"], rows))
            targets.check("page p50 ms", percentile(page, 0.5) * 1000, "<=", 200)

            url = base + "/v1/facts"
            facts = fact_count(PLAIN_RULES)
            run_aiohttp_load(url, args.connections, 2.0, facts)  # warm up
            alone, polled, fetched = [], [], []
            cpu_alone, cpu_polled = [], []

            def load(rates: list[float], cpu: list[float]) -> None:
                before = cpu_seconds(server.process.pid) or 0.0
                result = run_aiohttp_load(url, args.connections, args.seconds, facts)
                used = (cpu_seconds(server.process.pid) or 0.0) - before
                rates.append(result.rps)
                cpu.append(used / max(1, result.requests) * 1e6)

            for _ in range(args.runs):
                load(alone, cpu_alone)
                command = [sys.executable, str(Path(__file__).resolve()), "--poll", base]
                command += ["--pollers", str(args.pollers), "--seconds", str(args.seconds + 1)]
                pollers = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                time.sleep(0.5)
                load(polled, cpu_polled)
                out, _ = pollers.communicate(timeout=120)
                fetched.append(json.loads(out.strip().splitlines()[-1]))
            print("\n-- ingest (one fact per request): facts/s, and the daemon's CPU per fact")
            rows = [
                ["alone (baseline)", fmt(median(alone)), spread(alone), fmt(median(cpu_alone))],
                [
                    f"with {args.pollers} pollers",
                    fmt(median(polled)),
                    spread(polled),
                    fmt(median(cpu_polled)),
                ],
            ]
            print(table(["run", "facts/s", "min..max", "CPU µs/fact"], rows))
            pages = median([f["pages"] for f in fetched])
            stamps = median([f["stamps"] for f in fetched])
            print(f"   pollers fetched per run (median): {stamps:g} stamps, {pages:g} pages")
            slower = (1 - median(polled) / median(alone)) * 100
            targets.check("ingest slower with pollers, %", slower, "<=", 5)
            dearer = (median(cpu_polled) / median(cpu_alone) - 1) * 100
            print(f"   the daemon's CPU per fact with the pollers: {dearer:+.1f} %")
            quiet, busy = [], []
            for _ in range(args.runs):
                quiet.append(trickle_cpu(server, base, args.seconds, 0))
                busy.append(trickle_cpu(server, base, args.seconds, args.pollers))
            cost_ms = (median(busy) - median(quiet)) * 1000
            ingest_ms = median(alone) * median(cpu_alone) / 1000
            print(
                f"\n-- what the pollers cost the daemon, facts trickling in (10 a second: the "
                f"page changes all the time)\n   daemon CPU {fmt(median(quiet) * 1000)} ms/s "
                f"without pollers, {fmt(median(busy) * 1000)} ms/s with {args.pollers}: "
                f"{fmt(cost_ms)} ms/s, {cost_ms / ingest_ms * 100:.1f} % of the CPU of "
                f"ingest alone ({fmt(ingest_ms)} ms/s)"
            )
        finally:
            server.stop()
            if args.keep:
                print(f"kept {folder}")
    return targets.exit_code()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.poll is not None:
        print(json.dumps(asyncio.run(poll(args.poll, args.pollers, args.seconds))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
