"""The ``when`` language: a sandboxed expression over facts (simpleeval as the reference).

Owns: the language check (what ``gatekeeper check`` refuses), the reference evaluator,
the compiled fast path, and the time analysis that says when a condition can next change.
The reference for rule authors is the docstring of ``gatekeeper.expr.language``.

Modules, in import order (each imports only the ones before it):

- ``language``: the language itself: parse, static check, limits, the bounded operators
  of the sandbox, lowering to explicit fact reads, ``ExpressionProblem``/``ExpressionError``
  and the records an evaluation gives (``Evaluation``, ``Clause``, ``FactRef``...).
- ``reference``: the simpleeval reference evaluator, which defines every result.
- ``timing``: when time alone changes a condition (threshold sites and their crossings).
- ``incremental``: collections kept up to date by deltas (per-instance states synced to
  the committed facts of a kind through ``FactChanges``; ``sortedcontainers`` keeps their
  sorted ids and elements).
- ``compiler``: the generated-source fast path, ``CompiledCondition``,
  ``compile_condition`` and ``next_change_at``.

The current item of a per-item rule is an ``Item`` passed to ``evaluate``; what a
collection saw is a ``CollectionSeen`` in ``Evaluation.collections``.

May import: the ground floor (``gatekeeper.clock``, ``gatekeeper.problems``). Nothing else
of gatekeeper: the language knows facts only through the ``FactLookup`` protocol.
"""

from gatekeeper.expr.compiler import CompiledCondition, compile_condition, next_change_at
from gatekeeper.expr.language import (
    COLLECTION_FUNCTIONS,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_EXPONENT,
    MAX_EXPRESSION_CHARS,
    MAX_FALSE_IDS,
    MAX_INT_BITS,
    MAX_NODES,
    MAX_ROUND_DIGITS,
    MAX_SEQUENCE_ITEMS,
    MAX_STRING_LITERAL_CHARS,
    TIME_FUNCTIONS,
    Clause,
    CollectionSeen,
    Condition,
    Evaluation,
    ExpressionError,
    ExpressionProblem,
    FactChanges,
    FactLookup,
    FactRef,
    Item,
)
from gatekeeper.expr.timing import TIME_RECHECK

__all__ = [
    "COLLECTION_FUNCTIONS",
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_EXPRESSION_CHARS",
    "MAX_FALSE_IDS",
    "MAX_INT_BITS",
    "MAX_NODES",
    "MAX_ROUND_DIGITS",
    "MAX_SEQUENCE_ITEMS",
    "MAX_STRING_LITERAL_CHARS",
    "TIME_FUNCTIONS",
    "TIME_RECHECK",
    "Clause",
    "CollectionSeen",
    "CompiledCondition",
    "Condition",
    "Evaluation",
    "ExpressionError",
    "ExpressionProblem",
    "FactChanges",
    "FactLookup",
    "FactRef",
    "Item",
    "compile_condition",
    "next_change_at",
]
