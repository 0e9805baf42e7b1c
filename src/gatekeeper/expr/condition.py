"""The ``when`` language: a small, sandboxed expression language over a project's facts.

A rule's ``when`` is one expression. ``compile_condition`` parses it once (Python syntax,
``ast`` in "eval" mode), checks it statically, makes fact access explicit and turns the
result into one Python function (generated source, compiled once, with no builtins: it can
only call the fact accessors, JSON-only lookups, bounded operators and the functions below).
``evaluate(facts, now)`` is one call of that function. simpleeval walking the same checked
tree is the reference: it defines the results, and whenever a clause fails for any other
reason than a missing fact or field, the clause is run again on it to get its exact error
(tests/test_expressions_compiled.py checks that both always agree). This docstring is the
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
keyword or ``*`` arguments, or the wrong number of arguments; a function name used
without calling it; names that are not kinds; attributes or keys starting with ``_``;
lambdas, comprehensions, f-strings, ``:=``, ``*``/``**`` unpacking, sets, slices
(``x[1:3]``), ``is``/``is not`` (use ``==``), bitwise operators, bytes and complex
literals; ``**`` unless the exponent is a number literal between -64 and 64; strings over
1,000 characters; expressions over 4,096 characters, 400 expression nodes (names,
literals, operations, calls...) or 32 levels of nesting; a bare top-level ``a, b`` (a
tuple, always true). A constant expression such as ``true`` is allowed.

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
``1 <= hours_since(x.y.at) < 48``, ``days_since(a.b.at) >= policy.hold.days``) is solved
exactly: the rule is evaluated again at the microsecond its value changes. Any other use of
time (``now()``, ``days_since(ts) * 24 > 5``, ``days_since(a) > days_since(b)``) is
re-checked every second.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import keyword
import math
import operator
import re
import sys
import tokenize
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, Protocol

from simpleeval import SimpleEval

from gatekeeper.clock import format_rfc3339, parse_rfc3339

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

_LITERAL_NAMES: dict[str, bool | None] = {"true": True, "false": False, "null": None}
_KIND_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_NEWLINE_RUN_RE = re.compile(r"\s*\n\s*")
_MAX_FRAGMENT_CHARS = 200
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
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
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
    """Read access to the current facts of one project."""

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        """The ``data`` of fact (kind, id), or None when there is no such fact."""

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        """Every fact of ``kind`` as {id: data}."""


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


@dataclass(frozen=True)
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
    """

    value: bool
    clauses: tuple[Clause, ...]
    missing: tuple[str, ...] = ()
    error: str | None = None
    seen: Mapping[str, Any] = field(default_factory=dict)


class Condition(Protocol):
    """A compiled, checked ``when`` expression."""

    text: str
    reads: frozenset[FactRef]
    uses_time: bool

    def evaluate(self, facts: FactLookup, now: datetime) -> Evaluation: ...


def compile_condition(text: str) -> Condition:
    """Parse and statically check ``text``; raises ``ExpressionError`` listing every problem.

    Returns a ``CompiledCondition`` (``text``, ``reads``, ``uses_time``, ``evaluate``).
    Each ``ExpressionProblem`` carries a message, the 0-based character offset into
    ``text`` and the offending fragment. Only ``ExpressionError`` is ever raised.
    """
    if not isinstance(text, str):
        problem = ExpressionProblem(f"expression must be a string, not {_type_name(text)}", 0, "")
        raise ExpressionError([problem])
    source = _Source(text)
    tree = _parse(source)
    checker = _Checker(source)
    checker.check(tree)
    if checker.problems:
        raise ExpressionError(sorted(checker.problems, key=lambda p: p.offset))
    return CompiledCondition(text, tree, source, frozenset(checker.reads), checker.uses_time)


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


def _kind_of(node: ast.expr) -> str | None:
    """The kind named by ``node`` when it is a bare kind name, else None."""
    if isinstance(node, ast.Name) and _is_kind_name(node.id):
        return node.id
    return None


