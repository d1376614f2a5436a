"""Shared by the package's tests: where the shipped JSON Schema files are."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest

#: schemas/json of the repository, or CALLQ_SCHEMAS_DIR.
SCHEMAS = Path(os.environ.get("CALLQ_SCHEMAS_DIR") or Path(__file__).resolve().parents[3] / "schemas" / "json")


def load_schema(name: str) -> Dict[str, Any]:
    path = SCHEMAS / f"{name}.v1.schema.json"
    if not path.is_file():
        pytest.fail(f"no {path}: run the tests from the repository, or set CALLQ_SCHEMAS_DIR to its schemas/json")
    schema: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def pytest_collection_modifyitems(config: pytest.Config, items: "list[pytest.Item]") -> None:
    """Marks the cluster tests (in test_cluster*.py) ``broker``."""
    for item in items:
        if item.fspath.basename.startswith("test_cluster"):
            item.add_marker(pytest.mark.broker)
