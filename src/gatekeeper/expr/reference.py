"""The reference evaluator: simpleeval walking a checked, lowered clause.

It defines what every ``when`` expression gives. The compiled form (``compiler``) must
agree with it on every input (tests/test_expressions_compiled.py), and hands it the
clauses that fail in any other way than a missing fact or field, for their exact error.
The time analysis (``timing``) evaluates timestamps and bounds with it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from simpleeval import SimpleEval

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.expr.language import (
    _MAX_MESSAGE_FRAGMENT_CHARS,
    _OPERATORS,
    FactLookup,
    _Collection,
    _collection_seen,
    _collection_value,
    _CollectionRun,
    _fact_name,
    _FactRead,
    _Failure,
    _item_of,
    _KindRead,
    _Lookup,
    _Missing,
    _MissingElement,
    _own_data,
    _Plan,
    _rename_missing,
    _render_key,
    _round,
    _Source,
    _type_name,
    _VarRead,
)


def _load_fact(
    fact_data: dict[str, dict[str, Any] | None],
    kind_data: dict[str, dict[str, Any]],
    facts: FactLookup,
    kind: str,
    fact_id: str,
    name: str,
) -> dict[str, Any] | None:
    """The data of fact (``kind``, ``fact_id``), None when there is none; read once per
    evaluation: cached in ``fact_data`` under ``name`` (``"kind.id"``, its ``seen`` name),
    taken from ``kind_data`` when the whole kind was read already."""
    if name in fact_data:
        return fact_data[name]
    if kind in kind_data:
        data = kind_data[kind].get(fact_id)
    else:
        found = facts.get(kind, fact_id)
        data = None if found is None else _own_data(facts, found)
    fact_data[name] = data
    return data


def _load_kind(
    kind_data: dict[str, dict[str, Any]], facts: FactLookup, kind: str
) -> dict[str, dict[str, Any]]:
    """Every fact of ``kind`` as {id: data}; read once per evaluation (cached in
    ``kind_data``)."""
    data = kind_data.get(kind)
    if data is None:
        data = {fact_id: _own_data(facts, found) for fact_id, found in facts.of_kind(kind).items()}
        kind_data[kind] = data
    return data


def _seen(
    fact_data: dict[str, dict[str, Any] | None], kind_data: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``Evaluation.seen``: {"kind": {id: data}} for each kind read as a whole, then
    {"kind.id": data} for each fact read (None for a fact that does not exist)."""
    return {**kind_data, **fact_data} if kind_data else fact_data


@dataclass(frozen=True)
class _Outcome:
    """What evaluating one clause gave: a value, or what was missing, or an error."""

    value: Any = None
    missing: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.missing is not None or self.error is not None