class _Checker:
    """Walks the tree (iteratively, so depth cannot hurt) collecting problems and reads."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.problems: list[ExpressionProblem] = []
        self.reads: set[FactRef] = set()
        self.uses_time = False
        self._count = 0
        self._reported_depth = False

    def check(self, root: ast.expr) -> None:
        stack: list[tuple[ast.expr, int]] = [(root, 1)]
        while stack:
            node, depth = stack.pop()
            self._measure(root, node, depth)
            stack.extend((child, depth + 1) for child in self._visit(node))

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
        else:
            self.reads.add(FactRef(name, None))

    def _attribute(self, node: ast.Attribute) -> list[ast.expr]:
        bad = node.attr.startswith("_")
        if bad:
            start, end = self.source.span(node)
            start = max(start, end - len(node.attr))
            message = f"names starting with '_' are not allowed: {node.attr!r}"
            self.problems.append(self.source.problem(message, start, end))
        kind = _kind_of(node.value)
        if kind is None:
            return [node.value]
        if not bad:
            self.reads.add(FactRef(kind, node.attr))
        return []

    def _subscript(self, node: ast.Subscript) -> list[ast.expr]:
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value[:1] == "_":
            self._report(key, f"keys starting with '_' are not allowed: {key.value!r}")
        kind = _kind_of(node.value)
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
        if isinstance(func, ast.Name) and func.id in _ARITY:
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


def _lower(node: ast.expr) -> ast.expr:
    """Rewrite names, attributes and subscripts into explicit fact reads and lookups."""
    if isinstance(node, ast.Name):
        if node.id in _LITERAL_NAMES:
            return ast.copy_location(ast.Constant(_LITERAL_NAMES[node.id]), node)
        return _KindRead(node.id, node)
    if isinstance(node, ast.Attribute):
        kind = _kind_of(node.value)
        if kind is not None:
            return _FactRead(kind, node.attr, None, node)
        key = ast.copy_location(ast.Constant(node.attr), node)
        return _Lookup(_lower(node.value), key, node)
    if isinstance(node, ast.Subscript):
        kind = _kind_of(node.value)
        if kind is not None and isinstance(node.slice, ast.Constant):
            return _FactRead(kind, str(node.slice.value), None, node)
        if kind is not None:
            return _FactRead(kind, None, _lower(node.slice), node)
        return _Lookup(_lower(node.value), _lower(node.slice), node)
    if isinstance(node, ast.Call):
        node.args = [_lower(arg) for arg in node.args]
        return node
    for name, value in ast.iter_fields(node):
        if isinstance(value, ast.expr):
            setattr(node, name, _lower(value))
        elif isinstance(value, list):
            setattr(node, name, [_lower(v) if isinstance(v, ast.expr) else v for v in value])
    return node


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


def _check_size(size: int) -> None:
    if size > MAX_SEQUENCE_ITEMS:
        raise _Failure(f"result would hold {size} items; the limit is {MAX_SEQUENCE_ITEMS}")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _Failure(f"integer result would exceed {MAX_INT_BITS} bits")


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
        raise _Failure(f"exponent {b} is out of range (at most {MAX_EXPONENT})")
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
        data = None if found is None else dict(found)
    fact_data[name] = data
    return data


def _load_kind(
    kind_data: dict[str, dict[str, Any]], facts: FactLookup, kind: str
) -> dict[str, dict[str, Any]]:
    """Every fact of ``kind`` as {id: data}; read once per evaluation (cached in
    ``kind_data``)."""
    data = kind_data.get(kind)
    if data is None:
        data = {fact_id: dict(found) for fact_id, found in facts.of_kind(kind).items()}
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
        }
        self.source = source
        self.facts = facts
        self.now = now
        # Facts read so far, by their ``seen`` name ("kind.id"; shared with the compiled
        # form of the condition when it hands a clause over), and kinds read as a whole.
        self.fact_data = {} if fact_data is None else fact_data
        self.kind_data = {} if kind_data is None else kind_data
        self.computed_ids: dict[_FactRead, str] = {}  # ids of task[expr] reads, for names

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
        if isinstance(node, _Lookup) and isinstance(node.key, ast.Constant):
            return self._path(node.value) + _render_key(node.key.value)
        text = self.source.snippet(node)
        atomic = isinstance(node, _FactRead | _Lookup | ast.Call | ast.List | ast.Dict)
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
            data = None if found is None else dict(found)
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
}
"""Everything compiled code can name besides its own constants: no builtins."""

_PARAMETERS = ("_fd", "_kd", "_facts", "_now", "_D")
"""The compiled function's parameters: fact data read (by "kind.id"), kinds read, the
``FactLookup``, the evaluation's "now" and the condition's values."""


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
    if isinstance(node, _Lookup) and isinstance(node.key, ast.Constant):
        inner = _lookup_prefix(source, node.value)
        return None if inner is None else inner + _render_key(node.key.value)
    text = source.snippet(node)
    atomic = isinstance(node, _FactRead | _Lookup | ast.Call | ast.List | ast.Dict)
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
        self.numbers: dict[tuple[type, object], int | float] = {}

    def const(self, value: object) -> str:
        """The source naming ``value``: a keyword for None/True/False, else an item of the
        condition's values (``_D[first]``, ``_D[first + 1]``...), so that conditions
        differing only in their constants share their code."""
        if value is None or isinstance(value, bool):
            return repr(value)
        if not isinstance(value, str | int | float):
            raise _Unsupported(f"constant of type {type(value).__name__}")
        if isinstance(value, str):
            # One shared object per string: the rules reading one fact name its id (and
            # "kind.id") with the very same object, the key of the evaluation's fact data,
            # so that lookups find it by identity and touch one string, not several.
            value = sys.intern(value)
        else:  # equal numbers of one type are one object too (floats by their text: 0.0
            # is not -0.0)
            key = (type(value), repr(value) if isinstance(value, float) else value)
            value = self.numbers.setdefault(key, value)
        self.constants.append(value)
        return f"_D[{self.first + len(self.constants) - 1}]"

    def expr(self, node: ast.expr) -> str:
        if isinstance(node, ast.Constant):
            return self.const(node.value)
        if isinstance(node, _KindRead):
            return f"_kind(_kd, _facts, {self.const(node.kind)})"
        if isinstance(node, _FactRead):
            return self._fact_read(node)
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
            return f"_get({value}, {key_source}, {self.const(prefix)})"
        # ``.field`` of a dict holding JSON data, the usual lookup, is done inline; "_get"
        # does the rest (a missing field, another container, data that is not JSON)
        # exactly as for any other key.
        self.temporaries += 1
        found, field = f"_r{self.temporaries}", self.const(key.value)
        base = node.value
        if isinstance(base, _FactRead) and base.fact_id is not None:
            # The data of a fact is always a dict: no need to check the container's type.
            data = self.expr(base)
            name = self.const(f"{base.kind}.{base.fact_id}")
            return (
                f"({found} if _type({found} := {data}.get({field}, _ABSENT))"
                f" in _PLAIN else _get(_fd[{name}], {field}, {self.const(prefix)}))"
            )
        held = f"_c{self.temporaries}"
        container = self.expr(base)
        return (
            f"({found} if _type({held} := {container}) is _dict"
            f" and _type({found} := {held}.get({field}, _ABSENT)) in _PLAIN"
            f" else _get({held}, {field}, {self.const(prefix)}))"
        )

    def _fact_read(self, node: _FactRead) -> str:
        if node.fact_id is None:
            assert node.key is not None
            kind = self.const(node.kind)
            return f"_fact_at(_fd, _kd, _facts, {kind}, {self.expr(node.key)})"
        name = self.const(f"{node.kind}.{node.fact_id}")
        # A cached non-empty object is the common case; "_fact" handles the rest (the
        # first read, an empty object, a fact that does not exist).
        kind, fact_id = self.const(node.kind), self.const(node.fact_id)
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
    [dict[str, Any], dict[str, Any], FactLookup, datetime, tuple[Any, ...]],
    "Evaluation | tuple[dict[int, Exception], tuple[Any, ...]]",
]


_SHAPES: dict[str, _Run] = {}
"""Compiled functions by shape (the generated source, constants left out): conditions that
differ only in their constants (ids, keys, numbers, strings) share one."""
_MAX_SHAPES = 4096


def _compile_clauses(
    source: _Source, leaves: tuple[ast.expr, ...], plan: _Plan, clause_texts: tuple[str, ...]
) -> tuple[_Run, tuple[Any, ...]] | None:
    """``(run, values)``: one Python function evaluating every clause of a condition and the
    condition's values it takes; None when a clause holds something the code generator
    does not know (then the reference evaluates).

    ``run(fact_data, kind_data, facts, now, values)`` returns the ``Evaluation`` when every
    clause gave a value, else ``(failures, clause_values)`` with ``failures`` mapping a
    clause index to what it raised (``_Missing``: that is its outcome; anything else: the
    reference decides) and ``clause_values`` the clause values (None for those that
    failed).

    The source is ``def _run(...): ...``, compiled once per shape (``_SHAPES``) with
    ``_RUNTIME`` as its globals (no builtins): conditions of one shape share the function.
    ``values`` (``_D`` in the source) is one flat tuple: each clause's True ``Clause``,
    each one's False ``Clause``, the function making any other ``Clause``, then the
    constants (see ``_CodeGenerator.const``). An evaluation touches only the items it uses
    and no other object of its condition (no function, defaults or closure cells): with
    thousands of rules, most of a rule's objects are out of the CPU caches when a fact
    wakes it, and each object touched costs a cache miss.
    """
    count = len(leaves)
    generator = _CodeGenerator(source, 2 * count + 1)
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
    clauses = "".join(
        f"_D[{i}] if _v{i} is True else _D[{count + i}] if _v{i} is False"
        f" else _D[{2 * count}]({i}, _v{i}), "
        for i in range(count)
    )
    values = "".join(f"_v{i}, " for i in range(count))
    lines += [
        "        if _failed is not None:",
        f"            return _failed, ({values})",
        # Evaluation(value, clauses, (), None, seen) without the frozen dataclass's
        # __init__ (five object.__setattr__ calls): the very same instance (its fields set
        # in the same order), built three times faster.
        "        _result = _new(_Evaluation)",
        "        _fields = _result.__dict__",
        f"        _fields['value'] = True if {_plan_source(plan)} else False",
        f"        _fields['clauses'] = ({clauses})",
        "        _fields['missing'] = ()",
        "        _fields['error'] = None",
        "        _fields['seen'] = {**_kd, **_fd} if _kd else _fd",
        "        return _result",
    ]
    text = "\n".join(line[4:] for line in lines)
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

    def clause(index: int, value: Any) -> Clause:
        return Clause(clause_texts[index], _jsonable(value))

    true_clauses = [Clause(text, True) for text in clause_texts]
    false_clauses = [Clause(text, False) for text in clause_texts]
    condition_values = (*true_clauses, *false_clauses, clause, *generator.constants)
    return run, condition_values


class _Pending:
    """The compiled form of a condition not evaluated yet."""


_PENDING = _Pending()


class CompiledCondition:
    """A checked ``when`` expression, ready to evaluate; made by ``compile_condition``.

    Attributes: ``text`` (the source), ``reads`` (the ``FactRef`` keys it reads; id None
    for a kind-level read), ``uses_time`` (calls ``days_since``/``hours_since``/
    ``minutes_since``/``now``), ``clause_texts`` (the top-level and/or leaves). Immutable.
    """

    __slots__ = (  # what an evaluation reads first, together  # noqa: RUF023
        "_compiled",
        "_values",
        "_kept_leaves",
        "_plan",
        "_time_sites",
        "clause_texts",
        "reads",
        "text",
        "uses_time",
    )

    text: str
    reads: frozenset[FactRef]
    uses_time: bool
    clause_texts: tuple[str, ...]
    _plan: _Plan
    _kept_leaves: tuple[ast.expr, ...] | None
    _compiled: _Run | _Pending | None
    _values: tuple[Any, ...]
    _time_sites: _TimeSites

    def __init__(
        self,
        text: str,
        tree: ast.expr,
        source: _Source,
        reads: frozenset[FactRef],
        uses_time: bool,
    ) -> None:
        leaves: list[ast.expr] = []
        plan = _split(tree, leaves)
        clause_texts = tuple(source.snippet(leaf) for leaf in leaves)
        lowered = tuple(_lower(leaf) for leaf in leaves)
        values = {
            "text": text,
            "reads": reads,
            "uses_time": uses_time,
            "clause_texts": clause_texts,
            "_plan": plan,
            # The syntax tree is most of a condition's memory (several KB): it is not kept.
            # The Python function is generated at the first evaluation (``gatekeeper check``
            # never evaluates), from the text parsed again; so is the tree the reference
            # evaluator walks, when it is needed (rarely).
            "_kept_leaves": None,
            "_compiled": _PENDING,
            "_values": (),
            "_time_sites": _find_time_sites(lowered),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

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
        leaves = _lowered_leaves(self.text)
        compiled = _compile_clauses(_Source(self.text), leaves, self._plan, self.clause_texts)
        if compiled is None:
            object.__setattr__(self, "_kept_leaves", leaves)
            run = None
        else:
            run, values = compiled
            object.__setattr__(self, "_values", values)
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
        kept = self._kept_leaves
        return kept if kept is not None else _lowered_leaves(self.text)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CompiledCondition is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return f"CompiledCondition({self.text!r})"

    def __copy__(self) -> CompiledCondition:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledCondition:
        return self  # immutable

    def __reduce__(self) -> tuple[Callable[[str], Condition], tuple[str]]:
        return (compile_condition, (self.text,))

    def evaluate(self, facts: FactLookup, now: datetime) -> Evaluation:
        """Evaluate against ``facts`` at time ``now`` (a naive ``now`` is taken as UTC).

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
            return _evaluate_reference(self, facts, now)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        fact_data: dict[str, dict[str, Any] | None] = {}
        kind_data: dict[str, dict[str, Any]] = {}
        try:
            result = run(fact_data, kind_data, facts, now, self._values)
            if isinstance(result, Evaluation):  # every clause gave a value: the common case
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
                        evaluator = _Evaluator(self._source, facts, now, fact_data, kind_data)
                    outcomes.append(evaluator.outcome(leaf))
            return _conclude(self, outcomes, _seen(fact_data, kind_data))
        except Exception as exc:  # defensive: nothing above is expected to raise
            return Evaluation(value=False, clauses=(), error=f"internal error: {exc!r}")

    def next_change_at(self, facts: FactLookup, now: datetime) -> datetime | None:
        """The earliest instant strictly after ``now`` at which the condition's value may
        change while ``facts`` stay as they are; None when the passing of time cannot
        change it. A naive ``now`` is taken as UTC; the answer is an aware UTC datetime.

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
        sites = self._time_sites
        if not sites.thresholds and not sites.unsolved and not sites.always_poll:
            return None
        try:
            return sites.next_change(_Evaluator(self._source, facts, now), now)
        except Exception:  # defensive: nothing in next_change is expected to raise
            return _recheck(now)


@functools.lru_cache(maxsize=64)
def _lowered_leaves(text: str) -> tuple[ast.expr, ...]:
    """The lowered top-level clauses of ``text``, an expression ``compile_condition``
    accepted (so parsing cannot fail here)."""
    leaves: list[ast.expr] = []
    _split(_parse(_Source(text)), leaves)
    return tuple(_lower(leaf) for leaf in leaves)


def _evaluate_reference(
    condition: CompiledCondition, facts: FactLookup, now: datetime
) -> Evaluation:
    """``condition.evaluate(facts, now)`` done by the reference evaluator alone: simpleeval
    (``_Evaluator``) walking the lowered clauses. The compiled form must give the very same
    ``Evaluation``; it also hands it the clauses that fail in any other way than a missing
    fact or field, to get their exact error message."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        evaluator = _Evaluator(condition._source, facts, now)
        outcomes = [evaluator.outcome(leaf) for leaf in condition._leaves]
        return _conclude(condition, outcomes, evaluator.seen())
    except Exception as exc:  # defensive: nothing above is expected to raise
        return Evaluation(value=False, clauses=(), error=f"internal error: {exc!r}")


