"""The ``when`` language: a small, sandboxed expression language over a project's facts.

A rule's ``when`` is one expression. ``compile_condition`` parses it once (Python syntax,
``ast`` in "eval" mode), checks it statically (this module: the parse, the static check,
the limits, the bounded operators of the sandbox, ``ExpressionProblem``/``ExpressionError``
and the records an evaluation gives), makes fact access explicit and turns the result into
one Python function (``compiler``: generated source, compiled once, with no builtins: it
can only call the fact accessors, JSON-only lookups, bounded operators and the functions
below). ``evaluate(facts, now, item)`` is one call of that function. simpleeval walking the same
checked tree is the reference (``reference``): it defines the results, and whenever a
clause fails for any other reason than a missing fact or field, the clause is run again on
it to get its exact error (tests/test_expressions_compiled.py checks that both always
agree). ``timing`` says when time alone changes a condition. This docstring is the
reference for rule authors.

Names and facts
---------------
Names are the fact kinds of the rule's project (``[a-z][a-z0-9_]*``). The expression may
span several lines and hold ``#`` comments.

- ``milestone.design`` is the ``data`` of fact (kind ``milestone``, id ``design``);
  ``task["T-17"]`` does the same for ids that are not identifiers (``-``, ``.``, digits).
- Further ``.field``, ``["field"]`` and ``[0]`` walk into that JSON data (objects by key,
  arrays by index; negative indexes count from the end). Nothing else can be reached:
  ``.items`` is the *field* ``items``, never a Python method.
- A kind on its own (``len(task)``, ``"T-17" in task``) is every fact of that kind as an
  object ``{id: data}``; so is ``task[expr]`` with a computed id (it reads one fact, but
  which one is only known at run time). ``"T-17" in task`` and
  ``"approved_at" in milestone.design`` test whether a fact / field exists.
- ``true``, ``false`` and ``null`` (and Python's ``True``, ``False``, ``None``) are
  literals, so they cannot be kind names; the function names below are reserved too.

The current item (per-item rules)
---------------------------------
In a rule with ``for_each: KIND`` (a condition compiled with ``item_kind``), the name
``item`` is the current item, the fact of that kind the rule instance is about, as the
object ``{"kind": KIND, "id": ID, "data": DATA}``: ``item.id``, ``item.kind``,
``item.data.status``, ``item.data["x-y"]``, ``"approved_at" in item.data``,
``days_since(item.data.opened_at) >= 3`` (solved exactly, per item). There, ``item`` is
not a kind name (a kind called ``item`` cannot be read). A missing field is named from
``item`` (``item.data.commit``). Outside ``for_each`` rules ``item`` is an ordinary kind
name. The evaluation's ``seen`` records the item as the fact it is (``"build.b9": data``).

Collections
-----------
``any``, ``all``, ``count``, ``sum``, ``min`` and ``max`` take a *collection* as their only
argument: ``FN(ELEMENT for VAR in KIND if FILTER)``, e.g.
``all(t.data.status == "done" for t in task if t.data.milestone == item.id)``.

- Exactly one ``for``; ``VAR`` is a plain lower-case name (not a function, a literal or
  ``item``) and ``KIND`` a bare kind name. Zero or more ``if`` filters. No collection
  inside another. ``VAR`` is bound to each fact of the kind in turn, in id order, as
  ``{"kind", "id", "data"}`` (the shape of ``item``): ``t.id``, ``t.data.status``. The
  element and the filters may read other facts, ``item`` and the time; inside them
  ``VAR`` hides a kind of the same name.
- ``count(E for ...)``: how many items have a truthy ``E`` (so ``count(t for t in task if
  C)`` counts those passing ``C``). ``any``: whether one has. ``all``: whether every one
  has, and **false over no items**. ``sum``: the sum of the elements (numbers; booleans
  count as 0/1), exact whatever the order (the true sum rounded once; an integer unless a
  float is added), 0 over no items. ``min``/``max``: the least/greatest element (numbers,
  or strings, not both; of equal ones the first by id); over no items they are *missing*,
  named ``min(... for t in task)``, so the condition is false. ``min(a, b)``/``max(a, b)``
  with several arguments are the plain functions.
- Missing data: a missing fact or field in a filter means the item does not pass; in the
  element of ``any``/``all``/``count`` it counts as false; in the element of ``sum``/
  ``min``/``max`` it makes the value missing, named from the fact (``task["T-3"].hours``,
  the first such id). An element of the wrong type for ``sum``/``min``/``max``, or any
  other run-time error in an element or filter, is an error (the first, by id).
- ``any``/``all``/``count``/``sum`` are functions only when called with a collection: as
  names they are still kinds (``count.x.n``).
- The facts a collection goes over are not copied into the evaluation's ``seen``:
  ``Evaluation.collections`` tells, for each collection, how many items passed the filter,
  how many had a truthy element, the first 20 ids (sorted) whose element was false or
  missing, and the value (``CollectionSeen``). The condition ``reads`` the whole kind
  (``FactRef(KIND, None)``).
- Cost: a collection whose element and filters read nothing but ``VAR``, ``item`` and
  literals follows the facts of its kind by deltas (``gatekeeper.expr.incremental``):
  posting one fact costs about the same with 10 or 10,000 facts of the kind. One that
  reads other facts or the time goes over every fact of the kind at each evaluation.

Literals and operators
----------------------
Numbers, strings (at most 1,000 characters), ``true``/``false``/``null``, lists, tuples
and objects (``{"a": 1}``). Comparisons ``== != < <= > >= in not in`` (chainable:
``1 <= x < 5``), ``and``/``or``/``not``, ``+ - * / // % **``, unary ``-``/``+``,
``a if cond else b``. Python semantics throughout (``and``/``or`` short-circuit, ``/``
gives a float, ``round`` rounds half to even).

Functions (positional arguments only)
-------------------------------------
- ``days_since(ts)``, ``hours_since(ts)``, ``minutes_since(ts)``: time elapsed from the
  RFC 3339 timestamp ``ts`` (which must carry a zone: ``Z`` or ``+hh:mm``) until the
  evaluation's "now", as a float (negative when ``ts`` is in the future).
- ``now()``: the evaluation's "now" as an RFC 3339 UTC string. Compare times with the
  ``*_since`` functions rather than as strings.
- ``len(x)``, ``min(...)``, ``max(...)``, ``abs(x)``, ``round(x[, ndigits])``: as in Python.
- ``any``, ``all``, ``count``, ``sum``, and ``min``/``max`` of one collection: see
  "Collections".

Truth, missing data and errors
------------------------------
- The condition holds when the expression's value is truthy (Python rules: ``0``, ``""``,
  ``[]``, ``{}`` and ``null`` are false); the explanation shows the raw value.
- A fact that does not exist, a missing field or an index out of range, anywhere the
  evaluation reaches, makes the whole condition false, never an error: the
  ``Evaluation`` names it (``milestone.design``, ``milestone.design.approved_at``,
  ``task["T-17"].reviewers[2]``).
- Any other run-time failure (comparing a string with a number, a timestamp without a
  zone, division by zero, a bound exceeded) makes the condition false and sets ``error``.
  ``evaluate`` never raises.
- For the explanation, each operand of the top-level ``and``/``or`` tree is a *clause*,
  evaluated on its own (all of them, with its own value, missing name or error); the
  condition's value is what Python's short-circuit evaluation of the whole gives.

Rejected by ``compile_condition`` (every problem is listed, with its position)
------------------------------------------------------------------------------
Syntax errors; unknown functions; calls of anything but a function name (``x.lower()``);
keyword or ``*`` arguments, or the wrong number of arguments; a function name used without
calling it; names that are not kinds; attributes or keys starting with ``_``; lambdas,
comprehensions and generator expressions other than a collection, f-strings, ``:=``,
``*``/``**`` unpacking, sets, slices (``x[1:3]``), ``is``/``is not`` (use ``==``), bitwise
operators, bytes and complex literals; ``**`` unless the exponent is a number literal
between -64 and 64; strings over 1,000 characters; expressions over 4,096 characters, 400
expression nodes (names, literals, operations, calls...) or 32 levels of nesting; a bare
top-level ``a, b`` (a tuple, always true). A constant expression such as ``true`` is
allowed.

Bounds at run time
------------------
``+`` and ``*`` cannot build a string, list or tuple of more than 10,000 items; integer
``*`` and ``**`` results are limited to 10,000 bits; ``%`` does not format strings;
``round`` takes at most 100 digits.

When time alone changes a condition
-----------------------------------
``CompiledCondition.next_change_at(facts, now)`` tells the daemon when to evaluate a
condition again if no fact changes. A comparison of ``days_since(ts)``, ``hours_since(ts)``
or ``minutes_since(ts)`` with a number (``days_since(milestone.design.approved_at) >= 7``,
``1 <= hours_since(x.y.at) < 48``, ``days_since(a.b.at) >= policy.hold.days``,
``days_since(item.data.opened_at) >= 3``) is solved exactly: the rule is evaluated again at
the microsecond its value changes. Any other use of time (``now()``,
``days_since(ts) * 24 > 5``, ``days_since(a) > days_since(b)``, time inside a collection)
is re-checked every second.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import math
import operator
import re
import tokenize
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import FrozenInstanceError, dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any, Protocol

MAX_EXPRESSION_CHARS = 4096

FUNCTIONS = (
    "days_since",
    "hours_since",
    "minutes_since",
    "now",
    "len",
    "min",
    "max",
    "abs",
    "round",
)

MAX_STRING_LITERAL_CHARS = 1000
"""Longest string literal allowed in an expression."""
MAX_DEPTH = 32
"""Deepest nesting of expression nodes allowed."""
MAX_NODES = 400
"""Most expression nodes allowed."""
MAX_EXPONENT = 64
"""Largest absolute value of a ``**`` exponent."""
MAX_SEQUENCE_ITEMS = 10_000
"""Longest string/list/tuple that ``+`` or ``*`` may build at run time."""
MAX_INT_BITS = 10_000
"""Largest integer (in bits) that ``*`` or ``**`` may build at run time."""
MAX_ROUND_DIGITS = 100
"""Largest absolute ``ndigits`` accepted by ``round``."""

TIME_FUNCTIONS = frozenset({"days_since", "hours_since", "minutes_since", "now"})

COLLECTION_FUNCTIONS = ("any", "all", "count", "sum", "min", "max")
"""The functions that take a collection: ``FN(ELEMENT for VAR in KIND if FILTER)``."""
MAX_FALSE_IDS = 20
"""Most ids ``CollectionSeen.false_ids`` lists."""
_COLLECTION_ONLY = frozenset({"any", "all", "count", "sum"})
"""Functions that take nothing but a collection (and, uncalled, stay kind names)."""
_COLLECTION_FORM = "FN(E for x in KIND if C)"

_LITERAL_NAMES: dict[str, bool | None] = {"true": True, "false": False, "null": None}
_KIND_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_NEWLINE_RUN_RE = re.compile(r"\s*\n\s*")
_MAX_FRAGMENT_CHARS = 200
_NOT_CONSTANT = object()
_MAX_MESSAGE_FRAGMENT_CHARS = 80

# name -> (minimum, maximum or None) number of positional arguments
_ARITY: dict[str, tuple[int, int | None]] = {
    "days_since": (1, 1),
    "hours_since": (1, 1),
    "minutes_since": (1, 1),
    "now": (0, 0),
    "len": (1, 1),
    "min": (1, None),
    "max": (1, None),
    "abs": (1, 1),
    "round": (1, 2),
}

_BINARY_OPERATORS: dict[type[ast.operator], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
_UNARY_OPERATORS: dict[type[ast.unaryop], str] = {ast.Not: "not", ast.USub: "-", ast.UAdd: "+"}
_COMPARISONS: dict[type[ast.cmpop], str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}
_REJECTED_OPERATORS: dict[type[ast.AST], str] = {
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
    ast.Invert: "~",
}
_REJECTED_NODES: dict[type[ast.AST], str] = {
    ast.Lambda: "lambda functions are not allowed",
    ast.ListComp: "comprehensions are not allowed; a collection is any, all, count, sum, min"
    f" or max of {_COLLECTION_FORM}",
    ast.SetComp: "comprehensions are not allowed; a collection is any, all, count, sum, min"
    f" or max of {_COLLECTION_FORM}",
    ast.DictComp: "comprehensions are not allowed; a collection is any, all, count, sum, min"
    f" or max of {_COLLECTION_FORM}",
    ast.GeneratorExp: "generator expressions are not allowed here: a collection is the only"
    f" argument of any, all, count, sum, min or max: {_COLLECTION_FORM}",
    ast.JoinedStr: "f-strings are not allowed",
    ast.Starred: "unpacking with '*' is not allowed",
    ast.NamedExpr: "assignment expressions (':=') are not allowed",
    ast.Await: "'await' is not allowed",
    ast.Yield: "'yield' is not allowed",
    ast.YieldFrom: "'yield' is not allowed",
    ast.Slice: "slices are not supported; use an index such as [0]",
    ast.Set: "set literals are not supported; use a list [...]",
}


# --------------------------------------------------------------------------------------
# Public interface


@dataclass(frozen=True)
class FactRef:
    """A fact key a condition reads, inside the rule's project.

    ``id`` is None when the condition reads every fact of ``kind`` (e.g. ``len(task)`` or a
    subscript whose id is not a literal).
    """

    kind: str
    id: str | None


class FactLookup(Protocol):
    """Read access to the current facts of one project.

    An evaluation keeps what it read in ``Evaluation.seen``: a copy of each fact's data,
    unless the lookup's class sets ``shares_data = True``, a promise that ``get`` and
    ``of_kind`` give plain dicts that are never changed afterwards (a fact's data is
    replaced, never changed in place). Those dicts are then kept as they are: every
    evaluation reading a fact holds the one dict the lookup holds, not a copy each.
    """

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        """The ``data`` of fact (kind, id), or None when there is no such fact."""

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        """Every fact of ``kind`` as {id: data}."""


class FactChanges(FactLookup, Protocol):
    """What a ``FactLookup`` may offer besides, so that collections follow the facts of a
    kind by deltas instead of going over all of them at each evaluation (optional: a
    lookup without it is read in full). The facts are *committed* ones, and *pending* ones
    put over them (a plan not committed yet, which may be dropped).
    """

    def committed_version(self, kind: str) -> tuple[int, int]:
        """``(table, version)``: ``table`` tells committed fact tables apart; ``version``
        grows with every put of a committed fact of ``kind``."""

    def committed_changes(self, kind: str, since: int) -> Collection[str] | None:
        """The ids of ``kind`` put as committed facts after version ``since``; None when
        that is no longer known (then the reader starts over)."""

    def committed_of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        """Every committed fact of ``kind``, ``{id: data}`` (read only)."""

    def pending(self, kind: str) -> Collection[str]:
        """The ids of ``kind`` whose data here (``get``) is pending, not committed."""


@dataclass(frozen=True)
class ExpressionProblem:
    """One thing wrong with an expression: ``offset`` is the 0-based character offset of
    ``fragment`` in the expression text.

    ``fragment`` is always ``text[offset:offset + len(fragment)]`` (possibly shortened to
    its first 200 characters, possibly empty when the problem is at the end of the text).
    """

    message: str
    offset: int
    fragment: str


class ExpressionError(Exception):
    """Raised by ``compile_condition``; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ExpressionProblem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Clause:
    """A sub-condition (a leaf of the top-level and/or tree) and its value.

    ``value`` is JSON-ready; ``missing`` names what was missing when the clause could not be
    evaluated (then ``value`` is None); ``error`` holds a runtime error message.
    """

    text: str
    value: Any
    missing: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CollectionSeen:
    """What one collection (``all(t.data.done for t in task if ...)``) saw, by reference.

    ``text``: the collection's source; ``function``: ``any``/``all``/``count``/``sum``/
    ``min``/``max``; ``kind``: the kind it goes over; ``items``: how many facts of the kind
    passed the filter; ``true``: how many of those had a truthy element; ``false_ids``: the
    first ``MAX_FALSE_IDS`` ids (sorted) of those whose element was false or missing;
    ``value``: the collection's value (JSON-ready; None when it is missing). Never a copy of
    the facts.
    """

    text: str
    function: str
    kind: str
    items: int
    true: int
    false_ids: tuple[str, ...]
    value: Any


