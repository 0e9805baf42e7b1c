"""The status page's routes and handlers, and ``mount`` to add them to the API's app.

Pages are rendered at the server with Jinja2 (autoescape on): they read without
JavaScript; a small script (``static/ui.js``) shows times in the viewer's zone and
refreshes the page's live part when ``/ui/live`` says something changed. Forms post
``application/x-www-form-urlencoded`` with the session's CSRF token and are answered with a
redirect back to the page (its notice says what happened), or with the error page.
Acts go through the API's own functions (``record_approval``, ``act_on_rule``,
``retry_dead_letter``), so the scopes, projects, checks and audit are the API's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, get_args
from urllib.parse import quote

import jinja2
from aiohttp import web
from multidict import MultiDictProxy
from yarl import URL

from gatekeeper.config import Token
from gatekeeper.http.app import QUERY_KEY, SCOPES_KEY, check_rate
from gatekeeper.http.auth import authenticate
from gatekeeper.http.context import daemon_of
from gatekeeper.http.handlers import (
    APPROVAL_DECISIONS,
    AdminActName,
    act_on_rule,
    record_approval,
    retry_dead_letter,
)
from gatekeeper.http.models import MAX_COMMENT_CHARS, ApprovalRequest
from gatekeeper.http.wire import ApiError, request_id_of
from gatekeeper.runtime.daemon import Daemon
from gatekeeper.ui import pages
from gatekeeper.ui.cache import TAG_SLOT, PageCache, Rendered
from gatekeeper.ui.pages import Viewer
from gatekeeper.ui.sessions import (
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    MAX_FAILED_WAITING,
    SESSION_COOKIE,
    Session,
    SessionTable,
    clear_cookie,
    same_secret,
    set_cookie,
)

log = logging.getLogger("gatekeeper.ui")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Query = Mapping[str, str]
"""A page's query parameters (``request.query``, ``URL.query``)."""
SESSIONS_KEY = web.AppKey("ui_sessions", SessionTable)
"""The status page's sign-in sessions (in memory)."""
TEMPLATES_KEY = web.AppKey("ui_templates", jinja2.Environment)
CACHE_KEY = web.AppKey("ui_pages", PageCache)
"""Rendered pages kept a moment (``cache``)."""
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
"""The page's own static files (package data) and their content types."""
HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SLICE_S = 0.002
"""How long rendering a page holds the event loop at most before letting it run, seconds."""
MAX_FIELD_CHARS = 256
"""The longest rule id, item id, action id or act name a form may send."""
ACTS: tuple[str, ...] = get_args(AdminActName)


def templates() -> jinja2.Environment:
    """The Jinja2 environment of the page's templates (package data), autoescape on."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gatekeeper.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = pages.utc_text
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)
    return env


# ---------------------------------------------------------------------------------------------
# Who is asking


def viewer_of(request: web.Request) -> tuple[Viewer, Session | None] | None:
    """The viewer of ``request`` and their session: with no tokens configured, an
    anonymous reader (no session); else the session's token, if the cookie names a live
    session whose token is still configured and has ``read`` (None otherwise)."""
    daemon = daemon_of(request)
    tokens = daemon.tokens()
    if not tokens:
        return Viewer(None), None
    session = request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    token = next((t for t in tokens if t.sha256 == session.token_sha256), None)
    if token is None or "read" not in token.scopes:
        return None
    return Viewer(token, session.csrf), session


def render(
    request: web.Request,
    name: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    viewer: Viewer | None = None,
    session: Session | None = None,
) -> web.Response:
    """Template ``name`` with ``context``, the viewer, and the session's one-shot notice."""
    return html_response(render_text(request, name, context, viewer, session), status)


def render_text(
    request: web.Request,
    name: str,
    context: dict[str, Any],
    viewer: Viewer | None,
    session: Session | None,
) -> str:
    """The HTML of template ``name`` (see ``render``); the session's notice is used up."""
    template = request.app[TEMPLATES_KEY].get_template(name)
    return template.render(**page_context(context, viewer, session))


def page_context(
    context: dict[str, Any], viewer: Viewer | None, session: Session | None
) -> dict[str, Any]:
    """What a template is rendered with: ``context``, the viewer, whether they are signed
    in, and the session's one-shot notice (used up)."""
    notice = None
    if session is not None and session.notice is not None:
        notice = {"text": session.notice, "ok": session.notice_ok}
        session.notice = None
    shown = {"live": "", "stamp": "", "tag": "", **context}  # live: the project whose page follows
    signed_in = viewer is not None and viewer.token is not None  # a session's viewer
    return {**shown, "viewer": viewer, "notice": notice, "signed_in": signed_in}


