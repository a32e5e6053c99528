"""Admin re-runs: re-send an existing output series without running the model, or reprocess.

A delivery that failed (PACS down past the retry budget, PACS lost the series) needs the same
output sent again, not a new output series: a second run would create new UIDs and leave two
standardized series in the PACS. ``resend`` puts the deliveries of the series' latest output back
to ``pending``; the running node's send step picks them up (with a fresh retry budget).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.store import db, track
from dicom_node.audit import audit_for
from dicom_node.config import NodeConfig
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.admin.resend")


class ResendError(ValueError):
    """The series has no output that can be re-sent (message says why)."""


@dataclass
class ResendResult:
    series_uid: str
    job: int
    output_series_uid: str | None
    deliveries: int
    instances: int


def output_job(config: NodeConfig, series: db.Series) -> db.Job | None:
    """The latest job whose output series is complete on disk, else ``None``."""
    for job in reversed(series.jobs):
        if job.output_series_uid and job.deliveries and all(
                (config.output_dir / x.path).is_file() for d in job.deliveries for x in d.sends):
            return job
    return None


def queue_resend(s: Session, config: NodeConfig, series: db.Series, *, destination: str | None = None,
                 only_unsent: bool = False) -> ResendResult:
    """Mark the latest output's deliveries pending again (all instances, or only unsent ones)."""
    if series.state in (db.QUEUED, db.PROCESSING, db.SENDING):
        raise ResendError(f"series {series.series_uid} is {series.state}; wait until it is done or failed")
    job = output_job(config, series)
    if job is None:
        raise ResendError(f"series {series.series_uid} has no output on disk to re-send (use retry to reprocess)")
    now = db.utcnow()
    deliveries = [d for d in job.deliveries if destination is None or d.destination == destination]
    if not deliveries:
        raise ResendError(f"job {job.id} has no delivery to {destination!r}")
    n = track.resend(job, deliveries, audit_for(config), now, only_unsent=only_unsent)
    log_event(log, "resend_queued", series_uid=series.series_uid, job=job.id, instances=n,
              destinations=",".join(d.destination for d in deliveries), only_unsent=only_unsent)
    return ResendResult(series.series_uid, job.id, job.output_series_uid, len(deliveries), n)


def resend(config: NodeConfig, database: db.Database, series_uid: str, *, destination: str | None = None,
           only_unsent: bool = False) -> ResendResult:
    with database.session() as s:
        series = db.series_by_uid(s, series_uid)
        if series is None:
            raise ResendError(f"series {series_uid} not found")
        return queue_resend(s, config, series, destination=destination, only_unsent=only_unsent)


def retry(config: NodeConfig, database: db.Database, series_uid: str | None = None, failed: bool = False,
          force: bool = False) -> tuple[int, list[str]]:
    """Queue a series again (a new job version); with ``failed`` every failed series. Returns the
    number of series handled and the UIDs of those re-sent rather than reprocessed.

    A failed series whose output exists on disk (it failed in delivery) is re-sent instead: only
    its unacknowledged instances, no new model run, no second output series. ``force``: the next
    job runs the QA gate as ``flag`` (a refused series is standardized and the warning recorded);
    it does not apply to a re-send, whose output already passed."""
    n = 0
    resent: list[str] = []
    with database.session() as s:
        q = select(db.Series)
        q = q.where(db.Series.state == db.FAILED) if failed else q.where(db.Series.series_uid == series_uid)
        for series in s.scalars(q):
            if series.state in (db.QUEUED, db.PROCESSING, db.SENDING, db.RECEIVED):
                continue
            # Re-send only when the latest job holds the output: a later job that failed without
            # output (model error) is reprocessed, not replaced by old output.
            job = output_job(config, series)
            if failed and not series.grown_after_processing and job is not None and job is series.jobs[-1]:
                queue_resend(s, config, series, only_unsent=True)
                resent.append(series.series_uid)
                n += 1
                continue
            track.reopen_for_retry(series, force=force)
            n += 1
    return n, resent