class _Evaluator(SimpleEval):  # type: ignore[misc]  # simpleeval ships no type hints
    """One evaluation run: simpleeval with fact reads, JSON-only lookups and bounded operators.

    Attribute and subscript access never use ``getattr``: they are lowered to ``_Lookup``
    nodes that only index dicts and lists. Fact data read is cached per run (and kept for
    ``seen``).
    """

    def __init__(
        self,
        source: _Source,
        facts: FactLookup,
        now: datetime,
        fact_data: dict[str, dict[str, Any] | None] | None = None,
        kind_data: dict[str, dict[str, Any]] | None = None,
        variables: dict[str, Any] | None = None,
        collections: _CollectionRun | None = None,
    ) -> None:
        super().__init__(operators=_OPERATORS, functions=self._make_functions(), names={})
        self.nodes = {
            ast.Constant: self._eval_constant,
            ast.UnaryOp: self._eval_unaryop,
            ast.BinOp: self._eval_binop,
            ast.BoolOp: self._eval_boolop,
            ast.Compare: self._eval_compare,
            ast.IfExp: self._eval_ifexp,
            ast.Call: self._eval_call,
            ast.List: self._eval_list,
            ast.Tuple: self._eval_tuple,
            ast.Dict: self._eval_dict,
            _KindRead: self._eval_kind_read,
            _FactRead: self._eval_fact_read,
            _Lookup: self._eval_lookup,
            _VarRead: self._eval_var_read,
            _Collection: self._eval_collection,
        }
        self.source = source
        self.facts = facts
        self.now = now
        # Facts read so far, by their ``seen`` name ("kind.id"; shared with the compiled
        # form of the condition when it hands a clause over), and kinds read as a whole.
        self.fact_data = {} if fact_data is None else fact_data
        self.kind_data = {} if kind_data is None else kind_data
        self.computed_ids: dict[_FactRead, str] = {}  # ids of task[expr] reads, for names
        # The variables' values: ``item`` (its {"kind", "id", "data"}) when there is one.
        self.variables: dict[str, Any] = {} if variables is None else variables
        # What each collection evaluated saw, by its site (shared with the compiled form).
        self.collections = _CollectionRun() if collections is None else collections

    def _make_functions(self) -> dict[str, Callable[..., Any]]:
        return {
            "days_since": self._days_since,
            "hours_since": self._hours_since,
            "minutes_since": self._minutes_since,
            "now": self._now,
            "len": len,
            "min": min,
            "max": max,
            "abs": abs,
            "round": _round,
        }

    # -- running -----------------------------------------------------------------------

    def outcome(self, node: ast.expr) -> _Outcome:
        """Evaluate one clause; never raises."""
        try:
            return _Outcome(value=self.eval(self.source.text, previously_parsed=node))
        except _Missing as missing:
            return _Outcome(missing=missing.name)
        except _Failure as failure:
            return _Outcome(error=failure.message)
        except Exception as exc:  # defensive: _eval wraps errors already
            return _Outcome(error=_describe_exception(exc))

    def seen(self) -> dict[str, Any]:
        """{"kind.id": data} for each fact read, {"kind": {id: data}} for each kind read."""
        return _seen(self.fact_data, self.kind_data)

    def _eval(self, node: ast.expr) -> Any:
        try:
            result = self.nodes[type(node)](node)
        except _Missing:
            raise
        except _Failure as failure:
            if failure.located:
                raise
            raise _Failure(f"{failure.message} (in `{self._snippet(node)}`)", True) from None
        except Exception as exc:
            message = f"{_describe_exception(exc)} (in `{self._snippet(node)}`)"
            raise _Failure(message, True) from None
        if callable(result):  # defence in depth: values are JSON data only
            raise _Failure("functions are not values", True)
        return result

    def _snippet(self, node: ast.expr) -> str:
        text = self.source.snippet(node)
        if len(text) > _MAX_MESSAGE_FRAGMENT_CHARS:
            return text[: _MAX_MESSAGE_FRAGMENT_CHARS - 3] + "..."
        return text

    # -- node handlers -----------------------------------------------------------------

    def _eval_call(self, node: ast.Call) -> Any:
        assert isinstance(node.func, ast.Name)  # guaranteed by the checker
        function = self.functions[node.func.id]
        return function(*[self._eval(arg) for arg in node.args])

    def _eval_list(self, node: ast.List) -> list[Any]:
        return [self._eval(item) for item in node.elts]

    def _eval_tuple(self, node: ast.Tuple) -> tuple[Any, ...]:
        return tuple(self._eval(item) for item in node.elts)

    def _eval_dict(self, node: ast.Dict) -> dict[Any, Any]:
        return {
            self._eval(key): self._eval(value)
            for key, value in zip(node.keys, node.values, strict=True)
            if key is not None
        }

    def _eval_kind_read(self, node: _KindRead) -> dict[str, Any]:
        return self._kind(node.kind)

    def _eval_var_read(self, node: _VarRead) -> Any:
        value = self.variables.get(node.name)
        if value is None:
            raise _Missing(node.name)
        return value

    def _eval_collection(self, node: _Collection) -> Any:
        """Every fact of the kind, in id order, bound to the loop variable: those passing
        the filters give their element (see ``_collection_value``). The facts gone over are
        not recorded in ``seen``; ``collections`` gets what the collection saw."""
        found = self.collections.of_kind(self.facts, node.kind)
        elements: list[tuple[str, Any]] = []
        try:
            for fact_id in sorted(found):
                self.variables[node.var] = _item_of(node.kind, fact_id, found[fact_id])
                if not self._passes(node.filters):
                    continue
                try:
                    element = self._eval(node.element)
                except _Missing as missing:
                    name = _rename_missing(missing.name, node.var, node.kind, fact_id)
                    element = _MissingElement(name)
                elements.append((fact_id, element))
        finally:
            self.variables.pop(node.var, None)
        value = _collection_value(node.function, node.var, node.kind, elements)
        text = self.source.snippet(node)
        self.collections.seen[node.site] = _collection_seen(
            text, node.function, node.kind, elements, value
        )
        if isinstance(value, _MissingElement):
            raise _Missing(value.name)
        return value

    def _passes(self, filters: list[ast.expr]) -> bool:
        """Whether the item bound passes every filter (a missing name: it does not)."""
        for condition in filters:
            try:
                if not self._eval(condition):
                    return False
            except _Missing:
                return False
        return True

    def _eval_fact_read(self, node: _FactRead) -> dict[str, Any]:
        fact_id = node.fact_id
        if fact_id is None:
            assert node.key is not None
            fact_id = self._eval(node.key)
            if not isinstance(fact_id, str):
                raise _Failure(f"a fact id must be a string, not {_type_name(fact_id)}")
            self.computed_ids[node] = fact_id
        data = self._fact(node.kind, fact_id)
        if data is None:
            raise _Missing(_fact_name(node.kind, fact_id))
        return data

    def _eval_lookup(self, node: _Lookup) -> Any:
        container = self._eval(node.value)
        key = self._eval(node.key)
        if isinstance(container, Mapping):
            if not isinstance(key, str):
                raise _Failure(f"object keys are strings, not {_type_name(key)}")
            if key not in container:
                raise _Missing(self._path(node.value) + _render_key(key))
            return container[key]
        if isinstance(container, list | tuple):
            if not isinstance(key, int) or isinstance(key, bool):
                raise _Failure(f"array indexes are integers, not {_type_name(key)}")
            if not -len(container) <= key < len(container):
                raise _Missing(self._path(node.value) + _render_key(key))
            return container[key]
        raise _Failure(f"cannot look up {_render_key(key)} in a {_type_name(container)}")

    def _path(self, node: ast.expr) -> str:
        """How a missing item's container is named: normalised for static paths."""
        if isinstance(node, _FactRead):
            fact_id = node.fact_id if node.fact_id is not None else self.computed_ids.get(node)
            if fact_id is not None:
                return _fact_name(node.kind, fact_id)
        if isinstance(node, _KindRead):
            return node.kind
        if isinstance(node, _VarRead):
            return node.name
        if isinstance(node, _Lookup) and isinstance(node.key, ast.Constant):
            return self._path(node.value) + _render_key(node.key.value)
        text = self.source.snippet(node)
        atomic = isinstance(
            node, _FactRead | _Lookup | ast.Call | ast.List | ast.Dict | _Collection
        )
        return text if atomic else f"({text})"

    # -- facts ---------------------------------------------------------------------------

    def _fact(self, kind: str, fact_id: str) -> dict[str, Any] | None:
        name = f"{kind}.{fact_id}"
        return _load_fact(self.fact_data, self.kind_data, self.facts, kind, fact_id, name)

    def _kind(self, kind: str) -> dict[str, Any]:
        return _load_kind(self.kind_data, self.facts, kind)

    # -- time functions ------------------------------------------------------------------

    def _seconds_since(self, timestamp: Any) -> float:
        return (self.now - parse_rfc3339(timestamp)).total_seconds()

    def _days_since(self, timestamp: Any) -> float:
        return self._seconds_since(timestamp) / 86400

    def _hours_since(self, timestamp: Any) -> float:
        return self._seconds_since(timestamp) / 3600

    def _minutes_since(self, timestamp: Any) -> float:
        return self._seconds_since(timestamp) / 60

    def _now(self) -> str:
        return format_rfc3339(self.now)


