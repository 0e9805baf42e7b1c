"""The current facts in memory: ``FactTable`` (keyed by (project, kind, id), with
copy-on-write overlays for planning) and ``ProjectFacts``, one project's view of it as the
``gatekeeper.expr.FactLookup`` conditions read (and the ``gatekeeper.expr.FactChanges``
that let collections follow the facts of a kind by deltas).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import Any

from gatekeeper.engine.model import FactKey

_TABLE_TOKENS = itertools.count(1)


class ProjectFacts:
    """The current facts of one project, seen through pending (uncommitted) changes.

    Implements ``gatekeeper.expr.FactLookup`` and ``gatekeeper.expr.FactChanges``. It
    shares its data (``shares_data``): a ``FactTable`` holds each fact's data as a plain
    dict of its own, which it replaces and never changes, so an evaluation keeps that dict
    in its ``seen`` rather than a copy (the rules reading one fact in a batch hold one dict).
    """

    shares_data = True

    def __init__(self, project: str, facts: FactTable) -> None:
        self._project = project
        self._facts = facts

    def get(self, kind: str, id: str) -> Mapping[str, Any] | None:
        return self._facts.get((self._project, kind, id))

    def of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return self._facts.of_kind(self._project, kind)

    def committed_version(self, kind: str) -> tuple[int, int]:
        return self._facts.committed_version(self._project, kind)

    def committed_changes(self, kind: str, since: int) -> Collection[str] | None:
        return self._facts.committed_changes(self._project, kind, since)

    def committed_of_kind(self, kind: str) -> Mapping[str, Mapping[str, Any]]:
        return self._facts.committed_of_kind(self._project, kind)

    def pending(self, kind: str) -> Collection[str]:
        return self._facts.pending(self._project, kind)


class FactTable:
    """Current facts in memory, keyed by (project, kind, id): one dict of ids per
    (project, kind), so ``get`` and ``of_kind`` read the same index.

    ``overlay`` returns a copy-on-write view for planning a transition before it commits.

    Change tracking (for collections kept up to date by deltas): the root table (the
    committed facts) counts the puts of each (project, kind) — its *version* — and keeps the
    ids of the last ``CHANGE_LOG`` to ``2 * CHANGE_LOG`` of them, so that a reader that saw
    version ``v`` can ask which ids changed since (``committed_changes``); ``token``
    tells root tables apart (a new table, e.g. after a reload, starts over). An overlay
    reports its own puts, and those of the overlays it stands on, as ``pending``: they are
    not committed, and are forgotten with the overlay.

    Every fact's data is a plain dict of the table's own, replaced by ``put`` and never
    changed in place (``ProjectFacts.shares_data`` relies on it): an overlay keeps a
    shallow copy of the data given, the root table (not an overlay) a compact copy, in
    which equal dict keys, projects, kinds and short strings (up to ``SHARED_MAX_CHARS``
    characters: statuses, codes) are one shared ``str`` object, not one per fact (as
    ``json.loads`` makes them). The copy is equal to the data given; only memory changes
    (about a third less for facts of a few fields). At most ``SHARED_MAX_STRINGS`` distinct
    strings are shared, so unique values cannot grow the pool without bound.
    """

    SHARED_MAX_CHARS = 16
    SHARED_MAX_STRINGS = 65_536
    COMPACT_MAX_DEPTH = 32
    """Data nested deeper than this is kept as given."""
    CHANGE_LOG = 1024
    """Ids of recent puts kept per (project, kind), at least (see ``committed_changes``)."""

    def __init__(self, facts: Mapping[FactKey, Mapping[str, Any]] | None = None) -> None:
        self._by_kind: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)
        self._parent: FactTable | None = None
        self._strings: dict[str, str] = {}
        self.token = next(_TABLE_TOKENS)
        self._versions: dict[tuple[str, str], int] = {}
        self._logs: dict[tuple[str, str], list[str]] = {}
        """Per (project, kind): the ids of its last puts, the last one last."""
        for key, data in (facts or {}).items():
            self.put(key, data)

    def overlay(self) -> FactTable:
        """A view that reads through to this table and records its own writes."""
        view = FactTable()
        view._parent = self
        return view

    def put(self, key: FactKey, data: Mapping[str, Any]) -> None:
        """Set the data of fact ``key`` to a copy of ``data`` (the root table's is compact,
        an overlay's shallow)."""
        project, kind, id = key
        if self._parent is None:
            project, kind = self._shared(project), self._shared(kind)
            data = self._compact_mapping(data, 0)
            self._log_put((project, kind), id)
        else:
            data = dict(data)
        self._by_kind[(project, kind)][id] = data

    def _log_put(self, pair: tuple[str, str], id: str) -> None:
        self._versions[pair] = self._versions.get(pair, 0) + 1
        log = self._logs.get(pair)
        if log is None:
            log = self._logs[pair] = []
        log.append(id)
        if len(log) >= 2 * self.CHANGE_LOG:
            del log[: self.CHANGE_LOG]

    @property
    def _root(self) -> FactTable:
        table = self
        while table._parent is not None:
            table = table._parent
        return table

    def committed_version(self, project: str, kind: str) -> tuple[int, int]:
        """``(token, version)`` of the committed facts of (``project``, ``kind``): the root
        table's token and how many puts of that kind it has taken."""
        root = self._root
        return root.token, root._versions.get((project, kind), 0)

    def committed_changes(self, project: str, kind: str, since: int) -> Collection[str] | None:
        """The ids of (``project``, ``kind``) put into the root table after its version
        ``since`` (each once); None when they are no longer all known."""
        root = self._root
        pair = (project, kind)
        version = root._versions.get(pair, 0)
        if since == version:
            return ()
        log = root._logs.get(pair, [])
        if since > version or version - since > len(log):
            return None
        return set(log[len(log) - (version - since) :])

    def committed_of_kind(self, project: str, kind: str) -> Mapping[str, Mapping[str, Any]]:
        """Every committed fact of (``project``, ``kind``), ``{id: data}``: the root table's
        own index (read only; it changes with the next put)."""
        return self._root._by_kind.get((project, kind), {})

    def pending(self, project: str, kind: str) -> Collection[str]:
        """The ids of (``project``, ``kind``) put into this overlay and the overlays under it
        (none for the root table)."""
        if self._parent is None:
            return ()
        own = self._by_kind.get((project, kind))
        below = self._parent.pending(project, kind)
        if not below:
            return own.keys() if own else ()
        return set(below).union(own or ())

    def _shared(self, text: str) -> str:
        """The pool's ``str`` equal to ``text`` (adding it while the pool has room)."""
        pooled = self._strings.get(text)
        if pooled is not None:
            return pooled
        if len(self._strings) < self.SHARED_MAX_STRINGS:
            self._strings[text] = text
        return text

    def _compact_mapping(self, data: Mapping[str, Any], depth: int) -> dict[str, Any]:
        return {self._shared(k): self._compact(v, depth + 1) for k, v in data.items()}

    def _compact(self, value: Any, depth: int) -> Any:
        if depth > self.COMPACT_MAX_DEPTH:
            return value
        if isinstance(value, str):
            return self._shared(value) if len(value) <= self.SHARED_MAX_CHARS else value
        if isinstance(value, dict):
            return self._compact_mapping(value, depth)
        if isinstance(value, list):
            return [self._compact(v, depth + 1) for v in value]
        return value

    def get(self, key: FactKey) -> Mapping[str, Any] | None:
        if self._by_kind:  # an overlay often holds nothing yet
            ids = self._by_kind.get((key[0], key[1]))
            if ids is not None:
                data = ids.get(key[2])
                if data is not None:
                    return data
        return self._parent.get(key) if self._parent else None

    def snapshot(self) -> dict[FactKey, Mapping[str, Any]]:
        """This table's own facts (not its parent's), ``{(project, kind, id): data}``, in a
        new dict."""
        return {
            (project, kind, id): data
            for (project, kind), ids in self._by_kind.items()
            for id, data in ids.items()
        }

    def of_kind(self, project: str, kind: str) -> Mapping[str, Mapping[str, Any]]:
        merged: dict[str, Mapping[str, Any]] = {}
        if self._parent:
            merged.update(self._parent.of_kind(project, kind))
        merged.update(self._by_kind.get((project, kind), {}))
        return merged
