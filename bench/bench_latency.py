"""Fact posted -> action received: latency through the real daemon, beside an HTTP relay.

Run: ``python bench/bench_latency.py`` (about 75 s on 2 cores); ``--help`` for the knobs.

What runs (everything on 127.0.0.1, in a temporary directory that is removed afterwards),
each in its own process:

- **receiver** -- an aiohttp endpoint that records the arrival time (``time.time()``) of
  every request it gets, with what identifies the fact that caused it.
- **gatekeeper** -- ``python -m gatekeeper serve`` with 1,000 generated rules (never firing)
  plus two rules per *channel* ``signal["c<k>"]`` of project ``lat``:
  ``lat/c<k>-odd`` (``signal["c<k>"].j % 2 == 1``) and ``lat/c<k>-even`` (``... == 0``),
  both ``fire: each_time`` with a ``notify`` action to a webhook target pointing at the
  receiver. Each channel is posted ``j = 0, 1, 2, ...`` in order, so every fact closes one
  rule's gate and opens the other's: exactly one firing, one delivery per fact. Firing
  ``#k`` of ``-odd`` is ``j = 2k - 1``, of ``-even`` ``j = 2k - 2``: the ``firing_id`` in
  the webhook body maps each delivery back to its fact (and ``fired_at``, the decision's
  time, splits the latency in two).
- **baseline, bare relay** -- an aiohttp endpoint that, on POST, forwards the body to the
  same receiver with an aiohttp client and then answers: the floor for "HTTP in, HTTP out".
- **load generator** -- an aiohttp client that posts the facts and records each send time.

First the sustainable rate of firing facts is found in closed loop (``--connections``
posters, each waiting for its answer) as facts whose action reached the receiver per
second. Then facts are posted open-loop (sent on a fixed schedule, whatever the answers) at
half that rate (``--rate`` overrides) for ``--seconds``, alternately to gatekeeper and to the
relay, ``--runs`` times; latency is sent -> received on the machine's clock (both processes
on one host). Target: gatekeeper's p99 under 25 ms; every fact delivered exactly once; no
failed delivery attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (
    BENCH_TARGET,
    Targets,
    add_strict_options,
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
    free_port,
    percentile,
    serve_app,
    start_process,
    write_gatekeeper_setup,
)

LAT_PROJECT = "lat"
TARGET_P99_MS = 25.0
DRAIN_TIMEOUT_S = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="generated rules (never fire)")
    parser.add_argument("--channels", type=int, default=1024, help="facts posted round-robin")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per open-loop run")
    parser.add_argument("--runs", type=int, default=3, help="open-loop runs per figure (median)")
    parser.add_argument(
        "--probe-seconds", type=float, default=5.0, help="seconds of closed-loop rate finding"
    )
    parser.add_argument(
        "--connections", type=int, default=16, help="concurrent posters when finding the rate"
    )
    parser.add_argument(
        "--rate", type=float, help="facts/s for the open-loop runs (default: half the found rate)"
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["info", "warning"],
        help="the daemon's log level (info logs every firing and delivery)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    add_strict_options(parser)
    # Internal modes: this file is also the receiver, the relay and the load generator.
    parser.add_argument("--serve-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--forward-to", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--load-spec", metavar="FILE", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The receiver and the relay (their own processes)


def serve_receiver(port: int) -> None:
    """Record ``(arrival time, raw body)`` of every POST; ``GET /records`` hands them over
    (parsed: a gatekeeper webhook's ``firing_id`` and ``fired_at``, or a relayed fact's
    channel and ``j``) and forgets them."""
    from aiohttp import web

    records: list[tuple[float, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        records.append((time.time(), raw))
        return web.json_response({"ok": True})

    async def drain(request: web.Request) -> web.Response:
        out: list[dict[str, Any]] = []
        for got, raw in records:
            body = json.loads(raw)
            if "firing_id" in body:
                out.append({"got": got, "firing_id": body["firing_id"], "at": body["fired_at"]})
            else:
                out.append({"got": got, "fact": [body["id"], body["data"]["j"]]})
        records.clear()
        return web.json_response(out)

    app = web.Application()
    app.router.add_get("/records", drain)
    app.router.add_post("/{tail:.*}", hook)
    serve_app(app, port)


def serve_relay(port: int, forward_to: str) -> None:
    """Baseline: on ``POST /v1/facts``, forward the body to ``forward_to`` with one shared
    aiohttp client session, then answer."""
    import aiohttp
    from aiohttp import web

    async def post_facts(request: web.Request) -> web.Response:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {"Content-Type": "application/json"}
        async with session.post(forward_to, data=body, headers=headers) as response:
            await response.read()
            status = response.status
        return web.json_response({"accepted": 1, "forwarded": status})

    async def client(app: web.Application) -> Any:
        app["session"] = aiohttp.ClientSession()
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_post("/v1/facts", post_facts)
    serve_app(app, port)


# ---------------------------------------------------------------------------------------------
# The load generator (its own process)


def fact_body(channel: int, j: int) -> dict[str, Any]:
    """The fact that sets channel ``channel`` to ``j`` (one rule of the pair fires)."""
    return {"project": LAT_PROJECT, "kind": "signal", "id": f"c{channel}", "data": {"j": j}}


async def load(url: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Post facts as ``spec`` says and return every send.

    ``spec``: ``mode`` (``closed``: ``connections`` posters, each on its own channels, each
    waiting for its answer; ``open``: one send every ``1/rate`` s whatever the answers),
    ``seconds``, and ``next_j`` (the next ``j`` of each channel). Returns ``{"sends":
    [[channel, j, sent, answered, ok], ...], "next_j": [...], "elapsed": s}`` (times are
    ``time.time()``).
    """
    import aiohttp

    next_j: list[int] = list(spec["next_j"])
    channels = len(next_j)
    sends: list[list[Any]] = []
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(channel: int) -> None:
            j = next_j[channel]
            next_j[channel] += 1
            body = json.dumps(fact_body(channel, j))
            sent = time.time()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            sends.append([channel, j, sent, time.time(), ok])

        started = time.perf_counter()
        deadline = started + float(spec["seconds"])
        if spec["mode"] == "closed":
            connections = int(spec["connections"])

            async def poster(worker: int) -> None:
                mine = list(range(worker, channels, connections))
                i = 0
                while time.perf_counter() < deadline:
                    await post(mine[i % len(mine)])
                    i += 1

            await asyncio.gather(*(poster(w) for w in range(min(connections, channels))))
        else:
            interval = 1.0 / float(spec["rate"])
            tasks: list[asyncio.Task[None]] = []
            i = 0
            while True:
                due = started + i * interval
                if due >= deadline:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(post(i % channels)))
                i += 1
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {"sends": sends, "next_j": next_j, "elapsed": elapsed}


