"""The JSON Schemas (draft 2020-12) shipped in the repository's ``schemas/`` folder."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMAS_DIR = Path(__file__).resolve().parent.parent.parent / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``schemas/<name>`` (e.g. ``rules.schema.json``), cached.

    Raises ``FileNotFoundError`` when gatekeeper was installed without its schemas folder.
    """
    with open(SCHEMAS_DIR / name, encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema
