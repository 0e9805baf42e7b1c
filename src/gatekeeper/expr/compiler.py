"""The fast path: each condition becomes one generated Python function, built once.

``compile_condition`` checks the text (``language``), and the ``CompiledCondition`` it
returns evaluates with one call of that function; clauses that fail in any other way than
a missing fact or field go to the reference evaluator (``reference``). Also the public
``next_change_at`` (the analysis itself lives in ``timing``).
"""

from __future__ import annotations

import ast
import functools
import sys
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from gatekeeper.clock import format_rfc3339, parse_rfc3339
from gatekeeper.expr.incremental import (
    _ABSENT as _NOT_PASSING,
)
from gatekeeper.expr.incremental import (
    _ERROR,
    Recompute,
    SiteCache,
    cacheable,
    fact_changes,
)
from gatekeeper.expr.language import (
    _COMPARISONS,
    _KIND_RE,
    _SHARING,
    Clause,
    Condition,
    Evaluation,
    ExpressionError,
    ExpressionProblem,
    FactLookup,
    FactRef,
    Item,
    _add,
    _Checker,
    _clause_text,
    _Collection,
    _collection_seen,
    _collection_value,
    _CollectionRun,
    _fact_name,
    _FactRead,
    _item_value,
    _jsonable,
    _KindRead,
    _Lookup,
    _lower,
    _Missing,
    _MissingElement,
    _mod,
    _mul,
    _own_data,
    _parse,
    _Plan,
    _pow,
    _rename_missing,
    _render_key,
    _round,
    _Source,
    _split,
    _type_name,
    _VarRead,
    _with_item,
)
from gatekeeper.expr.reference import (
    _combine,
    _Evaluator,
    _load_kind,
    _Outcome,
    _seen,
)
from gatekeeper.expr.timing import (
    _find_time_sites,
    _recheck,
    _TimeCode,
    _TimeSites,
)

_SHARED: dict[Any, Any] = {}
"""Immutable parts of conditions already compiled (the and/or plans of the clauses, the
sets of facts read), one object for all equal ones: the conditions of one shape share
their plan, those reading the same facts their ``reads``."""
_MAX_SHARED = 4096


def _shared(value: Any) -> Any:
    """``value``, or the equal value kept before (see ``_SHARED``)."""
    found = _SHARED.get(value)
    if found is None:
        if len(_SHARED) >= _MAX_SHARED:
            _SHARED.clear()
        _SHARED[value] = found = value
    return found


def compile_condition(text: str, *, item_kind: str | None = None) -> Condition:
    """Parse and statically check ``text``; raises ``ExpressionError`` listing every problem.

    ``item_kind`` is the ``for_each`` kind of a per-item rule: the condition may then use
    the current item, named ``item`` (``item.id``, ``item.data.status``; see
    ``gatekeeper.expr.language``), and ``item`` is not a kind. Without it (plain rules),
    ``item`` is an ordinary kind name.

    Returns a ``CompiledCondition`` (``text``, ``reads``, ``uses_time``, ``uses_item``,
    ``item_kind``, ``evaluate``). Each ``ExpressionProblem`` carries a message, the 0-based
    character offset into ``text`` and the offending fragment. Only ``ExpressionError`` is
    ever raised.
    """
    if not isinstance(text, str):
        problem = ExpressionProblem(f"expression must be a string, not {_type_name(text)}", 0, "")
        raise ExpressionError([problem])
    if item_kind is not None and not (isinstance(item_kind, str) and _KIND_RE.match(item_kind)):
        message = f"item kind {item_kind!r} is not a fact kind ([a-z][a-z0-9_]*)"
        raise ExpressionError([ExpressionProblem(message, 0, "")])
    source = _Source(text)
    tree = _parse(source)
    checker = _Checker(source, item_kind)
    checker.check(tree)
    if checker.problems:
        raise ExpressionError(sorted(checker.problems, key=lambda p: p.offset))
    return CompiledCondition(
        text,
        tree,
        _shared(frozenset(checker.reads)),
        checker.uses_time,
        item_kind=item_kind,
        uses_item=checker.uses_item,
        uses_collections=checker.uses_collections,
    )


# --------------------------------------------------------------------------------------
# Compiled evaluation: each condition becomes one Python function, built once


class _Fallback(Exception):
    """Raised by the compiled form when the reference evaluator must decide a clause
    (any failure other than a plainly missing fact or field, or data that is not JSON)."""


_ABSENT = object()
_PLAIN_TYPES = frozenset({dict, list, tuple, str, int, float, bool, type(None)})
"""The types of values the compiled form passes on: JSON data and tuples. Anything else
found in fact data goes to the reference evaluator."""


def _fact_or_missing(
    fact_data: dict[str, dict[str, Any] | None],
    kind_data: dict[str, dict[str, Any]],
    facts: FactLookup,
    name: str,
    kind: str,
    fact_id: str,
) -> dict[str, Any]:
    """The data of fact (``kind``, ``fact_id``), named ``name`` (``"kind.id"``) in
    ``fact_data``; raises ``_Missing`` when there is none."""
    if name in fact_data:  # _load_fact, inlined: this is on every evaluation's path
        data = fact_data[name]
    else:
        if kind in kind_data:
            data = kind_data[kind].get(fact_id)
        else:
            found = facts.get(kind, fact_id)
            if found is None:
                data = None
            elif type(found) is dict and _SHARING.get(type(facts)):
                data = found  # _own_data, inlined
            else:
                data = _own_data(facts, found)
        fact_data[name] = data
    if data is None:
        raise _Missing(_fact_name(kind, fact_id))
    return data


def _fact_at(
    fact_data: dict[str, dict[str, Any] | None],
    kind_data: dict[str, dict[str, Any]],
    facts: FactLookup,
    kind: str,
    fact_id: Any,
) -> dict[str, Any]:
    """``kind[expr]``: the data of the fact whose id ``expr`` computed."""
    if not isinstance(fact_id, str):
        raise _Fallback
    return _fact_or_missing(fact_data, kind_data, facts, kind + "." + fact_id, kind, fact_id)


def _get(container: Any, key: Any, prefix: str | None) -> Any:
    """``container[key]`` on JSON data, as ``_Evaluator._eval_lookup`` does it: a string key
    of a dict or an integer index of a list/tuple, nothing else (never ``getattr``).
    ``prefix`` names the container for a ``_Missing``; None when only run time knows it."""
    container_type = type(container)
    if container_type is dict:
        if type(key) is not str:
            raise _Fallback
        value = container.get(key, _ABSENT)
        if value is _ABSENT:
            if prefix is None:
                raise _Fallback
            raise _Missing(prefix + _render_key(key))
    elif container_type is list or container_type is tuple:
        if type(key) is not int:
            raise _Fallback
        if not -len(container) <= key < len(container):
            if prefix is None:
                raise _Fallback
            raise _Missing(prefix + _render_key(key))
        value = container[key]
    else:
        raise _Fallback
    if type(value) not in _PLAIN_TYPES:
        raise _Fallback
    return value


