"""Retry and resend are events, not rewritten history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

``series.retry_requested_at``: when ``dicom-node retry`` re-opened the series. The completeness
scan routes it again at once when no instance arrived since, so ``last_received_at`` (and the
receive duration ``status`` shows) stay what happened. ``deliveries.resent_at`` and
``deliveries.attempts_before_resend``: a resend gives the delivery a fresh retry budget while its
attempt count keeps counting and its first start stays.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("retry_requested_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("resent_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("attempts_before_resend", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("attempts_before_resend")
        batch.drop_column("resent_at")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("retry_requested_at")
