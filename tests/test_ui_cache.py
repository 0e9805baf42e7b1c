"""The status page's cache of rendered pages: when a kept page may be served, one render
shared by the requests that arrive while it runs, and what changed in a page since an
earlier render of it (its parts, or its whole live part)."""

from __future__ import annotations

import asyncio
import json

from gatekeeper.ui.cache import FRESH_S, HISTORY, MAX_AGE_S, TAG_SLOT, PageCache, Rendered

KEY = ("/ui/projects/tower-a", "sha")


def html(found: Rendered | None) -> bytes | None:
    return None if found is None else found.html


def test_a_page_is_served_while_nothing_changed_and_a_moment_after() -> None:
    now = [100.0]
    cache = PageCache(clock=lambda: now[0])
    cache.put(KEY, 7, "page at 7")
    assert html(cache.get(KEY, 7)) == b"page at 7"
    assert html(cache.get(KEY, 8)) == b"page at 7"  # changed, but rendered just now
    now[0] += FRESH_S
    assert cache.get(KEY, 8) is None  # changed, and rendered FRESH_S ago: render again
    cache.put(KEY, 8, "page at 8")
    now[0] += MAX_AGE_S
    assert cache.get(KEY, 8) is None  # unchanged, but countdowns moved on
    assert cache.get(("/ui/", "sha"), 8) is None


async def test_requests_during_a_render_wait_for_it() -> None:
    cache = PageCache()
    renders = 0
    release = asyncio.Event()

    async def render() -> str:
        nonlocal renders
        renders += 1
        await release.wait()
        return "rendered"

    waiting = [asyncio.create_task(cache.get_or_render(KEY, 1, render)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert [r.html for r in await asyncio.gather(*waiting)] == [b"rendered"] * 5
    assert renders == 1
    assert not cache.rendering


async def test_a_failed_render_lets_the_waiting_requests_render_themselves() -> None:
    cache = PageCache()
    calls = 0

    async def render() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 1:
            raise RuntimeError("the database is away")
        return "second try"

    first = asyncio.create_task(cache.get_or_render(KEY, 1, render))
    await asyncio.sleep(0)
    second = asyncio.create_task(cache.get_or_render(KEY, 1, render))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], Rendered) and results[1].html == b"second try"


def page(*parts: str, frame: str = "<h1>p</h1>") -> str:
    """A page whose live part is ``frame`` then ``parts``."""
    inside = "".join(f"<!--part--><div data-part>{p}</div><!--/part-->" for p in parts)
    return f'<div id="live" data-tag="{TAG_SLOT}"><!--live-->{frame}{inside}<!--/live--></div>'


def test_a_poll_gets_the_parts_that_changed_since_the_render_it_shows() -> None:
    cache = PageCache()
    first = cache.put(KEY, 1, page("a", "b", "c"))
    assert f'data-tag="{first.live.tag}"'.encode() in first.html
    second = cache.put(KEY, 2, page("a", "B", "c"))
    assert second.changes_since(second.live.tag) == {"tag": second.live.tag}
    changed = second.changes_since(first.live.tag)
    assert changed == {"tag": second.live.tag, "parts": [[1, "<div data-part>B</div>"]]}
    third = cache.put(KEY, 3, page("A", "B", "c"))
    assert third.changes_since(first.live.tag)["parts"] == [
        [0, "<div data-part>A</div>"],
        [1, "<div data-part>B</div>"],
    ]
    expected = {"stamp": 3, **third.changes_since(first.live.tag)}
    assert json.loads(third.answer(first.live.tag)) == expected
    assert third.answer(first.live.tag) is third.answer(first.live.tag)  # made once


def test_a_new_frame_or_a_forgotten_render_gets_the_whole_live_part() -> None:
    cache = PageCache()
    first = cache.put(KEY, 1, page("a", "b"))
    other_frame = cache.put(KEY, 2, page("a", "b", frame="<h1>renamed</h1>"))
    assert other_frame.changes_since(first.live.tag) == {
        "tag": other_frame.live.tag,
        "live": other_frame.live.html,
    }
    fewer = cache.put(KEY, 3, page("a"))
    assert "live" in fewer.changes_since(other_frame.live.tag)
    for n in range(HISTORY):
        cache.put(KEY, 4 + n, page(f"x{n}"))
    latest = cache.put(KEY, 100, page("y"))
    assert "live" in latest.changes_since(fewer.live.tag)  # more than HISTORY renders ago
    newest = cache.put(KEY, 101, page("z"))
    assert newest.changes_since(latest.live.tag)["parts"] == [[0, "<div data-part>z</div>"]]
