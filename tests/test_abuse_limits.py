"""Abuse cases for the rules side: limits that must not surprise, special files in the rules
directory, secrets written where a variable name belongs, and CI request limits."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.cli.check import run_check
from gatekeeper.config import ConfigError, load_config, looks_like_secret
from gatekeeper.expr import ExpressionError, compile_condition
from gatekeeper.rules.loader import (
    MAX_RULE_FILE_BYTES,
    load_rule_paths,
    load_rule_texts,
    load_rules_dir,
)

from .conftest import DEPLOY_RULE, Project, Receiver

# ---------------------------------------------------------------------------------------------
# Limits that surprise


def test_eight_thousand_rules_without_aliases_are_accepted() -> None:
    rule = (
        "- id: many/r{i}\n"
        "  project: tower-a\n"
        "  when: task.t{i}.done and milestone.m{i}.status == 'approved'\n"
        "  actions:\n"
        "    - notify: {{target: site-ops, message: 'rule {i} fired'}}\n"
    )
    text = "".join(rule.format(i=i) for i in range(8_000))
    result = load_rule_texts({"many.yaml": text}, None)
    assert not result.problems
    assert result.ruleset is not None
    assert len(result.ruleset.rules) == 8_000


def test_many_rules_with_one_alias_are_accepted_but_a_bomb_is_not() -> None:
    rule = "- id: many/r{i}\n  project: tower-a\n  when: task.t{i}.done\n  actions: *acts\n"
    head = "- id: many/first\n  project: tower-a\n  when: task.t.done\n"
    head += "  actions: &acts\n    - pipeline: {target: ci-construction-docs, ref: main}\n"
    text = head + "".join(rule.format(i=i) for i in range(8_000))
    result = load_rule_texts({"many.yaml": text}, None)
    assert not [p for p in result.problems if "aliases" in p.message]
    bomb = ["- id: many/bomb", "  bomb:", "    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    result = load_rule_texts({"bomb.yaml": text + "\n".join(bomb) + "\n"}, None)
    assert "too large once aliases are expanded" in result.problems[0].message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("len('a' * 10**8) > 1", "result would hold 100000000 items; the limit is 10000"),
        ("len([1] * 10**9) > 1", "the limit is 10000"),
        ("len(10**9 * (1, 2)) > 1", "the limit is 10000"),
        ("('x' * 6000) + ('y' * 6000) == ''", "the limit is 10000"),
        ("((2**64)**64)**64 > 0", "exceed 10000 bits"),
        ("-(2**64)**64 * (2**64)**64 * (2**64)**64 < 0", "exceed 10000 bits"),
    ],
)
def test_literal_unbounded_work_is_refused_by_check(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as raised:
        compile_condition(text)
    assert any(message in problem.message for problem in raised.value.problems)


def test_bounded_literal_work_still_compiles() -> None:
    for text in ("len('a' * 10000) == 10000", "2 ** 64 > 1", "[0] * 100 + [1] * 100 != []"):
        compile_condition(text)


def test_check_refuses_what_run_time_refuses(tmp_path: Path) -> None:
    text = 'id: big/x\nproject: tower-a\nwhen: len("a"*10**8) > 1\n'
    text += "actions:\n  - pipeline: {target: ci-construction-docs, ref: main}\n"
    result = load_rule_texts({"big.yaml": text}, None)
    assert [p.message for p in result.problems if "limit is 10000" in p.message]


# ---------------------------------------------------------------------------------------------
# Special files in the rules directory

RULE = """\
id: tower-a/deploy-docs
project: tower-a
when: task["T-17"].status == "completed"
fire: each_time
actions:
  - pipeline: {target: ci, ref: main, inputs: {stage: docs}}