# ---------------------------------------------------------------------------------------------
# Setup


def latency_rules_yaml(channels: int) -> str:
    """Two ``each_time`` rules per channel whose gates alternate as ``j`` counts up."""
    lines = []
    for c in range(channels):
        for name, parity in (("odd", 1), ("even", 0)):
            lines += [
                f"- id: {LAT_PROJECT}/c{c}-{name}",
                f"  project: {LAT_PROJECT}",
                f"  when: 'signal[\"c{c}\"].j % 2 == {parity}'",
                "  fire: each_time",
                "  actions:",
                f"    - notify: {{target: {BENCH_TARGET},",
                '                message: "${rule_id} at ${fired_at}"}',
            ]
    return "\n".join(lines) + "\n"


def start_gatekeeper(folder: Path, args: argparse.Namespace, receiver_port: int) -> Server:
    config, port = write_gatekeeper_setup(
        folder,
        args.rules,
        time_rules=False,
        target_url=f"http://{HOST}:{receiver_port}/hook",
        delivery="{max_attempts: 3, timeout_s: 10}",
    )
    (folder / "rules" / "latency.yaml").write_text(
        latency_rules_yaml(args.channels), encoding="utf-8"
    )
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config)]
    command += ["--log-level", args.log_level]
    server = start_process("gatekeeper", command, port, folder / "gatekeeper.log", env=daemon_env())
    server.wait_ready("/healthz")
    return server


def start_helper(name: str, folder: Path, *mode: str) -> Server:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), *mode, str(port)]
    server = start_process(name, command, port, folder / f"{name}.log")
    server.wait_ready("/healthz")
    return server


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Arrival:
    """One request at the receiver, mapped back to the fact (channel, j) that caused it."""

    got: float
    fact: tuple[int, int] | None
    decided: float | None = None
    """The decision's time (gatekeeper's ``fired_at``), ``time.time()`` seconds."""


@dataclass
class Phase:
    """One load phase against one server: every send and every arrival it caused."""

    sends: list[list[Any]]
    arrivals: list[Arrival]
    elapsed: float
    cpu_s: float | None = None
    unmatched: int = 0

    @property
    def posted(self) -> int:
        return sum(1 for s in self.sends if s[4])

    @property
    def errors(self) -> int:
        return sum(1 for s in self.sends if not s[4])


