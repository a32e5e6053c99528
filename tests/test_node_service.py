"""The node as a process: `dicom-node serve` answers C-ECHO, stops cleanly on SIGTERM, reports
up/down in `dicom-node status`, and resumes a job interrupted in the middle of processing."""
from __future__ import annotations

import time
from pathlib import Path

import pydicom
from fault_helpers import make_rig
from nodetools.peers import (
    echoscu, free_port, make_ct_series, make_linear_checkpoint, node_status, start_node, start_storescp, storescu,
    wait_for, write_node_config,
)
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import Completeness, load_config
from dicom_node.app.pipeline import Pipeline


def test_sigterm_status_and_restart_resumes_processing(tmp_path: Path) -> None:
    ckpt = make_linear_checkpoint(tmp_path / "linear.safetensors")
    pacs = start_storescp(tmp_path / "pacs", "PACS")
    node = None
    try:
        port = free_port()
        cfg_path = write_node_config(
            tmp_path / "node.toml", port=port, data_dir=tmp_path / "data", stable_age_s=3600,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
            rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": str(ckpt),
                    "destinations": ["pacs"]}],
        )
        node = start_node(cfg_path, port, tmp_path / "node.log")
        assert echoscu(port, "LTDIFF").returncode == 0
        files = make_ct_series(tmp_path / "in", n=4, size=64)
        assert storescu(files, port, "LTDIFF").returncode == 0
        st = wait_for(lambda: (lambda s: s if s["node"]["up"] else None)(node_status(cfg_path)), 20, 0.5, "node up")
        assert st["node"]["pid"] == node.pid and st["node"]["port"] == port
        assert st["queue"]["received"] == 1 and st["series"][0]["instances"] == 4
        assert node.stop() == 0  # SIGTERM -> exit 0
        st = node_status(cfg_path)
        assert st["node"]["up"] is False and st["node"]["stopped_at"]
        assert not (tmp_path / "data" / "dicom-node.pid").exists()

        # The state a crash in the middle of a model run leaves: the job claimed, in `processing`.
        cfg = load_config(cfg_path)
        database = db.Database(cfg.db_url)
        w = Pipeline(cfg.model_copy(update={"completeness": Completeness(stable_age_s=0)}), database)
        assert w.scan() == 1
        assert len(w.processor._claim_batch()) == 1
        with database.session() as s:
            assert s.scalars(select(db.Job)).one().state == db.PROCESSING
        database.dispose()

        node = start_node(cfg_path, port, tmp_path / "node2.log")
        st = wait_for(lambda: (lambda s: s if s["series"][0]["state"] in ("done", "failed") else None)(
            node_status(cfg_path)), 120, 0.5, "resumed job finished")
        series = st["series"][0]
        assert series["state"] == "done", (series, node.log()[-3000:])
        assert len(series["jobs"]) == 1 and series["jobs"][0]["version"] == 1
        assert "jobs_requeued=1" in node.log()
        assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 4
        with db.Database(cfg.db_url).session() as s:
            assert s.scalars(select(db.Job)).one().attempts == 2
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


def test_routed_series_wakes_process_and_send_without_waiting_for_their_polls(tmp_path: Path) -> None:
    """With a 60 s poll the series is only done in time if routing wakes the process step and the
    processed job wakes the send step (the first polls run 0.5 s after start, before the send)."""
    rig = make_rig(tmp_path, processing={"poll_interval_s": 60.0}, start=False)
    try:
        rig.start()
        time.sleep(1.0)  # past the first polls
        files = make_ct_series(tmp_path / "in", n=4, size=32)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files, rig.port, "LTDIFF").returncode == 0
        series = rig.wait_state(uid, ("done", "failed"), 30)
        assert series["state"] == "done", series
        assert len(rig.pacs_files()) == 4
    finally:
        rig.stop()


def test_sigterm_during_a_model_run_exits_after_the_batch(tmp_path: Path) -> None:
    """SIGTERM while a batch of the latent diffusion model runs: the batch finishes, the node exits 0
    a few seconds later (it used to hang: APScheduler's shutdown held its job-store lock while the
    finishing process step woke the send step, which needs that lock), and after a restart the
    output is sent once, whole."""
    rig = make_rig(tmp_path, model="ltdiff", processing={"streaming": False})
    try:
        files = make_ct_series(tmp_path / "in", n=6, size=64)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files, rig.port, "LTDIFF").returncode == 0
        rig.wait_state(uid, ("processing",), 60)
        assert rig.node is not None
        t0 = time.monotonic()
        code = rig.node.stop(timeout=90)  # SIGTERM; SIGKILL only after 90 s
        took = time.monotonic() - t0
        assert code == 0, (code, took, rig.log()[-3000:])
        assert "node_stopped" in rig.log()
        with rig.database().session() as s:
            job = s.scalars(select(db.Job)).one()
            assert job.processing_finished_at is not None  # the batch ran to its end before the exit
        rig.start()
        series = rig.wait_state(uid, ("done", "failed"), 90)
        assert series["state"] == "done", series
        assert len(rig.pacs_files()) == 6  # every output slice once
    finally:
        rig.stop()
