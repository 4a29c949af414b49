"""
Schema version 1: rooms and messages.
"""

from chatd.store.migrations import forward_only, run_sql

revision = "v1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql("v1.sql")


def downgrade() -> None:
    forward_only()