_NO_SEEN: Mapping[str, Any] = {}
"""``Evaluation``'s default ``seen`` (never handed out: each evaluation gets a dict of its
own)."""


class Evaluation:
    """The outcome of evaluating a condition.

    ``value`` is the condition's truth; a missing fact/field or a runtime error makes it False.
    ``missing`` lists dotted names that were missing (``milestone.design`` for a fact,
    ``milestone.design.approved_at`` for a field). ``seen`` maps each fact the evaluation read
    (``kind.id``) to its data, for the audit log.

    Details: ``missing`` is non-empty exactly when the value is False because the evaluation
    reached something missing; it then names that first, followed by whatever else the
    clauses found missing. ``error`` is set when the value is False because of a run-time
    error (the clauses say where). ``seen`` covers every clause (each clause is evaluated,
    even those the short-circuit evaluation of the whole did not need); a fact that does
    not exist is recorded as None, a kind-level read as ``{"kind": {id: data}}``.
    The facts a collection goes over are not in ``seen``: ``collections`` holds, for each
    collection the evaluation completed, in source order, a ``CollectionSeen`` (counts
    and ids).

    Immutable, compared and shown as a frozen dataclass of the six fields (``value``,
    ``clauses``, ``missing``, ``error``, ``seen``, ``collections``) would be. The compiled
    form keeps a common evaluation's clauses as their values beside its condition's
    clause texts (no ``Clause`` objects per condition, nor per evaluation): ``clauses``
    makes them when first read.
    """

    __slots__ = ("_clauses", "_texts", "collections", "error", "missing", "seen", "value")
    __match_args__ = ("value", "clauses", "missing", "error", "seen", "collections")

    value: bool
    missing: tuple[str, ...]
    error: str | None
    seen: Mapping[str, Any]
    collections: tuple[CollectionSeen, ...]
    _clauses: tuple[Any, ...]
    """The ``Clause`` objects, or (``_texts`` not None) the clauses' values, True or False."""
    _texts: tuple[Any, ...] | None
    """None, or a compiled condition's values, which give the clauses' texts
    (``_clause_text``), their values being ``_clauses``; no missing name, no error."""

    def __init__(
        self,
        value: bool,
        clauses: tuple[Clause, ...],
        missing: tuple[str, ...] = (),
        error: str | None = None,
        seen: Mapping[str, Any] = _NO_SEEN,
        collections: tuple[CollectionSeen, ...] = (),
    ) -> None:
        _set_evaluation(self, value, clauses, missing, error, seen, collections)

    @property
    def clauses(self) -> tuple[Clause, ...]:
        """The clauses (top-level and/or leaves), in source order, with their values."""
        texts = self._texts
        if texts is None:
            return self._clauses
        clauses = tuple(
            Clause(_clause_text(texts, i), value) for i, value in enumerate(self._clauses)
        )
        _EVALUATION_SLOTS["_clauses"](self, clauses)  # made once
        _EVALUATION_SLOTS["_texts"](self, None)
        return clauses

    def with_seen(self, seen: Mapping[str, Any]) -> Evaluation:
        """This evaluation with ``seen`` in place of its own (an equal mapping kept by
        another evaluation: evaluations that read the same facts may share one)."""
        other: Evaluation = object.__new__(Evaluation)
        for name in Evaluation.__slots__:
            _EVALUATION_SLOTS[name](other, getattr(self, name))
        _EVALUATION_SLOTS["seen"](other, seen)
        return other

    def _fields(self) -> tuple[Any, ...]:
        return (self.value, self.clauses, self.missing, self.error, self.seen, self.collections)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Evaluation)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Evaluation(value={self.value!r}, clauses={self.clauses!r}, "
            f"missing={self.missing!r}, error={self.error!r}, seen={self.seen!r}, "
            f"collections={self.collections!r})"
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Evaluation], tuple[Any, ...]]:
        return (Evaluation, self._fields())


