"""Rendered pages kept a moment, so that many open pages following live changes cost the
daemon one render per page and token per ``FRESH_S``, not one per poll; requests for a
page while it renders wait for that render.

An entry is a page's HTML as rendered for one token (its CSRF token replaced by the
cache's ``placeholder``, put back per session when served), with the change stamp
(``Daemon.change_stamp``) it was rendered at. It is served while the stamp is unchanged
(for at most ``MAX_AGE_S``: the clock changes countdowns), or, when the stamp moved, for
``FRESH_S`` after it was rendered: a page then shows the daemon's state at most that much
late, and says which stamp it shows, so the page's script asks again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

FRESH_S = 0.5
"""How long a rendered page is served after the state it shows changed, in seconds."""
MAX_AGE_S = 30.0
"""How long a rendered page is served at most, in seconds."""
MAX_PAGES = 256
"""Rendered pages kept at most; the least recently served are dropped first."""

PageKey = tuple[str, str]
"""A page's path and query, and the viewer's rights (``Viewer.rights``: the token's hash,
subject, scopes and projects; "" without tokens)."""


@dataclass(frozen=True)
class Rendered:
    stamp: int
    made_at: float
    html: bytes


@dataclass
class PageCache:
    """Rendered pages by ``PageKey``; ``clock`` gives monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    placeholder: str = field(default_factory=lambda: "csrf-" + secrets.token_hex(16))
    pages: OrderedDict[PageKey, Rendered] = field(default_factory=OrderedDict)
    rendering: dict[PageKey, asyncio.Future[bytes | None]] = field(default_factory=dict)
    """The renders in progress: a request for a page being rendered waits for it."""

    async def get_or_render(
        self, key: PageKey, stamp: int, render: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """Page ``key`` as kept (``get``), or as the render in progress makes it, or as
        ``render`` makes it now (then kept at ``stamp``)."""
        found = self.get(key, stamp)
        if found is not None:
            return found
        pending = self.rendering.get(key)
        if pending is not None:
            shared = await asyncio.shield(pending)
            if shared is not None:
                return shared
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.rendering[key] = future
        html = None
        try:
            html = await render()
            self.put(key, stamp, html)
            return html
        finally:
            future.set_result(html)  # None: it failed; those waiting render themselves
            if self.rendering.get(key) is future:
                del self.rendering[key]

    def get(self, key: PageKey, stamp: int) -> bytes | None:
        """The page ``key`` as rendered, if it may still be served at ``stamp``."""
        found = self.pages.get(key)
        if found is None:
            return None
        age_s = self.clock() - found.made_at
        if age_s >= MAX_AGE_S or (found.stamp != stamp and age_s >= FRESH_S):
            del self.pages[key]
            return None
        self.pages.move_to_end(key)
        return found.html

    def put(self, key: PageKey, stamp: int, html: bytes) -> None:
        """Keep page ``key`` rendered at ``stamp``."""
        self.pages[key] = Rendered(stamp, self.clock(), html)
        self.pages.move_to_end(key)
        while len(self.pages) > MAX_PAGES:
            self.pages.popitem(last=False)