async def render_in_slices(template: jinja2.Template, context: dict[str, Any]) -> str:
    """``template`` rendered with ``context``, letting the event loop run other requests
    (posted facts) at least every ``SLICE_S`` of rendering, as a large page takes ~10 ms."""
    chunks: list[str] = []
    until = time.perf_counter() + SLICE_S
    for chunk in template.generate(**context):
        chunks.append(chunk)
        if len(chunks) % 64 == 0 and time.perf_counter() >= until:  # the clock now and then
            await asyncio.sleep(0)
            until = time.perf_counter() + SLICE_S
    return "".join(chunks)


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=HTML_HEADERS
    )


@dataclass(frozen=True)
class Page:
    """A page to serve: its template, and how to build its context (awaited when it is
    rendered, not when it is served from the page cache)."""

    template: str
    build: Callable[[], Awaitable[dict[str, Any]]]


class NoPage(Exception):
    """The page asked for does not exist (or the viewer may not see it): its 404 message."""


async def serve_page(
    request: web.Request, page: Page, viewer: Viewer, session: Session | None
) -> web.Response:
    """``page`` from the page cache when it may be served (``cache``): rendered once per
    token's rights (``Viewer.rights``) and ``FRESH_S`` while the state changes (requests
    arriving while it renders wait for that render), with each session's CSRF token put
    in as it is served. A page with a notice to show is rendered afresh (and not kept)."""
    cache = request.app[CACHE_KEY]
    if session is None or session.notice is None:
        body = (await cached_page(request, request.rel_url.path_qs, page, viewer)).html
    else:
        stamp = daemon_of(request).change_stamp()
        text = await render_page(request, page, viewer, session, stamp)
        body = Rendered.of(stamp, 0.0, text).html
    body = body.replace(cache.placeholder.encode(), viewer.csrf.encode())
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers=HTML_HEADERS)


async def cached_page(request: web.Request, path_qs: str, page: Page, viewer: Viewer) -> Rendered:
    """Page ``page`` at ``path_qs`` for ``viewer``'s rights, as kept or rendered now."""
    stamp = daemon_of(request).change_stamp()
    return await request.app[CACHE_KEY].get_or_render(
        (path_qs, viewer.rights), stamp, lambda: render_page(request, page, viewer, None, stamp)
    )


async def render_page(
    request: web.Request, page: Page, viewer: Viewer, session: Session | None, stamp: int
) -> str:
    """``page`` rendered for ``viewer`` at change stamp ``stamp``, with the cache's
    placeholder where the CSRF token goes and ``TAG_SLOT`` where the live part's tag goes."""
    context = {**await page.build(), "stamp": stamp, "tag": TAG_SLOT}
    general = replace(viewer, csrf=request.app[CACHE_KEY].placeholder)
    template = request.app[TEMPLATES_KEY].get_template(page.template)
    return await render_in_slices(template, page_context(context, general, session))


def error_page(
    request: web.Request,
    status: int,
    message: str,
    viewer: Viewer | None = None,
    session: Session | None = None,
) -> web.Response:
    """The error page: the status and a sentence, never a traceback."""
    titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 409: "Conflict"}
    context = {"status": status, "title": titles.get(status, "Error"), "message": message}
    return render(request, "error.html", context, status=status, viewer=viewer, session=session)


def to_login(request: web.Request, back: str | None = None) -> web.Response:
    """Send a viewer without a live session to the login form, coming back after to this
    page, or to ``back`` (the page a form was posted from: its act is not done)."""
    back = request.path_qs if back is None else back
    location = f"/ui/login?next={quote(safe_back(back), safe='/')}"
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def safe_back(path: str | None) -> str:
    """``path`` when it is a path of the status page (``/ui/...``, printable, no
    backslash), else ``/ui/``: a form never redirects elsewhere."""
    if path and path.startswith("/ui/") and "\\" not in path and path.isprintable():
        return path
    return "/ui/"


# ---------------------------------------------------------------------------------------------
# Pages


