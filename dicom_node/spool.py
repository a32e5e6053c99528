"""Spool files: safe names for UIDs, atomic writes, disk usage.

A C-STORE is acknowledged only after its bytes are durable, so a crash or power loss never
leaves a half-written instance that the database claims to have. The writer is the project's one
atomic writer, ``ltdiff_core.atomic.write_atomic`` (temporary file in the same directory, fsync,
``os.replace``, fsync the directory), re-exported here for the service's modules.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ltdiff_core.atomic import write_atomic

__all__ = ["disk_usage", "safe_name", "write_atomic"]

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID. Valid UIDs (digits and dots) are used as they are;
    anything else (a malformed or hostile value such as ``../x``) becomes a hash."""
    uid = uid.strip().rstrip("\x00")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def disk_usage(root: Path) -> int:
    """Bytes used by files under ``root`` (0 when it does not exist)."""
    total = 0
    if not root.exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
