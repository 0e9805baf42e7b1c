"""``gatekeeper check`` and live reload over 10,000 rule files, beside a same-run baseline.

Run: ``python bench/bench_check.py`` (60 to 90 s on 2 cores); ``--help`` for the knobs.

Everything runs in a temporary directory (removed afterwards; ``--keep`` keeps it) holding
``--files`` generated rule files (one rule each: a multi-line ``when``, two or three actions,
approvals on every third) and the ``gatekeeper.yaml`` declaring the targets and escrow they
name. Measured, each figure the median of ``--runs`` interleaved runs:

1. **baseline**: in this process, for every file: read, ``yaml.load(text,
   Loader=yaml.CSafeLoader)`` and one compiled ``jsonschema.Draft202012Validator`` of
   ``schemas/rules.schema.json`` (through ``gatekeeper.schemas``) over the data. What any
   tool that parses and schema-checks these files must spend.
2. **gatekeeper check**: ``python -m gatekeeper check -c gatekeeper.yaml`` as a subprocess
   with this interpreter (wall time, everything included), and in this process
   ``gatekeeper.rules.loader.load_rules_dir(rules_dir, config)`` (CPU time), which separates the
   interpreter's start-up and imports from the work itself.
3. **reload**: ``python -m gatekeeper serve -c gatekeeper.yaml`` with those files; its
   start-up time (spawn to ``/healthz`` answering), then ``--reloads`` times: rewrite one
   file (its ``when`` changes) and poll ``GET /v1/rules/{id}`` every 5 ms until the new
   ``when`` is live. Only 127.0.0.1 is used; the API has no tokens, so it is open on loopback.

Targets (current): gatekeeper check ÷ baseline <= 1.3 (wall time, subprocess); write -> live
under 0.5 s at the worst of the reloads measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _common import Targets, add_strict_options, fmt, machine_header, median, spread, table

HOST = "127.0.0.1"
SECRET_ENV = "GATEKEEPER_BENCH_SECRET"
STARTUP_TIMEOUT_S = 300.0
LIVE_TIMEOUT_S = 60.0
POLL_S = 0.005
PROJECT = "bench"
FILES_PER_FOLDER = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="rule files (one rule each)")
    parser.add_argument("--runs", type=int, default=3, help="runs per check figure (median)")
    parser.add_argument("--reloads", type=int, default=7, help="one-file changes timed")
    parser.add_argument("--no-daemon", action="store_true", help="skip the reload part")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--profile", action="store_true", help="cProfile load_rules_dir once")
    add_strict_options(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Generated rules


def rule_text(index: int, version: int = 0) -> str:
    """Rule file ``index``: rule ``bench/r<index>`` in folder ``p<index // 1000>``.

    Every rule reads one task; every third needs one of two approvers, every second releases
    money from the escrow (its notify message may then name the release's fields), every
    fifth starts a pipeline. ``version`` changes only the ``when`` (the reload part).
    """
    task = f'task["T-{index // 5}"]'
    lines = [
        "# yaml-language-server: $schema=../../schemas/rules.schema.json",
        f"id: bench/r{index}",
        f"description: Stage {index} of the bench project, pay and tell once the task is done",
        f"project: {PROJECT}",
        "when: >",
        f'  {task}.status == "completed"',
        f"  and {task}.priority >= {index % 5 + version}",
        f"  and days_since({task}.updated_at) >= {index % 3}",
        f"fire: {'each_time' if index % 4 == 0 else 'once'}",
    ]
    if index % 3 == 0:
        lines += ["approvals:", "  required: 1", "  from: [alice@example.com, bob@example.com]"]
    lines.append("actions:")
    if index % 2 == 0:
        lines += [
            "  - release:",
            "      target: escrow-bank",
            "      escrow: bench-escrow",
            f'      amount: "{100 + index % 900}.00"',
            "      currency: USD",
            f"      payee: contractor-{index % 97}",
        ]
        message = "released ${amount} ${currency} to ${payee} (rule ${rule_id})"
    else:
        message = "rule ${rule_id} of ${project} fired"
    lines.append(f'  - notify: {{target: bench-chat, message: "{message}"}}')
    if index % 5 == 0:
        lines.append(f"  - pipeline: {{target: bench-ci, ref: main, inputs: {{stage: s{index}}}}}")
    return "\n".join(lines) + "\n"


def rule_path(rules_dir: Path, index: int) -> Path:
    return rules_dir / f"p{index // FILES_PER_FOLDER:02d}" / f"r{index:05d}.yaml"


def write_setup(folder: Path, files: int) -> tuple[Path, Path, int]:
    """The rules and ``gatekeeper.yaml`` in ``folder``: (config path, rules dir, port)."""
    rules_dir = folder / "rules"
    for index in range(files):
        path = rule_path(rules_dir, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rule_text(index), encoding="utf-8")
    port, closed = free_port(), free_port()
    config = folder / "gatekeeper.yaml"
    url = f"http://{HOST}:{closed}"
    common = f"secret_env: {SECRET_ENV}, delivery: {{max_attempts: 1}}"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen: {HOST}:{port}
            database: gatekeeper.db
            rules_dir: rules
            targets:
              escrow-bank: {{url: {url}/bank, {common}}}
              bench-chat: {{url: {url}/chat, {common}}}
              bench-ci: {{url: {url}/ci, {common}}}
            escrows:
              bench-escrow: {{currency: USD, limit: "1000000.00"}}
            """
        ),
        encoding="utf-8",
    )
    return config, rules_dir, port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------------
