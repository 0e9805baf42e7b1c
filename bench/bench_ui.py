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
  process doing what the page's script does (``--protocol parts``): ``GET /ui/live?page=
  &tag=`` twice a second, taking in the parts of the page that changed (target: at most 5 %
  fewer facts/s). ``--protocol page`` polls as the script did before: ``GET /ui/live`` for
  the stamp twice a second and, when it moved, ``GET`` the whole page again (at most once
  a second); it runs against any tree (``PYTHONPATH`` chooses the daemon's).
  The runs come in pairs, one alone and one with pollers, alternating which goes first;
  the verdict is the median of the pairs' ratios, since on a shared machine the facts/s of
  two runs minutes apart differ by more than 5 % whatever runs beside them. It also
  measures what the pollers cost directly: the daemon's CPU per fact in each run; the
  daemon's CPU per second while 10 facts a second trickle in (the page changes all the
  time), with and without pollers (paired too), set against the CPU per second of ingest
  alone; and the pollers' own process CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
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

from gatekeeper.ui.cache import FRESH_S

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
    parser.add_argument(
        "--protocol",
        choices=("parts", "page"),
        default="parts",
        help="how the pollers follow the page: /ui/live's changed parts (the page's script), "
        "or the whole page again when the stamp moved (the script before)",
    )
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


def timed_gets(server: Server, urls: list[str]) -> tuple[list[float], float]:
    """Seconds each of sequential GETs of ``urls`` took (each must answer 200), sorted, and
    the daemon's CPU seconds per GET."""
    took = []
    before = cpu_seconds(server.process.pid) or 0.0
    for url in urls:
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as answer:
            answer.read()
            assert answer.status == 200, answer.status
        took.append(time.perf_counter() - started)
    used = (cpu_seconds(server.process.pid) or 0.0) - before
    return sorted(took), used / len(urls)


def fresh(url: str, count: int) -> list[str]:
    """``count`` URLs of the first page of ``url``, each with a query of its own (``after=``
    an id no rule has), so that the page cache cannot answer: every one is rendered."""
    return [f"{url}?after=x{n}" for n in range(count)]


def live_url(base: str, tag: str) -> str:
    """``/ui/live`` for the page ``PAGE`` showing the live part tagged ``tag``."""
    return f"{base}/ui/live?{urllib.parse.urlencode({'page': PAGE, 'tag': tag})}"


async def poll(base: str, pollers: int, seconds: float, protocol: str) -> dict[str, float]:
    """``pollers`` clients following the page as its script does (``protocol``: ``parts``
    or ``page``, see the module), for ``seconds``, their polls spread evenly over the half
    second between two (as browsers opened at different moments): how many polls, changes
    taken in, whole pages fetched and bytes received, and this process's CPU seconds."""
    import aiohttp

    counts = {"polls": 0, "changes": 0, "pages": 0, "bytes": 0}
    deadline = time.monotonic() + seconds
    cpu_before = time.process_time()  # after the imports: only what polling costs

    def attribute(page: str, name: str) -> str:
        found = page.split(f'{name}="', 1)
        return found[1].split('"', 1)[0] if len(found) == 2 else ""

    async with aiohttp.ClientSession() as session:

        async def fetch(path: str) -> bytes:
            async with session.get(base + path) as answer:
                body = await answer.read()
                assert answer.status == 200, (answer.status, body[:200])
            counts["bytes"] += len(body)
            return body

        async def poller(n: int) -> None:
            await asyncio.sleep(0.5 * n / pollers)  # browsers opened at different moments
            page = (await fetch(PAGE)).decode()
            counts["pages"] += 1
            tag, stamp = attribute(page, "data-tag"), attribute(page, "data-stamp")
            fetched_at = time.monotonic()
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                counts["polls"] += 1
                if protocol == "parts":
                    live = f"/ui/live?{urllib.parse.urlencode({'page': PAGE, 'tag': tag})}"
                    answer = json.loads(await fetch(live))
                    if answer["tag"] != tag:
                        counts["changes"] += 1
                        tag = answer["tag"]
                    continue
                now = str(json.loads(await fetch("/ui/live"))["stamp"])
                if now != stamp and time.monotonic() - fetched_at >= 1.0:
                    fetched_at = time.monotonic()
                    stamp = attribute((await fetch(PAGE)).decode(), "data-stamp")
                    counts["pages"] += 1
                    counts["changes"] += 1

        await asyncio.gather(*(poller(n) for n in range(pollers)))
    return {**counts, "cpu_s": time.process_time() - cpu_before}


