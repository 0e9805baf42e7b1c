"""Limits of the front door, all enforced before authentication: a header read timeout, a
body read timeout and a connection cap; and the per-token rate limit (after it).

aiohttp bounds the size of a request line and of headers (``max_line_size``,
``max_field_size``) and closes idle kept-alive connections (``keepalive_timeout``), but has
no deadline for a request's headers or body: a client trickling one header line every few
seconds, or a body at a byte a second, holds its connection (and a file descriptor) for
ever. So:

- ``GuardedSite`` is a ``web.BaseSite`` (aiohttp's public extension point for listeners)
  that listens with a ``ConnectionGuard`` around each of aiohttp's own protocol objects
  (``runner.server()``). The guard refuses a connection over ``max_connections`` at once
  (closed before anything is read), and starts a header timer when a connection opens and
  when the first byte of a further request arrives on a kept-alive one; the timer is
  stopped when the request reaches the application (``limits_middleware``). A connection
  whose headers are not complete within ``header_read_timeout_s`` is answered 408 and
  closed.
- ``limits_middleware`` (the outermost middleware) arms a body timer when a request's body
  has not fully arrived yet: if it has not within ``body_read_timeout_s``, reading it raises
  ``ApiError`` 408 and the connection is closed after the answer.
- ``ThrottledLog`` logs each condition at most once per interval, with the count since the
  last line, however many connections trigger it.
- ``RateLimiter``: a token bucket per API token (a dict lookup and some arithmetic).
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gatekeeper.config import RateLimit
from gatekeeper.http.wire import ApiError, error_body

__all__ = [
    "Connections",
    "GuardedSite",
    "RateLimiter",
    "ThrottledLog",
    "effective_max_connections",
    "limits_middleware",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("gatekeeper.http.limits")

LOG_INTERVAL_S = 60.0
"""Each front-door condition (connections refused, timeouts) is logged at most this often."""
KEEPALIVE_TIMEOUT_S = 75.0
"""An idle kept-alive connection is closed after this (aiohttp's ``keepalive_timeout``):
it holds one of the ``max_connections`` places meanwhile."""
FD_RESERVE = 64
"""File descriptors kept free for the database, the rules, outgoing deliveries and logs."""


class ThrottledLog:
    """A warning logged at most once per ``interval_s``, counting the events in between.

    ``event()`` is cheap (a counter and a clock read); the line says how many events there
    were since the last line: ``"<message> (<n> in the last <s> s)"``."""

    def __init__(self, message: str, interval_s: float = LOG_INTERVAL_S) -> None:
        self.message = message
        self.interval_s = interval_s
        self.count = 0
        """Events since the last line."""
        self.total = 0
        """Events ever."""
        self._last = -math.inf

    def event(self) -> None:
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            since = "" if self._last == -math.inf else f" in the last {now - self._last:.0f} s"
            log.warning("%s (%d%s)", self.message, self.count, since)
            self._last = now
            self.count = 0


def effective_max_connections(wanted: int) -> int:
    """``wanted``, or less when the process's open-file limit (``RLIMIT_NOFILE``) cannot
    hold it plus ``FD_RESERVE``: the soft limit is raised towards the hard one first, and
    a cap lowered to fit is logged once. Over the limit, accept() fails in a loop instead
    of refusing cleanly."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no such limit on this platform
        return wanted
    needed = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitted = max(1, soft - FD_RESERVE)
    log.warning(
        "max_connections %d does not fit the open-file limit %d: using %d", wanted, soft, fitted
    )
    return fitted


def _timeout_answer(message: str) -> bytes:
    body = error_body(408, message)
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Connections:
    """The open client connections of one server and their limits.

    ``max_connections`` connections at most; ``header_read_timeout_s`` seconds for each
    request's headers. ``protocol_factory()`` is what the listener calls per accepted
    connection; ``guard_of(transport)`` finds a connection's guard for the middleware.
    ``server`` (aiohttp's protocol factory, ``runner.server``) is set by ``GuardedSite``."""

    def __init__(self, *, max_connections: int, header_read_timeout_s: float) -> None:
        self.server: Any = None
        self.max_connections = max_connections
        self.header_read_timeout_s = header_read_timeout_s
        self.guards: dict[asyncio.BaseTransport, ConnectionGuard] = {}
        self.refused = ThrottledLog("connections refused: max_connections are open")
        self.header_timeouts = ThrottledLog(
            f"connections closed: request headers not complete within "
            f"{header_read_timeout_s:g} s (header_read_timeout_s)"
        )
        self._timeout_answer = _timeout_answer(
            f"request headers not received within {header_read_timeout_s:g} s"
        )

    def protocol_factory(self) -> ConnectionGuard:
        return ConnectionGuard(self)

    def guard_of(self, transport: asyncio.BaseTransport | None) -> ConnectionGuard | None:
        return self.guards.get(transport) if transport is not None else None


class ConnectionGuard(asyncio.Protocol):
    """Wraps aiohttp's protocol object of one connection: admits it under the cap and
    enforces the header read timeout; everything else is passed through unchanged."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        conns = self._connections
        if len(conns.guards) >= conns.max_connections:
            transport.abort()  # type: ignore[attr-defined]
            conns.refused.event()
            return
        self._transport = transport  # type: ignore[assignment]
        conns.guards[transport] = self
        self._inner = conns.server()
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is None and not self._in_request:
            self._arm()  # the first bytes of a further request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is None:
            return
        self._connections.guards.pop(self._transport, None)  # type: ignore[arg-type]
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def request_started(self) -> None:
        """The request's headers are in (it reached the application): stop the timer."""
        self._in_request = True
        self._disarm()

    def request_finished(self) -> None:
        """The application is done: the next request's timer starts at its first byte."""
        self._in_request = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._connections.header_read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing() or self._in_request:
            return
        self._connections.header_timeouts.event()
        transport.write(self._connections._timeout_answer)
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP listener (like ``web.TCPSite``) whose connections go through ``connections``
    (the application's ``CONNECTIONS_KEY``): the cap and the header read timeout.
    ``ssl_context`` serves HTTPS; its handshake must also finish within the header read
    timeout."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        connections: Connections,
        *,
        ssl_context: Any = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self.connections = connections
        connections.server = runner.server

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the requested one before ``start``)."""
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self.connections.protocol_factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            ssl_handshake_timeout=(
                self.connections.header_read_timeout_s if self._ssl_context else None
            ),
        )
        self._server = server
        self._bound_port = server.sockets[0].getsockname()[1]


CONNECTIONS_KEY = web.AppKey("connections", Connections)
BODY_TIMEOUT_KEY = web.AppKey("body_read_timeout_s", float)
BODY_TIMED_OUT_KEY = web.RequestKey("body_timed_out", bool)
_BODY_TIMEOUTS = ThrottledLog("requests answered 408: body not complete in time")


def _expire_body(request: web.Request, timeout_s: float) -> None:
    content = request.content
    if content.is_eof():
        return
    request[BODY_TIMED_OUT_KEY] = True
    _BODY_TIMEOUTS.event()
    content.set_exception(ApiError(408, f"request body not received within {timeout_s:g} s"))


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: tells the connection's guard the headers are in, and
    arms the body read timeout when the body has not fully arrived. A request whose body
    timed out is answered 408 and its connection closed."""
    app = request.app
    connections = app.get(CONNECTIONS_KEY)
    guard = connections.guard_of(request.transport) if connections is not None else None
    if guard is not None:
        guard.request_started()
    timer = None
    if request.body_exists and not request.content.is_eof():
        timeout_s = app[BODY_TIMEOUT_KEY]
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout_s, _expire_body, request, timeout_s)
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status == 408 and request.get(BODY_TIMED_OUT_KEY):
            exc.force_close()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if guard is not None:
            guard.request_finished()


class RateLimiter:
    """One token bucket per API token (by its hash): a request takes one unit; the bucket
    refills at ``requests_per_s`` up to ``burst``. Monotonic clock."""

    def __init__(self) -> None:
        self._buckets: dict[str, list[float]] = {}

    def retry_after(self, key: str, limit: RateLimit) -> float:
        """0.0 when a request of ``key`` may go now (and count it), else the seconds until
        it may."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [limit.burst - 1.0, now]
            return 0.0
        level = min(float(limit.burst), bucket[0] + (now - bucket[1]) * limit.requests_per_s)
        bucket[1] = now
        if level >= 1.0:
            bucket[0] = level - 1.0
            return 0.0
        bucket[0] = level
        return (1.0 - level) / limit.requests_per_s
