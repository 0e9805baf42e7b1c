"""When time alone changes a condition: the time sites of a condition, found once when it
is compiled, and the instant each threshold is crossed (see
``CompiledCondition.next_change_at``).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from gatekeeper.clock import parse_rfc3339
from gatekeeper.expr.language import (
    TIME_FUNCTIONS,
    _Collection,
    _FactRead,
    _KindRead,
    _Lookup,
    _VarRead,
)
from gatekeeper.expr.reference import (
    _Evaluator,
)

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
    return None if outcome.failed else _instant_of(outcome.value)


def _instant_of(value: object) -> datetime | None:
    """The UTC instant of ``value``, an RFC 3339 timestamp; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value)
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
    return _number_of(value)


def _number_of(value: object) -> int | float | None:
    """``value`` when it is a finite number (bool included); None for anything else."""
    if isinstance(value, int):  # bool included: Python compares it as 0 / 1
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


@dataclass(frozen=True, slots=True)
class _TimeCode:
    """The time sites of a condition as compiled code, shared by the conditions of one
    shape: ``function`` (called like the condition's compiled function, with its values)
    returns the value of each site's expressions, None for one that is missing: first
    the ``unsolved`` timestamps, then each threshold's timestamp and bound. ``thresholds``
    holds each threshold's ``(seconds per unit, comparison)``. It answers what
    ``_TimeSites.next_change`` answers, without keeping any syntax tree per condition."""

    function: Callable[..., tuple[object, ...]]
    always_poll: bool
    unsolved: int
    thresholds: tuple[tuple[int, type[ast.cmpop]], ...]

    def next_change(self, values: tuple[object, ...], now: datetime) -> datetime | None:
        """The earliest candidate after ``now``, from ``values`` (what ``function`` gave)."""
        soonest: datetime | None = None
        if self.always_poll or any(
            _instant_of(value) is not None for value in values[: self.unsolved]
        ):
            soonest = _recheck(now)
        position = self.unsolved
        for seconds_per_unit, op in self.thresholds:
            start = _instant_of(values[position])
            bound = _number_of(values[position + 1])
            position += 2
            if start is None or bound is None:
                continue
            at = _crossing(seconds_per_unit, start, op, bound, now)
            if at is not None and (soonest is None or at < soonest):
                soonest = at
        return soonest


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
    if isinstance(node, _KindRead | _VarRead):
        return []
    if isinstance(node, _Collection):
        return [node.element, *node.filters]
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
        if isinstance(node, _Collection):  # its timestamps are per item: not solved
            self.always_poll = True
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
