"""The HTTP API (aiohttp): authentication, routes, JSON views and the OpenAPI description.

Owns: ``app`` (``create_app`` and the handlers), ``auth`` (bearer tokens checked against
SHA-256 hashes), ``openapi`` (``GET /openapi.json``).

May import: ``gatekeeper.runtime`` and every room below it. Never ``gatekeeper.cli``.
"""
