"""Amounts returned to an escrow through the real daemon, HTTP API and SQLite file: a
cancelled release or a failed settlement tries the releases blocked on its escrow again at
once (trigger ``return``), and ``gatekeeper backtest`` replays the returns: the self-check
reproduces a history where later releases fit only thanks to them, and a candidate's
diff counts a cancelled or failed release as such; a cancelled release the bank settled
anyway (reclaim) counts against the escrow again, live and in the replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from .conftest import Project, Running, fact
from .test_backtest import backtest, candidate, replace_in
from .test_ledger_http import Bank, _cancel, _settle, _status_of
from .test_ledger_http import bank as bank  # the fixture
from .test_money import release_rule

LIMIT = "100.00"


async def _deployed(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any, **amounts: str
) -> tuple[Project, Running]:
    """Rules r<n> release ``amounts`` from one escrow of limit ``LIMIT`` when milestone
    m<n> is approved; alerts go to ``ci``; the bank's ``Retry-After`` is followed up to
    30 s (a release it answers ``wait`` stays pending)."""
    project = project_factory(bank.url, alert_target="ci")
    text = project.config_path.read_text()
    text = text.replace("backoff_cap_s: 0.2", "backoff_cap_s: 30")
    project.config_path.write_text(text.replace('limit: "20000.00"', f'limit: "{LIMIT}"'))
    for name, amount in amounts.items():
        project.write_rule(f"{name}.yaml", release_rule(int(name[1:]), amount))
    gk: Running = await start_daemon(project)
    return project, gk


async def _approve(gk: Running, n: int) -> None:
    await asyncio.sleep(0.005)  # one step per millisecond: the history's order is its times
    status, body = await gk.post("/v1/facts", fact("milestone", f"m{n}", status="approved"))
    assert status == 200, body


async def _release_of(gk: Running, n: int) -> str | None:
    _, actions = await gk.get("/v1/actions?limit=1000")
    found = [
        a["action_id"]
        for a in actions["actions"]
        if a["kind"] == "release" and a["rule_id"] == f"tower-a/release-{n}"
    ]
    return found[0] if found else None


async def _decisions(gk: Running, n: int) -> list[tuple[str, str]]:
    _, body = await gk.get(f"/v1/rules/tower-a/release-{n}?limit=20")
    found = [(d["trigger"], d["outcome"]) for d in reversed(body["recent_decisions"])]
    return [d for d in found if d[0] != "reload"]  # the start's: not met


async def _reconciled(gk: Running) -> dict[str, Any]:
    """The escrow's figures, checked against the sum of its movements. The two are read
    apart (a delivery may add a ``send`` meanwhile): the figures are taken between two
    equal readings of the movements, so both are of one ledger state."""
    for _ in range(50):
        _, before = await gk.get("/v1/escrows/tower-a-escrow/entries")
        _, body = await gk.get("/v1/escrows")
        _, page = await gk.get("/v1/escrows/tower-a-escrow/entries")
        if page == before:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the ledger kept moving: no two equal readings of its entries")
    [account] = body["escrows"]
    sums: dict[str, Decimal] = {}
    sent_ids = {e["release_id"] for e in page["entries"] if e["movement"] == "send"}
    for e in page["entries"]:
        name = e["movement"]
        if name == "fail" and e["release_id"] not in sent_ids:
            name = "fail unsent"  # a dead letter the bank failed
        sums[name] = sums.get(name, Decimal(0)) + Decimal(e["amount"])

    def of(name: str) -> Decimal:
        return sums.get(name, Decimal(0))

    reserved = of("reserve") + of("reclaim") - of("send") - of("cancel") - of("fail unsent")
    sent = of("send") - of("settle") - of("fail")
    assert Decimal(account["reserved"]) == reserved
    assert Decimal(account["sent"]) == sent
    assert Decimal(account["settled"]) == of("settle")
    assert Decimal(account["returned"]) == of("return") - of("reclaim")
    assert of("return") == of("cancel") + of("fail") + of("fail unsent")
    assert Decimal(account["remaining"]) == Decimal(LIMIT) - (reserved + sent + of("settle"))
    return dict(account)


async def test_a_cancel_fires_a_release_blocked_on_its_escrow_at_once(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    bank.script["/bank"] = ["wait"]  # A waits for a retry 30 s away: pending
    _, gk = await _deployed(project_factory, bank, start_daemon, r1="80.00", r2="50.00")
    await _approve(gk, 1)
    first = await _release_of(gk, 1)
    assert first is not None
    await bank.wait_for("/bank", 1)
    await _status_of(gk, first, "pending")
    await _approve(gk, 2)
    assert await _release_of(gk, 2) is None
    assert await _decisions(gk, 2) == [("fact", "blocked")]
    status, body = await _cancel(gk, first)
    assert status == 200, body
    # B fired in the cancel's own write: its release is there when the cancel answers
    second = await _release_of(gk, 2)
    assert second is not None
    assert await _decisions(gk, 2) == [("fact", "blocked"), ("return", "fired")]
    await bank.wait_for("/bank", 2)
    assert [(b["release_id"], b["amount"]) for b in bank.bodies("/bank")] == [
        (first, "80.00"),
        (second, "50.00"),
    ]
    await _status_of(gk, second, "delivered")
    account = await _reconciled(gk)
    assert (account["sent"], account["returned"], account["remaining"]) == (
        "50.00",
        "80.00",
        "50.00",
    )
    _, audit = await gk.get("/v1/audit?kind=decision&rule=tower-a/release-2")
    assert [e["trigger"] for e in audit["entries"]][:1] == ["return"]


async def test_a_failed_settlement_fires_a_blocked_release_and_one_that_still_does_not_fit_waits(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    _, gk = await _deployed(project_factory, bank, start_daemon, r1="80.00", r2="50.00", r3="90.00")
    await _approve(gk, 1)
    first = await _release_of(gk, 1)
    assert first is not None
    await _status_of(gk, first, "delivered")
    await _approve(gk, 2)
    await _approve(gk, 3)
    assert await _decisions(gk, 2) == [("fact", "blocked")]
    alerts = len([b for b in bank.bodies("/ci") if b.get("alert") == "release_blocked"])
    status, body = await _settle(gk, first, "failed", "msg-1")
    assert status == 200, body
    second = await _release_of(gk, 2)
    assert second is not None
    await _status_of(gk, second, "delivered")
    assert await _decisions(gk, 2) == [("fact", "blocked"), ("return", "fired")]
    # r3 (90.00) does not fit after r2 took 50.00: it stays blocked, no new decision, no
    # new alert
    assert await _decisions(gk, 3) == [("fact", "blocked")]
    await asyncio.sleep(0.2)
    assert len([b for b in bank.bodies("/ci") if b.get("alert") == "release_blocked"]) == alerts
    _, rule = await gk.get("/v1/rules/tower-a/release-3")
    assert rule["state"] == "blocked" and "exceeds" in rule["blocked"]
    account = await _reconciled(gk)
    assert (account["sent"], account["returned"], account["remaining"]) == (
        "50.00",
        "80.00",
        "50.00",
    )


async def _record(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> tuple[Project, Running]:
    """A history where releases fit only thanks to returns: r1 (80) pending, r4 (50)
    blocked; r1 cancelled -> r4 fires (trigger return); r2 (40) sent; r3 (30) blocked;
    r2's settlement fails -> r3 fires; r5 (20) then fits (80 of 100 committed)."""
    bank.script["/bank"] = ["wait"]
    project, gk = await _deployed(
        project_factory,
        bank,
        start_daemon,
        r1="80.00",
        r2="40.00",
        r3="30.00",
        r4="50.00",
        r5="20.00",
    )
    await _approve(gk, 1)
    first = await _release_of(gk, 1)
    assert first is not None
    await bank.wait_for("/bank", 1)
    await _status_of(gk, first, "pending")
    await _approve(gk, 4)
    await asyncio.sleep(0.005)
    status, body = await _cancel(gk, first)
    assert status == 200, body
    await _approve(gk, 2)
    second = await _release_of(gk, 2)
    assert second is not None
    await _status_of(gk, second, "delivered")
    await _approve(gk, 3)
    await asyncio.sleep(0.005)
    status, body = await _settle(gk, second, "failed", "msg-2")
    assert status == 200, body
    await _approve(gk, 5)
    for n, outcomes in {
        1: [("fact", "fired")],
        2: [("fact", "fired")],
        3: [("fact", "blocked"), ("return", "fired")],
        4: [("fact", "blocked"), ("return", "fired")],
        5: [("fact", "fired")],
    }.items():
        assert await _decisions(gk, n) == outcomes, n
    account = await _reconciled(gk)
    assert (account["returned"], account["remaining"]) == ("120.00", "0.00")
    return project, gk


