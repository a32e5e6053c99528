"""Track: the only module that changes the state of a series or a job.

Every transition of the state machine in ``docs/architecture.md`` is one function here, called
inside the caller's transaction (``with database.session() as s``), so a transition and the work
it records commit together or not at all. Audit events that belong to a transition are emitted
here too, so no stage can change a state without leaving the same trail.

    received -> complete -> queued -> processing -> sending -> done
                         \\-> ignored | unrouted | refused         \\-> failed(reason)

Instance and refusal rows are written here as well: recording an instance is the transition
that creates a series, reopens it, or marks it grown after processing.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import db
from .audit import AuditLog
from .attributes import SERIES_ATTRIBUTES, header_int, header_text
from .logs import log_event

log = logging.getLogger("dicom_node.track")


# ---------------------------------------------------------------------- receive
def record_instance(s: Session, audit: AuditLog, ds: Dataset, *, series_uid: str, sop_uid: str, sop_class: str,
                    ts_uid: str, rel: str, size: int, calling: str, peer: str, digest: str | None) -> db.Series:
    """Series upsert + instance insert (one transaction); a series that grows is reopened or
    flagged ``grown_after_processing``, never silently given a second output."""
    now = db.utcnow()
    series = db.series_by_uid(s, series_uid)
    # Late: the series' output has been (or is being) produced, whatever state the first late
    # instance moved the series to (so every late instance is counted).
    late = series is not None and (series.state in db.PROCESSED_STATES or any(
        j.processing_started_at is not None or j.state in db.PROCESSED_STATES for j in series.jobs))
    if series is None:
        series = db.Series(
            series_uid=series_uid, sop_class_uid=sop_class, calling_ae=calling, peer_address=peer,
            expected_count=header_int(ds, (0x0020, 0x1002)),  # Images in Acquisition
            instance_count=0, first_received_at=now, state=db.RECEIVED, state_changed_at=now,
            study_uid=header_text(ds, "StudyInstanceUID"),
            **{column: header_text(ds, keyword, size) for keyword, (column, size) in SERIES_ATTRIBUTES.items()},
        )
        s.add(series)
        s.flush()
        log_event(log, "series_started", series_uid=series_uid, study_uid=series.study_uid,
                  modality=series.modality, kernel=series.convolution_kernel, calling_ae=calling,
                  expected_count=series.expected_count)
        audit.series("received", series_uid, series.study_uid, calling_ae=calling, peer=peer)
    elif series.state in (db.COMPLETE, db.QUEUED, db.IGNORED, db.UNROUTED, db.REFUSED):
        # Not processed yet: drop the pending decision and wait for the series to be stable again.
        for job in series.jobs:
            if job.state == db.QUEUED:
                s.delete(job)
        log_event(log, "series_reopened", series_uid=series_uid, previous_state=series.state)
        _reopen(series)
    elif series.state in db.PROCESSED_STATES:
        # Output exists or is being produced: record, flag, and reprocess the whole series into
        # a new output series version once it is stable.
        series.grown_after_processing = True
        if series.state in (db.DONE, db.FAILED):
            log_event(log, "series_grown_after_processing", level=logging.WARNING, series_uid=series_uid,
                      previous_state=series.state)
            _reopen(series)
    if late:
        series.grown_after_processing = True
        series.late_instances += 1
    series.instance_count += 1
    series.last_received_at = now
    s.add(db.Instance(
        series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid=sop_class, transfer_syntax_uid=ts_uid,
        instance_number=header_int(ds, "InstanceNumber"), path=rel, size=size, received_at=now,
        calling_ae=calling, late=late, pixel_sha256=digest,
    ))
    return series


def is_known(s: Session, sop_uid: str) -> bool:
    return s.scalar(select(db.Instance.id).where(db.Instance.sop_instance_uid == sop_uid)) is not None


def known_sop_uids(s: Session, sop_uids: Sequence[str]) -> set[str]:
    """Which of ``sop_uids`` are recorded already (one query for a whole receive group)."""
    uids = sorted(set(sop_uids))
    known: set[str] = set()
    for i in range(0, len(uids), 500):  # below every backend's bound-parameter limit
        known.update(s.scalars(select(db.Instance.sop_instance_uid)
                               .where(db.Instance.sop_instance_uid.in_(uids[i:i + 500]))))
    return known


def instance_by_uid(s: Session, sop_uid: str) -> db.Instance | None:
    return s.scalars(select(db.Instance).where(db.Instance.sop_instance_uid == sop_uid)).first()


def record_anomaly(s: Session, series_id: int, kind: str, sop_uid: str | None, detail: str) -> None:
    """A finding on a series that does not change its state (duplicate, conflict, ...)."""
    s.add(db.Anomaly(series_id=series_id, kind=kind, sop_instance_uid=sop_uid, detail=detail))


def record_refusal(s: Session, *, calling_ae: str, peer: str, status: int, sop_uid: str, series_uid: str | None,
                   reason: str, quarantine: str | None) -> None:
    """An instance refused at receive time: never stored in the spool, kept with its reason."""
    s.add(db.Refusal(calling_ae=calling_ae, peer_address=peer, status=status, sop_instance_uid=sop_uid,
                     series_uid=series_uid, reason=reason, quarantine_path=quarantine))


def _reopen(series: db.Series) -> None:
    series.set_state(db.RECEIVED)
    series.completed_at = None


# ---------------------------------------------------------------------- decide
def complete(series: db.Series, audit: AuditLog, reason: str, now: datetime) -> None:
    """``received -> complete`` (committed on its own, so a restart routes it)."""
    series.completed_at = now
    series.complete_reason = reason
    series.set_state(db.COMPLETE)
    audit.series("completed", series.series_uid, series.study_uid, instances=series.instance_count, reason=reason)


def refuse_series(series: db.Series, audit: AuditLog, rule_name: str | None, reason: str) -> None:
    """``complete -> refused``: the series cannot be standardized as received (reason kept)."""
    series.rule_name = rule_name
    series.set_state(db.REFUSED, reason)
    audit.series("refused", series.series_uid, series.study_uid, success=False, reason=reason,
                 instances=series.instance_count)


def ignore(series: db.Series, rule_name: str | None, reason: str | None = None) -> None:
    series.rule_name = rule_name
    series.set_state(db.IGNORED, reason)


def unroute(series: db.Series) -> None:
    series.rule_name = None
    series.set_state(db.UNROUTED)


def queue(s: Session, series: db.Series, *, rule_name: str, model: str, destinations: Sequence[str], seed: int,
          qa_mode: str, now: datetime) -> db.Job:
    """``complete -> queued``: a new job version for the series."""
    series.rule_name = rule_name
    series.set_state(db.QUEUED)
    job = db.Job(series_id=series.id, version=len(series.jobs) + 1, state=db.QUEUED, rule_name=rule_name,
                 model=model, destinations=list(destinations), seed=seed, created_at=now,
                 qa_mode="forced" if series.qa_force else qa_mode)
    s.add(job)
    series.qa_force = False
    return job


# ---------------------------------------------------------------------- process
def claim(job: db.Job, now: datetime) -> None:
    """``queued -> processing`` for one job of a batch."""
    job.state = db.PROCESSING
    job.processing_started_at = now
    job.instance_count = job.series.instance_count
    job.attempts += 1
    job.error = None
    job.series.set_state(db.PROCESSING)


def processed(job: db.Job, audit: AuditLog, output_series_uid: str | None, rels: Sequence[tuple[str, str]],
              now: datetime) -> None:
    """``processing -> sending`` (one pending delivery per destination, per-instance send rows),
    or ``done`` when the rule has no destination."""
    job.output_series_uid = output_series_uid
    job.output_count = len(rels)
    job.processing_finished_at = now
    for name in job.destinations:
        d = db.Delivery(destination=name, state=db.PENDING, next_attempt_at=now)
        d.sends = [db.InstanceSend(sop_instance_uid=uid, path=rel) for uid, rel in rels]
        job.deliveries.append(d)
    if job.destinations:
        job.state = db.SENDING
        job.sending_started_at = now
        job.series.set_state(db.SENDING)
    else:
        finish(job, audit, now)
    audit.series("processed", job.series.series_uid, job.series.study_uid, instances=len(rels),
                 output_series_uid=output_series_uid)


def requeue(job: db.Job, note: str) -> None:
    """``processing -> queued`` (disk full while writing outputs: not the series' fault)."""
    job.state, job.processing_started_at, job.error = db.QUEUED, None, note
    job.series.set_state(db.QUEUED)
    log_event(log, "job_requeued", level=logging.WARNING, job=job.id, reason=note)


def refuse_job(job: db.Job, audit: AuditLog, reason: str, kind: str = "geometry") -> None:
    """``processing -> refused``: the model cannot (or must not) handle this series; the reason is
    kept and shown, never ``done`` with a warning."""
    now = db.utcnow()
    job.state, job.error, job.finished_at = db.REFUSED, reason, now
    job.processing_finished_at = now
    job.series.set_state(db.REFUSED, reason)
    job.series.anomalies.append(db.Anomaly(kind=kind, detail=reason))
    audit.series("refused", job.series.series_uid, job.series.study_uid, success=False, reason=reason,
                 instances=job.series.instance_count)
    log_event(log, "series_refused", level=logging.WARNING, job=job.id, reason=reason)


def fail(job: db.Job, audit: AuditLog, reason: str) -> None:
    """``processing -> failed`` with the reason."""
    job.processing_finished_at = job.processing_finished_at or db.utcnow()
    finish(job, audit, db.utcnow(), reason)


def finish(job: db.Job, audit: AuditLog, now: datetime, error: str | None = None) -> None:
    """Close a job (``done`` or ``failed``) and decide what its series does next: a series that
    grew while the job ran goes back to ``received`` and is reprocessed whole as a new version."""
    job.state = db.FAILED if error else db.DONE
    job.error = error
    job.finished_at = now
    series = job.series
    if job.instance_count is not None and series.instance_count > job.instance_count:
        series.grown_after_processing = True
        _reopen(series)
        log_event(log, "series_grown_after_processing", level=logging.WARNING, series_uid=series.series_uid,
                  job=job.id, processed=job.instance_count, now=series.instance_count)
    else:
        series.set_state(job.state, error)
    if error or job.deliveries:
        audit.series("failed" if error else "sent", series.series_uid, series.study_uid, success=not error,
                     reason=error, instances=job.output_count, output_series_uid=job.output_series_uid,
                     destination=",".join(d.destination for d in job.deliveries) or None)
    log_event(log, "job_finished", level=logging.INFO if not error else logging.WARNING, job=job.id,
              series_uid=series.series_uid, state=job.state, error=error)


# ---------------------------------------------------------------------- dispatch / admin
def resend(job: db.Job, now: datetime) -> None:
    """``done | failed -> sending`` for an output that exists on disk (no new model run)."""
    job.state, job.error, job.finished_at = db.SENDING, None, None
    job.sending_started_at = now
    job.series.set_state(db.SENDING)


def reopen_for_retry(series: db.Series, *, force: bool, stable_age_s: float) -> None:
    """``failed | refused | done | ignored | unrouted -> received``, already stable: the next scan
    routes it again into a new job version (``force``: its QA gate runs as ``flag``)."""
    _reopen(series)
    series.qa_force = bool(force)
    series.last_received_at = db.utcnow() - timedelta(seconds=stable_age_s)


def recover(s: Session) -> dict[str, int]:
    """After a restart: jobs left in ``processing`` are queued again (their partial output is
    rebuilt); ``sending`` jobs keep their per-instance send state and continue."""
    counts = {"requeued": 0, "sending": 0}
    for job in s.scalars(select(db.Job).where(db.Job.state == db.PROCESSING)):
        job.state = db.QUEUED
        job.processing_started_at = None
        job.series.set_state(db.QUEUED)
        counts["requeued"] += 1
    counts["sending"] = len(s.scalars(select(db.Job.id).where(db.Job.state == db.SENDING)).all())
    return counts

