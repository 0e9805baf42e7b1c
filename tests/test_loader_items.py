"""Loading per-item, event and set_fact rules and the new approval settings: what the
model gets, what the hash covers, and that rules written before them hash as they did."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatekeeper.config import DEFAULT_MAX_CHAIN_DEPTH, ConfigError, load_config
from gatekeeper.rules.loader import duration_seconds, load_rule_texts, load_rules_dir
from gatekeeper.rules.model import NotifyAction, ReleaseAction, Rule, SetFactAction

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent

PER_ITEM = """\
- id: dev/build-failed
  project: dev
  for_each: build
  when: item.data.status == "failed" and item.data.branch == "main"
  fire: each_fact
  actions:
    - notify: {target: chat, message: "build failed"}
- id: site/milestone-complete
  project: site
  for_each: milestone
  when: milestone.m1.status == "open"
  actions:
    - set_fact: {kind: milestone_status, id: m1, data: {status: complete, tasks: 3}}
- id: site/release
  project: site
  for_each: milestone_status
  when: item.data.status == "complete"
  approvals:
    {required: 2, from: [alice, bob, carol], expires_after: 7d, standing: true, notify: chat}
  actions:
    - set_fact: {kind: released, id: m1}
"""


def load(text: str) -> dict[str, Rule]:
    result = load_rule_texts({"r.yaml": text}, None)
    assert result.ruleset is not None, [str(p) for p in result.problems]
    return result.ruleset.by_id()


def test_per_item_event_and_set_fact_rules_load_into_the_model() -> None:
    rules = load(PER_ITEM)
    build = rules["dev/build-failed"]
    assert (build.for_each, build.fire, build.approvals) == ("build", "each_fact", None)
    assert build.actions == (NotifyAction(target="chat", message="build failed"),)
    milestone = rules["site/milestone-complete"]
    assert milestone.for_each == "milestone"
    assert milestone.actions == (
        SetFactAction("milestone_status", "m1", {"status": "complete", "tasks": 3}),
    )
    release = rules["site/release"]
    assert release.approvals is not None
    assert release.approvals.standing is True
    assert release.approvals.expires_after_s == 7 * 86400.0
    assert release.approvals.notify == "chat"
    assert release.actions == (SetFactAction("released", "m1", {}),)


def test_plain_rules_keep_their_defaults() -> None:
    rule = load(
        "id: a/b\nproject: p\nwhen: task.t1.done\n"
        "approvals: {required: 1, from: [alice]}\n"
        "actions: [{notify: {target: chat, message: hi}}]\n"
    )["a/b"]
    assert rule.for_each is None
    assert rule.approvals is not None
    assert (rule.approvals.standing, rule.approvals.expires_after_s, rule.approvals.notify) == (
        False,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("written", "seconds"),
    [(1, 1), (3600, 3600), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1d", 86400)],
)
def test_durations(written: int | str, seconds: int) -> None:
    assert duration_seconds(written) == seconds


@pytest.mark.parametrize("written", ["7", "7w", "d", "", True, None, 2.5])
def test_not_durations(written: object) -> None:
    assert duration_seconds(written) is None


# Hashes recorded by databases written before for_each, set_fact and the new approval keys
# existed: these rules must keep exactly these hashes.
PINNED_HASHES = {
    "good/alert": "7de2e2cfbd912f7746ba02219e5909d100b3600033ea9fbe376c530ba8a5110e",
    "good/nested": "0322e5ca20a3590456c06e7f2dd355e8d6c98e8e8cca93691989cbe82c4aaa63",
    "good/release": "675b45dcb571926d40aa0ba32ed6e4ea5090bd23755757d3435334e31b6c5ad1",
    "good/single": "a7586403b4fd7b604458a57f83ece4d3ba9e7d38c1427ad0c9e3711422bba141",
    "tower-a/design-release": "7fd52d7d2acf67a5c60cf7b6570a41315c3917d55d87c989052984cea3afb468",
    "tower-a/docs-pipeline": "f9833d366b9ad699c15ff9f21e525fa66a563bec626f7e3b9bca5506f31afbdd",
    "tower-a/handover-release": "1de86be14da40eb62f7456855cf24ab7f5b61e9582a9f0628364a3de3b8d6433",
    "tower-a/structure-qa-failed": (
        "871165ceadafc4caa5a21ab78a36e0d4b835f1eadb6f89b24b13216708faf5ba"
    ),
    "tower-a/structure-release": "067cf8955c3b95d1cba9d786e3c1c7a0156be1d74482aeb810863f632a7eea4a",
}


def test_rules_without_the_new_keys_keep_their_recorded_hashes() -> None:
    hashes = {}
    for folder in (DATA / "good_rules" / "rules", REPO / "rules"):
        ruleset = load_rules_dir(folder, None).ruleset
        assert ruleset is not None
        hashes.update({rule.id: rule.content_hash for rule in ruleset.rules})
    assert hashes == PINNED_HASHES


BASE = """\
id: h/one
project: site
when: milestone.m1.status == "open"
approvals: {required: 1, from: [alice]}
actions:
  - notify: {target: chat, message: hi}