async def test_the_backtest_replays_cancels_and_failed_settlements(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any, tmp_path: Path
) -> None:
    project, gk = await _record(project_factory, bank, start_daemon)
    database = project.root / "state" / "gatekeeper.db"
    code, out = await backtest(project, "--self-check", "--database", str(database))
    assert code == 0, out
    assert "decisions reproduced" in out
    code, out = await backtest(
        project, "--self-check", "--database", str(database), "--format", "json"
    )
    check = json.loads(out)
    assert check["ok"] and check["decisions"] == check["reproduced"] > 0, check

    # the same rules: no difference; the cancelled and failed releases count as such
    rules = candidate(project, tmp_path)
    base = ["--rules", str(rules), "--database", str(database), "--format", "json"]
    code, out = await backtest(project, *base)
    report = json.loads(out)
    assert code == 0, report
    assert (report["added"], report["gone"], report["changed"]) == ([], [], [])
    assert report["skipped"].get("return", 0) == 0
    assert report["escrows"] == [
        {
            "escrow": "tower-a-escrow",
            "currency": "USD",
            "recorded": "100.00",
            "replayed": "100.00",
            "delta": "0.00",
        }
    ]

    # r1 releases 90.00 instead: the cancel names the same firing, so it returns the
    # candidate's 90.00 and r4 fires at the cancel as recorded; the amount is a change of
    # a cancelled release, the escrow's total the same
    rules = candidate(project, tmp_path, lambda r: replace_in(r / "r1.yaml", '"80.00"', '"90.00"'))
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert (report["added"], report["gone"]) == ([], []), report
    # r4's blocked firing says what was left: 10.00 now
    changed, blocked = report["changed"]
    assert blocked["rule"] == "tower-a/release-4" and "10.00 of 100.00" in str(blocked)
    assert changed["rule"] == "tower-a/release-1"
    assert {(c["field"], c["old"], c["new"]) for c in changed["changes"]} == {
        ("release actions[0].payload.amount", "80.00", "90.00"),
        (
            "actions[1].payload.message",
            "released 80.00 to builder-1",
            "released 90.00 to builder-1",
        ),
    }
    assert report["escrows"][0]["delta"] == "0.00"

    # without r1 the cancel names a release the candidate never made: nothing returns
    # (counted as skipped); r4 fits at its own fact (its blocked firing there fires, its
    # firing at the cancel is gone); r1's recorded release is gone, and released nothing
    def drop_r1(r: Path) -> None:
        (r / "r1.yaml").unlink()

    rules = candidate(project, tmp_path, drop_r1)
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 1, report
    assert report["skipped"]["return"] == 1
    assert report["added"] == []
    r1, r4 = report["gone"]
    assert (r1["rule"], r1["outcome"]) == ("tower-a/release-1", "fired")
    assert [(a["kind"], a["status"]) for a in r1["actions"]] == [
        ("release", "cancelled"),
        ("notify", "queued"),
    ]
    assert (r4["rule"], r4["outcome"]) == ("tower-a/release-4", "fired")
    assert report["changed"] == []
    [unblocked] = report["blocks"]
    assert (unblocked["rule"], unblocked["change"]) == ("tower-a/release-4", "no_longer_blocked")
    code, out = await backtest(project, "--rules", str(rules), "--database", str(database))
    assert code == 1 and "skipped: 1 return of a release the candidate does not make" in out
    # what the escrow released is the same: r1's release was cancelled
    assert [(e["recorded"], e["replayed"]) for e in report["escrows"]] == [("100.00", "100.00")]
    await gk.stop()


