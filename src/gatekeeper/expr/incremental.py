"""Collections kept up to date by deltas: posting one fact of a kind costs O(log n), not a
pass over every fact of the kind.

A collection whose element and filters read only its loop variable, ``item`` and
constants (no other fact, no time) is *cacheable*: the element of each fact depends on that
fact alone (and on the item). For such a collection, ``SiteCache`` keeps, per instance (the
current item's id; one shared state when the collection does not use ``item``), a
``_State``: the element of every fact passing the filter and the running aggregates
(counts, the exact sum, the sorted false/missing ids, the sorted elements of ``min``/
``max``), synced to the *committed* facts of the kind through ``FactChanges`` (the ids put
since the version it saw). Facts *pending* in the view being evaluated (a plan not
committed yet) are applied to the state for the evaluation and taken away again right
after, so a plan that is dropped leaves nothing behind. The result is the very value and
``CollectionSeen`` the full pass gives (tests/test_expr_collections.py compares them over
random puts and dropped plans); whenever the state holds an error, or an element whose
type makes the aggregate fail, ``Recompute`` is raised and the full pass decides.

Collections that read other facts or the time are evaluated in full every time.
"""

from __future__ import annotations

import ast
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

from sortedcontainers import SortedList

from gatekeeper.expr.language import (
    MAX_FALSE_IDS,
    TIME_FUNCTIONS,
    CollectionSeen,
    FactChanges,
    FactLookup,
    _Collection,
    _empty_name,
    _ExactSum,
    _FactRead,
    _jsonable,
    _KindRead,
    _Lookup,
    _MissingElement,
    _type_problem,
    _VarRead,
)
from gatekeeper.expr.timing import _children

MAX_CACHED_ELEMENTS = 1_000_000
"""Most elements one collection keeps over all its instances' states (the least recently
used states are dropped beyond it, and rebuilt when needed)."""


class Recompute(Exception):
    """The state cannot say the value (an error, or a type the aggregate refuses): the full
    pass over the facts must decide (and give the error)."""


_ABSENT: Any = object()
"""No entry: the fact does not pass the filter (or does not exist)."""
_ERROR: Any = object()
"""The element or a filter of the fact failed (other than by a missing name)."""


def cacheable(node: _Collection) -> tuple[bool, bool, bool]:
    """``(cacheable, uses_item, uses_item_data)`` of a collection: whether its element and
    filters read no fact and no time (only the loop variable, ``item`` and constants),
    whether they read ``item``, and whether they read more of it than ``item.id`` and
    ``item.kind`` (then a change of the item's data changes the elements)."""
    uses_item = uses_item_data = False
    stack: list[ast.expr] = [node.element, *node.filters]
    while stack:
        child = stack.pop()
        if isinstance(child, _FactRead | _KindRead | _Collection):
            return False, False, False
        if (
            isinstance(child, ast.Call)
            and isinstance(child.func, ast.Name)
            and child.func.id in TIME_FUNCTIONS
        ):
            return False, False, False
        if (
            isinstance(child, _Lookup)
            and isinstance(child.value, _VarRead)
            and child.value.name != node.var
            and isinstance(child.key, ast.Constant)
            and child.key.value in ("id", "kind")
        ):
            uses_item = True  # item.id / item.kind: the same for every state of the item
            continue
        if isinstance(child, _VarRead) and child.name != node.var:
            uses_item = uses_item_data = True
        stack.extend(_children(child))
    return True, uses_item, uses_item_data


def fact_changes(facts: FactLookup) -> FactChanges | None:
    """``facts`` when it offers ``FactChanges``, else None."""
    if hasattr(facts, "committed_version") and hasattr(facts, "pending"):
        return facts  # type: ignore[return-value]
    return None


