"""Projects, consents and publish targets; who made runs and datasets; run idempotency keys.

Existing runs and datasets keep their project names: each name they use becomes a project.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("display_name", sa.String(), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "consents",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("speaker", sa.String(), nullable=False),
        sa.Column("statement", sa.String(), nullable=False),
        sa.Column("evidence_sha256", sa.String(), nullable=True),
        sa.Column("recorded_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.Column("revoked_by", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_consents_project", "consents", ["project"])
    op.create_table(
        "publish_targets",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("project", "name", name="uq_publish_targets_project_name"),
    )
    op.create_index("ix_publish_targets_project", "publish_targets", ["project"])

    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("created_by", sa.String(), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(), nullable=True))
        batch.create_index("uq_runs_project_idempotency_key", ["project", "idempotency_key"], unique=True)
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("created_by", sa.String(), nullable=True))

    conn = op.get_bind()
    names = conn.execute(sa.text("SELECT project FROM runs UNION SELECT project FROM datasets")).scalars().all()
    if names:
        op.bulk_insert(
            projects,
            [{"id": n, "display_name": n, "description": "", "created_by": None, "created_at": time.time()} for n in sorted(names)],
        )


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("created_by")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("uq_runs_project_idempotency_key")
        batch.drop_column("idempotency_key")
        batch.drop_column("created_by")
    op.drop_table("publish_targets")
    op.drop_table("consents")
    op.drop_table("projects")