@web.middleware
async def html_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under ``/ui/``, an ``ApiError`` (a query parameter a page does not take, a form field
    too long, a body too slow) is answered with the error page, not the API's JSON. It is
    put outside even ``limits_middleware`` (it keeps that one's closing of a connection)."""
    if not request.path.startswith("/ui/"):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        response = error_page(request, exc.status, exc.message)
        response.headers.update({k: v for k, v in exc.headers.items() if k == "Retry-After"})
        if exc.keep_alive is False:  # a body that timed out: its connection is closed
            response.force_close()
        return response


async def get_root(request: web.Request) -> web.StreamResponse:
    """``/`` redirects to the status page."""
    raise web.HTTPFound("/ui/")


def reading(
    handler: Callable[[web.Request, Viewer, Session | None], Awaitable[web.StreamResponse]],
) -> Handler:
    """A page handler: it gets the viewer and their session (``viewer_of``); a request
    without a live session is sent to the login form, coming back after."""

    async def handle(request: web.Request) -> web.StreamResponse:
        found = viewer_of(request)
        if found is None:
            return to_login(request)
        return await handler(request, *found)

    handle.__doc__ = handler.__doc__
    return handle


def index_page(daemon: Daemon, viewer: Viewer, match: Mapping[str, str], query: Query) -> Page:
    """``/ui/``: the projects the viewer may see, with their gates' states."""

    async def build() -> dict[str, Any]:
        return {"projects": pages.projects_of(daemon, viewer), "ruleset": daemon.ruleset_view()}

    return Page("index.html", build)


def project_page(daemon: Daemon, viewer: Viewer, match: Mapping[str, str], query: Query) -> Page:
    """``/ui/projects/{project}[?state=&q=&after=]``: the project's gates, escrows,
    decisions, deliveries. ``NoPage`` for a project the viewer may not see or without
    rules."""
    project = match["project"]
    if not viewer.sees(project) or not any(r.project == project for r in daemon.rules()):
        raise NoPage(f"There is no project {project[:80]!r}.")

    async def build() -> dict[str, Any]:
        context = await pages.project_page(daemon, viewer, project, chosen(query))
        return {**context, **filters_of(query), "live": project}

    return Page("project.html", build)


def rule_page(daemon: Daemon, viewer: Viewer, match: Mapping[str, str], query: Query) -> Page:
    """``/ui/projects/{project}/rules/{rule_id}[?item=&state=&q=&after=]``: one gate (one
    instance of a per-item rule), its history, a page of its instances. ``NoPage`` for a
    rule or instance not there, or in a project the viewer may not see."""
    project, rule_id = match["project"], match["rule_id"]
    rule = daemon.rule(rule_id)
    if rule is None or rule.project != project or not viewer.sees(project):
        raise NoPage(f"There is no rule {rule_id[:120]!r} in project {project[:80]!r}.")
    item = (query.get("item") or None) if rule.for_each is not None else None
    try:
        if item is not None:
            daemon.rule_view(rule, explain=False, item=item)  # KeyError: no such instance
    except KeyError:
        raise NoPage(f"Rule {rule.id!r} has no instance {(item or '')[:120]!r}.") from None

    async def build() -> dict[str, Any]:
        context = await pages.rule_page(daemon, viewer, rule, item, chosen(query))
        return {**context, **filters_of(query), "project": project, "rule": rule, "live": project}

    return Page("rule.html", build)


PageOf = Callable[[Daemon, Viewer, Mapping[str, str], Query], Page]


def serving(page_of: PageOf) -> Handler:
    """A page handler serving the page ``page_of`` finds from the request's path and query
    (``serve_page``); ``NoPage`` is the 404 page."""

    @reading
    async def handle(
        request: web.Request, viewer: Viewer, session: Session | None
    ) -> web.StreamResponse:
        try:
            page = page_of(daemon_of(request), viewer, request.match_info, request.query)
        except NoPage as exc:
            return error_page(request, 404, str(exc), viewer, session)
        return await serve_page(request, page, viewer, session)

    handle.__doc__ = page_of.__doc__
    return handle


get_index = serving(index_page)
get_project = serving(project_page)
get_rule = serving(rule_page)
LIVE_PAGES: tuple[tuple[re.Pattern[str], PageOf, frozenset[str]], ...] = (
    (
        re.compile(r"/ui/projects/(?P<project>[^/]+)"),
        project_page,
        frozenset({"state", "q", "after"}),
    ),
    (
        re.compile(r"/ui/projects/(?P<project>[^/]+)/rules/(?P<rule_id>.+)"),
        rule_page,
        frozenset({"item", "state", "q", "after"}),
    ),
)
"""The pages that follow live changes (as their routes match them), and their queries."""


def chosen(query: Query) -> pages.Filters:
    """The filters and the page of a list the query chooses (``state``, ``q``, ``after``;
    empty ones are none)."""
    return pages.Filters(
        query.get("state") or None, query.get("q") or None, query.get("after") or None
    )


def filters_of(query: Query) -> dict[str, Any]:
    """The filters a page's form shows as chosen (``state``, ``q``), and the states."""
    filters = {"state": query.get("state", ""), "q": query.get("q", "")}
    return {"filters": filters, "states": pages.GATE_STATES}


async def get_live(request: web.Request) -> web.StreamResponse:
    """``/ui/live``: ``{"stamp": N}``, a number that grows whenever something a page shows
    may have changed. With ``page`` (a live page's path and query, as the browser shows
    it) and ``tag`` (the ``data-tag`` of the live part it shows): also what changed in that
    page since (``Rendered.changes_since``: ``tag``, and ``parts`` or ``live``), from the
    page cache, so that any number of viewers of equal rights following a page cost one
    render per change (at most one per ``FRESH_S``); ``{"reload": true}`` when the page is
    no longer there for the viewer (a reload shows why). 400 for a path that is not a live
    page or a query it does not take; 401 without a live session."""
    found = viewer_of(request)
    if found is None:
        return live_json({"error": "signed out"}, status=401)
    viewer = found[0]
    daemon = daemon_of(request)
    path = request.query.get("page")
    if path is None:
        return live_json({"stamp": daemon.change_stamp()})
    found_page = live_page(path)
    if found_page is None:
        return live_json({"error": "page is not a live page of /ui/"}, status=400)
    url, page_of, match = found_page
    try:
        page = page_of(daemon, viewer, match, url.query)
    except NoPage:
        return live_json({"reload": True})
    rendered = await cached_page(request, url.path_qs, page, viewer)
    text = rendered.answer(request.query.get("tag", ""))
    return live_json(text.replace(request.app[CACHE_KEY].placeholder, viewer.csrf))


def live_page(path: str) -> tuple[URL, PageOf, dict[str, str]] | None:
    """The live page (``LIVE_PAGES``) at ``path`` (a path and query under ``/ui/``): its
    URL, how to find it, and its route's parts; None when ``path`` is not one, or has a
    query parameter that page does not take."""
    try:
        url = URL(path)
    except ValueError:
        return None
    if not path.startswith("/ui/") or url.is_absolute():
        return None
    for pattern, page_of, takes in LIVE_PAGES:
        match = pattern.fullmatch(url.path)
        if match is not None and set(url.query) <= takes:
            return url, page_of, match.groupdict()
    return None


def live_json(answer: dict[str, Any] | str, status: int = 200) -> web.Response:
    """``/ui/live``'s answer (or its JSON text), never stored by the browser."""
    text = answer if isinstance(answer, str) else json.dumps(answer)
    return web.Response(
        text=text,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def get_static(request: web.Request) -> web.StreamResponse:
    """``/ui/static/{name}``: the page's stylesheet and script."""
    name = request.match_info["name"]
    content_type = STATIC.get(name)
    if content_type is None:
        return error_page(request, 404, "There is no such file.")
    text = resources.files("gatekeeper.ui").joinpath("static", name).read_text("utf-8")
    return web.Response(
        text=text,
        content_type=content_type,
        charset="utf-8",
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )


async def not_found(request: web.Request) -> web.StreamResponse:
    """Any other path under ``/ui/``: the 404 page."""
    found = viewer_of(request)
    viewer, session = found if found else (None, None)
    return error_page(request, 404, "There is no such page.", viewer, session)


# ---------------------------------------------------------------------------------------------
# Signing in and out


async def get_login(request: web.Request) -> web.StreamResponse:
    """``/ui/login``: the form (a fresh CSRF token in its own cookie)."""
    return login_form(request, None)


def login_form(request: web.Request, error: str | None, status: int = 200) -> web.Response:
    """The login form, with ``error`` said above it."""
    csrf = secrets.token_urlsafe(32)
    next_path = safe_back(request.query.get("next"))
    context = {"error": error, "csrf": csrf, "next": next_path, "live": ""}
    response = render(request, "login.html", context, status=status)
    set_cookie(response, request, LOGIN_COOKIE, csrf, LOGIN_TTL_S)
    return response


async def post_login(request: web.Request) -> web.StreamResponse:
    """``POST /ui/login`` with ``token`` and ``csrf``: sign in. A wrong token is said on the
    form after ``FAILED_LOGIN_DELAY_S``; while ``MAX_FAILED_WAITING`` failures of the same
    address wait, a sign-in from it is 429 at once (its token unchecked); a token without
    ``read`` cannot sign in."""
    form = await request.post()
    if not same_secret(_field(form, "csrf"), request.cookies.get(LOGIN_COOKIE)):
        return login_form(request, "The form had expired; sign in again.", 403)
    daemon = daemon_of(request)
    tokens = daemon.tokens()
    if not tokens:
        raise web.HTTPSeeOther("/ui/")
    sessions, client = request.app[SESSIONS_KEY], request.remote or ""
    if sessions.failures_waiting(client) >= MAX_FAILED_WAITING:
        message = "Too many wrong tokens from your address; wait a minute and sign in again."
        response = login_form(request, message, 429)
        response.headers["Retry-After"] = "60"
        return response
    token = authenticate(tokens, _field(form, "token").strip() or None)
    if token is None:
        await sessions.failed_login(client)
        log.warning("status page: a sign-in with an unknown token was refused")
        return login_form(request, "That token is not valid.", 401)
    if "read" not in token.scopes:
        return login_form(request, f"The token of {token.subject!r} lacks the 'read' scope.", 403)
    sessions.close(request.cookies.get(SESSION_COOKIE))  # the browser's earlier session
    session_id, _ = sessions.open(token.sha256)
    log.info("status page: %s signed in", token.subject)
    response = web.HTTPSeeOther(safe_back(_field(form, "next")))
    set_cookie(response, request, SESSION_COOKIE, session_id, sessions.ttl_s)
    clear_cookie(response, request, LOGIN_COOKIE)
    raise response


async def post_logout(request: web.Request) -> web.StreamResponse:
    """``POST /ui/logout`` with ``csrf``: end the session and forget its cookie. The session
    ends even while its token is not configured (it would come back with the token)."""
    form = await request.post()
    sessions, session_id = request.app[SESSIONS_KEY], request.cookies.get(SESSION_COOKIE)
    session = sessions.get(session_id)
    response = web.HTTPSeeOther("/ui/login")
    if session is not None:
        if not same_secret(_field(form, "csrf"), session.csrf):
            return error_page(request, 403, "The form's CSRF token is missing or wrong.")
        sessions.close(session_id)
    clear_cookie(response, request, SESSION_COOKIE)
    raise response


# ---------------------------------------------------------------------------------------------
# Acting


def acting(handler: Callable[[web.Request, MultiDictProxy[Any], Token], Awaitable[str]]) -> Handler:
    """A form handler: the session must be live (else back to the login form, nothing
    done) and the form must carry its CSRF token (403 otherwise); a token over its rate
    limit is 429, as in the API; then ``handler`` acts as the session's token and answers
    the notice to show, and the viewer is sent back to the page the form was on. An
    ``ApiError`` becomes the error page with its status."""

    async def handle(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        back = _field(form, "back")  # checked before acting: an act is answered by a redirect
        found = viewer_of(request)
        if found is None or found[1] is None or found[0].token is None:
            if not daemon_of(request).tokens():
                return error_page(request, 403, "Acting from this page needs API tokens.")
            return to_login(request, back)
        viewer, session = found
        token = viewer.token
        assert token is not None and session is not None
        if not same_secret(_field(form, "csrf"), session.csrf):
            return error_page(request, 403, "The form's CSRF token is missing or wrong.", viewer)
        try:
            if token.rate_limit is not None:  # acts count as the API's requests do
                check_rate(request, token)
            session.notice = await handler(request, form, token)
            session.notice_ok = True
        except ApiError as exc:
            return error_page(request, exc.status, exc.message, viewer, session)
        raise web.HTTPSeeOther(safe_back(back))

    handle.__doc__ = handler.__doc__
    return handle


def _field(form: MultiDictProxy[Any], name: str, limit: int = MAX_FIELD_CHARS) -> str:
    """A text field of ``form`` ("" when absent), 400 when longer than ``limit``."""
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be text")
    if len(value) > limit:
        raise ApiError(400, f"{name} is longer than {limit} characters")
    return value


def _require(token: Token, scope: str) -> None:
    if scope not in token.scopes:
        raise ApiError(403, f"The token of {token.subject!r} lacks the {scope!r} scope.")


async def _approve(request: web.Request, form: MultiDictProxy[Any], token: Token) -> str:
    """Approve, reject or withdraw on a rule (an instance), with a comment."""
    _require(token, "approve")
    decision = _field(form, "decision")
    if decision not in APPROVAL_DECISIONS:
        raise ApiError(400, f"decision must be one of: {', '.join(APPROVAL_DECISIONS)}")
    comment = _field(form, "comment", MAX_COMMENT_CHARS).strip() or None
    body = ApprovalRequest(
        rule=_field(form, "rule"),
        decision=decision,  # type: ignore[arg-type]
        comment=comment,
        item=_field(form, "item") or None,
    )
    rule, _ = await record_approval(daemon_of(request), token, body, request_id_of(request))
    done = {"approve": "approved", "reject": "rejected", "withdraw": "withdrew on"}[decision]
    return f"You {done} {rule.id}" + (f" (item {body.item})" if body.item else "") + "."


async def _act(request: web.Request, form: MultiDictProxy[Any], token: Token) -> str:
    """Pause, resume or re-arm a rule (an instance), saying why."""
    _require(token, "admin")
    act = _field(form, "act")
    if act not in ACTS:
        raise ApiError(400, f"act must be one of: {', '.join(ACTS)}")
    reason = _field(form, "reason", MAX_COMMENT_CHARS).strip()
    if not reason:
        raise ApiError(400, "Say why: every admin act needs a reason.")
    rule_id, item = _field(form, "rule"), _field(form, "item") or None
    acted = await act_on_rule(daemon_of(request), token, act, rule_id, reason, item)
    done = {"pause": "paused", "resume": "resumed", "rearm": "re-armed"}[act]
    extra = f" ({acted['acted_on']} instances)" if "acted_on" in acted else ""
    return f"You {done} {rule_id}" + (f" (item {item})" if item else "") + f"{extra}."


async def _retry(request: web.Request, form: MultiDictProxy[Any], token: Token) -> str:
    """Requeue a dead letter, saying why."""
    _require(token, "admin")
    reason = _field(form, "reason", MAX_COMMENT_CHARS).strip() or None
    action_id = _field(form, "action_id")
    entry = await retry_dead_letter(daemon_of(request), token, action_id, reason)
    return f"You requeued {entry.action_id}."


post_approve = acting(_approve)
post_act = acting(_act)
post_retry = acting(_retry)

ROUTES: tuple[tuple[str, str, Handler, frozenset[str]], ...] = (
    ("GET", "/", get_root, frozenset()),
    ("GET", "/ui/", get_index, frozenset()),
    ("GET", "/ui/login", get_login, frozenset({"next"})),
    ("POST", "/ui/login", post_login, frozenset({"next"})),
    ("POST", "/ui/logout", post_logout, frozenset()),
    ("GET", "/ui/live", get_live, frozenset({"project", "page", "tag"})),
    ("GET", "/ui/static/{name}", get_static, frozenset()),
    ("GET", "/ui/projects/{project}", get_project, frozenset({"state", "q", "after"})),
    (
        "GET",
        "/ui/projects/{project}/rules/{rule_id:.+}",
        get_rule,
        frozenset({"item", "state", "q", "after"}),
    ),
    ("POST", "/ui/approve", post_approve, frozenset()),
    ("POST", "/ui/act", post_act, frozenset()),
    ("POST", "/ui/retry", post_retry, frozenset()),
    ("GET", "/ui/{tail:.*}", not_found, frozenset()),
)
"""Method, path, handler and query parameters of each route of the status page."""


def mount(app: web.Application) -> None:
    """Serve the status page from ``app`` (made by ``gatekeeper.http.app.create_app``):
    its routes, open to the API's bearer-token middleware (each page checks its own
    session), its sessions and templates, and ``html_errors``."""
    app[SESSIONS_KEY] = SessionTable()
    app[TEMPLATES_KEY] = templates()
    app[CACHE_KEY] = PageCache()
    app.middlewares.insert(0, html_errors)  # outermost: it sees the API's middlewares' errors
    for method, path, handler, query in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
        app[SCOPES_KEY][handler] = None
        app[QUERY_KEY][handler] = query
