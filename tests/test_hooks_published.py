"""Every hook mapping the README documents, run against the senders' own published example
payloads, unedited (``tests/data/hooks/published``; their sources are named in the README
there): GitHub's ``workflow_run`` examples (octokit/webhooks ``payload-examples``, which
GitHub's "Webhook events and payloads" page is generated from) and GitLab's "Pipeline events"
example. A documented mapping must never turn a real event into a refusal: GitHub's example
``workflow_run.name`` is ``""``, so an id built from it was ``-master`` and refused."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import replace
from pathlib import Path

import pytest

from gatekeeper.config import Hook, load_config
from gatekeeper.runtime.hooks import handle

ROOT = Path(__file__).parent.parent
PUBLISHED = Path(__file__).parent / "data" / "hooks" / "published"
SECRET = "published-example-secret"
_YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def documented_hooks(tmp_path: Path) -> dict[str, Hook]:
    """The ``hooks:`` of every YAML block in README.md, loaded as gatekeeper.yaml is."""
    hooks: dict[str, Hook] = {}
    for index, block in enumerate(_YAML_BLOCK.findall((ROOT / "README.md").read_text())):
        if not re.search(r"^hooks:", block, re.M):
            continue
        path = tmp_path / f"readme-{index}.yaml"
        path.write_text(block)
        hooks.update(load_config(path).hooks)
    return hooks


def examples(hook: Hook, event: str) -> list[Path]:
    """The published examples of ``event`` from ``hook``'s sender."""
    if hook.kind == "github":
        return sorted(PUBLISHED.glob(f"github_{event}.*.json"))
    if hook.kind == "gitlab":
        return sorted(PUBLISHED.glob(f"gitlab_{event.lower().replace(' ', '_')}.json"))
    return []


def delivered(hook: Hook, event: str, body: bytes) -> dict[str, str]:
    """The headers the sender puts on ``body``, signed or tokened with ``SECRET``."""
    if hook.kind == "github":
        digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-Hub-Signature-256": f"sha256={digest}",
        }
    return {"Content-Type": "application/json", "X-Gitlab-Event": event, "X-Gitlab-Token": SECRET}


def test_the_readme_documents_github_and_gitlab_mappings_with_published_examples(
    tmp_path: Path,
) -> None:
    hooks = documented_hooks(tmp_path)
    kinds = {hook.kind for hook in hooks.values()}
    assert {"github", "gitlab"} <= kinds
    for hook in hooks.values():
        if hook.kind in ("github", "gitlab"):
            for mapping in hook.facts:
                assert examples(hook, mapping.event), f"no published {mapping.event} example"


def test_readme_mappings_make_valid_facts_of_every_published_example(tmp_path: Path) -> None:
    """As documented (``match`` included), each published example is either ignored or one
    valid fact; and with ``match`` dropped, every template still renders a valid fact, so a
    branch filter cannot hide a template that a real event breaks."""
    made = 0
    for hook in documented_hooks(tmp_path).values():
        if hook.kind not in ("github", "gitlab"):
            continue
        for mapping in hook.facts:
            for example in examples(hook, mapping.event):
                body = example.read_bytes()
                headers = delivered(hook, mapping.event, body)
                single = replace(hook, facts=(mapping,))
                facts = handle(single, SECRET, headers, body)  # raises HookRejected on 4xx
                assert len(facts) <= 1
                unfiltered = replace(hook, facts=(replace(mapping, match={}),))
                [fact] = handle(unfiltered, SECRET, headers, body)
                assert (fact.project, fact.kind) == (hook.project, mapping.kind), example.name
                made += len(facts)
    assert made >= 1  # at least one documented mapping fits a published example as it stands


@pytest.mark.parametrize("name", ["github_workflow_run.1.json", "github_workflow_run.2.json"])
def test_githubs_own_workflow_run_example_has_an_empty_name(name: str) -> None:
    """Why ids come from fields that are always set: the example GitHub publishes."""
    import json

    run = json.loads((PUBLISHED / name).read_text())["workflow_run"]
    assert run["name"] == "" and isinstance(run["workflow_id"], int) and run["id"] == 289782451
