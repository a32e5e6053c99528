"""Persistent state: series, instances, processing jobs, deliveries, and process heartbeats.

The database is the single source of truth shared by the receiver, the scheduled jobs and
``dicom-node status``; each state change is one committed transaction, so a restart sees exactly
what had happened. Only portable column types are used (no SQLite-only features), so a
PostgreSQL URL works when several processes (roles) share one queue. The schema is versioned by
Alembic (``dicom_node/migrations``); a change to these models comes with a new revision.

Series states (what an admin sees)::

    received -> complete -> queued -> processing -> sending -> done
                        \\-> ignored | unrouted               \\-> failed(reason)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

# Series states
RECEIVED = "received"
COMPLETE = "complete"
QUEUED = "queued"
PROCESSING = "processing"
SENDING = "sending"
DONE = "done"
FAILED = "failed"
IGNORED = "ignored"
UNROUTED = "unrouted"
SERIES_STATES = (RECEIVED, COMPLETE, QUEUED, PROCESSING, SENDING, DONE, FAILED, IGNORED, UNROUTED)
# A series refused before processing (inconsistent slices, geometry the model cannot handle),
# kept with the reason; only `retry` after a configuration change queues it again.
REFUSED = "refused"
SERIES_STATES = SERIES_STATES + (REFUSED,)
# Job state of a routed series still being received: settled slices are standardized ahead and
# their outputs cached (dicom_node.process.stream); the series itself stays `received` until complete.
STREAMING = "streaming"
# Series whose output has been (or is being) produced: a late instance means "grown after processing".
PROCESSED_STATES = (PROCESSING, SENDING, DONE, FAILED)

# Delivery / instance-send states
PENDING = "pending"
SENT = "sent"


def utcnow() -> datetime:
    """Naive UTC timestamps: portable across SQLite (no tz support) and PostgreSQL."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Series(Base):
    """One received series (keyed by SeriesInstanceUID) and its current state."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(128))
    series_number: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    expected_count: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    complete_reason: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=RECEIVED, index=True)
    state_changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    rule_name: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    grown_after_processing: Mapped[bool] = mapped_column(Boolean, default=False)
    late_instances: Mapped[int] = mapped_column(Integer, default=0)
    qa_force: Mapped[bool | None] = mapped_column(Boolean, default=False)  # `retry --force`: next job flags
    # `retry`: routed again at once while no instance arrived since (last_received_at stays as received)
    retry_requested_at: Mapped[datetime | None] = mapped_column(DateTime)

    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")
    anomalies: Mapped[list[Anomaly]] = relationship(back_populates="series", cascade="all, delete-orphan",
                                                    order_by="Anomaly.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", cascade="all, delete-orphan", order_by="Job.id")

    def set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.state_changed_at = utcnow()
        self.error = error


class Instance(Base):
    """One received SOP instance; ``path`` is relative to the spool directory."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))  # of the PixelData value as received
    excluded: Mapped[str | None] = mapped_column(String(128))  # kept but not standardized, and why

    series: Mapped[Series] = relationship(back_populates="instances")


class Anomaly(Base):
    """Something odd about a series, recorded for provenance: gap, duplicate, conflict, late
    instance, localizer, mixed kernels... (``kind`` is a short keyword, ``detail`` the why)."""

    __tablename__ = "anomalies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="anomalies")


class Refusal(Base):
    """An instance refused at receive (failure status sent): what, from whom, why. UIDs are
    stored as received but cut to the column size (a refused UID may be over-long or hostile)."""

    __tablename__ = "refusals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    quarantine_path: Mapped[str | None] = mapped_column(String(512))


