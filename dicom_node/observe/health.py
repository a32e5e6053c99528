"""``/healthz``: the three things without which the node silently stops working.

* database: reachable and answering (``SELECT 1``);
* spool: a file can be created and removed in the spool directory (full disk, read-only mount,
  wrong owner all show here before a C-STORE fails);
* scheduler: the node's heartbeat row was written recently (the heartbeat is a scheduler job,
  so a stale row means the scheduled stages are not running).
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from sqlalchemy import select, text

from dicom_node.store import db
from dicom_node.config import NodeConfig
from dicom_node.store.heartbeat import HEARTBEAT_S, heartbeat_fresh


def check_database(database: db.Database) -> tuple[bool, str]:
    try:
        with database.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as exc:  # any driver error means "not reachable" to a probe
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return True, "SELECT 1 answered"


def check_spool(config: NodeConfig) -> tuple[bool, str]:
    try:
        fd, name = tempfile.mkstemp(prefix=".healthz-", dir=config.spool_dir)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return False, f"cannot write in the spool: {exc.strerror or exc}"
    return True, "file created and removed"


def check_scheduler(config: NodeConfig, database: db.Database) -> tuple[bool, str]:
    try:
        with database.session() as s:
            # This process's own heartbeat (the endpoint runs inside a `serve` process).
            hb = s.scalars(select(db.Heartbeat).where(db.Heartbeat.hostname == socket.gethostname(),
                                                       db.Heartbeat.pid == os.getpid())).first()
            now = db.utcnow()
            if hb is None:
                return False, "no heartbeat recorded"
            if heartbeat_fresh(hb, now):
                return True, f"heartbeat {(now - hb.heartbeat_at).total_seconds():.1f} s ago"
            if hb.stopped_at is not None:
                return False, "node recorded as stopped"
            return False, (f"last heartbeat {(now - hb.heartbeat_at).total_seconds():.0f} s ago "
                           f"(expected every {HEARTBEAT_S:g} s)")
    except Exception as exc:
        return False, f"heartbeat not readable: {type(exc).__name__}"


def health(config: NodeConfig, database: db.Database) -> dict[str, Any]:
    """``{"ok": bool, "checks": {name: {"ok": bool, "detail": str}}}``; ``ok`` only when all are."""
    checks = {
        "database": check_database(database),
        "spool": check_spool(config),
        "scheduler": check_scheduler(config, database),
    }
    return {"ok": all(ok for ok, _ in checks.values()),
            "checks": {k: {"ok": ok, "detail": detail} for k, (ok, detail) in checks.items()}}
