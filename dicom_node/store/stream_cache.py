"""Files of the stream cache: per-slice float32 model outputs made while a series was arriving.

One directory per job, ``output_dir/stream-<job>/<SOPInstanceUID>.npy`` (each file written
atomically), and one :class:`dicom_node.store.db.StreamSlice` row per file. Here, beside the
other stored files, because three stages handle them: process writes and reads them
(:mod:`dicom_node.process.stream`, :mod:`dicom_node.process.run`), decide drops the cache of a
series refused, ignored or unrouted at completion, and :func:`sweep` removes what no job needs.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, select

from dicom_node.store import db
from dicom_node.store.spool import safe_name

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

CACHE_PREFIX = "stream-"
#: Jobs whose cached slices may still be used.
CACHE_STATES = (db.STREAMING, db.QUEUED, db.PROCESSING)


def cache_dir(config: NodeConfig, job_id: int) -> Path:
    return config.output_dir / f"{CACHE_PREFIX}{int(job_id)}"


def cache_rel(job_id: int, sop_uid: str) -> str:
    """Where one slice's cached output lives, relative to the output directory."""
    return f"{CACHE_PREFIX}{int(job_id)}/{safe_name(sop_uid)}.npy"


def load(config: NodeConfig, rel: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A cached output, or ``None`` when it is missing, unreadable or not the slice's shape."""
    try:
        arr = np.load(config.output_dir / rel, allow_pickle=False)
    except Exception:
        return None
    return arr if arr.dtype == np.float32 and arr.shape == shape else None


def remove_caches(config: NodeConfig, job_ids: Iterable[int]) -> None:
    """Delete the cache directories of these jobs (after the commit that dropped their rows)."""
    for job_id in job_ids:
        shutil.rmtree(cache_dir(config, job_id), ignore_errors=True)


def sweep(config: NodeConfig, database: db.Database) -> int:
    """Remove caches (directories and rows) of jobs that no longer need them: processed, failed,
    refused or deleted. Returns how many directories were removed."""
    root = config.output_dir
    ids = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(CACHE_PREFIX) and p.name[len(CACHE_PREFIX):].isdigit():
                ids.append(int(p.name[len(CACHE_PREFIX):]))
    with database.session() as s:
        live = set(s.scalars(select(db.Job.id).where(db.Job.state.in_(CACHE_STATES))))
        stale_rows = select(db.StreamSlice.job_id).join(db.Job).where(db.Job.state.not_in(CACHE_STATES))
        stale = set(s.scalars(stale_rows.distinct()))
        if stale:
            s.execute(delete(db.StreamSlice).where(db.StreamSlice.job_id.in_(stale)))
    gone = [i for i in ids if i not in live]
    remove_caches(config, gone)
    return len(gone)
