"""The HTTP API (aiohttp): the route table, the typed wire model, the handlers and the
OpenAPI description generated from both.

Owns: ``app`` (``create_app``, the error and auth middlewares), ``routes`` (one table of
method, path, handler, scope, models and documentation), ``handlers`` (one function per
operation, by resource), ``models`` (request and response bodies as msgspec Structs),
``wire`` (decoding bodies, JSON answers, the error answer, query and header parsers),
``context`` (the daemon and principal of a request), ``auth`` (bearer tokens checked
against SHA-256 hashes), ``openapi`` (``GET /openapi.json``, generated).

May import: ``gatekeeper.runtime`` and every room below it. Never ``gatekeeper.cli``.
"""
