"""What the status page tests share: a deployment with tokens for each role, a release gate
that takes 2 of 3 approvals, and signing in over plain HTTP."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from gatekeeper.http.auth import hash_token

TOKENS = {
    "alice": ("gk_alice-token-0123456789", ["approve", "read"], ["tower-a"]),
    "bob": ("gk_bob-token-0123456789", ["approve", "read"], ["tower-a"]),
    "reader": ("gk_reader-token-0123456789", ["read"], ["*"]),
    "root": ("gk_root-token-0123456789", ["admin", "read"], ["*"]),
    "outsider": ("gk_outsider-token-0123456789", ["admin", "approve", "read"], ["tower-b"]),
    "writer": ("gk_writer-token-0123456789", ["facts:write"], ["*"]),
}
"""subject -> (token, scopes, projects)."""

RELEASE_RULE = """\
- id: tower-a/design-release
  description: Release design-phase escrow after approval, QA and 2 of 3 sign-offs
  project: tower-a
  when: >
    milestone.design.status == "approved"
    and quality_gate.qg1.passed
  approvals: {required: 2, from: [alice, bob, carol], expires_after: 7d}
  fire: once
  actions:
    - release: {target: escrow-bank, escrow: tower-a-escrow, amount: "5000.00",
                currency: USD, payee: acme-architects}
- id: tower-a/handover
  description: Hand over once the site is signed off and 3 days have passed
  project: tower-a
  when: >
    milestone.handover.status == "signed"
    and days_since(milestone.handover.signed_at) >= 3
  actions:
    - notify: {target: finance-chat, message: "Handover of ${project}"}
- id: tower-a/punch-items
  description: Tell the chat when a punch item closes
  project: tower-a
  for_each: punch
  when: item.data.closed
  actions:
    - notify: {target: finance-chat, message: "Punch item closed (${rule_id})"}
- id: tower-b/kickoff
  project: tower-b
  when: milestone.kickoff.done
  actions:
    - notify: {target: finance-chat, message: "Kickoff"}
"""


def token_entries() -> list[dict[str, Any]]:
    """The ``tokens:`` of gatekeeper.yaml for ``TOKENS``."""
    return [
        {"subject": subject, "sha256": hash_token(token), "scopes": scopes, "projects": projects}
        for subject, (token, scopes, projects) in TOKENS.items()
    ]


def bearer(subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[subject][0]}"}


GATE_FACTS = {
    "facts": [
        {"project": "tower-a", "kind": "milestone", "id": "design",
         "data": {"status": "approved"}},
        {"project": "tower-a", "kind": "quality_gate", "id": "qg1", "data": {"passed": True}},
    ]
}  # fmt: skip


async def start_site(project_factory: Any, start_daemon: Any, receiver: Any) -> Any:
    """A daemon serving the status page, with ``TOKENS``, ``RELEASE_RULE`` and the facts
    that open the release gate's conditions (its approvals still missing)."""
    project = project_factory(receiver.url, tokens=token_entries())
    project.write_rule("tower.yaml", RELEASE_RULE)
    running = await start_daemon(project, ui=True)
    await post_facts(running, GATE_FACTS)
    return running


async def post_facts(running: Any, body: dict[str, Any]) -> None:
    """Post facts to ``running`` as the writer (asserting they are accepted)."""
    async with running.session.post(
        running.url + "/v1/facts", json=body, headers=bearer("writer")
    ) as response:
        assert response.status == 200, await response.text()


async def approve(running: Any, subject: str, rule: str, decision: str = "approve") -> None:
    """``subject`` approves ``rule`` through the API."""
    body = {"rule": rule, "decision": decision}
    async with running.session.post(
        running.url + "/v1/approvals", json=body, headers=bearer(subject)
    ) as response:
        assert response.status == 200, await response.text()


async def api_get(running: Any, path: str, subject: str = "root") -> Any:
    """``GET path`` from the API as ``subject`` (asserting 200): its JSON."""
    async with running.session.get(running.url + path, headers=bearer(subject)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Browserless:
    """A plain HTTP client of the status page with its own cookie jar."""

    url: str
    session: aiohttp.ClientSession

    async def page(self, path: str) -> tuple[int, str]:
        async with self.session.get(self.url + path, allow_redirects=True) as response:
            return response.status, await response.text()

    async def csrf(self, path: str = "/ui/") -> str:
        _, text = await self.page(path)
        found = CSRF.search(text)
        assert found, text[:500]
        return found.group(1)

    async def post(self, path: str, form: dict[str, str]) -> aiohttp.ClientResponse:
        response = await self.session.post(self.url + path, data=form, allow_redirects=False)
        await response.read()
        return response

    async def sign_in(self, subject: str) -> aiohttp.ClientResponse:
        csrf = await self.csrf("/ui/login")
        token = TOKENS[subject][0] if subject in TOKENS else subject
        return await self.post("/ui/login", {"csrf": csrf, "token": token, "next": "/ui/"})
