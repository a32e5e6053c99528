"""The one atomic writer (spool, outputs, pid file, checkpoints, training state): a file is either
complete under its name or absent, no temporary file is left behind, permissions follow the umask."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dicom_node.store import spool
from ltdiff_core import atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_creates_parents_and_returns_byte_count(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    data = np.arange(5, dtype=np.int32)  # itemsize 4: the size is bytes, not elements
    assert atomic.write_atomic(target, memoryview(data)) == 20
    assert target.read_bytes() == data.tobytes()
    assert _leftovers(target.parent) == []


def test_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_failed_rename_raises_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "child").mkdir(parents=True)  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic.write_atomic(target, b"x")
    assert _leftovers(tmp_path) == []


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    """Checkpoints and outputs are read by other users (the service user); a private 0600 temp
    file renamed into place would lock them out."""
    old = os.umask(0o022)
    try:
        atomic.write_atomic(tmp_path / "w.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "w.json").stat().st_mode & 0o777 == 0o644


def test_spool_uses_the_same_writer() -> None:
    assert spool.write_atomic is atomic.write_atomic


def test_fsync_files_syncs_every_file_and_reports_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each path is synced once (from a few threads); a path that cannot be opened raises, never
    passes silently (the job then fails instead of committing output that may not be durable)."""
    files = [tmp_path / f"{i}.dcm" for i in range(20)]
    for f in files:
        f.write_bytes(b"x")
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    atomic.fsync_files(files, workers=4)
    assert len(synced) == len(files)
    with pytest.raises(FileNotFoundError):
        atomic.fsync_files([*files, tmp_path / "missing.dcm"], workers=4)
