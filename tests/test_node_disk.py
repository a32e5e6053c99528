"""Disk full (issue 12, item 6): on a 24 MB tmpfs the node refuses new instances with 0xA700
before the disk is full, delivers everything it acknowledged, and when another writer fills the
disk, accepted work waits and resumes by itself once space returns. Issue 23: a data set that
never ends stops at the watermark (it is spooled to disk as it arrives), quarantined copies
count against the watermark and a cap, and ``min_free_mb = 0`` still keeps the processing margin.

Before: no watermark; the receiver used the last bytes and accepted series failed in derive with
"No space left on device". Without permission to mount, the same test runs on the temp
directory's volume with the threshold set just below its current free space.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fault_helpers import NodeRig, c_store, make_rig

from nodetools.peers import make_ct_series, node_cmd, storescu, wait_for
from dicom_node.store.watermark import free_space

MiB = 1 << 20

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


def rig_on(tmp_path: Path, mnt: Path, disk: str, **kw: object) -> NodeRig:
    """A node (make_rig) whose data directory is on ``mnt``, with ``disk`` as its [disk] section."""
    rig = make_rig(tmp_path, start=False, extra_sections=f"[disk]\n{disk}\n", **kw)
    rig.config.write_text(rig.config.read_text().replace(f'data_dir = "{tmp_path / "data"}"',
                                                         f'data_dir = "{mnt / "data"}"'))
    rig.data_dir = mnt / "data"
    rig.start()
    return rig


def test_endless_data_set_stops_at_the_watermark(tmp_path: Path, volume: tuple[Path, float]) -> None:
    """Item 2: the spool of a data set still arriving counts against the watermark. Before, it
    was held in memory and never stopped; now it is written to the data volume as it arrives,
    no longer kept once the headroom is used, and the association is aborted; the free space
    never falls below the threshold, and the next sender is served."""
    from nodetools.peers import endless_c_store

    mnt, min_free_mb = volume
    rig = rig_on(tmp_path, mnt, f"min_free_percent = 0.0\nmin_free_mb = {min_free_mb}",
                 node_extra={"max_dataset_mb": 64.0})
    least = [float("inf")]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            least[0] = min(least[0], free_space(mnt)[0] / MiB)
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        sampler.start()
        sent, stopped = endless_c_store(rig.port, 200 * MiB)
        stop.set()
        sampler.join(5)
        print(f"endless data set on the small volume: node took {sent / MiB:.0f} MiB, least free {least[0]:.1f} MiB")
        assert stopped and sent < 200 * MiB
        assert least[0] >= min_free_mb, f"free space fell to {least[0]:.1f} MiB (threshold {min_free_mb:.1f} MiB)"
        assert "not kept: disk watermark" in rig.log()
        assert list((rig.data_dir / "spool" / ".incoming").glob("*")) == []
        files = make_ct_series(tmp_path / "after", n=2, size=64)
        assert storescu(files, rig.port, "LTDIFF").returncode == 0  # the reservation was released
    finally:
        stop.set()
        rig.stop()


def test_quarantine_counts_against_the_watermark_and_its_cap(tmp_path: Path, volume: tuple[Path, float]) -> None:
    """Item 3. Before: 63 conflicting copies filled a 40 MB disk to 408 KB, the acknowledged series
    then waited for disk for ever and a new series got 0xA700. Now copies are kept only within
    disk.quarantine_max_mb (the oldest removed, with a log line and an audit record) and above
    the watermark; the acknowledged series is delivered and a new one is accepted."""
    from nodetools.peers import conflicting_copies

    mnt, min_free_mb = volume
    rig = rig_on(tmp_path, mnt, f"min_free_percent = 0.0\nmin_free_mb = {min_free_mb}\nquarantine_max_mb = 2.0",
                 stable_age_s=3.0)
    try:
        first = make_ct_series(tmp_path / "first", n=4, size=512, seed=1)
        uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
        assert storescu(first, rig.port, "LTDIFF").returncode == 0
        copies = conflicting_copies(first, tmp_path / "copies", 20)  # 80 x 0.5 MB: more than the volume
        statuses = c_store(rig.port, copies)
        assert {s for s, _ in statuses} == {0xC000}, sorted({s for s, _ in statuses}, key=str)
        series = rig.wait_state(uid, ("done", "failed"), 90)
        assert series["state"] == "done", series
        fresh = make_ct_series(tmp_path / "fresh", n=4, size=512, seed=2)
        r = storescu(fresh, rig.port, "LTDIFF", extra=["-v"])
        assert r.returncode == 0 and "OutOfResources" not in r.stdout + r.stderr
        fresh_series = rig.wait_state(str(pydicom.dcmread(fresh[0]).SeriesInstanceUID), ("done", "failed"), 90)
        assert fresh_series["state"] == "done", fresh_series
        wait_for(lambda: len(rig.pacs_files()) == 8, 30, 0.3, "both series at the PACS")
        kept = [p for p in (rig.data_dir / "quarantine").rglob("*") if p.is_file()]
        assert kept and sum(p.stat().st_size for p in kept) <= 2 * MiB
        dropped = [r for r in rig.audit() if r["dicom_node"].get("kind") == "quarantine"]
        assert dropped and all(r["EventIdentification"]["EventActionCode"] == "D" for r in dropped)
        assert "event=quarantine_dropped" in rig.log() and "No space left" not in rig.log()
    finally:
        rig.stop()


def test_min_free_mb_zero_still_keeps_the_processing_margin(tmp_path: Path, volume: tuple[Path, float]) -> None:
    """Item 6. Before: with min_free_mb = 0 an instance that left less than the processing step's
    1 MiB margin was acknowledged, and its series then waited for disk for ever. Now that margin
    is the least threshold: the instance gets 0xA700, and is stored once space returns."""
    mnt, _ = volume
    if not os.path.ismount(mnt):
        pytest.skip("needs its own small filesystem (tmpfs, as root) to leave an exact amount free")
    rig = rig_on(tmp_path, mnt, "min_free_percent = 0.0\nmin_free_mb = 0.0")
    ballast = mnt / "ballast"
    try:
        (f,) = make_ct_series(tmp_path / "in", n=1, size=512)
        size = f.stat().st_size
        free, _ = free_space(mnt)
        with open(ballast, "wb") as out:  # leave room for the instance and its output, not the margin
            out.write(b"\0" * max(free - (2 * size + (512 << 10)), 0))
        time.sleep(0.5)  # the receiver's cached free space is renewed
        [(status, comment)] = c_store(rig.port, [f])
        assert status == 0xA700 and "disk watermark" in comment, (status, comment)
        ballast.unlink()
        time.sleep(0.5)
        assert c_store(rig.port, [f]) == [(0, "")]
        series = rig.wait_state(str(pydicom.dcmread(f).SeriesInstanceUID), ("done", "failed"), 60)
        assert series["state"] == "done", series
    finally:
        ballast.unlink(missing_ok=True)
        rig.stop()
