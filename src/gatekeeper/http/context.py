"""What a handler knows about its request: the daemon it serves and who is asking.

``create_app`` puts the daemon under ``DAEMON_KEY``; the auth middleware puts the
authenticated token (or None when no tokens are configured) under ``PRINCIPAL_KEY``.
"""

from __future__ import annotations

from aiohttp import web

from gatekeeper.config import Token
from gatekeeper.http.wire import ApiError
from gatekeeper.runtime.daemon import Daemon

DAEMON_KEY = web.AppKey("daemon", Daemon)
PRINCIPAL_KEY: web.RequestKey[Token | None] = web.RequestKey("principal", Token | None)  # type: ignore[arg-type]


def daemon_of(request: web.Request) -> Daemon:
    """The daemon the request's application serves."""
    return request.app[DAEMON_KEY]


def principal(request: web.Request) -> Token | None:
    """The authenticated token of ``request`` (None when no tokens are configured)."""
    return request.get(PRINCIPAL_KEY)


def actor(request: web.Request) -> str:
    """Who acts, for the audit log: the token's subject, or ``local`` without tokens."""
    token = principal(request)
    return token.subject if token else "local"


def check_project(request: web.Request, project: str) -> None:
    """Raise ``ApiError`` 403 unless the request's token may act on ``project``."""
    check_token_project(principal(request), project)


def check_token_project(token: Token | None, project: str) -> None:
    """Raise ``ApiError`` 403 unless ``token`` (None: no tokens configured) may act on
    ``project``."""
    if token is not None and not token.allows_project(project):
        raise ApiError(403, f"token of {token.subject!r} may not act on project {project!r}")


def visible(request: web.Request, project: str | None) -> bool:
    """Whether the request's token may see things of ``project``."""
    token = principal(request)
    return token is None or project is None or token.allows_project(project)


def visible_projects(request: web.Request) -> frozenset[str] | None:
    """The projects the request's token may see, for store queries: None for all."""
    token = principal(request)
    if token is None or "*" in token.projects:
        return None
    return frozenset(token.projects)
