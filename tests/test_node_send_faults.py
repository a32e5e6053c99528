"""Delivery under faults (issue 12, items 1, 2, 7): a destination that accepts no CT context,
kill -9 while sending, a PACS down past the old retry budget, `resend` and `retry --failed`."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from fault_helpers import make_rig, sending_pipeline
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import Destination
from nodetools.peers import LOOPBACK, free_port, make_ct_series, node_cmd, start_storescp, storescu, wait_for
from dicom_node.dispatch.scu import PERMANENT, send_files
from dicom_node.app.pipeline import Pipeline

MR_ONLY = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[MROnly]
PresentationContext1 = MRImageStorage\\Uncompressed
PresentationContext2 = VerificationSOPClass\\Uncompressed

[[Profiles]]
[MR]
PresentationContexts = MROnly
"""


def _delivery(worker: Pipeline) -> db.Delivery:
    with worker.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        _ = d.job.series.state, d.sends
        return d


def test_destination_accepting_no_ct_context_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    """Item 1: storescp that accepts MR only. Before: transient 'not established', retried."""
    cfg = tmp_path / "mr.cfg"
    cfg.write_text(MR_ONLY)
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with start_storescp(tmp_path / "pacs", "PACS", extra=["-xf", str(cfg), "MR"]) as pacs:
        out = send_files(Destination(name="PACS", ae_title="PACS", host=LOOPBACK, port=pacs.port, timeout_s=5), files, "LTDIFF")
        assert out.failure == PERMANENT, out.error
        assert "no presentation context accepted" in out.error and "abstract syntax not supported" in out.error
        assert "1.2.840.10008.5.1.4.1.1.2" in out.error
        worker, _ = sending_pipeline(tmp_path / "w", {"name": "PACS", "ae_title": "PACS", "host": LOOPBACK,
                                             "port": pacs.port, "backoff_base_s": 0.1, "timeout_s": 5})
        assert worker.send() == 1
        time.sleep(0.3)
        assert worker.send() == 0  # not retried
    d = _delivery(worker)
    assert d.state == db.FAILED and d.attempts == 1
    assert d.error.startswith("permanent: no presentation context accepted")
    assert d.job.series.state == db.FAILED


@pytest.mark.parametrize("associations", [1, 3])
def test_kill9_while_sending_resumes_with_unacknowledged_instances_only(tmp_path: Path, associations: int) -> None:
    """Item 2: the PACS sleeps 1 s after each store; kill -9 the node once 2 instances are there.
    Before: per-instance state committed at association end, so all 6 were sent again (8 files).
    With 3 associations in parallel (storescp --fork serves them at once) each share resumes too."""
    rig = make_rig(tmp_path, pacs_extra=["--sleep-after", "1"] + (["--fork"] if associations > 1 else []),
                   destination={"associations": associations})
    try:
        files = make_ct_series(tmp_path / "in", n=6, size=64)
        uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        assert storescu(files, rig.port, "LTDIFF").returncode == 0
        wait_for(lambda: len(rig.pacs_files()) >= 2, 60, 0.05, "2 instances at the PACS")
        time.sleep(0.4)  # inside the PACS's 1 s sleep: instance 3 is on the wire, not stored
        rig.kill9()
        at_kill = len(rig.pacs_files())
        assert 2 <= at_kill < 6
        rig.start()
        series = rig.wait_state(uid, ("done", "failed"), 60)
        assert series["state"] == "done", series
        got = rig.pacs_files()
        sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in got]
        assert len(got) == 6 and len(set(sops)) == 6, (at_kill, len(got))
        assert "jobs_sending=1" in rig.log()
    finally:
        rig.stop()


