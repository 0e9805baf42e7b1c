"""``gatekeeper backtest --url`` reads a daemon's history with the wire models the daemon
encodes it with: each record type goes out (``http.models.convert``, ``encode``) and comes
back (``cli.backtest.wire`` then ``wire_record``) unchanged, and an answer that does not fit
its model is refused with where and what, through a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gatekeeper.cli.backtest import run_backtest_command, wire, wire_record
from gatekeeper.cli.main import build_parser
from gatekeeper.http import models
from gatekeeper.store.records import (
    AuditEntry,
    LedgerMovement,
    LoggedFact,
    OutboxEntry,
    RulesetSummary,
    StoredDecision,
    StoredRuleset,
)

AT = datetime(2026, 11, 2, 9, 0, 0, 123000, tzinfo=UTC)
LATER = datetime(2026, 11, 3, 10, 30, tzinfo=UTC)
HASH = "ab" * 32

RECORDS: list[tuple[Any, type[Any]]] = [
    (LoggedFact(7, "p", "invoice", "i1", {"amount": "10.00"}, AT, "req-1"), models.LoggedFact),
    (
        LoggedFact(
            8,
            "p",
            "status",
            "i1",
            {},
            AT,
            None,
            {"rule_id": "p/r", "instance": "i1", "firing_id": "p/r[i1]#1", "depth": 1},
        ),
        models.LoggedFact,
    ),
    (
        StoredDecision(
            3,
            AT,
            "p/r",
            "h",
            HASH,
            "abc",
            "fact",
            7,
            "fired",
            True,
            {},
            {"required": 1},
            "p/r[i1]#1",
            "req-1",
            None,
            "i1",
            "shadow",
        ),
        models.HistoryDecision,
    ),
    (
        StoredDecision(
            4,
            LATER,
            "p/r",
            "h",
            HASH,
            None,
            "time",
            None,
            "blocked",
            True,
            {},
            None,
            "p/r#2",
            None,
            "too much",
        ),
        models.HistoryDecision,
    ),
    (
        OutboxEntry(
            "act_1",
            "p/r",
            "p/r#1",
            "release",
            "bank",
            {"amount": "10.00"},
            "dead",
            3,
            AT,
            LATER,
            "HTTP 422",
            None,
            3,
            LATER,
            0,
            None,
            "refused",
            422,
            "i1",
        ),
        models.Action,
    ),
    (
        AuditEntry(
            "admin_act",
            5,
            AT,
            "p/r",
            "p",
            "pause",
            "ops",
            "why",
            None,
            None,
            "req-2",
            None,
            "",
            4,
            None,
        ),
        models.AuditEntry,
    ),
    (
        AuditEntry(
            "admin_act",
            6,
            AT,
            None,
            None,
            "signoff",
            "ops",
            None,
            None,
            None,
            None,
            None,
            "",
            None,
            HASH,
        ),
        models.AuditEntry,
    ),
    (RulesetSummary(HASH, "abc", AT, LATER, ["a.yaml", "b.yaml"]), models.RulesetVersion),
    (StoredRuleset(HASH, {"a.yaml": "[]\n"}, None, AT, LATER), models.RulesetText),
    (
        LedgerMovement(9, "act_1", "esc", "return", "10.00", "USD", AT, "ops", None, "stop"),
        models.LedgerMovement,
    ),
]


def _shown(record: Any) -> dict[str, Any]:
    """``record`` as the daemon's handlers show it before encoding (a decision without its
    evaluation)."""
    if isinstance(record, StoredDecision):
        return record.to_json(evaluation=False)
    shown: dict[str, Any] = record.to_json()
    return shown


@pytest.mark.parametrize(("record", "model"), RECORDS)
def test_each_record_comes_back_as_the_daemon_encoded_it(record: Any, model: type[Any]) -> None:
    sent = json.loads(models.encode(models.convert(_shown(record), model)))
    extra = {"evaluation": {}} if isinstance(record, StoredDecision) else {}
    assert wire_record(wire(sent, model), type(record), **extra) == record


def test_an_answer_that_does_not_fit_names_the_place() -> None:
    sent = json.loads(models.encode(models.convert(_shown(RECORDS[0][0]), models.LoggedFact)))
    with pytest.raises(ValueError, match=r"Expected `int`, got `str` - at `\$.seq`"):
        wire({**sent, "seq": "7"}, models.LoggedFact)
    with pytest.raises(ValueError, match="unknown field `surprise`"):
        wire({**sent, "surprise": 1}, models.LoggedFact)


@pytest.fixture
async def odd_daemon() -> AsyncIterator[str]:
    """A server on 127.0.0.1 that answers the fact log with a row missing its time."""

    async def facts(request: web.Request) -> web.Response:
        row = {"seq": 1, "project": "p", "kind": "k", "id": "i", "data": {}, "request_id": None}
        return web.json_response({"facts": [row], "next_after": None})

    app = web.Application()
    app.router.add_get("/v1/history/facts", facts)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def test_a_history_that_does_not_fit_is_a_clear_error(
    odd_daemon: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "id: p/r\nproject: p\nwhen: task.t1.done == true\n"
        "actions:\n  - pipeline: {target: ci, ref: main}\n"
    )
    (tmp_path / "gatekeeper.yaml").write_text(
        "rules_dir: rules\ntargets:\n  ci: {url: 'http://127.0.0.1:9/ci', secret_env: CI_SECRET}\n"
    )
    args: argparse.Namespace = build_parser().parse_args(
        [
            "backtest",
            "-c",
            str(tmp_path / "gatekeeper.yaml"),
            "--rules",
            str(tmp_path / "rules"),
            "--url",
            odd_daemon,
        ]
    )
    out = io.StringIO()
    code = await asyncio.to_thread(run_backtest_command, args, out)
    err = capsys.readouterr().err
    assert code == 2, (out.getvalue(), err)
    assert f"cannot read the history of {odd_daemon}: " in err
    assert "missing required field `received_at` - at `$.facts[0]`" in err
    assert "Traceback" not in err