async def test_a_reclaim_counts_against_the_escrow_again_live_and_in_the_backtest(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any, tmp_path: Path
) -> None:
    # limit 100.00: r1 (80) waits for a retry and is cancelled, r2 (50) fires on the
    # return; the bank then settles r1 anyway (reclaim: 130.00 committed, overdrawn), so
    # r3 (10) is blocked; the backtest must see the same
    bank.script["/bank"] = ["wait"]
    project, gk = await _deployed(
        project_factory, bank, start_daemon, r1="80.00", r2="50.00", r3="10.00"
    )
    await _approve(gk, 1)
    first = await _release_of(gk, 1)
    assert first is not None
    await _status_of(gk, first, "pending")
    assert (await _cancel(gk, first))[0] == 200
    await _approve(gk, 2)
    assert await _release_of(gk, 2) is not None
    await asyncio.sleep(0.005)
    status, body = await _settle(gk, first, "settled", "msg-late")
    assert status == 200 and body["entries"][0]["movement"] == "reclaim", body
    await _approve(gk, 3)
    assert await _release_of(gk, 3) is None
    assert await _decisions(gk, 3) == [("fact", "blocked")]
    account = await _reconciled(gk)
    assert (account["settled"], account["returned"], account["remaining"]) == (
        "80.00",
        "0.00",
        "-30.00",
    )
    database = project.root / "state" / "gatekeeper.db"
    code, out = await backtest(project, "--self-check", "--database", str(database))
    assert code == 0, out
    # the same rules: no difference, r1 counted as released (the bank paid it)
    rules = candidate(project, tmp_path)
    code, out = await backtest(
        project, "--rules", str(rules), "--database", str(database), "--format", "json"
    )
    report = json.loads(out)
    assert code == 0, report
    assert (report["added"], report["gone"], report["changed"]) == ([], [], [])
    assert [(e["recorded"], e["replayed"]) for e in report["escrows"]] == [("130.00", "130.00")]
    await gk.stop()


