"""Loops across rules: rules feeding each other through ``set_fact`` so that one outside
fact could make them fire again and again (``gatekeeper check`` refuses them; the engine's
chain bound and one-firing-per-chain rule are the backstop at run time).

Pure graph analysis over ``LoopRule`` records the loader builds from checked rule files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopRule:
    """What the loop check reads of one rule: its id and project, how it fires, the kinds
    it is triggered by (``read_whole``: kinds its ``when`` reads whole, collections
    included; ``read_ids``: the ids it reads of other kinds) and its set_fact actions,
    ``(action index, kind, id template)``."""

    id: str
    project: str
    fire: str
    for_each: str | None
    read_whole: frozenset[str]
    read_ids: Mapping[str, frozenset[str]]
    sets: tuple[tuple[int, str, str], ...]

    def triggered_by(self, kind: str, fact_id: str) -> bool:
        """Whether a fact of ``kind`` set with id template ``fact_id`` in this rule's
        project makes the engine decide the rule again: a fact of its ``for_each`` kind (a
        new or changed item), or one its ``when`` reads (a whole kind; or by id, where a
        template id may render any id and a literal one is only itself). A per-item
        ``each_fact`` rule is triggered by its own items only."""
        if kind == self.for_each:
            return True
        if self.fire == "each_fact" and self.for_each is not None:
            return False
        if kind in self.read_whole:
            return True
        ids = self.read_ids.get(kind)
        return ids is not None and ("$" in fact_id or fact_id.strip() in ids)


MAX_LOOP_RULES_SHOWN = 12
"""The most rules of one loop its problem names; a longer loop is shortened with ``...``."""

LoopEdge = tuple[int, int, int]
"""A set_fact feeding a rule: (index of the setting rule, index of the action in that rule's
``LoopRule.sets``, index of the rule it triggers)."""

LoopCycle = tuple[list[int], list[LoopEdge]]
"""A cycle of rules: their indexes in order, and the edges from each to the next (the last
edge leads back to the first rule)."""


def loop_cycles(nodes: Sequence[LoopRule]) -> list[LoopCycle]:
    """The loops among ``nodes`` (in file order), each starting at its first rule in file
    order, sorted by it.

    Rule A feeds rule B when A sets a fact of a kind that triggers B in the same project
    (``LoopRule.triggered_by``); a rule feeding itself is left to ``self_trigger_problem``.
    A cycle is a loop when a fact going round it fires a rule of it again, without a new
    outside fact:

    - it holds an ``each_fact`` rule (it fires at every fact that comes round) or an
      ``each_time`` rule (a fact that comes round may close and reopen its gate). A
      ``once`` rule on the way does not stop it: the first time, the cycle still goes round
      once more, and that rule fires twice for one outside fact;
    - or all its rules are per-item ``fire: once`` rules, each fed a fact of its
      ``for_each`` kind, and one of its set_facts renders a new id each round (an id
      template other than a literal id or exactly ``${item.id}``): each round makes new
      items, whose instances fire in turn. With literal or ``${item.id}`` ids only, the
      items come round unchanged and their instances, which fired already, fire no more.

    Each ``each_fact`` and ``each_time`` rule on a cycle is on a reported loop (the shortest
    through it, unless it is on one found already), and so is each new-id set_fact of an
    all-``once`` loop; a cycle found twice is reported once. The cost: one pass over the
    rules for the edges, one to find the strongly connected components (a cycle lies
    inside one), then one breadth-first search inside its component per such rule or
    set_fact not on a loop found already (a ring of 10,000 rules is one search).
    """
    set_kinds = {(node.project, kind) for node in nodes for _, kind, _ in node.sets}
    by_kind: dict[tuple[str, str], list[int]] = {}
    for index, node in enumerate(nodes):
        kinds = {*node.read_whole, *node.read_ids}
        if node.for_each is not None:
            kinds.add(node.for_each)
        for kind in sorted(kinds):
            if (node.project, kind) in set_kinds:
                by_kind.setdefault((node.project, kind), []).append(index)
    edges: list[list[LoopEdge]] = [[] for _ in nodes]
    for source, node in enumerate(nodes):
        for position, (_, kind, fact_id) in enumerate(node.sets):
            for target in by_kind.get((node.project, kind), ()):
                if target != source and nodes[target].triggered_by(kind, fact_id):
                    edges[source].append((source, position, target))
    # a cycle stays inside one strongly connected component: keep the edges inside one
    component = _components(edges)
    edges = [[e for e in out if component[e[2]] == component[e[0]]] for out in edges]

    def item_edge(edge: LoopEdge) -> bool:
        source, target = nodes[edge[0]], nodes[edge[2]]
        kind = source.sets[edge[1]][1]
        return source.fire == "once" and target.fire == "once" and target.for_each == kind

    found: dict[tuple[int, ...], LoopCycle] = {}
    on_found: set[int] = set()  # the rules on a cycle found: one through each is enough
    for index, node in enumerate(nodes):
        if node.fire != "once" and edges[index] and index not in on_found:
            path = _shortest_path(edges, index, index, None)
            if path is not None:
                _keep(found, path)
                on_found.update(edge[0] for edge in path)
    edges_found = {edge for _, cycle in found.values() for edge in cycle}
    for source_edges in edges:
        for edge in source_edges:
            if edge not in edges_found and item_edge(edge) and _new_id(nodes, edge):
                rest = _shortest_path(edges, edge[2], edge[0], item_edge)
                if rest is not None:
                    _keep(found, [edge, *rest])
                    edges_found.update(rest)
    return sorted(found.values(), key=lambda cycle: cycle[0][0])


def _components(edges: Sequence[Sequence[LoopEdge]]) -> list[int]:
    """The strongly connected component of each rule (a number per component), by
    Tarjan's algorithm without recursion (a chain of 10,000 rules is no problem)."""
    count = len(edges)
    index = [-1] * count
    low = [0] * count
    component = [-1] * count
    on_stack = [False] * count
    stack: list[int] = []
    counter = 0
    components = 0
    for root in range(count):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            out = edges[node]
            while position < len(out):
                target = out[position][2]
                position += 1
                if index[target] == -1:
                    work.append((node, position))
                    work.append((target, 0))
                    break
                if on_stack[target]:
                    low[node] = min(low[node], index[target])
            else:
                if low[node] == index[node]:
                    while True:
                        member = stack.pop()
                        on_stack[member] = False
                        component[member] = components
                        if member == node:
                            break
                    components += 1
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return component


