"""The ``when`` language: a sandboxed expression over facts (simpleeval as the reference).

Owns: the language check (what ``gatekeeper check`` refuses), the reference evaluator,
the compiled fast path, and the time analysis that says when a condition can next change.

May import: the ground floor (``gatekeeper.clock``, ``gatekeeper.problems``). Nothing else
of gatekeeper: the language knows facts only through the ``FactLookup`` protocol.
"""
