"""Loops across rules, rules feeding each other through ``set_fact``.

``gatekeeper check`` (every load) refuses a cycle that can fire a rule again without a new
fact from outside, at the set_fact that starts it, naming its rules in order. The engine
guarantees it at run time for whatever the check cannot see (rules it never saw together):
within one chain of firings from one fact or act from outside, a rule instance fires at
most once; a second firing is ``blocked`` as a loop and alerted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gatekeeper.config import Escrow
from gatekeeper.engine.evaluate import Engine
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import FactInput
from gatekeeper.problems import Problem
from gatekeeper.rules.loader import load_rule_texts

from .conftest import Project, fact
from .test_instances import NOW, World, engine_unchecked

PAY = """
id: tower-a/pay
project: tower-a
when: ping.p.go == "yes"
fire: each_fact
actions:
  - release:
      {target: escrow-bank, escrow: tower-a-escrow, amount: "100.00", currency: USD, payee: acme}
  - set_fact: {kind: pong, id: p, data: {go: "yes"}}
"""

BOUNCE = """
id: tower-a/bounce
project: tower-a
when: pong.p.go == "yes"
fire: each_fact
actions:
  - set_fact: {kind: ping, id: p, data: {go: "yes"}}
"""


def problems_of(*rules: str) -> list[Problem]:
    """The problems of loading ``rules`` (rule mappings, one a text) as one list file."""
    text = "\n".join(
        "\n".join(
            ("- " if n == 0 else "  ") + line for n, line in enumerate(rule.strip().splitlines())
        )
        for rule in rules
    )
    return list(load_rule_texts({"rules.yaml": text + "\n"}, None).problems)


def loops(*rules: str) -> list[str]:
    """The loop problems of ``rules``, as ``line:column path: cycle``."""
    found = []
    for problem in problems_of(*rules):
        if "feed each other in a loop" in problem.message:
            cycle = problem.message.split("in a loop: ")[1].split(";")[0]
            found.append(f"{problem.line}:{problem.column} {problem.path}: {cycle}")
    return found


def rule(
    rule_id: str,
    when: str,
    sets: str | None,
    fire: str = "each_fact",
    for_each: str | None = None,
    project: str = "p",
) -> str:
    lines = [f"id: {rule_id}", f"project: {project}"]
    if for_each:
        lines.append(f"for_each: {for_each}")
    lines += [f"when: '{when}'", f"fire: {fire}", "actions:"]
    if sets:
        lines.append(f"  - set_fact: {sets}")
    else:
        lines.append("  - notify: {target: chat, message: done}")
    return "\n".join(lines)


# --- gatekeeper check: which cycles are loops ------------------------------------------------


def test_two_event_rules_feeding_each_other_are_refused_at_the_set_fact() -> None:
    [problem] = problems_of(PAY, BOUNCE)
    assert (problem.file, problem.line, problem.column) == ("rules.yaml", 8, 24)
    assert problem.path == "[0].actions[1].set_fact.kind"
    assert problem.rule_id == "tower-a/pay"
    assert problem.message == (
        "this rule sets a fact of kind 'pong', which rule 'tower-a/bounce' reads, and the "
        "rules feed each other in a loop: tower-a/pay -> tower-a/bounce -> tower-a/pay; "
        "tower-a/pay fires again at each fact that comes round (fire: each_fact), so one "
        "fact from outside fires it more than once, a loop gatekeeper would only cut when it "
        "runs, blocking the firing; break the cycle: let one rule of it set a kind no rule "
        "of the cycle reads"
    )


def test_a_loop_across_files_is_reported_once_from_its_first_rule() -> None:
    result = load_rule_texts({"b/bounce.yaml": BOUNCE, "a/pay.yaml": PAY}, None)
    assert result.ruleset is None
    [problem] = result.problems
    assert (problem.file, problem.line, problem.path) == (
        "a/pay.yaml",
        9,
        "actions[1].set_fact.kind",
    )
    assert "tower-a/pay -> tower-a/bounce -> tower-a/pay" in problem.message


def test_a_longer_cycle_names_every_rule_in_order() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}", fire="once")
    b = rule("p/b", "y.one.v == 1", "{kind: z, id: one, data: {v: 1}}")
    c = rule("p/c", "len(z) > 0", "{kind: x, id: one, data: {v: 1}}", fire="each_time")
    assert loops(a, b, c) == [
        "6:24 [0].actions[0].set_fact.kind: p/a -> p/b -> p/c -> p/a",
    ]
    [problem] = problems_of(a, b, c)
    assert "p/b fires again at each fact that comes round (fire: each_fact)" in problem.message


def test_each_time_rules_feeding_each_other_are_a_loop() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}", fire="each_time")
    b = rule("p/b", "y.one.v == 1", "{kind: x, id: one, data: {v: 0}}", fire="each_time")
    [problem] = problems_of(a, b)
    assert "p/a -> p/b -> p/a" in problem.message
    assert (
        "p/a fires again each time a fact that comes round reopens its gate (fire: each_time)"
        in problem.message
    )


def test_a_chain_of_steps_without_a_cycle_is_fine() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}")
    b = rule("p/b", "y.one.v == 1", "{kind: z, id: one, data: {v: 1}}")
    c = rule("p/c", "z.one.v == 1", None)
    assert problems_of(a, b, c) == []


def test_rules_of_different_projects_do_not_feed_each_other() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}")
    b = rule("q/b", "y.one.v == 1", "{kind: x, id: one, data: {v: 1}}", project="q")
    assert problems_of(a, b) == []


def test_a_fact_read_by_another_literal_id_does_not_feed_the_rule() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: two, data: {v: 1}}")
    b = rule("p/b", "y.one.v == 1", "{kind: x, id: one, data: {v: 1}}")
    assert problems_of(a, b) == []
    # a template id may render any id: it may be the one read
    templated = rule("p/a", "x.one.v == 1", '{kind: y, id: "${rule_id}", data: {v: 1}}')
    templated = templated.replace("${rule_id}", "o${fired_at}")
    assert [line.split(" ", 2)[2] for line in loops(templated, b)] == ["p/a -> p/b -> p/a"]


def test_a_collection_over_the_kind_feeds_the_rule() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: two, data: {v: 1}}")
    b = rule("p/b", "all(f.data.v == 1 for f in y)", "{kind: x, id: one, data: {v: 1}}")
    assert [line.split(" ", 2)[2] for line in loops(a, b)] == ["p/a -> p/b -> p/a"]


def test_a_per_item_event_rule_is_fed_by_its_own_kind_only() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}")
    # reads y, but as a per-item event rule only its items (z) trigger it
    b = rule("p/b", "y.one.v == 1", "{kind: x, id: one, data: {v: 1}}", for_each="z")
    assert problems_of(a, b) == []
    b_on_y = rule("p/b", "item.data.v == 1", "{kind: x, id: one, data: {v: 1}}", for_each="y")
    assert [line.split(" ", 2)[2] for line in loops(a, b_on_y)] == ["p/a -> p/b -> p/a"]


def test_once_rules_with_stable_items_are_no_loop() -> None:
    # the items come round unchanged: each instance fired already, nothing fires again
    a = rule("p/a", "item.data.v == 1", '{kind: y, id: "${item.id}", data: {v: 1}}', "once", "x")
    b = rule("p/b", "item.data.v == 1", '{kind: x, id: "${item.id}", data: {v: 1}}', "once", "y")
    assert problems_of(a, b) == []
    literal = b.replace('id: "${item.id}"', "id: fixed")
    assert problems_of(a, literal) == []


def test_once_rules_making_new_items_each_round_are_a_loop() -> None:
    a = rule("p/a", "item.data.v == 1", '{kind: y, id: "${item.id}", data: {v: 1}}', "once", "x")
    b = rule("p/b", "item.data.v == 1", '{kind: x, id: "n${item.id}", data: {v: 1}}', "once", "y")
    [problem] = problems_of(a, b)
    assert problem.rule_id == "p/a"
    assert "p/a -> p/b -> p/a" in problem.message
    assert (
        "p/b sets each round a fact of kind 'x' with a new id ('n${item.id}'), a new item of "
        "p/a, whose instance fires (fire: once)" in problem.message
    )


def test_a_once_rule_on_the_way_does_not_stop_an_event_rule_firing_twice() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}")
    b = rule("p/b", "y.one.v == 1", "{kind: x, id: one, data: {v: 1}}", fire="once")
    assert [line.split(" ", 2)[2] for line in loops(a, b)] == ["p/a -> p/b -> p/a"]


def test_the_self_trigger_check_keeps_its_own_message() -> None:
    a = rule("p/a", "x.one.v == 1", "{kind: x, id: one, data: {v: 1}}")
    [problem] = problems_of(a)
    assert "so it can re-trigger itself" in problem.message
    assert loops(a) == []


def test_two_loops_through_one_rule_are_both_reported() -> None:
    hub = rule("p/hub", "len(x) > 0", "{kind: y, id: one, data: {v: 1}}")
    left = rule("p/left", "y.one.v == 1", "{kind: x, id: l, data: {v: 1}}")
    right = rule("p/right", "y.one.v == 1", "{kind: x, id: r, data: {v: 1}}")
    found = [line.split(" ", 2)[2] for line in loops(hub, left, right)]
    assert found == ["p/hub -> p/left -> p/hub", "p/hub -> p/right -> p/hub"]


# --- the engine: one firing per instance and chain -------------------------------------------


def world_of(*rules: str) -> World:
    world = World(engine_unchecked(*rules, alert_target="ops"))
    world.book = EscrowBook({"tower-a-escrow": Escrow("tower-a-escrow", "USD", Decimal("1000"))})
    return world


def test_one_posted_fact_releases_once_the_loop_is_blocked_and_alerted() -> None:
    world = world_of(PAY, BOUNCE)
    t = world.post(FactInput("tower-a", "ping", "p", {"go": "yes"}))
    assert [(d.rule_id, d.outcome) for d in t.decisions] == [
        ("tower-a/pay", "fired"),
        ("tower-a/bounce", "fired"),
        ("tower-a/pay", "blocked"),
    ]
    blocked = t.decisions[-1]
    assert blocked.reason == (
        "loop: tower-a/pay already fired in this chain "
        "(tower-a/pay -> tower-a/bounce -> tower-a/pay)"
    )
    assert [f.key[1] for f in t.facts] == ["ping", "pong", "ping"]  # nothing set after
    assert [entry.amount for entry in t.ledger] == ["100.00"]
    release, alert = t.actions
    assert release.kind == "release" and release.firing_id == "tower-a/pay#1"
    assert alert.target == "ops" and alert.firing_id == blocked.firing_id == "tower-a/pay#2"
    assert alert.payload["alert"] == "firing_blocked"
    assert alert.payload["reason"] == blocked.reason
    assert alert.payload["message"] == (
        f"gatekeeper blocked firing tower-a/pay#2 of rule tower-a/pay: {blocked.reason}"
    )
    # a new fact from outside is a new chain: the event rule pays again, once
    again = world.post(FactInput("tower-a", "ping", "p", {"go": "yes"}))
    assert [d.outcome for d in again.decisions] == ["fired", "fired", "blocked"]
    assert len(again.ledger) == 1
    assert world.book.committed["tower-a-escrow"] == Decimal("200.00")


def test_the_loop_of_per_item_instances_names_them() -> None:
    ping = """
