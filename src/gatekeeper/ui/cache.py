"""Rendered pages kept for a while, so that many open pages following live changes cost the
daemon about one render per page and viewer rights per ``FRESH_S``, not one per poll;
requests for a page while it renders wait for that render.

An entry is a page's HTML as rendered for one viewer's rights (its CSRF token replaced by
the cache's ``placeholder``, put back per session when served), with the change stamp
(``Daemon.change_stamp``) it was rendered at. It is served while the stamp is unchanged
(for at most ``MAX_AGE_S``: the clock changes countdowns), or, when the stamp moved, for
``FRESH_S`` after it was rendered: a page then shows the daemon's state at most that much
late.

The page's live part (between ``LIVE_START`` and ``LIVE_END``) has a ``tag``, a digest of
its HTML, and is cut into parts (each between ``PART_START`` and ``PART_END``: a gate, a
table). An entry remembers the digests of the last ``HISTORY`` renders of its page, so
that ``/ui/live`` answers a page showing one of them with only the parts that changed
since (``Rendered.changes_since``). The markers are HTML comments the templates write;
autoescaping keeps any shown value from forging one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

FRESH_S = 1.0
"""How long a rendered page is served after the state it shows changed, in seconds."""
MAX_AGE_S = 30.0
"""How long a rendered page is served at most, in seconds."""
MAX_PAGES = 256
"""Rendered pages kept at most; the least recently served are dropped first."""
HISTORY = 16
"""Earlier renders of a page whose digests are kept, to answer a poll with changes only."""
LIVE_START, LIVE_END = "<!--live-->", "<!--/live-->"
PART_START, PART_END = "<!--part-->", "<!--/part-->"
TAG_SLOT = "gk-live-tag-slot"
"""What a template writes where the live part's tag goes (``data-tag``); replaced by it."""

PageKey = tuple[str, str]
"""A page's path and query, and the viewer's rights (``Viewer.rights``: the token's hash,
subject, scopes and projects; "" without tokens)."""
Digests = tuple[str, tuple[str, ...]]
"""A render's live part as digests: of its frame (the live part without its parts'
insides), and of each part in order."""


def digest(text: str) -> str:
    """A short digest of ``text`` (16 hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Live:
    """A page's live part: its HTML, its ``tag`` ("" when the page has none), the HTML of
    each of its parts in order, and its digests."""

    html: str
    tag: str
    parts: tuple[str, ...]
    digests: Digests

    @classmethod
    def of(cls, page: str) -> Live:
        """The live part of rendered ``page`` (empty when it has none)."""
        start = page.find(LIVE_START)
        end = page.find(LIVE_END, start)
        if start < 0 or end < 0:
            return cls("", "", (), ("", ()))
        html = page[start + len(LIVE_START) : end]
        frame, parts = [], []
        at = 0
        while (opened := html.find(PART_START, at)) >= 0:
            closed = html.find(PART_END, opened)
            if closed < 0:
                break
            frame.append(html[at:opened])
            parts.append(html[opened + len(PART_START) : closed])
            at = closed + len(PART_END)
        frame.append(html[at:])
        digests = (digest(PART_START.join(frame)), tuple(digest(part) for part in parts))
        return cls(html, digest(html), tuple(parts), digests)


@dataclass(frozen=True)
class Rendered:
    """A page as rendered at change stamp ``stamp``, at ``made_at`` (the cache's clock):
    its HTML (the live part's tag put in), its live part, and the digests of earlier
    renders of the same page by their tag (oldest first, at most ``HISTORY``)."""

    stamp: int
    made_at: float
    html: bytes
    live: Live
    earlier: tuple[tuple[str, Digests], ...] = ()
    answered: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """``answer`` by tag, made once for all the pages showing the same render."""

    @classmethod
    def of(cls, stamp: int, made_at: float, page: str) -> Rendered:
        live = Live.of(page)
        return cls(stamp, made_at, page.replace(TAG_SLOT, live.tag, 1).encode(), live)

    def answer(self, tag: str) -> str:
        """``changes_since(tag)`` with this render's ``stamp``, as JSON text (the CSRF
        placeholder still in), made once per tag (of the last ``HISTORY`` + 2 asked)."""
        found = self.answered.get(tag)
        if found is None:
            found = json.dumps({"stamp": self.stamp, **self.changes_since(tag)}, ensure_ascii=False)
            if len(self.answered) < HISTORY + 2:
                self.answered[tag] = found
        return found

    def changes_since(self, tag: str) -> dict[str, Any]:
        """What ``/ui/live`` answers a page showing the render tagged ``tag``: ``tag`` (this
        render's), and ``parts`` (``[[index, html], ...]``: the parts that differ from
        that render's, by their place in the live part) when the two renders differ only
        inside parts, or ``live`` (the whole live part) when the frame differs or ``tag``
        is not among the renders remembered; nothing more when it is this render."""
        answer: dict[str, Any] = {"tag": self.live.tag}
        if tag == self.live.tag:
            return answer
        before = next((d for t, d in reversed(self.earlier) if t == tag), None)
        frame, parts = self.live.digests
        if before is None or before[0] != frame or len(before[1]) != len(parts):
            answer["live"] = self.live.html
            return answer
        changed = [n for n, new in enumerate(parts) if before[1][n] != new]
        answer["parts"] = [[n, self.live.parts[n]] for n in changed]
        return answer


@dataclass
class PageCache:
    """Rendered pages by ``PageKey``; ``clock`` gives monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    placeholder: str = field(default_factory=lambda: "csrf-" + secrets.token_hex(16))
    pages: OrderedDict[PageKey, Rendered] = field(default_factory=OrderedDict)
    rendering: dict[PageKey, asyncio.Future[Rendered | None]] = field(default_factory=dict)
    """The renders in progress: a request for a page being rendered waits for it."""
    renders: int = 0
    """How many pages were rendered into the cache since it was made."""

    async def get_or_render(
        self, key: PageKey, stamp: int, render: Callable[[], Awaitable[str]]
    ) -> Rendered:
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
        future: asyncio.Future[Rendered | None] = asyncio.get_running_loop().create_future()
        self.rendering[key] = future
        made = None
        try:
            made = self.put(key, stamp, await render())
            return made
        finally:
            future.set_result(made)  # None: it failed; those waiting render themselves
            if self.rendering.get(key) is future:
                del self.rendering[key]

    def get(self, key: PageKey, stamp: int) -> Rendered | None:
        """The page ``key`` as rendered, if it may still be served at ``stamp``."""
        found = self.pages.get(key)
        if found is None:
            return None
        age_s = self.clock() - found.made_at
        if age_s >= MAX_AGE_S or (found.stamp != stamp and age_s >= FRESH_S):
            return None  # kept until replaced: its digests answer the next poll
        self.pages.move_to_end(key)
        return found

    def put(self, key: PageKey, stamp: int, page: str) -> Rendered:
        """Keep page ``key`` (its HTML, ``TAG_SLOT`` still in) rendered at ``stamp``."""
        made = Rendered.of(stamp, self.clock(), page)
        before = self.pages.get(key)
        if before is not None and before.live.tag:
            earlier = (*before.earlier, (before.live.tag, before.live.digests))
            made = Rendered(made.stamp, made.made_at, made.html, made.live, earlier[-HISTORY:])
        self.renders += 1
        self.pages[key] = made
        self.pages.move_to_end(key)
        while len(self.pages) > MAX_PAGES:
            self.pages.popitem(last=False)
        return made