def start_pollers(args: argparse.Namespace, base: str, seconds: float) -> subprocess.Popen[str]:
    """The pollers' process (``poll``), given half a second to open the page."""
    command = [sys.executable, str(Path(__file__).resolve()), "--poll", base]
    command += ["--pollers", str(args.pollers), "--seconds", str(seconds)]
    command += ["--protocol", args.protocol]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    return process


def pollers_done(process: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = process.communicate(timeout=120)
    if process.returncode != 0:
        raise SystemExit(f"pollers failed ({process.returncode}):\n{out}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def trickle_cpu(server: Server, base: str, seconds: float) -> float:
    """The daemon's CPU seconds per second while 10 facts a second are posted (so the page
    keeps changing)."""
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
    return used / (time.monotonic() - started)


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> int:
    print(machine_header("bench_ui: the status page under load"))
    print(
        f"   {PLAIN_RULES + ITEM_RULES:,} rules in one project ({ITEM_RULES} per item over "
        f"{ITEMS:,} items), {args.requests} page requests, ingest {args.runs} x "
        f"{args.seconds:g} s at {args.connections} connections, {args.pollers} pollers "
        f"({args.protocol})"
    )
    targets = Targets(args.strict, args.strict_later)
    with tempfile.TemporaryDirectory(prefix="gk-bench-ui-") as tmp:
        folder = Path(tmp)
        server = start(folder)
        base = f"http://{HOST}:{server.port}"
        try:
            timed_gets(server, fresh(base + PAGE, 3))  # warm up
            n = args.requests
            page = timed_gets(server, fresh(base + PAGE, n))
            cached = timed_gets(server, [base + PAGE] * n)
            health = timed_gets(server, [base + "/healthz"] * n * 5)
            shown = urllib.request.urlopen(base + PAGE, timeout=60).read().decode()
            measured = [
                ("GET /healthz (baseline)", health),
                (f"GET {PAGE}, rendered", page),
                (f"GET {PAGE}, from the page cache", cached),
            ]
            polls_s = args.pollers * 2
            if args.protocol == "parts":
                tag = shown.split('data-tag="', 1)[1].split('"', 1)[0]
                unchanged = timed_gets(server, [live_url(base, tag)] * n * 5)
                whole = timed_gets(server, [live_url(base, "")] * n * 5)
                measured += [
                    ("GET /ui/live?page=&tag=, unchanged", unchanged),
                    ("GET /ui/live?page=&tag=, the whole live part", whole),
                ]
                model = page[1] / FRESH_S + polls_s * whole[1]
                how = f"{polls_s} polls a second, each answered with the whole live part"
            else:
                stamp = timed_gets(server, [base + "/ui/live"] * n * 5)
                measured.append(("GET /ui/live (the stamp)", stamp))
                model = page[1] / FRESH_S + polls_s * stamp[1] + args.pollers * cached[1]
                how = f"{polls_s} polls a second and {args.pollers} pages from the page cache"
            print(f"\n-- page ({len(shown) / 1024:,.0f} KiB of HTML); the daemon's CPU per request")
            rows = [
                [
                    name,
                    fmt(percentile(took, 0.5) * 1000),
                    fmt(percentile(took, 0.99) * 1000),
                    fmt(cpu * 1000),
                ]
                for name, (took, cpu) in measured
            ]
            print(table(["request", "p50 ms", "p99 ms", "CPU ms"], rows))
            print(
                f"   {args.pollers} pollers while the page changes all the time cost the daemon at "
                f"most one render per {FRESH_S:g} s and {how}: {fmt(model * 1000)} ms of CPU "
                "per second"
            )
            page = page[0]
            targets.check("page p50 ms", percentile(page, 0.5) * 1000, "<=", 200)

            url = base + "/v1/facts"
            facts = fact_count(PLAIN_RULES)
            run_aiohttp_load(url, args.connections, 2.0, facts)  # warm up
            print(f"\n-- ingest (one fact per request), pairs of runs; {load_average()}")
            pairs, fetched = [], []
            for n in range(args.runs):
                pair: dict[bool, tuple[float, float]] = {}
                for polled in (False, True) if n % 2 == 0 else (True, False):
                    process = start_pollers(args, base, args.seconds + 1) if polled else None
                    before = cpu_seconds(server.process.pid) or 0.0
                    result = run_aiohttp_load(url, args.connections, args.seconds, facts)
                    used = (cpu_seconds(server.process.pid) or 0.0) - before
                    pair[polled] = (result.rps, used / max(1, result.requests) * 1e6)
                    if process is not None:
                        fetched.append(pollers_done(process))
                pairs.append(pair)
            rows = [
                [
                    f"pair {n + 1} ({'alone first' if n % 2 == 0 else 'pollers first'})",
                    fmt(p[False][0]),
                    fmt(p[True][0]),
                    f"{(1 - p[True][0] / p[False][0]) * 100:+.1f}",
                    fmt(p[False][1]),
                    fmt(p[True][1]),
                ]
                for n, p in enumerate(pairs)
            ]
            slower = median([(1 - p[True][0] / p[False][0]) * 100 for p in pairs])
            dearer = median([(p[True][1] / p[False][1] - 1) * 100 for p in pairs])
            alone = [p[False][0] for p in pairs]
            cpu_alone = [p[False][1] for p in pairs]
            rows.append(
                [
                    "median",
                    fmt(median(alone)),
                    fmt(median([p[True][0] for p in pairs])),
                    f"{slower:+.1f}",
                    fmt(median(cpu_alone)),
                    fmt(median([p[True][1] for p in pairs])),
                ]
            )
            headers = ["run", "alone f/s", f"{args.pollers} pollers f/s", "slower %"]
            print(table([*headers, "CPU µs/fact alone", "with"], rows))
            per_run = {k: median([f[k] for f in fetched]) for k in fetched[0]}
            print(
                f"   pollers ({args.protocol}) per {args.seconds + 1:g} s run (median): "
                f"{per_run['polls']:g} polls, {per_run['changes']:g} changes taken in, "
                f"{per_run['pages']:g} whole pages, {per_run['bytes'] / 1024:,.0f} KiB, "
                f"{per_run['cpu_s'] * 1000:,.0f} ms of their own CPU"
            )
            targets.check("ingest slower with pollers, median of pairs, %", slower, "<=", 5)
            print(
                f"   the daemon's CPU per fact with the pollers (median of pairs): {dearer:+.1f} %"
            )
            quiet, busy, own = [], [], []
            for n in range(args.runs):
                for polled in (False, True) if n % 2 == 0 else (True, False):
                    process = start_pollers(args, base, args.seconds + 1) if polled else None
                    (busy if polled else quiet).append(trickle_cpu(server, base, args.seconds))
                    if process is not None:
                        own.append(pollers_done(process)["cpu_s"] / (args.seconds + 1))
            cost_ms = median([(b - q) * 1000 for q, b in zip(quiet, busy, strict=True)])
            ingest_ms = median(alone) * median(cpu_alone) / 1000
            print(
                f"\n-- what the pollers cost, facts trickling in (10 a second: the page changes "
                f"all the time)\n   daemon CPU {fmt(median(quiet) * 1000)} ms/s without "
                f"pollers, {fmt(median(busy) * 1000)} ms/s with {args.pollers}: "
                f"{fmt(cost_ms)} ms/s (median of pairs), {cost_ms / ingest_ms * 100:.1f} % of "
                f"the CPU of ingest alone ({fmt(ingest_ms)} ms/s); the pollers' own process "
                f"{fmt(median(own) * 1000)} ms/s\n   {load_average()}"
            )
        finally:
            server.stop()
            if args.keep:
                print(f"kept {folder}")
    return targets.exit_code()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.poll is not None:
        counts = asyncio.run(poll(args.poll, args.pollers, args.seconds, args.protocol))
        print(json.dumps(counts))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
