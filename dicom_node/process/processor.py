"""Process: run queued series through the model and write their standardized output.

Several queued series that use the same model are claimed together (up to
``processing.max_batch_slices``) so one model call fills the device. Per series: read the spool,
check the geometry against the model's training spacing, run the QA gate on the input
(:mod:`dicom_node.process.qa_gate`), standardize with the settings frozen on the job when it was
routed (:mod:`dicom_node.process.run`; the model is a :class:`~ltdiff_core.kernel_model.KernelModel`
from :mod:`dicom_node.process.model`), measure the output, derive the new DERIVED series
(:mod:`dicom_node.derive.series`) and write it atomically under ``output_dir/job-N/``. Every state change
goes through :mod:`dicom_node.store.track`; a crash at any point leaves the job ``processing``, which a
restart queues again and rebuilds (the partial output directory is discarded).

Several process workers (``serve --roles process`` on several hosts) share one queue: a claim is
atomic (``FOR UPDATE SKIP LOCKED``) and leased (:mod:`dicom_node.store.lease`); the output is written
to a staging directory of this attempt and moved to ``job-N/`` only in the transaction that
commits the result, with the job row locked and still owned by this worker, so a worker that
lost its lease neither overwrites nor commits over the worker that took the job over.
"""
from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ltdiff_core.atomic import fsync_dir, make_durable
from ltdiff_core.kernel_model import KernelModel, ModelInfo

from dicom_node.store import db, track
from dicom_node.decide.anomalies import spacing_refusal
from dicom_node.audit import audit_for
from dicom_node.config import NodeConfig
from dicom_node.store.lease import LeaseKeeper, worker_id
from dicom_node.logs import log_event
from dicom_node.process.model import ModelCache, derivation_info, sampler_parameters
from dicom_node.process.run import Loaded, Settings, run_with_cache, settings_of
from dicom_node.store.spool import safe_name
from dicom_node.store.watermark import Watermark

if TYPE_CHECKING:
    from dicom_node.process.qa_gate import GateResult

__all__ = ["Processor"]

log = logging.getLogger("dicom_node.process.processor")