# Check


def bare_baseline(rules_dir: Path) -> tuple[float, float, int]:
    """Read + CSafeLoader + one compiled validator per file: (wall s, CPU s, errors)."""
    import yaml
    from jsonschema import Draft202012Validator

    from gatekeeper.schemas import load_schema

    wall0, cpu0 = time.perf_counter(), time.process_time()
    validator = Draft202012Validator(load_schema("rules.schema.json"))
    errors = 0
    paths = sorted(rules_dir.rglob("*.yaml"))
    for path in paths:
        data = yaml.load(path.read_bytes().decode("utf-8-sig"), Loader=yaml.CSafeLoader)
        errors += sum(1 for _ in validator.iter_errors(data))
    return time.perf_counter() - wall0, time.process_time() - cpu0, errors


def in_process_load(rules_dir: Path, config_path: Path) -> tuple[float, float, int]:
    """``load_rules_dir`` in this process: (wall s, CPU s, rules loaded)."""
    from gatekeeper.config import load_config
    from gatekeeper.rules.loader import load_rules_dir

    config = load_config(config_path)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = load_rules_dir(rules_dir, config)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if not result.ok:
        raise SystemExit("load_rules_dir refused the generated rules:\n" + str(result.problems[:5]))
    return wall, cpu, result.rule_count


def compile_share(rules_dir: Path) -> float:
    """CPU seconds of ``compile_condition`` over every file's ``when`` (the expression
    compiler's share of ``load_rules_dir``)."""
    import yaml

    from gatekeeper.expr import compile_condition

    paths = sorted(rules_dir.rglob("*.yaml"))
    whens = [yaml.load(p.read_text(), Loader=yaml.CSafeLoader)["when"] for p in paths]
    cpu0 = time.process_time()
    for text in whens:
        compile_condition(text)
    return time.process_time() - cpu0


def subprocess_check(folder: Path, config_path: Path) -> float:
    """Wall seconds of ``python -m gatekeeper check -c gatekeeper.yaml`` (must succeed)."""
    command = [sys.executable, "-m", "gatekeeper", "check", "-c", str(config_path)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"gatekeeper check failed ({done.returncode}):\n{done.stdout[-2000:]}")
    return wall


def interpreter_start(folder: Path) -> float:
    """Wall seconds of ``python -c 'import gatekeeper.cli.main'``: start-up and imports."""
    command = [sys.executable, "-c", "import gatekeeper.cli.main, gatekeeper.cli.check"]
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# Reload


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=LIVE_TIMEOUT_S) as response:
        return json.loads(response.read())


