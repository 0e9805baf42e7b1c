"""Pipeline targets speaking the real CI APIs: GitHub Actions ``workflow_dispatch``, GitLab
pipeline triggers and Jenkins ``buildWithParameters``.

Fake GitHub, GitLab and Jenkins servers on 127.0.0.1 accept a request only when its method,
path, headers (auth), body, form or query are exactly what each documented API expects, and
answer with that API's success status (204, 201, 201); the daemon fires a rule and must get
every run started."""

from __future__ import annotations

import asyncio
import base64
import json
import textwrap
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gatekeeper.config import (
    ConfigError,
    Target,
    load_config,
    resolve_secrets,
)
from gatekeeper.delivery.requests import build_request
from gatekeeper.store.records import OutboxEntry

from .conftest import ENV, SECRET, Project, fact, outbox_entry

GH_TOKEN = "ghp_test-token-0123456789"
GL_TOKEN = "glptt-trigger-token-0123"
JK_TOKEN = "11aa22bb33cc44dd55ee66ff77"
PIPELINE_ENV = {**ENV, "GH_TOKEN": GH_TOKEN, "GL_TRIGGER": GL_TOKEN, "JENKINS_TOKEN": JK_TOKEN}
NOW = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def entry(kind: str, payload: dict[str, Any], target: str = "ci") -> OutboxEntry:
    entry: OutboxEntry = outbox_entry(kind, payload, target=target, rule_id="tower-a/deploy-docs")
    return entry


PIPELINE = {"project": "tower-a", "ref": "main", "inputs": {"stage": "docs & more", "n": "1"}}


# -- build_request, unit ------------------------------------------------------------------


def test_github_actions_workflow_dispatch_request() -> None:
    target = Target(
        name="gh", kind="github_actions", repo="acme/tower", workflow="docs.yml", token_env="T"
    )
    request = build_request(entry("pipeline", PIPELINE), target, GH_TOKEN, NOW)
    assert request.method == "POST"
    assert (
        request.url
        == "https://api.github.com/repos/acme/tower/actions/workflows/docs.yml/dispatches"
    )
    assert request.headers["Accept"] == "application/vnd.github+json"
    assert request.headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert request.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("gatekeeper/")
    assert json.loads(request.body) == {"ref": "main", "inputs": {"stage": "docs & more", "n": "1"}}
    assert not any(h.lower().startswith("webhook-") for h in request.headers)  # not signed


def test_github_enterprise_api_url_and_numeric_workflow_id() -> None:
    target = Target(
        name="gh",
        kind="github_actions",
        repo="acme/tower",
        workflow="161335",
        api_url="https://ghe.example/api/v3/",
    )
    payload = {"project": "tower-a", "ref": "v1.2.0", "inputs": {}}
    request = build_request(entry("pipeline", payload), target, GH_TOKEN, NOW)
    assert (
        request.url
        == "https://ghe.example/api/v3/repos/acme/tower/actions/workflows/161335/dispatches"
    )
    assert json.loads(request.body) == {"ref": "v1.2.0", "inputs": {}}


def test_gitlab_trigger_pipeline_request() -> None:
    target = Target(name="gl", kind="gitlab", project_id="acme/sub/tower", token_env="T")
    request = build_request(entry("pipeline", PIPELINE), target, GL_TOKEN, NOW)
    assert request.method == "POST"
    assert request.url == "https://gitlab.com/api/v4/projects/acme%2Fsub%2Ftower/trigger/pipeline"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in request.headers  # the trigger token is a form field
    assert urllib.parse.parse_qsl(request.body.decode(), strict_parsing=True) == [
        ("token", GL_TOKEN),
        ("ref", "main"),
        ("variables[stage]", "docs & more"),
        ("variables[n]", "1"),
    ]


@pytest.mark.parametrize("project_id", ["1234", "acme%2Ftower", "acme/tower"])
def test_gitlab_project_id_or_path_encoded_once(project_id: str) -> None:
    target = Target(name="gl", kind="gitlab", project_id=project_id, api_url="http://gl/api/v4")
    request = build_request(entry("pipeline", PIPELINE), target, GL_TOKEN, NOW)
    expected = "1234" if project_id == "1234" else "acme%2Ftower"
    assert request.url == f"http://gl/api/v4/projects/{expected}/trigger/pipeline"


