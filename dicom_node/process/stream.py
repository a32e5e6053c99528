"""Stream: standardize the slices of a routed series while the rest of it is still arriving.

The models are 2-D (one slice in, one slice out, no neighbouring slices; in-plane tiles and
resampling stay within a slice), and each slice's random stream is keyed by its SOPInstanceUID
(:func:`ltdiff_core.standardizer.uid_slice_key`) with a fixed batch shape, so a slice's output does
not depend on which other slices are processed with it. Hence a slice can be standardized as soon
as it is on disk, and the result equals processing the whole series at once, pixel for pixel.

Flow (``processing.streaming``):

* decide routes a ``received`` series on its first instances into a ``streaming`` job
  (:func:`dicom_node.store.track.start_stream`); completeness is decided exactly as without streaming;
* :meth:`Streamer.stream` (run by the process step when no queued job waits) takes slices of a
  streaming job that have been on disk for ``stream_settle_s`` and have no cached output yet, in
  runs of ``stream_min_slices``, runs the model and caches each slice's float32 output as
  ``output_dir/stream-<job>/<SOPInstanceUID>.npy`` (written atomically,
  :mod:`dicom_node.store.stream_cache`) with a :class:`dicom_node.store.db.StreamSlice` row
  naming the settings it was made with (the job's, frozen when it was routed);
* at completion the job is queued as usual; the process step reads the whole series, runs the QA
  gate on it, runs the model only on slices without a valid cached output
  (:func:`dicom_node.process.run.run_with_cache`), then derives and writes as always;
* a series refused, ignored or unrouted at completion loses the job and its cache; the cache of a
  processed job is removed by the next :func:`~dicom_node.store.stream_cache.sweep`. A crash loses
  at most the run in progress.
"""
from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy import select

from ltdiff_core.kernel_model import FIXED_BATCH_PIXELS

from dicom_node.logs import log_event
from dicom_node.process.model import ModelCache, series_slice_keys
from dicom_node.process.run import fingerprint, job_settings
from dicom_node.store import db, track
from dicom_node.store.spool import make_durable, write_atomic
from dicom_node.store.stream_cache import cache_rel, sweep

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig
    from dicom_node.store.watermark import Watermark

__all__ = ["ProcessStep", "Streamer"]

log = logging.getLogger("dicom_node.process.stream")


class ProcessStep(Protocol):
    """What streaming shares with the process step of its process: the loaded models (one copy
    on the device) and the disk watermark (cached outputs count against the same room)."""

    models: ModelCache
    watermark: Watermark