def _unbound(name: str) -> Any:
    """A variable with no value (``item`` evaluated without an item): missing."""
    raise _Missing(name)


class _Site:
    """One collection of a compiled condition: its ``function``, loop variable ``var``,
    ``kind``, source ``text``, and the compiled functions of its ``element`` and of its
    filters (``accepts``, None without filters), each called as
    ``f(fact_data, kind_data, facts, now, values, item, collections, loop_value)``.
    ``key`` is its position in the text (``_Collection.site``). ``cache`` keeps its value
    up to date by deltas (``gatekeeper.expr.incremental``) when its element and filters
    read nothing but the loop variable, ``item`` and constants (else None);
    ``uses_item`` says whether they read ``item`` (then the cache keeps a state per item),
    ``uses_item_data`` whether more of it than ``item.id``/``item.kind`` (then a state is
    rebuilt when the item's data changes).
    """

    __slots__ = (
        "accepts",
        "cache",
        "element",
        "function",
        "key",
        "kind",
        "text",
        "uses_item",
        "uses_item_data",
        "var",
    )

    def __init__(
        self,
        node: _Collection,
        text: str,
        element: Callable[..., Any],
        accepts: Callable[..., Any] | None,
    ) -> None:
        self.key = node.site
        self.function = node.function
        self.var = node.var
        self.kind = node.kind
        self.text = text
        self.element = element
        self.accepts = accepts
        can_cache, self.uses_item, self.uses_item_data = cacheable(node)
        self.cache = SiteCache() if can_cache else None


def _collect(
    site: _Site,
    fact_data: dict[str, Any],
    kind_data: dict[str, Any],
    facts: FactLookup,
    now: datetime,
    values: tuple[Any, ...],
    item: dict[str, Any] | None,
    collections: _CollectionRun,
) -> Any:
    """The value of a collection (as ``_Evaluator._eval_collection`` gives it), recording
    what it saw in ``collections``: by deltas when the collection is cacheable and
    ``facts`` offers ``FactChanges``, else by a pass over every fact of the kind."""
    kind, var, element_of, accepts = site.kind, site.var, site.element, site.accepts
    cache = site.cache
    changes = None if cache is None else fact_changes(facts)
    if cache is not None and changes is not None:

        def entry_of(fact_id: str, data: Mapping[str, Any]) -> Any:
            bound = {"kind": kind, "id": fact_id, "data": dict(data)}
            if accepts is not None:
                try:
                    if not accepts(
                        fact_data, kind_data, facts, now, values, item, collections, bound
                    ):
                        return _NOT_PASSING
                except _Missing:
                    return _NOT_PASSING
                except Exception:
                    return _ERROR
            try:
                return element_of(
                    fact_data, kind_data, facts, now, values, item, collections, bound
                )
            except _Missing as missing:
                return _MissingElement(_rename_missing(missing.name, var, kind, fact_id))
            except Exception:
                return _ERROR

        instance, cached_item = (None, None)
        if site.uses_item:
            instance = None if item is None else item["id"]
            cached_item = item if site.uses_item_data else None
        try:
            value, seen = cache.collect(
                site.function, var, kind, site.text, changes, instance, cached_item, entry_of
            )
        except Recompute:
            pass
        else:
            collections.seen[site.key] = seen
            if isinstance(value, _MissingElement):
                raise _Missing(value.name)
            return value
    found = collections.of_kind(facts, kind)
    elements: list[tuple[str, Any]] = []
    for fact_id in sorted(found):
        bound = {"kind": kind, "id": fact_id, "data": dict(found[fact_id])}
        if accepts is not None:
            try:
                if not accepts(fact_data, kind_data, facts, now, values, item, collections, bound):
                    continue
            except _Missing:
                continue
        try:
            element = element_of(fact_data, kind_data, facts, now, values, item, collections, bound)
        except _Missing as missing:
            element = _MissingElement(_rename_missing(missing.name, var, kind, fact_id))
        elements.append((fact_id, element))
    value = _collection_value(site.function, var, kind, elements)
    collections.seen[site.key] = _collection_seen(site.text, site.function, kind, elements, value)
    if isinstance(value, _MissingElement):
        raise _Missing(value.name)
    return value


def _dict_put(target: dict[Any, Any], key: Any, value: Any) -> dict[Any, Any]:
    """One more item of a dict literal (keys and values are evaluated in source order)."""
    target[key] = value
    return target


def _min(*args: Any) -> Any:
    result = min(*args)
    if type(result) not in _PLAIN_TYPES:
        raise _Fallback
    return result


def _max(*args: Any) -> Any:
    result = max(*args)
    if type(result) not in _PLAIN_TYPES:
        raise _Fallback
    return result


_INSTANTS: dict[str, datetime] = {}
"""RFC 3339 timestamps already parsed (``parse_rfc3339`` is pure; a datetime is immutable)."""
_MAX_INSTANTS = 4096


def _instant(timestamp: Any) -> datetime:
    """``parse_rfc3339(timestamp)``, remembered for the next evaluations."""
    found = _INSTANTS.get(timestamp)  # an unhashable timestamp raises: the reference decides
    if found is None:
        found = parse_rfc3339(timestamp)
        if type(timestamp) is str:
            if len(_INSTANTS) >= _MAX_INSTANTS:
                _INSTANTS.clear()
            _INSTANTS[timestamp] = found
    return found


def _days_since(now: datetime, timestamp: Any) -> float:
    start = _INSTANTS.get(timestamp) or _instant(timestamp)
    return (now - start).total_seconds() / 86400


def _hours_since(now: datetime, timestamp: Any) -> float:
    start = _INSTANTS.get(timestamp) or _instant(timestamp)
    return (now - start).total_seconds() / 3600


def _minutes_since(now: datetime, timestamp: Any) -> float:
    start = _INSTANTS.get(timestamp) or _instant(timestamp)
    return (now - start).total_seconds() / 60


def _missing_or_raise(exc: Exception) -> None:
    """None (the value of a missing time site) when ``exc`` is ``_Missing``; else raises it
    again (the reference then decides)."""
    if type(exc) is _Missing:
        return None
    raise exc


