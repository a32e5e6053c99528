"""Retention: delete finished series (spool, quarantine, outputs, rows) after ``retention.days``.

Series still in progress are never purged; records of refused instances age out with the same
retention.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import NodeConfig
from dicom_node.logs import log_event
from dicom_node.store.spool import safe_name

log = logging.getLogger("dicom_node.admin.retention")

FINISHED_STATES = (db.DONE, db.FAILED, db.IGNORED, db.UNROUTED, db.REFUSED)


def purge(config: NodeConfig, database: db.Database, older_than_days: float | None = None,
          states: Sequence[str] | None = None, dry_run: bool = False) -> int:
    """Delete finished series last received more than N days ago; returns how many
    (``dry_run``: how many would go, nothing deleted)."""
    days = config.retention.days if older_than_days is None else older_than_days
    states = tuple(states or FINISHED_STATES)
    cutoff = db.utcnow() - timedelta(days=days)
    n = 0
    with database.session() as s:
        for series in s.scalars(select(db.Series).where(db.Series.state.in_(states),
                                                        db.Series.last_received_at <= cutoff)):
            if dry_run:
                n += 1
                continue
            shutil.rmtree(config.spool_dir / safe_name(series.series_uid), ignore_errors=True)
            shutil.rmtree(config.quarantine_dir / safe_name(series.series_uid), ignore_errors=True)
            for job in series.jobs:
                shutil.rmtree(config.output_dir / f"job-{job.id}", ignore_errors=True)
                for staged in config.output_dir.glob(f"job-{job.id}.*.part"):  # left by a worker that died
                    shutil.rmtree(staged, ignore_errors=True)
            s.delete(series)
            n += 1
        if dry_run:
            return n
        for r in s.scalars(select(db.Refusal).where(db.Refusal.received_at <= cutoff)):
            s.delete(r)
    if n:
        log_event(log, "purged", series=n, older_than_days=days, states=",".join(states))
    return n
