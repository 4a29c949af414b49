"""
Schema version 4: identity: private rooms, members, users, sessions, invitations, API keys.
"""

from chatd.store.migrations import forward_only, run_sql

revision = "v4"
down_revision = "v3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql("upgrade-to-v4.sql")


def downgrade() -> None:
    forward_only()
