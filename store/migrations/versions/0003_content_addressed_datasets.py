"""Uploads are content-addressed per project: one dataset per (project, sha256).

Databases from before this held a new dataset for every upload of the same file (the CLI
uploaded on every preflight). Each group of duplicates is merged into its oldest row: runs
that named a duplicate now name that row, and the duplicate's id is kept as an alias, so
specs and links that carry it still resolve.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    aliases = op.create_table(
        "dataset_aliases",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("dataset_id", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dataset_aliases_dataset_id", "dataset_aliases", ["dataset_id"])

    conn = op.get_bind()
    rows = conn.execute(
        sa.text("SELECT id, project, sha256 FROM datasets ORDER BY project, sha256, created_at, id")
    ).all()
    keep: dict[tuple[str, str], str] = {}
    merged = []
    for ds_id, project, sha256 in rows:
        survivor = keep.setdefault((project, sha256), ds_id)
        if survivor != ds_id:
            merged.append({"id": ds_id, "dataset_id": survivor})
    if merged:
        op.bulk_insert(aliases, merged)
        for m in merged:
            conn.execute(sa.text("UPDATE runs SET dataset = :new WHERE dataset = :old"), {"new": m["dataset_id"], "old": m["id"]})
            conn.execute(sa.text("DELETE FROM datasets WHERE id = :old"), {"old": m["id"]})
    with op.batch_alter_table("datasets") as batch:
        batch.create_index("uq_datasets_project_sha256", ["project", "sha256"], unique=True)


def downgrade() -> None:
    # Merged duplicates stay merged: they were the same bytes in the same project.
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index("uq_datasets_project_sha256")
    op.drop_index("ix_dataset_aliases_dataset_id", table_name="dataset_aliases")
    op.drop_table("dataset_aliases")