def _conclude(
    condition: CompiledCondition, outcomes: list[_Outcome], seen: dict[str, Any]
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


# --------------------------------------------------------------------------------------
# When time alone changes a condition (see CompiledCondition.next_change_at)


TIME_RECHECK = timedelta(seconds=1)
"""How soon ``next_change_at`` asks for a re-evaluation of a condition whose dependence on
time it cannot solve (``now()``, arithmetic on ``days_since``, ...): 1 second."""

_SECONDS_PER_UNIT: dict[str, int] = {"days_since": 86400, "hours_since": 3600, "minutes_since": 60}
"""The elapsed-time functions and the length of their unit, in seconds."""

_MIRRORED: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.Gt,
    ast.LtE: ast.GtE,
    ast.Gt: ast.Lt,
    ast.GtE: ast.LtE,
    ast.Eq: ast.Eq,
    ast.NotEq: ast.NotEq,
}
"""``e OP x`` is ``x MIRRORED[OP] e``, for the comparisons a threshold can solve."""

_MICROSECOND = timedelta(microseconds=1)
_LATEST = datetime.max.replace(tzinfo=UTC)


def next_change_at(condition: Condition, facts: FactLookup, now: datetime) -> datetime | None:
    """When ``condition`` may next change through the passing of time alone.

    A ``CompiledCondition`` answers with its ``next_change_at`` (see there); any other
    ``Condition`` that uses time gets ``now + 1 s`` (``TIME_RECHECK``), one that does not
    gets None. A naive ``now`` is taken as UTC.
    """
    if isinstance(condition, CompiledCondition):
        return condition.next_change_at(facts, now)
    if not condition.uses_time:
        return None
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return _recheck(now)