def start_daemon(
    folder: Path, config_path: Path, port: int
) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``gatekeeper serve``; (process, seconds from spawn to ``/healthz`` answering)."""
    env = dict(os.environ)
    env[SECRET_ENV] = "whsec_" + "A" * 43 + "="
    command = [sys.executable, "-m", "gatekeeper", "serve", "-c", str(config_path)]
    command += ["--log-level", "info"]
    log = (folder / "gatekeeper.log").open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    deadline = started + STARTUP_TIMEOUT_S
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"gatekeeper exited ({process.returncode}); see {folder}/gatekeeper.log"
            )
        try:
            http_json(f"http://{HOST}:{port}/healthz")
            return process, time.perf_counter() - started
        except (OSError, urllib.error.URLError, ValueError):
            time.sleep(0.05)
    process.kill()
    raise SystemExit("gatekeeper did not start in time")


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def time_reload(rules_dir: Path, port: int, index: int, version: int) -> float:
    """Rewrite rule file ``index`` with a new ``when``; seconds until the daemon serves it."""
    path = rule_path(rules_dir, index)
    text = rule_text(index, version)
    wanted = f"priority >= {index % 5 + version}"
    url = f"http://{HOST}:{port}/v1/rules/bench/r{index}"
    written = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: not a rule file; rename is atomic
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    deadline = written + LIVE_TIMEOUT_S
    while time.perf_counter() < deadline:
        try:
            if wanted in http_json(url)["when"]:
                return time.perf_counter() - written
        except (OSError, urllib.error.URLError, ValueError):
            pass  # a busy daemon answers late: keep asking until the deadline
        time.sleep(POLL_S)
    raise SystemExit(f"the change to {path.name} did not go live within {LIVE_TIMEOUT_S} s")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print(machine_header("bench_check: gatekeeper check and live reload over many rule files"))
    targets = Targets(strict=args.strict, strict_later=args.strict_later)
    folder = Path(tempfile.mkdtemp(prefix="gk-bench-check-"))
    try:
        config_path, rules_dir, port = write_setup(folder, args.files)
        size = sum(p.stat().st_size for p in rules_dir.rglob("*.yaml"))
        print(
            f"   {args.files:,} rule files, one rule each ({size / 1e6:.1f} MB); "
            f"{args.runs} interleaved runs per figure, medians"
        )
        bare_wall: list[float] = []
        bare_cpu: list[float] = []
        load_wall: list[float] = []
        load_cpu: list[float] = []
        check_wall: list[float] = []
        start_wall: list[float] = []
        compile_cpu: list[float] = []
        for _ in range(args.runs):
            wall, cpu, errors = bare_baseline(rules_dir)
            if errors:
                raise SystemExit(f"the generated rules have {errors} schema errors")
            bare_wall.append(wall)
            bare_cpu.append(cpu)
            check_wall.append(subprocess_check(folder, config_path))
            wall, cpu, count = in_process_load(rules_dir, config_path)
            load_wall.append(wall)
            load_cpu.append(cpu)
            start_wall.append(interpreter_start(folder))
            compile_cpu.append(compile_share(rules_dir))
        if args.profile:
            profile_load(rules_dir, config_path)
        base = median(bare_wall)
        rows = [
            ["(1) baseline: read + CSafeLoader + compiled jsonschema", fmt(base), spread(bare_wall),
             fmt(median(bare_cpu)), "1.00"],
            ["(2) python -m gatekeeper check -c gatekeeper.yaml", fmt(median(check_wall)),
             spread(check_wall), "-", f"{median(check_wall) / base:.2f}"],
            ["    load_rules_dir in process", fmt(median(load_wall)), spread(load_wall),
             fmt(median(load_cpu)), f"{median(load_wall) / base:.2f}"],
            ["      of which compile_condition (expressions)", "-", "-",
             fmt(median(compile_cpu)), f"{median(compile_cpu) / base:.2f}"],
            ["    interpreter start + imports", fmt(median(start_wall)), spread(start_wall), "-",
             f"{median(start_wall) / base:.2f}"],
        ]  # fmt: skip
        print()
        print(table(["what", "wall s (median)", "min..max", "CPU s", "÷ baseline"], rows))
        print(f"   {count:,} rules loaded; per file: baseline {base / args.files * 1e6:,.0f} µs, "
              f"gatekeeper check {median(check_wall) / args.files * 1e6:,.0f} µs")  # fmt: skip
        targets.check("gatekeeper check wall ÷ baseline", median(check_wall) / base, "<=", 1.3)
        if not args.no_daemon:
            reload_part(folder, config_path, rules_dir, port, args, targets)
    finally:
        if args.keep:
            print(f"   kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n   done in {time.perf_counter() - started:.0f} s wall time")
    return targets.exit_code()


def reload_part(
    folder: Path,
    config_path: Path,
    rules_dir: Path,
    port: int,
    args: argparse.Namespace,
    targets: Targets,
) -> None:
    print(f"\n-- live reload: gatekeeper serve with {args.files:,} rule files")
    process, startup = start_daemon(folder, config_path, port)
    try:
        print(f"   started in {startup:.2f} s (spawn to /healthz answering)")
        settled = time.perf_counter()
        http_json(f"http://{HOST}:{port}/v1/rules/bench/r0")  # after the start's first pass
        answered = time.perf_counter() - settled
        print(f"   then GET /v1/rules/bench/r0 answered in {answered:.2f} s (the first pass)")
        time.sleep(1.0)
        times = []
        for n in range(args.reloads):
            index = (n * 1237 + 11) % args.files
            times.append(time_reload(rules_dir, port, index, version=n + 1))
            time.sleep(0.3)  # let the watcher settle, so each change is timed alone
        ms = [t * 1000 for t in times]
        print(
            f"   write -> live over {len(ms)} one-file changes: p50 {fmt(median(ms))} ms, "
            f"max {fmt(max(ms))} ms (all: {', '.join(fmt(x) for x in ms)})"
        )
        targets.check("reload write -> live, max (s)", max(times), "<=", 0.5)
    finally:
        stop_daemon(process)


def profile_load(rules_dir: Path, config_path: Path) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    in_process_load(rules_dir, config_path)
    profiler.disable()
    print("\n-- cProfile of load_rules_dir (own time)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    sys.exit(main())
