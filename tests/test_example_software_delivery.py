"""The software-delivery example (``examples/software-delivery/``): its rules check clean and
pass their rule tests, every rule is expected to fire in some test, its GitHub deliveries are
GitHub's published ``workflow_run`` shape and map to the facts the rules read, and its one
command (``demo.py``: the daemon, the Makefile's ``gatekeeper emit`` steps, signed hook
deliveries and a verifying receiver) holds every expectation of ``steps.json``, and fails
when one does not hold."""

from __future__ import annotations

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
    assert "SUCCESS: 8 cases passed in 3 files" in result.stdout
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
        "the receiver got 7 requests: 1 release, 5 notify, 1 pipeline; 0 with a bad signature"
        in out
    )
    assert out.count(f"notify   /chat/dev: Test unit failed at commit {c1} on main") == 2
    assert (
        f"notify   /chat/dev: Test e2e failed at commit {c2} on main (test run gh-30433642)" in out
    )
    assert f"pipeline /ci/deploy: ref {c2} " in out
    assert "release  /bank/releases: 4000.00 EUR from shop-escrow to acme-dev" in out
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
