"""Approvals used up by firings, and the notice that an instance waits for approvals: what
the store keeps of them (every backend)."""

from __future__ import annotations

from dataclasses import replace

from gatekeeper.clock import format_rfc3339
from gatekeeper.engine.model import (
    ApprovalInput,
    Consumption,
    QueuedAction,
    RuleState,
    Stand,
    Transition,
)
from gatekeeper.store import Store

from . import build

RULE = "dev/ship"


async def test_a_firing_removes_the_approvals_it_used_up_in_its_transaction(store: Store) -> None:
    given = [
        ApprovalInput(RULE, "dev", "alice", "approve", instance="b1"),
        ApprovalInput(RULE, "dev", "bob", "reject", instance="b1"),
        ApprovalInput(RULE, "dev", "carol", "approve", instance="b2"),
    ]
    await store.commit_transition(Transition(approvals=given, planned_at=build.T0))
    fired = build.firing(RULE, 1, build.at(1), project="dev")
    # bob's reject is not an approval: naming him uses nothing up
    fired.consumed = [Consumption(RULE, "b1", ("alice", "bob"), f"{RULE}#1")]
    await store.commit_transition(fired)
    assert await store.load_approvals() == {
        f"{RULE}[b1]": {"bob": Stand("reject", build.T0)},
        f"{RULE}[b2]": {"carol": Stand("approve", build.T0)},
    }


async def test_an_approval_given_and_used_up_in_one_transition_is_gone(store: Store) -> None:
    again = ApprovalInput(RULE, "dev", "alice", "approve")
    fired = build.firing(RULE, 1, build.at(1), project="dev")
    fired.approvals = [again]
    fired.consumed = [Consumption(RULE, "", ("alice",), f"{RULE}#1")]
    await store.commit_transition(fired)
    assert await store.load_approvals() == {}
    log = await store.fact_log()
    assert [e.kind for e in log] == ["task", "approval"]  # the approval itself is kept


async def test_the_notice_of_a_wait_is_kept_with_its_decision(store: Store) -> None:
    notice_id = f"{RULE}[b1]~approvals-1"
    waiting = replace(
        build.decision(RULE, build.T0, project="dev", outcome="awaiting_approvals", firing=None),
        instance="b1",
        notice_id=notice_id,
    )
    state = RuleState(RULE, False, 0, None, "h", instance="b1", notified=True, notices=1)
    action = QueuedAction(
        "act-notice-1",
        "notify",
        "chat",
        RULE,
        notice_id,
        {"project": "dev", "message": "waits"},
        format_rfc3339(build.T0),
        instance="b1",
    )
    await store.commit_transition(
        Transition(
            decisions=[waiting],
            rule_states={(RULE, "b1"): state},
            actions=[action],
            planned_at=build.T0,
        )
    )
    assert (await store.load_rule_states())[(RULE, "b1")] == state
    [entry] = await store.list_actions()
    [decision] = await store.list_decisions(RULE, 1)
    assert entry.firing_id == notice_id and entry.decision_id == decision.id
    assert decision.firing_id is None and decision.outcome == "awaiting_approvals"
