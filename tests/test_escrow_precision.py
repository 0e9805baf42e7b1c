"""An escrow's precision (``decimals`` in gatekeeper.yaml): the config, ``gatekeeper
check`` on literal amounts, amounts read from facts when a rule fires, and the figures the
API and ``gatekeeper escrows`` write, through the real daemon, HTTP API and SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from gatekeeper.cli.check import run_check
from gatekeeper.cli.main import main
from gatekeeper.config import ConfigError, Escrow, load_config
from gatekeeper.engine.ledger import EscrowBook, format_amount
from gatekeeper.rules.model import ReleaseAction

from .conftest import SECRET, Project, Receiver, config_text, fact

ESCROWS = """\
escrows:
  tokyo: {currency: JPY, limit: "8000000", decimals: 0}
  vault: {currency: BTC, limit: "2.5", decimals: 8}
  tower-a-escrow: {currency: USD, limit: "20000.00"}
"""


def _config(tmp_path: Path, receiver_url: str = "http://127.0.0.1:9") -> Path:
    text = config_text(receiver_url, alert_target="ci")
    text = text.replace('escrows:\n  tower-a-escrow: {currency: USD, limit: "20000.00"}\n', ESCROWS)
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(text)
    (tmp_path / "rules").mkdir(exist_ok=True)
    return path


# -- the config ------------------------------------------------------------------------------


def test_decimals_are_read_per_escrow_two_by_default(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    assert config.escrows["tokyo"] == Escrow("tokyo", "JPY", Decimal("8000000"), 0)
    assert config.escrows["vault"] == Escrow("vault", "BTC", Decimal("2.5"), 8)
    assert config.escrows["tower-a-escrow"].decimals == 2


@pytest.mark.parametrize(
    ("escrow", "where", "says"),
    [
        ('{currency: JPY, limit: "100.5", decimals: 0}', "escrows.e.limit", "has 1 decimals"),
        ('{currency: USD, limit: "100.125"}', "escrows.e.limit", "more than the escrow's"),
        ('{currency: BTC, limit: "1", decimals: 9}', "escrows.e.decimals", "9"),
        ('{currency: BTC, limit: "1", decimals: -1}', "escrows.e.decimals", "-1"),
        ('{currency: BTC, limit: "1", decimals: "2"}', "escrows.e.decimals", "'2'"),
        ('{currency: BTC, limit: "1.123456789", decimals: 8}', "escrows.e.limit", "eight"),
    ],
)
def test_a_bad_precision_or_limit_is_refused_at_its_key(
    tmp_path: Path, escrow: str, where: str, says: str
) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(f"rules_dir: rules\nescrows:\n  e: {escrow}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.path == where and problem.line == 3, problem
    assert says in problem.message


# -- gatekeeper check on literal amounts ----------------------------------------------------

RULES = """\
- id: p/yen
  project: p
  when: invoice.i1.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tokyo, amount: "1500", currency: JPY, payee: a}
- id: p/yen-cents
  project: p
  when: invoice.i2.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tokyo, amount: "1500.50", currency: JPY,
                payee: a}
- id: p/satoshi
  project: p
  when: invoice.i3.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: vault, amount: "0.00012345", currency: BTC,
                payee: a}
- id: p/dollar-cap
  project: p
  for_each: invoice
  when: item.data.status == "approved"
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "${item.data.amount}",
                max_amount: "100.555", currency: USD, payee: a}
