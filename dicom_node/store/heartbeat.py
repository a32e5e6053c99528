"""Heartbeats: one row per running ``dicom-node serve`` process (host, PID, roles), written every
:data:`HEARTBEAT_S` by its scheduler and read by ``status``, ``/healthz`` and the lease owner check.

A leaf of the store: the service writes it, admin and observe read it, and neither imports the
service for the facts below.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select

from dicom_node.store import db

#: Seconds between two heartbeats of a running process; three missed ones mean it is gone.
HEARTBEAT_S = 5.0


def pid_alive(pid: int) -> bool:
    """A process with this PID exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def heartbeat_fresh(hb: db.Heartbeat | None, now: datetime) -> bool:
    """A running process's heartbeat is recent (fewer than three beats missed)."""
    return hb is not None and hb.stopped_at is None and (now - hb.heartbeat_at).total_seconds() < 3 * HEARTBEAT_S


def beat(database: db.Database, *, roles: Sequence[str], ae_title: str, port: int | None, version: str,
         model: str | None = None, device: str | None = None, started: bool = False, stopped: bool = False) -> None:
    """Write this process's row. At start (``started``) rows of earlier processes on this host
    that are gone are removed, and a stale row of this PID is replaced."""
    now = db.utcnow()
    host, pid = socket.gethostname(), os.getpid()
    with database.session() as s:
        if started:
            for old in s.scalars(select(db.Heartbeat).where(db.Heartbeat.hostname == host, db.Heartbeat.pid != pid)):
                if not pid_alive(old.pid):
                    s.delete(old)
            s.execute(delete(db.Heartbeat).where(db.Heartbeat.hostname == host, db.Heartbeat.pid == pid))
        row = s.scalars(select(db.Heartbeat).where(db.Heartbeat.hostname == host, db.Heartbeat.pid == pid)).first()
        if row is None:
            row = db.Heartbeat(hostname=host, pid=pid, started_at=now)
            s.add(row)
        row.roles = ",".join(roles)
        row.ae_title = ae_title
        row.port = int(port) if port else None
        row.heartbeat_at = now
        row.version = version
        if model:
            row.model = model
            row.device = device
        if stopped:
            row.stopped_at = now