def _clause_text(values: tuple[Any, ...], index: int) -> str:
    """The text of clause ``index`` of a compiled condition whose values are ``values``:
    ``values[0]`` is the condition's text, then two items per clause, ``(start, end)``,
    the clause's offsets in that text, or ``(text, None)`` when the clause's text is not
    a plain slice of it (line breaks collapsed, see ``_Source.snippet``)."""
    first = values[1 + 2 * index]
    if type(first) is str:
        return first
    end: int = values[2 + 2 * index]
    text: str = values[0][first:end]
    return text


_EVALUATION_SLOTS: dict[str, Callable[[Evaluation, Any], None]] = {
    name: Evaluation.__dict__[name].__set__ for name in Evaluation.__slots__
}
"""The setter of each slot of ``Evaluation`` (whose ``__setattr__`` refuses)."""


def _set_evaluation(
    evaluation: Evaluation,
    value: bool,
    clauses: tuple[Clause, ...],
    missing: tuple[str, ...],
    error: str | None,
    seen: Mapping[str, Any],
    collections: tuple[CollectionSeen, ...],
) -> None:
    slots = _EVALUATION_SLOTS
    slots["value"](evaluation, value)
    slots["_clauses"](evaluation, clauses)
    slots["_texts"](evaluation, None)
    slots["missing"](evaluation, missing)
    slots["error"](evaluation, error)
    slots["seen"](evaluation, {} if seen is _NO_SEEN else seen)
    slots["collections"](evaluation, collections)


