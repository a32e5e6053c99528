"""Disk watermark: refuse new instances before the disk is full, keeping room for the outputs of
work already accepted.

Every acknowledged instance is a promise to deliver a standardized copy, which needs about as
many bytes again in ``output/``. So the receiver refuses (``0xA700``, the sender retries later)
when ``free - reserve < threshold``, where ``threshold = max(min_free_percent of the volume,
min_free_mb)`` and ``reserve`` is the expected output size of series not yet processed. The
processing step may use the space below the threshold (that is what it is kept for) and waits,
instead of failing, when even that is not there; it resumes by itself when space returns.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from dicom_node.store import db
from dicom_node.config import NodeConfig

RESERVE_CACHE_S = 1.0  # the reserve is a DB sum; receive checks reuse it for this long
FREE_CACHE_S = 0.25  # receive checks reuse one statvfs this long, less the bytes accepted since
PENDING_STATES = (db.RECEIVED, db.COMPLETE, db.QUEUED, db.PROCESSING)


@dataclass(frozen=True)
class DiskState:
    free: int
    total: int
    threshold: int
    reserve: int

    @property
    def headroom(self) -> int:
        """Bytes that may still be accepted."""
        return self.free - self.reserve - self.threshold


def free_space(path: Path) -> tuple[int, int]:
    """(free bytes for an unprivileged writer, total bytes) of the volume holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def threshold_bytes(total: int, config: NodeConfig) -> int:
    d = config.disk
    return int(max(total * d.min_free_percent / 100.0, d.min_free_mb * 2**20))


class Watermark:
    """Free-space checks for the receiver and the processing step of one node."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        self.config = config
        self.db = database
        self._lock = threading.Lock()
        self._reserve = (0.0, 0)  # (monotonic time, bytes)
        self._free = (-FREE_CACHE_S, 0, 0)  # (monotonic time, free bytes, total bytes)

    def pending_input_bytes(self) -> int:
        """Bytes received for series whose output does not exist yet."""
        with self.db.session() as s:
            return int(s.scalar(
                select(func.coalesce(func.sum(db.Instance.size), 0)).join(db.Series)
                .where(db.Series.state.in_(PENDING_STATES), db.Instance.excluded.is_(None))
            ) or 0)

    def reserve(self, fresh: bool = False) -> int:
        with self._lock:
            at, value = self._reserve
            if fresh or time.monotonic() - at > RESERVE_CACHE_S:
                value = int(self.pending_input_bytes() * self.config.disk.output_reserve_factor)
                self._reserve = (time.monotonic(), value)
            return value

    def note_accepted(self, nbytes: int) -> None:
        """Count an instance just accepted into the cached reserve and free space (until the next
        refresh)."""
        with self._lock:
            at, value = self._reserve
            self._reserve = (at, value + int(nbytes * self.config.disk.output_reserve_factor))
            at, free, total = self._free
            self._free = (at, free - nbytes, total)

    def _free_space(self, fresh: bool) -> tuple[int, int]:
        """``free_space`` of the data volume, from a statvfs at most FREE_CACHE_S old (receive
        asks once per instance; a cached value only ever errs low, by the bytes accepted since)."""
        with self._lock:
            at, free, total = self._free
            if not fresh and time.monotonic() - at <= FREE_CACHE_S:
                return free, total
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        free, total = free_space(self.config.data_dir)
        with self._lock:
            self._free = (time.monotonic(), free, total)
        return free, total

    def state(self, fresh: bool = False) -> DiskState:
        free, total = self._free_space(fresh)
        return DiskState(free, total, threshold_bytes(total, self.config), self.reserve(fresh))

    def receive_refusal(self, incoming: int) -> str | None:
        """Why an instance of ``incoming`` bytes must be refused now, else ``None``."""
        st = self.state()
        if st.headroom - incoming * (1 + self.config.disk.output_reserve_factor) >= 0:
            return None
        return (f"disk watermark: {st.free / 2**20:.1f} MiB free, {st.reserve / 2**20:.1f} MiB reserved for "
                f"outputs of accepted series, threshold {st.threshold / 2**20:.1f} MiB")

    def room_for_output(self, nbytes: int, margin: int = 1 << 20) -> bool:
        """Whether ``nbytes`` of outputs (plus a margin) fit on the volume now."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        free, _ = free_space(self.config.data_dir)
        return free >= nbytes * self.config.disk.output_reserve_factor + margin