def test_jenkins_build_with_parameters_request() -> None:
    target = Target(
        name="jk",
        kind="jenkins",
        url="https://ci.example/jenkins/",
        job="docs/build docs",
        user="gatekeeper-bot",
        token_env="T",
    )
    request = build_request(entry("pipeline", PIPELINE), target, JK_TOKEN, NOW)
    assert request.method == "POST"
    url = urllib.parse.urlsplit(request.url)
    assert (url.scheme, url.netloc) == ("https", "ci.example")
    assert url.path == "/jenkins/job/docs/job/build%20docs/buildWithParameters"
    assert urllib.parse.parse_qsl(url.query, strict_parsing=True) == [
        ("ref", "main"),
        ("stage", "docs & more"),
        ("n", "1"),
    ]
    basic = base64.b64encode(f"gatekeeper-bot:{JK_TOKEN}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {basic}"
    assert request.body == b""


def test_jenkins_ref_parameter_and_inputs_win() -> None:
    target = Target(name="jk", kind="jenkins", url="http://j", job="deploy", user="u")
    renamed = Target(**{**target.__dict__, "ref_parameter": "BRANCH"})
    request = build_request(entry("pipeline", PIPELINE), renamed, JK_TOKEN, NOW)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query))
    assert query == {"BRANCH": "main", "stage": "docs & more", "n": "1"}
    payload = {**PIPELINE, "inputs": {"ref": "release/1.x"}}
    request = build_request(entry("pipeline", payload), target, JK_TOKEN, NOW)
    assert request.url == "http://j/job/deploy/buildWithParameters?ref=release%2F1.x"


@pytest.mark.parametrize("kind", ["release", "notify"])
def test_ci_targets_refuse_other_actions(kind: str) -> None:
    target = Target(name="gh", kind="github_actions", repo="a/b", workflow="x.yml")
    assert target.refusal(kind) is not None and "only starts pipelines" in str(target.refusal(kind))
    assert target.refusal("pipeline") is None
    assert Target(name="w", url="http://x", secret_env="S").refusal(kind) is None
    with pytest.raises(ValueError, match="only starts pipelines"):
        build_request(entry(kind, {"project": "tower-a", "message": "hi"}), target, "t", NOW)


def test_webhook_pipeline_stays_signed_generic_json() -> None:
    from standardwebhooks.webhooks import Webhook

    target = Target(name="ci", url="http://x/ci", secret_env="CI_SECRET")
    request = build_request(entry("pipeline", PIPELINE), target, SECRET, datetime.now(UTC))
    body = Webhook(SECRET).verify(request.body.decode(), dict(request.headers))
    assert body["type"] == "pipeline" and body["inputs"]["stage"] == "docs & more"


# -- configuration --------------------------------------------------------------------------


def write_config(tmp_path: Path, targets: str, extra: str = "") -> Path:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text("targets:\n" + textwrap.indent(textwrap.dedent(targets), "  ") + extra)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [f"{p.path}: {p.message}" for p in caught.value.problems]


def test_config_loads_every_target_kind_with_defaults(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            """\
            hook: {url: "http://x/h", secret_env: CI_SECRET}
            gh: {kind: github_actions, repo: acme/tower, workflow: docs.yml, token_env: GH_TOKEN}
            ghe: {kind: github_actions, repo: acme/tower, workflow: 42, token_env: GH_TOKEN,
                  api_url: "https://ghe.example/api/v3"}
            gl: {kind: gitlab, project_id: 1234, token_env: GL_TRIGGER}
            jk: {kind: jenkins, url: "https://ci.example/jenkins", job: docs/build,
                 user: bot, token_env: JENKINS_TOKEN, ref_parameter: BRANCH}
            """,
        )
    )
    targets = config.targets
    assert targets["hook"].kind == "webhook" and targets["hook"].secret_variable == "CI_SECRET"
    assert targets["gh"].api_url == "https://api.github.com"
    assert targets["ghe"].workflow == "42" and targets["ghe"].base_url.endswith("/api/v3")
    assert targets["gl"].project_id == "1234"
    assert targets["gl"].base_url == "https://gitlab.com/api/v4"
    assert (targets["jk"].job, targets["jk"].user, targets["jk"].ref_parameter) == (
        "docs/build",
        "bot",
        "BRANCH",
    )
    assert targets["jk"].secret_variable == "JENKINS_TOKEN"
    secrets = resolve_secrets(config, PIPELINE_ENV)
    assert secrets == {
        "hook": SECRET,
        "gh": GH_TOKEN,
        "ghe": GH_TOKEN,
        "gl": GL_TOKEN,
        "jk": JK_TOKEN,
    }


