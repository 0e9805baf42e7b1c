"""The JSON Schemas are package data, so an installed wheel finds them without the
repository."""

from __future__ import annotations

from pathlib import Path

import gatekeeper
from gatekeeper.schemas import load_schema, schema_path

PACKAGE = Path(gatekeeper.__file__).resolve().parent


def test_every_schema_is_found_inside_the_package() -> None:
    names = sorted(p.name for p in (PACKAGE / "schemas").glob("*.schema.json"))
    assert names == [
        "config.schema.json",
        "facts-request.schema.json",
        "rule-tests.schema.json",
        "rules.schema.json",
    ]
    for name in names:
        assert schema_path(name).parent == PACKAGE / "schemas"
        assert load_schema(name)["$schema"].startswith("https://json-schema.org/")


def test_the_repository_folder_editors_use_is_the_same_files() -> None:
    repo_schemas = PACKAGE.parents[1] / "schemas"
    if not repo_schemas.exists():  # an installed wheel, not a checkout
        return
    assert repo_schemas.resolve() == (PACKAGE / "schemas").resolve()
