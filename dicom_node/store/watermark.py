"""Disk watermark: refuse new instances before the disk is full, keeping room for the outputs of
work already accepted.

Every acknowledged instance is a promise to deliver a standardized copy, which needs about as
many bytes again in ``output/``. So the receiver refuses (``0xA700``, the sender retries later)
when ``free - reserve < threshold``, where ``threshold = max(min_free_percent of the volume,
min_free_mb)`` and ``reserve`` is the expected output size of series not yet processed. The
processing step may use the space below the threshold (that is what it is kept for) and waits,
instead of failing, when even that is not there; it resumes by itself when space returns.

The threshold is never below :data:`PROCESSING_MARGIN`, the margin the processing step keeps
itself (``room_for_output``): with ``min_free_mb = 0`` an acknowledged series would otherwise
find no room for its outputs and wait for ever.

Bytes count from the moment they are written: a data set is spooled to disk as it arrives
(:mod:`dicom_node.receive.incoming`), and each piece is checked here first
(:meth:`Watermark.take_incoming`), so a data set that never ends stops at the watermark; until it
is accepted its expected output is reserved too. Quarantined copies are kept only while the
headroom stays positive (:mod:`dicom_node.receive.quarantine`).
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
PROCESSING_MARGIN = 1 << 20  # free bytes the processing step keeps beyond its outputs; also the least threshold


@dataclass(frozen=True)
class DiskState:
    free: int
    total: int
    threshold: int
    reserve: int  # expected outputs of accepted series and of the data sets being received

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
    return int(max(total * d.min_free_percent / 100.0, d.min_free_mb * 2**20, PROCESSING_MARGIN))


class Watermark:
    """Free-space checks for the receiver and the processing step of one node."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        self.config = config
        self.db = database
        self._lock = threading.Lock()
        self._reserve = (0.0, 0)  # (monotonic time, bytes)
        # (monotonic time, free bytes, total bytes, self._written then): the statvfs snapshot
        self._free = (-FREE_CACHE_S, 0, 0, 0)
        self._written = 0  # bytes this receiver has written (counted off the snapshot's free space)
        self._incoming = 0  # bytes of data sets being received: their outputs are reserved too

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
        """An instance of ``nbytes`` taken with :meth:`take_incoming` is accepted: its output
        stays reserved, counted into the cached reserve until the next refresh reads it."""
        with self._lock:
            at, value = self._reserve
            self._reserve = (at, value + int(nbytes * self.config.disk.output_reserve_factor))
            self._incoming -= nbytes

    def take_incoming(self, nbytes: int, over: bool = False) -> str | None:
        """Count ``nbytes`` more of a data set being received, about to be written; the reason
        they do not fit (nothing counted), else ``None``. ``over``: count them even past the
        watermark (a re-send of a known instance is answered without being kept)."""
        st = self.state()  # its reserve holds the outputs of the bytes taken before these
        with self._lock:
            if over or st.headroom - nbytes - int(nbytes * self.config.disk.output_reserve_factor) >= 0:
                self._written += nbytes
                self._incoming += nbytes
                return None
        return self._reason(st)

    def release_incoming(self, nbytes: int) -> None:
        """Bytes taken with :meth:`take_incoming` that will not be processed (refused, a duplicate,
        quarantined, or the association ended): no output is reserved for them any more."""
        with self._lock:
            self._incoming -= nbytes

    def _free_space(self, fresh: bool) -> tuple[int, int]:
        """``free_space`` of the data volume, from a statvfs at most FREE_CACHE_S old less the
        bytes written since (receive asks for every piece of a data set; a cached value only ever
        errs low)."""
        with self._lock:
            at, free, total, written = self._free
            if not fresh and time.monotonic() - at <= FREE_CACHE_S:
                return free - (self._written - written), total
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            written = self._written
        free, total = free_space(self.config.data_dir)
        with self._lock:
            self._free = (time.monotonic(), free, total, written)
            return free - (self._written - written), total

    def state(self, fresh: bool = False) -> DiskState:
        free, total = self._free_space(fresh)
        with self._lock:
            incoming = int(self._incoming * self.config.disk.output_reserve_factor)
        return DiskState(free, total, threshold_bytes(total, self.config), self.reserve(fresh) + incoming)

    def _reason(self, st: DiskState) -> str:
        return (f"disk watermark: {st.free / 2**20:.1f} MiB free, {st.reserve / 2**20:.1f} MiB reserved for "
                f"outputs of accepted series, threshold {st.threshold / 2**20:.1f} MiB")

    def refusal(self) -> str | None:
        """Why nothing more may be kept now (the headroom is used up), else ``None``."""
        st = self.state()
        return None if st.headroom >= 0 else self._reason(st)

    def room_for_output(self, nbytes: int, margin: int = PROCESSING_MARGIN) -> bool:
        """Whether ``nbytes`` of outputs (plus a margin) fit on the volume now."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        free, _ = free_space(self.config.data_dir)
        return free >= nbytes * self.config.disk.output_reserve_factor + margin