def test_config_requires_each_kind_fields_and_refuses_foreign_ones(tmp_path: Path) -> None:
    found = problems_of(
        write_config(
            tmp_path,
            """\
            hook: {url: "http://x/h"}
            gh: {kind: github_actions, repo: acme, workflow: docs.yml, token_env: GH_TOKEN,
                 secret_env: CI_SECRET}
            gl: {kind: gitlab, project_id: "acme/tower"}
            jk: {kind: jenkins, url: "https://ci.example", job: a, token_env: T, format: slack}
            """,
        )
    )
    assert "targets.hook: missing required key 'secret_env'" in found
    assert any(p.startswith("targets.gh.repo: 'acme' is not a GitHub repository") for p in found)
    assert any(
        p.startswith("targets.gh.secret_env: 'secret_env' is not a setting of github_actions")
        for p in found
    )
    assert "targets.gl: missing required key 'token_env'" in found
    assert "targets.jk: missing required key 'user'" in found
    assert any(
        p.startswith("targets.jk.format: 'format' is not a setting of jenkins") for p in found
    )
    assert len(found) == 6, found


def test_alert_target_must_be_a_webhook(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "gl: {kind: gitlab, project_id: 7, token_env: GL_TRIGGER}\n",
        "alert_target: gl\n",
    )
    assert problems_of(path) == [
        "alert_target: alert_target 'gl' is a gitlab target, which only starts pipelines; "
        "alerts are notify actions and need a webhook target"
    ]


def test_missing_tokens_are_named_never_their_values(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            """\
            gh: {kind: github_actions, repo: acme/tower, workflow: docs.yml, token_env: GH_TOKEN}
            gh2: {kind: github_actions, repo: acme/other, workflow: ci.yml, token_env: GH_TOKEN}
            gl: {kind: gitlab, project_id: 7, token_env: GL_TRIGGER}
            hook: {url: "http://x/h", secret_env: CI_SECRET}
            """,
        )
    )
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config, {"CI_SECRET": SECRET, "GL_TRIGGER": ""})
    messages = [(p.path, p.message) for p in caught.value.problems]
    assert messages == [
        (
            "targets.gh.token_env",
            "environment variable GH_TOKEN is not set (needed by targets 'gh', 'gh2')",
        ),
        (
            "targets.gl.token_env",
            "environment variable GL_TRIGGER is set but empty (needed by target 'gl')",
        ),
    ]
    # a token is not a Standard Webhooks secret: "whsec_"-looking tokens are not checked
    secrets = resolve_secrets(
        config, {"CI_SECRET": SECRET, "GH_TOKEN": "whsec_", "GL_TRIGGER": "x"}
    )
    assert secrets["gh"] == "whsec_"
    assert SECRET not in str(caught.value)