@dataclass(frozen=True, slots=True)
class Item:
    """The current item of a per-item (``for_each``) rule: the fact (``kind``, ``id``) and
    its ``data``. In the condition it is the object ``{"kind": kind, "id": id, "data":
    data}`` named ``item``."""

    kind: str
    id: str
    data: Mapping[str, Any]


class Condition(Protocol):
    """A compiled, checked ``when`` expression."""

    text: str
    reads: frozenset[FactRef]

    @property
    def uses_time(self) -> bool:
        """Whether it calls ``days_since``/``hours_since``/``minutes_since``/``now``."""

    @property
    def uses_item(self) -> bool:
        """Whether it reads ``item`` (the current item of a per-item rule)."""

    def evaluate(
        self, facts: FactLookup, now: datetime, item: Item | None = None
    ) -> Evaluation: ...


# --------------------------------------------------------------------------------------
# Source positions


_Located = ast.expr | ast.keyword
"""AST nodes that carry source positions."""


class _Source:
    """The expression text, and the parenthesised copy that is actually parsed.

    The text is parsed as ``"(" + text + "\\n)"`` so that it may span several lines (YAML
    block scalars) and end with a comment. ``\\r`` line ends are replaced by same-length
    ``\\n`` ones, so character offsets are shared by the text and the parsed source.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        normalised = text.replace("\r\n", " \n").replace("\r", "\n")
        self.parsed = "(" + normalised + "\n)"
        self._lines = self.parsed.split("\n")
        self._starts: list[int] = []
        position = 0
        for line in self._lines:
            self._starts.append(position)
            position += len(line) + 1

    @property
    def line_count(self) -> int:
        """Lines in the parsed source (the last one holds only the closing parenthesis)."""
        return len(self._lines)

    def offset(self, lineno: int, col_byte: int) -> int:
        """Character offset in ``text`` of an ast position (1-based line, UTF-8 byte column)."""
        line = self._lines[lineno - 1]
        column = len(line.encode("utf-8")[:col_byte].decode("utf-8", "ignore"))
        return self.clamp(self._starts[lineno - 1] + column - 1)

    def char_offset(self, lineno: int, column: int) -> int:
        """Character offset in ``text`` of a tokenizer/SyntaxError position (1-based line,
        0-based character column)."""
        return self.clamp(self._starts[lineno - 1] + column - 1)

    def clamp(self, offset: int) -> int:
        return max(0, min(offset, len(self.text)))

    def span(self, node: _Located) -> tuple[int, int]:
        """(start, end) character offsets of ``node`` in ``text``."""
        start = self.offset(node.lineno, node.col_offset)
        end_lineno = node.end_lineno if node.end_lineno is not None else node.lineno
        end_col = node.end_col_offset if node.end_col_offset is not None else node.col_offset
        return start, max(start, self.offset(end_lineno, end_col))

    def problem(self, message: str, start: int, end: int) -> ExpressionProblem:
        fragment = self.text[start:end][:_MAX_FRAGMENT_CHARS]
        return ExpressionProblem(message, start, fragment)

    def node_problem(self, node: _Located, message: str) -> ExpressionProblem:
        return self.problem(message, *self.span(node))

    def snippet(self, node: _Located) -> str:
        """The node's source with line breaks (and the indentation around them) collapsed."""
        start, end = self.span(node)
        return _NEWLINE_RUN_RE.sub(" ", self.text[start:end].replace("\r", "\n")).strip()


def _parse(source: _Source) -> ast.expr:
    """Parse ``source``; raise ``ExpressionError`` for an empty, over-long or invalid text."""
    text = source.text
    if len(text) > MAX_EXPRESSION_CHARS:
        message = f"expression is {len(text)} characters long; the limit is {MAX_EXPRESSION_CHARS}"
        raise ExpressionError([source.problem(message, MAX_EXPRESSION_CHARS, len(text))])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences: harmless here
            tree = ast.parse(source.parsed, mode="eval")
    except SyntaxError as exc:
        closer = _unmatched_closer(source)
        if closer is not None:
            raise ExpressionError([_closer_problem(source, closer)]) from None
        raise ExpressionError([_syntax_problem(source, exc)]) from None
    except (RecursionError, MemoryError):
        message = "expression is too deeply nested to parse"
        raise ExpressionError([source.problem(message, 0, len(text))]) from None
    except ValueError as exc:  # e.g. lone surrogates that cannot be encoded
        raise ExpressionError([source.problem(f"invalid text: {exc}", 0, 0)]) from None
    body = tree.body
    if isinstance(body, ast.Tuple) and body.lineno == 1 and body.col_offset == 0:
        # The tuple's parentheses are ours: the text is empty or a bare "a, b".
        if not body.elts:
            raise ExpressionError([source.problem("expression is empty", 0, len(text))])
        message = "a top-level ',' makes a tuple, which is always true; use 'and' / 'or'"
        raise ExpressionError([source.problem(message, 0, len(text))])
    closer = None if _brackets_hold(source) else _unmatched_closer(source)
    if closer is not None:
        raise ExpressionError([_closer_problem(source, closer)])
    return body


def _brackets_hold(source: _Source) -> bool:
    """Whether the text also parses inside square brackets, which proves that no closing
    bracket in it ends the parentheses it is parsed in: a ``)`` that closed them early
    would meet ``[`` instead, which is a syntax error (and so would a ``]`` in the
    parenthesised parse, which succeeded). Much cheaper than tokenizing; when it says no
    (for whatever reason), ``_unmatched_closer`` decides."""
    bracketed = "[" + source.parsed[1:-1] + "]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(bracketed, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _closer_problem(source: _Source, position: tuple[int, int]) -> ExpressionProblem:
    start = source.char_offset(*position)
    return source.problem(f"unmatched {source.text[start]!r}", start, start + 1)


def _syntax_problem(source: _Source, exc: SyntaxError) -> ExpressionProblem:
    text = source.text
    if exc.lineno is None or exc.offset is None:
        start = text.find("\0") if "\0" in text else 0
        return source.problem(f"syntax error: {exc.msg}", start, start + 1)
    start = source.char_offset(exc.lineno, exc.offset - 1)
    end = start
    if exc.end_lineno is not None and exc.end_offset is not None:
        end = max(start, source.char_offset(exc.end_lineno, exc.end_offset - 1))
    if start >= len(text.rstrip()):
        return source.problem(f"syntax error: expression ends too early ({exc.msg})", start, end)
    return source.problem(f"syntax error: {exc.msg}", start, max(end, start + 1))


def _unmatched_closer(source: _Source) -> tuple[int, int] | None:
    """Position of a closing bracket in the text with no opening one, if any.

    Needed because the text is parsed inside parentheses: ``a) or (b`` would otherwise
    parse as ``(a) or (b)``.
    """
    depth = 0
    tokens = tokenize.generate_tokens(io.StringIO(source.parsed).readline)
    try:
        for token in tokens:
            if token.type != tokenize.OP:
                continue
            if token.string in "([{":
                depth += 1
            elif token.string in ")]}":
                depth -= 1
                if depth == 0 and token.start[0] < source.line_count:
                    return token.start
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------
# Static checks


