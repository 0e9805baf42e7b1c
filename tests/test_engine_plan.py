"""Engine.plan_ingest straight, without the daemon: which rules a fact wakes, in which order,
with which fact index, and that the per-rule entries decide as the rules themselves do."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.facts import FactTable, ProjectFacts
from gatekeeper.engine.model import Decision, FactInput, RuleState
from gatekeeper.rules.loader import load_rule_texts

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _engine(rules: dict[str, str]) -> Engine:
    lines = []
    for rule_id, when in rules.items():
        lines += [
            f"- id: {rule_id}",
            "  project: p",
            f"  when: '{when}'",
            "  fire: each_time",
            "  actions:",
            '    - notify: {target: chat, message: "rule ${rule_id} fired"}',
        ]
    result = load_rule_texts({"rules.yaml": "\n".join(lines) + "\n"}, config=None)
    assert result.ruleset is not None, result.problems
    return Engine(result.ruleset)


RULES = {
    "by-id": 'task["T-1"].status == "done"',
    "by-kind": "len(task) >= 2",
    "both": 'task["T-1"].status == "done" and len(task) >= 1',
    "other": 'task["T-2"].status == "done"',
}


def test_a_fact_wakes_each_rule_reading_it_once_in_index_order() -> None:
    engine = _engine(RULES)
    key = ("p", "task", "T-1")
    listed = [rule.id for rule in engine.rules_reading(key)]
    assert sorted(listed) == ["both", "both", "by-id", "by-kind"]  # by id and by kind
    plan = engine.plan_ingest(FactTable(), {}, [FactInput(*key, {"status": "done"})], NOW)
    assert [d.rule_id for d in plan.decisions] == list(dict.fromkeys(listed))
    assert [d.fact_index for d in plan.decisions] == [0, 0, 0]
    assert [d.outcome for d in plan.decisions] == ["fired", "fired", "not_met"]
    assert {d.project for d in plan.decisions} == {"p"}
    assert all(d.rule_hash == engine.rules[d.rule_id].content_hash for d in plan.decisions)


def test_a_batch_decides_each_rule_once_with_the_last_fact_it_reads() -> None:
    engine = _engine(RULES)
    batch = [
        FactInput("p", "task", "T-1", {"status": "done"}),
        FactInput("p", "task", "T-2", {"status": "open"}),
        FactInput("p", "task", "T-9", {"status": "open"}),
    ]
    plan = engine.plan_ingest(FactTable(), {}, batch, NOW)
    indexes = {d.rule_id: d.fact_index for d in plan.decisions}
    assert indexes == {"by-id": 0, "by-kind": 2, "both": 2, "other": 1}
    first_seen = list(dict.fromkeys(r.id for f in batch for r in engine.rules_reading(f.key)))
    assert [d.rule_id for d in plan.decisions] == first_seen
    gates = {d.rule_id: d.gate_open for d in plan.decisions}
    assert gates == {"by-id": True, "both": True, "by-kind": True, "other": False}


def test_entries_decide_as_plan_rules_does() -> None:
    engine = _engine(RULES)
    facts = FactTable({("p", "task", "T-1"): {"status": "done"}})
    states = {("both", ""): RuleState("both", gate_open=True, fired_count=1, rule_hash="old")}
    fact = FactInput("p", "task", "T-1", {"status": "done"})
    ingest = engine.plan_ingest(facts, states, [fact], NOW)
    view = facts.overlay()
    view.put(fact.key, fact.data)
    rules = [engine.rules[d.rule_id] for d in ingest.decisions]
    reference = engine.plan_rules(view, states, rules, NOW, "fact")
    for ours, theirs in zip(ingest.decisions, reference.decisions, strict=True):
        assert (ours.outcome, ours.gate_open, ours.evaluation, ours.firing_id) == (
            theirs.outcome,
            theirs.gate_open,
            theirs.evaluation,
            theirs.firing_id,
        )
    assert ingest.rule_states == reference.rule_states
    assert ingest.rule_states[("both", "")].fired_count == 1  # each_time, gate already open
    assert ingest.rule_states[("both", "")].rule_hash == engine.rules["both"].content_hash


def test_conditions_reading_one_fact_share_its_name() -> None:
    engine = _engine(RULES)
    conditions = [engine.rules[i].condition for i in ("by-id", "both")]
    for condition in conditions:
        condition.evaluate(ProjectFacts("p", FactTable()), NOW)  # compiles it
    values = [condition._values for condition in conditions]  # type: ignore[attr-defined]
    ids = [next(v for v in tuple_ if v == "T-1") for tuple_ in values]
    assert ids[0] is ids[1]


def test_decisions_are_the_dataclass_instances_their_fields_make() -> None:
    engine = _engine(RULES)
    fact = FactInput("p", "task", "T-1", {"status": "done"})
    plan = engine.plan_ingest(FactTable(), {}, [fact], NOW)
    names = [f.name for f in dataclasses.fields(Decision)]
    for decision in plan.decisions:
        assert type(decision) is Decision
        assert not hasattr(decision, "__dict__")  # slots: no attribute dict per decision
        assert [name for name in names if hasattr(decision, name)] == names  # every one set
        rebuilt = Decision(**{name: getattr(decision, name) for name in names})
        assert rebuilt == decision and repr(rebuilt) == repr(decision)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decision.outcome = "fired"  # type: ignore[misc]


def test_a_plan_of_rules_reading_one_fact_shares_their_seen() -> None:
    rules = {f"r{i}": f'task["T-1"].n >= {i} and task["T-1"].status == "done"' for i in range(4)}
    rules["other"] = 'task["T-2"].n >= 1'
    engine = _engine(rules)
    facts = FactTable({("p", "task", "T-1"): {"n": 2, "status": "done"}})
    plan = engine.plan_rules(facts, {}, engine.ruleset.rules, NOW, "reload")
    seen = [d.evaluation.seen for d in plan.decisions]
    assert all(s is seen[0] for s in seen[:4])  # one dict for the rules reading T-1
    assert seen[4] is not seen[0] and seen[4] == {"task.T-2": None}
    alone = [
        engine.rules[d.rule_id].condition.evaluate(ProjectFacts("p", facts), NOW)
        for d in plan.decisions
    ]
    assert [d.evaluation for d in plan.decisions] == alone  # equal to their own
    assert [d.gate_open for d in plan.decisions] == [True, True, True, False, False]
    ingest = engine.plan_ingest(facts, {}, [FactInput("p", "task", "T-1", {"n": 0})], NOW)
    assert ingest.decisions[0].evaluation.seen is not ingest.decisions[1].evaluation.seen