class _State:
    """The running aggregate of one collection for one instance (see the module)."""

    __slots__ = (
        "bad",
        "entries",
        "errors",
        "false_ids",
        "function",
        "item",
        "items",
        "missing",
        "numbers",
        "strings",
        "token",
        "total",
        "true",
        "version",
    )

    def __init__(self, function: str, token: int, item: dict[str, Any] | None) -> None:
        self.function = function
        self.token = token
        self.version = -1
        self.item = item
        self.entries: dict[str, Any] = {}
        self.items = 0
        self.true = 0
        self.errors = 0
        self.false_ids = SortedList()
        self.missing = SortedList()  # ids whose element was missing (sum/min/max)
        self.bad = SortedList()  # ids whose element has a type the aggregate refuses
        self.total = _ExactSum()
        self.numbers = SortedList()  # (element, id) of min/max
        self.strings = SortedList()

    def put(self, fact_id: str, entry: Any) -> Any:
        """Set the entry of ``fact_id`` (``_ABSENT`` to remove it); return the old one."""
        old = self.entries.pop(fact_id, _ABSENT)
        if old is not _ABSENT:
            self._count(fact_id, old, -1)
        if entry is not _ABSENT:
            self.entries[fact_id] = entry
            self._count(fact_id, entry, 1)
        return old

    def _count(self, fact_id: str, element: Any, sign: int) -> None:
        self.items += sign
        if element is _ERROR:
            self.errors += sign
            return
        missing = isinstance(element, _MissingElement)
        if not missing and element:
            self.true += sign
        elif sign > 0:
            self.false_ids.add(fact_id)
        else:
            self.false_ids.remove(fact_id)
        function = self.function
        if function in ("any", "all", "count"):
            return
        if missing:
            target = self.missing
            value: Any = fact_id
        elif _type_problem(function, element) is not None:
            target, value = self.bad, fact_id
        elif function == "sum":
            self.total.add(element, sign)
            return
        else:
            target = self.strings if type(element) is str else self.numbers
            value = (element, fact_id)
        if sign > 0:
            target.add(value)
        else:
            target.remove(value)

    def value(self, var: str, kind: str) -> Any:
        """The collection's value (a ``_MissingElement`` when missing), as
        ``_collection_value`` gives it; raises ``Recompute`` when the full pass must say."""
        if self.errors or self.bad:
            raise Recompute
        function = self.function
        if function == "count":
            return self.true
        if function == "any":
            return self.true > 0
        if function == "all":
            return self.items > 0 and self.true == self.items
        if self.missing:
            element = self.entries[self.missing[0]]
            return _MissingElement(element.name)
        if function == "sum":
            return self.total.value
        if not self.items:
            return _MissingElement(_empty_name(function, var, kind))
        if self.numbers and self.strings:
            raise Recompute
        ordered = self.numbers or self.strings
        if function == "min":
            return ordered[0][0]
        greatest = ordered[-1][0]
        return ordered[ordered.bisect_left((greatest, ""))][0]  # the first id of equals

    def seen(self, text: str, kind: str, value: Any) -> CollectionSeen:
        false_ids = tuple(islice(self.false_ids, MAX_FALSE_IDS))
        shown = None if isinstance(value, _MissingElement) else _jsonable(value)
        return CollectionSeen(text, self.function, kind, self.items, self.true, false_ids, shown)

    def __len__(self) -> int:
        return len(self.entries)


EntryOf = Callable[[str, Mapping[str, Any]], Any]
"""``entry_of(fact_id, data)``: the element of a fact passing the filter, ``_ABSENT``
when it does not pass, ``_ERROR`` when its element or filter fails."""


class SiteCache:
    """The states of one cacheable collection, per instance (least recently used first)."""

    __slots__ = ("_elements", "_states")

    def __init__(self) -> None:
        self._states: OrderedDict[str | None, _State] = OrderedDict()
        self._elements = 0

    def collect(
        self,
        function: str,
        var: str,
        kind: str,
        text: str,
        changes: FactChanges,
        instance: str | None,
        item: dict[str, Any] | None,
        entry_of: EntryOf,
    ) -> tuple[Any, CollectionSeen]:
        """``(value, seen)`` of the collection over ``changes`` (a ``_MissingElement``
        value when missing); raises ``Recompute`` when the full pass must decide."""
        state = self._synced(function, kind, changes, instance, item, entry_of)
        pending = changes.pending(kind)
        if not pending:
            value = state.value(var, kind)
            return value, state.seen(text, kind, value)
        undo: list[tuple[str, Any]] = []
        try:
            for fact_id in sorted(pending):
                data = changes.get(kind, fact_id)
                entry = _ABSENT if data is None else entry_of(fact_id, data)
                undo.append((fact_id, state.put(fact_id, entry)))
            value = state.value(var, kind)
            return value, state.seen(text, kind, value)
        finally:
            for fact_id, old in reversed(undo):
                state.put(fact_id, old)

    def _synced(
        self,
        function: str,
        kind: str,
        changes: FactChanges,
        instance: str | None,
        item: dict[str, Any] | None,
        entry_of: EntryOf,
    ) -> _State:
        """The instance's state, brought up to the committed facts."""
        token, version = changes.committed_version(kind)
        state = self._states.get(instance)
        changed = None
        if state is not None and state.token == token and state.item == item:
            changed = changes.committed_changes(kind, state.version)
        committed = changes.committed_of_kind(kind)
        if state is None or changed is None:
            if state is not None:
                self._elements -= len(state)
            state = _State(function, token, item)
            for fact_id, data in committed.items():
                state.put(fact_id, entry_of(fact_id, data))
        else:
            before = len(state)
            for fact_id in changed:
                found = committed.get(fact_id)
                state.put(fact_id, _ABSENT if found is None else entry_of(fact_id, found))
            self._elements -= before
        state.version = version
        self._elements += len(state)
        self._states[instance] = state
        self._states.move_to_end(instance)
        while self._elements > MAX_CACHED_ELEMENTS and len(self._states) > 1:
            _, dropped = self._states.popitem(last=False)
            self._elements -= len(dropped)
        return state
