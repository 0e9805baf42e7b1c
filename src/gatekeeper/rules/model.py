"""Typed rules and rulesets: what the loader produces and the engine runs.

Nothing here parses YAML; see ``loader`` for that.
"""

from __future__ import annotations

import marshal
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gatekeeper.expr import Condition

FACT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""A fact id, as ``POST /v1/facts`` takes it (``schemas/facts-request.schema.json``): a
letter or digit, then letters, digits and ``_ . -``; at most 128 characters. A set_fact
``id`` must be one as written and, when it is a template, once rendered."""
FACT_ID_RULE = "letters, digits and _ . -, starting with a letter or digit, at most 128 characters"

FireMode = Literal["once", "each_time", "each_fact"]
"""``once``: at most once per rule instance, ever; ``each_time``: on every closed -> open
edge of the gate; ``each_fact``: for every accepted fact that makes the condition true
(an event rule: the same status posted twice fires twice)."""

RuleMode = Literal["live", "shadow"]
"""``live`` (default): a firing's actions are sent. ``shadow``: the rule is evaluated,
decides and records as a live rule does (decisions, state, firing ids, a ``once`` firing
used up), but everything its firings queue is stored as ``shadowed`` and never sent: no
webhook, no ledger entry, no amount counted against an escrow, no fact set."""


@dataclass(frozen=True, slots=True)
class Approvals:
    """N-of-M sign-off: ``required`` distinct approvers out of ``from_`` (subjects)."""

    required: int
    from_: tuple[str, ...]
    standing: bool = False
    """On ``each_time``/``each_fact`` rules an approval is consumed by the firing it allowed,
    unless ``standing`` (then it authorises every later firing until withdrawn)."""
    expires_after_s: float | None = None
    """An approval older than this many seconds no longer counts (None: never lapses)."""
    notify: str | None = None
    """A target told once per wait when only the approvals are missing (None: nobody)."""


@dataclass(frozen=True, slots=True)
class ReleaseAction:
    """Ask an escrow/payment provider to release funds.

    ``amount`` is a decimal string with at most its escrow's decimals (``Escrow.decimals``,
    e.g. ``"5000.00"``), never a float, or one ``${name}`` placeholder naming a fact field
    (``"${item.data.amount}"``), rendered when the rule fires; such a release has
    ``max_amount`` (a decimal string), the most its rendered amount may be. A literal
    amount may have one too.
    """

    target: str
    escrow: str
    amount: str
    currency: str
    payee: str
    kind: Literal["release"] = "release"
    max_amount: str | None = None

    @property
    def templated(self) -> bool:
        """Whether ``amount`` is a template (rendered from facts when the rule fires)."""
        return self.amount.startswith("$")


@dataclass(frozen=True, slots=True)
class NotifyAction:
    """Tell people: ``message`` is a ``${name}`` template (see ``templates``)."""

    target: str
    message: str
    kind: Literal["notify"] = "notify"


@dataclass(frozen=True, slots=True)
class PipelineAction:
    """Start a CI/CD run on ``ref`` with string ``inputs``."""

    target: str
    ref: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    kind: Literal["pipeline"] = "pipeline"


@dataclass(frozen=True, slots=True)
class SetFactAction:
    """Record a fact in the rule's own project, in the transaction of the decision that
    fired (with ``caused_by`` in the fact log), evaluated like any posted fact.

    ``fact_id`` is a template; ``data`` maps field names to values, where a string value is
    a template and any other JSON value is taken as written.
    """

    fact_kind: str
    fact_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    kind: Literal["set_fact"] = "set_fact"


class PackedData(Mapping[str, Any]):
    """A rule's data as written (a mapping from YAML), kept packed: a read-only mapping
    equal to the data, unpacked again each time it is read.

    The loader keeps every rule's data for as long as the rule is live (``Rule.source``,
    the checked-file cache), and as nested dicts, lists and strings it is the largest part
    of a loaded rule (about 1.5 KB); packed it is a few hundred bytes. The ``id`` and
    ``when`` strings, which the rule keeps anyway (its id, its condition's text), are not
    packed a second time: the very strings are kept beside the packed rest. The last
    mapping unpacked is remembered, so reading several keys of one rule unpacks it once;
    reading a value returns a fresh copy (the packed data cannot be changed through it).
    ``pack_data`` makes one, or gives back the data when it cannot be packed.
    """

    __slots__ = ("_id", "_packed", "_when")

    def __init__(self, packed: bytes, id: str | None = None, when: str | None = None) -> None:
        self._packed = packed
        self._id = id
        """The value of ``id`` when it is a string, left out of ``_packed`` (else None)."""
        self._when = when
        """The value of ``when`` when it is a string, left out of ``_packed`` (else None)."""

    def unpacked(self) -> dict[str, Any]:
        """The data as a new plain dict (nested values new too)."""
        data: dict[str, Any] = marshal.loads(self._packed)
        # their places in the key order are kept by a None in the packed data
        if self._id is not None:
            data["id"] = self._id
        if self._when is not None:
            data["when"] = self._when
        return data

    def _data(self) -> dict[str, Any]:
        last = _last_unpacked
        if last[0] is self:
            return last[1]
        data = self.unpacked()
        globals()["_last_unpacked"] = (self, data)
        return data

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        return f"PackedData({self.unpacked()!r})"


def kept_source(data: Mapping[str, Any], rule_id: str, when: str) -> Mapping[str, Any] | bytes:
    """What a ``Rule`` of id ``rule_id`` and condition text ``when`` keeps of its data
    (``Rule.kept_source``): the packed bytes of ``data`` when it is a ``PackedData`` of
    that id and text, else ``data``."""
    if isinstance(data, PackedData) and data._id is rule_id and data._when is when:
        return data._packed
    return data


_last_unpacked: tuple[object, dict[str, Any]] = (None, {})
"""The ``PackedData`` last unpacked and its data (read and replaced as one tuple). Its
values are handed out by ``PackedData.__getitem__``: a caller that changed one would see
the change on its next read of the same rule, never in the packed data."""


def pack_data(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` packed (see ``PackedData``) when it holds only what ``marshal`` keeps exactly
    (dicts, lists, strings, numbers, booleans, None; a YAML timestamp does not qualify), else
    ``data`` itself."""
    if type(data) is not dict:
        return data
    rule_id, when = data.get("id"), data.get("when")
    rule_id = rule_id if type(rule_id) is str else None
    when = when if type(when) is str else None
    rest = data
    if rule_id is not None or when is not None:
        rest = dict(data)
        if rule_id is not None:
            rest["id"] = None
        if when is not None:
            rest["when"] = None
    try:
        packed = marshal.dumps(rest)
    except ValueError:
        return data
    return PackedData(_shared_packed(packed), rule_id, when)


_PACKED: dict[bytes, bytes] = {}
"""Packed data kept lately (see ``_shared_packed``), bounded by ``_MAX_PACKED``."""
_MAX_PACKED = 4096


def _shared_packed(packed: bytes) -> bytes:
    """``packed``, or the equal bytes kept before: the rules written from one template,
    which differ only in their id and ``when``, pack alike. A new one is copied out of
    marshal's buffer, which marshal grows past the small-object allocator's sizes, into an
    object of its own size among the rule's other small objects."""
    found = _PACKED.get(packed)
    if found is None:
        if len(_PACKED) >= _MAX_PACKED:
            _PACKED.clear()
        found = bytes(memoryview(packed))
        _PACKED[found] = found
    return found


PACK_TEXT_MIN_CHARS = 4096
"""Shorter texts are kept as they are: compressing one costs about 50 µs whatever its size
(zlib sets up its state each time), more than a file of a few rules is worth."""

PackedText = str | bytes
"""A text as ``pack_text`` keeps it: the text itself, or its UTF-8 compressed (bytes)."""


def pack_text(text: str) -> PackedText:
    """``text`` compressed (zlib, level 1, of its UTF-8) when it has at least
    ``PACK_TEXT_MIN_CHARS`` characters, else ``text`` itself: what ``PackedTexts`` keeps."""
    if len(text) < PACK_TEXT_MIN_CHARS:
        return text
    return zlib.compress(text.encode("utf-8"), 1)


def unpack_text(packed: PackedText) -> str:
    """The text ``pack_text`` packed."""
    if isinstance(packed, str):
        return packed
    return zlib.decompress(packed).decode("utf-8")


class PackedTexts(Mapping[str, str]):
    """``{file name: text}`` kept compressed (``pack_text``), each text decompressed when
    it is read: a read-only mapping equal to the texts.

    A ruleset's files are read when it is stored, when a problem found across files is
    located, and by explanations of stored rulesets; the rest of the time they only take
    room, as much as every other part of a loaded rule together for rule files of a few
    lines per rule. Compressed they take a tenth to a twentieth of it.
    """

    __slots__ = ("_packed",)

    def __init__(self, packed: Mapping[str, PackedText]) -> None:
        self._packed = dict(packed)

    def packed(self, name: str) -> PackedText:
        """The text of file ``name`` as kept (``pack_text``; ``KeyError`` when there is
        none)."""
        return self._packed[name]

    def __getitem__(self, name: str) -> str:
        return unpack_text(self._packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, name: object) -> bool:
        return name in self._packed

    def __repr__(self) -> str:
        return f"PackedTexts({dict(self)!r})"


Action = ReleaseAction | NotifyAction | PipelineAction | SetFactAction
DeliveredAction = ReleaseAction | NotifyAction | PipelineAction
"""The actions sent to a target (``set_fact`` is recorded, not sent)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a ruleset.

    ``content_hash`` is the SHA-256 (hex) of the rule's canonical JSON form: it changes
    whenever anything about the rule changes and is recorded with every decision.
    ``file`` is relative to the rules directory; ``line`` is 1-based.
    """

    id: str
    project: str
    description: str
    condition: Condition
    fire: FireMode
    actions: tuple[Action, ...]
    approvals: Approvals | None
    content_hash: str
    file: str
    line: int
    kept_source: Mapping[str, Any] | bytes = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    """The rule's data as written (``source``) as the loader keeps it: a mapping, or the
    packed bytes of a ``PackedData`` whose ``id`` and ``when`` are the rule's id and its
    condition's text (rules written from one template share those bytes: no object of
    its own per rule)."""
    for_each: str | None = None
    """A per-item rule: the fact kind whose every fact is an instance of the rule (its id is
    the instance's item id); None for a rule with one instance (item id ``""``)."""
    mode: RuleMode = "live"
    """As written (``RuleMode``); the mode a rule runs in also depends on the two-person
    rule for money rules (``gatekeeper.engine.signoffs.effective_mode``)."""

    @property
    def source(self) -> Mapping[str, Any]:
        """The rule's data as written: a read-only mapping (see ``PackedData``)."""
        kept = self.kept_source
        if isinstance(kept, bytes):
            return PackedData(kept, self.id, self.condition.text)
        return kept

    @property
    def release(self) -> ReleaseAction | None:
        """The rule's own ``release`` action, if it has one (its fields feed templates)."""
        for action in self.actions:
            if isinstance(action, ReleaseAction):
                return action
        return None


@dataclass(frozen=True)
class Ruleset:
    """A validated set of rules, content-addressed.

    ``files`` maps each file (relative to the rules directory, ``/``-separated) to its text
    (the loader keeps them compressed: ``PackedTexts``);
    ``version`` is the SHA-256 (hex) over those files, so the same text always gives the same
    version. ``git_commit`` is the HEAD commit when the rules directory is a git checkout.
    """

    rules: tuple[Rule, ...]
    files: Mapping[str, str]
    version: str
    git_commit: str | None = None

    def by_id(self) -> dict[str, Rule]:
        """The rules keyed by id."""
        return {rule.id: rule for rule in self.rules}
