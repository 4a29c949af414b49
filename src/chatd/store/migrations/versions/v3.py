"""
Schema version 3: presence leases and the deployment's name.
"""

from chatd.store.migrations import forward_only, run_sql

revision = "v3"
down_revision = "v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql("upgrade-to-v3.sql")


def downgrade() -> None:
    forward_only()
