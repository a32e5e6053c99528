"""Process: the scheduled steps that move a series from ``received`` to ``done``.

Four idempotent steps, each run periodically by :mod:`dicom_node.scheduler` and each committing
every state change before acting on it, so a crash at any point leaves a state a restart can
resume from (:meth:`Worker.recover`):

* :meth:`Worker.scan` — completeness, then routing: ``received -> complete -> queued | ignored | unrouted``
* :meth:`Worker.process` — model + derive: ``queued -> processing -> sending``; several queued
  series that use the same model are processed in one batch (up to ``max_batch_slices``)
* :meth:`Worker.send` — C-STORE with retry/backoff: ``sending -> done | failed(reason)``
* :meth:`Worker.purge` — retention: removes finished series older than ``retention.days``

Growth after processing: an instance that arrives for a series that is being or has been
processed is recorded (``Instance.late``), the series is flagged ``grown_after_processing``, and
once the current job has finished the series goes back to ``received``; when it is stable again
the *whole* series is reprocessed as a new job (``version`` + 1) into a new output series. Earlier
outputs are not recalled; status shows both jobs, so there is never a silent second output.
"""
from __future__ import annotations

import errno
import io
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from . import db
from .completeness import SeriesProgress, completeness_reason
from .config import NodeConfig
from .logs import log_event
from .rules import match_rule, series_attributes
from .scu import PERMANENT
from .senders import sender_for
from .spool import safe_name, write_atomic
from .anomalies import SeriesCheck, check_series, spacing_refusal
from .audit import audit_for
from .watermark import Watermark

log = logging.getLogger("dicom_node.worker")

# Anomalies recorded by the receiver (kept when a series is checked again after it grew).
RECEIVE_ANOMALIES = ("duplicate", "conflict", "late")