id: p/ping
project: p
for_each: ping
when: item.data.n < 100
fire: each_fact
actions:
  - set_fact: {kind: pong, id: "${item.id}", data: {n: 1}}
"""
    pong = ping.replace("p/ping", "p/pong").replace("for_each: ping", "for_each: pong")
    pong = pong.replace("kind: pong", "kind: ping")
    world = world_of(ping, pong)
    t = world.post(FactInput("p", "ping", "a", {"n": 0}))
    assert [(d.rule_id, d.instance, d.outcome) for d in t.decisions] == [
        ("p/ping", "a", "fired"),
        ("p/pong", "a", "fired"),
        ("p/ping", "a", "blocked"),
    ]
    assert t.decisions[-1].reason == (
        "loop: p/ping[a] already fired in this chain (p/ping[a] -> p/pong[a] -> p/ping[a])"
    )
    [alert] = t.actions
    assert alert.payload["item"] == {"kind": "ping", "id": "a"}


def test_the_same_rule_fired_by_two_facts_of_a_batch_is_no_loop() -> None:
    world = world_of(PAY)
    ping = FactInput("tower-a", "ping", "p", {"go": "yes"})
    t = world.post(ping, ping)
    assert [d.outcome for d in t.decisions] == ["fired", "fired"]
    assert len(t.ledger) == 2


def test_two_facts_one_firing_sets_fire_the_next_rule_twice() -> None:
    split = """