def _is_kind_name(name: str) -> bool:
    return bool(_KIND_RE.match(name)) and name not in _LITERAL_NAMES and name not in _ARITY


def _kind_of(node: ast.expr, bound: frozenset[str] = frozenset()) -> str | None:
    """The kind named by ``node`` when it is a bare kind name (not one of the ``bound``
    variable names), else None."""
    if isinstance(node, ast.Name) and _is_kind_name(node.id) and node.id not in bound:
        return node.id
    return None


ITEM_NAME = "item"
"""The name of the current item in a condition compiled with an item kind."""


def _is_collection(node: ast.Call) -> bool:
    """Whether ``node`` is ``FN(<generator expression>)`` with FN a collection function."""
    return (
        isinstance(node.func, ast.Name)
        and node.func.id in COLLECTION_FUNCTIONS
        and len(node.args) == 1
        and isinstance(node.args[0], ast.GeneratorExp)
        and not node.keywords
    )


@dataclass(frozen=True)
class _Scope:
    """Where a node is: the variable names bound there (``item``, a loop variable), which
    are not kinds, and whether it is inside a collection."""

    bound: frozenset[str] = frozenset()
    in_collection: bool = False


class _Checker:
    """Walks the tree (iteratively, so depth cannot hurt) collecting problems and reads."""

    def __init__(self, source: _Source, item_kind: str | None = None) -> None:
        self.source = source
        self.problems: list[ExpressionProblem] = []
        self.reads: set[FactRef] = set()
        self.uses_time = False
        self.uses_item = False
        self.uses_collections = False
        self.item_kind = item_kind
        self.root = _Scope(frozenset({ITEM_NAME}) if item_kind else frozenset())
        self.scope = self.root
        """The scope of the node being checked."""
        self._child_scope = self.root
        """The scope of the children of the node being checked."""
        self._count = 0
        self._reported_depth = False
        self._grows = False
        """Whether the expression has a ``+``, ``*`` or ``**``: the only operators whose
        work grows with their operands (else there is nothing to fold)."""

    @property
    def bound(self) -> frozenset[str]:
        return self.scope.bound

    def check(self, root: ast.expr) -> None:
        stack: list[tuple[ast.expr, int, _Scope]] = [(root, 1, self.root)]
        while stack:
            node, depth, scope = stack.pop()
            self._measure(root, node, depth)
            self.scope = self._child_scope = scope
            children = self._visit(node)
            stack.extend((child, depth + 1, self._child_scope) for child in children)
        if self._grows and not self.problems:
            self._fold_constants(root)

    def _fold_constants(self, root: ast.expr) -> None:
        """Compute the operators whose operands are all literals (``"a" * 10**8``) with the
        run time's bounded operators, so that what run time would refuse as unbounded work
        (``MAX_SEQUENCE_ITEMS``, ``MAX_INT_BITS``, ``MAX_EXPONENT``) is refused here
        instead: ``check`` and run time agree. Bottom-up and iterative (the depth is not
        bounded yet); other run-time errors (``1 / 0``) are left to run time."""
        order: list[ast.AST] = []
        stack: list[ast.AST] = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(ast.iter_child_nodes(node))
        values: dict[int, Any] = {}
        for node in reversed(order):  # children before their parents
            folded = self._fold(node, values)
            if folded is not _NOT_CONSTANT:
                values[id(node)] = folded

    def _fold(self, node: ast.AST, values: dict[int, Any]) -> Any:
        """``node``'s value when its operands are in ``values``, else ``_NOT_CONSTANT``."""
        try:
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.UnaryOp) and id(node.operand) in values:
                return _OPERATORS[type(node.op)](values[id(node.operand)])
            if isinstance(node, ast.BinOp) and id(node.left) in values and id(node.right) in values:
                operation = _OPERATORS[type(node.op)]
                return operation(values[id(node.left)], values[id(node.right)])
            if isinstance(node, ast.List | ast.Tuple) and all(id(e) in values for e in node.elts):
                items = [values[id(element)] for element in node.elts]
                return items if isinstance(node, ast.List) else tuple(items)
        except _Unbounded as failure:
            if isinstance(node, ast.expr):
                self._report(node, failure.message)
        except (_Failure, ArithmeticError, TypeError, ValueError, KeyError):
            pass  # run time reports these as it always has
        return _NOT_CONSTANT

    def _report(self, node: _Located, message: str) -> None:
        self.problems.append(self.source.node_problem(node, message))

    def _measure(self, root: ast.expr, node: ast.expr, depth: int) -> None:
        self._count += 1
        if self._count == MAX_NODES + 1:
            self._report(root, f"expression is too large: more than {MAX_NODES} AST nodes")
        if depth > MAX_DEPTH and not self._reported_depth:
            self._reported_depth = True
            self._report(node, f"expression is nested more than {MAX_DEPTH} levels deep")

    def _visit(self, node: ast.expr) -> list[ast.expr]:
        """Check ``node`` itself; return the children still to check."""
        if isinstance(node, ast.Constant):
            self._constant(node)
            return []
        if isinstance(node, ast.Name):
            self._name(node)
            return []
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.Subscript):
            return self._subscript(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.UnaryOp):
            self._operator(node, node.op)
            return [node.operand]
        if isinstance(node, ast.BoolOp):
            return list(node.values)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        if isinstance(node, ast.IfExp):
            return [node.test, node.body, node.orelse]
        if isinstance(node, ast.List | ast.Tuple):
            return list(node.elts)
        if isinstance(node, ast.Dict):
            return self._dict(node)
        message = _REJECTED_NODES.get(type(node), f"{type(node).__name__} is not allowed")
        self._report(node, message)
        return []

    def _constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, str) and len(value) > MAX_STRING_LITERAL_CHARS:
            self._report(
                node,
                f"string literal is {len(value)} characters long; "
                f"the limit is {MAX_STRING_LITERAL_CHARS}",
            )
        elif isinstance(value, bytes):
            self._report(node, "bytes literals are not allowed")
        elif isinstance(value, complex):
            self._report(node, "complex numbers are not allowed")
        elif value is Ellipsis:
            self._report(node, "'...' is not allowed")

    def _name(self, node: ast.Name) -> None:
        name = node.id
        if name in _LITERAL_NAMES:
            return
        if name in _ARITY:
            self._report(node, f"function {name!r} must be called, e.g. {name}(...)")
        elif name.startswith("_"):
            self._report(node, f"names starting with '_' are not allowed: {name!r}")
        elif not _KIND_RE.match(name):
            self._report(
                node, f"{name!r} is not a fact kind (kinds are lower-case: [a-z][a-z0-9_]*)"
            )
        elif name in self.bound:
            self.uses_item = self.uses_item or (name == ITEM_NAME and self.item_kind is not None)
        else:
            self.reads.add(FactRef(name, None))

    def _attribute(self, node: ast.Attribute) -> list[ast.expr]:
        bad = node.attr.startswith("_")
        if bad:
            start, end = self.source.span(node)
            start = max(start, end - len(node.attr))
            message = f"names starting with '_' are not allowed: {node.attr!r}"
            self.problems.append(self.source.problem(message, start, end))
        kind = _kind_of(node.value, self.bound)
        if kind is None:
            return [node.value]
        if not bad:
            self.reads.add(FactRef(kind, node.attr))
        return []

    def _subscript(self, node: ast.Subscript) -> list[ast.expr]:
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value[:1] == "_":
            self._report(key, f"keys starting with '_' are not allowed: {key.value!r}")
        kind = _kind_of(node.value, self.bound)
        if kind is None:
            return [node.value, key]
        if isinstance(key, ast.Constant):
            if not isinstance(key.value, str):
                literal = ast.unparse(key)
                self._report(key, f'fact ids are strings: write {kind}["{literal}"]')
            elif not key.value.startswith("_"):
                self.reads.add(FactRef(kind, key.value))
            return []
        if not isinstance(key, ast.Slice):
            self.reads.add(FactRef(kind, None))
        return [key]

    def _call(self, node: ast.Call) -> list[ast.expr]:
        children: list[ast.expr] = list(node.args)
        func = node.func
        if _is_collection(node):
            return self._collection(node)
        if isinstance(func, ast.Name) and func.id in _COLLECTION_ONLY:
            self._report(
                node,
                f"{func.id}() takes one collection: {func.id}(E for x in KIND if C)",
            )
            children = [arg for arg in node.args if not isinstance(arg, ast.GeneratorExp)]
        elif (
            isinstance(func, ast.Name)
            and func.id not in _ARITY
            and any(isinstance(arg, ast.GeneratorExp) for arg in node.args)
        ):
            self._report(
                func,
                f"unknown function {func.id!r}; a collection is any, all, count, sum, min"
                f" or max of {_COLLECTION_FORM}",
            )
            children = [arg for arg in node.args if not isinstance(arg, ast.GeneratorExp)]
        elif isinstance(func, ast.Name) and func.id in _ARITY:
            self._arity(node, func.id)
            self.uses_time = self.uses_time or func.id in TIME_FUNCTIONS
        elif isinstance(func, ast.Name):
            self._report(func, f"unknown function {func.id!r}; available: {', '.join(FUNCTIONS)}")
        elif isinstance(func, ast.Attribute):
            self._report(
                node,
                f"method calls are not allowed ('.{func.attr}(...)'); "
                f"only these functions can be called: {', '.join(FUNCTIONS)}",
            )
            children.append(func)
        else:
            self._report(node, f"only these functions can be called: {', '.join(FUNCTIONS)}")
            children.append(func)
        for kw in node.keywords:
            self._report(kw, "keyword arguments are not allowed")
            children.append(kw.value)
        return children

    def _collection(self, node: ast.Call) -> list[ast.expr]:
        """Check ``FN(ELEMENT for VAR in KIND if FILTER...)``; its element and filters are
        checked next, with ``VAR`` bound."""
        assert isinstance(node.func, ast.Name)
        function = node.func.id
        generator = node.args[0]
        assert isinstance(generator, ast.GeneratorExp)
        if self.scope.in_collection:
            self._report(node, "collections cannot be nested")
            return []
        if len(generator.generators) != 1:
            self._report(
                generator,
                f"a collection has exactly one 'for': {function}(E for x in KIND if C)",
            )
            return []
        loop = generator.generators[0]
        if loop.is_async:
            self._report(generator, "'async for' is not allowed")
            return []
        target = loop.target
        if not isinstance(target, ast.Name):
            self._report(target, "the loop variable must be a plain name, as in 'for t in task'")
            return []
        var = target.id
        if not _is_kind_name(var) or var in COLLECTION_FUNCTIONS:
            self._report(
                target,
                f"{var!r} cannot name a loop variable (a lower-case name that is not a"
                " function or a literal, as in 'for t in task')",
            )
            return []
        if var in self.bound:
            self._report(
                target, f"{var!r} is the current item; give the loop variable another name"
            )
            return []
        kind = _kind_of(loop.iter, self.bound)
        if kind is None:
            self._report(
                loop.iter,
                f"a collection goes over the facts of a kind: 'for {var} in KIND', with KIND"
                " a kind name",
            )
            return []
        self.reads.add(FactRef(kind, None))
        self.uses_collections = True
        self._child_scope = _Scope(self.bound | {var}, True)
        return [generator.elt, *loop.ifs]

    def _arity(self, node: ast.Call, name: str) -> None:
        low, high = _ARITY[name]
        given = len(node.args)
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            return  # those report themselves; the count would mislead
        if given < low or (high is not None and given > high):
            if high is None:
                wanted = f"at least {low}"
            elif low == high:
                wanted = str(low)
            else:
                wanted = f"{low} to {high}"
            plural = "" if high == 1 or (high is None and low == 1) else "s"
            self._report(node, f"{name}() takes {wanted} argument{plural}, {given} given")

    def _operator(self, node: ast.expr, op: ast.AST) -> None:
        if type(op) in _REJECTED_OPERATORS:
            self._report(node, f"operator {_REJECTED_OPERATORS[type(op)]!r} is not allowed")

    def _binop(self, node: ast.BinOp) -> list[ast.expr]:
        self._operator(node, node.op)
        self._grows = self._grows or isinstance(node.op, ast.Add | ast.Mult | ast.Pow)
        if isinstance(node.op, ast.Pow) and not _small_exponent(node.right):
            self._report(
                node.right,
                f"the exponent of '**' must be a number literal between "
                f"-{MAX_EXPONENT} and {MAX_EXPONENT}",
            )
        return [node.left, node.right]

    def _compare(self, node: ast.Compare) -> list[ast.expr]:
        for op in node.ops:
            if isinstance(op, ast.Is | ast.IsNot):
                self._report(node, "'is' / 'is not' are not allowed; use == or !=")
                break
        return [node.left, *node.comparators]

    def _dict(self, node: ast.Dict) -> list[ast.expr]:
        children: list[ast.expr] = []
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                self._report(value, "unpacking with '**' is not allowed")
            else:
                children.append(key)
            children.append(value)
        return children


