"""The status page in a real browser: Debian's Chromium driven by Playwright.

Skipped with a reason when Chromium or Playwright is missing, unless
GATEKEEPER_REQUIRE_BROWSER=1 (CI sets it). Screenshots of the main views go to
``build/ui-screens/`` (not committed); with GATEKEEPER_UPDATE_SCREENSHOT=1 the project
page's also becomes ``docs/ui.png``, the README's picture.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from tests.conftest import SECRET
from tests.uikit import TOKENS, approve, post_facts, start_site

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parent.parent
SCREENS = REPO / "build" / "ui-screens"
GATE = "tower-a/design-release"
LIVE_MS = 2000
"""The page must show a change within 2 s, without a reload."""


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not CHROMIUM.exists():
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


if (reason := _missing()) is not None:
    if os.environ.get("GATEKEEPER_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"GATEKEEPER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def site(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any], receiver: Any
) -> Any:
    return await start_site(project_factory, start_daemon, receiver)


async def signed_in(
    browser: Browser, site: Any, subject: str, **options: Any
) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(base_url=site.url, **options)
    page = await context.new_page()
    await page.goto("/ui/projects/tower-a")
    await expect(page).to_have_url(f"{site.url}/ui/login?next=/ui/projects/tower-a")
    await page.get_by_label("API token").fill(TOKENS[subject][0])
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(f"{site.url}/ui/projects/tower-a")
    return context, page


def gate(page: Page) -> Any:
    return page.locator(f'article[data-rule="{GATE}"]')


async def shoot(page: Page, name: str, tmp_path: Path) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENS / name), full_page=True)
    shutil.copy(SCREENS / name, tmp_path / name)


async def test_an_approver_approves_and_the_release_goes_out_live(
    browser: Browser, site: Any, receiver: Any, tmp_path: Path
) -> None:
    _, bob = await signed_in(browser, site, "bob", viewport={"width": 1200, "height": 900})
    card = gate(bob)
    await expect(card).to_have_attribute("data-state", "waiting for approvals")
    await expect(card.locator(".clauses li")).to_have_count(2)
    await expect(card.locator(".clauses .tick.yes")).to_have_count(2)
    await expect(card).to_contain_text("Approvals 0 of 2")
    await expect(card).to_contain_text("2 more needed, from alice, bob, carol")
    await bob.evaluate("window.stillTheSamePage = true")

    # another approver approves through the API: bob's page follows without a reload
    await approve(site, "alice", GATE)
    await expect(card).to_contain_text("Approvals 1 of 2", timeout=LIVE_MS)
    await expect(card).to_contain_text("alice approved, lapses")
    assert await bob.evaluate("window.stillTheSamePage") is True
    await shoot(bob, "project-waiting.png", tmp_path)
    if os.environ.get("GATEKEEPER_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        await bob.screenshot(path=str(REPO / "docs" / "ui.png"))

    # alice watches while bob approves from his page: the release goes out
    _, alice = await signed_in(browser, site, "alice")
    await alice.evaluate("window.stillTheSamePage = true")
    await card.get_by_label("Comment").fill("design drawings checked")
    await card.get_by_role("button", name="Approve").click()
    await expect(bob.locator(".notice.ok")).to_have_text(f"You approved {GATE}.")
    await expect(gate(bob)).to_have_attribute("data-state", "fired")
    await expect(gate(alice)).to_have_attribute("data-state", "fired", timeout=LIVE_MS)
    assert await alice.evaluate("window.stillTheSamePage") is True

    received = await receiver.wait_for(1)
    release = next(r for r in received if r.path == "/bank")
    Webhook(SECRET).verify(release.raw, release.headers)  # signed, or this raises
    assert release.body["amount"] == "5000.00"
    assert release.body["payee"] == "acme-architects"
    await expect(alice.locator("table").first).to_contain_text("fired", timeout=LIVE_MS)
    await shoot(alice, "project-fired.png", tmp_path)


async def test_a_reader_sees_no_buttons_and_a_forged_post_is_refused(
    browser: Browser, site: Any, tmp_path: Path
) -> None:
    _, page = await signed_in(browser, site, "reader")
    await expect(gate(page)).to_be_visible()
    assert await page.locator('main form[method="post"]').count() == 0
    buttons = await page.locator("main button").all_text_contents()
    assert buttons == ["Filter"]  # reading only: no approve, reject, pause, re-arm, retry
    csrf = await page.locator('header input[name="csrf"]').get_attribute("value")
    assert csrf
    form = {"csrf": csrf, "rule": GATE, "decision": "approve"}
    response = await page.request.post("/ui/approve", form=form, max_redirects=0)
    assert response.status == 403
    admin = {"csrf": csrf, "rule": GATE, "act": "pause", "reason": "forged"}
    response = await page.request.post("/ui/act", form=admin, max_redirects=0)
    assert response.status == 403
    _, rule = await site.get("/v1/rules/tower-a/design-release")  # no token: 401
    assert rule["error"]["status"] == 401
    await page.reload()
    await expect(gate(page)).to_contain_text("Approvals 0 of 2")
    await shoot(page, "project-reader.png", tmp_path)


async def test_a_post_without_the_csrf_token_is_refused(browser: Browser, site: Any) -> None:
    _, page = await signed_in(browser, site, "bob")
    form = {"rule": GATE, "decision": "approve"}
    response = await page.request.post("/ui/approve", form=form, max_redirects=0)
    assert response.status == 403
    await page.reload()
    await expect(gate(page)).to_contain_text("Approvals 0 of 2")


async def test_a_fact_value_with_markup_is_shown_as_text(browser: Browser, site: Any) -> None:
    evil = "<script>window.injected = 1</script><b>bold</b>"
    facts = {"facts": [{"project": "tower-a", "kind": "milestone", "id": "design",
                        "data": {"status": evil}}]}  # fmt: skip
    await post_facts(site, facts)
    _, page = await signed_in(browser, site, "reader")
    await expect(gate(page).locator(".val").first).to_contain_text(evil)
    assert await page.evaluate("window.injected") is None
    assert await page.locator("main b").count() == 0


async def test_after_logout_the_session_cookie_no_longer_works(browser: Browser, site: Any) -> None:
    context, page = await signed_in(browser, site, "bob")
    cookies = await context.cookies()
    session = next(c for c in cookies if c["name"] == "gk_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(f"{site.url}/ui/login")
    other = await browser.new_context(base_url=site.url)
    await other.add_cookies([session])
    page = await other.new_page()
    await page.goto("/ui/projects/tower-a")
    await expect(page).to_have_url(f"{site.url}/ui/login?next=/ui/projects/tower-a")


async def test_a_wrong_token_is_said_on_the_form(browser: Browser, site: Any) -> None:
    context = await browser.new_context(base_url=site.url)
    page = await context.new_page()
    await page.goto("/ui/login")
    await page.get_by_label("API token").fill("gk_wrong")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    assert "gk_wrong" not in await page.content()


async def test_phone_width_local_times_and_no_javascript(
    browser: Browser, site: Any, tmp_path: Path
) -> None:
    await approve(site, "alice", GATE)
    signed_at = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    handover = {"status": "signed", "signed_at": signed_at}
    await post_facts(site, {"facts": [{"project": "tower-a", "kind": "milestone",
                                       "id": "handover", "data": handover}]})  # fmt: skip
    _, phone = await signed_in(
        browser,
        site,
        "root",
        viewport={"width": 390, "height": 844},
        timezone_id="Asia/Tokyo",
        locale="en-GB",
    )
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    stamp = gate(phone).locator(".approvals time").first
    title = await stamp.get_attribute("title")
    assert title and title.endswith("Z UTC")
    shown = await stamp.text_content()
    assert shown and "Z" not in shown  # in the viewer's zone
    countdown = phone.locator('article[data-rule="tower-a/handover"] time.countdown')
    await expect(countdown).to_have_text(re.compile(r"^1d 23h 59m \d+s$"))
    first = await countdown.text_content()
    await expect(countdown).not_to_have_text(first or "", timeout=LIVE_MS)  # it counts down
    await expect(gate(phone).get_by_role("button", name="Pause")).to_be_visible()
    await expect(gate(phone).get_by_label("Reason")).to_be_visible()
    await shoot(phone, "project-phone-admin.png", tmp_path)

    _, still = await signed_in(browser, site, "reader", java_script_enabled=False)
    await expect(gate(still)).to_contain_text("Approvals 1 of 2")
    await expect(gate(still)).to_have_attribute("data-state", "waiting for approvals")
    await still.goto("/ui/projects/tower-a/rules/tower-a/design-release")
    await expect(still.locator("pre.when")).to_contain_text("quality_gate.qg1.passed")
    await shoot(still, "rule-no-javascript.png", tmp_path)


async def test_a_form_being_filled_in_is_not_swapped_out(browser: Browser, site: Any) -> None:
    _, bob = await signed_in(browser, site, "bob")
    comment = gate(bob).get_by_label("Comment")
    await comment.fill("half a sentence")
    await approve(site, "alice", GATE)
    await bob.wait_for_timeout(LIVE_MS)
    await expect(gate(bob)).to_contain_text("Approvals 0 of 2")  # held while he types
    await expect(comment).to_have_value("half a sentence")
    await comment.fill("")
    await bob.locator("h1").click()  # he leaves the form empty: the page catches up
    await expect(gate(bob)).to_contain_text("Approvals 1 of 2", timeout=LIVE_MS)
    tag = await bob.locator("#live").get_attribute("data-tag")
    assert tag and len(tag) == 16
