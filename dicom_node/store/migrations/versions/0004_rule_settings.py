"""A job keeps the rule's settings it was routed with.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

``jobs.rule_settings`` (JSON, ``{"steps": N or null}``): what the processing takes from the rule,
frozen when the series is routed, as the model, seed and destinations already are. Jobs routed
before this revision keep NULL and take the live rule's steps, as they did.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rule_settings", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("rule_settings")