def _small_exponent(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    if not isinstance(node, ast.Constant):
        return False
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= MAX_EXPONENT


# --------------------------------------------------------------------------------------
# Lowering: the checked tree with fact access made explicit


class _KindRead(ast.expr):
    """Every fact of ``kind``, as {id: data}."""

    def __init__(self, kind: str, origin: ast.expr) -> None:
        super().__init__()
        self.kind = kind
        ast.copy_location(self, origin)


class _FactRead(ast.expr):
    """The data of fact (``kind``, ``fact_id``); ``key`` computes the id when it is None."""

    def __init__(self, kind: str, fact_id: str | None, key: ast.expr | None, origin: ast.expr):
        super().__init__()
        self.kind = kind
        self.fact_id = fact_id
        self.key = key
        ast.copy_location(self, origin)


class _Lookup(ast.expr):
    """``value[key]`` / ``value.key`` on JSON data: key lookup or list index, nothing else."""

    def __init__(self, value: ast.expr, key: ast.expr, origin: ast.expr) -> None:
        super().__init__()
        self.value = value
        self.key = key
        ast.copy_location(self, origin)


class _VarRead(ast.expr):
    """A variable bound to an item ``{"kind", "id", "data"}``: ``item`` (the current item
    of a per-item rule)."""

    def __init__(self, name: str, origin: ast.expr) -> None:
        super().__init__()
        self.name = name
        ast.copy_location(self, origin)


class _Collection(ast.expr):
    """``function(element for var in kind if filters...)``; ``site`` (its position) tells
    the collections of a condition apart and orders them."""

    def __init__(
        self,
        function: str,
        var: str,
        kind: str,
        element: ast.expr,
        filters: list[ast.expr],
        origin: ast.expr,
    ) -> None:
        super().__init__()
        self.function = function
        self.var = var
        self.kind = kind
        self.element = element
        self.filters = filters
        self.site = (origin.lineno, origin.col_offset)
        ast.copy_location(self, origin)


def _lower_collection(node: ast.Call, bound: frozenset[str]) -> _Collection:
    assert isinstance(node.func, ast.Name)
    generator = node.args[0]
    assert isinstance(generator, ast.GeneratorExp)
    loop = generator.generators[0]
    assert isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Name)
    var = loop.target.id
    inner = bound | {var}
    element = _lower(generator.elt, inner)
    filters = [_lower(condition, inner) for condition in loop.ifs]
    return _Collection(node.func.id, var, loop.iter.id, element, filters, node)


