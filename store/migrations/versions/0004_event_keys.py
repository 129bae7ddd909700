"""Run events may carry a writer's key: one event per (run, key), so a retried activity that
records the same event again adds no second row. Existing events have no key (NULL), and NULL
keys never collide, on SQLite as on PostgreSQL.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.add_column(sa.Column("key", sa.String(length=200), nullable=True))
        batch.create_index("uq_run_events_run_id_key", ["run_id", "key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("run_events") as batch:
        batch.drop_index("uq_run_events_run_id_key")
        batch.drop_column("key")
