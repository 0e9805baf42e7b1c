"""The status page's live protocol over real HTTP: ``/ui/live?page=&tag=`` answers nothing
while the page is unchanged, the parts that changed (which, put in place, make the page as
rendered afresh), or the whole live part; one render serves every poller of equal rights;
each session gets its own CSRF token; a page that is gone says reload; a path that is not
a live page is refused."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from gatekeeper.ui.cache import FRESH_S, LIVE_END, LIVE_START
from gatekeeper.ui.handlers import CACHE_KEY
from tests.conftest import fact
from tests.uikit import CSRF, Browserless, approve, post_facts, start_site

PAGE = "/ui/projects/tower-a"
PART = re.compile(r"<!--part-->.*?<!--/part-->", re.S)
SIGNED_AT = "2026-01-01T00:00:00Z"
HANDOVER = {"facts": [fact("milestone", "handover", status="signed", signed_at=SIGNED_AT)]}


@pytest.fixture
async def site(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any], receiver: Any
) -> AsyncIterator[Any]:
    yield await start_site(project_factory, start_daemon, receiver)


async def signed_in(site: Any, subject: str) -> AsyncIterator[Browserless]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        browser = Browserless(site.url, session)
        assert (await browser.sign_in(subject)).status == 303
        yield browser


@pytest.fixture
async def reader(site: Any) -> AsyncIterator[Browserless]:
    async for browser in signed_in(site, "reader"):
        yield browser


def live_of(page: str) -> str:
    """The live part of a page's HTML, and its tag."""
    return page.split(LIVE_START, 1)[1].split(LIVE_END, 1)[0]


def tag_of(page: str) -> str:
    found = re.search(r'data-tag="([0-9a-f]+)"', page)
    assert found, page[:800]
    return found.group(1)


async def live(browser: Browserless, tag: str, page: str = PAGE) -> tuple[int, dict[str, Any]]:
    query = urlencode({"page": page, "tag": tag})
    async with browser.session.get(f"{browser.url}/ui/live?{query}") as response:
        assert response.headers["Cache-Control"] == "no-store"
        return response.status, await response.json()


async def next_change(browser: Browserless, tag: str, page: str = PAGE) -> dict[str, Any]:
    """Poll as the page's script does (twice a second) until the tag changes, at most 2 s:
    the page must follow a change within that."""
    deadline = time.monotonic() + 2.0
    while True:
        status, answer = await live(browser, tag, page)
        assert status == 200, answer
        if answer["tag"] != tag:
            return answer
        assert time.monotonic() < deadline, "no change within 2 s"
        await asyncio.sleep(0.5)


def put_in(live_html: str, parts: list[list[Any]]) -> str:
    """``live_html`` with the parts ``/ui/live`` sent put in place (as the script does)."""
    shown = PART.findall(live_html)
    for index, html in parts:
        shown[index] = "<!--part-->" + html + "<!--/part-->"
    pieces = PART.split(live_html)
    return "".join(piece + (shown[n] if n < len(shown) else "") for n, piece in enumerate(pieces))


async def test_an_unchanged_page_gets_nothing_and_a_change_only_its_parts(
    site: Any, reader: Browserless
) -> None:
    _, page = await reader.page(PAGE)
    tag = tag_of(page)
    status, answer = await live(reader, tag)
    assert status == 200
    assert answer["tag"] == tag and "parts" not in answer and "live" not in answer
    assert isinstance(answer["stamp"], int)

    await post_facts(site, HANDOVER)
    answer = await next_change(reader, tag)
    assert "live" not in answer
    changed = "".join(html for _, html in answer["parts"])
    assert 'data-rule="tower-a/handover"' in changed
    assert 'data-rule="tower-a/design-release"' not in changed  # that gate did not change
    assert len(answer["parts"]) < len(PART.findall(live_of(page)))

    _, fresh = await reader.page(PAGE)  # the page as it stands: what the parts make
    assert tag_of(fresh) == answer["tag"]
    assert put_in(live_of(page), answer["parts"]) == live_of(fresh)


