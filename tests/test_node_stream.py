"""Streaming (processing while receiving, docs/operations.md "Streaming"): a series sent in two
bursts with a pause is partly standardized before it is complete, and its output equals the
whole-series (offline, batch) output pixel for pixel; a series refused at completion or grown
after processing behaves as without streaming; kill -9 while streaming loses nothing."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from fault_helpers import LINEAR, make_rig, rows

from dicom_node.store import db
from nodetools.peers import make_ct_series, node_cmd, peer_env, storescu, wait_for

STREAM = {"streaming": True, "stream_min_slices": 4, "stream_settle_s": 0.2}


def _by_source(files: list[Path]) -> dict[str, bytes]:
    """PixelData of output instances keyed by the SOPInstanceUID of their source slice."""
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)] = ds.PixelData
    return out


def _batch(files: list[Path], tmp: Path, model: str | Path | None) -> dict[str, bytes]:
    """The whole series at once through `dicom-node standardize` (same seed as the node: 0), in a
    process of its own started like the node's: the same torch thread count (this test process
    runs torch with one thread, set by other tests, and a float sum may round differently across
    thread counts)."""
    src = tmp / "batch-in"
    src.mkdir()
    for f in files:
        (src / f.name).write_bytes(f.read_bytes())
    args = ["standardize", str(src), str(tmp / "batch-out"), "--device", "cpu", "--seed", "0", "--qa", "flag",
            "--quiet", *(["--model", str(model)] if model is not None else [])]
    proc = subprocess.run(node_cmd(*args), env=peer_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _by_source(sorted((tmp / "batch-out").glob("*.dcm")))


def _streamed(rig) -> int:  # noqa: ANN001
    return len(rows(rig.database(), db.StreamSlice))


def _first_burst_streamed(rig, n: int) -> None:  # noqa: ANN001
    wait_for(lambda: _streamed(rig) >= n, 240, 0.2, f"{n} slices standardized while receiving")


def test_uid_keys_make_each_slice_independent_of_the_others() -> None:
    """Default model: a slice keyed by its UID comes out the same alone, in a short run or in the
    whole volume (the index key of the array API does not: it depends on the slice's position)."""
    from ltdiff_core import Standardizer
    from ltdiff_core.standardizer import uid_slice_key

    std = Standardizer.from_checkpoint("ltdiff", device="cpu")
    rng = np.random.default_rng(1)
    vol = (rng.normal(40, 20, (5, 96, 96))).astype(np.float32)
    keys = [uid_slice_key(0, f"1.2.3.{z}") for z in range(5)]
    whole = std.standardize(vol, (1, .7, .7), slice_keys=keys)
    part = std.standardize(vol[2:4], (1, .7, .7), slice_keys=keys[2:4])
    one = std.standardize(vol[4], (.7, .7), slice_keys=keys[4:])
    np.testing.assert_array_equal(whole[2:4], part)
    np.testing.assert_array_equal(whole[4], one)
    by_index = std.standardize(vol[2:4], (1, .7, .7))
    assert np.abs(by_index - std.standardize(vol, (1, .7, .7))[2:4]).max() > 1e-3


@pytest.mark.parametrize("model", [LINEAR, "ltdiff"], ids=["linear", "ltdiff"])
def test_two_bursts_streamed_output_equals_batch_output(tmp_path: Path, model: str | Path) -> None:
    # Images in Acquisition completes the series with its last instance: no race with stable_age_s
    # however slow the model runs on a busy machine.
    rig = make_rig(tmp_path, stable_age_s=300.0, processing=STREAM, model=model)
    try:
        files = make_ct_series(tmp_path / "in", n=11, size=96 if model == "ltdiff" else 64, expected_count=11)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files[:8], rig.port, "LTDIFF").returncode == 0
        _first_burst_streamed(rig, 8)
        assert rig.series(uid)["state"] == "received"  # streamed before the series is complete
        time.sleep(1.0)  # a pause between bursts
        assert storescu(files[8:], rig.port, "LTDIFF").returncode == 0
        series = rig.wait_state(uid, ("done", "failed", "refused"), 180)
        assert series["state"] == "done", series
        assert len(series["jobs"]) == 1
        with rig.database().session() as s:
            job = s.scalars(select(db.Job)).one()
            # 8 slices came from the stream cache; the last 3 (< stream_min_slices) at completion
            assert job.streamed_slices == 8 and job.output_count == 11
        streamed = _by_source(rig.pacs_files())
        assert len(streamed) == 11
        assert streamed == _batch(files, tmp_path, model)
        wait_for(lambda: not list((rig.data_dir / "output").glob("stream-*")), 10, 0.2, "stream cache removed")
    finally:
        rig.stop()


