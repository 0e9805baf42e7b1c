"""The running daemon: wires the store, the engine, delivery and the live ruleset together.

Owns: ``daemon`` (the small ``Daemon`` that wires the parts, owns their background tasks and
offers the HTTP layer its facade), ``ingest`` (the in-memory mirror and the one write path:
fact batches with group commit and idempotency, approvals, admin acts), ``rulesets`` (load,
activate, reload, watch; all-or-nothing), ``ticker`` (the deadline loop), ``views`` (the
JSON the API serves), ``hooks`` (inbound CI events mapped to facts).

Inside, imports point one way: daemon -> rulesets -> ticker -> ingest, daemon -> views ->
ingest, rulesets -> hooks.

May import: ``gatekeeper.delivery``, ``gatekeeper.store``, ``gatekeeper.engine``,
``gatekeeper.rules``, ``gatekeeper.expr`` and the ground floor. Never ``gatekeeper.http``
or ``gatekeeper.cli``.
"""
