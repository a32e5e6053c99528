"""Initial schema: the tables as they were before schema versions were recorded.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

Also the adoption step of a database that predates Alembic (created by ``create_all`` of an
earlier version, possibly without the columns added since): missing tables are created, missing
columns are added in place (nullable at the SQL level: old rows read NULL, new rows get the ORM
default), nothing is dropped or changed. On an empty database it simply creates the schema.
The tables are frozen here, not imported from ``dicom_node.store.db``, so this revision always means
the same schema.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

META = sa.MetaData()

sa.Table("node", META,
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

sa.Table("refusals", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("received_at", sa.DateTime(), nullable=False),
    sa.Column("calling_ae", sa.String(length=16), nullable=True),
    sa.Column("peer_address", sa.String(length=64), nullable=True),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
    sa.Column("series_uid", sa.String(length=64), nullable=True),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("quarantine_path", sa.String(length=512), nullable=True),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_refusals_received_at", "received_at", unique=False),
)

sa.Table("series", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_uid", sa.String(length=64), nullable=False),
    sa.Column("study_uid", sa.String(length=64), nullable=True),
    sa.Column("modality", sa.String(length=16), nullable=True),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
    sa.Column("convolution_kernel", sa.String(length=64), nullable=True),
    sa.Column("manufacturer", sa.String(length=64), nullable=True),
    sa.Column("manufacturer_model", sa.String(length=64), nullable=True),
    sa.Column("station_name", sa.String(length=64), nullable=True),
    sa.Column("body_part", sa.String(length=64), nullable=True),
    sa.Column("series_description", sa.String(length=128), nullable=True),
    sa.Column("series_number", sa.String(length=16), nullable=True),
    sa.Column("calling_ae", sa.String(length=16), nullable=True),
    sa.Column("peer_address", sa.String(length=64), nullable=True),
    sa.Column("expected_count", sa.Integer(), nullable=True),
    sa.Column("instance_count", sa.Integer(), nullable=False),
    sa.Column("first_received_at", sa.DateTime(), nullable=False),
    sa.Column("last_received_at", sa.DateTime(), nullable=False),
    sa.Column("completed_at", sa.DateTime(), nullable=True),
    sa.Column("complete_reason", sa.String(length=32), nullable=True),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("state_changed_at", sa.DateTime(), nullable=False),
    sa.Column("rule_name", sa.String(length=64), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("grown_after_processing", sa.Boolean(), nullable=False),
    sa.Column("late_instances", sa.Integer(), nullable=False),
    sa.Column("qa_force", sa.Boolean(), nullable=True),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_series_last_received_at", "last_received_at", unique=False),
    sa.Index("ix_series_series_uid", "series_uid", unique=True),
    sa.Index("ix_series_state", "state", unique=False),
)

sa.Table("anomalies", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("kind", sa.String(length=32), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
    sa.Column("detail", sa.Text(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_anomalies_series_id", "series_id", unique=False),
)

sa.Table("instances", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
    sa.Column("instance_number", sa.Integer(), nullable=True),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("size", sa.Integer(), nullable=False),
    sa.Column("received_at", sa.DateTime(), nullable=False),
    sa.Column("calling_ae", sa.String(length=16), nullable=True),
    sa.Column("late", sa.Boolean(), nullable=False),
    sa.Column("pixel_sha256", sa.String(length=64), nullable=True),
    sa.Column("excluded", sa.String(length=128), nullable=True),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_instances_received_at", "received_at", unique=False),
    sa.Index("ix_instances_series_id", "series_id", unique=False),
    sa.Index("ix_instances_sop_instance_uid", "sop_instance_uid", unique=True),
)

sa.Table("jobs", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("rule_name", sa.String(length=64), nullable=False),
    sa.Column("model", sa.String(length=512), nullable=False),
    sa.Column("destinations", sa.JSON(), nullable=False),
    sa.Column("instance_count", sa.Integer(), nullable=True),
    sa.Column("model_name", sa.String(length=128), nullable=True),
    sa.Column("model_version", sa.String(length=64), nullable=True),
    sa.Column("model_sha256", sa.String(length=64), nullable=True),
    sa.Column("method", sa.String(length=64), nullable=True),
    sa.Column("sampler", sa.JSON(), nullable=True),
    sa.Column("seed", sa.Integer(), nullable=True),
    sa.Column("device", sa.String(length=32), nullable=True),
    sa.Column("output_series_uid", sa.String(length=64), nullable=True),
    sa.Column("output_count", sa.Integer(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("processing_started_at", sa.DateTime(), nullable=True),
    sa.Column("processing_finished_at", sa.DateTime(), nullable=True),
    sa.Column("read_s", sa.Float(), nullable=True),
    sa.Column("model_s", sa.Float(), nullable=True),
    sa.Column("derive_s", sa.Float(), nullable=True),
    sa.Column("sending_started_at", sa.DateTime(), nullable=True),
    sa.Column("finished_at", sa.DateTime(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("qa_mode", sa.String(length=8), nullable=True),
    sa.Column("qa", sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_jobs_series_id", "series_id", unique=False),
    sa.Index("ix_jobs_state", "state", unique=False),
)

sa.Table("deliveries", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("job_id", sa.Integer(), nullable=False),
    sa.Column("destination", sa.String(length=64), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
    sa.Column("started_at", sa.DateTime(), nullable=True),
    sa.Column("finished_at", sa.DateTime(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_deliveries_job_id", "job_id", unique=False),
    sa.Index("ix_deliveries_state", "state", unique=False),
)

sa.Table("instance_sends", META,
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("delivery_id", sa.Integer(), nullable=False),
    sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
    sa.Column("path", sa.String(length=512), nullable=False),
    sa.Column("state", sa.String(length=16), nullable=False),
    sa.Column("status", sa.Integer(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("sent_at", sa.DateTime(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"], ondelete="CASCADE"),
    sa.PrimaryKeyConstraint("id"),
    sa.Index("ix_instance_sends_delivery_id", "delivery_id", unique=False),
)


def upgrade() -> None:
    bind = op.get_bind()
    insp = sa.inspect(bind)
    existing = set(insp.get_table_names())
    META.create_all(bind, tables=[t for t in META.sorted_tables if t.name not in existing])
    for table in META.sorted_tables:
        if table.name not in existing:
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and not col.primary_key:
                op.add_column(table.name, sa.Column(col.name, col.type, nullable=True))


def downgrade() -> None:
    META.drop_all(op.get_bind())