class Processor:
    """The scheduled process step: ``queued -> processing -> sending | done | failed | refused``."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        self.config = config
        self.db = database
        self.models = ModelCache(config.processing.device)
        self.last_model: dict[str, Any] = {}
        self.audit = audit_for(config)
        self.watermark = Watermark(config, database)
        self._waiting_for_disk = False
        self.owner = worker_id("process")
        self.lease_s = config.node.lease_s
        self.leases = LeaseKeeper(database, db.Job, self.owner, self.lease_s)
        self._streamed: dict[int, int] = {}  # job id -> slices taken from the stream cache
        self._cache_s: dict[int, float] = {}  # job id -> seconds reading them (counted as read, not model)

    def _claim_batch(self) -> list[tuple[int, str, list[Path]]]:
        """Atomically move a batch of queued jobs (same model) to ``processing``."""
        limit = self.config.processing.max_batch_slices
        out: list[tuple[int, str, list[Path]]] = []
        with self.db.session() as s:
            track.reclaim_expired(s, db.utcnow())
        with self.db.session() as s:
            queued = track.claimable_jobs(s, limit=64)
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
                track.claim(job, now, self.owner, self.lease_s)
                self.leases.hold(job.id)
                paths = [self.config.spool_dir / i.path for i in job.series.instances if not i.excluded]
                out.append((job.id, model, paths))
                total += n
                if total >= limit:
                    break
        return out

    def process(self) -> int:
        """Run one batch of queued series through the model; returns the number of jobs handled."""
        try:
            batch = self._claim_batch()
        except BaseException:
            self.leases.drop(*self.leases.held())
            raise
        if not batch:
            return 0
        try:
            return self._process(batch)
        finally:
            self.leases.drop(*(job_id for job_id, _, _ in batch))

    def _process(self, batch: list[tuple[int, str, list[Path]]]) -> int:
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
        info = std.info
        self.last_model = {"model": model_key, "name": info.name, "version": info.version, "device": info.device}

        loaded: list[Loaded] = []
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
            why = spacing_refusal(float(min(sr.spacing[1:])), info.training_pixel_mm)
            if why is not None:
                self._with_job(job_id, lambda job: track.refuse_job(job, self.audit, why))
                continue
            loaded.append((job_id, sr, time.monotonic() - t0))
        loaded, gates = self._qa_inputs(std, loaded)
        if not loaded:
            return len(batch)

        steps_by_job = settings_of(self.db, self.config, [j for j, _, _ in loaded])
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
        cache_s = {job_id: self._cache_s.pop(job_id, 0.0) for job_id, _, _ in loaded}
        model_s = max(time.monotonic() - t0 - sum(cache_s.values()), 0.0)
        computed = {job_id: int(sr.hu.shape[0]) - self._streamed.get(job_id, 0) for job_id, sr, _ in loaded}
        total_slices = sum(computed.values())

        for (job_id, sr, read_s), out_hu in zip(loaded, outputs):
            # model time of the slices this job ran through the model now; reading cached outputs is read time
            share = model_s * computed[job_id] / max(total_slices, 1)
            read_s += cache_s[job_id]
            steps, seed = steps_by_job[job_id]
            try:
                note = self._qa_output(job_id, gates.get(job_id), out_hu, sr.spacing)
                self._derive_and_store(job_id, sr, out_hu, info, steps, seed, read_s, share, note)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.exception("derive failed")
                    self._fail(job_id, f"derive failed: {type(exc).__name__}: {exc}")
                    continue
                # Disk full while writing outputs: not the series' fault; queue it again and
                # wait for space (the claim step checks room first).
                shutil.rmtree(self._staging(job_id), ignore_errors=True)
                why = f"no space for outputs: {exc.strerror}"
                self._with_job(job_id, lambda job: track.requeue(job, why))
            except Exception as exc:
                log.exception("derive failed")
                self._fail(job_id, f"derive failed: {type(exc).__name__}: {exc}")
        return len(batch)

    def _qa_inputs(self, std: KernelModel, loaded: list[Loaded]) -> tuple[list[Loaded], dict[int, GateResult]]:
        """Run each job's QA gate on its input: refused jobs fail with the measured reason (nothing
        is written or sent); the others continue with their gate result."""
        from dicom_node.process.qa_gate import check_input

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
                reason = f"QA refused: {res.reason}"
                self._with_job(job_id, lambda job: track.refuse_job(job, self.audit, reason, kind="qa"))
                continue
            kept.append((job_id, sr, read_s))
            gates[job_id] = res
        return kept, gates

    def _qa_output(self, job_id: int, res: GateResult | None, out_hu: Any, spacing: Any) -> str | None:
        """Output measures against the target envelope; returns the DerivationDescription note."""
        if res is None:
            return None
        from dicom_node.process.qa_gate import check_output

        t0 = time.monotonic()
        check_output(res, out_hu, spacing)
        res.extra["output_seconds"] = round(time.monotonic() - t0, 3)
        self._store_qa(job_id, res)
        if res.verdict is not None and res.verdict.output_findings:
            log_event(log, "qa_output_warning", level=logging.WARNING, job=job_id,
                      warnings="; ".join(res.verdict.output_warnings))
        return res.note()

    def _store_qa(self, job_id: int, res: GateResult) -> None:
        self._with_job(job_id, lambda job: setattr(job, "qa", {**res.record(), **res.extra}))

    def _run_model(self, std: KernelModel, loaded: list[Loaded], steps_by_job: dict[int, Settings]) -> list[Any]:
        """Outputs of the batch: slices standardized while the series arrived come from the stream
        cache, the others go through the model in one call per sampler setting (which fills the
        device). Every slice's random stream is keyed by its SOPInstanceUID (dicom_node.process.run)."""
        outs, used, cache_s = run_with_cache(self.config, self.db, std, loaded, steps_by_job)
        self._streamed.update(used)
        self._cache_s.update(cache_s)
        return outs

    def _derive_and_store(self, job_id: int, sr: Any, out_hu: Any, info: ModelInfo, steps: int | None, seed: int,
                          read_s: float, model_s: float, qa_note: str | None = None) -> None:
        from dicom_node.derive.series import derive_series
        from dicom_node.process.qa_gate import annotate

        t0 = time.monotonic()
        sampler = sampler_parameters(info, steps, seed)
        dinfo = derivation_info(info, sampler=sampler, uid_root=self.config.uid_root)
        derived = derive_series(sr.datasets, out_hu, dinfo)
        annotate(derived, qa_note)
        out_dir = self.config.output_dir / f"job-{job_id}"
        staging = self._staging(job_id)
        shutil.rmtree(staging, ignore_errors=True)  # partial output of an interrupted attempt
        staging.mkdir(parents=True)
        rels, files = [], []
        for ds in derived:
            name = f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
            # the staging directory is private to this attempt and renamed into place only when
            # complete and durable, so its files need no rename of their own (a crash leaves a
            # staging directory, which the next attempt removes)
            with open(staging / name, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
            files.append(staging / name)
            rels.append((str(ds.SOPInstanceUID), f"job-{job_id}/{name}"))
        make_durable(files, [staging])
        derive_s = time.monotonic() - t0
        out_uid = str(derived[0].SeriesInstanceUID) if derived else None
        streamed = self._streamed.get(job_id)
        try:
            self._commit_output(job_id, staging, out_dir, lambda job: self._record(
                job, info, sampler, seed, read_s, model_s, derive_s, out_uid, rels))
        except track.LeaseLost as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log_event(log, "job_lease_lost", level=logging.WARNING, job=job_id, reason=str(exc))
            return
        log_event(log, "series_processed", series_uid=sr.series_uid, job=job_id, slices=len(derived),
                  output_series_uid=out_uid, worker=self.owner,
                  model=info.name, device=info.device, read_s=round(read_s, 2), model_s=round(model_s, 2),
                  derive_s=round(derive_s, 2), streamed_slices=streamed)

    def _staging(self, job_id: int) -> Path:
        """This worker's output directory for one job before it is committed as ``job-N/``."""
        return self.config.output_dir / f"job-{job_id}.{safe_name(self.owner)}.part"

    def _commit_output(self, job_id: int, staging: Path, out_dir: Path, record: Callable[[db.Job], None]) -> None:
        """Lock the job row, check this worker still owns it, move the staged output into place
        and commit the result in the same transaction (:class:`track.LeaseLost` otherwise)."""
        with self.db.session() as s:
            job = s.get(db.Job, job_id, with_for_update=True)
            if job is None or not track.owns(job, self.owner):
                raise track.LeaseLost(f"job {job_id} is no longer claimed by {self.owner}"
                                      + (f" (now {job.state}, {job.claimed_by})" if job is not None else ""))
            if out_dir.exists():  # output of an earlier attempt whose commit did not happen
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
            fsync_dir(out_dir.parent)  # the rename is durable before the commit that points at it
            record(job)

    def _record(self, job: db.Job, info: ModelInfo, sampler: dict[str, Any], seed: int, read_s: float,
                model_s: float, derive_s: float, out_uid: str | None, rels: Sequence[tuple[str, str]]) -> None:
        """Provenance of the run and ``processing -> sending | done`` (fenced by the owner)."""
        job.model_name = info.name
        job.model_version = info.version
        job.model_sha256 = info.sha256
        job.method = info.method
        job.sampler = sampler
        job.seed = seed
        job.device = info.device
        job.read_s, job.model_s, job.derive_s = round(read_s, 3), round(model_s, 3), round(derive_s, 3)
        job.streamed_slices = self._streamed.pop(job.id, None)
        track.processed(job, self.audit, out_uid, rels, db.utcnow(), owner=self.owner)

    def _with_job(self, job_id: int, transition: Callable[[db.Job], None]) -> None:
        """Apply one :mod:`dicom_node.store.track` transition to a job in its own transaction, only
        while this worker still owns it (a worker that lost its lease changes nothing)."""
        with self.db.session() as s:
            job = s.get(db.Job, job_id, with_for_update=True)
            if job is None:
                return
            if not track.owns(job, self.owner):
                log_event(log, "job_lease_lost", level=logging.WARNING, job=job_id, state=job.state,
                          claimed_by=job.claimed_by)
                return
            transition(job)

    def _fail(self, job_id: int, reason: str) -> None:
        self._with_job(job_id, lambda job: track.fail(job, self.audit, reason))