def _lower(node: ast.expr, bound: frozenset[str] = frozenset()) -> ast.expr:
    """Rewrite names, attributes and subscripts into explicit fact reads, variable reads
    (the ``bound`` names) and lookups."""
    if isinstance(node, ast.Name):
        if node.id in _LITERAL_NAMES:
            return ast.copy_location(ast.Constant(_LITERAL_NAMES[node.id]), node)
        if node.id in bound:
            return _VarRead(node.id, node)
        return _KindRead(node.id, node)
    if isinstance(node, ast.Attribute):
        kind = _kind_of(node.value, bound)
        if kind is not None:
            return _FactRead(kind, node.attr, None, node)
        key = ast.copy_location(ast.Constant(node.attr), node)
        return _Lookup(_lower(node.value, bound), key, node)
    if isinstance(node, ast.Subscript):
        kind = _kind_of(node.value, bound)
        if kind is not None and isinstance(node.slice, ast.Constant):
            return _FactRead(kind, str(node.slice.value), None, node)
        if kind is not None:
            return _FactRead(kind, None, _lower(node.slice, bound), node)
        return _Lookup(_lower(node.value, bound), _lower(node.slice, bound), node)
    if isinstance(node, ast.Call):
        if _is_collection(node):
            return _lower_collection(node, bound)
        node.args = [_lower(arg, bound) for arg in node.args]
        return node
    for name, value in ast.iter_fields(node):
        if isinstance(value, ast.expr):
            setattr(node, name, _lower(value, bound))
        elif isinstance(value, list):
            setattr(node, name, [_lower(v, bound) if isinstance(v, ast.expr) else v for v in value])
    return node


def _item_value(item: Item | None) -> dict[str, Any] | None:
    """The value of ``item`` in a condition: ``{"kind", "id", "data"}`` (data copied as a
    plain dict, as fact data is), None without an item."""
    if item is None:
        return None
    return {"kind": item.kind, "id": item.id, "data": dict(item.data)}


def _with_item(seen: dict[str, Any], item: dict[str, Any] | None) -> dict[str, Any]:
    """``seen`` with the current item recorded as ``"kind.id"`` (unless read already)."""
    if item is not None:
        seen.setdefault(f"{item['kind']}.{item['id']}", item["data"])
    return seen


# A plan says how clause outcomes combine: a clause index, or (is_and, sub-plans).
_Plan = int | tuple[bool, tuple["_Plan", ...]]


def _split(node: ast.expr, leaves: list[ast.expr]) -> _Plan:
    """Flatten the top-level and/or tree: append its leaves, return how they combine."""
    if isinstance(node, ast.BoolOp):
        parts = tuple(_split(value, leaves) for value in node.values)
        return (isinstance(node.op, ast.And), parts)
    leaves.append(node)
    return len(leaves) - 1


# --------------------------------------------------------------------------------------
# Names and values


def _render_key(key: object) -> str:
    """``.field`` for identifier-like keys, ``["a-b"]`` / ``[0]`` otherwise."""
    if isinstance(key, str):
        if key.isidentifier() and key.isascii() and not keyword.iskeyword(key):
            return "." + key
        return "[" + json.dumps(key, ensure_ascii=False) + "]"
    if key is None or isinstance(key, bool):
        return f"[{json.dumps(key)}]"
    if isinstance(key, int | float) and abs(key) < 1e15:
        return f"[{key!r}]"
    return f"[<{_type_name(key)}>]"


_SHARING: dict[type, bool] = {}
"""Whether each type of ``FactLookup`` met shares its data (``shares_data``)."""


def _own_data(facts: FactLookup, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data``, read from ``facts``, as an evaluation keeps it: the very dict when the
    lookup shares its data (``FactLookup``), else a copy."""
    if type(data) is dict:
        shares = _SHARING.get(type(facts))
        if shares is None:
            shares = _SHARING[type(facts)] = getattr(type(facts), "shares_data", False) is True
        if shares:
            return data
    return dict(data)


def _fact_name(kind: str, fact_id: str) -> str:
    """``milestone.design``, or ``task["T-17"]`` for ids that are not identifiers."""
    return kind + _render_key(fact_id)


def _type_name(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data; what JSON cannot hold becomes a string."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 13_000 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


# --------------------------------------------------------------------------------------
# Run time


class _Missing(Exception):
    """A fact, field or index that is not there; ``name`` says which."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Failure(Exception):
    """A run-time error; ``located`` once the failing expression has been appended."""

    def __init__(self, message: str, located: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.located = located


class _Unbounded(_Failure):
    """Work over the sandbox's bounds (``MAX_SEQUENCE_ITEMS``, ``MAX_INT_BITS``,
    ``MAX_EXPONENT``): refused at check time when the operands are literals."""


def _check_size(size: int) -> None:
    if size > MAX_SEQUENCE_ITEMS:
        raise _Unbounded(f"result would hold {size} items; the limit is {MAX_SEQUENCE_ITEMS}")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _Unbounded(f"integer result would exceed {MAX_INT_BITS} bits")


_SEQUENCE = (str, list, tuple)


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCE) and isinstance(b, _SEQUENCE):
        _check_size(len(a) + len(b))
    return a + b


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, _SEQUENCE) and isinstance(b, int):
        _check_size(len(a) * max(b, 0))
    elif isinstance(b, _SEQUENCE) and isinstance(a, int):
        _check_size(len(b) * max(a, 0))
    elif isinstance(a, int) and isinstance(b, int):
        _check_bits(a.bit_length() + b.bit_length())
    return a * b


def _pow(a: Any, b: Any) -> Any:
    if isinstance(b, int | float) and abs(b) > MAX_EXPONENT:
        raise _Unbounded(f"exponent {b} is out of range (at most {MAX_EXPONENT})")
    if isinstance(a, int) and isinstance(b, int) and b > 0:
        _check_bits(a.bit_length() * b)
    result = a**b
    if isinstance(result, complex):
        raise _Failure("'**' result is not a real number")
    return result


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes):
        raise _Failure("'%' formatting of strings is not supported")
    return a % b