@dataclass
class Figures:
    """Latency percentiles (ms) of one phase, and how its facts were delivered."""

    p50: float
    p99: float
    max: float
    facts: int
    delivered_once: int
    missing: int
    duplicates: int
    to_decision_p50: float | None = None
    to_decision_p99: float | None = None
    from_decision_p50: float | None = None
    from_decision_p99: float | None = None
    cpu_ms_per_fact: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def channel_of(fact_id: str) -> int:
    return int(fact_id.removeprefix("c"))


def fact_of_firing(firing_id: str) -> tuple[int, int]:
    """``lat/c7-odd#3`` -> (7, 5): firing ``#k`` of ``-odd`` is ``j = 2k-1``, of ``-even``
    ``j = 2k-2`` (each channel is posted ``j = 0, 1, 2, ...`` in order)."""
    rule_id, _, number = firing_id.rpartition("#")
    channel, _, parity = rule_id.removeprefix(f"{LAT_PROJECT}/").rpartition("-")
    k = int(number)
    return channel_of(channel), (2 * k - 1 if parity == "odd" else 2 * k - 2)


def drain_receiver(receiver: Server) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://{HOST}:{receiver.port}/records", timeout=30) as r:
        records: list[dict[str, Any]] = json.loads(r.read())
    return records


def run_phase(
    server: Server, receiver: Server, spec: dict[str, Any], folder: Path, gatekeeper: bool
) -> tuple[Phase, list[int]]:
    """Run the load generator against ``server``, then wait until every posted fact's
    delivery arrived (or ``DRAIN_TIMEOUT_S``); returns the phase and the channels' next j."""
    spec_path = folder / "load-spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "--load", server.url]
    command += ["--load-spec", str(spec_path)]
    cpu_before = cpu_seconds(server.process.pid)
    done = subprocess_run(command)
    result = json.loads(done.strip().splitlines()[-1])
    sends: list[list[Any]] = result["sends"]
    wanted = sum(1 for s in sends if s[4])
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        records += drain_receiver(receiver)
        if len(records) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.2)  # a late duplicate would show up here
    records += drain_receiver(receiver)
    cpu_after = cpu_seconds(server.process.pid)
    arrivals: list[Arrival] = []
    unmatched = 0
    for record in records:
        if gatekeeper and "firing_id" in record:
            if not str(record["firing_id"]).startswith(f"{LAT_PROJECT}/"):
                unmatched += 1
                continue
            # fired_at is truncated to the millisecond: take the middle of that millisecond
            at = datetime.fromisoformat(record["at"].replace("Z", "+00:00")).timestamp()
            decided = at + 0.0005
            arrivals.append(Arrival(record["got"], fact_of_firing(record["firing_id"]), decided))
        elif not gatekeeper and "fact" in record:
            fact_id, j = record["fact"]
            arrivals.append(Arrival(record["got"], (channel_of(fact_id), int(j))))
        else:
            unmatched += 1
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    phase = Phase(sends, arrivals, result["elapsed"], cpu, unmatched)
    return phase, list(result["next_j"])


def subprocess_run(command: list[str]) -> str:
    import subprocess

    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"load generator failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def figures(phase: Phase) -> Figures:
    """Match arrivals to sends: sent -> received latency, and exactly-once accounting."""
    sent_at = {(s[0], s[1]): s[2] for s in phase.sends if s[4]}
    seen: Counter[tuple[int, int]] = Counter(a.fact for a in phase.arrivals if a.fact)
    latencies: list[float] = []
    to_decision: list[float] = []
    from_decision: list[float] = []
    for arrival in phase.arrivals:
        if arrival.fact is None or arrival.fact not in sent_at or seen[arrival.fact] > 1:
            continue
        sent = sent_at[arrival.fact]
        latencies.append((arrival.got - sent) * 1000)
        if arrival.decided is not None:
            to_decision.append((arrival.decided - sent) * 1000)
            from_decision.append((arrival.got - arrival.decided) * 1000)
    latencies.sort()
    to_decision.sort()
    from_decision.sort()
    once = sum(1 for key in sent_at if seen[key] == 1)
    duplicates = sum(1 for key, n in seen.items() if n > 1 or key not in sent_at)
    posted = len(sent_at)
    return Figures(
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        max=latencies[-1] if latencies else float("nan"),
        facts=posted,
        delivered_once=once,
        missing=sum(1 for key in sent_at if seen[key] == 0),
        duplicates=duplicates,
        to_decision_p50=percentile(to_decision, 0.50) if to_decision else None,
        to_decision_p99=percentile(to_decision, 0.99) if to_decision else None,
        from_decision_p50=percentile(from_decision, 0.50) if from_decision else None,
        from_decision_p99=percentile(from_decision, 0.99) if from_decision else None,
        cpu_ms_per_fact=phase.cpu_s * 1000 / posted if phase.cpu_s and posted else None,
    )