"""


def test_check_refuses_a_literal_amount_finer_than_its_escrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(_config(tmp_path))
    monkeypatch.chdir(tmp_path)
    Path("rules/pay.yaml").write_text(RULES)
    out = io.StringIO()
    code = run_check([Path("rules/pay.yaml")], config, "text", out)
    assert code == 1
    assert out.getvalue().splitlines() == [
        "rules/pay.yaml:10:61: rule 'p/yen-cents': [1].actions[0].release.amount: amount "
        "1500.50 has 2 decimals, more than escrow 'tokyo' allows (decimals: 0, JPY)",
        "rules/pay.yaml:24:29: rule 'p/dollar-cap': [3].actions[0].release.max_amount: "
        "max_amount 100.555 has 3 decimals, more than escrow 'tower-a-escrow' allows "
        "(decimals: 2, USD)",
        "FAILED: 2 problems in 1 file",
    ]


# -- the ledger's book and figures ----------------------------------------------------------


def test_the_book_refuses_an_amount_finer_than_its_escrow() -> None:
    book = EscrowBook({"y": Escrow("y", "JPY", Decimal("1000"), 0)})
    coarse = ReleaseAction(target="t", escrow="y", amount="999", currency="JPY", payee="p")
    fine = ReleaseAction(target="t", escrow="y", amount="1.5", currency="JPY", payee="p")
    assert book.refusal(coarse) is None
    assert book.refusal(fine) == ("release of 1.5 JPY has 1 decimals, more than escrow 'y''s 0")
    book.commit("y", "999")
    over = ReleaseAction(target="t", escrow="y", amount="2", currency="JPY", payee="p")
    assert "what is left of escrow 'y': 1 of 1000 JPY" in (book.refusal(over) or "")


@pytest.mark.parametrize(
    ("amount", "decimals", "shown"),
    [
        ("500", 2, "500.00"),
        ("1500", 0, "1500"),
        ("0", 8, "0.00000000"),
        ("12.5", 2, "12.50"),
        ("1500.00", 0, "1500"),
        ("10.50", 0, "10.5"),  # recorded before the precision was lowered: never rounded
        ("0.00", 2, "0.00"),
        ("-3.1", 2, "-3.10"),
    ],
)
def test_format_amount_writes_the_precision_and_never_rounds(
    amount: str, decimals: int, shown: str
) -> None:
    assert format_amount(Decimal(amount), decimals) == shown


# -- amounts from facts, and the figures, through the daemon -------------------------------

YEN_RULE = """\
id: p/pay-yen
project: tower-a
for_each: invoice
when: item.data.status == "approved"
actions:
  - release: {target: escrow-bank, escrow: tokyo, amount: "${item.data.amount}",
              max_amount: "5000000", currency: JPY, payee: acme}
"""


async def test_a_yen_amount_with_decimals_is_blocked_and_the_figures_have_none(
    tmp_path: Path, receiver: Receiver, start_daemon: Callable[..., Any]
) -> None:
    _config(tmp_path, receiver.url)
    project = Project(tmp_path)
    project.write_rule("pay.yaml", YEN_RULE)
    gk = await start_daemon(project)
    status, _ = await gk.post(
        "/v1/facts", fact("invoice", "i1", status="approved", amount="1500.5")
    )
    assert status == 200
    [alert] = await receiver.wait_for(1)
    assert alert.path == "/ci"
    body = Webhook(SECRET).verify(alert.raw, alert.headers)
    assert "1 decimals, more than the escrow's 0" in body["message"], body
    status, _ = await gk.post("/v1/facts", fact("invoice", "i2", status="approved", amount="1500"))
    assert status == 200
    received = await receiver.wait_for(2)
    assert received[1].path == "/bank"
    assert Webhook(SECRET).verify(received[1].raw, received[1].headers)["amount"] == "1500"
    await asyncio.sleep(0.1)  # the release's send is recorded
    _, entries = await gk.get("/v1/escrows/tokyo/entries")
    moved = [(e["movement"], e["amount"]) for e in entries["entries"]]
    assert moved == [("reserve", "1500"), ("send", "1500")]  # nothing of the blocked one
    status, body = await gk.get("/v1/escrows")
    assert status == 200
    figures = {e["escrow"]: e for e in body["escrows"]}
    yen = figures["tokyo"]
    assert (yen["limit"], yen["decimals"], yen["sent"], yen["remaining"]) == (
        "8000000",
        0,
        "1500",
        "7998500",
    )
    assert (yen["reserved"], yen["settled"], yen["returned"]) == ("0", "0", "0")
    vault = figures["vault"]
    assert (vault["limit"], vault["decimals"], vault["sent"]) == ("2.50000000", 8, "0.00000000")
    assert figures["tower-a-escrow"]["remaining"] == "20000.00"

    def run(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([*argv, "-c", str(project.config_path), "--url", gk.url])
        return code, out.getvalue()

    code, out = await asyncio.to_thread(run, "escrows")
    assert code == 0
    assert "tokyo (JPY): limit 8000000, reserved 0, sent 1500, settled 0, returned 0, " in out
    assert "remaining 7998500" in out
    assert "vault (BTC): limit 2.50000000, reserved 0.00000000, sent 0.00000000" in out