def test_series_refused_at_completion_drops_its_stream(tmp_path: Path) -> None:
    """Two slices at one position: refused whole at completion, as without streaming; the
    streaming job and its cached outputs go with it and nothing is sent."""
    rig = make_rig(tmp_path, stable_age_s=300.0, processing=STREAM)
    try:
        files = make_ct_series(tmp_path / "in", n=6, size=64, expected_count=7)
        assert storescu(files[:5], rig.port, "LTDIFF").returncode == 0
        _first_burst_streamed(rig, 4)
        twin = pydicom.dcmread(files[0])
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        twin.save_as(tmp_path / "twin.dcm")
        assert storescu([files[5], tmp_path / "twin.dcm"], rig.port, "LTDIFF").returncode == 0
        series = rig.wait_state(str(twin.SeriesInstanceUID), ("refused", "done", "failed"), 60)
        assert series["state"] == "refused" and "share a position" in series["error"], series
        assert series["jobs"] == []
        assert rows(rig.database(), db.StreamSlice) == [] and rows(rig.database(), db.Job) == []
        wait_for(lambda: not list((rig.data_dir / "output").glob("stream-*")), 10, 0.2, "stream cache removed")
        assert rig.pacs_files() == []
    finally:
        rig.stop()


def test_series_grown_after_processing_is_reprocessed_whole(tmp_path: Path) -> None:
    """Growth after the output exists: a second job over the whole series, as without streaming
    (its slices streamed anew under the new job), equal to the batch output of all slices."""
    rig = make_rig(tmp_path, stable_age_s=2.0, processing=STREAM)
    try:
        files = make_ct_series(tmp_path / "in", n=7, size=64)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files[:5], rig.port, "LTDIFF").returncode == 0
        wait_for(lambda: len(rig.pacs_files()) == 5, 60, 0.2, "first output sent")
        assert storescu(files[5:], rig.port, "LTDIFF").returncode == 0
        wait_for(lambda: len(rig.pacs_files()) == 12, 60, 0.2, "second output sent")
        series = rig.wait_state(uid, ("done",), 30)
        assert series["grown_after_processing"] and [j["version"] for j in series["jobs"]] == [1, 2]
        second = [f for f in rig.pacs_files()
                  if str(pydicom.dcmread(f).SeriesInstanceUID) == series["jobs"][1]["output_series_uid"]]
        assert _by_source(second) == _batch(files, tmp_path, LINEAR)
    finally:
        rig.stop()


def test_kill9_while_streaming_loses_nothing_and_sends_one_output(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, stable_age_s=300.0, processing=STREAM)
    try:
        files = make_ct_series(tmp_path / "in", n=10, size=64, expected_count=10)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files[:6], rig.port, "LTDIFF").returncode == 0
        _first_burst_streamed(rig, 4)
        rig.kill9()
        rig.start()
        assert storescu(files[6:], rig.port, "LTDIFF").returncode == 0
        series = rig.wait_state(uid, ("done", "failed", "refused"), 120)
        assert series["state"] == "done" and len(series["jobs"]) == 1, series
        with rig.database().session() as s:
            assert s.scalars(select(db.Job)).one().streamed_slices >= 4
        out = _by_source(rig.pacs_files())
        assert len(rig.pacs_files()) == 10 and out == _batch(files, tmp_path, LINEAR)
    finally:
        rig.stop()


def test_streaming_off_gives_the_same_pixels(tmp_path: Path) -> None:
    """With `streaming = false` no slice is cached and the whole series goes through the model at
    completion, with the same per-slice keys: the same pixels as streamed and offline."""
    rig = make_rig(tmp_path, stable_age_s=300.0, processing={**STREAM, "streaming": False})
    try:
        files = make_ct_series(tmp_path / "in", n=6, size=64, expected_count=6)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files, rig.port, "LTDIFF").returncode == 0
        assert rig.wait_state(uid, ("done", "failed", "refused"), 60)["state"] == "done"
        with rig.database().session() as s:
            assert not s.scalars(select(db.Job)).one().streamed_slices
        assert _by_source(rig.pacs_files()) == _batch(files, tmp_path, LINEAR)
    finally:
        rig.stop()