id: p/split
project: p
when: order.o.go == "yes"
fire: each_fact
actions:
  - set_fact: {kind: part, id: one, data: {n: 1}}
  - set_fact: {kind: part, id: two, data: {n: 2}}
"""
    each = """
id: p/each
project: p
when: len(part) > 0
fire: each_fact
actions:
  - notify: {target: chat, message: part}
"""
    world = world_of(split, each)
    t = world.post(FactInput("p", "order", "o", {"go": "yes"}))
    assert [(d.rule_id, d.outcome) for d in t.decisions] == [
        ("p/split", "fired"),
        ("p/each", "fired"),
        ("p/each", "fired"),
    ]


GATE = """
id: p/gate
project: p
when: light.l.lit == true
fire: each_time
actions:
  - set_fact: {kind: seen, id: s, data: {n: 1}}
"""
OFF = """
id: p/off
project: p
when: len(seen) > 0
fire: each_fact
actions:
  - set_fact: {kind: light, id: l, data: {lit: false}}
  - set_fact: {kind: poke, id: k, data: {n: 1}}
"""
ON = """
id: p/on
project: p
when: len(poke) > 0
fire: each_fact
actions:
  - set_fact: {kind: light, id: l, data: {lit: true}}
"""


def test_an_each_time_rule_reopened_by_its_own_chain_is_blocked() -> None:
    world = world_of(GATE, OFF, ON)
    t = world.post(FactInput("p", "light", "l", {"lit": True}))
    assert [(d.rule_id, d.outcome) for d in t.decisions] == [
        ("p/gate", "fired"),
        ("p/off", "fired"),
        ("p/on", "fired"),  # an event rule, at its fact (poke)
        ("p/gate", "not_met"),  # against the whole level: the light is off
        ("p/gate", "blocked"),  # the next level: on again
    ]
    assert t.decisions[-1].reason == (
        "loop: p/gate already fired in this chain (p/gate -> p/off -> p/on -> p/gate)"
    )


def test_a_chain_started_by_a_reload_is_guarded_too() -> None:
    world = world_of(GATE, OFF, ON)
    world.facts.put(("p", "light", "l"), {"lit": True})
    engine: Engine = world.engine
    t = engine.plan_rules(
        world.facts, world.states, [engine.rules["p/gate"]], NOW, "reload", book=world.book
    )
    assert [(d.rule_id, d.trigger, d.outcome) for d in t.decisions] == [
        ("p/gate", "reload", "fired"),
        ("p/off", "fact", "fired"),
        ("p/on", "fact", "fired"),
        ("p/gate", "fact", "not_met"),
        ("p/gate", "fact", "blocked"),
    ]
    assert t.decisions[-1].reason == (
        "loop: p/gate already fired in this chain (p/gate -> p/off -> p/on -> p/gate)"
    )


# --- the daemon ---------------------------------------------------------------------------


async def test_the_daemon_refuses_to_reload_a_loop_and_keeps_its_rules(
    project_factory: Any, receiver: Any, start_daemon: Any
) -> None:
    project: Project = project_factory(receiver.url)
    project.write_rule("pay.yaml", PAY)
    gk = await start_daemon(project)
    project.write_rule("bounce.yaml", BOUNCE)
    assert await gk.daemon.reload() is False
    status, rules = await gk.get("/v1/rules")
    assert status == 200 and rules["reload"]["ok"] is False
    [problem] = rules["reload"]["problems"]
    assert (problem["file"], problem["line"]) == ("bounce.yaml", 7)  # first in file order
    assert "tower-a/bounce -> tower-a/pay -> tower-a/bounce" in problem["message"]
    status, body = await gk.post("/v1/facts", fact("ping", "p", go="yes"))
    assert status == 200, body
    releases = [a for a in await gk.daemon.store.list_actions() if a.kind == "release"]
    assert len(releases) == 1
    assert "tower-a/bounce" not in gk.daemon.writer.engine.rules


@pytest.mark.parametrize("fire", ["once", "each_time", "each_fact"])
def test_the_check_and_the_engine_agree_on_two_rules(fire: str) -> None:
    """Whatever the modes, rules the check accepts never hit the engine's loop guard, and
    rules it refuses as an each_fact loop do."""
    a = rule("p/a", "x.one.v == 1", "{kind: y, id: one, data: {v: 1}}", fire=fire)
    b = rule("p/b", "y.one.v == 1", "{kind: z, id: one, data: {v: 1}}")
    c = rule("p/c", "z.one.v == 1", None)
    assert problems_of(a, b, c) == []
    world = world_of(a, b, c)
    t = world.post(FactInput("p", "x", "one", {"v": 1}))
    assert all(d.reason is None or not d.reason.startswith("loop:") for d in t.decisions)


def test_an_instance_decided_against_a_level_takes_the_chain_that_leads_back_to_it() -> None:
    """At the last level the gate is reopened by its own chain (light) and, later in the
    level, triggered by another chain (tick): it is still the loop's second firing."""
    gate = GATE.replace("light.l.lit == true", "light.l.lit == true and len(tick) >= 0")
    n1 = rule("p/n1", "noise.n.v == 1", "{kind: d1, id: one, data: {v: 1}}", fire="each_time")
    n2 = rule("p/n2", "len(d1) > 0", "{kind: d2, id: one, data: {v: 1}}")
    n3 = rule("p/n3", "len(d2) > 0", "{kind: tick, id: one, data: {v: 1}}")
    world = world_of(gate, OFF, ON, n1, n2, n3)
    t = world.post(
        FactInput("p", "light", "l", {"lit": True}), FactInput("p", "noise", "n", {"v": 1})
    )
    last_level = [f.key[1] for f in t.facts if f.caused_by and f.caused_by.depth == 3]
    assert last_level == ["light", "tick"]
    gate_decisions = [(d.outcome, d.reason) for d in t.decisions if d.rule_id == "p/gate"]
    assert gate_decisions == [
        ("fired", None),
        ("not_met", None),
        ("blocked", "loop: p/gate already fired in this chain (p/gate -> p/off -> p/on -> p/gate)"),
    ]


def test_a_long_loop_is_found_once_and_named_short() -> None:
    count = 2000
    files = {
        f"r{n:04d}.yaml": rule(
            f"p/r{n}", f"k{n}.x.v == 1", f"{{kind: k{(n + 1) % count}, id: x, data: {{v: 1}}}}"
        )
        for n in range(count)
    }
    [problem] = load_rule_texts(files, None).problems
    assert problem.file == "r0000.yaml"
    cycle = problem.message.split("in a loop: ")[1].split(";")[0]
    shown = [f"p/r{n}" for n in range(11)]
    assert cycle == " -> ".join([*shown, "... (1,989 more rules)", "p/r0"])
