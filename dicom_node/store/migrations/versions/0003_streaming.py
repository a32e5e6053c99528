"""Streaming: slices standardized while their series is still arriving.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

``jobs.streamed`` (the job was created while the series was received) and
``jobs.streamed_slices`` (cached outputs used when it was processed); ``stream_slices`` holds one
row per cached per-slice model output (``dicom_node.process.stream``).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("streamed", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("streamed_slices", sa.Integer(), nullable=True))
    op.create_table(
        "stream_slices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("fingerprint", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_stream_slices_job_id", "stream_slices", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_stream_slices_job_id", table_name="stream_slices")
    op.drop_table("stream_slices")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("streamed_slices")
        batch.drop_column("streamed")