async def test_a_dead_letter_the_bank_failed_fires_a_blocked_release_and_replays(
    project_factory: Callable[..., Project], bank: Bank, start_daemon: Any
) -> None:
    # limit 100.00: r1 (80) refused by the bank (dead), r2 (50) blocked; the bank then
    # says r1 failed: its amount returns, never sent, and r2 fires at the return
    bank.script["/bank"] = [422]
    project, gk = await _deployed(project_factory, bank, start_daemon, r1="80.00", r2="50.00")
    await _approve(gk, 1)
    first = await _release_of(gk, 1)
    assert first is not None
    await _status_of(gk, first, "dead")
    await _approve(gk, 2)
    assert await _decisions(gk, 2) == [("fact", "blocked")]
    await asyncio.sleep(0.005)
    status, body = await _settle(gk, first, "failed", "msg-dead")
    assert status == 200 and [e["movement"] for e in body["entries"]] == ["fail", "return"]
    assert await _decisions(gk, 2) == [("fact", "blocked"), ("return", "fired")]
    account = await _reconciled(gk)
    # r2 is reserved, or already sent: the bank answers at once
    committed = Decimal(account["reserved"]) + Decimal(account["sent"])
    assert (committed, account["returned"]) == (Decimal("50.00"), "80.00")
    database = project.root / "state" / "gatekeeper.db"
    code, out = await backtest(project, "--self-check", "--database", str(database))
    assert code == 0, out
    await gk.stop()
