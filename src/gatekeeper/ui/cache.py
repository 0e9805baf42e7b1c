"""Rendered pages kept a moment, so that many open pages following live changes cost the
daemon one render per page and viewer per ``FRESH_S``, not one per poll.

An entry is a page's HTML as rendered for one token (its CSRF token replaced by the
cache's ``placeholder``, put back per session when served), with the change stamp
(``Daemon.change_stamp``) it was rendered at. It is served while the stamp is unchanged
(for at most ``MAX_AGE_S``: the clock changes countdowns), or, when the stamp moved, for
``FRESH_S`` after it was rendered: a page then shows the daemon's state at most that much
late, and says which stamp it shows, so the page's script asks again.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

FRESH_S = 1.0
"""How long a rendered page is served after the state it shows changed, in seconds."""
MAX_AGE_S = 30.0
"""How long a rendered page is served at most, in seconds."""
MAX_PAGES = 256
"""Rendered pages kept at most; the least recently served are dropped first."""

PageKey = tuple[str, str]
"""A page's path and query, and the SHA-256 of the viewer's token ("" without tokens)."""


@dataclass(frozen=True)
class Rendered:
    stamp: int
    made_at: float
    html: str


@dataclass
class PageCache:
    """Rendered pages by ``PageKey``; ``clock`` gives monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    placeholder: str = field(default_factory=lambda: "csrf-" + secrets.token_hex(16))
    pages: OrderedDict[PageKey, Rendered] = field(default_factory=OrderedDict)

    def get(self, key: PageKey, stamp: int) -> str | None:
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

    def put(self, key: PageKey, stamp: int, html: str) -> None:
        """Keep page ``key`` rendered at ``stamp``."""
        self.pages[key] = Rendered(stamp, self.clock(), html)
        self.pages.move_to_end(key)
        while len(self.pages) > MAX_PAGES:
            self.pages.popitem(last=False)
