"""Durable state: the fact log, decisions, rule states, the outbox, the ledger, rulesets and
the audit log, behind one storage interface.

Owns: ``sqlite`` (the embedded backend: WAL, ``synchronous=FULL``, one writer thread).

May import: ``gatekeeper.engine`` (the records it stores), ``gatekeeper.rules`` and the
ground floor. Never the runtime, delivery or HTTP layers.
"""
