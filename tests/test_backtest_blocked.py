"""``gatekeeper backtest`` when a candidate turns a recorded release into a blocked one (a
``max_amount`` lowered below the amount a fact gave), or a recorded blocked release into
one that fires (a ``max_amount`` raised): one change each, "release now blocked: <why>" /
"release no longer blocked", in text, json and github formats, and the escrow totals count
a blocked release as releasing nothing. A real daemon records the history into a real
SQLite file; the backtest replays that file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import Project, Receiver, fact
from .test_backtest import backtest, candidate, replace_in

RULES = """\
- id: tower-a/pay-invoice
  project: tower-a
  for_each: invoice
  when: item.data.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${item.data.amount}",
                max_amount: "10000.00", currency: USD, payee: acme}
    - notify: {target: ci, message: "paid ${amount} for ${item.id}"}
- id: tower-a/pay-bill
  project: tower-a
  for_each: bill
  when: item.data.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${item.data.amount}",
                max_amount: "2000.00", currency: USD, payee: builder}
"""


async def _recorded(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> tuple[Project, Path]:
    """A history: invoice i1 (1500.00) and i2 (500.00) paid, bill b1 (3000.00) blocked
    (above its max_amount 2000.00)."""
    project = project_factory(receiver.url, alert_target="finance-chat")
    project.write_rule("pay.yaml", RULES)
    gk = await start_daemon(project)
    for kind, id, amount in (("invoice", "i1", "1500.00"), ("invoice", "i2", "500.00")):
        status, _ = await gk.post("/v1/facts", fact(kind, id, status="approved", amount=amount))
        assert status == 200
    status, _ = await gk.post("/v1/facts", fact("bill", "b1", status="approved", amount="3000.00"))
    assert status == 200
    await receiver.wait_for(5)  # two releases, two notices, the alert
    await asyncio.sleep(0.1)
    return project, project.root / "state" / "gatekeeper.db"


def _candidate(project: Project, tmp_path: Path) -> Path:
    def edit(rules: Path) -> None:
        replace_in(rules / "pay.yaml", '"10000.00"', '"1000.00"')
        replace_in(rules / "pay.yaml", '"2000.00"', '"5000.00"')

    return candidate(project, tmp_path, edit)


async def test_a_release_now_blocked_or_no_longer_blocked_is_one_change(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    tmp_path: Path,
) -> None:
    project, database = await _recorded(project_factory, receiver, start_daemon)
    rules = _candidate(project, tmp_path / "c")
    argv = ["--rules", str(rules), "--database", str(database)]
    code, out = await backtest(project, *argv)
    assert code == 1, out
    lines = out.splitlines()
    at_i1, at_b1 = (_decided_at(database, f) for f in ("invoice[i1]", "bill[b1]"))
    why = (
        "release amount item.data.amount of rule tower-a/pay-invoice is '1500.00': above "
        "the release's max_amount 1000.00 (release action 1)"
    )
    assert lines[2:] == [
        "firings now blocked (1):",
        f"  ~ {at_i1} tower-a/pay-invoice[i1]#1: release now blocked: {why} (was: release "
        'escrow-bank: 1500.00 USD from tower-a-escrow to acme; notify ci: "paid 1500.00 for '
        'i1")',
        "firings no longer blocked (1):",
        f"  ~ {at_b1} tower-a/pay-bill[b1]#1: release no longer blocked (would now: release "
        "escrow-bank: 3000.00 USD from tower-a-escrow to builder)",
        "per rule:",
        "  tower-a/pay-bill[b1]: 1 no_longer_blocked",
        "  tower-a/pay-invoice[i1]: 1 now_blocked",
        "escrows (released in the window: recorded -> replayed):",
        "  tower-a-escrow: 2000.00 -> 3500.00 USD (+1500.00)",
        "FAILED: 0 added, 0 gone, 0 changed, 1 now blocked, 1 no longer blocked "
        "(--fail-on release)",
    ]

    code, out = await backtest(project, *argv, "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["fails"] is True
    assert report["added"] == report["gone"] == report["changed"] == []
    blocked, unblocked = report["blocks"]
    assert {k: blocked[k] for k in ("rule", "item", "change", "reason")} == {
        "rule": "tower-a/pay-invoice",
        "item": "i1",
        "change": "now_blocked",
        "reason": why,
    }
    assert blocked["recorded_firing_id"] == blocked["replayed_firing_id"]
    assert [(a["kind"], a["payload"].get("amount")) for a in blocked["actions"]] == [
        ("release", "1500.00"),
        ("notify", None),
    ]
    assert (unblocked["rule"], unblocked["change"]) == ("tower-a/pay-bill", "no_longer_blocked")
    assert "above the release's max_amount 2000.00" in unblocked["reason"]
    assert report["rules"]["tower-a/pay-invoice[i1]"]["now_blocked"] == 1
    assert report["rules"]["tower-a/pay-bill[b1]"]["no_longer_blocked"] == 1
    # i1's 1500.00 is no longer released, b1's 3000.00 is: 2000.00 -> 3500.00
    [escrow] = report["escrows"]
    assert (escrow["recorded"], escrow["replayed"], escrow["delta"]) == (
        "2000.00",
        "3500.00",
        "+1500.00",
    )

    code, out = await backtest(project, *argv, "--format", "github")
    assert code == 1
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    assert len(annotations) == 3, out  # the two firings and the escrow
    invoice = next(a for a in annotations if "pay-invoice" in a)
    assert invoice.startswith("::error file=")
    assert "release now blocked: " in invoice and "max_amount 1000.00" in invoice
    bill = next(a for a in annotations if "pay-bill" in a)
    assert "release no longer blocked (would now: release escrow-bank: 3000.00 USD" in bill


async def test_only_a_blocked_reason_that_changed_stays_a_change(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    tmp_path: Path,
) -> None:
    """Blocked on both sides, for another reason: a change of the reason (and the alert),
    not a block change; it moves no money, so ``--fail-on release`` passes."""
    project, database = await _recorded(project_factory, receiver, start_daemon)
    rules = candidate(
        project,
        tmp_path / "c",
        lambda r: replace_in(r / "pay.yaml", '"2000.00"', '"2500.00"'),
    )
    code, out = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 0, out
    assert "actions changed (1):" in out and "now blocked" not in out
    assert "DIFFERENCES: 0 added, 0 gone, 1 changed (--fail-on release)" in out


def _decided_at(database: Path, instance: str) -> str:
    """When the firing of ``tower-a/pay-<instance>`` was decided, as the backtest shows it."""
    kind, _, item = instance.partition("[")
    with contextlib.closing(sqlite3.connect(database)) as db:
        [(at,)] = db.execute(
            "SELECT decided_at FROM decisions WHERE firing_id = ?",
            (f"tower-a/pay-{kind}[{item}#1",),
        ).fetchall()
    return str(at)
