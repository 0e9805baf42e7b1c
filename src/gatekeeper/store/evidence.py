"""What a decision saw, kept by reference: the stored form of an ``Evaluation`` and how the
JSON the API shows is rebuilt from it and the fact log. Backend-neutral (every backend
stores and shows decisions this way).

A decision stores the values of its sub-conditions (``clauses``), what was missing, the
error, and for the facts it read:

- each fact read by id (``milestone.design``): its name and the fact log ``seq`` of the
  data it saw (``null`` when the fact did not exist), not a copy of the data;
- each kind read as a whole (``len(task) >= 3``): its name and how many facts it had, and
  once per decision ``as_of``, the fact log's last ``seq`` when the decision was made (the
  kind as seen is, per id, the latest fact log entry of that kind up to ``as_of``);
- each collection (``all(t.data.done for t in task if ...)``): its counts, the first ids
  whose element was false or missing, and its value (``collections``, as
  ``CollectionSeen`` gives them), with ``as_of``: never the facts it went over;
- for a decision of a per-item rule, its item: kind, id and the ``seq`` of its data.

So the size of a stored decision is bounded by its rule's text, whatever the rule reads: a
clause value over ``MAX_STORED_VALUE_CHARS`` characters of JSON (a clause that is a whole
kind, say) is stored as ``null`` with ``value_omitted``, its size.

Shown (``shown_evaluation``), a stored evaluation becomes the engine's JSON
(``evaluation_to_json``) again: ``seen`` maps each fact read by id to its data, read back
from the fact log by ``seq``; a kind read as a whole is not copied into ``seen`` but
summarised in ``seen_kinds``: ``{"task": {"facts": 500, "as_of_seq": 1234}}``; each
collection is shown with ``as_of_seq``; the item as ``{kind, id, seq, data}``. Decisions
stored before (with ``seen`` holding copies) are shown as they were stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gatekeeper.engine.model import collection_to_json, split_fact_name
from gatekeeper.expr import CollectionSeen, Evaluation
from gatekeeper.store.records import canonical_json

MAX_STORED_VALUE_CHARS = 1024
"""A clause value longer than this as JSON is stored as ``null`` with ``value_omitted``."""

_SMALL_TYPES = frozenset({bool, int, float, type(None)})


Unresolved = list[tuple[dict[str, Any], str, tuple[str, str, str]]]
"""Facts read by id whose ``seq`` ``stored_evaluation`` did not know: the stored ``facts``
mapping to complete, the name in it and the fact's key (project, kind, id)."""