# -- fake CI services and the daemon, end to end --------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeCI:
    """GitHub, GitLab and Jenkins APIs under /github, /gitlab/api/v4 and /jenkins."""

    url: str = ""
    seen: dict[str, list[Seen]] = field(
        default_factory=lambda: {"github": [], "gitlab": [], "jenkins": []}
    )
    failures: dict[str, list[int]] = field(default_factory=dict)  # statuses to answer first
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def record(self, service: str, request: web.Request) -> int | None:
        self.seen[service].append(
            Seen(request.method, request.raw_path, dict(request.headers), await request.read())
        )
        self.arrived.set()
        queued = self.failures.get(service)
        return queued.pop(0) if queued else None

    async def github(self, request: web.Request) -> web.Response:
        forced = await self.record("github", request)
        if forced:
            return web.json_response({"message": "Server Error"}, status=forced)
        if request.headers.get("Authorization") != f"Bearer {GH_TOKEN}":
            return web.json_response({"message": "Bad credentials"}, status=401)
        if request.match_info["workflow"] != "docs.yml" or request.match_info["repo"] != "tower":
            return web.json_response({"message": "Not Found"}, status=404)
        body = await request.json()
        ok = (
            request.headers.get("Accept") == "application/vnd.github+json"
            and request.headers.get("X-GitHub-Api-Version") == "2022-11-28"
            and request.content_type == "application/json"
            and set(body) == {"ref", "inputs"}
            and all(isinstance(v, str) for v in body["inputs"].values())
        )
        if not ok:
            return web.json_response({"message": "Invalid request"}, status=422)
        return web.Response(status=204)

    async def gitlab(self, request: web.Request) -> web.Response:
        forced = await self.record("gitlab", request)
        if forced:
            return web.json_response({"message": "500 Internal Server Error"}, status=forced)
        form = await request.post()
        if form.get("token") != GL_TOKEN or not form.get("ref"):
            return web.json_response({"message": "404 Not Found"}, status=404)
        return web.json_response({"id": 4711, "ref": form["ref"], "status": "created"}, status=201)

    async def jenkins(self, request: web.Request) -> web.Response:
        forced = await self.record("jenkins", request)
        if forced:
            return web.Response(status=forced)
        basic = base64.b64encode(f"bot:{JK_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {basic}":
            return web.Response(status=401, text="Authentication required")
        return web.Response(status=201, headers={"Location": f"{self.url}/jenkins/queue/item/7/"})

    async def wait_for(self, service: str, count: int, timeout_s: float = 5.0) -> list[Seen]:
        async def enough() -> None:
            while len(self.seen[service]) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout_s)
        return self.seen[service]


@pytest.fixture
async def fake_ci() -> AsyncIterator[FakeCI]:
    ci = FakeCI()
    app = web.Application()
    app.router.add_post(
        "/github/repos/{owner}/{repo}/actions/workflows/{workflow}/dispatches", ci.github
    )
    app.router.add_post("/gitlab/api/v4/projects/{id}/trigger/pipeline", ci.gitlab)
    app.router.add_post("/jenkins/{job:.+}/buildWithParameters", ci.jenkins)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ci.url = f"http://127.0.0.1:{port}"
    yield ci
    await runner.cleanup()


CI_RULE = """\
id: tower-a/ci-runs
project: tower-a
when: task["T-17"].status == "completed"
fire: each_time
actions:
  - pipeline: {target: gh, ref: main, inputs: {stage: docs, note: "a & b=c"}}
  - pipeline: {target: gl, ref: release/1.x, inputs: {STAGE: docs}}
  - pipeline: {target: jk, ref: main, inputs: {STAGE: "as built"}}
"""


def ci_project(project_factory: Callable[..., Project], ci_url: str) -> Project:
    project = project_factory()
    delivery = "{max_attempts: 3, backoff_base_s: 0.05, backoff_cap_s: 0.1, timeout_s: 2}"
    project.config_path.write_text(
        textwrap.dedent(
            f"""\
            listen: 127.0.0.1:0
            database: state/gatekeeper.db
            rules_dir: rules
            targets:
              gh:
                kind: github_actions
                repo: acme/tower
                workflow: docs.yml
                token_env: GH_TOKEN
                api_url: {ci_url}/github
                delivery: {delivery}
              gl:
                kind: gitlab
                project_id: acme/tower
                token_env: GL_TRIGGER
                api_url: {ci_url}/gitlab/api/v4
                delivery: {delivery}
              jk:
                kind: jenkins
                url: {ci_url}/jenkins
                job: construction/as-built docs
                user: bot
                token_env: JENKINS_TOKEN
                ref_parameter: BRANCH
                delivery: {delivery}
            """
        )
    )
    project.write_rule("ci.yaml", CI_RULE)
    return project


