"""The model call on whole series, and the settings a job runs with.

Used by the process step (:mod:`dicom_node.process.processor`) for completed series and by
streaming (:mod:`dicom_node.process.stream`) for the slices of a series still arriving, so both
take the same settings and keys: a slice's output depends only on its pixels, its
SOPInstanceUID key and the model, and a cached streamed slice equals the one the whole-series call
would make (:func:`fingerprint` names what it was made with).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from sqlalchemy import select

from ltdiff_core.kernel_model import KernelModel, ModelInfo

from dicom_node.process.model import series_slice_keys
from dicom_node.store import db, stream_cache

if TYPE_CHECKING:
    from ltdiff_core.dicomio.reader import Series

    from dicom_node.config import NodeConfig

#: (job id, the series read from the spool, seconds reading it)
Loaded = tuple[int, "Series", float]


class Settings(NamedTuple):
    """What a job's model call takes besides the model: sampler steps (None: the model's default)
    and the seed of its random streams."""

    steps: int | None
    seed: int


def job_settings(job: db.Job, config: NodeConfig) -> Settings:
    """The settings frozen on the job when it was routed (``Job.rule_settings``, written by
    :func:`dicom_node.store.track.queue` / ``start_stream``). A job routed before they were
    recorded takes its rule's steps from the live configuration, else ``processing.steps``."""
    frozen = job.rule_settings
    if frozen is not None:
        steps = frozen.get("steps")
    else:
        rule = next((r for r in config.rules if r.name == job.rule_name), None)
        steps = (rule.steps if rule and rule.steps else None) or config.processing.steps
    return Settings(int(steps) if steps is not None else None, int(job.seed or 0))


def settings_of(database: db.Database, config: NodeConfig, job_ids: Sequence[int]) -> dict[int, Settings]:
    """:func:`job_settings` of several jobs, by job id."""
    with database.session() as s:
        return {job.id: job_settings(job, config) for job in s.scalars(select(db.Job).where(db.Job.id.in_(job_ids)))}


def fingerprint(info: ModelInfo, steps: int | None, seed: int) -> str:
    """What a cached output depends on besides the slice: the checkpoint file, variant, steps, seed."""
    return f"{info.sha256}|{info.variant}|{steps}|{int(seed)}"


def run_with_cache(config: NodeConfig, database: db.Database, model: KernelModel, loaded: Sequence[Loaded],
                   settings: dict[int, Settings]) -> tuple[list[np.ndarray], dict[int, int], dict[int, float]]:
    """Outputs for whole series: cached slices of each job are used when made with the same
    settings, the others go through the model in one call per sampler setting (which fills the
    device; slices keyed by SOPInstanceUID). Returns the outputs and, per job, how many slices
    came from the cache and the seconds spent reading them (not model time)."""
    with database.session() as s:
        rows = s.scalars(select(db.StreamSlice).where(
            db.StreamSlice.job_id.in_([job_id for job_id, _, _ in loaded]))).all()
        cached = {(r.job_id, r.sop_instance_uid): (r.path, r.fingerprint) for r in rows}
    info = model.info
    outs: list[np.ndarray] = []
    used: dict[int, int] = {}
    cache_s: dict[int, float] = {}
    todo: dict[int | None, list[tuple[int, np.ndarray, Series, list[int]]]] = {}
    for i, (job_id, sr, _) in enumerate(loaded):
        steps, seed = settings[job_id]
        fp = fingerprint(info, steps, seed)
        t0 = time.monotonic()
        out = np.empty(sr.hu.shape, np.float32)
        missing = []
        for z, ds in enumerate(sr.datasets):
            rel, have = cached.get((job_id, str(ds.SOPInstanceUID)), (None, None))
            arr = stream_cache.load(config, rel, sr.hu.shape[1:]) if rel is not None and have == fp else None
            if arr is None:
                missing.append(z)
            else:
                out[z] = arr
        used[job_id] = len(sr.datasets) - len(missing)
        cache_s[job_id] = time.monotonic() - t0
        outs.append(out)
        if missing:
            keys = series_slice_keys(sr, seed)
            todo.setdefault(steps, []).append((i, np.asarray(missing), sr, [keys[z] for z in missing]))
    for steps, items in todo.items():
        res = model.standardize_batch([sr.hu[missing] for _, missing, sr, _ in items],
                                      [sr.spacing for _, _, sr, _ in items], steps=steps,
                                      slice_keys=[k for _, _, _, k in items])
        for (i, missing, _, _), r in zip(items, res):
            outs[i][missing] = r
    return outs, used, cache_s