def _contains(item: Any, container: Any) -> bool:
    return bool(item in container)


def _not_contains(item: Any, container: Any) -> bool:
    return bool(item not in container)


_OPERATORS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: _add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: _mod,
    ast.Pow: _pow,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: _contains,
    ast.NotIn: _not_contains,
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _round(value: Any, ndigits: Any = None) -> Any:
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int) or isinstance(ndigits, bool):
        raise _Failure(f"round(): ndigits must be an integer, not {_type_name(ndigits)}")
    if abs(ndigits) > MAX_ROUND_DIGITS:
        limit = MAX_ROUND_DIGITS
        raise _Failure(f"round(): ndigits must be between -{limit} and {limit}")
    return round(value, ndigits)


# --------------------------------------------------------------------------------------
# Collections: what a collection gives from the elements of the items passing its filter


class _MissingElement:
    """The element of an item was missing (``name`` says what); for ``sum``/``min``/
    ``max`` the collection's value then is missing too (the first such name, by id)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MissingElement) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class _CollectionRun:
    """What the collections of one evaluation share (the compiled form and the reference
    alike): ``seen``, what each collection saw, by site; ``kinds``, the facts of each kind
    gone over (read once per evaluation, and never recorded in ``Evaluation.seen``)."""

    __slots__ = ("kinds", "seen")

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], CollectionSeen] = {}
        self.kinds: dict[str, Mapping[str, Mapping[str, Any]]] = {}

    def of_kind(self, facts: FactLookup, kind: str) -> Mapping[str, Mapping[str, Any]]:
        found = self.kinds.get(kind)
        if found is None:
            found = self.kinds[kind] = facts.of_kind(kind)
        return found

    def collections(self) -> tuple[CollectionSeen, ...]:
        """``Evaluation.collections``: what each collection saw, in source order."""
        return tuple(self.seen[key] for key in sorted(self.seen))


def _item_of(kind: str, fact_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A fact as the value of a loop variable or of ``item``: ``{"kind", "id", "data"}``."""
    return {"kind": kind, "id": fact_id, "data": dict(data)}


def _rename_missing(name: str, var: str, kind: str, fact_id: str) -> str:
    """A missing name found in a collection's element, named from the fact: ``t.data.hours``
    of (task, T-3) is ``task["T-3"].hours``."""
    prefix = var + ".data"
    if name.startswith(prefix) and name[len(prefix) : len(prefix) + 1] in ("", ".", "["):
        return _fact_name(kind, fact_id) + name[len(prefix) :]
    return name


def _empty_name(function: str, var: str, kind: str) -> str:
    """How ``min``/``max`` over no items is named as missing: ``min(... for t in task)``."""
    return f"{function}(... for {var} in {kind})"


class _ExactSum:
    """The exact sum of numbers, in any order, added and taken away one by one.

    Integers (and booleans) add up exactly; finite floats are kept as exact fractions, so
    the value is the sum correctly rounded once (a float when any float was added, as
    ``math.fsum`` would give it): the same whatever the order of the additions. Infinities
    and NaN follow IEEE rules (``inf + -inf`` is NaN).
    """

    __slots__ = ("floats", "fraction", "integer", "nan", "negative", "positive")

    def __init__(self) -> None:
        self.integer = 0
        self.fraction: Fraction | int = 0
        self.floats = 0
        self.nan = 0
        self.positive = 0
        self.negative = 0

    def add(self, value: float, sign: int = 1) -> None:
        """Add ``value`` (``sign`` 1), or take it away again (``sign`` -1)."""
        if type(value) is float:
            self.floats += sign
            if value != value:
                self.nan += sign
            elif value == math.inf:
                self.positive += sign
            elif value == -math.inf:
                self.negative += sign
            else:
                numerator, denominator = value.as_integer_ratio()
                if denominator == 1:
                    self.integer += sign * numerator
                else:
                    self.fraction += Fraction(sign * numerator, denominator)
        else:
            self.integer += sign * int(value)

    @property
    def value(self) -> int | float:
        if not self.floats:
            return self.integer
        if self.nan or (self.positive and self.negative):
            return math.nan
        if self.positive:
            return math.inf
        if self.negative:
            return -math.inf
        total = self.fraction + self.integer
        try:
            return float(total)
        except OverflowError:
            return math.inf if total > 0 else -math.inf


def _is_number(value: Any) -> bool:
    return type(value) in (int, float, bool)


def _type_problem(function: str, value: Any) -> str | None:
    """Why ``value`` cannot be an element of ``function`` (``sum``/``min``/``max``)."""
    if isinstance(value, _MissingElement):
        return None
    if function == "sum":
        return None if _is_number(value) else f"sum() adds numbers, not {_type_name(value)}"
    if type(value) is str or (_is_number(value) and value == value):
        return None
    what = "NaN" if _is_number(value) else _type_name(value)
    return f"{function}() compares numbers or strings, not {what}"


def _collection_value(function: str, var: str, kind: str, elements: list[tuple[str, Any]]) -> Any:
    """The value of a collection from ``elements``: ``(id, element)`` of the items that
    passed its filter, in id order (an element that was missing is a ``_MissingElement``).

    ``any``/``all``/``count``: over truthy elements (a missing one is false; ``all`` of
    nothing is false). ``sum``/``min``/``max``: an element of the wrong type (``sum`` adds
    numbers; ``min``/``max`` compare numbers, or strings, but not both and not NaN) fails
    (the first, by id), else a missing element makes the value missing (the first, by id,
    as a ``_MissingElement``), else ``sum`` is the exact sum (0 of nothing) and ``min``/
    ``max`` the least/greatest element (of equal ones, the first by id; of nothing:
    missing).
    """
    if function in ("any", "all", "count"):
        true = sum(1 for _, value in elements if not isinstance(value, _MissingElement) and value)
        if function == "count":
            return true
        if function == "any":
            return true > 0
        return bool(elements) and true == len(elements)
    for fact_id, value in elements:
        problem = _type_problem(function, value)
        if problem is not None:
            raise _Failure(f"{problem} ({_fact_name(kind, fact_id)})")
    for _, value in elements:
        if isinstance(value, _MissingElement):
            return value
    if function == "sum":
        total = _ExactSum()
        for _, value in elements:
            total.add(value)
        return total.value
    if not elements:
        return _MissingElement(_empty_name(function, var, kind))
    values = [value for _, value in elements]
    if any(type(v) is str for v in values) and not all(type(v) is str for v in values):
        raise _Failure(f"{function}() cannot compare numbers with strings")
    return min(values) if function == "min" else max(values)


def _collection_seen(
    text: str, function: str, kind: str, elements: list[tuple[str, Any]], value: Any
) -> CollectionSeen:
    """The ``CollectionSeen`` of a collection from its ``elements`` (as for
    ``_collection_value``) and its value."""
    false_ids: list[str] = []
    true = 0
    for fact_id, element in elements:
        if not isinstance(element, _MissingElement) and element:
            true += 1
        elif len(false_ids) < MAX_FALSE_IDS:
            false_ids.append(fact_id)
    shown = None if isinstance(value, _MissingElement) else _jsonable(value)
    return CollectionSeen(text, function, kind, len(elements), true, tuple(false_ids), shown)
