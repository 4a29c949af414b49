"""
Schema version 5: edits, deletions, moderation, room settings, read markers, named presence.
"""

from chatd.store.migrations import forward_only, run_sql

revision = "v5"
down_revision = "v4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql("upgrade-to-v5.sql")


def downgrade() -> None:
    forward_only()