def test_pacs_down_longer_than_the_old_retry_budget_is_delivered(tmp_path: Path) -> None:
    """Item 7: with the shipped retry settings (scaled: base 0.05 s) an outage of 2.5 s used to
    exhaust max_retries=5 after 1.55 s and fail the series for good. The PACS comes up only after
    the sixth failed attempt (the old limit), however slowly a loaded machine makes the attempts."""
    port = free_port()
    worker, files = sending_pipeline(tmp_path, {"name": "PACS", "ae_title": "PACS", "host": LOOPBACK, "port": port,
                                       "backoff_base_s": 0.05, "timeout_s": 2})
    t0 = time.monotonic()
    pacs = None
    try:
        while time.monotonic() - t0 < 15:
            if pacs is None and time.monotonic() - t0 > 2.5 and _delivery(worker).attempts >= 6:
                pacs = start_storescp(tmp_path / "pacs", "PACS", port=port)
            worker.send()
            if _delivery(worker).state != db.PENDING:
                break
            time.sleep(0.05)
    finally:
        if pacs is not None:
            pacs.stop()
    d = _delivery(worker)
    assert d.state == db.SENT, d.error
    assert d.attempts > 6
    assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 3


def test_retry_budget_by_time_then_resend_and_retry_failed_resend_the_same_output(tmp_path: Path) -> None:
    """Item 7: the budget is time (capped backoff), not a count; then `dicom-node resend` and
    `retry --failed` re-send the existing output (same SOP Instance UIDs, no new job)."""
    port = free_port()
    dest = {"name": "PACS", "ae_title": "PACS", "host": LOOPBACK, "port": port, "backoff_base_s": 0.05,
            "backoff_max_s": 0.2, "retry_for_s": 1.5, "timeout_s": 2}
    worker, files = sending_pipeline(tmp_path, dest)
    t0 = time.monotonic()
    while _delivery(worker).state == db.PENDING and time.monotonic() - t0 < 10:
        worker.send()
        time.sleep(0.05)
    d = _delivery(worker)
    assert d.state == db.FAILED and "retry budget 2 s" in d.error and d.attempts >= 6, d.error
    assert 1.2 < time.monotonic() - t0 < 5
    assert d.job.series.state == db.FAILED
    failed_at, attempts_before, started = d.job.finished_at, d.attempts, d.started_at

    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[[destinations]]\n'
                    + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in dest.items())
                    + '\n[[rules]]\nname = "r"\ndestinations = ["PACS"]\n')
    sops = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    with start_storescp(tmp_path / "pacs", "PACS", port=port):
        r = subprocess.run(node_cmd("--config", str(toml), "resend", "1.2.3.4"), capture_output=True, text=True)
        assert r.returncode == 0 and "3 instances" in r.stdout, r.stdout + r.stderr
        assert worker.send() == 1
        d = _delivery(worker)
        assert d.state == db.SENT and d.job.series.state == db.DONE
        # provenance is history: the resend is added, what happened before is not overwritten
        assert d.attempts == attempts_before + 1 and d.attempts_before_resend == attempts_before
        assert d.started_at == started and d.resent_at is not None and d.resent_at > failed_at
        assert d.job.finished_at == failed_at
        # The PACS lost it: fail the delivery again, then `retry --failed` re-sends unsent ones only.
        with worker.db.session() as s:
            dd = s.scalars(select(db.Delivery)).one()
            dd.state, dd.sends[0].state = db.FAILED, db.PENDING
            dd.job.state = dd.job.series.state = db.FAILED
        r = subprocess.run(node_cmd("--config", str(toml), "retry", "--failed"), capture_output=True, text=True)
        assert r.returncode == 0 and "1 re-sent" in r.stdout, r.stdout + r.stderr
        assert worker.send() == 1
    got = [str(pydicom.dcmread(f).SOPInstanceUID) for f in (tmp_path / "pacs").glob("*.dcm")]
    assert set(got) == sops  # the existing output, not a new series
    with worker.db.session() as s:
        assert len(s.scalars(select(db.Job)).all()) == 1
        assert s.scalars(select(db.Series)).one().state == db.DONE
