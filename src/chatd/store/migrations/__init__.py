# -*- test-case-name: tests.test_store -*-
"""
chatd's schema migrations, run by Alembic (L{chatd.store._sql.SQLStore.open}):
one revision per schema version, C{v1} to the newest, each running its
backend's SQL file (C{schema/<backend>/v1.sql}, then
C{upgrade-to-vN.sql}), so that the SQL stays the one description of the
schema and Alembic keeps track of which steps a database has had.
"""

from __future__ import annotations

from alembic import op

from chatd.store._schema import schema_files, statements

__all__ = ["run_sql"]


def run_sql(name: str) -> None:
    """
    Run one of the current backend's schema files, a statement at a time.
    """
    backend = op.get_bind().dialect.name
    for statement in statements(schema_files(backend, name)):
        op.execute(statement)


def forward_only() -> None:
    """
    chatd's schema goes forward only: a downgrade is a restore.
    """
    raise NotImplementedError("chatd's schema cannot be downgraded; restore a backup instead")