class ModelCache:
    """Standardizers loaded once per worker process, keyed by (checkpoint, device): loading the
    weights (and moving them to the GPU) costs far more than one series."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Any:
        with self._lock:
            if model not in self._models:
                from ltdiff_core import Standardizer  # heavy (torch): imported on first use only

                t0 = time.monotonic()
                path = None if model == "default" else model
                std = Standardizer.from_checkpoint(path, device=self.device)
                self._models[model] = std
                info = dict(getattr(std, "info", {}) or {})
                log_event(log, "model_loaded", model=model, name=info.get("name"), version=info.get("version"),
                          sha256=str(info.get("sha256", ""))[:16], device=device_of(std, self.device),
                          seconds=round(time.monotonic() - t0, 2))
            return self._models[model]

    def loaded(self) -> list[str]:
        return list(self._models)


def retry_delay(dest: Any, attempts: int) -> float:
    """Capped exponential backoff: ``backoff_base_s * 2^(attempts-1)``, at most ``backoff_max_s``."""
    return float(min(dest.backoff_base_s * 2 ** min(attempts - 1, 30), dest.backoff_max_s))


def device_of(std: Any, fallback: str) -> str:
    dev = getattr(std, "device", None)
    return str(dev) if dev is not None else fallback


def derivation_info(std_info: dict[str, Any], *, sampler: dict[str, Any], uid_root: str, device: str) -> Any:
    """``DerivationInfo`` for the output series, from the model's ``info`` and the run's settings."""
    from .derive import DerivationInfo

    return DerivationInfo.from_model_info(std_info, sampler=sampler, device=device, uid_root=uid_root)


class Worker:
    """The steps of the pipeline; thread-safe to run concurrently (one instance of each step)."""

    def __init__(self, config: NodeConfig, database: db.Database, stop: threading.Event | None = None) -> None:
        self.config = config
        self.db = database
        self.stop = stop or threading.Event()
        self.models = ModelCache(config.processing.device)
        self.last_model: dict[str, Any] = {}
        self.audit = audit_for(config)
        self.watermark = Watermark(config, database)
        self._waiting_for_disk = False

    # ------------------------------------------------------------------ restart
    def recover(self) -> dict[str, int]:
        """Resume after a restart: jobs left in ``processing`` are queued again (their partial
        output is discarded and rebuilt); ``sending`` jobs keep their per-instance send state and
        continue. Nothing received is deleted."""
        counts = {"requeued": 0, "sending": 0}
        with self.db.session() as s:
            for job in s.scalars(select(db.Job).where(db.Job.state == db.PROCESSING)):
                job.state = db.QUEUED
                job.processing_started_at = None
                job.series.set_state(db.QUEUED)
                counts["requeued"] += 1
            counts["sending"] = len(s.scalars(select(db.Job.id).where(db.Job.state == db.SENDING)).all())
        if counts["requeued"] or counts["sending"]:
            log_event(log, "recovered", jobs_requeued=counts["requeued"], jobs_sending=counts["sending"])
        return counts

    # ------------------------------------------------------------------ decide
    def scan(self) -> int:
        """Mark stable series ``complete``, then route complete series; returns how many were routed.

        Two commits, so ``complete`` is a persisted state: a series completed just before a crash
        is routed by the next scan after the restart.
        """
        now = db.utcnow()
        cfg = self.config.completeness
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state == db.RECEIVED)):
                reason = completeness_reason(
                    SeriesProgress(series.instance_count, series.expected_count, series.last_received_at), cfg, now
                )
                if reason is not None:
                    series.completed_at = now
                    series.complete_reason = reason
                    series.set_state(db.COMPLETE)
                    self.audit.series("completed", series.series_uid, series.study_uid,
                                      instances=series.instance_count, reason=reason)
        return self._route()

    def _route(self) -> int:
        """Apply the first matching rule to every ``complete`` series (queue a job, ignore, unrouted)."""
        now = db.utcnow()
        decided = 0
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state == db.COMPLETE)):
                rule = match_rule(self.config.rules, series_attributes(series))
                decided += 1
                try:
                    check = self._check(s, series) if rule is not None and rule.action != "ignore" else None
                except Exception as exc:  # one odd series must never stop the routing of the others
                    log.exception("series check failed")
                    check = SeriesCheck(refusal=f"series check failed: {type(exc).__name__}: {exc}"[:500])
                if check is not None and check.refusal is not None:
                    series.rule_name = rule.name if rule else None
                    series.set_state(db.REFUSED, check.refusal)
                    self.audit.series("refused", series.series_uid, series.study_uid, success=False,
                                      reason=check.refusal, instances=series.instance_count)
                elif check is not None and check.all_excluded:
                    series.rule_name = rule.name if rule else None
                    series.set_state(db.IGNORED, "localizer series: kept, not standardized")
                elif rule is None:
                    series.rule_name = None
                    series.set_state(db.UNROUTED)
                elif rule.action == "ignore":
                    series.rule_name = rule.name
                    series.set_state(db.IGNORED)
                else:
                    series.rule_name = rule.name
                    series.set_state(db.QUEUED)
                    s.add(db.Job(
                        series_id=series.id, version=len(series.jobs) + 1, state=db.QUEUED, rule_name=rule.name,
                        model=rule.model, destinations=list(rule.destinations),
                        seed=rule.seed if rule.seed else self.config.processing.seed,
                        created_at=now, qa_mode="forced" if series.qa_force else rule.qa,
                    ))
                    series.qa_force = False
                log_event(log, "series_complete", series_uid=series.series_uid, instances=series.instance_count,
                          reason=series.complete_reason, rule=series.rule_name, state=series.state,
                          grown_after_processing=series.grown_after_processing)
        return decided

    def _check(self, s: Any, series: db.Series) -> Any:
        """Series-level checks (:mod:`dicom_node.anomalies`), recorded on the series; findings of
        an earlier check of the same series (before it grew) are replaced."""
        check = check_series([(i.sop_instance_uid, self.config.spool_dir / i.path) for i in series.instances],
                             self.config.processing.max_matrix)
        for a in list(series.anomalies):
            if a.kind not in RECEIVE_ANOMALIES:
                s.delete(a)
        for kind, uid, detail in check.findings:
            series.anomalies.append(db.Anomaly(kind=kind, sop_instance_uid=uid, detail=detail))
        for inst in series.instances:
            inst.excluded = check.excluded.get(inst.sop_instance_uid)
        if check.findings:
            log_event(log, "series_anomalies", level=logging.WARNING, series_uid=series.series_uid,
                      kinds=",".join(sorted({k for k, _, _ in check.findings})), refusal=check.refusal)
        return check

    # ------------------------------------------------------------------ process
    def _claim_batch(self) -> list[tuple[int, str, list[Path]]]:
        """Atomically move a batch of queued jobs (same model) to ``processing``."""
        limit = self.config.processing.max_batch_slices
        out: list[tuple[int, str, list[Path]]] = []
        with self.db.session() as s:
            queued = s.scalars(select(db.Job).where(db.Job.state == db.QUEUED).order_by(db.Job.id)).all()
            if not queued:
                return []
            model = queued[0].model
            total = 0
            now = db.utcnow()
            for job in queued:
                n = job.series.instance_count
                if job.model != model or (out and total + n > limit):
                    continue
                need = sum(i.size for i in job.series.instances if not i.excluded)
                if not self.watermark.room_for_output(need):
                    # Outputs would not fit: wait (the job stays queued) until space returns.
                    if not self._waiting_for_disk:
                        log_event(log, "processing_waiting_for_disk", level=logging.WARNING, job=job.id,
                                  series_uid=job.series.series_uid, needed_mb=round(need / 2**20, 1))
                    self._waiting_for_disk = True
                    break
                self._waiting_for_disk = False
                job.state = db.PROCESSING
                job.processing_started_at = now
                job.instance_count = n
                job.attempts += 1
                job.error = None
                job.series.set_state(db.PROCESSING)
                paths = [self.config.spool_dir / i.path for i in job.series.instances if not i.excluded]
                out.append((job.id, model, paths))
                total += n
                if total >= limit:
                    break
        return out

    def process(self) -> int:
        """Run one batch of queued series through the model; returns the number of jobs handled."""
        batch = self._claim_batch()
        if not batch:
            return 0
        from ltdiff_core.dicomio.reader import SeriesError, read_series

        model_key = batch[0][1]
        log_event(log, "batch_started", jobs=len(batch), model=model_key,
                  slices=sum(len(p) for _, _, p in batch))
        try:
            std = self.models.get(model_key)
        except Exception as exc:  # a missing/corrupt checkpoint fails the jobs, not the node
            for job_id, _, _ in batch:
                self._fail(job_id, f"model {model_key!r} could not be loaded: {type(exc).__name__}: {exc}")
            return len(batch)
        info = dict(getattr(std, "info", {}) or {})
        device = device_of(std, self.config.processing.device)
        self.last_model = {"model": model_key, "name": info.get("name"), "version": info.get("version"),
                           "device": device}

        trained = (getattr(getattr(std, "ckpt", None), "metadata", None) or {}).get("training", {}).get("pixel_mm")
        loaded: list[tuple[int, Any, float]] = []
        for job_id, _, paths in batch:
            t0 = time.monotonic()
            try:
                sr = read_series(paths)
            except (SeriesError, OSError, ValueError) as exc:
                self._fail(job_id, f"series could not be read: {exc}")
                continue
            except Exception as exc:  # a malformed header must fail its job, not leave it `processing`
                self._fail(job_id, f"series could not be read: {type(exc).__name__}: {exc}")
                continue
            why = spacing_refusal(float(min(sr.spacing[1:])), trained)
            if why is not None:
                self._refuse_job(job_id, why)
                continue
            loaded.append((job_id, sr, time.monotonic() - t0))
        loaded, gates = self._qa_inputs(std, loaded)
        if not loaded:
            return len(batch)

        steps_by_job = self._settings([j for j, _, _ in loaded])
        t0 = time.monotonic()
        try:
            outputs = self._run_model(std, loaded, steps_by_job)
        except Exception as exc:
            log.exception("model run failed")
            if len(loaded) == 1:
                self._fail(loaded[0][0], f"model run failed: {type(exc).__name__}: {exc}")
                return len(batch)
            # One series must not fail the others batched with it: run each alone, fail only
            # the ones that fail on their own.
            alone = []
            for item in loaded:
                try:
                    alone.append((item, self._run_model(std, [item], steps_by_job)[0]))
                except Exception as exc1:
                    self._fail(item[0], f"model run failed: {type(exc1).__name__}: {exc1}")
            loaded = [item for item, _ in alone]
            outputs = [out for _, out in alone]
        model_s = time.monotonic() - t0
        total_slices = sum(int(sr.hu.shape[0]) for _, sr, _ in loaded)

        for (job_id, sr, read_s), out_hu in zip(loaded, outputs):
            share = model_s * int(sr.hu.shape[0]) / max(total_slices, 1)
            steps, seed = steps_by_job[job_id]
            try:
                note = self._qa_output(job_id, gates.get(job_id), out_hu, sr.spacing)
                self._derive_and_store(job_id, sr, out_hu, std, info, device, steps, seed, read_s, share, note)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.exception("derive failed")
                    self._fail(job_id, f"derive failed: {type(exc).__name__}: {exc}")
                    continue
                # Disk full while writing outputs: not the series' fault; queue it again and
                # wait for space (the claim step checks room first).
                shutil.rmtree(self.config.output_dir / f"job-{job_id}", ignore_errors=True)
                self._requeue(job_id, f"no space for outputs: {exc.strerror}")
            except Exception as exc:
                log.exception("derive failed")
                self._fail(job_id, f"derive failed: {type(exc).__name__}: {exc}")
        return len(batch)

    def _qa_inputs(self, std: Any, loaded: list[tuple[int, Any, float]]) -> tuple[list[tuple[int, Any, float]], dict[int, Any]]:
        """Run each job's QA gate on its input: refused jobs fail with the measured reason (nothing
        is written or sent); the others continue with their gate result."""
        from .qa_gate import check_input

        with self.db.session() as s:
            modes = {j.id: (j.qa_mode or "refuse") for j in s.scalars(select(db.Job).where(
                db.Job.id.in_([job_id for job_id, _, _ in loaded])))}
        kept, gates = [], {}
        for job_id, sr, read_s in loaded:
            mode = modes.get(job_id, "refuse")
            t0 = time.monotonic()
            try:
                forced = mode == "forced"  # `retry --force`: standardize anyway and record the flag
                res = check_input(std, sr, "flag" if forced else mode, forced=forced)
            except Exception as exc:  # a measurement that cannot run is a refusal, never a silent pass
                log.exception("QA measurement failed")
                self._fail(job_id, f"QA could not measure the series: {type(exc).__name__}: {exc}")
                continue
            res.extra["seconds"] = round(time.monotonic() - t0, 3)
            self._store_qa(job_id, res)
            log_event(log, "qa_input", job=job_id, series_uid=sr.series_uid, mode=mode, verdict=res.status,
                      reason=res.reason, seconds=res.extra["seconds"])
            if res.refused:
                self._fail(job_id, f"QA refused: {res.reason}")
                continue
            kept.append((job_id, sr, read_s))
            gates[job_id] = res
        return kept, gates

    def _qa_output(self, job_id: int, res: Any, out_hu: Any, spacing: Any) -> str | None:
        """Output measures against the target envelope; returns the DerivationDescription note."""
        if res is None:
            return None
        from .qa_gate import check_output

        t0 = time.monotonic()
        check_output(res, out_hu, spacing)
        res.extra["output_seconds"] = round(time.monotonic() - t0, 3)
        self._store_qa(job_id, res)
        if res.verdict is not None and res.verdict.output_findings:
            log_event(log, "qa_output_warning", level=logging.WARNING, job=job_id,
                      warnings="; ".join(res.verdict.output_warnings))
        return res.note()

    def _store_qa(self, job_id: int, res: Any) -> None:
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            if job is not None:
                job.qa = {**res.record(), **res.extra}

    def _settings(self, job_ids: Sequence[int]) -> dict[int, tuple[int | None, int]]:
        """(steps, seed) per job: the rule's values, else the processing defaults."""
        rules = {r.name: r for r in self.config.rules}
        out = {}
        with self.db.session() as s:
            for job in s.scalars(select(db.Job).where(db.Job.id.in_(job_ids))):
                rule = rules.get(job.rule_name)
                steps = (rule.steps if rule and rule.steps else None) or self.config.processing.steps
                out[job.id] = (steps, job.seed or 0)
        return out

    @staticmethod
    def _run_model(std: Any, loaded: list[tuple[int, Any, float]],
                   steps_by_job: dict[int, tuple[int | None, int]]) -> list[Any]:
        """One call for the whole batch when the model supports it (fills the device), else one
        call per series. Series with different sampler settings are never mixed in one call."""
        batch_fn = getattr(std, "standardize_batch", None)
        settings = {steps_by_job[j] for j, _, _ in loaded}
        if batch_fn is not None and len(loaded) > 1 and len(settings) == 1:
            steps, seed = settings.pop()
            return list(batch_fn([sr.hu for _, sr, _ in loaded], [sr.spacing for _, sr, _ in loaded],
                                 steps=steps, seed=seed))
        outs = []
        for job_id, sr, _ in loaded:
            steps, seed = steps_by_job[job_id]
            outs.append(std.standardize(sr.hu, sr.spacing, steps=steps, seed=seed))
        return outs

    def _derive_and_store(self, job_id: int, sr: Any, out_hu: Any, std: Any, info: dict[str, Any], device: str,
                          steps: int | None, seed: int, read_s: float, model_s: float,
                          qa_note: str | None = None) -> None:
        from .derive import derive_series
        from .offline import sampler_parameters
        from .qa_gate import annotate

        t0 = time.monotonic()
        sampler = sampler_parameters(info, steps, seed)
        dinfo = derivation_info(info, sampler=sampler, uid_root=self.config.uid_root, device=device)
        derived = derive_series(sr.datasets, out_hu, dinfo)
        annotate(derived, qa_note)
        out_dir = self.config.output_dir / f"job-{job_id}"
        if out_dir.exists():  # partial output of an interrupted run
            shutil.rmtree(out_dir)
        rels = []
        for ds in derived:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            rel = f"job-{job_id}/{safe_name(str(ds.SOPInstanceUID))}.dcm"
            write_atomic(self.config.output_dir / rel, buf.getbuffer())
            rels.append((str(ds.SOPInstanceUID), rel))
        derive_s = time.monotonic() - t0
        now = db.utcnow()
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            assert job is not None
            job.model_name = info.get("name")
            job.model_version = str(info.get("version")) if info.get("version") is not None else None
            job.model_sha256 = info.get("sha256")
            job.method = info.get("method")
            job.sampler = sampler
            job.seed = seed
            job.device = device
            job.output_series_uid = str(derived[0].SeriesInstanceUID) if derived else None
            job.output_count = len(derived)
            job.read_s, job.model_s, job.derive_s = round(read_s, 3), round(model_s, 3), round(derive_s, 3)
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
                self._finish(job, now)
        self.audit.series("processed", sr.series_uid, sr.study_uid, instances=len(derived),
                          output_series_uid=str(derived[0].SeriesInstanceUID) if derived else None)
        log_event(log, "series_processed", series_uid=sr.series_uid, job=job_id, slices=len(derived),
                  output_series_uid=str(derived[0].SeriesInstanceUID) if derived else None,
                  model=info.get("name"), device=device, read_s=round(read_s, 2), model_s=round(model_s, 2),
                  derive_s=round(derive_s, 2))

    def _finish(self, job: db.Job, now: Any, error: str | None = None) -> None:
        """Close a job (done or failed) and decide what its series does next."""
        job.state = db.FAILED if error else db.DONE
        job.error = error
        job.finished_at = now
        series = job.series
        if job.instance_count is not None and series.instance_count > job.instance_count:
            # Instances arrived while this job ran: reprocess the whole series as a new version.
            series.grown_after_processing = True
            series.set_state(db.RECEIVED)
            series.completed_at = None
            log_event(log, "series_grown_after_processing", level=logging.WARNING, series_uid=series.series_uid,
                      job=job.id, processed=job.instance_count, now=series.instance_count)
        else:
            series.set_state(job.state, error)
        if error or job.deliveries:
            self.audit.series("failed" if error else "sent", series.series_uid, series.study_uid, success=not error,
                              reason=error, instances=job.output_count, output_series_uid=job.output_series_uid,
                              destination=",".join(d.destination for d in job.deliveries) or None)
        log_event(log, "job_finished", level=logging.INFO if not error else logging.WARNING, job=job.id,
                  series_uid=series.series_uid, state=job.state, error=error)

    def _requeue(self, job_id: int, note: str) -> None:
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            if job is not None:
                job.state, job.processing_started_at, job.error = db.QUEUED, None, note
                job.series.set_state(db.QUEUED)
        log_event(log, "job_requeued", level=logging.WARNING, job=job_id, reason=note)

    def _refuse_job(self, job_id: int, reason: str) -> None:
        """The model cannot handle this series: refused with the reason (never `done` with a warning)."""
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            if job is None:
                return
            now = db.utcnow()
            job.state, job.error, job.finished_at = db.REFUSED, reason, now
            job.processing_finished_at = now
            job.series.set_state(db.REFUSED, reason)
            job.series.anomalies.append(db.Anomaly(kind="geometry", detail=reason))
            self.audit.series("refused", job.series.series_uid, job.series.study_uid, success=False, reason=reason,
                              instances=job.series.instance_count)
        log_event(log, "series_refused", level=logging.WARNING, job=job_id, reason=reason)

    def _fail(self, job_id: int, reason: str) -> None:
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            if job is not None:
                job.processing_finished_at = job.processing_finished_at or db.utcnow()
                self._finish(job, db.utcnow(), reason)

    # ------------------------------------------------------------------ send
    def send(self) -> int:
        """Attempt every delivery that is due; returns the number of associations made."""
        done = 0
        while not self.stop.is_set():
            with self.db.session() as s:
                d = s.scalars(
                    select(db.Delivery)
                    .where(db.Delivery.state == db.PENDING, db.Delivery.next_attempt_at <= db.utcnow())
                    .order_by(db.Delivery.next_attempt_at, db.Delivery.id)
                ).first()
                if d is None:
                    return done
                delivery_id, name = d.id, d.destination
                todo = [(x.id, x.path) for x in d.sends if x.state != db.SENT]
                d.started_at = d.started_at or db.utcnow()
            self._attempt(delivery_id, name, todo)
            done += 1
        return done

    def _attempt(self, delivery_id: int, name: str, todo: list[tuple[int, str]]) -> None:
        try:
            dest = self.config.destination(name)
        except KeyError:
            dest = None
        attempt_at = db.utcnow()

        def commit_one(k: int, res: Any) -> None:
            """Commit one instance's C-STORE result as its response arrives: a crash after this
            point never sends the instance again."""
            if not res.ok:
                return
            with self.db.session() as s:
                row = s.get(db.InstanceSend, todo[k][0])
                if row is not None:
                    row.state, row.status, row.error, row.sent_at = db.SENT, res.status, None, db.utcnow()
                    row.attempts += 1

        if dest is None:
            outcome_error, failure, results = f"destination {name!r} is no longer configured", PERMANENT, []
        else:
            outcome = sender_for(dest)(dest, [self.config.output_dir / p for _, p in todo], self.config.ae_title,
                                 self.config.max_pdu, on_result=commit_one)
            outcome_error, failure, results = outcome.error, outcome.failure, outcome.results
        now = db.utcnow()
        with self.db.session() as s:
            d = s.get(db.Delivery, delivery_id)
            assert d is not None
            d.attempts += 1
            by_id = {x.id: x for x in d.sends}
            for (send_id, _), res in zip(todo, results):
                row = by_id[send_id]
                if res.ok:
                    continue  # committed by commit_one
                if res.status is None and res.error and ("not established" in res.error
                                                         or "no presentation context" in res.error):
                    pass  # never reached the destination: not an attempt for this instance
                else:
                    row.attempts += 1
                row.status = res.status
                row.error = res.error
                if failure == PERMANENT and res.status is not None:
                    row.state = db.FAILED
            if failure is None and all(x.state == db.SENT for x in d.sends):
                d.state, d.finished_at, d.error = db.SENT, now, None
            elif failure == PERMANENT:
                d.state, d.finished_at, d.error = db.FAILED, now, f"permanent: {outcome_error}"
            else:
                first = d.started_at or attempt_at
                elapsed = (now - first).total_seconds()
                budget = dest.retry_for_s if dest else 0.0
                retries = dest.max_retries if dest else 0
                # The last attempt is made at the end of the budget, not skipped because the
                # backoff would overshoot it.
                delay = min(retry_delay(dest, d.attempts), max(budget - elapsed, 0.0)) if dest else 0.0
                if (retries is not None and d.attempts > retries) or elapsed >= budget:
                    d.state, d.finished_at = db.FAILED, now
                    limit = (f"{retries} retries" if retries is not None and d.attempts > retries
                             else f"retry budget {budget:.0f} s")
                    d.error = f"gave up after {d.attempts} attempts in {elapsed:.0f} s ({limit}): {outcome_error}"
                else:
                    d.next_attempt_at = now + timedelta(seconds=delay)
                    of = f"/{retries}" if retries is not None else ""
                    d.error = (f"retry {d.attempts}{of} in {delay:g} s ({budget - elapsed:.0f} s of the retry budget "
                               f"left): {outcome_error}")
                    log_event(log, "delivery_retry", level=logging.WARNING, destination=name, job=d.job_id,
                              attempt=d.attempts, delay_s=delay, error=outcome_error)
            job = d.job
            states = [x.state for x in job.deliveries]
            if all(st in (db.SENT, db.FAILED) for st in states):
                errors = [f"{x.destination}: {x.error}" for x in job.deliveries if x.state == db.FAILED]
                self._finish(job, now, "; ".join(errors) if errors else None)

    # ------------------------------------------------------------------ retention
    def purge(self, older_than_days: float | None = None, states: Sequence[str] | None = None) -> int:
        """Delete finished series (spool, outputs, rows) last received more than N days ago.
        Series still in progress are never purged."""
        days = self.config.retention.days if older_than_days is None else older_than_days
        states = tuple(states or (db.DONE, db.FAILED, db.IGNORED, db.UNROUTED, db.REFUSED))
        cutoff = db.utcnow() - timedelta(days=days)
        n = 0
        with self.db.session() as s:
            for series in s.scalars(select(db.Series).where(db.Series.state.in_(states),
                                                            db.Series.last_received_at <= cutoff)):
                shutil.rmtree(self.config.spool_dir / safe_name(series.series_uid), ignore_errors=True)
                shutil.rmtree(self.config.quarantine_dir / safe_name(series.series_uid), ignore_errors=True)
                for job in series.jobs:
                    shutil.rmtree(self.config.output_dir / f"job-{job.id}", ignore_errors=True)
                s.delete(series)
                n += 1
            # Records of refused instances age out with the same retention.
            for r in s.scalars(select(db.Refusal).where(db.Refusal.received_at <= cutoff)):
                s.delete(r)
        if n:
            log_event(log, "purged", series=n, older_than_days=days, states=",".join(states))
        return n

    def retry(self, series_uid: str | None = None, failed: bool = False, force: bool = False) -> int:
        """Queue a series again (a new job version); with ``failed`` every failed series.

        A failed series whose output exists on disk (it failed in delivery) is re-sent instead:
        only its unacknowledged instances, no new model run, no second output series.
        ``force``: the next job runs the QA gate as ``flag`` (a refused series is standardized and
        the warning recorded); it does not apply to a re-send, whose output already passed."""
        from .resend import output_job, queue_resend

        n = 0
        self.resent: list[str] = []
        with self.db.session() as s:
            q = select(db.Series)
            q = q.where(db.Series.state == db.FAILED) if failed else q.where(db.Series.series_uid == series_uid)
            for series in s.scalars(q):
                if series.state in (db.QUEUED, db.PROCESSING, db.SENDING, db.RECEIVED):
                    continue
                # Re-send only when the latest job holds the output: a later job that failed
                # without output (model error, QA refusal) is reprocessed, not replaced by old output.
                job = output_job(self.config, series)
                if failed and not series.grown_after_processing and job is not None and job is series.jobs[-1]:
                    queue_resend(s, self.config, series, only_unsent=True)
                    self.resent.append(series.series_uid)
                    n += 1
                    continue
                series.set_state(db.RECEIVED)
                series.completed_at = None
                series.qa_force = bool(force)
                series.last_received_at = db.utcnow() - timedelta(seconds=self.config.completeness.stable_age_s)
                n += 1
        return n