def stored_evaluation(
    evaluation: Evaluation,
    project: str,
    seqs: Mapping[tuple[str, str, str], int],
    unresolved: Unresolved,
    as_of: Callable[[], int],
    item: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The stored form of ``evaluation`` (JSON-ready) of a rule of ``project``.

    ``item`` is ``(kind, id)`` of the instance's item for a decision of a per-item rule:
    stored as ``reads.item = {kind, id, seq}`` (the ``seq`` of its data, resolved like a
    fact read by id), never as a copy of its data.

    ``seqs`` gives the fact log ``seq`` of the current data of facts by key; a fact
    ``seen`` read by id that it does not hold is stored as None and appended to
    ``unresolved``, for the caller to complete (``resolve``) before storing. ``as_of()``
    is the fact log's last ``seq``, asked only when a kind was read whole."""
    facts: dict[str, int | None] = {}
    kinds: dict[str, int] | None = None
    for name, data in evaluation.seen.items():
        kind, fact_id = split_fact_name(name)
        if fact_id is None:
            if kinds is None:
                kinds = {}
            kinds[name] = len(data)
        elif data is None:
            facts[name] = None
        else:
            key = (project, kind, fact_id)
            seq = seqs.get(key)
            if seq is None:
                unresolved.append((facts, name, key))
            facts[name] = seq
    reads: dict[str, Any] = {"facts": facts}
    collections = [_stored_collection(c) for c in evaluation.collections]
    if item is not None:
        item_key = (project, item[0], item[1])
        item_ref: dict[str, Any] = {"kind": item[0], "id": item[1], "seq": seqs.get(item_key)}
        if item_ref["seq"] is None:
            unresolved.append((item_ref, "seq", item_key))
        reads["item"] = item_ref
    if kinds:
        reads["kinds"] = kinds
    if kinds or collections:  # what a kind held is told by the fact log up to as_of
        reads["as_of"] = as_of()
    clauses = []
    for c in evaluation.clauses:
        value = c.value
        if value.__class__ in _SMALL_TYPES or (
            value.__class__ is str and len(value) <= MAX_STORED_VALUE_CHARS
        ):
            clause: dict[str, Any] = {"text": c.text, "value": value}
        else:
            clause = _stored_value(c.text, value)
        if c.missing:
            clause["missing"] = list(c.missing)
        if c.error:
            clause["error"] = c.error
        clauses.append(clause)
    stored: dict[str, Any] = {
        "value": evaluation.value,
        "clauses": clauses,
        "missing": list(evaluation.missing),
        "error": evaluation.error,
        "reads": reads,
    }
    if collections:
        stored["collections"] = collections
    return stored


def _stored_collection(seen: CollectionSeen) -> dict[str, Any]:
    """A collection's counts and ids as stored; its value as a clause's (over
    ``MAX_STORED_VALUE_CHARS`` characters of JSON: ``null`` with ``value_omitted``)."""
    stored = collection_to_json(seen)
    value = stored["value"]
    if value.__class__ in _SMALL_TYPES or (
        value.__class__ is str and len(value) <= MAX_STORED_VALUE_CHARS
    ):
        return stored
    size = len(canonical_json(value))
    if size > MAX_STORED_VALUE_CHARS:
        stored["value"] = None
        stored["value_omitted"] = size
    return stored


def resolve(unresolved: Unresolved, found: Mapping[tuple[str, str, str], int]) -> None:
    """Complete the stored evaluations of ``unresolved`` with the ``seq`` of each key in
    ``found`` (a key not there stays None: the fact did not exist)."""
    for facts, name, key in unresolved:
        facts[name] = found.get(key)


def _stored_value(text: str, value: Any) -> dict[str, Any]:
    size = len(canonical_json(value))
    if size > MAX_STORED_VALUE_CHARS:
        return {"text": text, "value": None, "value_omitted": size}
    return {"text": text, "value": value}


def referenced_seqs(stored: Mapping[str, Any]) -> Iterable[int]:
    """The fact log ``seq`` numbers a stored evaluation refers to (none for one stored
    before decisions kept references)."""
    reads = stored.get("reads")
    if not isinstance(reads, Mapping):
        return ()
    seqs = [seq for seq in reads.get("facts", {}).values() if isinstance(seq, int)]
    item = reads.get("item")
    if isinstance(item, Mapping) and isinstance(item.get("seq"), int):
        seqs.append(item["seq"])
    return seqs


def shown_evaluation(
    stored: Mapping[str, Any], data_of: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """The evaluation as the API shows it, ``stored`` with ``seen`` rebuilt: each fact read
    by id gets the data of its ``seq`` (``data_of``: seq -> data, from the fact log; None
    when the fact did not exist), kinds read whole are summarised in ``seen_kinds``. A
    stored evaluation without references (stored before them) is returned as stored."""
    reads = stored.get("reads")
    if not isinstance(reads, Mapping):
        return dict(stored)
    shown = {key: value for key, value in stored.items() if key != "reads"}
    facts: Mapping[str, int | None] = reads.get("facts", {})
    shown["seen"] = {
        name: None if seq is None else data_of.get(seq) for name, seq in sorted(facts.items())
    }
    item = reads.get("item")
    if isinstance(item, Mapping):
        seq = item.get("seq")
        shown["item"] = {
            "kind": item.get("kind"),
            "id": item.get("id"),
            "seq": seq,
            "data": None if seq is None else data_of.get(seq),
        }
    collections = stored.get("collections")
    if isinstance(collections, list):
        shown["collections"] = [
            {**collection, "as_of_seq": reads.get("as_of")} for collection in collections
        ]
    kinds: Mapping[str, int] = reads.get("kinds", {})
    if kinds:
        as_of = reads.get("as_of")
        shown["seen_kinds"] = {
            kind: {"facts": count, "as_of_seq": as_of} for kind, count in sorted(kinds.items())
        }
    return shown
