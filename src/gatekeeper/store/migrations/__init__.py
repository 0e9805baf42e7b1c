"""Schema migrations as files, one folder per backend (``sqlite/``, ``postgresql/``):
``NNNN_name.sql``, applied in the order of their number, each once, each in its own
transaction together with the record of its version. A migration, once released, is never
edited: a change is a new file. Statements are separated by ``;``; comments are whole lines
starting with ``--``.

A schema version means the same tables on every backend: a backend added later starts
at the version of the schema it was added with (``postgresql/`` at 12, the whole schema in
one file), and from there every change is one migration per backend, numbered alike."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration: its version (1, 2, ...), name and SQL statements."""

    version: int
    name: str
    statements: tuple[str, ...]


def load_migrations(backend: str, first: int = 1) -> tuple[Migration, ...]:
    """The migrations of ``backend`` (a folder of this package), in version order.

    Raises ``RuntimeError`` when the versions are not exactly ``first``, ``first`` + 1,
    ..., n (a gap or a duplicate means a broken installation)."""
    folder = resources.files(__package__).joinpath(backend)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        text = entry.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
        statements = tuple(s for s in "\n".join(lines).split(";") if s.strip())
        found.append(Migration(int(match.group(1)), match.group(2), statements))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(first, first + len(found))):
        raise RuntimeError(
            f"{backend} migrations are not numbered {first}..n: {[m.version for m in found]}"
        )
    return tuple(found)