async def test_a_tag_not_remembered_gets_the_whole_live_part(reader: Browserless) -> None:
    _, page = await reader.page(PAGE)
    status, answer = await live(reader, "")
    assert status == 200
    assert answer["tag"] == tag_of(page)
    assert answer["live"] == live_of(page)
    status, answer = await live(reader, "0123456789abcdef")
    assert answer["live"] == live_of(page)


async def test_each_session_gets_its_own_csrf_token_in_the_parts(site: Any) -> None:
    async for alice in signed_in(site, "alice"):
        _, page = await alice.page(PAGE)
        csrf = CSRF.findall(page)
        assert len(set(csrf)) == 1
        await approve(site, "bob", "tower-a/design-release")
        answer = await next_change(alice, tag_of(page))
        changed = "".join(html for _, html in answer["parts"])
        assert "Approvals 1 of 2" in changed
        assert set(CSRF.findall(changed)) == set(csrf)  # her own, not a placeholder
        assert site.runner.app[CACHE_KEY].placeholder not in changed


async def test_pollers_of_equal_rights_share_one_render_per_change(site: Any) -> None:
    cache = site.runner.app[CACHE_KEY]
    browsers = [signed_in(site, "reader") for _ in range(5)]
    readers = [await anext(b) for b in browsers]
    try:
        _, page = await readers[0].page(PAGE)
        tag = tag_of(page)
        await asyncio.sleep(FRESH_S)  # the page may be rendered again at the next change
        await post_facts(site, HANDOVER)
        renders = cache.renders
        answers = await asyncio.gather(*(live(r, tag) for r in readers))
        assert cache.renders == renders + 1
        assert len({a["tag"] for _, a in answers}) == 1 and answers[0][1]["tag"] != tag
        await asyncio.gather(*(live(r, tag) for r in readers))  # unchanged since: no render
        assert cache.renders == renders + 1
    finally:
        for b in browsers:
            await b.aclose()


async def test_a_page_that_is_gone_says_reload(reader: Browserless) -> None:
    page = "/ui/projects/tower-a/rules/tower-a/punch-items?item=P-404"
    _, text = await reader.page(page)
    assert "has no instance" in text
    status, answer = await live(reader, "", page)
    assert (status, answer) == (200, {"reload": True})


async def test_a_rule_page_follows_too(site: Any, reader: Browserless) -> None:
    page = "/ui/projects/tower-a/rules/tower-a/design-release"
    _, text = await reader.page(page)
    await approve(site, "alice", "tower-a/design-release")
    answer = await next_change(reader, tag_of(text), page)
    _, fresh = await reader.page(page)
    assert put_in(live_of(text), answer["parts"]) == live_of(fresh)


@pytest.mark.parametrize(
    "page",
    [
        "/ui/",
        "/ui/login",
        "https://elsewhere.example/ui/projects/tower-a",
        "//elsewhere.example/ui/projects/tower-a",
        "/v1/rules",
        "/ui/projects/tower-a?bogus=1",
        "/ui/projects/tower-a/rules/x?page=2",
    ],
)
async def test_a_path_that_is_not_a_live_page_is_refused(reader: Browserless, page: str) -> None:
    status, answer = await live(reader, "", page)
    assert status == 400
    assert "live page" in answer["error"]


async def test_live_with_a_page_needs_a_session(site: Any) -> None:
    async with aiohttp.ClientSession() as session:
        query = urlencode({"page": PAGE, "tag": ""})
        async with session.get(f"{site.url}/ui/live?{query}") as response:
            assert response.status == 401


@pytest.mark.parametrize(
    "page", ["/ui/projects/tower-a?state=%ZZ&[", "/ui/projects/[::1", "/ui/projects/%00"]
)
async def test_an_odd_page_is_answered_not_crashed_on(reader: Browserless, page: str) -> None:
    status, answer = await live(reader, "", page)
    assert status in (200, 400), answer
    assert answer.get("reload") or "error" in answer or "live" in answer
