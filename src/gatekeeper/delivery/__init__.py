"""Carrying out actions: turning an outbox entry into a signed HTTP request and delivering it
at least once, with backoff, until it succeeds or becomes a dead letter.

Owns: ``requests`` (Standard Webhooks signing, the CI/CD request shapes),
``dispatcher`` (the outbox dispatcher: retries, per-target concurrency, dead letters),
``retry`` (the one retry timing policy: backoff with jitter and ``Retry-After`` in both
RFC 9110 forms; standard library only, so ``gatekeeper emit`` uses it without aiohttp).

May import: ``gatekeeper.store``, ``gatekeeper.engine`` and the ground floor.
"""
