"""Leased claims on SQLite and on a real PostgreSQL server: a job whose worker stopped renewing
its lease is claimed again by another worker, and the first worker, waking up late, can neither
overwrite the new owner's output nor commit over it. The schema Alembic builds on PostgreSQL is
the one the models describe."""
from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from dicom_node.store import db, migrate, track
from dicom_node.config import parse_config
from nodetools.peers import SCRATCH_DISK
from dicom_node.process.processor import Processor

from nodetools.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"leases_{tmp_path.name[-20:].lower()}".replace("-", "_"))


def test_postgres_schema_matches_the_models(postgres: PostgresServer) -> None:
    database = db.Database(postgres.create_database("schema"))
    assert migrate.upgrade(database.engine) == (None, migrate.head())
    with database.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), db.Base.metadata) == []
    assert migrate.upgrade(database.engine) == (migrate.head(), migrate.head())
    database.dispose()


def _worker(cfg: object, database: db.Database, owner: str) -> Processor:
    p = Processor(cfg, database)  # type: ignore[arg-type]
    p.owner = p.leases.owner = owner
    return p


def test_expired_lease_is_reclaimed_and_the_late_worker_is_fenced_off(tmp_path: Path, database_url: str) -> None:
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data"), "database_url": database_url, "lease_s": 0.5},
                        "disk": SCRATCH_DISK})
    database = db.Database(database_url)
    database.create_all()
    now = db.utcnow()
    with database.session() as s:
        series = db.Series(series_uid="1.2.826.0.1.3680043.10.999.1", state=db.COMPLETE, instance_count=0,
                           first_received_at=now, last_received_at=now, state_changed_at=now)
        s.add(series)
        s.flush()
    with database.session() as s:
        series = s.scalars(db.select(db.Series)).one()
        job = track.queue(s, series, rule_name="r", model="default", destinations=[], seed=0, qa_mode="off", now=now)
        s.flush()
        job_id = job.id

    slow = _worker(cfg, database, "host-a:1:process")
    assert [j for j, _, _ in slow._claim_batch()] == [job_id]
    other = _worker(cfg, database, "host-b:2:process")
    time.sleep(1.2)  # more than two lease lengths, renewed by the worker's lease thread meanwhile
    assert other._claim_batch() == []  # still held: nothing to take
    slow.leases.drop(job_id)  # the worker stalls: nobody renews its lease
    time.sleep(0.7)
    assert [j for j, _, _ in other._claim_batch()] == [job_id]  # expired: claimed again, same job id
    with database.session() as s:
        job = s.get_one(db.Job, job_id)
        assert (job.state, job.claimed_by, job.attempts) == (db.PROCESSING, "host-b:2:process", 2)

    out_dir = cfg.output_dir / f"job-{job_id}"

    def output(p: Processor, marker: str) -> Path:
        staging = p._staging(job_id)
        staging.mkdir(parents=True)
        (staging / "1.dcm").write_text(marker)
        return staging

    def record(p: Processor) -> object:
        return lambda job: track.processed(job, p.audit, "9.9", [("9.9.1", f"job-{job_id}/1.dcm")], db.utcnow(),
                                           owner=p.owner)

    # The late worker wakes up while the new owner is still running: no commit, nothing moved.
    with pytest.raises(track.LeaseLost):
        slow._commit_output(job_id, output(slow, "late"), out_dir, record(slow))
    assert not out_dir.exists()
    slow._fail(job_id, "late failure")  # a late failure changes nothing either
    other._commit_output(job_id, output(other, "owner"), out_dir, record(other))
    assert (out_dir / "1.dcm").read_text() == "owner"
    # ... or after the new owner committed: its output stays.
    with pytest.raises(track.LeaseLost):
        slow._commit_output(job_id, slow._staging(job_id), out_dir, record(slow))
    assert (out_dir / "1.dcm").read_text() == "owner"
    with database.session() as s:
        job = s.get_one(db.Job, job_id)
        assert (job.state, job.error, job.output_series_uid, job.claimed_by) == (db.DONE, None, "9.9", "host-b:2:process")
    slow.leases.close()
    other.leases.close()
    database.dispose()


def test_retention_removes_the_staged_output_of_a_dead_worker(tmp_path: Path) -> None:
    from dicom_node.admin import retention

    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data")}, "disk": SCRATCH_DISK})
    database = db.Database(cfg.db_url)
    database.create_all()
    now = db.utcnow()
    with database.session() as s:
        series = db.Series(series_uid="1.2.826.0.1.3680043.10.999.2", state=db.DONE, instance_count=0,
                           first_received_at=now, last_received_at=now, state_changed_at=now)
        s.add(series)
        s.flush()
        job = track.queue(s, series, rule_name="r", model="default", destinations=[], seed=0, qa_mode="off", now=now)
        s.flush()
        job_id = job.id
        series.set_state(db.DONE)
    for name in (f"job-{job_id}", f"job-{job_id}.host-a_1_process.part", f"job-{job_id + 1}.host-a_1_process.part"):
        (cfg.output_dir / name).mkdir(parents=True)
    assert retention.purge(cfg, database, older_than_days=0) == 1
    assert sorted(p.name for p in cfg.output_dir.iterdir()) == [f"job-{job_id + 1}.host-a_1_process.part"]
    database.dispose()


def test_recovery_frees_deliveries_held_by_a_gone_process(tmp_path: Path, database_url: str) -> None:
    """A process killed while sending leaves its delivery claimed under a long lease. At restart
    it is free at once: always on SQLite (the one process), and on a shared database when its
    owner is gone; a live dispatcher's claim is left alone."""
    database = db.Database(database_url)
    database.create_all()
    now = db.utcnow()
    with database.session() as s:
        series = db.Series(series_uid="1.2.9", instance_count=1, state=db.SENDING)
        job = db.Job(series=series, state=db.SENDING, rule_name="r", model="default", destinations=["A", "B"])
        for name, owner in (("A", "host:1:dispatch"), ("B", "host:2:dispatch")):
            job.deliveries.append(db.Delivery(destination=name, state=db.PENDING, next_attempt_at=now,
                                              claimed_by=owner, lease_expires_at=now + timedelta(hours=1)))
        s.add(series)
    exclusive = database_url.startswith("sqlite")
    with database.session() as s:
        counts = track.recover(s, exclusive=exclusive, dead=lambda owner: owner == "host:1:dispatch")
    assert counts["deliveries_released"] == (2 if exclusive else 1)
    with database.session() as s:
        claimed = {d.destination: d.claimed_by for d in s.scalars(select(db.Delivery))}
        assert claimed["A"] is None
        assert claimed["B"] == (None if exclusive else "host:2:dispatch")
        assert track.claim_delivery(s, db.utcnow(), "host:3:dispatch", 60) is not None  # A can be taken now
    database.dispose()
