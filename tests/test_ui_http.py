"""The status page over plain HTTP: sign-in, sessions and their cookie, CSRF, scopes and
projects, 404 pages, escaping, and acting through the API's own code paths."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tests.conftest import DEPLOY_RULE
from tests.uikit import (
    CSRF,
    GATE_FACTS,
    RELEASE_RULE,
    TOKENS,
    Browserless,
    api_get,
    approve,
    post_facts,
    start_site,
)


@pytest.fixture
async def site(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any], receiver: Any
) -> AsyncIterator[Any]:
    yield await start_site(project_factory, start_daemon, receiver)


async def client(site: Any) -> AsyncIterator[Browserless]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browserless(site.url, session)


@pytest.fixture
async def alice(site: Any) -> AsyncIterator[Browserless]:
    async for c in client(site):
        response = await c.sign_in("alice")
        assert response.status == 303, response.status
        yield c


@pytest.fixture
async def anon(site: Any) -> AsyncIterator[Browserless]:
    async for c in client(site):
        yield c


async def test_root_redirects_to_the_page_and_the_page_to_the_login_form(anon: Browserless):
    async with anon.session.get(anon.url + "/", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/ui/"
    async with anon.session.get(anon.url + "/ui/projects/tower-a", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/ui/login?next=/ui/projects/tower-a"


async def test_the_session_cookie_is_httponly_strict_and_expires(site: Any, anon: Browserless):
    response = await anon.sign_in("alice")
    assert response.status == 303
    cookie = response.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith("gk_session="))
    assert "HttpOnly" in session
    assert "SameSite=Strict" in session
    assert "Max-Age=28800" in session
    assert "Path=/" in session
    assert "Secure" not in session  # plain HTTP here; under TLS it is Secure
    assert TOKENS["alice"][0] not in " ".join(cookie)


async def test_a_wrong_token_is_said_on_the_form_after_a_delay(anon: Browserless):
    loop = asyncio.get_running_loop()
    started = loop.time()
    ticks = 0

    async def count() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    counter = asyncio.create_task(count())
    csrf = await anon.csrf("/ui/login")
    response = await anon.session.post(
        anon.url + "/ui/login", data={"csrf": csrf, "token": "gk_guess", "next": "/ui/"}
    )
    text = await response.text()
    counter.cancel()
    assert response.status == 401
    assert "That token is not valid." in text
    assert loop.time() - started >= 1.0
    assert ticks >= 10  # the loop kept running meanwhile
    assert "gk_guess" not in text


async def test_a_login_without_its_csrf_token_is_refused(anon: Browserless):
    await anon.page("/ui/login")
    response = await anon.post("/ui/login", {"token": TOKENS["alice"][0]})
    assert response.status == 403
    assert "gk_session" not in response.cookies


async def test_a_token_without_read_cannot_sign_in(anon: Browserless):
    response = await anon.sign_in("writer")
    assert response.status == 403


async def test_the_project_page_shows_the_gate_waiting_for_approvals(alice: Browserless):
    status, text = await alice.page("/ui/projects/tower-a")
    assert status == 200
    assert "tower-a/design-release" in text
    assert "waiting for approvals" in text
    assert ">1 armed</a>" in text and ">1 waiting for approvals</a>" in text  # the counts
    assert ">1 per item</a>" in text
    recent = text.split("<h2>Recent decisions</h2>", 1)[1].split("</table>", 1)[0]
    assert recent.count("decision: awaiting_approvals") == 1  # once, seeded or kept
    assert "Approvals 0 of 2" in text
    assert 'value="approve"' in text  # alice is an approver
    assert 'name="act"' not in text  # not an admin
    assert TOKENS["alice"][0] not in text


async def test_an_approval_from_the_page_is_recorded_as_the_api_records_it(
    site: Any, alice: Browserless
):
    csrf = await alice.csrf("/ui/projects/tower-a")
    form = {
        "csrf": csrf,
        "rule": "tower-a/design-release",
        "decision": "approve",
        "comment": "drawings checked",
        "back": "/ui/projects/tower-a",
    }
    response = await alice.post("/ui/approve", form)
    assert response.status == 303
    assert response.headers["Location"] == "/ui/projects/tower-a"
    _, text = await alice.page("/ui/projects/tower-a")
    assert "You approved tower-a/design-release." in text
    assert "Approvals 1 of 2" in text
    entries = (await api_get(site, "/v1/audit?kind=approval"))["entries"]
    assert [(e["actor"], e["what"], e["reason"]) for e in entries] == [
        ("alice", "approve", "drawings checked")
    ]


async def test_a_post_without_the_csrf_token_is_refused(site: Any, alice: Browserless):
    form = {"rule": "tower-a/design-release", "decision": "approve"}
    response = await alice.post("/ui/approve", form)
    assert response.status == 403
    form["csrf"] = "not-the-token"
    assert (await alice.post("/ui/approve", form)).status == 403
    _, rule = await site.get("/v1/rules/tower-a/design-release")
    assert rule["error"]["status"] == 401  # sanity: the API wants a token
    rule = await api_get(site, "/v1/rules/tower-a/design-release")
    assert rule["explanation"]["approvals"]["approved_by"] == []


async def test_a_reader_sees_no_buttons_and_a_forged_post_is_refused(site: Any, anon: Browserless):
    await anon.sign_in("reader")
    status, text = await anon.page("/ui/projects/tower-a")
    assert status == 200
    assert "<button" in text  # sign out only
    assert 'value="approve"' not in text and 'name="act"' not in text
    csrf = await anon.csrf("/ui/projects/tower-a")
    for path, form in (
        ("/ui/approve", {"rule": "tower-a/design-release", "decision": "approve"}),
        ("/ui/act", {"rule": "tower-a/design-release", "act": "pause", "reason": "x"}),
        ("/ui/retry", {"action_id": "act_1", "reason": "x"}),
    ):
        response = await anon.post(path, {**form, "csrf": csrf})
        assert response.status == 403, path
    body = await api_get(site, "/v1/rules/tower-a/design-release")
    assert body["paused"] is False
    assert body["explanation"]["approvals"]["approved_by"] == []


async def test_a_token_of_another_project_sees_a_404_and_cannot_act(anon: Browserless):
    await anon.sign_in("outsider")
    status, text = await anon.page("/ui/projects/tower-a")
    assert status == 404
    assert "There is no project" in text
    _, index = await anon.page("/ui/")
    assert "tower-b" in index and "tower-a" not in index
    csrf = await anon.csrf("/ui/projects/tower-b")
    form = {"csrf": csrf, "rule": "tower-a/design-release", "act": "pause", "reason": "x"}
    assert (await anon.post("/ui/act", form)).status == 403


async def test_unknown_projects_rules_items_and_paths_are_404_pages(alice: Browserless):
    for path in (
        "/ui/projects/nope",
        "/ui/projects/tower-a/rules/tower-a/nope",
        "/ui/projects/tower-b/rules/tower-a/design-release",
        "/ui/projects/tower-a/rules/tower-a/punch-items?item=nope",
        "/ui/nothing/here",
    ):
        async with alice.session.get(alice.url + path) as response:
            text = await response.text()
            assert response.status == 404, path
            assert response.content_type == "text/html", path
            assert "Traceback" not in text and "404" in text, path


async def test_an_admin_pauses_and_resumes_from_the_page(site: Any, anon: Browserless):
    await anon.sign_in("root")
    csrf = await anon.csrf("/ui/projects/tower-a")
    form = {"csrf": csrf, "rule": "tower-a/design-release", "act": "pause",
            "reason": "bank audit", "back": "/ui/projects/tower-a"}  # fmt: skip
    assert (await anon.post("/ui/act", form)).status == 303
    _, text = await anon.page("/ui/projects/tower-a")
    assert "You paused tower-a/design-release." in text
    assert 'value="resume"' in text
    assert ">1 paused</a>" in text and ">1 armed</a>" in text
    assert (await anon.post("/ui/act", {**form, "reason": " "})).status == 400
    assert (await anon.post("/ui/act", {**form, "act": "resume"})).status == 303
    entries = (await api_get(site, "/v1/audit?kind=admin_act"))["entries"]
    acts = [(e["what"], e["actor"]) for e in entries]
    assert acts == [("resume", "root"), ("pause", "root")]


async def test_after_logout_the_session_cookie_no_longer_works(site: Any, alice: Browserless):
    cookie = next(c.value for c in alice.session.cookie_jar if c.key == "gk_session")
    csrf = await alice.csrf("/ui/")
    response = await alice.post("/ui/logout", {"csrf": csrf})
    assert response.status == 303
    async with aiohttp.ClientSession() as other:
        headers = {"Cookie": f"gk_session={cookie}"}
        async with other.get(
            site.url + "/ui/projects/tower-a", headers=headers, allow_redirects=False
        ) as answer:
            assert answer.status == 303
            assert answer.headers["Location"].startswith("/ui/login")
        form = {"csrf": csrf, "rule": "tower-a/design-release", "decision": "approve"}
        async with other.post(
            site.url + "/ui/approve", data=form, headers=headers, allow_redirects=False
        ) as answer:
            assert answer.status == 303
            assert answer.headers["Location"].startswith("/ui/login")


async def test_an_expired_session_goes_back_to_the_login_form_without_acting(
    site: Any, alice: Browserless
):
    from gatekeeper.ui.handlers import SESSIONS_KEY

    csrf = await alice.csrf("/ui/projects/tower-a")
    site.runner.app[SESSIONS_KEY].expire_all()
    form = {"csrf": csrf, "rule": "tower-a/design-release", "decision": "approve",
            "back": "/ui/projects/tower-a"}  # fmt: skip
    response = await alice.post("/ui/approve", form)
    assert response.status == 303
    assert response.headers["Location"] == "/ui/login?next=/ui/projects/tower-a"
    rule = await api_get(site, "/v1/rules/tower-a/design-release")
    assert rule["explanation"]["approvals"]["approved_by"] == []


async def test_a_fact_value_with_markup_is_shown_as_text(site: Any, alice: Browserless):
    evil = "<script>alert(1)</script>"
    facts = {"facts": [{"project": "tower-a", "kind": "milestone", "id": "design",
                        "data": {"status": evil}}]}  # fmt: skip
    await post_facts(site, facts)
    _, text = await alice.page("/ui/projects/tower-a")
    assert evil not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


async def test_pages_say_what_they_are_and_forbid_inline_scripts(alice: Browserless):
    async with alice.session.get(alice.url + "/ui/projects/tower-a") as response:
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    async with alice.session.get(alice.url + "/ui/live") as response:
        assert response.status == 200
        assert isinstance((await response.json())["stamp"], int)


async def test_live_needs_a_session(anon: Browserless):
    async with anon.session.get(anon.url + "/ui/live") as response:
        assert response.status == 401


async def test_per_item_instances_are_paged_and_filtered(site: Any, alice: Browserless):
    facts = {"facts": [{"project": "tower-a", "kind": "punch", "id": f"p{i:03}",
                        "data": {"closed": i % 2 == 0}} for i in range(120)]}  # fmt: skip
    await post_facts(site, facts)
    base = "/ui/projects/tower-a/rules/tower-a/punch-items"
    _, text = await alice.page(base)
    assert "item=p000" in text and "item=p049" in text and "item=p050" not in text
    assert "after=p049" in text
    _, text = await alice.page(base + "?state=armed&q=p1")
    assert 'item=p101"' in text and 'item=p100"' not in text and 'item=p001"' not in text
    status, text = await alice.page(base + "?item=p007")
    assert status == 200 and "item p007" in text


async def test_the_status_page_is_not_served_without_mounting(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any]
):
    project = project_factory()
    project.write_rule("r.yaml", DEPLOY_RULE)
    running = await start_daemon(project)
    async with running.session.get(running.url + "/ui/", allow_redirects=False) as response:
        assert response.status == 404
        assert response.content_type == "application/json"


async def test_a_dead_letter_shows_its_reason_and_an_admin_retries_it(
    site: Any, receiver: Any, anon: Browserless
):
    receiver.path_responses["/bank"] = [500, 500, 500]  # max_attempts 3: then dead
    await approve(site, "alice", "tower-a/design-release")
    await approve(site, "bob", "tower-a/design-release")
    for _ in range(100):
        dead = (await api_get(site, "/v1/actions?status=dead"))["actions"]
        if dead:
            break
        await asyncio.sleep(0.1)
    [letter] = dead
    await anon.sign_in("root")
    _, text = await anon.page("/ui/projects/tower-a")
    dead_part = text.split("<h2>Dead letters</h2>", 1)[1]
    assert letter["action_id"] in dead_part and "HTTP 500" in dead_part
    assert 'action="/ui/retry"' in dead_part
    csrf = await anon.csrf("/ui/projects/tower-a")
    form = {"csrf": csrf, "action_id": letter["action_id"], "reason": "bank is back",
            "back": "/ui/projects/tower-a"}  # fmt: skip
    response = await anon.post("/ui/retry", form)
    assert response.status == 303
    _, text = await anon.page("/ui/projects/tower-a")
    assert f"You requeued {letter['action_id']}." in text
    await receiver.wait_for(4)  # the fourth attempt is answered 200
    entries = (await api_get(site, "/v1/audit?kind=admin_act"))["entries"]
    assert [(e["what"], e["actor"], e["reason"]) for e in entries] == [
        ("retry_action", "root", "bank is back")
    ]


async def test_an_approver_of_another_rule_list_sees_no_approve_buttons(anon: Browserless):
    await anon.sign_in("root")  # admin: may pause, but is not among the approvers
    _, text = await anon.page("/ui/projects/tower-a")
    assert 'value="approve"' not in text and 'value="pause"' in text


async def test_a_shadow_rule_says_so(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any]
):
    project = project_factory()
    project.write_rule("r.yaml", DEPLOY_RULE + "mode: shadow\n")
    running = await start_daemon(project, ui=True)
    async with running.session.get(running.url + "/ui/projects/tower-a") as response:
        text = await response.text()
    assert response.status == 200
    assert '<span class="state s-mode">shadow</span>' in text


async def test_without_tokens_the_page_is_read_only(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any]
):
    project = project_factory()
    project.write_rule("r.yaml", DEPLOY_RULE)
    running = await start_daemon(project, ui=True)
    async with running.session.get(running.url + "/ui/projects/tower-a") as response:
        text = await response.text()
    assert response.status == 200
    assert "tower-a/deploy-docs" in text and 'method="post"' not in text
    form = {"rule": "tower-a/deploy-docs", "act": "pause", "reason": "x", "csrf": ""}
    async with running.session.post(running.url + "/ui/act", data=form) as response:
        assert response.status == 403
    _, rule = await running.get("/v1/rules/tower-a/deploy-docs")
    assert rule["paused"] is False


async def test_wrong_tokens_from_one_address_wait_in_turn(anon: Browserless):
    csrf = await anon.csrf("/ui/login")
    started = asyncio.get_running_loop().time()

    async def guess(n: int) -> int:
        form = {"csrf": csrf, "token": f"gk_guess{n}", "next": "/ui/"}
        async with anon.session.post(anon.url + "/ui/login", data=form) as response:
            return response.status

    statuses = await asyncio.gather(*(guess(n) for n in range(3)))
    assert statuses == [401, 401, 401]
    assert asyncio.get_running_loop().time() - started >= 3.0  # one a second, not at once


async def test_under_tls_gatekeeper_serve_sets_secure_cookies(
    project_factory: Callable[..., Any], tmp_path: Any
):
    import ssl

    from tests.test_abuse_http import _free_port, _project, _self_signed, _serve
    from tests.uikit import token_entries

    cert, key = _self_signed(tmp_path)
    tls = {"cert_file": cert.name, "key_file": key.name}
    project = _project(project_factory, tokens=token_entries(), tls=tls)
    port = _free_port()
    process = _serve(project, port)
    trusted = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            for _ in range(150):
                try:
                    async with session.get(base + "/ui/login", ssl=trusted) as response:
                        login = response.headers.getall("Set-Cookie")
                        csrf = CSRF.search(await response.text())
                        break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None
                    await asyncio.sleep(0.1)
            assert csrf is not None
            assert all("Secure" in c for c in login)
            form = {"csrf": csrf.group(1), "token": TOKENS["reader"][0], "next": "/ui/"}
            async with session.post(
                base + "/ui/login", data=form, ssl=trusted, allow_redirects=False
            ) as response:
                assert response.status == 303
                cookies = response.headers.getall("Set-Cookie")
            signed_in = next(c for c in cookies if c.startswith("gk_session="))
            assert "Secure" in signed_in and "HttpOnly" in signed_in
    finally:
        process.terminate()
        process.communicate(timeout=30)


async def test_a_login_with_neither_the_csrf_cookie_nor_the_field_is_refused(site: Any):
    # a cross-site form carries no SameSite=Strict cookie and an empty field: "" == ""
    async with aiohttp.ClientSession() as stranger:
        form = {"csrf": "", "token": TOKENS["reader"][0], "next": "/ui/"}
        async with stranger.post(
            site.url + "/ui/login", data=form, allow_redirects=False
        ) as response:
            assert response.status == 403
            assert "gk_session" not in response.cookies


async def test_wrong_tokens_from_one_address_beyond_a_few_waiting_are_refused_at_once(
    site: Any, anon: Browserless
):
    from gatekeeper.ui.handlers import SESSIONS_KEY
    from gatekeeper.ui.sessions import MAX_FAILED_WAITING

    csrf = await anon.csrf("/ui/login")
    cookie = {"Cookie": f"gk_login={csrf}"}  # each answer sets a fresh one: keep the first

    async def sign_in(token: str) -> int:
        form = {"csrf": csrf, "token": token, "next": "/ui/"}
        async with site.session.post(  # its jar keeps no cookie of an IP address
            site.url + "/ui/login", data=form, headers=cookie, allow_redirects=False
        ) as response:
            return response.status

    waiting = [asyncio.create_task(sign_in(f"gk_guess{n}")) for n in range(MAX_FAILED_WAITING)]
    sessions = site.runner.app[SESSIONS_KEY]
    while sessions.failures_waiting("127.0.0.1") < MAX_FAILED_WAITING:
        await asyncio.sleep(0.01)  # the first guesses are waiting their turn
    more = await asyncio.gather(*(sign_in(f"gk_more{n}") for n in range(3)))
    right = await sign_in(TOKENS["reader"][0])  # not even checked while the queue is full
    assert more == [429, 429, 429] and right == 429
    assert await asyncio.gather(*waiting) == [401] * MAX_FAILED_WAITING
    assert await sign_in(TOKENS["reader"][0]) == 303


async def test_one_token_signing_in_over_and_over_does_not_sign_others_out(
    site: Any, alice: Browserless
):
    from gatekeeper.ui.handlers import SESSIONS_KEY
    from gatekeeper.ui.sessions import MAX_SESSIONS_PER_TOKEN

    sessions = site.runner.app[SESSIONS_KEY]
    sessions.max_sessions = MAX_SESSIONS_PER_TOKEN * 2  # a smaller table, filled sooner
    csrf = await alice.csrf("/ui/login")
    cookie = {"Cookie": f"gk_login={csrf}"}
    form = {"csrf": csrf, "token": TOKENS["reader"][0], "next": "/ui/"}
    ids = []
    for _ in range(sessions.max_sessions):
        async with site.session.post(  # its jar keeps no cookie of an IP address
            site.url + "/ui/login", data=form, headers=cookie, allow_redirects=False
        ) as response:
            assert response.status == 303
            ids.append(response.cookies["gk_session"].value)
    _, text = await alice.page("/ui/projects/tower-a")
    assert "tower-a/design-release" in text  # alice is still signed in
    for session_id, live in ((ids[0], False), (ids[-1], True)):
        async with site.session.get(
            site.url + "/ui/",
            headers={"Cookie": f"gk_session={session_id}"},
            allow_redirects=False,
        ) as response:
            assert (response.status == 200) is live


async def test_a_token_changed_by_a_reload_loses_its_rights_on_the_page_at_once(
    site: Any, receiver: Any, anon: Browserless, tmp_path: Any
):
    from tests.conftest import config_text
    from tests.uikit import token_entries

    await anon.sign_in("root")
    _, text = await anon.page("/ui/projects/tower-a")
    assert 'value="pause"' in text
    csrf = await anon.csrf("/ui/projects/tower-a")
    entries = token_entries()
    for entry in entries:
        if entry["subject"] == "root":
            entry["scopes"] = ["read"]  # the same token, no longer admin
    (tmp_path / "gatekeeper.yaml").write_text(config_text(receiver.url, tokens=entries))
    assert await site.daemon.reload() is True
    _, text = await anon.page("/ui/projects/tower-a")
    assert 'value="pause"' not in text and 'name="act"' not in text
    form = {"csrf": csrf, "rule": "tower-a/design-release", "act": "pause", "reason": "x"}
    assert (await anon.post("/ui/act", form)).status == 403
    entries = [e for e in entries if e["subject"] != "root"]  # and then revoked
    (tmp_path / "gatekeeper.yaml").write_text(config_text(receiver.url, tokens=entries))
    assert await site.daemon.reload() is True
    _, text = await anon.page("/ui/projects/tower-a")
    assert "Sign in" in text and "tower-a/design-release" not in text
    response = await anon.post("/ui/act", form)
    assert response.status == 303 and response.headers["Location"].startswith("/ui/login")
    body = await api_get(site, "/v1/rules/tower-a/design-release", "alice")
    assert body["paused"] is False


async def test_every_page_forbids_framing_sniffing_caching_and_inline_scripts(
    alice: Browserless, anon: Browserless
):
    for client_, path in (
        (alice, "/ui/"),
        (alice, "/ui/projects/tower-a/rules/tower-a/design-release"),
        (alice, "/ui/projects/nope"),
        (anon, "/ui/login"),
    ):
        async with client_.session.get(client_.url + path) as response:
            headers = response.headers
            assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
            assert "script-src 'self';" in headers["Content-Security-Policy"], path
            assert headers["X-Frame-Options"] == "DENY", path  # browsers without CSP 2
            assert headers["X-Content-Type-Options"] == "nosniff", path
            assert headers["Cache-Control"] == "no-store", path
            assert headers["Referrer-Policy"] == "same-origin", path


async def test_signing_out_ends_the_session_even_while_its_token_is_revoked(
    site: Any, receiver: Any, anon: Browserless, tmp_path: Any
):
    from tests.conftest import config_text
    from tests.uikit import token_entries

    await anon.sign_in("root")
    csrf = await anon.csrf("/ui/projects/tower-a")
    cookie = next(c.value for c in anon.session.cookie_jar if c.key == "gk_session")
    config = tmp_path / "gatekeeper.yaml"
    kept = config.read_text()
    others = [e for e in token_entries() if e["subject"] != "root"]
    config.write_text(config_text(receiver.url, tokens=others))
    assert await site.daemon.reload() is True
    assert (await anon.post("/ui/logout", {"csrf": csrf})).status == 303
    config.write_text(kept)  # the token comes back
    assert await site.daemon.reload() is True
    async with site.session.get(
        site.url + "/ui/", headers={"Cookie": f"gk_session={cookie}"}, allow_redirects=False
    ) as response:
        assert response.status == 303  # signed out stays signed out


async def test_signing_in_again_ends_the_session_the_browser_had(site: Any, alice: Browserless):
    before = next(c.value for c in alice.session.cookie_jar if c.key == "gk_session")
    assert (await alice.sign_in("bob")).status == 303
    after = next(c.value for c in alice.session.cookie_jar if c.key == "gk_session")
    assert after != before  # a new id at each sign-in
    async with site.session.get(
        site.url + "/ui/", headers={"Cookie": f"gk_session={before}"}, allow_redirects=False
    ) as response:
        assert response.status == 303


async def test_acts_from_the_page_count_against_the_token_s_rate_limit(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any], receiver: Any
):
    from tests.uikit import token_entries

    entries = token_entries()
    for entry in entries:
        if entry["subject"] == "alice":
            entry["rate_limit"] = {"requests_per_s": 0.01, "burst": 2}
    project = project_factory(receiver.url, tokens=entries)
    project.write_rule("tower.yaml", RELEASE_RULE)
    running = await start_daemon(project, ui=True)
    await post_facts(running, GATE_FACTS)
    async for page in client(running):
        await page.sign_in("alice")
        csrf = await page.csrf("/ui/projects/tower-a")
        form = {"csrf": csrf, "rule": "tower-a/design-release", "back": "/ui/"}
        statuses = [
            (await page.post("/ui/approve", {**form, "decision": decision})).status
            for decision in ("approve", "withdraw", "approve")
        ]
        assert statuses == [303, 303, 429]  # as the API would answer the third
    rule = await api_get(running, "/v1/rules/tower-a/design-release")
    assert rule["explanation"]["approvals"]["approved_by"] == []


async def test_no_token_session_id_or_csrf_token_is_logged(
    site: Any, anon: Browserless, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    csrf = await anon.csrf("/ui/login")
    form = {"csrf": csrf, "token": "gk_wrong-guess-0123456789", "next": "/ui/?x=1"}
    assert (await anon.post("/ui/login", form)).status == 401
    assert (await anon.sign_in("root")).status == 303
    session_id = next(c.value for c in anon.session.cookie_jar if c.key == "gk_session")
    csrf = await anon.csrf("/ui/projects/tower-a")
    form = {"csrf": csrf, "rule": "tower-a/design-release", "act": "pause",
            "reason": "bank audit", "back": "/ui/projects/tower-a"}  # fmt: skip
    assert (await anon.post("/ui/act", form)).status == 303
    assert (await anon.post("/ui/logout", {"csrf": csrf})).status == 303
    logged = caplog.text
    assert "POST /ui/act" in logged  # the access log is captured
    for secret in ("gk_wrong-guess", TOKENS["root"][0], session_id, csrf):
        assert secret not in logged


async def test_bad_queries_and_form_fields_are_the_error_page_not_json(
    site: Any, alice: Browserless
):
    for path in ("/ui/projects/tower-a?page=-1", "/ui/projects/tower-a?limit=99999999999"):
        async with alice.session.get(alice.url + path) as response:
            text = await response.text()
            assert response.status == 400, path
            assert response.content_type == "text/html", path
            assert "unknown query parameter" in text and "Traceback" not in text, path
            assert response.headers["X-Frame-Options"] == "DENY"
    csrf = await alice.csrf("/ui/projects/tower-a")
    form = {"csrf": csrf, "rule": "tower-a/design-release", "decision": "approve",
            "back": "/ui/" + "x" * 300}  # fmt: skip
    response = await alice.post("/ui/approve", form)
    assert response.status == 400 and response.content_type == "text/html"
    assert "back is longer than 256 characters" in await response.text()
    rule = await api_get(site, "/v1/rules/tower-a/design-release")
    assert rule["explanation"]["approvals"]["approved_by"] == []  # refused, not done


async def test_a_trickled_login_body_is_the_408_page_and_the_connection_closed(
    project_factory: Callable[..., Any],
):
    from aiohttp import web

    from gatekeeper.config import load_config
    from gatekeeper.http.app import create_app
    from gatekeeper.http.limits import CONNECTIONS_KEY, GuardedSite
    from gatekeeper.runtime.daemon import Daemon
    from gatekeeper.ui import mount
    from tests.conftest import ENV
    from tests.test_abuse_http import _project, _read_all
    from tests.uikit import token_entries

    project = _project(project_factory, tokens=token_entries(), body_read_timeout_s=1)
    config = load_config(project.config_path)
    app = create_app(Daemon(config, ENV), body_read_timeout_s=config.body_read_timeout_s)
    mount(app)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    try:
        site = GuardedSite(runner, "127.0.0.1", 0, runner.app[CONNECTIONS_KEY])
        await site.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(
            b"POST /ui/login HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 40\r\n\r\ntoken="
        )
        await writer.drain()
        answer = await _read_all(reader, within_s=5)  # until the daemon closes it
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"text/html" in answer and b"body" in answer
        writer.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "elsewhere",
    ["https://evil.example/", "//evil.example/ui/", "/\\evil.example", "/ui/\\/evil.example",
     "javascript:alert(1)", "/v1/export", "/ui/\r\nSet-Cookie: x=1", ""],
)  # fmt: skip
async def test_sign_in_and_forms_never_redirect_off_the_status_page(
    anon: Browserless, elsewhere: str
):
    csrf = await anon.csrf("/ui/login?next=" + quote(elsewhere))
    form = {"csrf": csrf, "token": TOKENS["root"][0], "next": elsewhere}
    response = await anon.post("/ui/login", form)
    assert response.status == 303
    assert response.headers["Location"] == "/ui/"
    assert "x=1" not in "".join(response.headers.getall("Set-Cookie"))
    csrf = await anon.csrf("/ui/projects/tower-a")
    form = {"csrf": csrf, "rule": "tower-a/design-release", "act": "pause", "reason": "r",
            "back": elsewhere}  # fmt: skip
    for act in ("pause", "resume"):
        response = await anon.post("/ui/act", {**form, "act": act})
        assert response.status == 303
        assert response.headers["Location"] == "/ui/"


async def test_without_tokens_no_form_acts_whatever_it_carries(
    project_factory: Callable[..., Any], start_daemon: Callable[..., Any], receiver: Any
):
    project = project_factory(receiver.url)
    project.write_rule("tower.yaml", RELEASE_RULE)
    running = await start_daemon(project, ui=True)
    await post_facts(running, GATE_FACTS)  # no tokens: the API takes it as is
    rule = "tower-a/design-release"
    for path, form in (
        ("/ui/approve", {"rule": rule, "decision": "approve"}),
        ("/ui/act", {"rule": rule, "act": "pause", "reason": "x"}),
        ("/ui/retry", {"action_id": "act_1", "reason": "x"}),
    ):
        for csrf in ("", "anything"):
            async with running.session.post(
                running.url + path, data={**form, "csrf": csrf}, allow_redirects=False
            ) as response:
                assert response.status == 403, path
    async with running.session.post(
        running.url + "/ui/login", data={"token": "gk_x", "csrf": ""}, allow_redirects=False
    ) as response:
        assert response.status == 403 and "gk_session" not in response.cookies
    _, body = await running.get("/v1/rules/tower-a/design-release")
    assert body["paused"] is False and body["explanation"]["approvals"]["approved_by"] == []