def sustained_rate(phase: Phase) -> tuple[float, float]:
    """(facts answered per second, facts whose action arrived per second: from the first
    send to the last arrival) of a closed-loop phase."""
    answered = phase.posted / phase.elapsed
    if not phase.arrivals or not phase.sends:
        return answered, 0.0
    first = min(s[2] for s in phase.sends)
    last = max(a.got for a in phase.arrivals)
    delivered = len({a.fact for a in phase.arrivals if a.fact})
    return answered, delivered / max(1e-9, last - first)


def delivery_failures(database: Path) -> tuple[int, int, Counter[str]]:
    """(failed attempts, attempts, outbox rows by status) in the daemon's database, read
    after it stopped."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        attempts = db.execute("SELECT count(*) FROM delivery_attempts").fetchone()[0]
        failed = db.execute(
            "SELECT count(*) FROM delivery_attempts"
            " WHERE status_code IS NULL OR status_code < 200 OR status_code >= 300"
        ).fetchone()[0]
        statuses = Counter(
            {row[0]: row[1] for row in db.execute("SELECT status, count(*) FROM outbox GROUP BY 1")}
        )
    finally:
        db.close()
    return int(failed), int(attempts), statuses


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def run(args: argparse.Namespace) -> int:
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    print(machine_header("bench_latency: fact posted -> action received, over HTTP"))
    print(
        f"   {args.rules:,} generated rules (never fire) + {2 * args.channels:,} firing rules "
        f"over {args.channels} channels; every fact fires exactly one notify to a webhook"
    )
    print(
        f"   rate finding: closed loop, {args.connections} posters, {args.probe_seconds:g} s; "
        f"then {args.runs} interleaved open-loop runs of {args.seconds:g} s; daemon log level "
        f"{args.log_level}"
    )
    folder = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-latency-"))
    started = time.perf_counter()
    servers: list[Server] = []
    gk_next = [0] * args.channels
    relay_next = [0] * args.channels
    try:
        receiver = start_helper("receiver", folder, "--serve-receiver")
        servers.append(receiver)
        t0 = time.perf_counter()
        gatekeeper = start_gatekeeper(folder, args, receiver.port)
        servers.append(gatekeeper)
        print(f"   gatekeeper started in {time.perf_counter() - t0:.1f} s")
        forward = f"http://{HOST}:{receiver.port}/relayed"
        relay = start_helper("relay", folder, "--forward-to", forward, "--serve-relay")
        servers.append(relay)

        def phase(server: Server, spec: dict[str, Any]) -> Phase:
            nonlocal gk_next, relay_next
            is_gk = server is gatekeeper
            spec["next_j"] = gk_next if is_gk else relay_next
            result, next_j = run_phase(server, receiver, spec, folder, is_gk)
            if is_gk:
                gk_next = next_j
            else:
                relay_next = next_j
            return result

        closed = {"mode": "closed", "connections": args.connections}
        # warm-up: connections, caches, the first firing of every rule pair
        phase(gatekeeper, {**closed, "seconds": 1.0})
        phase(relay, {**closed, "seconds": 1.0})
        probes = {
            "gatekeeper": phase(gatekeeper, {**closed, "seconds": args.probe_seconds}),
            "relay": phase(relay, {**closed, "seconds": args.probe_seconds}),
        }
        rates = {name: sustained_rate(p) for name, p in probes.items()}
        rate = args.rate or rates["gatekeeper"][1] / 2
        open_spec = {"mode": "open", "rate": rate, "seconds": args.seconds}
        runs: dict[str, list[Figures]] = {"gatekeeper": [], "relay": []}
        for _ in range(args.runs):
            runs["relay"].append(figures(phase(relay, dict(open_spec))))
            runs["gatekeeper"].append(figures(phase(gatekeeper, dict(open_spec))))
        for server in servers:
            server.stop()
        failed, attempts, statuses = delivery_failures(folder / "gatekeeper.db")
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print("\n-- sustainable rate, closed loop (facts whose action reached the receiver)")
    print(
        table(
            ["what", "facts answered/s", "actions received/s", "server CPU ms/fact"],
            [
                [
                    "baseline: bare relay (HTTP in, HTTP out)",
                    fmt(rates["relay"][0]),
                    fmt(rates["relay"][1]),
                    ms(figures(probes["relay"]).cpu_ms_per_fact),
                ],
                [
                    "gatekeeper: POST /v1/facts -> notify webhook",
                    fmt(rates["gatekeeper"][0]),
                    fmt(rates["gatekeeper"][1]),
                    ms(figures(probes["gatekeeper"]).cpu_ms_per_fact),
                ],
            ],
        )
    )
    print(
        f"\n-- open loop at {fmt(rate)} facts/s"
        f"{' (--rate)' if args.rate else ' (half the rate found)'}, latency sent -> received,"
        f" medians of {args.runs} runs of {args.seconds:g} s"
    )
    rows = []
    for name, label in (
        ("relay", "baseline: bare relay"),
        ("gatekeeper", "gatekeeper: fact -> notify delivered"),
    ):
        fs = runs[name]
        rows.append(
            [
                label,
                f"{sum(f.facts for f in fs):,}",
                ms(median([f.p50 for f in fs])),
                ms(median([f.p99 for f in fs])),
                spread([f.p99 for f in fs]),
                ms(median([f.max for f in fs])),
                f"{sum(f.delivered_once for f in fs):,}",
                str(sum(f.missing for f in fs)),
                str(sum(f.duplicates for f in fs)),
                ms(median([f.cpu_ms_per_fact or 0.0 for f in fs])),
            ]
        )
    gk = runs["gatekeeper"]
    to_p50 = [f.to_decision_p50 for f in gk if f.to_decision_p50 is not None]
    to_p99 = [f.to_decision_p99 for f in gk if f.to_decision_p99 is not None]
    from_p50 = [f.from_decision_p50 for f in gk if f.from_decision_p50 is not None]
    from_p99 = [f.from_decision_p99 for f in gk if f.from_decision_p99 is not None]
    if to_p50 and from_p50:
        rows.append(
            [
                "  of which sent -> decided",
                "",
                ms(median(to_p50)),
                ms(median(to_p99)),
                spread(to_p99),
            ]
            + [""] * 5
        )
        rows.append(
            ["  of which decided -> received", "", ms(median(from_p50)), ms(median(from_p99))]
            + [spread(from_p99)]
            + [""] * 5
        )
    print(
        table(
            [
                "what",
                "facts",
                "p50 ms",
                "p99 ms",
                f"p99 min..max of {args.runs}",
                "max ms",
                "delivered once",
                "missing",
                "duplicated",
                "CPU ms/fact",
            ],
            rows,
        )
    )
    gk_p99 = median([f.p99 for f in gk])
    relay_p99 = median([f.p99 for f in runs["relay"]])
    errors = sum(p.errors for p in probes.values())
    print(
        f"\n   gatekeeper p99 ÷ relay p99: {gk_p99 / relay_p99:.1f}x; "
        f"p50: {median([f.p50 for f in gk]) / median([f.p50 for f in runs['relay']]):.1f}x"
    )
    print(
        "   'decided' is the decision's time (fired_at, truncated to the millisecond, so "
        "+0.5 ms): sent -> decided\n   is the HTTP request, queueing and planning; decided -> "
        "received is the commit, the outbox dispatcher and the webhook request"
    )
    print(
        f"   gatekeeper deliveries: {attempts:,} attempts, {failed} failed; outbox: "
        + ", ".join(f"{n:,} {status}" for status, n in sorted(statuses.items()))
    )
    missing = sum(f.missing for f in gk)
    duplicates = sum(f.duplicates for f in gk)
    if errors:
        print(f"   WARNING: {errors} posts failed during rate finding")
    targets.check("gatekeeper p99 ms, fact posted -> action received", gk_p99, "<=", TARGET_P99_MS)
    targets.check("gatekeeper failed delivery attempts", failed, "<=", 0)
    targets.check("gatekeeper facts not delivered exactly once", missing + duplicates, "<=", 0)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time{_load_at_end()}")
    return targets.exit_code()


def _load_at_end() -> str:
    """``; load average <1 min> <5 min> at the end`` (other work during the run shows)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return ""
    return f"; load average {one:.2f} (1 min), {five:.2f} (5 min) at the end"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_receiver is not None:
        serve_receiver(args.serve_receiver)
        return 0
    if args.serve_relay is not None:
        serve_relay(args.serve_relay, args.forward_to)
        return 0
    if args.load is not None:
        spec = json.loads(Path(args.load_spec).read_text(encoding="utf-8"))
        print(json.dumps(asyncio.run(load(args.load, spec))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