_PYTHON_TYPE_RE = re.compile(r"'(NoneType|dict|list|tuple|str|int|float|bool)'")
_JSON_TYPE_NAMES = {
    "NoneType": "null",
    "dict": "object",
    "list": "array",
    "tuple": "array",
    "str": "string",
    "int": "number",
    "float": "number",
    "bool": "boolean",
}


def _describe_exception(exc: BaseException) -> str:
    """``Type: message``, with Python type names in TypeErrors given their JSON names."""
    if isinstance(exc, _Failure):
        return exc.message
    text = str(exc)
    if isinstance(exc, TypeError):
        text = _PYTHON_TYPE_RE.sub(lambda m: f"'{_JSON_TYPE_NAMES[m.group(1)]}'", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _combine(plan: _Plan, outcomes: list[_Outcome]) -> _Outcome:
    """The whole expression's outcome from its clauses', with Python's short-circuit rules.

    Clauses are pure, so this equals evaluating the whole tree: the first clause that the
    short-circuit evaluation reaches and that is missing or failed decides the outcome.
    """
    if isinstance(plan, int):
        return outcomes[plan]
    is_and, parts = plan
    result = _Outcome(value=is_and)
    for part in parts:
        result = _combine(part, outcomes)
        if result.failed or bool(result.value) != is_and:
            return result
    return result
