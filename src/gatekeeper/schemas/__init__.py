"""The JSON Schemas (draft 2020-12) of rule files, ``gatekeeper.yaml`` and request bodies.

They are package data, ``gatekeeper/schemas/*.json`` (in a wheel too); the repository's
``schemas/`` is a link to that folder, which editors point at through a
``# yaml-language-server: $schema=...`` comment.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIRS = (Path(__file__).resolve().parent,)


def schema_path(name: str) -> Path:
    """Where schema file ``name`` (e.g. ``rules.schema.json``) lives.

    Raises ``FileNotFoundError`` naming the folders looked in.
    """
    for folder in SCHEMA_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"schema {name!r} not found in {', '.join(map(str, SCHEMA_DIRS))}")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``name``, cached. Raises ``FileNotFoundError`` when it is missing."""
    schema: dict[str, Any] = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return schema
