"""The software-delivery example (``examples/software-delivery/``): its rules check clean and
pass their rule tests, every rule is expected to fire in some test, its GitHub deliveries are
GitHub's published ``workflow_run`` shape and map to the facts the rules read, its approvals
come from configured approvers with the ``approve`` scope, and its one command (``demo.py``:
the daemon, the Makefile's ``gatekeeper emit`` steps, signed hook deliveries, approvals over
HTTP and a verifying receiver) holds every expectation of ``steps.json``, and fails when one
does not hold."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from gatekeeper.config import load_config
from gatekeeper.runtime.hooks import HookRejected, handle

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "software-delivery"
RELEASE_RULE = "shop/milestone-release"
WAITING = (
    "rule shop/milestone-release (milestone_done m1) waits for approvals: 2 needed from "
    "product-owner, finance-lead, cto; 0 given"
)
"""The one notice finance-chat gets while milestone m1's release waits for its approvals."""
PUBLISHED = Path(__file__).parent / "data" / "hooks" / "published"
HOOK_SECRET = "example-github-webhook-secret"
needs_make = pytest.mark.skipif(
    shutil.which("make") is None, reason="make is not installed (.ci/run installs it)"
)


def gatekeeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatekeeper", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def demo_module() -> ModuleType:
    """``examples/software-delivery/demo.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("software_delivery_demo", EXAMPLE / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "demo.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def steps() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLE / "steps.json").read_text())
    return loaded


def rules_by_id() -> dict[str, dict[str, Any]]:
    """Every rule of the example as written, by id."""
    rules: dict[str, dict[str, Any]] = {}
    for path in (EXAMPLE / "rules").rglob("*.yaml"):
        if not path.name.endswith(".test.yaml"):
            loaded = yaml.safe_load(path.read_text())
            rules |= {r["id"]: r for r in (loaded if isinstance(loaded, list) else [loaded])}
    return rules


def story_actions(kind: str) -> list[dict[str, Any]]:
    """Every action of ``kind`` (make, github, approve) that ``steps.json`` plays, in order."""
    return [action for step in steps()["steps"] for action in step["do"] if kind in action]


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (list elements under ``[]``)."""
    paths = {prefix} if prefix else set()
    if isinstance(value, dict):
        for key, child in value.items():
            paths |= key_paths(child, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for child in value:
            paths |= key_paths(child, f"{prefix}[]")
    return paths


def test_the_example_rules_check_clean() -> None:
    result = gatekeeper("check", "-c", str(EXAMPLE / "gatekeeper.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("SUCCESS: 5 rules found in 3 files")


def test_the_example_rule_tests_pass_and_cover_every_rule() -> None:
    result = gatekeeper("test", "-c", str(EXAMPLE / "gatekeeper.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 cases passed in 3 files" in result.stdout
    rule_ids: set[str] = set()
    for path in (EXAMPLE / "rules").rglob("*.yaml"):
        if not path.name.endswith(".test.yaml"):
            loaded = yaml.safe_load(path.read_text())
            rule_ids |= {r["id"] for r in (loaded if isinstance(loaded, list) else [loaded])}
    expected_to_fire: set[str] = set()
    for path in (EXAMPLE / "rules").rglob("*.test.yaml"):
        for case in yaml.safe_load(path.read_text())["cases"]:
            for step in case["steps"]:
                expected_to_fire |= {f["rule"] for f in step.get("expect", {}).get("fired", [])}
    assert len(rule_ids) == 5
    assert rule_ids == expected_to_fire


def test_the_milestone_release_waits_for_two_of_three_approvers_and_tells_finance() -> None:
    approvals = rules_by_id()[RELEASE_RULE]["approvals"]
    assert approvals == {
        "required": 2,
        "from": ["product-owner", "finance-lead", "cto"],
        "expires_after": "7d",
        "notify": "finance-chat",
    }
    tests = yaml.safe_load((EXAMPLE / "rules" / "shop" / "milestones.test.yaml").read_text())
    given = [
        approval
        for case in tests["cases"]
        for step in case["steps"]
        for approval in step.get("approvals", [])
    ]
    assert given and all(a["rule"] == RELEASE_RULE and a.get("item") for a in given)
    assert {a["decision"] for a in given} == {"approve", "reject", "withdraw"}


def test_the_demo_approvers_have_approve_tokens_and_make_posts_with_a_facts_token() -> None:
    """Every approval the demo posts comes from an approver of the rule holding a token with
    ``approve`` in project shop; ``make`` posts with a token that may only write facts; the
    configured hashes are those of the README's published example tokens."""
    tokens = {t.subject: t for t in load_config(EXAMPLE / "gatekeeper.yaml").tokens}
    approvers = rules_by_id()[RELEASE_RULE]["approvals"]["from"]
    played = story_actions("approve")
    assert [(a["approve"]["by"], a["approve"]["item"], a.get("status", 200)) for a in played] == [
        ("product-owner", "m1", 200),
        ("product-owner", "m2", 404),
        ("finance-lead", "m1", 200),
    ]
    for action in played:
        assert action["approve"]["rule"] == RELEASE_RULE
        token = tokens[action["approve"]["by"]]
        assert token.subject in approvers
        assert "approve" in token.scopes and tuple(token.projects) == ("shop",)
    assert set(tokens) == {"shop-ci", *approvers}
    assert tuple(tokens["shop-ci"].scopes) == ("facts:write",)
    readme = (EXAMPLE / "README.md").read_text()
    for subject, token in tokens.items():
        published = f"gk_example-{subject}"
        assert token.sha256 == hashlib.sha256(published.encode()).hexdigest(), subject
        assert published in readme, subject


def test_the_demo_deliveries_are_githubs_published_shape_and_map_to_the_rules_facts() -> None:
    demo = demo_module()
    hook = load_config(EXAMPLE / "gatekeeper.yaml").hooks["github"]
    published = key_paths(json.loads((PUBLISHED / "github_workflow_run.1.json").read_text()))
    story = steps()
    deliveries = [
        (action["github"], action.get("status", 200))
        for step in demo.substitute(story["steps"], story["commits"])
        for action in step["do"]
        if "github" in action
    ]
    facts = {}
    for spec, status in deliveries:
        payload = demo.workflow_run_payload(spec)
        assert key_paths(payload) == published
        body = json.dumps(payload).encode()
        secret = "not-the-hook-secret" if spec.get("forged") else HOOK_SECRET
        headers = demo.github_headers(body, secret, spec["delivery"])
        if status == 401:
            with pytest.raises(HookRejected) as refused:
                handle(hook, HOOK_SECRET, headers, body)
            assert refused.value.status == 401
            continue
        made = handle(hook, HOOK_SECRET, headers, body)
        assert len(made) == (1 if status == 200 else 0), spec
        for fact in made:
            facts[(spec["delivery"], fact.kind, fact.id)] = dict(fact.data)
    c2 = story["commits"]["C2"]
    assert facts == {
        ("1f9c6a40-9c1e-11f0-8a2b-5c3d1e0f7a01", "build", "gh-30433601"): {
            "status": "passed",
            "commit": c2,
            "branch": "main",
            "run": "https://github.com/octo-org/octo-repo/actions/runs/30433601",
        },
        ("3c05e920-9c1e-11f0-8a2b-5c3d1e0f7a01", "test_run", "gh-30433642"): {
            "suite": "e2e",
            "result": "failed",
            "commit": c2,
            "branch": "main",
            "attempt": 1,
        },
        ("5e2f0b40-9c1e-11f0-8a2b-5c3d1e0f7a01", "test_run", "gh-30433642"): {
            "suite": "e2e",
            "result": "passed",
            "commit": c2,
            "branch": "main",
            "attempt": 2,
        },
    }


@needs_make
@pytest.mark.timeout(180)
def test_the_demo_holds_every_expectation() -> None:
    result = run_demo()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    c1, c2 = steps()["commits"]["C1"], steps()["commits"]["C2"]
    assert (
        "the receiver got 8 requests: 1 release, 6 notify, 1 pipeline; 0 with a bad signature"
        in out
    )
    assert out.count(f"notify   /chat/dev: Test unit failed at commit {c1} on main") == 2
    assert (
        f"notify   /chat/dev: Test e2e failed at commit {c2} on main (test run gh-30433642)" in out
    )
    assert f"pipeline /ci/deploy: ref {c2} " in out
    release = "release  /bank/releases: 4000.00 EUR from shop-escrow to acme-dev"
    assert out.count(release) == 1
    assert out.count(f"notify   /chat/finance: {WAITING}") == 1
    assert out.index(f"notify   /chat/finance: {WAITING}") < out.index(release)
    assert (
        "notify   /chat/finance: Milestone m1 (Checkout v2) is complete and approved: released "
        "4000.00 EUR to acme-dev from shop-escrow" in out
    )
    assert (
        '$ curl -s $GATEKEEPER_URL/v1/approvals -H "Authorization: Bearer $FINANCE_LEAD_TOKEN" '
        '-H \'Content-Type: application/json\' -d \'{"rule": "shop/milestone-release", '
        '"item": "m1", "decision": "approve"}\'' in out
    )
    assert '"approved_by": ["product-owner"], "satisfied": false' in out
    assert '"approved_by": ["finance-lead", "product-owner"], "satisfied": true' in out
    assert "-> HTTP 404 rule 'shop/milestone-release' has no instance 'm2'" in out
    assert "gk_" not in out  # the tokens are handed over in the environment, never printed
    assert (
        "shop-escrow: limit 12000.00 EUR, released 4000.00, pending 0.00, remaining 8000.00" in out
    )
    assert "-> HTTP 401" in out and "-> HTTP 202" in out
    assert "SUCCESS: every expectation of" in out
    assert "FAILED" not in out


@needs_make
@pytest.mark.timeout(180)
def test_the_demo_fails_when_an_expectation_does_not_hold(tmp_path: Path) -> None:
    """The first two steps, expecting one notification too many and a text that never comes."""
    story = steps()
    story["steps"] = story["steps"][:2]
    story["steps"][1]["expect"]["notify"] = 2
    story["steps"][1]["arrived"].append({"notify": "Test lint failed at commit ${C1}"})
    story["escrows"] = {}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(story))
    result = run_demo("--steps", str(path), "--wait-s", "1")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    c1 = story["commits"]["C1"]
    assert "expected 2 notify, got 1" in out
    assert f'no notify "Test lint failed at commit {c1}" arrived' in out
    assert "SUCCESS" not in out.split("== the receiver got")[-1]


@needs_make
@pytest.mark.timeout(180)
def test_the_demo_fails_when_a_milestone_is_released_without_approvals(tmp_path: Path) -> None:
    """The plan and the tasks done, expecting the release at once (as before approvals were
    needed): the release does not come, only finance-chat's notice that it waits."""
    story = steps()
    done = next(s for s in story["steps"] if s["say"].startswith("SHOP-101 and SHOP-102"))
    done["expect"] = {"release": 1, "notify": 1}
    done["arrived"].append({"release": {"escrow": "shop-escrow", "payee": "acme-dev"}})
    story["steps"] = [story["steps"][0], done]
    story["escrows"] = {}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(story))
    result = run_demo("--steps", str(path), "--wait-s", "1")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "expected 1 release, got 0" in out
    assert 'no release {"escrow": "shop-escrow", "payee": "acme-dev"} arrived' in out
    assert f"notify   /chat/finance: {WAITING}" in out
    assert "SUCCESS" not in out.split("== the receiver got")[-1]
