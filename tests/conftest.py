"""Shared fixtures: a ``dciodvfy`` runner and a factory for small CT series on disk."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from ltdiff_core.dicomio.uids import make_uid
from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets, save_datasets
from nodetools.postgres import PostgresServer, start_postgres


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[..., list[str]]:
    """``check(path, level="Error") -> list[str]``: the dciodvfy lines of that level for one file.

    dciodvfy writes its findings to stderr, one per line, prefixed ``Error -`` or ``Warning -``.
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed; install the Debian package dicom3tools")

    def check(path: str | Path, level: str = "Error") -> list[str]:
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        lines = (proc.stderr + proc.stdout).splitlines()
        return [line for line in lines if line.startswith(level)]

    return check


@pytest.fixture
def study_info() -> StudyInfo:
    """A fresh study and frame of reference for series built by ``ct_series``."""
    return StudyInfo(study_uid=make_uid(), frame_of_reference_uid=make_uid())


@pytest.fixture
def ct_series(tmp_path: Path, study_info: StudyInfo) -> Callable[..., list[Path]]:
    """Factory writing a small CT series to ``tmp_path/<folder>`` and returning its files.

    ``make(volume=None, *, shape=(4, 64, 64), spacing=(1.5, 0.7, 0.7), kernel="Br40",
    folder="series", names=None, transfer_syntax=None, study=None, edit=None, **ct_kwargs)``:
    without ``volume`` a reproducible random int16-valued volume is used; ``edit(datasets)``
    may change the datasets before saving (e.g. to build broken series); other keywords go to
    :func:`ltdiff_core.dicomio.writer.ct_datasets`.
    """
    counter = iter(range(1, 10_000))

    def make(
        volume: np.ndarray | None = None,
        *,
        shape: Sequence[int] = (4, 64, 64),
        spacing: Sequence[float] = (1.5, 0.7, 0.7),
        kernel: str = "Br40",
        folder: str = "series",
        names: Sequence[str] | None = None,
        transfer_syntax: str | None = None,
        study: StudyInfo | None = None,
        edit: Callable[[list], None] | None = None,
        **ct_kwargs,
    ) -> list[Path]:
        number = next(counter)
        if volume is None:
            volume = np.random.default_rng(number).integers(-1024, 2000, size=tuple(shape)).astype(np.float32)
        datasets = ct_datasets(
            volume, spacing, study=study or study_info, kernel=kernel, series_number=number, **ct_kwargs
        )
        if edit is not None:
            edit(datasets)
        extra = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}
        return save_datasets(datasets, tmp_path / folder, names=names, **extra)

    return make


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL server (as an unprivileged user, free port, stopped by PID)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