class Job(Base):
    """One processing run of a series (its provenance). A series that grows after processing
    gets a new job with ``version`` + 1 and a new output series; earlier jobs stay recorded."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(512))  # "default" or checkpoint path
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    instance_count: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(64))
    sampler: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    seed: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))
    output_series_uid: Mapped[str | None] = mapped_column(String(64))
    output_count: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    processing_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    processing_finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    read_s: Mapped[float | None] = mapped_column(Float)
    model_s: Mapped[float | None] = mapped_column(Float)
    derive_s: Mapped[float | None] = mapped_column(Float)
    sending_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    qa_mode: Mapped[str | None] = mapped_column(String(8))      # refuse | flag | off (the rule's), forced (`retry --force`)
    qa: Mapped[dict[str, Any] | None] = mapped_column(JSON)     # QA gate record (dicom_node.process.qa_gate)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # host:pid:role of the processing worker
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)  # renewed while it runs
    streamed: Mapped[bool | None] = mapped_column(Boolean, default=False)  # created while receiving
    streamed_slices: Mapped[int | None] = mapped_column(Integer)  # cached outputs used at processing
    # What the processing takes from the rule, frozen at routing: {"steps": N or null (the model's
    # default)}. NULL: routed before it was kept; the live rule's steps apply (dicom_node.process.run).
    rule_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    series: Mapped[Series] = relationship(back_populates="jobs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", cascade="all, delete-orphan")
    stream_slices: Mapped[list[StreamSlice]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                            passive_deletes=True)


class StreamSlice(Base):
    """One slice standardized while its series was still arriving: the model output (float32
    ``.npy`` under ``output_dir``) and what it was computed with, so it is used only when the
    job's model, sampler and seed and the instance are still the same (``fingerprint``)."""

    __tablename__ = "stream_slices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the output directory
    fingerprint: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="stream_slices")


class Delivery(Base):
    """Sending one job's output series to one destination (one association per attempt)."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # host:pid:role of the sending dispatcher
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    # `resend`: when, and the attempts made before it (the retry budget starts again from there)
    resent_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts_before_resend: Mapped[int | None] = mapped_column(Integer)

    job: Mapped[Job] = relationship(back_populates="deliveries")
    sends: Mapped[list[InstanceSend]] = relationship(back_populates="delivery", cascade="all, delete-orphan")


class InstanceSend(Base):
    """Per-instance send state for one delivery: the C-STORE status the destination returned."""

    __tablename__ = "instance_sends"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # relative to the output directory
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    status: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[Delivery] = relationship(back_populates="sends")


class Heartbeat(Base):
    """Liveness of one running ``dicom-node serve`` process (one row per host and PID): which
    roles it runs, and for a receiver its AE title and port. Read by ``dicom-node status`` from
    any host sharing the database."""

    __tablename__ = "heartbeats"
    __table_args__ = (UniqueConstraint("hostname", "pid", name="uq_heartbeats_host_pid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(64))  # comma list, e.g. "receive,decide"
    ae_title: Mapped[str | None] = mapped_column(String(16))
    port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    model: Mapped[str | None] = mapped_column(String(256))
    device: Mapped[str | None] = mapped_column(String(32))
    version: Mapped[str | None] = mapped_column(String(64))

    @property
    def role_list(self) -> list[str]:
        return [r for r in self.roles.split(",") if r]


def make_engine(url: str) -> Engine:
    """Engine with WAL and a busy timeout on SQLite, so the receiver and the scheduled jobs can
    write concurrently without "database is locked" errors."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a committed instance survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


class Database:
    """Engine + session factory; ``create_all`` upgrades the schema to the newest revision
    (:mod:`dicom_node.store.migrate`), so starting the node migrates an empty or older database."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def shared(self) -> bool:
        """Several processes may use this database at once (PostgreSQL); SQLite serves one process."""
        return self.engine.dialect.name != "sqlite"

    def create_all(self) -> None:
        from dicom_node.store.migrate import upgrade

        upgrade(self.engine)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any exception."""
        s = self.Session()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def series_by_uid(s: Session, uid: str) -> Series | None:
    return s.scalars(select(Series).where(Series.series_uid == uid)).first()