def _value_clause(values: tuple[Any, ...], index: int, value: Any) -> Clause:
    """The ``Clause`` of clause ``index`` of the condition whose values are ``values``
    (``_clause_text``), that gave ``value``."""
    return Clause(_clause_text(values, index), _jsonable(value))


def _note_failure(
    failures: dict[int, Exception] | None, index: int, exc: Exception
) -> dict[int, Exception]:
    if failures is None:
        failures = {}
    failures[index] = exc
    return failures


_COMPILED_FUNCTIONS: dict[str, tuple[str, bool]] = {
    # language function -> (helper in the compiled namespace, takes "now" first)
    "days_since": ("_days_since", True),
    "hours_since": ("_hours_since", True),
    "minutes_since": ("_minutes_since", True),
    "now": ("_now_text", True),
    "len": ("_len", False),
    "min": ("_min", False),
    "max": ("_max", False),
    "abs": ("_abs", False),
    "round": ("_round", False),
}

_COMPILED_OPERATORS: dict[type[ast.operator], str] = {
    ast.Add: "_add",
    ast.Mult: "_mul",
    ast.Pow: "_pow",
    ast.Mod: "_mod",
}
"""The bounded binary operators; ``-``, ``/`` and ``//`` are native."""

_RUNTIME: dict[str, Any] = {
    "__builtins__": {},
    "_Error": Exception,
    "_fact": _fact_or_missing,
    "_fact_at": _fact_at,
    "_kind": _load_kind,
    "_get": _get,
    "_dict": dict,
    "_type": type,
    "_PLAIN": _PLAIN_TYPES,
    "_ABSENT": _ABSENT,
    "_Evaluation": Evaluation,
    "_new": object.__new__,
    **{
        f"_set{name if name[0] == '_' else '_' + name}": Evaluation.__dict__[name].__set__
        for name in Evaluation.__slots__
    },
    "_add": _add,
    "_mul": _mul,
    "_pow": _pow,
    "_mod": _mod,
    "_dict_put": _dict_put,
    "_days_since": _days_since,
    "_hours_since": _hours_since,
    "_minutes_since": _minutes_since,
    "_now_text": format_rfc3339,
    "_len": len,
    "_min": _min,
    "_max": _max,
    "_abs": abs,
    "_round": _round,
    "_note": _note_failure,
    "_clause": _value_clause,
    "_lost": _missing_or_raise,
    "_unbound": _unbound,
    "_collect": _collect,
}
"""Everything compiled code can name besides its own constants: no builtins."""

_PARAMETERS = ("_fd", "_kd", "_facts", "_now", "_D", "_it", "_cs")
"""The compiled function's parameters: fact data read (by "kind.id"), kinds read, the
``FactLookup``, the evaluation's "now", the condition's values, the current item's
value (``{"kind", "id", "data"}``, or None) and what the collections saw (by site)."""
_SITE_PARAMETERS = (*_PARAMETERS, "_lv")
"""The parameters of a collection's element and filter functions: those of the
condition's function, and the loop variable's value."""


class _Unsupported(Exception):
    """A node the code generator does not know (the condition then runs on the reference)."""


def _lookup_prefix(source: _Source, node: ast.expr) -> str | None:
    """How ``_Evaluator._path`` names the container ``node`` when something in it is
    missing, or None when that name depends on a fact id computed at run time."""
    if isinstance(node, _FactRead):
        if node.fact_id is None:
            return None
        return _fact_name(node.kind, node.fact_id)
    if isinstance(node, _KindRead):
        return node.kind
    if isinstance(node, _VarRead):
        return node.name
    if isinstance(node, _Lookup) and isinstance(node.key, ast.Constant):
        inner = _lookup_prefix(source, node.value)
        return None if inner is None else inner + _render_key(node.key.value)
    text = source.snippet(node)
    atomic = isinstance(node, _FactRead | _Lookup | ast.Call | ast.List | ast.Dict | _Collection)
    return text if atomic else f"({text})"


_NATIVE_BINARY: dict[type[ast.operator], str] = {ast.Sub: "-", ast.Div: "/", ast.FloorDiv: "//"}
_NATIVE_UNARY: dict[type[ast.unaryop], str] = {ast.Not: "not ", ast.USub: "-", ast.UAdd: "+"}


