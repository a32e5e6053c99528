"""Leases of claimed work: who holds a job or a delivery, and the thread that keeps it held.

A worker claims a job (or a dispatcher a delivery) with ``claimed_by = host:pid:role`` and a
``lease_expires_at``; while it works, a :class:`LeaseKeeper` thread renews the lease every third
of its length. A worker that dies stops renewing, and once the lease has expired another worker
claims the work again (:func:`dicom_node.store.track.reclaim_expired`, :func:`dicom_node.store.track.claim_delivery`).
The owner check at commit (:func:`dicom_node.store.track.processed`) fences off a worker that was only
slow: it finds the job claimed by someone else and commits nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from dicom_node.store import db, track
from dicom_node.store.heartbeat import pid_alive
from dicom_node.logs import log_event

log = logging.getLogger("dicom_node.store.lease")


def worker_id(role: str) -> str:
    """``host:pid:role``: who holds a claimed job or delivery (shown in status)."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


def owner_gone(owner: str) -> bool:
    """Whether the worker ``owner`` ran on this host and its process is no longer running (its
    work can be claimed again without waiting for the lease to expire)."""

    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


class LeaseKeeper:
    """Renews the leases one worker holds on rows of ``model`` (jobs or deliveries)."""

    def __init__(self, database: db.Database, model: type[db.Job] | type[db.Delivery], owner: str,
                 lease_s: float) -> None:
        self.db = database
        self.model = model
        self.owner = owner
        self.lease_s = lease_s
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, *ids: int) -> None:
        with self._lock:
            self._held.update(ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"lease-{self.model.__tablename__}",
                                                daemon=True)
                self._thread.start()

    def drop(self, *ids: int) -> None:
        with self._lock:
            self._held.difference_update(ids)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> int:
        ids = self.held()
        if not ids:
            return 0
        until = db.utcnow() + timedelta(seconds=self.lease_s)
        with self.db.session() as s:
            return track.renew(s, self.model, ids, self.owner, until)

    def _run(self) -> None:
        while not self._wake.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as exc:  # database unreachable for a moment: try again next period
                log_event(log, "lease_renew_failed", level=logging.WARNING, owner=self.owner,
                          error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._wake.set()
