"""Sign-in sessions of the status page, kept in memory (a restart signs everyone out).

A session is made when a person signs in with an API token on the login form. The table
keeps, per session id (256 random bits, the cookie's value), the SHA-256 of the token (the
token itself is never kept, shown or logged: each request looks the hash up in the live
config, so a token removed from ``gatekeeper.yaml`` ends its sessions at the next reload),
its CSRF token (every form POST must carry it), when it expires, and a one-shot notice for
the next page (what the last act did). A session lasts ``SESSION_TTL_S`` from sign-in.

The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, ``Secure`` when the request
came over TLS, and expires with the session. The login form has its own CSRF token, in a
short-lived cookie of its own (double submit), since there is no session yet.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

SESSION_COOKIE = "gk_session"
LOGIN_COOKIE = "gk_login"
SESSION_TTL_S = 8 * 3600.0
"""How long a session lasts from sign-in, in seconds (a working day)."""
LOGIN_TTL_S = 600.0
"""How long the login form's CSRF cookie lasts, in seconds."""
FAILED_LOGIN_DELAY_S = 1.0
"""How long a wrong token waits before the form says so, in seconds; failures from one
client address wait in turn (one a second), so guessing is slow however many requests run
in parallel."""
MAX_FAILED_WAITING = 3
"""Failed sign-ins of one client address that may wait their turn at once; a sign-in from
an address with this many waiting is refused at once, its token unchecked (a queue that
grew without bound would hold a connection per guess, and the daemon has a few hundred)."""
MAX_SESSIONS_PER_TOKEN = 64
"""Sessions of one token kept at most; its oldest is dropped first (so one token signing in
over and over cannot push everyone else's sessions out of the table)."""
MAX_SESSIONS = 10_000
"""Sessions kept at most; the oldest are dropped first."""


@dataclass
class Session:
    """One signed-in person: the hash of their token, the CSRF token of their forms,
    when the session ends (``time.monotonic()`` seconds) and a notice for the next page."""

    token_sha256: str
    csrf: str
    expires_at: float
    notice: str | None = None
    notice_ok: bool = True


@dataclass
class _Failing:
    """The failed sign-ins of one client address waiting their turn."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


@dataclass
class SessionTable:
    """The sessions of one application, in memory, by session id, ``max_sessions`` at
    most. ``clock`` gives monotonic seconds (``time.monotonic``)."""

    ttl_s: float = SESSION_TTL_S
    max_sessions: int = MAX_SESSIONS
    clock: Callable[[], float] = time.monotonic
    sessions: dict[str, Session] = field(default_factory=dict)
    _failing: dict[str, _Failing] = field(default_factory=dict)

    def open(self, token_sha256: str) -> tuple[str, Session]:
        """A new session for the token with hash ``token_sha256``: its id and itself. The
        token's oldest session is dropped when it has ``MAX_SESSIONS_PER_TOKEN``, the
        table's oldest when it holds ``max_sessions``."""
        self._drop_expired()
        mine = [k for k, s in self.sessions.items() if s.token_sha256 == token_sha256]
        for session_id in mine[: max(0, len(mine) - MAX_SESSIONS_PER_TOKEN + 1)]:
            del self.sessions[session_id]
        while len(self.sessions) >= self.max_sessions:
            self.sessions.pop(next(iter(self.sessions)))
        session_id = secrets.token_urlsafe(32)
        session = Session(token_sha256, secrets.token_urlsafe(32), self.clock() + self.ttl_s)
        self.sessions[session_id] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session ``session_id`` names, or None (none, unknown or expired: an
        expired session is forgotten)."""
        if not session_id:
            return None
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self.clock():
            del self.sessions[session_id]
            return None
        return session

    def close(self, session_id: str | None) -> None:
        """Forget session ``session_id`` (sign out); nothing when there is none."""
        if session_id:
            self.sessions.pop(session_id, None)

    def expire_all(self) -> None:
        """End every session now (as if their time had run out)."""
        now = self.clock()
        for session in self.sessions.values():
            session.expires_at = now

    def failures_waiting(self, client: str) -> int:
        """How many failed sign-ins of ``client`` address wait their turn now."""
        failing = self._failing.get(client)
        return failing.waiting if failing else 0

    async def failed_login(self, client: str) -> None:
        """Wait ``FAILED_LOGIN_DELAY_S`` before a wrong token is answered, after the
        earlier failures of the same ``client`` address (without blocking the loop)."""
        failing = self._failing.setdefault(client, _Failing())
        failing.waiting += 1
        try:
            async with failing.lock:
                await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        finally:
            failing.waiting -= 1
            if not failing.waiting:
                del self._failing[client]

    def _drop_expired(self) -> None:
        now = self.clock()
        for session_id in [k for k, s in self.sessions.items() if s.expires_at <= now]:
            del self.sessions[session_id]


def same_secret(given: str | None, expected: str | None) -> bool:
    """Whether ``given`` equals ``expected``, in constant time (False for None, and when
    ``expected`` is empty: a missing cookie matches no field, not even an empty one)."""
    if given is None or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def set_cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, max_age_s: float
) -> None:
    """Set cookie ``name``: HttpOnly, SameSite=Strict, Path=/, Secure under TLS, expiring
    after ``max_age_s`` seconds."""
    response.set_cookie(
        name,
        value,
        max_age=int(max_age_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_cookie(response: web.StreamResponse, request: web.Request, name: str) -> None:
    """Tell the browser to forget cookie ``name``."""
    response.del_cookie(name, path="/", secure=request.secure, httponly=True, samesite="Strict")
