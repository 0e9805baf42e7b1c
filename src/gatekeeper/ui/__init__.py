"""The status page for people, served by the daemon under ``/ui/`` (``/`` redirects there).

Owns: ``handlers`` (the routes, ``mount`` to add them to the API's application, the
page, live and form handlers), ``pages`` (what each page shows, built from the runtime's
views for one viewer: projects, gates with their sub-conditions and approvals, time gates,
escrows, decisions, deliveries, dead letters), ``sessions`` (sign-in sessions kept in
memory, their cookies and CSRF tokens), and the package data ``templates/`` (Jinja2,
autoescaped) and ``static/`` (one stylesheet, one small script).

Acting from the page (approve, reject, withdraw; pause, resume, re-arm; retry a dead
letter) goes through the API's own functions in ``gatekeeper.http.handlers``, with the
same scopes and projects. Reads go through the ``Daemon``'s views, never the store.

May import: ``gatekeeper.http`` (auth, context, the acting functions, the app's keys),
``gatekeeper.runtime`` and every room below them. Never ``gatekeeper.cli``.
"""

from gatekeeper.ui.handlers import mount

__all__ = ["mount"]
