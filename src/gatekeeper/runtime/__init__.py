"""The running daemon: wires the store, the engine, delivery and the live ruleset together.

Owns: ``daemon`` (start/stop, ingest with group commit and idempotency, approvals, admin
acts, ruleset load/reload/watch, the deadline loop), ``hooks`` (inbound CI events mapped
to facts).

May import: ``gatekeeper.delivery``, ``gatekeeper.store``, ``gatekeeper.engine``,
``gatekeeper.rules``, ``gatekeeper.expr`` and the ground floor. Never ``gatekeeper.http``
or ``gatekeeper.cli``.
"""
