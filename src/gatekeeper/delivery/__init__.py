"""Carrying out actions: turning an outbox entry into a signed HTTP request and delivering it
at least once, with backoff, until it succeeds or becomes a dead letter.

Owns: ``requests`` (Standard Webhooks signing, the CI/CD request shapes),
``dispatcher`` (the outbox dispatcher: retries, per-target concurrency, dead letters).

May import: ``gatekeeper.store``, ``gatekeeper.engine`` and the ground floor.
"""
