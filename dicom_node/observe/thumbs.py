"""Before/after thumbnails of a processed series for the status page.

The middle input slice (by Instance Number) is read from the spool and the output slice derived
from it is found through its Source Image Sequence, so both thumbnails show the same anatomy.
Both are drawn in a soft-tissue window, where the kernel change (noise, edge sharpness) is
visible at a glance. Only pixels are rendered: no text, no header values. A job's output never
changes (reprocessing makes a new job), so rendered pairs are kept in a small in-memory cache.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import NodeConfig

SIZE = 96
WINDOW_CENTER, WINDOW_WIDTH = 40.0, 400.0  # soft tissue (HU)
CACHE_PAIRS = 256


def render_png(ds: pydicom.Dataset, size: int = SIZE) -> bytes:
    """``size``×``size`` greyscale PNG of one CT slice in the soft-tissue window (letterboxed)."""
    from PIL import Image

    hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    lo = WINDOW_CENTER - WINDOW_WIDTH / 2
    grey = np.clip((hu - lo) / WINDOW_WIDTH * 255.0, 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L")
    scale = size / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _source_uid(ds: pydicom.Dataset) -> str | None:
    seq = ds.get("SourceImageSequence")
    return str(seq[0].ReferencedSOPInstanceUID) if seq and "ReferencedSOPInstanceUID" in seq[0] else None


def slice_pair(config: NodeConfig, database: db.Database, job_id: int) -> tuple[Path, Path] | None:
    """(input file, output file) of the middle slice of a finished job, or None when the job, its
    input or its output is gone (purged, failed before writing)."""
    with database.session() as s:
        job = s.get(db.Job, job_id)
        if job is None or job.output_series_uid is None:
            return None
        rows = s.execute(select(db.Instance.sop_instance_uid, db.Instance.instance_number, db.Instance.path).where(
            db.Instance.series_id == job.series_id, db.Instance.excluded.is_(None))).all()
    if not rows:
        return None
    rows.sort(key=lambda r: (r.instance_number is None, r.instance_number or 0, r.path))
    middle = rows[len(rows) // 2]
    src = config.spool_dir / middle.path
    outputs = sorted((config.output_dir / f"job-{job_id}").glob("*.dcm"))
    if not src.is_file() or not outputs:
        return None
    for out in outputs:
        try:
            if _source_uid(pydicom.dcmread(out, stop_before_pixels=True)) == middle.sop_instance_uid:
                return src, out
        except Exception:
            continue
    return None


class ThumbnailCache:
    """Rendered ``{"before": png, "after": png}`` per job id, least recently used dropped first."""

    def __init__(self, config: NodeConfig, database: db.Database, capacity: int = CACHE_PAIRS) -> None:
        self.config = config
        self.db = database
        self.capacity = capacity
        self._pairs: OrderedDict[int, dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: int, which: str) -> bytes | None:
        """PNG bytes of ``which`` ("before" or "after") for ``job_id``, or None when not available."""
        if which not in ("before", "after"):
            return None
        with self._lock:
            if job_id in self._pairs:
                self._pairs.move_to_end(job_id)
                return self._pairs[job_id][which]
        pair = slice_pair(self.config, self.db, job_id)
        if pair is None:
            return None
        try:
            rendered = {"before": render_png(pydicom.dcmread(pair[0])), "after": render_png(pydicom.dcmread(pair[1]))}
        except Exception:
            return None  # unreadable file: the page shows no thumbnail rather than an error
        with self._lock:
            self._pairs[job_id] = rendered
            while len(self._pairs) > self.capacity:
                self._pairs.popitem(last=False)
        return rendered[which]