"""


def special_rules_dir(folder: Path) -> Path:
    """A rules directory holding a good rule, a link to it, a FIFO, a link to /dev/zero, a
    file over the size cap and a link to a file outside the directory."""
    folder.mkdir()
    (folder / "good.yaml").write_text(RULE)
    (folder / "again.yml").symlink_to(folder / "good.yaml")
    os.mkfifo(folder / "pipe.yaml")
    (folder / "zero.yaml").symlink_to("/dev/zero")
    with (folder / "huge.yaml").open("wb") as huge:
        huge.truncate(MAX_RULE_FILE_BYTES + 1)
    (folder.parent / "elsewhere.yaml").write_text(RULE.replace("deploy-docs", "elsewhere"))
    (folder / "out.yaml").symlink_to(folder.parent / "elsewhere.yaml")
    return folder


SPECIAL_PROBLEMS = {
    ("huge.yaml", "not read: 2,097,153 bytes, over the limit of 2,097,152 bytes (2 MiB)"),
    ("out.yaml", "not read: a symbolic link to a file outside the rules directory"),
    ("pipe.yaml", "not read: not a regular file (a FIFO)"),
    ("zero.yaml", "not read: a symbolic link to a file outside the rules directory"),
}


@pytest.mark.timeout(20)
def test_special_files_are_problems_of_their_own(tmp_path: Path) -> None:
    rules = special_rules_dir(tmp_path / "rules")
    result = load_rules_dir(rules, None)
    found = {(p.file, p.message) for p in result.problems}
    # the good file and the link to it inside the directory are read (one id, twice)
    duplicate = {(file, message) for file, message in found if "not read" not in message}
    assert [message for _, message in duplicate] == [
        "duplicate rule id 'tower-a/deploy-docs': already used at again.yml:1:5"
    ]
    assert found - duplicate == SPECIAL_PROBLEMS
    named = load_rule_paths([rules / "zero.yaml", rules / "pipe.yaml"], None)
    assert [p.message for p in named.problems] == [
        "not read: not a regular file (a FIFO)",
        "not read: not a regular file (a character device)",
    ]


@pytest.mark.timeout(40)
def test_check_names_each_special_file_and_exits_1(tmp_path: Path) -> None:
    rules = special_rules_dir(tmp_path / "rules")
    done = subprocess.run(
        [sys.executable, "-m", "gatekeeper", "check", str(rules)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    for file, message in SPECIAL_PROBLEMS:
        assert f"rules/{file}: {message}" in done.stdout
    assert "MemoryError" not in done.stdout + done.stderr


@pytest.mark.timeout(40)
async def test_reload_refuses_special_files_and_keeps_serving(
    project_factory: Callable[..., Project], receiver: Receiver, start_daemon: Any
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    _, before = await gk.get("/v1/rules")
    os.mkfifo(project.rules_dir / "pipe.yaml")
    (project.rules_dir / "zero.yaml").symlink_to("/dev/zero")
    reloading = asyncio.ensure_future(gk.daemon.reload())
    status, _ = await gk.get("/healthz")  # the loop serves while the files are read
    assert status == 200
    assert await asyncio.wait_for(reloading, 20) is False
    _, after = await gk.get("/v1/rules")
    assert after["reload"]["ok"] is False
    assert after["ruleset"]["version"] == before["ruleset"]["version"]
    problems = {(p["file"], p["message"]) for p in after["reload"]["problems"]}
    assert problems == {
        ("pipe.yaml", "not read: not a regular file (a FIFO)"),
        ("zero.yaml", "not read: a symbolic link to a file outside the rules directory"),
    }
    os.unlink(project.rules_dir / "pipe.yaml")
    os.unlink(project.rules_dir / "zero.yaml")
    assert await gk.daemon.reload() is True


# ---------------------------------------------------------------------------------------------
# A secret written where the name of its environment variable belongs

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GITHUB_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
LEAKS = (WEBHOOK_SECRET, GITHUB_TOKEN, AWS_KEY_ID, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "16C7e42F")
SECRET_CONFIG = f"""\
rules_dir: rules
targets:
  bank: {{url: https://bank.example/api, secret_env: {WEBHOOK_SECRET}}}
  gh: {{kind: github_actions, repo: o/r, workflow: w.yml, token_env: {GITHUB_TOKEN}}}
  gh2: {{kind: github_actions, repo: o/r, workflow: w.yml, token_env: {AWS_KEY_ID}}}
  fine: {{url: https://bank.example/api, secret_env: BANK_SECRET_2}}
hooks:
  gl: {{kind: gitlab, secret_env: "glpat-{GITHUB_TOKEN}", project: tower-a,
        facts: [{{kind: pipeline, id: x, event: Pipeline Hook}}]}}
"""


def assert_no_secret(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text


def test_a_secret_in_place_of_a_variable_name_is_named_by_key_only(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text(SECRET_CONFIG)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert_no_secret(str(raised.value))
    flagged = {p.path for p in raised.value.problems if "looks like a secret" in p.message}
    assert flagged == {
        "targets.bank.secret_env",
        "targets.gh.token_env",
        "targets.gh2.token_env",
        "hooks.gl.secret_env",
    }
    assert all("the value is not shown" in p.message for p in raised.value.problems)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("BANK_SECRET", False),
        ("GITHUB_TOKEN", False),
        ("CI_SECRET_2026", False),
        ("TOWER_A_CONSTRUCTION_DOCS_TOKEN", False),
        (AWS_KEY_ID, True),
        ("A1B2C3D4E5F6A7B8C9D0", True),
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", True),
        ("whsec_abc", True),
        ("glpat-abc", True),
    ],
)
def test_looks_like_secret(name: str, secret: bool) -> None:
    assert looks_like_secret(name) is secret


@pytest.mark.timeout(40)
def test_check_output_never_shows_the_secret(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "gatekeeper.yaml").write_text(SECRET_CONFIG)
    for fmt in ("text", "json", "github"):
        done = subprocess.run(
            [sys.executable, "-m", "gatekeeper", "check", "-c", "gatekeeper.yaml", "--format", fmt],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=tmp_path,
        )
        assert done.returncode != 0
        assert "looks like a secret" in done.stdout + done.stderr
        assert_no_secret(done.stdout + done.stderr)


async def test_reload_problem_and_log_never_show_the_secret(
    project_factory: Callable[..., Project],
    receiver: Receiver,
    start_daemon: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = project_factory(receiver.url)
    project.write_rule("deploy.yaml", DEPLOY_RULE)
    gk = await start_daemon(project)
    good = project.config_path.read_text()
    project.config_path.write_text(
        good.replace("secret_env: CI_SECRET", f"secret_env: {WEBHOOK_SECRET}")
    )
    with caplog.at_level(logging.DEBUG):
        assert await gk.daemon.reload() is False
    _, rules = await gk.get("/v1/rules")
    assert rules["reload"]["ok"] is False
    assert [p["path"] for p in rules["reload"]["problems"]] == ["targets.ci.secret_env"]
    assert "looks like a secret" in rules["reload"]["problems"][0]["message"]
    assert_no_secret(json.dumps(rules))
    assert_no_secret(caplog.text)
    assert_no_secret(json.dumps([record.__dict__ for record in caplog.records], default=str))


# ---------------------------------------------------------------------------------------------
# The documented limits of the CI services pipeline actions start

CI_CONFIG = """\
rules_dir: rules
targets:
  gh: {kind: github_actions, repo: acme/tower, workflow: docs.yml, token_env: GH_TOKEN}
  gl: {kind: gitlab, project_id: "1234", token_env: GL_TRIGGER}
  jk: {kind: jenkins, url: "https://ci.example/jenkins", job: docs/build, user: bot,
       token_env: JENKINS_TOKEN}
"""


def pipeline_rule(target: str, inputs: dict[str, str]) -> str:
    body = json.dumps({"target": target, "ref": "main", "inputs": inputs})
    return (
        f"id: ci/{target}\nproject: tower-a\nwhen: task.t1.done\nactions:\n  - pipeline: {body}\n"
    )


def ci_problems(tmp_path: Path, target: str, inputs: dict[str, str]) -> list[str]:
    (tmp_path / "gatekeeper.yaml").write_text(CI_CONFIG)
    config = load_config(tmp_path / "gatekeeper.yaml")
    result = load_rule_texts({"ci.yaml": pipeline_rule(target, inputs)}, config)
    return [f"{p.path}: {p.message}" for p in result.problems]


def test_github_dispatch_takes_at_most_25_inputs(tmp_path: Path) -> None:
    inputs = {f"in{i}": "x" for i in range(25)}
    assert ci_problems(tmp_path, "gh", inputs) == []
    inputs["in25"] = "x"
    assert ci_problems(tmp_path, "gh", inputs) == [
        "actions[0].pipeline.inputs: 26 inputs; GitHub's workflow_dispatch takes at most 25 "
        "(target 'gh')"
    ]


def test_github_dispatch_inputs_payload_is_bounded(tmp_path: Path) -> None:
    found = ci_problems(tmp_path, "gh", {"notes": "x" * 65_530})
    assert found == [
        "actions[0].pipeline.inputs: the inputs are 65,542 characters as JSON; GitHub's "
        "workflow_dispatch takes at most 65,535 (target 'gh')"
    ]


def test_gitlab_variable_names_are_letters_digits_and_underscore(tmp_path: Path) -> None:
    assert ci_problems(tmp_path, "gl", {"STAGE_2": "docs", "k" * 255: "x"}) == []
    found = ci_problems(tmp_path, "gl", {"stage-2": "docs", "k" * 256: "x"})
    assert len(found) == 1
    assert found[0].startswith(
        "actions[0].pipeline.inputs: GitLab pipeline variable names are letters, digits and _"
    )
    assert "'stage-2'" in found[0]


def test_jenkins_parameters_must_fit_the_request_line(tmp_path: Path) -> None:
    assert ci_problems(tmp_path, "jk", {"NOTES": "x" * 6000}) == []
    found = ci_problems(tmp_path, "jk", {"NOTES": "x" * 7200})
    assert len(found) == 1
    assert "Jenkins refuses a request header over 8,192 bytes" in found[0]


def test_check_refuses_26_github_inputs(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "gatekeeper.yaml").write_text(CI_CONFIG)
    inputs = {f"in{i}": "x" for i in range(26)}
    (tmp_path / "rules" / "ci.yaml").write_text(pipeline_rule("gh", inputs))
    out = io.StringIO()
    code = run_check([tmp_path / "rules"], load_config(tmp_path / "gatekeeper.yaml"), "text", out)
    assert code == 1
    assert "26 inputs; GitHub's workflow_dispatch takes at most 25" in out.getvalue()
