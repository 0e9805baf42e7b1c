"""A located problem: what is wrong, and exactly where.

Every loader (rule files, ``gatekeeper.yaml``) reports its findings as ``Problem`` values
so that ``gatekeeper check`` can print them as text, JSON or GitHub workflow commands,
and the daemon can show them in its log and in ``GET /v1/rules``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One problem found in a file.

    ``line`` and ``column`` are 1-based (0 when unknown, e.g. a file that cannot be read).
    ``path`` is the key path inside the document, e.g. ``actions[0].release.target``
    (empty for the document itself). ``rule_id`` names the rule when one is known.
    """

    file: str
    line: int
    column: int
    message: str
    path: str = ""
    rule_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The problem as a JSON-ready dict (keys: file, line, column, path, rule_id, message)."""
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        parts = [where]
        if self.rule_id:
            parts.append(f"rule {self.rule_id!r}")
        if self.path:
            parts.append(self.path)
        return ": ".join(parts) + ": " + self.message


def format_path(parts: list[str | int] | tuple[str | int, ...]) -> str:
    """Join a JSON/YAML key path: ``["actions", 0, "release"]`` -> ``actions[0].release``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
