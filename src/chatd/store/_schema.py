# -*- test-case-name: tests.test_store -*-
"""
The schema files shipped with chatd, as the migrations read them.
"""

from __future__ import annotations

import importlib.resources
from typing import List

__all__ = ["schema_files", "statements"]


def schema_files(backend: str, name: str) -> str:
    """
    Read one of the schema files shipped with chatd.
    """
    return (
        importlib.resources.files("chatd.store") / "schema" / backend / name
    ).read_text(encoding="utf-8")


def statements(script: str) -> List[str]:
    """
    Split a schema file into statements (our files keep semicolons out of
    strings and comments).
    """
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
