"""Atomic file writes for the spool: a file either exists complete or not at all.

A C-STORE is acknowledged only after its bytes are durable, so a crash or power loss never
leaves a half-written instance that the database claims to have. Pattern: temporary file in the
same directory, fsync, ``os.replace``, fsync the directory. The receiver splits the pattern
(``write_pending`` in its association thread, the syncs in ``groupcommit``) so that instances
arriving together share one pass of syncs.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
from pathlib import Path

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID. Valid UIDs (digits and dots) are used as they are;
    anything else (a malformed or hostile value such as ``../x``) becomes a hash."""
    uid = uid.strip().rstrip("\x00")
    if _SAFE_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


_TMP_SEQ = itertools.count()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file or subdirectory) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of the file at ``path`` durable (Linux syncs the inode from any descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> list[Path]:
    """Create directory ``path`` and missing parents; returns the directories whose entries
    changed (the parent of each directory created), which must be fsynced for the new
    directories to survive a power loss."""
    if path.is_dir():
        return []
    changed = make_dirs(path.parent) if path.parent != path else []
    try:
        path.mkdir()
    except FileExistsError:
        pass  # made by a concurrent writer whose sync may not have happened yet: sync it here too
    changed.append(path.parent)
    return changed


def write_pending(path: Path, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to a temporary file beside ``path``, without syncing: the caller makes it
    durable and renames it (see ``groupcommit``). Returns the temporary path; on failure nothing
    is left behind."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{next(_TMP_SEQ)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return tmp


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_atomic(path: Path, data: bytes | bytearray | memoryview, fsync: bool = True) -> int:
    """Write ``data`` to ``path`` atomically; returns the size. Raises ``OSError`` on failure
    (the caller turns that into a failure status, never success)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{next(_TMP_SEQ)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)
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
