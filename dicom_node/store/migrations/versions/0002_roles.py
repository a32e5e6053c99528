"""Roles on one shared queue: job and delivery leases, one heartbeat row per process.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

``claimed_by`` (``host:pid:role``) and ``lease_expires_at`` on jobs and deliveries: a worker owns
what it claimed until its lease expires; a lease that is not renewed (the worker died) lets
another worker claim the job again. The per-AE ``node`` heartbeat becomes ``heartbeats``: one row
per running process (host, pid, roles), so ``dicom-node status`` shows every role of every host.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "deliveries"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
            batch.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    op.create_table(
        "heartbeats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("roles", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hostname", "pid", name="uq_heartbeats_host_pid"),
    )
    op.drop_table("node")  # liveness only: nothing to carry over


def downgrade() -> None:
    op.create_table(
        "node",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(length=128), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("ae_title"),
    )
    op.drop_table("heartbeats")
    for table in ("deliveries", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_expires_at")
            batch.drop_column("claimed_by")