def _recheck(now: datetime) -> datetime:
    """``now + TIME_RECHECK``, or the last representable instant when that overflows."""
    return now + TIME_RECHECK if now <= _LATEST - TIME_RECHECK else _LATEST


@dataclass(frozen=True)
class _Threshold:
    """A solvable comparison ``X_since(timestamp) op bound`` (the time function on the
    left: ``e < days_since(ts)`` is stored as ``days_since(ts) > e``)."""

    seconds_per_unit: int
    timestamp: ast.expr
    op: type[ast.cmpop]
    bound: ast.expr


@dataclass(frozen=True)
class _TimeSites:
    """Where a condition uses time: ``thresholds`` it can solve, the ``timestamp``
    arguments of ``X_since`` calls used otherwise (``unsolved``: each means a 1-second
    re-check while its timestamp is valid), and ``always_poll`` when ``now()`` or a time
    function of a time-dependent argument is used (a 1-second re-check always)."""

    thresholds: tuple[_Threshold, ...] = ()
    unsolved: tuple[ast.expr, ...] = ()
    always_poll: bool = False

    def next_change(self, evaluator: _Evaluator, now: datetime) -> datetime | None:
        """The earliest candidate after ``now`` (see ``CompiledCondition.next_change_at``)."""
        soonest: datetime | None = None
        if self.always_poll:
            soonest = _recheck(now)
        else:
            for timestamp in self.unsolved:
                if _timestamp(evaluator, timestamp) is not None:
                    soonest = _recheck(now)
                    break
        for site in self.thresholds:
            start = _timestamp(evaluator, site.timestamp)
            if start is None:
                continue
            bound = _number(evaluator, site.bound)
            if bound is None:
                continue
            at = _crossing(site.seconds_per_unit, start, site.op, bound, now)
            if at is not None and (soonest is None or at < soonest):
                soonest = at
        return soonest


