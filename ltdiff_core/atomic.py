"""The one atomic file writer: a file either exists complete (old or new content) or not at all.

Readers never see a half-written file and a crash never leaves one under the final name: the node's
spool (a C-STORE is acknowledged only after its bytes are durable), its outputs and pid file,
checkpoints and training state. Pattern: temporary file in the same directory (same file system,
so the rename is atomic), optional fsync, ``os.replace``, fsync of the directory so the rename
itself survives a power loss. The temporary file is removed when writing fails.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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


def fsync_files(paths: "list[Path]", workers: int = 8) -> None:
    """:func:`fsync_file` for many files at once, from a few threads: the file system can put
    their journal commits together instead of waiting for each in turn (a derived series is
    hundreds of files written into a private staging directory, made durable before it is
    renamed into place)."""
    if len(paths) <= 1 or workers <= 1:
        for p in paths:
            fsync_file(p)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(paths)), thread_name_prefix="fsync") as pool:
        for _ in pool.map(fsync_file, paths):  # re-raises the first OSError
            pass


def make_durable(files: "list[Path]", dirs: "list[Path]") -> None:
    """Files written without syncs (plain writes, or renames with ``fsync=False``) made durable
    together: their data in parallel (:func:`fsync_files`), then each directory whose entries
    changed, innermost first. One sync pass for a batch instead of two serial syncs per file."""
    fsync_files(files)
    for d in dirs:
        fsync_dir(d)


def temp_name(path: Path) -> Path:
    """Hidden, unique sibling of ``path`` (``.NAME.PID.RANDOM.tmp``); never a final name."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


@contextlib.contextmanager
def open_atomic(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """Binary file to write ``path`` through; it appears under ``path`` only when the block ends
    without an exception. For writers that stream into a file object (``torch.save``,
    ``Dataset.save_as``). Permissions follow the umask, as with ``open``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview, fsync: bool = True) -> int:
    """Write ``data`` to ``path`` atomically; returns the size. Raises ``OSError`` on failure
    (the node turns that into a failure status, never success)."""
    with open_atomic(path, fsync=fsync) as fh:
        fh.write(data)
    return memoryview(data).nbytes
