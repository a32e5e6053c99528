"""Track: the only module that changes the state of a series, a job or a delivery.

Every transition of the state machine in ``docs/architecture.md`` is one function here, called
inside the caller's transaction (``with database.session() as s``), so a transition and the work
it records commit together or not at all. Audit events that belong to a transition are emitted
here too, so no stage can change a state without leaving the same trail.

    received -> complete -> queued -> processing -> sending -> done
                         \\-> ignored | unrouted | refused         \\-> failed(reason)

A routed series still being received may have a job in ``streaming`` (``start_stream``): its
settled slices are standardized ahead (:mod:`dicom_node.process.stream`); at completion ``queue`` takes
that job over, any other outcome drops it (``drop_stream``) with its cached outputs.

Instance and refusal rows are written here as well: recording an instance is the transition
that creates a series, reopens it, or marks it grown after processing. So are deliveries and
their per-instance send rows (claim, each acknowledged instance, the attempt's outcome, sent /
failed / due again, release, re-send); the dispatcher decides which of them applies.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from pydicom.dataset import Dataset
from sqlalchemy import bindparam, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.store import db
from dicom_node.audit import AuditLog
from dicom_node.attributes import SERIES_ATTRIBUTES, header_int, header_text
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.store.track")


# ---------------------------------------------------------------------- receive
def record_instance(s: Session, audit: AuditLog, ds: Dataset, *, series_uid: str, sop_uid: str, sop_class: str,
                    ts_uid: str, rel: str, size: int, calling: str, peer: str, digest: str | None) -> db.Series:
    """Series upsert + instance insert (one transaction); a series that grows is reopened or
    flagged ``grown_after_processing``, never silently given a second output."""
    now = db.utcnow()
    series = db.series_by_uid(s, series_uid) or _start_series(
        s, audit, ds, series_uid=series_uid, sop_class=sop_class, calling=calling, peer=peer, now=now)
    # Late: the series' output has been (or is being) produced, whatever state the first late
    # instance moved the series to (so every late instance is counted).
    late = series.state in db.PROCESSED_STATES or any(
        j.processing_started_at is not None or j.state in db.PROCESSED_STATES for j in series.jobs)
    if series.state in (db.COMPLETE, db.QUEUED, db.IGNORED, db.UNROUTED, db.REFUSED):
        # Not processed yet: drop the pending decision and wait for the series to be stable again
        # (a job that was streaming goes back to streaming: its cached slices stay valid).
        for job in series.jobs:
            if job.state == db.QUEUED and job.streamed:
                job.state = db.STREAMING
            elif job.state == db.QUEUED:
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
    # Counted in SQL (SET n = n + 1), flushed per instance: another receiver process may be
    # counting instances of the same series in its own transaction.
    if late:
        series.grown_after_processing = True
        series.late_instances = db.Series.late_instances + 1
    series.instance_count = db.Series.instance_count + 1
    series.last_received_at = now
    s.add(db.Instance(
        series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid=sop_class, transfer_syntax_uid=ts_uid,
        instance_number=header_int(ds, "InstanceNumber"), path=rel, size=size, received_at=now,
        calling_ae=calling, late=late, pixel_sha256=digest,
    ))
    s.flush()
    return series


def _start_series(s: Session, audit: AuditLog, ds: Dataset, *, series_uid: str, sop_class: str, calling: str,
                  peer: str, now: datetime) -> db.Series:
    """The new series row, or the one another receiver process inserted first: on a shared
    database two processes (``node.reuse_port``) can receive the first instances of one series at
    once, and the unique SeriesInstanceUID lets one insert win; the other reads the winner's row
    (inserted in a savepoint, so the rest of its group commits). SQLite serves one process."""
    series = db.Series(
        series_uid=series_uid, sop_class_uid=sop_class, calling_ae=calling, peer_address=peer,
        expected_count=header_int(ds, (0x0020, 0x1002)),  # Images in Acquisition
        instance_count=0, first_received_at=now, state=db.RECEIVED, state_changed_at=now,
        study_uid=header_text(ds, "StudyInstanceUID"),
        **{column: header_text(ds, keyword, size) for keyword, (column, size) in SERIES_ATTRIBUTES.items()},
    )
    if s.get_bind().dialect.name == "sqlite":
        s.add(series)
        s.flush()
    else:
        try:
            with s.begin_nested():
                s.add(series)
                s.flush()
        except IntegrityError:
            winner = db.series_by_uid(s, series_uid)
            if winner is None:
                raise
            log_event(log, "series_started_elsewhere", series_uid=series_uid)
            return winner
    log_event(log, "series_started", series_uid=series_uid, study_uid=series.study_uid,
              modality=series.modality, kernel=series.convolution_kernel, calling_ae=calling,
              expected_count=series.expected_count)
    audit.series("received", series_uid, series.study_uid, calling_ae=calling, peer=peer)
    return series


def record_received(s: Session, audit: AuditLog, records: Sequence[dict[str, Any]]) -> None:
    """Record a receive group (``record_instance`` keyword arguments per instance), in order.

    The common case, more instances of a series that is still being received and has never been
    processed, takes one ``UPDATE`` of the series (guarded by those conditions in its own WHERE,
    so a concurrent transition is never overwritten) and one multi-row ``INSERT``: the ORM path
    costs several milliseconds per instance, which one association pays serially. Anything else
    (a new, reopened, late or grown series) takes :func:`record_instance`."""
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_series.setdefault(str(r["series_uid"]), []).append(r)
    for series_uid, group in by_series.items():
        if not _record_receiving(s, series_uid, group):
            for r in group:
                record_instance(s, audit, **r)


# Built once: SQLAlchemy memoizes a statement's cache key on the object, and computing it anew for
# every instance cost more than executing the statement.
_SERIES, _JOBS, _INSTANCES = (t.__table__ for t in (db.Series, db.Job, db.Instance))
_COUNT_RECEIVING = (
    update(_SERIES)
    .where(_SERIES.c.series_uid == bindparam("uid"), _SERIES.c.state == db.RECEIVED,
           ~exists().where(_JOBS.c.series_id == _SERIES.c.id,
                           or_(_JOBS.c.processing_started_at.is_not(None), _JOBS.c.state.in_(db.PROCESSED_STATES))))
    .values(instance_count=_SERIES.c.instance_count + bindparam("added"), last_received_at=bindparam("now")))
_COUNT_RECEIVING_RETURNING = _COUNT_RECEIVING.returning(_SERIES.c.id)
_SERIES_ID = select(_SERIES.c.id).where(_SERIES.c.series_uid == bindparam("uid"))
_INSERT_INSTANCES = insert(_INSTANCES)
_KNOWN_UIDS = select(_INSTANCES.c.sop_instance_uid).where(
    _INSTANCES.c.sop_instance_uid.in_(bindparam("uids", expanding=True)))


def _record_receiving(s: Session, series_uid: str, records: Sequence[dict[str, Any]]) -> bool:
    """The fast path of :func:`record_received`; False (nothing written) when it does not apply."""
    now = db.utcnow()
    con = s.connection()
    params = {"uid": series_uid, "added": len(records), "now": now}
    if con.dialect.update_returning:  # PostgreSQL, SQLite >= 3.35
        series_id = con.execute(_COUNT_RECEIVING_RETURNING, params).scalar()
    elif con.execute(_COUNT_RECEIVING, params).rowcount == 1:
        series_id = con.execute(_SERIES_ID, {"uid": series_uid}).scalar()
    else:
        series_id = None
    if series_id is None:
        return False
    con.execute(_INSERT_INSTANCES, [dict(
        series_id=series_id, sop_instance_uid=r["sop_uid"], sop_class_uid=r["sop_class"],
        transfer_syntax_uid=r["ts_uid"], instance_number=header_int(r["ds"], "InstanceNumber"), path=r["rel"],
        size=r["size"], received_at=now, calling_ae=r["calling"], late=False, pixel_sha256=r["digest"],
        excluded=None) for r in records])
    return True


def is_known(s: Session, sop_uid: str) -> bool:
    return s.scalar(select(db.Instance.id).where(db.Instance.sop_instance_uid == sop_uid)) is not None


def known_sop_uids(s: Session, sop_uids: Sequence[str]) -> set[str]:
    """Which of ``sop_uids`` are recorded already (one query for a whole receive group)."""
    uids = sorted(set(sop_uids))
    known: set[str] = set()
    for i in range(0, len(uids), 500):  # below every backend's bound-parameter limit
        known.update(s.connection().execute(_KNOWN_UIDS, {"uids": uids[i:i + 500]}).scalars())
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
          qa_mode: str, now: datetime, steps: int | None = None) -> db.Job:
    """``complete -> queued``: a new job version for the series, or the job that was streaming it
    (settings taken from the decision made now; cached outputs made with others are not used).
    ``steps``: the sampler steps the job runs with (None: the model's default), kept on the job."""
    series.rule_name = rule_name
    series.set_state(db.QUEUED)
    qa = "forced" if series.qa_force else qa_mode
    job = streaming_job(series)
    if job is not None:
        job.state, job.rule_name, job.model, job.destinations, job.seed = db.QUEUED, rule_name, model, \
            list(destinations), seed
        job.qa_mode = qa
        job.rule_settings = {"steps": steps}
        job.created_at = now  # queued from now on (streaming started at the job's stream_started event)
    else:
        job = db.Job(series_id=series.id, version=len(series.jobs) + 1, state=db.QUEUED, rule_name=rule_name,
                     model=model, destinations=list(destinations), seed=seed, created_at=now, qa_mode=qa,
                     rule_settings={"steps": steps})
        s.add(job)
    series.qa_force = False
    return job


# ---------------------------------------------------------------------- stream
def streaming_job(series: db.Series) -> db.Job | None:
    """The series' job in ``streaming``, if any (at most one)."""
    return next((j for j in series.jobs if j.state == db.STREAMING), None)


def start_stream(s: Session, series: db.Series, *, rule_name: str, model: str, destinations: Sequence[str],
                 seed: int, now: datetime, steps: int | None = None) -> db.Job:
    """A ``streaming`` job for a ``received`` series whose first instances matched a rule (the
    rule's attributes are fixed per series); the series stays ``received``. Its settings are
    those of :func:`queue` (``queue`` replaces them with the decision made at completion)."""
    job = db.Job(series_id=series.id, version=len(series.jobs) + 1, state=db.STREAMING, rule_name=rule_name,
                 model=model, destinations=list(destinations), seed=seed, created_at=now, streamed=True,
                 rule_settings={"steps": steps})
    s.add(job)
    s.flush()
    log_event(log, "stream_started", job=job.id, series_uid=series.series_uid, rule=rule_name)
    return job


def drop_stream(s: Session, series: db.Series, reason: str) -> list[int]:
    """Delete the series' ``streaming`` job and its cached-slice rows (the series was refused,
    ignored or unrouted at completion: it behaves as if never streamed). Returns the job ids so
    the caller removes their cache directories after the commit."""
    dropped = []
    for job in list(series.jobs):
        if job.state == db.STREAMING:
            dropped.append(job.id)
            s.delete(job)
            log_event(log, "stream_dropped", job=job.id, series_uid=series.series_uid, reason=reason)
    return dropped


def record_streamed(job: db.Job, sop_uid: str, rel: str, fingerprint: str) -> None:
    """One slice's cached model output (file already written and durable)."""
    for old in [x for x in job.stream_slices if x.sop_instance_uid == sop_uid]:
        job.stream_slices.remove(old)
    job.stream_slices.append(db.StreamSlice(sop_instance_uid=sop_uid, path=rel, fingerprint=fingerprint))


# ---------------------------------------------------------------------- process
class LeaseLost(RuntimeError):
    """The worker no longer owns the job (its lease expired and another worker claimed it): its
    result must not be committed."""


def claimable_jobs(s: Session, limit: int) -> list[db.Job]:
    """Queued jobs in queue order, locked for this transaction; on PostgreSQL rows another worker
    is claiming right now are skipped (``FOR UPDATE SKIP LOCKED``), so two workers never claim the
    same job. SQLite has one writer at a time and serves one process."""
    q = (select(db.Job).where(db.Job.state == db.QUEUED).order_by(db.Job.id).limit(limit)
         .with_for_update(skip_locked=True, of=db.Job))
    return list(s.scalars(q))


def claim(job: db.Job, now: datetime, owner: str = "", lease_s: float = 60.0) -> None:
    """``queued -> processing`` for one job of a batch, owned by ``owner`` (``host:pid:role``)
    until ``now + lease_s`` unless renewed."""
    job.state = db.PROCESSING
    job.processing_started_at = now
    job.instance_count = job.series.instance_count
    job.attempts += 1
    job.error = None
    job.claimed_by = owner or None
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.series.set_state(db.PROCESSING)


def owns(job: db.Job, owner: str) -> bool:
    """Whether ``owner`` still holds the job (lock the row first: ``s.get(..., with_for_update=True)``)."""
    return job.state == db.PROCESSING and (job.claimed_by or "") == owner


def renew(s: Session, model: type[db.Job] | type[db.Delivery], ids: Sequence[int], owner: str,
          until: datetime) -> int:
    """Extend the leases ``owner`` still holds; returns how many rows were renewed."""
    if not ids:
        return 0
    working = db.PROCESSING if model is db.Job else db.PENDING  # a finished row keeps no lease
    res = s.execute(update(model).where(model.id.in_(list(ids)), model.claimed_by == owner, model.state == working)
                    .values(lease_expires_at=until).execution_options(synchronize_session=False))
    return int(res.rowcount or 0)


def reclaim_expired(s: Session, now: datetime) -> list[int]:
    """``processing -> queued`` for jobs whose worker stopped renewing its lease (it died, or lost
    its host): another worker claims them and rebuilds their output with the same job id. A job
    with no lease at all was claimed by a node older than leases."""
    q = (select(db.Job).where(db.Job.state == db.PROCESSING,
                              (db.Job.lease_expires_at < now) | db.Job.lease_expires_at.is_(None))
         .with_for_update(skip_locked=True, of=db.Job))
    ids = []
    for job in s.scalars(q):
        log_event(log, "job_lease_expired", level=logging.WARNING, job=job.id, series_uid=job.series.series_uid,
                  claimed_by=job.claimed_by)
        _unclaim(job)
        ids.append(job.id)
    return ids


def _unclaim(job: db.Job) -> None:
    job.state, job.processing_started_at = db.QUEUED, None
    job.claimed_by = job.lease_expires_at = None
    job.series.set_state(db.QUEUED)


def processed(job: db.Job, audit: AuditLog, output_series_uid: str | None, rels: Sequence[tuple[str, str]],
              now: datetime, owner: str | None = None) -> None:
    """``processing -> sending`` (one pending delivery per destination, per-instance send rows),
    or ``done`` when the rule has no destination. With ``owner``: only while that worker still
    owns the job (else :class:`LeaseLost`, and the caller's transaction rolls back), so a worker
    that lost its lease never commits a second output over the new owner's."""
    if owner is not None and not owns(job, owner):
        raise LeaseLost(f"job {job.id} is {job.state}, claimed by {job.claimed_by}, not {owner}")
    job.lease_expires_at = None
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
    _unclaim(job)
    job.error = note
    log_event(log, "job_requeued", level=logging.WARNING, job=job.id, reason=note)


def refuse_job(job: db.Job, audit: AuditLog, reason: str, kind: str = "geometry") -> None:
    """``processing -> refused``: the model cannot (or must not) handle this series; the reason is
    kept and shown, never ``done`` with a warning."""
    now = db.utcnow()
    job.state, job.error, job.finished_at, job.lease_expires_at = db.REFUSED, reason, now, None
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
    job.finished_at = job.finished_at or now  # a resend's end is its deliveries' and the audit's
    job.lease_expires_at = None
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
def resend(job: db.Job, deliveries: Sequence[db.Delivery], audit: AuditLog, now: datetime, *,
           only_unsent: bool = False) -> int:
    """``done | failed -> sending`` for an output that exists on disk (no new model run): the
    given deliveries of the job are pending again with a fresh retry budget (counted from
    ``resent_at`` and ``attempts_before_resend``; the attempts and first times stay), with all
    their instances or only those not acknowledged yet. Returns the number of instances to send."""
    n = 0
    for d in deliveries:  # history stays: attempts keep counting, the first start and finish stay
        d.state, d.error, d.next_attempt_at = db.PENDING, None, now
        d.resent_at, d.attempts_before_resend = now, d.attempts
        for x in d.sends:
            if only_unsent and x.state == db.SENT:
                continue
            x.state, x.error = db.PENDING, None
            n += 1
    job.state, job.error = db.SENDING, None
    job.series.set_state(db.SENDING)
    audit.series("resend", job.series.series_uid, job.series.study_uid, instances=n,
                 output_series_uid=job.output_series_uid, destination=",".join(d.destination for d in deliveries))
    return n


def reopen_for_retry(series: db.Series, *, force: bool) -> None:
    """``failed | refused | done | ignored | unrouted -> received``, already stable: the next scan
    routes it again into a new job version (``force``: its QA gate runs as ``flag``)."""
    _reopen(series)
    series.qa_force = bool(force)
    series.retry_requested_at = db.utcnow()  # an event: the receive times stay what happened


def recover(s: Session, *, exclusive: bool = True, dead: Callable[[str], bool] | None = None) -> dict[str, int]:
    """After a restart: jobs left in ``processing`` are queued again (their partial output is
    rebuilt); ``sending`` jobs keep their per-instance send state and continue.

    ``exclusive`` (SQLite: this process is the only worker): every ``processing`` job. Shared
    database: only jobs whose lease expired, and jobs claimed by a worker ``dead`` says is gone
    (same host, process no longer running); other workers' jobs are left to them."""
    counts = {"requeued": 0, "sending": 0}
    if exclusive:
        for job in s.scalars(select(db.Job).where(db.Job.state == db.PROCESSING)):
            _unclaim(job)
            counts["requeued"] += 1
    else:
        counts["requeued"] = len(reclaim_expired(s, db.utcnow()))
        for job in s.scalars(select(db.Job).where(db.Job.state == db.PROCESSING)
                             .with_for_update(skip_locked=True, of=db.Job)):
            if job.claimed_by and dead is not None and dead(job.claimed_by):
                log_event(log, "job_owner_gone", level=logging.WARNING, job=job.id, claimed_by=job.claimed_by)
                _unclaim(job)
                counts["requeued"] += 1
    # A delivery claimed by a process that is gone (killed mid-send) is free again at once,
    # rather than after its lease: its per-instance send state says what is left to send.
    counts["deliveries_released"] = 0
    for d in s.scalars(select(db.Delivery).where(db.Delivery.state == db.PENDING, db.Delivery.claimed_by.is_not(None))
                       .with_for_update(skip_locked=True, of=db.Delivery)):
        if exclusive or (dead is not None and dead(d.claimed_by)):
            d.claimed_by, d.lease_expires_at = None, None
            counts["deliveries_released"] += 1
    counts["sending"] = len(s.scalars(select(db.Job.id).where(db.Job.state == db.SENDING)).all())
    return counts


# ---------------------------------------------------------------------- dispatch claims
def claim_delivery(s: Session, now: datetime, owner: str, lease_s: float) -> db.Delivery | None:
    """The next due delivery no other dispatcher holds (pending, due, lease free or expired),
    locked and claimed by ``owner`` until ``now + lease_s``: one dispatcher sends a delivery at a
    time, and per-instance send state keeps it exactly-once per instance."""
    q = (select(db.Delivery)
         .where(db.Delivery.state == db.PENDING, db.Delivery.next_attempt_at <= now,
                db.Delivery.lease_expires_at.is_(None) | (db.Delivery.lease_expires_at < now))
         .order_by(db.Delivery.next_attempt_at, db.Delivery.id).limit(1)
         .with_for_update(skip_locked=True, of=db.Delivery))
    d = s.scalars(q).first()
    if d is not None:
        if d.claimed_by and d.claimed_by != owner:
            log_event(log, "delivery_lease_expired", level=logging.WARNING, delivery=d.id, claimed_by=d.claimed_by)
        d.claimed_by, d.lease_expires_at = owner, now + timedelta(seconds=lease_s)
        d.started_at = d.started_at or now
    return d


_SENDS = db.InstanceSend.__table__
_INSTANCE_SENT = (update(_SENDS).where(_SENDS.c.id == bindparam("send_id"))
                  .values(state=db.SENT, status=bindparam("status"), error=None, sent_at=bindparam("now"),
                          attempts=_SENDS.c.attempts + 1))


def instance_sent(s: Session, send_id: int, status: int, now: datetime) -> None:
    """One instance's success response, committed as it arrives (a crash after it never sends
    the instance again). One prebuilt statement: this runs once per instance sent, in line
    with the C-STORE exchange."""
    s.connection().execute(_INSTANCE_SENT, {"send_id": send_id, "status": status, "now": now})


def release_delivery(d: db.Delivery) -> None:
    """The attempt is recorded: the delivery is free for the next due attempt (any dispatcher)."""
    d.claimed_by = d.lease_expires_at = None


# ---------------------------------------------------------------------- dispatch outcomes
class SendResult(Protocol):
    """What recording an attempt reads of one instance's result
    (:class:`dicom_node.dispatch.outcome.InstanceResult`)."""

    status: int | None
    error: str | None
    reached: bool

    @property
    def ok(self) -> bool: ...


def owned_delivery(s: Session, delivery_id: int, owner: str) -> db.Delivery | None:
    """The delivery, locked for this transaction, while ``owner`` still holds it; ``None`` when
    its lease expired during the attempt and another dispatcher holds it now: that one records
    its own outcome (the instances acknowledged meanwhile are committed already)."""
    d = s.get(db.Delivery, delivery_id, with_for_update=True)
    if d is None or d.claimed_by != owner:
        log_event(log, "delivery_lease_lost", level=logging.WARNING, delivery=delivery_id,
                  claimed_by=d.claimed_by if d is not None else None)
        return None
    return d


def record_attempt(d: db.Delivery, results: Sequence[tuple[int, SendResult]], *, permanent: bool) -> None:
    """One attempt is over: the lease is released and the attempt counted; each instance not
    acknowledged (``(send_id, result)``; acknowledged ones were committed by :func:`instance_sent`)
    keeps the destination's status and error, counts an attempt only if the attempt reached the
    destination, and is ``failed`` when the outcome is permanent and the destination answered it."""
    release_delivery(d)
    d.attempts += 1
    by_id = {x.id: x for x in d.sends}
    for send_id, res in results:
        if res.ok:
            continue
        row = by_id[send_id]
        if res.reached:
            row.attempts += 1
        row.status, row.error = res.status, res.error
        if permanent and res.status is not None:
            row.state = db.FAILED


def delivery_sent(d: db.Delivery, now: datetime) -> None:
    """``pending -> sent``: every instance acknowledged."""
    d.state, d.finished_at, d.error = db.SENT, now, None


def delivery_failed(d: db.Delivery, now: datetime, error: str) -> None:
    """``pending -> failed`` (permanent failure or retry budget spent), with the reason."""
    d.state, d.finished_at, d.error = db.FAILED, now, error


def delivery_retry(d: db.Delivery, at: datetime, error: str) -> None:
    """Stays ``pending``, due again at ``at``; the error says why and when."""
    d.next_attempt_at, d.error = at, error


def close_if_delivered(job: db.Job, audit: AuditLog, now: datetime) -> bool:
    """``sending -> done | failed`` once every delivery of the job is final (failed if any
    delivery failed, with each one's reason); returns whether the job was closed."""
    if not all(x.state in (db.SENT, db.FAILED) for x in job.deliveries):
        return False
    errors = [f"{x.destination}: {x.error}" for x in job.deliveries if x.state == db.FAILED]
    finish(job, audit, now, "; ".join(errors) if errors else None)
    return True
