"""Atomic file writes for the spool: a file either exists complete or not at all.

A C-STORE is acknowledged only after its bytes are durable, so a crash or power loss never
leaves a half-written instance that the database claims to have. Pattern: temporary file in the
same directory, fsync, ``os.replace``, fsync the directory.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID. Valid UIDs (digits and dots) are used as they are;
    anything else (a malformed or hostile value such as ``../x``) becomes a hash."""
    uid = uid.strip().rstrip("\x00")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | bytearray | memoryview, fsync: bool = True) -> int:
    """Write ``data`` to ``path`` atomically; returns the size. Raises ``OSError`` on failure
    (the caller turns that into a failure status, never success)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{id(data)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(path.parent)
    return len(data)


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