"""


def rule_hash(text: str) -> str:
    return load(text)["h/one"].content_hash


def test_the_new_keys_change_the_hash_and_their_defaults_do_not() -> None:
    base = rule_hash(BASE)
    approvals = "approvals: {required: 1, from: [alice]}"
    assert rule_hash(BASE.replace(approvals, approvals[:-1] + ", standing: false}")) == base
    changed = {
        "for_each": rule_hash(BASE + "for_each: milestone\n"),
        "each_fact": rule_hash(BASE + "fire: each_fact\n"),
        "standing": rule_hash(BASE.replace(approvals, approvals[:-1] + ", standing: true}")),
        "expires": rule_hash(BASE.replace(approvals, approvals[:-1] + ", expires_after: 7d}")),
        "notify": rule_hash(BASE.replace(approvals, approvals[:-1] + ", notify: chat}")),
        "set_fact": rule_hash(BASE + "  - set_fact: {kind: done, id: m1}\n"),
        "set_fact data": rule_hash(BASE + "  - set_fact: {kind: done, id: m1, data: {a: 1}}\n"),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)
    # the same meaning written another way
    week = rule_hash(BASE.replace(approvals, approvals[:-1] + ", expires_after: 604800}"))
    assert week == changed["expires"]
    empty_data = rule_hash(BASE + "  - set_fact: {kind: done, id: m1, data: {}}\n")
    assert empty_data == changed["set_fact"]


def test_approvals_notify_names_a_declared_target_that_takes_messages() -> None:
    config = load_config(DATA / "good_rules" / "gatekeeper.yaml")
    text = BASE.replace("target: chat", "target: site-ops")
    approvals = "approvals: {required: 1, from: [alice]}"
    good = text.replace(approvals, approvals[:-1] + ", notify: finance-chat}")
    assert load_rule_texts({"r.yaml": good}, config).ok
    bad = text.replace(approvals, approvals[:-1] + ", notify: finance-caht}")
    [problem] = load_rule_texts({"r.yaml": bad}, config).problems
    assert (problem.line, problem.path) == (4, "approvals.notify")
    assert problem.message.startswith("unknown target 'finance-caht'; did you mean 'finance-chat'?")


def test_max_chain_depth(tmp_path: Path) -> None:
    path = tmp_path / "gatekeeper.yaml"
    path.write_text("listen: 127.0.0.1:8080\n")
    assert load_config(path).max_chain_depth == DEFAULT_MAX_CHAIN_DEPTH == 16
    path.write_text("max_chain_depth: 3\n")
    assert load_config(path).max_chain_depth == 3
    path.write_text("max_chain_depth: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "max_chain_depth" in str(caught.value.problems[0])
    assert "must be at least 1 (got 0)" in str(caught.value.problems[0])


def self_trigger_problems(
    fire: str, for_each: str | None, when: str, kind: str, fact_id: str = "s1"
) -> list[str]:
    lines = ["id: loop/me", "project: p", f"when: '{when}'", f"fire: {fire}"]
    if for_each is not None:
        lines.append(f"for_each: {for_each}")
    lines.append(f"actions: [{{set_fact: {{kind: {kind}, id: '{fact_id}'}}}}]")
    result = load_rule_texts({"r.yaml": "\n".join(lines) + "\n"}, None)
    return [p.message for p in result.problems]


@pytest.mark.parametrize(
    ("fire", "for_each", "when", "kind", "fact_id", "reported"),
    [
        # event rules: a per-item one is triggered by its own kind, a plain one by its reads
        ("each_fact", "build", "item.data.ok", "build", "${item.id}", True),
        ("each_fact", "build", "item.data.ok and stage.s1.ok", "stage", "s2", False),
        ("each_fact", None, "stage.s1.ok", "stage", "s2", True),
        ("each_fact", None, "len(stage) > 2", "stage", "s2", True),
        ("each_fact", None, "stage.s1.ok", "other", "s2", False),
        # each_time: any kind it reads
        ("each_time", None, "stage.s1.ok", "stage", "s1", True),
        ("each_time", "build", "item.data.ok and stage.s1.ok", "stage", "s2", True),
        ("each_time", "build", "item.data.ok", "build", "x", True),
        # once: one firing per instance; only new instances of its own kind chain
        ("once", None, "stage.s1.ok", "stage", "s2", False),
        ("once", "build", "item.data.ok", "build", "${item.id}", False),
        ("once", "build", "item.data.ok", "build", "${item.id}-next", True),
        ("once", "build", "item.data.ok and stage.s1.ok", "stage", "s2", False),
    ],
)
def test_a_rule_that_can_re_trigger_itself_is_reported(
    fire: str, for_each: str | None, when: str, kind: str, fact_id: str, reported: bool
) -> None:
    found = self_trigger_problems(fire, for_each, when, kind, fact_id)
    assert bool(found) == reported, found
    if reported:
        [message] = found
        assert message.startswith(f"this rule sets a fact of kind {kind!r}, ")
        assert "so it can re-trigger itself" in message


def test_rules_chained_through_kinds_are_not_reported() -> None:
    rules = load(
        """\