class Streamer:
    """The streaming step; shares the process step's models and watermark (:class:`ProcessStep`)."""

    def __init__(self, config: NodeConfig, database: db.Database, processor: ProcessStep) -> None:
        self.config = config
        self.db = database
        self.models = processor.models
        self.watermark = processor.watermark
        self._stalled: dict[int, str] = {}  # job id -> why its slices are left to the process step
        # Receive first: set by the service when the receiver runs in this process (busy.py).
        self.receive_saturated: Callable[[], bool] = lambda: False

    def _pending(self) -> tuple[int, str, int | None, int, list[tuple[str, str]]] | None:
        """(job id, model, steps, seed, [(SOPInstanceUID, spool path)]) of the first streaming job
        with at least ``stream_min_slices`` settled slices without a cached output, up to one run."""
        cfg = self.config.processing
        settled = db.utcnow() - timedelta(seconds=cfg.stream_settle_s)
        with self.db.session() as s:
            for job in s.scalars(select(db.Job).where(db.Job.state == db.STREAMING).order_by(db.Job.id)):
                if job.id in self._stalled:
                    continue
                done = set(s.scalars(select(db.StreamSlice.sop_instance_uid).where(db.StreamSlice.job_id == job.id)))
                ready = s.execute(
                    select(db.Instance.sop_instance_uid, db.Instance.path)
                    .where(db.Instance.series_id == job.series_id, db.Instance.received_at <= settled)
                    .order_by(db.Instance.id)).all()
                ready = [(u, p) for u, p in ready if u not in done]
                if len(ready) >= cfg.stream_min_slices:
                    steps, seed = job_settings(job, self.config)
                    return job.id, job.model, steps, seed, ready[:cfg.stream_min_slices]
        return None

    def queued_work(self) -> bool:
        with self.db.session() as s:
            return s.scalar(select(db.Job.id).where(db.Job.state == db.QUEUED).limit(1)) is not None

    def stream(self, stop: Callable[[], bool] | None = None) -> int:
        """Run streaming chunks until none is ready, a queued job waits (completed series first),
        the receiver in this process is saturated (it goes first) or ``stop``; returns how many
        slices were standardized."""
        sweep(self.config, self.db)
        total = 0
        while not (stop and stop()) and not self.receive_saturated() and not self.queued_work():
            pending = self._pending()
            if pending is None:
                break
            n = self._run(*pending)
            if n == 0:
                break
            total += n
        return total

    def _stall(self, job_id: int, why: str) -> int:
        self._stalled[job_id] = why
        log_event(log, "stream_stalled", level=logging.WARNING, job=job_id, reason=why)
        return 0

    def _run(self, job_id: int, model: str, steps: int | None, seed: int, items: list[tuple[str, str]]) -> int:
        """One run: read the slices, standardize them, cache each output, record the rows."""
        from ltdiff_core.dicomio.reader import read_series

        from dicom_node.decide.anomalies import spacing_refusal

        t0 = time.monotonic()
        try:
            std = self.models.get(model)
            sr = read_series([self.config.spool_dir / p for _, p in items])
        except Exception as exc:  # left to the process step, which refuses or fails with the reason
            return self._stall(job_id, f"{type(exc).__name__}: {exc}"[:300])
        info = std.info
        why = spacing_refusal(float(min(sr.spacing[1:])), info.training_pixel_mm)
        if why is not None:
            return self._stall(job_id, why)
        need = int(sr.hu.nbytes)
        if not self.watermark.room_for_output(2 * need):
            return 0  # no room for the cache now: the process step does these slices later
        keys = series_slice_keys(sr, seed)
        fp = fingerprint(info, steps, seed)
        # One model call at a time, each committed: a series completed meanwhile waits at most one
        # call, not the whole run (the remaining slices are done by the process step).
        step = max(1, std.max_batch_pixels // FIXED_BATCH_PIXELS)
        done = 0
        model_s = 0.0
        for k in range(0, len(sr.datasets), step):
            if k and (self.receive_saturated() or self.queued_work()):
                break
            t1 = time.monotonic()
            try:
                res = std.standardize(sr.hu[k:k + step], sr.spacing, steps=steps, slice_keys=keys[k:k + step])
            except Exception as exc:
                log.exception("streaming run failed")
                return done or self._stall(job_id, f"model run failed: {type(exc).__name__}: {exc}"[:300])
            model_s += time.monotonic() - t1
            if not self._store(job_id, sr.datasets[k:k + step], res, fp):
                break
            done += len(res)
        log_event(log, "stream_run", job=job_id, slices=done, model=model,
                  seconds=round(time.monotonic() - t0, 2), model_s=round(model_s, 2))
        return done

    def _store(self, job_id: int, datasets: Sequence[Any], outputs: Sequence[np.ndarray], fp: str) -> bool:
        """Write each output atomically, make them durable together, then record the rows; False
        when the job was dropped or taken over meanwhile (the next sweep removes the files).

        The run's files are synced in parallel with one sync of their directory (and of its entry,
        for the run that created it), not two serial syncs per file: this runs while the series is
        still arriving, and every sync it queues delays the receiver's."""
        written = []
        paths = []
        for ds, out in zip(datasets, outputs):
            uid = str(ds.SOPInstanceUID)
            rel = cache_rel(job_id, uid)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(out, dtype=np.float32), allow_pickle=False)
            write_atomic(self.config.output_dir / rel, buf.getbuffer(), fsync=False)
            written.append((uid, rel))
            paths.append(self.config.output_dir / rel)
        if paths:  # durable before the rows that point at them
            make_durable(paths, [paths[0].parent, paths[0].parent.parent])
        with self.db.session() as s:
            job = s.get(db.Job, job_id)
            if job is None or job.state not in (db.STREAMING, db.QUEUED):
                return False
            for uid, rel in written:
                track.record_streamed(job, uid, rel, fp)
        return True