def _keep(found: dict[tuple[int, ...], LoopCycle], edges: list[LoopEdge]) -> None:
    """Add the cycle of ``edges`` to ``found``, starting at its lowest rule index, unless
    the same cycle of rules is there already."""
    rules = [edge[0] for edge in edges]
    low = rules.index(min(rules))
    rules, edges = rules[low:] + rules[:low], edges[low:] + edges[:low]
    found.setdefault(tuple(rules), (rules, edges))


def _new_id(nodes: Sequence[LoopRule], edge: LoopEdge) -> bool:
    """Whether the set_fact of ``edge`` may render a new id each time: a template other
    than exactly ``${item.id}``."""
    fact_id = nodes[edge[0]].sets[edge[1]][2].strip()
    return "$" in fact_id and fact_id != "${item.id}"


def _shortest_path(
    edges: Sequence[Sequence[LoopEdge]],
    start: int,
    goal: int,
    usable: Callable[[LoopEdge], bool] | None,
) -> list[LoopEdge] | None:
    """The edges of a shortest path (at least one edge) from rule ``start`` to rule
    ``goal``, breadth first, over the edges ``usable`` accepts (None: all); None when
    there is none."""
    previous: dict[int, LoopEdge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in edges[node]:
                target = edge[2]
                if target in previous or (usable is not None and not usable(edge)):
                    continue
                previous[target] = edge
                if target == goal:
                    path = [edge]
                    while path[0][0] != start:
                        path.insert(0, previous[path[0][0]])
                    return path
                following.append(target)
        frontier = following
    return None


def loop_message(nodes: Sequence[LoopRule], cycle: LoopCycle) -> str:
    """The problem text of a loop: what its first rule sets and who reads it, the rules of
    the cycle in order (``a -> b -> a``), and which rule fires again and why."""
    rules, edges = cycle
    start = nodes[rules[0]]
    kind = start.sets[edges[0][1]][1]
    following = nodes[edges[0][2]]
    if following.for_each == kind:
        feeds = f"the for_each kind of rule {following.id!r}"
    else:
        feeds = f"which rule {following.id!r} reads"
    names = [nodes[r].id for r in rules]
    if len(names) > MAX_LOOP_RULES_SHOWN:
        more = len(names) - MAX_LOOP_RULES_SHOWN + 1
        names = [*names[: MAX_LOOP_RULES_SHOWN - 1], f"... ({more:,} more rules)"]
    path = " -> ".join([*names, start.id])
    again = [nodes[r] for r in rules if nodes[r].fire != "once"]
    if again and again[0].fire == "each_fact":
        why = f"{again[0].id} fires again at each fact that comes round (fire: each_fact)"
    elif again:
        why = (
            f"{again[0].id} fires again each time a fact that comes round reopens its gate "
            "(fire: each_time)"
        )
    else:
        edge = next(e for e in edges if _new_id(nodes, e))
        setter, target = nodes[edge[0]], nodes[edge[2]]
        _, new_kind, fact_id = setter.sets[edge[1]]
        why = (
            f"{setter.id} sets each round a fact of kind {new_kind!r} with a new id "
            f"({fact_id!r}), a new item of {target.id}, whose instance fires (fire: once)"
        )
    return (
        f"this rule sets a fact of kind {kind!r}, {feeds}, and the rules feed each other "
        f"in a loop: {path}; {why}, so one fact from outside fires it more than once, a "
        "loop gatekeeper would only cut when it runs, blocking the firing; break the "
        "cycle: let one rule of it set a kind no rule of the cycle reads"
    )
