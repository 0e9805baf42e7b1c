"""The construction example (``examples/construction/``), the README's first command: its
one command (``demo.py``: the daemon, the facts of ``facts.json``, a verifying receiver that
plays the bank) holds every expectation, and its money rails come out as the README tells
them: a new money rule fires in shadow until two admins sign it off, then its release is
sent; a backtest shows what a changed rule would have released; the self-check reproduces
every recorded decision; a release held by a bank outage is cancelled, its amount back in
the escrow and never sent; the bank's signed settlement is applied once, its replay not."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "construction"


def gatekeeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatekeeper", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_new_money_rule_checks_clean_beside_the_bundled_rules(tmp_path: Path) -> None:
    """``retention.yaml``, as the demo adds it to its copy of rules/."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (REPO / "rules").rglob("*.yaml"):
        target = rules / path.relative_to(REPO / "rules")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (rules / "tower-a" / "retention.yaml").write_text((EXAMPLE / "retention.yaml").read_text())
    result = gatekeeper("check", "-c", str(REPO / "gatekeeper.yaml"), str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("SUCCESS: 6 rules found in 4 files")


@pytest.mark.timeout(120)
def test_the_demo_holds_every_expectation_and_shows_the_money_rails() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "demo.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 90, f"the demo took {elapsed:.1f} s"  # about 20 s on an idle machine
    try:
        assert_money_rails(result.stdout, result.stderr)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- the demo's output:\n{result.stdout}") from error


def assert_money_rails(out: str, err: str) -> None:
    """What the demo's output (``out``, its log ``err``) must show."""
    assert "SUCCESS: every expectation of examples/construction/facts.json held" in out
    assert re.search(
        r"^== the status page: http://127\.0\.0\.1:\d+/ui/projects/tower-a$", out, re.M
    )
    assert not [line for line in out.splitlines() if line.startswith("FAILED")]
    # tokens (gk_ and 43 URL-safe characters) go to their holders, never printed
    assert not re.search(r"gk_[A-Za-z0-9_-]{43}", out + err)
    received = [line for line in out.splitlines() if line.startswith("[receiver]")]
    # the bundled money rules were signed off by two admins; today's release went out
    for rule in ("design", "structure", "handover"):
        assert re.search(
            rf"tower-a/{rule}-release \([0-9a-f]{{12}}\): signed off by finance-anna, "
            r"finance-ben: live",
            out,
        ), rule
    assert (
        "tower-a-escrow: limit 50000.00, reserved 0.00, sent 5000.00, settled 0.00, "
        "returned 0.00, remaining 45000.00 USD" in out
    )
    # the new money rule: shadowed until two admins sign off its content hash
    assert re.search(
        r"GET /v1/rules/tower-a/retention-release: mode awaiting_signoff, content hash "
        r"[0-9a-f]{64}, sign-offs 0 of 2",
        out,
    )
    [alert] = [line for line in received if "awaits sign-off" in line]
    assert alert.startswith(
        "[receiver] signature OK  POST /chat/site-ops: notify: gatekeeper: money rule "
        "tower-a/retention-release"
    )
    shadowed = re.findall(
        r"tower-a/retention-release\[facade\]#1: release 1500.00 USD to northside-builders "
        r"\((act_[0-9a-f]+)\)",
        out,
    )
    assert len(shadowed) == 2 and shadowed[0] == shadowed[1]  # before and after sign-off
    assert shadowed[0] in alert  # the alert names the first shadowed release
    assert "1 of 2 (finance-anna); 1 more needed" in out
    assert "2 of 2 (finance-anna, finance-ben); it runs live from its next evaluation" in out
    down = "-> 503, the bank is down"  # a release id may hold "503": match the whole mark
    releases = [
        line for line in received if "POST /bank/releases" in line and not line.endswith(down)
    ]
    assert [re.sub(r" \(release_id .*", "", line) for line in releases] == [
        "[receiver] signature OK  POST /bank/releases: release 5000.00 USD from tower-a-escrow "
        "to acme-architects",
        "[receiver] signature OK  POST /bank/releases: release 2500.00 USD from tower-a-escrow "
        "to northside-builders",
    ]
    # the backtest of net amounts: the money it would have released differently
    assert "gatekeeper backtest -c gatekeeper.yaml --rules candidate --url http" in out
    assert 'release actions[0].payload.amount: "2500.00" -> "2200.00"' in out
    assert "tower-a-escrow: 2500.00 -> 2200.00 USD (-300.00)" in out
    assert "FAILED: 0 added, 0 gone, 1 changed (--fail-on release)" in out
    reproduced = re.search(r"(\d+) of (\d+) decisions reproduced", out)
    assert reproduced and reproduced[1] == reproduced[2]
    # the bank is down: the glazing retention waits for its retry, is cancelled, never sent
    refused = [line for line in received if line.endswith(down)]
    held = {
        re.sub(r".*release 2000.00 USD .* \(release_id (act_[0-9a-f]+),.*", r"\1", line)
        for line in refused
    }
    assert len(held) == 1, refused  # one release; a retry may come before the cancel
    [glazing] = held
    assert f"{glazing}: cancelled; 2000.00 USD back in tower-a-escrow" in out
    assert f"GET /v1/actions/{glazing}: cancelled, attempts [503" in out
    assert not [line for line in received if glazing in line and not line.endswith(down)]
    assert (
        "tower-a-escrow: limit 50000.00, reserved 2000.00, sent 7500.00, settled 0.00, "
        "returned 0.00, remaining 40500.00 USD" in out
    )
    assert (
        "tower-a-escrow: limit 50000.00, reserved 0.00, sent 7500.00, settled 0.00, "
        "returned 2000.00, remaining 42500.00 USD" in out
    )
    # the bank's signed settlement of the design release; its replay applies nothing
    assert '-> HTTP 200 {"status": "settled", "applied": true, "replayed": false}' in out
    assert '-> HTTP 200 {"status": "settled", "applied": false, "replayed": true}' in out
    assert (
        "tower-a-escrow: limit 50000.00, reserved 0.00, sent 2500.00, settled 5000.00, "
        "returned 2000.00, remaining 42500.00 USD" in out
    )
    movements = re.findall(r"^ +\d+  \S+  (\w+) +([0-9.]+) USD  (act_[0-9a-f]+)", out, re.M)
    assert [(m, a) for m, a, _ in movements] == [
        ("reserve", "5000.00"),
        ("send", "5000.00"),
        ("reserve", "2500.00"),
        ("send", "2500.00"),
        ("reserve", "2000.00"),
        ("cancel", "2000.00"),
        ("return", "2000.00"),
        ("settle", "5000.00"),
    ]
    assert {r for m, _, r in movements if m in ("cancel", "return")} == {glazing}
    assert "8 movements" in out
