"""The HTTP API (aiohttp): ``create_app`` and its middlewares.

The room: ``routes`` (the route table: paths, scopes, models, documentation), ``handlers``
(one function per operation, by resource), ``models`` (the typed wire model: request and
response bodies), ``wire`` (decoding bodies, JSON answers, the error answer, query and header
parsers), ``context`` (the daemon and the authenticated principal of a request), ``auth``
(token hashes), ``openapi`` (the document, generated from the routes and models).

Errors are always JSON, ``{"error": {"status": 400, "message": ..., "problems": [...]}}``,
never a traceback, and a request that is refused changes nothing:

- malformed JSON: 400; a body of the wrong shape: 400 listing each problem with its JSON path
  (``$.facts[1].kind``); a content type other than ``application/json``: 415; a body over
  ``max_body_bytes`` (default 1 MiB): 413; an unknown route: 404; a wrong method: 405.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_urldispatcher import SystemRoute

from gatekeeper.config import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_HEADER_READ_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    Token,
)
from gatekeeper.http.auth import authenticate, bearer_token, grants
from gatekeeper.http.context import DAEMON_KEY, PRINCIPAL_KEY, daemon_of
from gatekeeper.http.handlers import metrics_response
from gatekeeper.http.limits import (
    BODY_TIMEOUT_KEY,
    CONNECTIONS_KEY,
    Connections,
    RateLimiter,
    limits_middleware,
)
from gatekeeper.http.routes import ROUTES, Handler
from gatekeeper.http.wire import ApiError, error_response
from gatekeeper.runtime.daemon import Daemon
from gatekeeper.store.errors import StoreUnavailable

__all__ = ["DAEMON_KEY", "ApiError", "create_app", "metrics_response"]

log = logging.getLogger("gatekeeper.http.app")

SCOPES_KEY = web.AppKey("scopes", dict[Handler, str | None])
"""Each handler's required token scope (None: open), from the route table."""
RATE_LIMITER_KEY = web.AppKey("rate_limiter", RateLimiter)
"""The token buckets of the API tokens' rate limits."""
QUERY_KEY = web.AppKey("query", dict[Handler, frozenset[str]])
"""Each handler's declared query parameters, from the route table (as OpenAPI shows them)."""

REJECTION_REASONS = {400: "malformed", 413: "too_large", 415: "unsupported_media_type"}


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check ``Authorization: Bearer <token>`` against the configured token hashes.

    With no tokens configured (the daemon then listens on loopback only) every request is
    let through with no principal. Otherwise: no or an unknown token is 401, a token over
    its rate limit 429 (with ``Retry-After``), a token without the route's scope 403.
    Unknown routes fall through to 404/405. Then a query parameter the route does not
    declare is 400 (checked only when there is a query string).
    """
    route = request.match_info.route
    if isinstance(route, SystemRoute):  # no such route or method: 404/405 as usual
        return await handler(request)
    # a handler missing from the route table requires the most: admin
    scope = request.app[SCOPES_KEY].get(route.handler, "admin")
    tokens = daemon_of(request).tokens()
    request[PRINCIPAL_KEY] = None
    if not tokens or scope is None:
        if request.query_string:
            _check_query(request, route.handler)
        return await handler(request)
    principal = authenticate(tokens, bearer_token(request.headers.get("Authorization")))
    if principal is None:
        raise ApiError(
            401,
            "missing or unknown API token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="gatekeeper"'},
        )
    if principal.rate_limit is not None:
        check_rate(request, principal)
    if not grants(principal.scopes, scope):
        raise ApiError(403, f"token of {principal.subject!r} lacks the {scope!r} scope")
    request[PRINCIPAL_KEY] = principal
    if request.query_string:
        _check_query(request, route.handler)
    return await handler(request)


def check_rate(request: web.Request, token: Token) -> None:
    """Raise ``ApiError`` 429 with ``Retry-After`` (whole seconds) when ``token`` is over
    its rate limit."""
    limit = token.rate_limit
    assert limit is not None
    wait_s = request.app[RATE_LIMITER_KEY].retry_after(token.sha256, limit)
    if wait_s > 0.0:
        retry = max(1, math.ceil(wait_s))
        raise ApiError(
            429,
            f"token of {token.subject!r} is over its rate limit ({limit.requests_per_s:g} "
            f"requests/s, burst {limit.burst}); retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )


def _check_query(request: web.Request, handler: Handler) -> None:
    """Raise ``ApiError`` 400 naming each query parameter the route does not declare."""
    known = request.app[QUERY_KEY].get(handler, frozenset())
    unknown = sorted({name for name in request.query if name not in known})
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        takes = ", ".join(sorted(known)) or "none"
        noun = "parameter" if len(unknown) == 1 else "parameters"
        raise ApiError(
            400,
            f"unknown query {noun} {names} for {request.method} {request.path} (it takes: {takes})",
        )


def _count_rejected_fact(request: web.Request, status: int) -> None:
    """Count a refused ``POST /v1/facts`` in gatekeeper_facts_rejected_total."""
    if request.method != "POST" or request.path != "/v1/facts":
        return
    reason = REJECTION_REASONS.get(status, "invalid" if status == 422 else None)
    if reason is not None:
        daemon_of(request).fact_rejected(reason)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON answer; an unexpected one is logged, never shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        _count_rejected_fact(request, exc.status)
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: "no such resource",
            405: f"method {request.method} is not allowed here",
            413: "request body too large",
        }.get(exc.status, exc.reason)
        _count_rejected_fact(request, exc.status)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, message, headers=headers)
    except StoreUnavailable as exc:  # disk full, locked, ...: logged once per interval
        retry_after = daemon_of(request).store_unavailable(exc)
        message = f"the database is unavailable ({exc.condition}); retry in {retry_after} s"
        return error_response(503, message, headers={"Retry-After": str(retry_after)})
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal error")


async def _daemon_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The daemon's background tasks live as long as the application (``cleanup_ctx``)."""
    async with app[DAEMON_KEY].running():
        yield


def create_app(
    daemon: Daemon,
    *,
    header_read_timeout_s: float = DEFAULT_HEADER_READ_TIMEOUT_S,
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> web.Application:
    """The aiohttp application serving ``daemon``: every route of ``routes.ROUTES``, behind
    the limits, error and auth middlewares (serve it with ``limits.GuardedSite`` and the
    application's ``CONNECTIONS_KEY`` for the header timeout and the connection cap). The
    application starts the daemon when it starts and stops it at cleanup, unless the caller
    started it (then the caller stops it). The limits are the config's
    ``header_read_timeout_s``, ``body_read_timeout_s`` (seconds) and ``max_connections``."""
    app = web.Application(
        middlewares=[limits_middleware, error_middleware, auth_middleware],
        client_max_size=daemon.max_body_bytes(),
    )
    app[DAEMON_KEY] = daemon
    app[BODY_TIMEOUT_KEY] = body_read_timeout_s
    app[CONNECTIONS_KEY] = Connections(
        max_connections=max_connections, header_read_timeout_s=header_read_timeout_s
    )
    app[RATE_LIMITER_KEY] = RateLimiter()
    app.cleanup_ctx.append(_daemon_lifecycle)
    app[SCOPES_KEY] = {route.handler: route.scope for route in ROUTES}
    app[QUERY_KEY] = {route.handler: route.query_names for route in ROUTES}
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)  # and HEAD
        else:
            app.router.add_route(route.method, route.path, route.handler)
    return app