def _timestamp(evaluator: _Evaluator, node: ast.expr) -> datetime | None:
    """The UTC instant ``node`` gives as an RFC 3339 timestamp; None when it fails."""
    outcome = evaluator.outcome(node)
    if outcome.failed or not isinstance(outcome.value, str):
        return None
    try:
        return parse_rfc3339(outcome.value)
    except (ValueError, TypeError, OverflowError):
        return None


def _number(evaluator: _Evaluator, node: ast.expr) -> int | float | None:
    """The finite number ``node`` gives; None when it fails or gives anything else."""
    if isinstance(node, ast.Constant):
        value = node.value
    else:
        outcome = evaluator.outcome(node)
        if outcome.failed:
            return None
        value = outcome.value
    if isinstance(value, int):  # bool included: Python compares it as 0 / 1
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def _crossing(
    seconds_per_unit: int, start: datetime, op: type[ast.cmpop], bound: float, now: datetime
) -> datetime | None:
    """The first instant after ``now`` at which ``X_since(start) op bound`` changes value.

    ``X_since`` at ``start + k µs`` is ``(k / 10**6) / seconds_per_unit`` in floats, exactly
    as ``_Evaluator`` computes it (``timedelta.total_seconds()`` divides the whole number
    of microseconds by 10**6), which never decreases as ``k`` grows.
    """

    def elapsed(k: int) -> float:
        return (k / 1_000_000) / seconds_per_unit

    k_now = (now - start) // _MICROSECOND
    k_max = (_LATEST - start) // _MICROSECOND
    exact = Fraction(bound) * seconds_per_unit * 1_000_000
    guess = math.ceil(exact)

    def at_least(k: int) -> bool:
        return elapsed(k) >= bound

    def above(k: int) -> bool:
        return elapsed(k) > bound

    if op in (ast.GtE, ast.Lt):
        k = _first_after(at_least, k_now, k_max, guess)
    elif op in (ast.Gt, ast.LtE):
        k = _first_after(above, k_now, k_max, guess)
    elif above(k_now):  # == / != : past the only stretch where the value equals bound
        return None
    elif at_least(k_now):  # equal now: changes when the value moves past bound
        k = _first_after(above, k_now, k_max, guess)
    else:
        k = _first_after(at_least, k_now, k_max, guess)
        if k is not None and elapsed(k) != bound:
            return None  # the value steps over bound: == is never true, != never false
    return None if k is None else start + k * _MICROSECOND


