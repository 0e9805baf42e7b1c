"""The status page's cache of rendered pages: when a kept page may be served, and one
render shared by the requests that arrive while it runs."""

from __future__ import annotations

import asyncio

from gatekeeper.ui.cache import FRESH_S, MAX_AGE_S, PageCache, Rendered

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
