"""
Schema version 2: rooms.first_seq, for retention.
"""

from chatd.store.migrations import forward_only, run_sql

revision = "v2"
down_revision = "v1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql("upgrade-to-v2.sql")


def downgrade() -> None:
    forward_only()