class _CodeGenerator:
    """Turns a lowered clause into Python source over the compiled namespace.

    Fact reads become calls of the cached accessors, lookups calls of ``_get`` (JSON only),
    ``+ * ** %`` the bounded operators, functions their helpers; comparisons, ``and``/
    ``or``/``not``, unary ``-``/``+``, ``- / //``, ``if``/``else``, lists and tuples stay
    native Python, whose semantics the reference evaluator shares (same operations, same
    order). The source names only the compiled namespace, the function's parameters and
    parameter defaults holding the values taken from the text (``const``): no text of the
    expression is ever pasted into it. Every operand is parenthesised.
    """

    def __init__(self, source: _Source, first: int) -> None:
        self.source = source
        self.temporaries = 0
        self.first = first
        self.constants: list[Any] = []
        self.positions: dict[tuple[str, type, object], int] = {}
        """Where each constant already among ``constants`` is (by type and value)."""
        self.variables = {"item": "_it"}
        """Variables of the language -> the parameter holding their value."""
        self.sites = 0

    def const(self, value: object, role: str = "") -> str:
        """The source naming ``value``: a keyword for None/True/False, else an item of the
        condition's values (``_D[first]``, ``_D[first + 1]``...), so that conditions
        differing only in their constants share their code. A constant with a ``role``
        (``"kind"``, ``"id"``, ``"name"``, ``"field"``, ``"prefix"``, ``"var"``: what
        names facts and fields, not a literal of the text) equal to one of the same role
        already among the values is named by the same item: a condition reading one fact
        several times keeps its id, name and field names once. Literals are never merged,
        so that their values never change the code."""
        if value is None or isinstance(value, bool):
            return repr(value)
        if not isinstance(value, str | int | float):
            raise _Unsupported(f"constant of type {type(value).__name__}")
        key = (role, type(value), repr(value) if isinstance(value, float) else value)
        position = self.positions.get(key) if role else None
        if position is None:
            if isinstance(value, str):
                # One shared object per string: the rules reading one fact name its id
                # (and "kind.id") with the very same object, the key of the evaluation's
                # fact data, so that lookups find it by identity and touch one string.
                value = sys.intern(value)
            position = len(self.constants)
            self.constants.append(value)
            if role:
                self.positions[key] = position
        return f"_D[{self.first + position}]"

    def forget_from(self, count: int) -> None:
        """Drop the constants after the first ``count`` (the code naming them is not kept)."""
        del self.constants[count:]
        self.positions = {key: at for key, at in self.positions.items() if at < count}

    def value(self, value: object) -> str:
        """The source naming ``value``, any object, as an item of the condition's values."""
        self.constants.append(value)
        return f"_D[{self.first + len(self.constants) - 1}]"

    def _collection(self, node: _Collection) -> str:
        saved = self.variables
        self.variables = {**saved, node.var: "_lv"}
        try:
            element = _site_function(self.expr(node.element))
            accepts = None
            if node.filters:
                accepts = _site_function(" and ".join(self.expr(f) for f in node.filters))
        finally:
            self.variables = saved
        if element is None or (node.filters and accepts is None):
            raise _Unsupported("collection")
        self.sites += 1
        site = _Site(node, self.source.snippet(node), element, accepts)
        return f"_collect({self.value(site)}, _fd, _kd, _facts, _now, _D, _it, _cs)"

    def expr(self, node: ast.expr) -> str:
        if isinstance(node, _Collection):
            return self._collection(node)
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, _KindRead):
            return f"_kind(_kd, _facts, {self.const(node.kind, 'kind')})"
        if isinstance(node, _FactRead):
            return self._fact_read(node)
        if isinstance(node, _VarRead):
            # a variable's value is a non-empty dict, or None when unbound
            return f"({self.variables[node.name]} or _unbound({self.const(node.name, 'var')}))"
        if isinstance(node, _Lookup):
            return self._lookup(node)
        if isinstance(node, ast.BinOp):
            left, right = self.expr(node.left), self.expr(node.right)
            helper = _COMPILED_OPERATORS.get(type(node.op))
            if helper is not None:
                return f"{helper}({left}, {right})"
            return f"({left} {_NATIVE_BINARY[type(node.op)]} {right})"
        if isinstance(node, ast.UnaryOp):
            return f"({_NATIVE_UNARY[type(node.op)]}{self.expr(node.operand)})"
        if isinstance(node, ast.BoolOp):
            joiner = " and " if isinstance(node.op, ast.And) else " or "
            return "(" + joiner.join(self.expr(value) for value in node.values) + ")"
        if isinstance(node, ast.Compare):
            parts = [self.expr(node.left)]
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                parts += [_COMPARISONS[type(op)], self.expr(comparator)]
            return "(" + " ".join(parts) + ")"
        if isinstance(node, ast.IfExp):
            test, body, orelse = (self.expr(n) for n in (node.test, node.body, node.orelse))
            return f"({body} if {test} else {orelse})"
        if isinstance(node, ast.Call):
            return self._function_call(node)
        if isinstance(node, ast.List):
            return "[" + ", ".join(self.expr(item) for item in node.elts) + "]"
        if isinstance(node, ast.Tuple):
            return "(" + "".join(self.expr(item) + ", " for item in node.elts) + ")"
        if isinstance(node, ast.Dict):
            return self._dict(node)
        raise _Unsupported(type(node).__name__)

    def _lookup(self, node: _Lookup) -> str:
        prefix = _lookup_prefix(self.source, node.value)
        key = node.key
        if not (isinstance(key, ast.Constant) and type(key.value) is str):
            value, key_source = self.expr(node.value), self.expr(key)
            return f"_get({value}, {key_source}, {self.const(prefix, 'prefix')})"
        # ``.field`` of a dict holding JSON data, the usual lookup, is done inline; "_get"
        # does the rest (a missing field, another container, data that is not JSON)
        # exactly as for any other key.
        self.temporaries += 1
        found, field = f"_r{self.temporaries}", self.const(key.value, "field")
        base = node.value
        if isinstance(base, _FactRead) and base.fact_id is not None:
            # The data of a fact is always a dict: no need to check the container's type.
            data = self.expr(base)
            name = self.const(f"{base.kind}.{base.fact_id}", "name")
            return (
                f"({found} if _type({found} := {data}.get({field}, _ABSENT))"
                f" in _PLAIN else _get(_fd[{name}], {field}, {self.const(prefix, 'prefix')}))"
            )
        held = f"_c{self.temporaries}"
        container = self.expr(base)
        return (
            f"({found} if _type({held} := {container}) is _dict"
            f" and _type({found} := {held}.get({field}, _ABSENT)) in _PLAIN"
            f" else _get({held}, {field}, {self.const(prefix, 'prefix')}))"
        )

    def _fact_read(self, node: _FactRead) -> str:
        if node.fact_id is None:
            assert node.key is not None
            kind = self.const(node.kind, "kind")
            return f"_fact_at(_fd, _kd, _facts, {kind}, {self.expr(node.key)})"
        name = self.const(f"{node.kind}.{node.fact_id}", "name")
        # A cached non-empty object is the common case; "_fact" handles the rest (the
        # first read, an empty object, a fact that does not exist).
        kind, fact_id = self.const(node.kind, "kind"), self.const(node.fact_id, "id")
        return f"(_fd.get({name}) or _fact(_fd, _kd, _facts, {name}, {kind}, {fact_id}))"

    def _function_call(self, node: ast.Call) -> str:
        if not isinstance(node.func, ast.Name) or node.func.id not in _COMPILED_FUNCTIONS:
            raise _Unsupported("call")
        helper, takes_now = _COMPILED_FUNCTIONS[node.func.id]
        args = [*(["_now"] if takes_now else []), *(self.expr(arg) for arg in node.args)]
        return f"{helper}({', '.join(args)})"

    def _dict(self, node: ast.Dict) -> str:
        if any(key is None for key in node.keys):
            raise _Unsupported("dict unpacking")
        pairs = [
            (self.expr(key), self.expr(value))
            for key, value in zip(node.keys, node.values, strict=True)
            if key is not None
        ]
        if not pairs:
            return "{}"
        (key, value), *rest = pairs
        # {k1: v1, k2: v2} as _dict_put({k1: v1}, k2, v2): each key is inserted before the
        # next pair is evaluated, as the reference does (an unhashable key fails first).
        result = f"{{{key}: {value}}}"
        for key, value in rest:
            result = f"_dict_put({result}, {key}, {value})"
        return result


def _plan_source(plan: _Plan) -> str:
    """The plan as a Python expression over the clause values ``_v0``, ``_v1``..."""
    if isinstance(plan, int):
        return f"_v{plan}"
    is_and, parts = plan
    return "(" + (" and " if is_and else " or ").join(_plan_source(p) for p in parts) + ")"


