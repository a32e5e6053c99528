"""Disk full (issue 12, item 6): on a 24 MB tmpfs the node refuses new instances with 0xA700
before the disk is full, delivers everything it acknowledged, and when another writer fills the
disk, accepted work waits and resumes by itself once space returns.

Before: no watermark; the receiver used the last bytes and accepted series failed in derive with
"No space left on device". Without permission to mount, the same test runs on the temp
directory's volume with the threshold set just below its current free space.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fault_helpers import make_rig

from nodetools.peers import make_ct_series, node_cmd, storescu, wait_for
from dicom_node.store.watermark import free_space

SIZE_MB = 24
PENDING = ("received", "complete", "queued", "processing", "sending")


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[Path, float]]:
    """(directory, min_free_mb): a 24 MB tmpfs with a 6 MB threshold, or a plain directory whose
    threshold leaves about 18 MB usable."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    try:
        if mounted:
            yield mnt, 6.0
        else:
            free, _ = free_space(mnt)
            yield mnt, free / 2**20 - (SIZE_MB - 6)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_watermark_refuses_before_full_and_accepted_work_resumes(tmp_path: Path, volume: tuple[Path, float]) -> None:
    mnt, min_free_mb = volume
    rig = make_rig(tmp_path, start=False,
                   extra_sections=f"[disk]\nmin_free_percent = 0.0\nmin_free_mb = {min_free_mb}\n")
    rig.config.write_text(rig.config.read_text().replace(f'data_dir = "{tmp_path / "data"}"',
                                                         f'data_dir = "{mnt / "data"}"'))
    rig.data_dir = mnt / "data"
    try:
        rig.start()
        # --- phase 1: ~1.1 MB series until the watermark refuses (inputs + outputs > 18 MB)
        refused = 0
        for k in range(14):
            files = make_ct_series(tmp_path / f"in{k}", n=8, size=256, seed=k)
            r = storescu(files, rig.port, "LTDIFF", extra=["-v"])
            refused += (r.stdout + r.stderr).count("Refused: OutOfResources")
        assert refused > 0
        st = wait_for(lambda: (lambda s: s if not any(x["state"] in PENDING for x in s["series"]) else None)(
            rig.status()), 120, 0.5, "all accepted work finished")
        states = {x["state"] for x in st["series"]}
        assert states == {"done"}, [(x["state"], x["error"]) for x in st["series"]]
        acknowledged = sum(x["instances"] for x in st["series"])
        # storescu stops an association at the first 0xA7xx; what it did not send stays with it
        assert len(rig.pacs_files()) == acknowledged and acknowledged + refused <= 14 * 8 and acknowledged < 14 * 8
        assert "No space left" not in rig.log() and "event=c_store_refused" in rig.log()

        # --- phase 2: free the space, accept a series, let another writer fill the disk
        subprocess.run(node_cmd("--config", str(rig.config), "purge", "--older-than", "0"), check=True,
                       capture_output=True)
        files = make_ct_series(tmp_path / "late", n=8, size=256, seed=99)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        r = storescu(files, rig.port, "LTDIFF")
        assert r.returncode == 0 and "OutOfResources" not in r.stderr
        free, _ = free_space(mnt)
        ballast = mnt / "ballast"
        with open(ballast, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * max(free - (512 << 10), 0))  # leave 0.5 MB: less than the outputs need
        wait_for(lambda: "processing_waiting_for_disk" in rig.log(), 30, 0.3, "processing waits for disk")
        assert rig.series(uid)["state"] == "queued"
        before = len(rig.pacs_files())
        ballast.unlink()
        series = rig.wait_state(uid, ("done", "failed"), 60)
        assert series["state"] == "done", series
        assert len(rig.pacs_files()) == before + 8
    finally:
        rig.stop()