async def delivered_actions(gk: Any, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        _, answer = await gk.get("/v1/actions")
        actions: list[dict[str, Any]] = answer["actions"]
        if sum(a["status"] == "delivered" for a in actions) >= count:
            return actions
        assert asyncio.get_running_loop().time() < deadline, actions
        await asyncio.sleep(0.05)


async def test_a_fact_starts_github_gitlab_and_jenkins_runs(
    project_factory: Callable[..., Project], fake_ci: FakeCI, start_daemon: Any
) -> None:
    project = ci_project(project_factory, fake_ci.url)
    gk = await start_daemon(project, env=PIPELINE_ENV)
    status, body = await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    assert status == 200, body

    [github] = await fake_ci.wait_for("github", 1)
    assert github.method == "POST"
    assert github.raw_path == "/github/repos/acme/tower/actions/workflows/docs.yml/dispatches"
    assert github.headers["Authorization"] == f"Bearer {GH_TOKEN}"
    assert github.headers["Accept"] == "application/vnd.github+json"
    assert github.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert json.loads(github.body) == {
        "ref": "main",
        "inputs": {"stage": "docs", "note": "a & b=c"},
    }

    [gitlab] = await fake_ci.wait_for("gitlab", 1)
    assert gitlab.raw_path == "/gitlab/api/v4/projects/acme%2Ftower/trigger/pipeline"
    assert gitlab.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert urllib.parse.parse_qsl(gitlab.body.decode(), strict_parsing=True) == [
        ("token", GL_TOKEN),
        ("ref", "release/1.x"),
        ("variables[STAGE]", "docs"),
    ]

    [jenkins] = await fake_ci.wait_for("jenkins", 1)
    path, _, query = jenkins.raw_path.partition("?")
    assert path == "/jenkins/job/construction/job/as-built%20docs/buildWithParameters"
    assert urllib.parse.parse_qsl(query, strict_parsing=True) == [
        ("BRANCH", "main"),
        ("STAGE", "as built"),
    ]
    assert (
        jenkins.headers["Authorization"]
        == "Basic " + base64.b64encode(f"bot:{JK_TOKEN}".encode()).decode()
    )

    actions = await delivered_actions(gk, 3)
    assert sorted(a["target"] for a in actions) == ["gh", "gl", "jk"]
    assert {a["status"] for a in actions} == {"delivered"}
    for request in (github, gitlab, jenkins):  # tokens travel only where each API wants them
        assert not any(h.lower().startswith("webhook-") for h in request.headers)
    assert GL_TOKEN not in github.body.decode() + jenkins.raw_path


async def test_a_failed_trigger_is_retried_with_the_same_request(
    project_factory: Callable[..., Project], fake_ci: FakeCI, start_daemon: Any
) -> None:
    fake_ci.failures = {"gitlab": [502], "github": [503]}
    project = ci_project(project_factory, fake_ci.url)
    gk = await start_daemon(project, env=PIPELINE_ENV)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    first, second = await fake_ci.wait_for("gitlab", 2)
    assert (first.raw_path, first.body) == (second.raw_path, second.body)
    first, second = await fake_ci.wait_for("github", 2)
    assert (first.raw_path, first.body) == (second.raw_path, second.body)
    actions = await delivered_actions(gk, 3)
    attempts = {a["target"]: a["attempts"] for a in actions}
    assert attempts == {"gh": 2, "gl": 2, "jk": 1}


async def test_a_wrong_token_is_a_dead_letter_that_names_no_secret(
    project_factory: Callable[..., Project], fake_ci: FakeCI, start_daemon: Any
) -> None:
    project = ci_project(project_factory, fake_ci.url)
    env = {**PIPELINE_ENV, "GH_TOKEN": "ghp_revoked"}
    gk = await start_daemon(project, env=env)
    await gk.post("/v1/facts", fact("task", "T-17", status="completed"))
    await fake_ci.wait_for("github", 1)
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        _, answer = await gk.get("/v1/actions?status=dead")
        if answer["actions"]:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    [dead] = answer["actions"]
    assert dead["target"] == "gh" and dead["attempts"] == 1  # a 401 is not retried
    assert "HTTP 401" in dead["last_error"] and "ghp_revoked" not in dead["last_error"]


def test_check_refuses_a_release_or_notify_to_a_ci_target(tmp_path: Path) -> None:
    from gatekeeper.rules.loader import load_rule_texts

    targets = """\
          gh: {kind: github_actions, repo: acme/tower, workflow: docs.yml, token_env: GH_TOKEN}
        """
    config = load_config(write_config(tmp_path, targets))
    rule = textwrap.dedent(
        """\
        id: tower-a/wrong-target
        project: tower-a
        when: task.t1.done
        actions:
          - notify: {target: gh, message: hi}
          - pipeline: {target: gh, ref: main}
        """
    )
    result = load_rule_texts({"r.yaml": rule}, config)
    [problem] = result.problems
    assert (problem.line, problem.path) == (5, "actions[0].notify.target")
    assert "only starts pipelines" in problem.message
