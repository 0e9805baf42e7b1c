"""Query types: plain data saying what to select. Each backend translates them into its own
query language; nothing here knows SQL.

Visibility (``projects``) follows the API tokens: None sees every project; a set sees
entries of those projects and entries that belong to no project. The filter is part of
the query (applied before ``limit``), so a page of a restricted view is as full as any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gatekeeper.store.records import AUDIT_KINDS, AuditCursor, AuditKind

Projects = frozenset[str] | None
"""The projects a reader may see: None for all of them."""


@dataclass(frozen=True)
class OutboxFilter:
    """Narrows outbox queries of the dispatcher: ``target`` only that target;
    ``not_targets`` none of these; ``exclude_ids`` never these actions (e.g. the ones being
    delivered right now); ``ids`` only these actions when not None (e.g. the ones handed
    over in memory, to claim). The default selects every entry."""

    target: str | None = None
    not_targets: Sequence[str] = ()
    exclude_ids: Sequence[str] = ()
    ids: Sequence[str] | None = None


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the audit log.

    ``project``/``rule_id`` equal to; ``instance`` the item id of an instance of a
    per-item rule (``""``: entries about no instance); ``kinds`` of entry; ``outcome`` of
    decisions (other kinds pass); ``since`` inclusive, ``until`` exclusive (aware
    datetimes); ``after`` the cursor of the last entry of the previous page
    (``AuditEntry.cursor``); ``projects`` what
    the reader may see (see the module: an admin act with no project of its own, such as
    ``retry_action``, is seen through its action's project); ``limit`` entries at most
    (a positive int).
    """

    project: str | None = None
    rule_id: str | None = None
    instance: str | None = None
    kinds: tuple[AuditKind, ...] = AUDIT_KINDS
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: AuditCursor | None = None
    projects: Projects = None
    limit: int = 100