def _first_after(predicate: Callable[[int], bool], low: int, high: int, guess: int) -> int | None:
    """The least ``k`` in ``(low, high]`` with ``predicate(k)`` true, for a predicate that
    is false then true as ``k`` grows; None when it already holds at ``low`` or never does
    up to ``high``. ``guess`` is where to start looking (usually within a few steps)."""
    if high <= low or predicate(low) or not predicate(high):
        return None
    guess = min(max(guess, low + 1), high)
    if predicate(guess):
        true_at, step = guess, 1
        false_at = guess - 1
        while false_at > low and predicate(false_at):
            true_at = false_at
            false_at = max(low, false_at - step)
            step *= 2
    else:
        false_at, step = guess, 1
        true_at = guess + 1
        while true_at < high and not predicate(true_at):
            false_at = true_at
            true_at = min(high, true_at + step)
            step *= 2
    while true_at - false_at > 1:  # predicate(false_at) is false, predicate(true_at) true
        middle = (false_at + true_at) // 2
        if predicate(middle):
            true_at = middle
        else:
            false_at = middle
    return true_at


def _calls_time_function(node: ast.expr) -> bool:
    """Whether ``node`` itself is a call of a time function."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in TIME_FUNCTIONS
    )


def _children(node: ast.expr) -> list[ast.expr]:
    """The sub-expressions of a lowered node."""
    if isinstance(node, _KindRead):
        return []
    if isinstance(node, _FactRead):
        return [] if node.key is None else [node.key]
    if isinstance(node, _Lookup):
        return [node.value, node.key]
    if isinstance(node, ast.Call):
        return list(node.args)
    return [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)]


class _TimeAnalysis:
    """Finds the ``_TimeSites`` of lowered clauses (once, at compile time)."""

    def __init__(self) -> None:
        self.thresholds: list[_Threshold] = []
        self.unsolved: list[ast.expr] = []
        self.always_poll = False
        self._uses_time: dict[int, bool] = {}  # by id(node); the tree outlives the analysis

    def uses_time(self, node: ast.expr) -> bool:
        """Whether ``node`` calls a time function anywhere (memoised per node)."""
        known = self._uses_time.get(id(node))
        if known is None:
            known = _calls_time_function(node) or any(
                [self.uses_time(child) for child in _children(node)]
            )
            self._uses_time[id(node)] = known
        return known

    def elapsed_call(self, node: ast.expr) -> tuple[int, ast.expr] | None:
        """``(seconds per unit, timestamp)`` when ``node`` is ``X_since(timestamp)`` with a
        timestamp that does not itself depend on time."""
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _SECONDS_PER_UNIT
            and len(node.args) == 1
            and not self.uses_time(node.args[0])
        ):
            return _SECONDS_PER_UNIT[node.func.id], node.args[0]
        return None

    def visit(self, node: ast.expr) -> None:
        if not self.uses_time(node):
            return
        if isinstance(node, ast.Compare):
            self._compare(node)
            return
        call = self.elapsed_call(node)
        if call is not None:
            self.unsolved.append(call[1])  # X_since(ts) used other than in a comparison
            return
        if _calls_time_function(node):  # now(), or X_since(<depends on time>)
            self.always_poll = True
            return
        for child in _children(node):
            self.visit(child)

    def _compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for index, operand in enumerate(operands):
            call = self.elapsed_call(operand)
            if call is None:
                self.visit(operand)
                continue
            seconds_per_unit, timestamp = call
            solved = True
            if index > 0:  # the pair (operands[index - 1], operand)
                op = _MIRRORED.get(type(node.ops[index - 1]))
                solved &= self._pair(seconds_per_unit, timestamp, op, operands[index - 1])
            if index < len(node.ops):  # the pair (operand, operands[index + 1])
                op = type(node.ops[index])
                solved &= self._pair(
                    seconds_per_unit,
                    timestamp,
                    op if op in _MIRRORED else None,
                    operands[index + 1],
                )
            if not solved:
                self.unsolved.append(timestamp)

    def _pair(
        self,
        seconds_per_unit: int,
        timestamp: ast.expr,
        op: type[ast.cmpop] | None,
        other: ast.expr,
    ) -> bool:
        """Record ``X_since(timestamp) op other`` as a threshold if it is one."""
        if op is None or self.uses_time(other):
            return False
        self.thresholds.append(_Threshold(seconds_per_unit, timestamp, op, other))
        return True


def _find_time_sites(leaves: tuple[ast.expr, ...]) -> _TimeSites:
    """The time sites of a condition's lowered clauses."""
    analysis = _TimeAnalysis()
    for leaf in leaves:
        analysis.visit(leaf)
    return _TimeSites(tuple(analysis.thresholds), tuple(analysis.unsolved), analysis.always_poll)