_Run = Callable[
    [dict[str, Any], dict[str, Any], FactLookup, datetime, tuple[Any, ...], Any, Any],
    "Evaluation | tuple[dict[int, Exception], tuple[Any, ...]]",
]


_SHAPES: dict[str, _Run] = {}
"""Compiled functions by shape (the generated source, constants left out): conditions that
differ only in their constants (ids, keys, numbers, strings) share one."""
_MAX_SHAPES = 4096


def _function(text: str) -> Any:
    """The function ``text`` (``def _run(...): ...``) defines, compiled with ``_RUNTIME``
    as its globals; shared by equal texts (``_SHAPES``). None when it does not compile
    (defensive)."""
    run = _SHAPES.get(text)
    if run is None:
        try:
            module = compile(text, "<when>", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # defensive
            return None
        code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
        run = types.FunctionType(code, _RUNTIME, "_run")
        if len(_SHAPES) >= _MAX_SHAPES:
            _SHAPES.clear()
        _SHAPES[text] = run
    return run


def _site_function(expression: str) -> Callable[..., Any] | None:
    """A collection's element or filter as a function of ``_SITE_PARAMETERS``."""
    function: Callable[..., Any] | None = _function(
        f"def _run({', '.join(_SITE_PARAMETERS)}):\n    return {expression}\n"
    )
    return function


_TIME_CODES: dict[tuple[object, ...], _TimeCode] = {}
"""The compiled time sites by shape (see ``_TimeCode``)."""


def _time_code(generator: _CodeGenerator, sites: _TimeSites) -> _TimeCode | None:
    """The time sites as code over the condition's values (their constants added to
    ``generator``); None when one of their expressions cannot be compiled or holds a
    collection (the reference then evaluates them)."""
    nodes = [*sites.unsolved]
    for threshold in sites.thresholds:
        nodes += [threshold.timestamp, threshold.bound]
    constants, collections = len(generator.constants), generator.sites
    try:
        expressions = [generator.expr(node) for node in nodes]
    except (_Unsupported, RecursionError, MemoryError):
        expressions = None
    if expressions is None or generator.sites != collections:
        generator.forget_from(constants)
        generator.sites = collections
        return None
    lines = [f"def _run({', '.join(_PARAMETERS)}):"]
    for index, expression in enumerate(expressions):
        lines += [
            "    try:",
            f"        _t{index} = {expression}",
            "    except _Error as _e:",
            f"        _t{index} = _lost(_e)",
        ]
    lines.append("    return (" + "".join(f"_t{i}, " for i in range(len(expressions))) + ")")
    text = "\n".join(lines) + "\n"
    thresholds = tuple((t.seconds_per_unit, t.op) for t in sites.thresholds)
    key = (text, sites.always_poll, len(sites.unsolved), thresholds)
    code = _TIME_CODES.get(key)
    if code is None:
        function = _function(text)
        if function is None:
            return None
        if len(_TIME_CODES) >= _MAX_SHAPES:
            _TIME_CODES.clear()
        code = _TimeCode(function, sites.always_poll, len(sites.unsolved), thresholds)
        _TIME_CODES[key] = code
    return code


def _compile_clauses(
    source: _Source,
    leaves: tuple[ast.expr, ...],
    plan: _Plan,
    clause_texts: tuple[str, ...],
    spans: tuple[tuple[int, int], ...],
    sites: _TimeSites | None = None,
) -> tuple[_Run, tuple[Any, ...], _TimeCode | None] | None:
    """``(run, values, time code)``: one Python function evaluating every clause of a
    condition, the condition's values it takes, and the compiled form of the time
    ``sites`` when given and possible (see ``_TimeCode``; it takes the same values); None
    when a clause holds something the code generator does not know (then the reference
    evaluates).

    ``run(fact_data, kind_data, facts, now, values, item, collections)`` returns the
    ``Evaluation`` when every clause gave a value, else ``(failures, clause_values)`` with
    ``failures`` mapping a clause index to what it raised (``_Missing``: that is its
    outcome; anything else: the reference decides) and ``clause_values`` the clause values
    (None for those that failed).

    The source is ``def _run(...): ...``, compiled once per shape (``_SHAPES``) with
    ``_RUNTIME`` as its globals (no builtins): conditions of one shape share the function.
    ``values`` (``_D`` in the source) is one flat tuple: the condition's text, two items
    per clause giving its text (``language._clause_text``: its offsets in the text when
    ``spans`` gives it as written, as it mostly is: no string of its own), then the
    constants (see ``_CodeGenerator.const``). When every clause is True or False (the
    common case), the ``Evaluation`` keeps their values and ``values`` itself for the
    texts (``Evaluation.clauses`` makes the ``Clause`` objects when read): no clause
    object per condition nor per evaluation. An evaluation touches only the items it uses
    and no other object of its condition (no function, defaults or closure cells): with
    thousands of rules, most of a rule's objects are out of the CPU caches when a fact
    wakes it, and each object touched costs a cache miss.
    """
    count = len(leaves)
    generator = _CodeGenerator(source, 1 + 2 * count)
    try:
        expressions = [generator.expr(leaf) for leaf in leaves]
    except (_Unsupported, RecursionError, MemoryError):  # the checker rules both out
        return None
    lines = [f"    def _run({', '.join(_PARAMETERS)}):", "        _failed = None"]
    for index, expression in enumerate(expressions):
        lines += [
            "        try:",
            f"            _v{index} = {expression}",
            "        except _Error as _e:",
            f"            _v{index} = None",
            f"            _failed = _note(_failed, {index}, _e)",
        ]
    boolean = " and ".join(f"(_v{i} is True or _v{i} is False)" for i in range(count))
    clauses = "".join(f"_clause(_D, {i}, _v{i}), " for i in range(count))
    values = "".join(f"_v{i}, " for i in range(count))
    lines += [
        "        if _failed is not None:",
        f"            return _failed, ({values})",
        # Evaluation(value, clauses, (), None, seen, collections) without the frozen
        # dataclass's __init__ (six object.__setattr__ calls): the very same instance, its
        # slots set through their descriptors, built twice as fast.
        "        _result = _new(_Evaluation)",
        f"        _set_value(_result, True if {_plan_source(plan)} else False)",
        f"        if {boolean}:",
        f"            _set_clauses(_result, {_boolean_values(count)})",
        "            _set_texts(_result, _D)",
        "        else:",
        f"            _set_clauses(_result, ({clauses}))",
        "            _set_texts(_result, None)",
        "        _set_missing(_result, ())",
        "        _set_error(_result, None)",
        "        _set_seen(_result, {**_kd, **_fd} if _kd else _fd)",
        "        _set_collections(_result, " + ("_cs.collections())" if generator.sites else "())"),
        "        return _result",
    ]
    text = "\n".join(line[4:] for line in lines)
    run = _function(text)
    if run is None:
        return None
    time_code = None if sites is None else _time_code(generator, sites)
    text = source.text
    refs: list[Any] = []
    for clause, (start, end) in zip(clause_texts, spans, strict=True):
        refs += (start, end) if text[start:end] == clause else (_shared(clause), None)
    condition_values = (text, *refs, *generator.constants)
    return run, condition_values, time_code


_MAX_TABLED_CLAUSES = 6
"""Conditions of up to this many clauses take their clauses' values, when all are True or
False, from ``_BOOLEANS`` instead of building a tuple per evaluation."""


def _boolean_table(depth: int, prefix: tuple[bool, ...] = ()) -> Any:
    """Nested pairs indexed by booleans: ``table[a][b]`` is ``(a, b)`` for depth 2."""
    if depth == 0:
        return prefix
    return tuple(_boolean_table(depth - 1, (*prefix, value)) for value in (False, True))


_BOOLEANS = tuple(_boolean_table(depth) for depth in range(_MAX_TABLED_CLAUSES + 1))
"""``_BOOLEANS[n][v0][v1]...`` is the tuple ``(v0, v1, ...)`` of ``n`` booleans: one
shared tuple for every evaluation whose clauses gave those values (an evaluation kept in
a plan holds no tuple of its own)."""
_RUNTIME["_BOOLEANS"] = _BOOLEANS


def _boolean_values(count: int) -> str:
    """The source of the tuple of the ``count`` clause values ``_v0``... (each True or
    False): read from ``_BOOLEANS`` when it has them, else built."""
    if count > _MAX_TABLED_CLAUSES:
        return "(" + "".join(f"_v{i}, " for i in range(count)) + ")"
    return f"_BOOLEANS[{count}]" + "".join(f"[_v{i}]" for i in range(count))


class _Pending:
    """The compiled form of a condition not evaluated yet."""


_PENDING = _Pending()
_NO_TIME_CODE = _Pending()
"""A condition's ``_time`` when its time sites have no compiled form (the reference
evaluator solves them, from the text parsed again)."""


class CompiledCondition:
    """A checked ``when`` expression, ready to evaluate; made by ``compile_condition``.

    Attributes: ``text`` (the source), ``reads`` (the ``FactRef`` keys it reads; id None
    for a kind-level read), ``uses_time`` (calls ``days_since``/``hours_since``/
    ``minutes_since``/``now``), ``item_kind`` (the ``for_each`` kind it was compiled for,
    or None), ``uses_item`` (reads ``item``), ``uses_collections`` (has a collection such
    as ``all(t.data.done for t in task)``), ``clause_texts`` (the top-level and/or
    leaves). Immutable.
    """

    __slots__ = (  # what an evaluation reads first, together  # noqa: RUF023
        "_compiled",
        "_values",
        "_plan",
        "_time",
        "_kind",
        "reads",
        "text",
        "uses_collections",
    )

    text: str
    reads: frozenset[FactRef]
    uses_collections: bool
    _kind: tuple[str | None, bool, bool]
    """``(item_kind, uses_item, uses_time)``, one tuple for all equal ones."""
    _plan: _Plan
    _compiled: _Run | _Pending | None
    _values: tuple[Any, ...]
    """The compiled function's values (see ``_compile_clauses``); when there is none
    (``_compiled`` None), the lowered clauses the reference evaluator walks."""
    _time: _TimeCode | _Pending | tuple[int, ...] | None

    def __init__(
        self,
        text: str,
        tree: ast.expr,
        reads: frozenset[FactRef],
        uses_time: bool,
        *,
        item_kind: str | None = None,
        uses_item: bool = False,
        uses_collections: bool = False,
    ) -> None:
        leaves: list[ast.expr] = []
        plan = _shared(_split(tree, leaves))
        bound = _bound_names(item_kind)
        lowered = tuple(_lower(leaf, bound) for leaf in leaves)
        values = {
            "text": text,
            "reads": reads,
            "_kind": _shared((item_kind, uses_item, uses_time)),
            "uses_collections": uses_collections,
            "_plan": plan,
            # The syntax tree is most of a condition's memory (several KB): it is not kept.
            # The Python function is generated at the first evaluation (``gatekeeper check``
            # never evaluates), from the text parsed again, and with it the clauses' texts
            # (in the clauses it hands out); so is the tree the reference
            # evaluator walks, when it is needed (rarely).
            "_compiled": _PENDING,
            "_values": (),
            # Deadline solving: None without time sites; else the indexes of the clauses
            # that have some, until their compiled form (``_TimeCode``, shared by a shape)
            # is made with the compiled function.
            "_time": _timed_clauses(lowered),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def item_kind(self) -> str | None:
        """The ``for_each`` kind the condition was compiled for, or None."""
        return self._kind[0]

    @property
    def uses_item(self) -> bool:
        """Whether the condition reads ``item``."""
        return self._kind[1]

    @property
    def uses_time(self) -> bool:
        """Whether the condition calls ``days_since``/``hours_since``/``minutes_since``/
        ``now``."""
        return self._kind[2]

    @property
    def _run(self) -> _Run | None:
        """The compiled function (generated on first use; shared by the conditions of one
        shape, called with ``_values``); None when the reference evaluator does all the
        work."""
        compiled = self._compiled
        return self._compile() if isinstance(compiled, _Pending) else compiled

    def _compile(self) -> _Run | None:
        """Generate and keep the compiled form (the same on every call: only the first one
        generates). Without one, the lowered clauses are kept for the reference."""
        leaves, texts, spans = _parse_leaves(self.text, self.item_kind)
        timed = self._time
        sites = None
        if isinstance(timed, tuple):  # the clauses without time sites add none
            sites = _find_time_sites(tuple(leaves[index] for index in timed))
        source = _Source(self.text)
        compiled = _compile_clauses(source, leaves, self._plan, texts, spans, sites)
        time_code = None
        if compiled is None:
            object.__setattr__(self, "_values", leaves)
            run = None
        else:
            run, values, time_code = compiled
            object.__setattr__(self, "_values", values)
        if self._time is not None:
            object.__setattr__(self, "_time", _NO_TIME_CODE if time_code is None else time_code)
        object.__setattr__(self, "_compiled", run)
        return run

    @property
    def _source(self) -> _Source:
        """The text's positions, for the reference evaluator's messages (built on demand)."""
        return _Source(self.text)

    @property
    def _leaves(self) -> tuple[ast.expr, ...]:
        """The lowered clauses the reference evaluator walks: kept when there is no
        compiled form, else parsed again from ``text`` (the same tree: parsing is
        deterministic), the last few cached."""
        if self._compiled is None:
            return self._values
        return _lowered_leaves(self.text, self.item_kind)

    @property
    def clause_texts(self) -> tuple[str, ...]:
        """The texts of the top-level and/or leaves, in order: those of the true clauses
        among the values once compiled, else from the text parsed again."""
        compiled = self._compiled
        if compiled is None or isinstance(compiled, _Pending):
            return _clause_texts(self.text, self.item_kind)
        values = self._values
        return tuple(_clause_text(values, i) for i in range(_clause_count(self._plan)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CompiledCondition is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return f"CompiledCondition({self.text!r})"

    def __copy__(self) -> CompiledCondition:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledCondition:
        return self  # immutable

    def __reduce__(self) -> tuple[Callable[[str, str | None], Condition], tuple[str, str | None]]:
        return (_recompile, (self.text, self.item_kind))

    def evaluate(self, facts: FactLookup, now: datetime, item: Item | None = None) -> Evaluation:
        """Evaluate against ``facts`` at time ``now`` (a naive ``now`` is taken as UTC), for
        the current ``item`` of a per-item rule (the value of ``item``; a condition that
        uses ``item`` evaluated without one finds it missing: ``missing == ("item",)``).
        When an item is given, ``seen`` records it as a fact read, under ``"kind.id"``.

        Never raises: missing facts/fields and run-time errors give ``value=False`` with
        ``missing`` / ``error`` set (see ``Evaluation``). Every clause is evaluated for the
        explanation; the overall value follows Python's short-circuit ``and``/``or``.

        One call of the compiled function; a clause that fails other than by a missing
        fact or field (or meets fact data that is not JSON) is evaluated again by the
        simpleeval reference, over the facts already read, for its exact outcome.
        """
        run = self._compiled
        if isinstance(run, _Pending):
            run = self._compile()
        if run is None:
            return _evaluate_reference(self, facts, now, item)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        fact_data: dict[str, dict[str, Any] | None] = {}
        kind_data: dict[str, dict[str, Any]] = {}
        it = None if item is None else _item_value(item)
        collections = _CollectionRun() if self.uses_collections else None
        try:
            result = run(fact_data, kind_data, facts, now, self._values, it, collections)
            if isinstance(result, Evaluation):  # every clause gave a value: the common case
                if it is not None:
                    _with_item(result.seen, it)  # type: ignore[arg-type]  # a fresh dict
                return result
            failures, values = result
            evaluator: _Evaluator | None = None
            outcomes: list[_Outcome] = []
            for index, leaf in enumerate(self._leaves):
                failure = failures.get(index)
                if failure is None:
                    outcomes.append(_Outcome(value=values[index]))
                elif type(failure) is _Missing:
                    outcomes.append(_Outcome(missing=failure.name))
                else:  # the reference says how exactly it fails, reading the same facts
                    if evaluator is None:
                        evaluator = _Evaluator(
                            self._source,
                            facts,
                            now,
                            fact_data,
                            kind_data,
                            _variables(it),
                            collections,
                        )
                    outcomes.append(evaluator.outcome(leaf))
            seen = _with_item(_seen(fact_data, kind_data), it)
            return _conclude(self, outcomes, seen, collections)
        except Exception as exc:  # defensive: nothing above is expected to raise
            return Evaluation(value=False, clauses=(), error=f"internal error: {exc!r}")

    def next_change_at(
        self, facts: FactLookup, now: datetime, item: Item | None = None
    ) -> datetime | None:
        """The earliest instant strictly after ``now`` at which the condition's value may
        change while ``facts`` (and the current ``item``, for a per-item rule) stay as they
        are; None when the passing of time cannot change it. A naive ``now`` is taken as
        UTC; the answer is an aware UTC datetime. Timestamps read from the item
        (``days_since(item.data.opened_at) >= 3``) are solved exactly, per item.

        Guarantee: ``evaluate(facts, t)`` gives the same value for every ``t`` in
        ``[now, T)``, where ``T`` is the answer (for every ``t >= now`` when it is None).
        ``T`` is not promised to be a change: it is when to evaluate again.

        How it is computed (the sites are found once, when the condition is compiled):

        - *Threshold sites*: a comparison ``X_since(ts) OP e`` or ``e OP X_since(ts)``
          where ``X_since`` is ``days_since`` / ``hours_since`` / ``minutes_since``, ``OP``
          is one of ``< <= > >= == !=`` and neither ``ts`` nor ``e`` calls a time function
          (each adjacent pair of a chained comparison such as ``1 <= days_since(ts) < 7``
          is one site). ``ts`` and ``e`` are evaluated against ``facts`` (time cannot
          change them); the elapsed value ``(t - ts) / unit`` grows with ``t``, so the
          comparison changes at the threshold ``ts + e * unit`` only:

          * ``>=`` and ``<`` change at the first microsecond at which the elapsed value is
            ``>= e``; ``>`` and ``<=`` at the first one at which it is ``> e`` (strict: just
            after the threshold, i.e. the threshold plus 1 µs when it falls on a whole
            microsecond);
          * ``==`` becomes true at the first microsecond at which the value is ``>= e``
            and false again at the first one at which it is ``> e``; ``!=`` the other way
            round. When no microsecond gives exactly ``e`` (the value steps over it), they
            never change.

          Instants are whole microseconds (``datetime``'s resolution) and are found with
          the very float arithmetic ``evaluate`` uses, so ``evaluate`` at ``T`` gives the
          new value and at ``T - 1 µs`` the old one. A threshold at or before ``now`` has
          already taken effect and is not a candidate; nor is one beyond ``datetime.max``.
        - A site whose ``ts`` is missing, fails, or is not an RFC 3339 timestamp with a
          zone, or whose ``e`` is missing, fails or is not a finite number, contributes
          nothing: its comparison gives the same value (or error) at every instant.
        - *Fallback*: any other use of a time function (``now()``; arithmetic on, or the
          truth of, ``X_since(...)``; a comparison whose other side uses time too;
          ``in``; a time function of a time-dependent argument) cannot be solved: it
          contributes ``now + 1 s`` (``TIME_RECHECK``), so a caller polling at that
          rate still meets a 1-second bound, unless it is ``X_since(ts)`` with a ``ts``
          that fails as above.

        The answer is the earliest candidate. The analysis does not look at the rest of
        the expression: in ``a and days_since(ts) >= 7`` the threshold is returned even
        when ``a`` is false (conservative: an early re-evaluation only confirms the value).
        Never raises: an unexpected error gives ``now + 1 s``.
        """
        now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
        if self._time is None:
            return None
        try:
            if isinstance(self._compiled, _Pending):
                self._compile()
            code = self._time
            it = _item_value(item)
            if isinstance(code, _TimeCode):
                try:
                    values = code.function({}, {}, facts, now, self._values, it, None)
                except Exception:  # the reference says how exactly it fails
                    pass
                else:
                    return code.next_change(values, now)
            evaluator = _Evaluator(self._source, facts, now, variables=_variables(it))
            return _find_time_sites(self._leaves).next_change(evaluator, now)
        except Exception:  # defensive: nothing in next_change is expected to raise
            return _recheck(now)


def _has_time_sites(sites: _TimeSites) -> bool:
    """Whether the passing of time can change a condition with these time sites."""
    return bool(sites.thresholds or sites.unsolved or sites.always_poll)


def _timed_clauses(leaves: tuple[ast.expr, ...]) -> tuple[int, ...] | None:
    """The indexes of the lowered clauses that have time sites (one tuple for all equal
    ones); None when none has."""
    timed = tuple(
        index for index, leaf in enumerate(leaves) if _has_time_sites(_find_time_sites((leaf,)))
    )
    return _shared(timed) if timed else None


def _recompile(text: str, item_kind: str | None) -> Condition:
    """``compile_condition(text, item_kind=item_kind)`` (what a pickled condition calls)."""
    return compile_condition(text, item_kind=item_kind)


def _bound_names(item_kind: str | None) -> frozenset[str]:
    """The variable names of a condition compiled for ``item_kind``."""
    return frozenset({"item"}) if item_kind is not None else frozenset()


def _variables(item: dict[str, Any] | None) -> dict[str, Any]:
    """The reference evaluator's variables for the current item's value."""
    return {} if item is None else {"item": item}


def _clause_count(plan: _Plan) -> int:
    """How many clauses ``plan`` combines (its leaves are their indexes)."""
    if isinstance(plan, int):
        return 1
    return sum(_clause_count(part) for part in plan[1])


def _parse_leaves(
    text: str, item_kind: str | None
) -> tuple[tuple[ast.expr, ...], tuple[str, ...], tuple[tuple[int, int], ...]]:
    """The lowered top-level and/or leaves of ``text``, an expression ``compile_condition``
    accepted for ``item_kind`` (so parsing cannot fail here), and their source texts, line
    breaks collapsed (``_Source.snippet``), and their (start, end) offsets in ``text``. ``_parsed``
    keeps the last few; the compiled form, made once
    per condition, parses without keeping the tree (the first evaluation of 10,000 rules
    would otherwise keep 64 trees, about 1 MB, beside the plan)."""
    source = _Source(text)
    leaves: list[ast.expr] = []
    _split(_parse(source), leaves)
    texts = tuple(source.snippet(leaf) for leaf in leaves)
    spans = tuple(source.span(leaf) for leaf in leaves)
    bound = _bound_names(item_kind)
    return tuple(_lower(leaf, bound) for leaf in leaves), texts, spans


_parsed = functools.lru_cache(maxsize=64)(_parse_leaves)


def _lowered_leaves(text: str, item_kind: str | None = None) -> tuple[ast.expr, ...]:
    """The lowered top-level clauses of ``text`` (see ``_parsed``)."""
    return _parsed(text, item_kind)[0]


def _clause_texts(text: str, item_kind: str | None = None) -> tuple[str, ...]:
    """The source texts of the top-level clauses of ``text`` (see ``_parsed``)."""
    return _parsed(text, item_kind)[1]


def _evaluate_reference(
    condition: CompiledCondition, facts: FactLookup, now: datetime, item: Item | None = None
) -> Evaluation:
    """``condition.evaluate(facts, now)`` done by the reference evaluator alone: simpleeval
    (``_Evaluator``) walking the lowered clauses. The compiled form must give the very same
    ``Evaluation``; it also hands it the clauses that fail in any other way than a missing
    fact or field, to get their exact error message."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        it = _item_value(item)
        evaluator = _Evaluator(condition._source, facts, now, variables=_variables(it))
        outcomes = [evaluator.outcome(leaf) for leaf in condition._leaves]
        seen = _with_item(evaluator.seen(), it)
        return _conclude(condition, outcomes, seen, evaluator.collections)
    except Exception as exc:  # defensive: nothing above is expected to raise
        return Evaluation(value=False, clauses=(), error=f"internal error: {exc!r}")


def _conclude(
    condition: CompiledCondition,
    outcomes: list[_Outcome],
    seen: dict[str, Any],
    collections: _CollectionRun | None = None,
) -> Evaluation:
    """The ``Evaluation`` from the outcomes of a condition's clauses."""
    overall = _combine(condition._plan, outcomes)
    texts = condition.clause_texts
    clauses = tuple(_clause(text, outcome) for text, outcome in zip(texts, outcomes, strict=True))
    return Evaluation(
        value=not overall.failed and bool(overall.value),
        clauses=clauses,
        missing=_missing_names(overall, outcomes),
        error=overall.error,
        seen=seen,
        collections=collections.collections() if collections else (),
    )


def _clause(text: str, outcome: _Outcome) -> Clause:
    missing = () if outcome.missing is None else (outcome.missing,)
    value = None if outcome.failed else _jsonable(outcome.value)
    return Clause(text=text, value=value, missing=missing, error=outcome.error)


def _missing_names(overall: _Outcome, outcomes: list[_Outcome]) -> tuple[str, ...]:
    if overall.missing is None:
        return ()
    names = [overall.missing]
    names.extend(o.missing for o in outcomes if o.missing is not None)
    return tuple(dict.fromkeys(names))


def next_change_at(
    condition: Condition, facts: FactLookup, now: datetime, item: Item | None = None
) -> datetime | None:
    """When ``condition`` (for the current ``item`` of a per-item rule) may next change
    through the passing of time alone.

    A ``CompiledCondition`` answers with its ``next_change_at`` (see there); any other
    ``Condition`` that uses time gets ``now + 1 s`` (``TIME_RECHECK``), one that does not
    gets None. A naive ``now`` is taken as UTC.
    """
    if isinstance(condition, CompiledCondition):
        return condition.next_change_at(facts, now, item)
    if not condition.uses_time:
        return None
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return _recheck(now)