- id: site/milestone-complete
  project: site
  for_each: milestone
  when: milestone.m1.status == "open"
  actions:
    - set_fact: {kind: milestone_status, id: "${item.id}", data: {status: complete}}
- id: site/release
  project: site
  for_each: milestone_status
  when: item.data.status == "complete"
  fire: each_fact
  actions:
    - set_fact: {kind: released, id: "${item.id}"}
"""
    )
    assert set(rules) == {"site/milestone-complete", "site/release"}


def readme_section_rules() -> list[str]:
    """The YAML blocks of the README's "Rules over many things" section."""
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Rules over many things\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```yaml\n(.*?)^```", section, re.S | re.M)


def _has_collections() -> bool:
    from gatekeeper.expr import ExpressionError, compile_condition

    try:
        compile_condition("count(t for t in task)")
    except ExpressionError:
        return False
    return True


def test_readme_rules_over_many_things_examples_are_valid() -> None:
    blocks = readme_section_rules()
    assert len(blocks) == 6
    for block in blocks:
        if "for t in task" in block and not _has_collections():
            continue  # checked once the expression language has collections
        result = load_rule_texts({"readme.yaml": block}, None)
        assert result.ok, [str(p) for p in result.problems]
    [notify] = load(blocks[-2])["tower-a/design-approved"].actions
    assert isinstance(notify, NotifyAction)
    assert notify.message.endswith('T-17 ${task["T-17"].status}')
    release, _ = load(blocks[-1])["tower-a/pay-invoice"].actions
    assert isinstance(release, ReleaseAction)
    assert (release.amount, release.max_amount) == ("${item.data.amount}", "10000.00")
