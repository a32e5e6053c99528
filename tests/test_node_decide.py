"""Decide: completeness timing and routing rules, on series received over real associations."""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nodetools.peers import LOOPBACK, free_port, make_ct_series, storescu
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.decide.rules import SeriesProgress, completeness_reason, match_rule
from dicom_node.config import Completeness, parse_config
from dicom_node.receive.scp import StorageSCP
from dicom_node.app.pipeline import Pipeline


def test_completeness_rule() -> None:
    t0 = datetime(2024, 1, 1, 12, 0, 0)
    cfg = Completeness(stable_age_s=30, use_expected_count=True)
    assert completeness_reason(SeriesProgress(5, None, t0), cfg, t0 + timedelta(seconds=29)) is None
    assert completeness_reason(SeriesProgress(5, None, t0), cfg, t0 + timedelta(seconds=30)) == "stable_age"
    assert completeness_reason(SeriesProgress(5, 5, t0), cfg, t0 + timedelta(seconds=1)) == "expected_count"
    assert completeness_reason(SeriesProgress(4, 5, t0), cfg, t0 + timedelta(seconds=1)) is None
    off = Completeness(stable_age_s=30, use_expected_count=False)
    assert completeness_reason(SeriesProgress(5, 5, t0), off, t0 + timedelta(seconds=1)) is None


def test_rules_first_match_wins() -> None:
    cfg = parse_config({
        "destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 104}],
        "rules": [
            {"name": "scout", "match": {"SeriesDescription": "topogram|scout"}, "action": "ignore"},
            {"name": "siemens-br40", "match": {"Modality": "CT", "ConvolutionKernel": ["Br40*", "B40f"],
                                               "Manufacturer": "SIEMENS*", "calling_ae": "CT?"},
             "destinations": ["P"]},
        ],
    })
    base = {"Modality": "CT", "ConvolutionKernel": "Br40d\\3", "Manufacturer": "SIEMENS Healthineers",
            "SeriesDescription": "Thorax 1.5 Br40", "calling_ae": "CT1"}
    assert match_rule(cfg.rules, base).name == "siemens-br40"
    assert match_rule(cfg.rules, {**base, "SeriesDescription": "Topogram 0.6 T20s"}).name == "scout"
    assert match_rule(cfg.rules, {**base, "ConvolutionKernel": "Bl64"}) is None
    assert match_rule(cfg.rules, {**base, "calling_ae": "PACS"}) is None
    assert match_rule(cfg.rules, {**base, "Manufacturer": None}) is None


class Node:
    def __init__(self, tmp: Path, raw: dict[str, Any]) -> None:
        raw.setdefault("node", {}).update(bind_address=LOOPBACK, port=free_port(), data_dir=str(tmp / "data"))
        self.config = parse_config(raw, tmp)
        self.db = db.Database(self.config.db_url)
        self.db.create_all()
        self.scp = StorageSCP(self.config, self.db)
        self.port = self.scp.start()
        self.worker = Pipeline(self.config, self.db)

    def states(self) -> dict[str, tuple[str, str | None]]:
        with self.db.session() as s:
            return {x.series_description: (x.state, x.rule_name) for x in s.scalars(select(db.Series))}


def test_stable_age_expected_count_and_routing(tmp_path: Path) -> None:
    node = Node(tmp_path, {
        "completeness": {"stable_age_s": 1.5},
        "rules": [
            {"name": "ignore-bl", "match": {"ConvolutionKernel": "Bl*"}, "action": "ignore"},
            {"name": "br40", "match": {"Modality": "CT", "ConvolutionKernel": "Br40*"}},
        ],
    })
    try:
        study = "1.2.826.0.1.3680043.10.999.1"
        for name, kernel, expected in (("br", "Br40", None), ("bl", "Bl64", None), ("other", "B70f", None),
                                       ("counted", "Br40", 3)):
            files = make_ct_series(tmp_path / name, n=3, size=32, kernel=kernel, study_uid=study,
                                   description=name, expected_count=expected)
            assert storescu(files, node.port, "LTDIFF").returncode == 0
            if name == "br":
                t_first = time.monotonic()  # the earliest series; it turns stable first
        quiet_for = time.monotonic() - t_first
        node.worker.scan()
        st = node.states()
        if quiet_for < 1.4:  # nothing stable yet, only the counted series is complete
            assert st["br"] == ("received", None) and st["bl"] == ("received", None)
        assert st["counted"] == ("queued", "br40")
        time.sleep(1.6)
        node.worker.scan()
        st = node.states()
        assert st["br"] == ("queued", "br40")
        assert st["bl"] == ("ignored", "ignore-bl")
        assert st["other"] == ("unrouted", None)  # kept and visible, never dropped
        with node.db.session() as s:
            reasons = {x.series_description: x.complete_reason for x in s.scalars(select(db.Series))}
            assert reasons["counted"] == "expected_count" and reasons["br"] == "stable_age"
            assert len(s.scalars(select(db.Job)).all()) == 2

        # A late instance for a series that is queued (not processed yet) reopens it: no job runs twice.
        extra = make_ct_series(tmp_path / "late", n=1, size=32, kernel="Br40", study_uid=study, description="br")
        import pydicom
        ds = pydicom.dcmread(extra[0])
        with node.db.session() as s:
            br = s.scalars(select(db.Series).where(db.Series.series_description == "br")).one()
            ds.SeriesInstanceUID = br.series_uid
        ds.save_as(extra[0])
        assert storescu(extra, node.port, "LTDIFF").returncode == 0
        with node.db.session() as s:
            br = s.scalars(select(db.Series).where(db.Series.series_description == "br")).one()
            # its queued job is dropped, or (streaming on) goes back to streaming with its cache
            assert br.state == db.RECEIVED and br.instance_count == 4
            assert [j.state for j in br.jobs] in ([], [db.STREAMING])
    finally:
        node.scp.stop(5)
        node.db.dispose()


def test_complete_is_a_persisted_state_that_the_next_scan_routes(tmp_path: Path) -> None:
    """A series marked complete just before a crash (routing not yet done) is routed after restart."""
    node = Node(tmp_path, {"completeness": {"stable_age_s": 0},
                           "rules": [{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}}]})
    try:
        files = make_ct_series(tmp_path / "s", n=2, size=32, kernel="Br40", description="s")
        assert storescu(files, node.port, "LTDIFF").returncode == 0
        # The first commit of a scan alone: completeness recorded, routing not reached.
        with node.db.session() as s:
            series = s.scalars(select(db.Series)).one()
            series.completed_at = db.utcnow()
            series.complete_reason = "stable_age"
            series.set_state(db.COMPLETE)
        assert node.states()["s"] == ("complete", None)
        restarted = Pipeline(node.config, node.db)
        assert restarted.scan() == 1
        assert node.states()["s"] == ("queued", "br40")
        with node.db.session() as s:
            assert len(s.scalars(select(db.Job)).all()) == 1
    finally:
        node.scp.stop()
        node.db.dispose()


def test_a_series_whose_files_cannot_be_read_is_refused_and_routing_goes_on(tmp_path: Path) -> None:
    """A spool file lost or corrupted after receive: that series is refused with the reason, the
    others are still routed (one odd series must not stop the scan)."""
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data")}}, tmp_path)
    database = db.Database(cfg.db_url)
    database.create_all()
    with database.session() as s:
        for uid, broken in (("1.2.3.1", True), ("1.2.3.2", False)):
            series = db.Series(series_uid=uid, instance_count=2, state=db.COMPLETE, modality="CT",
                               convolution_kernel="Br40")
            files = make_ct_series(cfg.spool_dir / uid, n=2, size=32)
            if broken:
                files[1].write_bytes(b"DICM but not really")
            series.instances = [db.Instance(sop_instance_uid=f"{uid}.{k}", sop_class_uid="1.2", transfer_syntax_uid="1.2",
                                            path=f"{uid}/{f.name}", size=1) for k, f in enumerate(files)]
            s.add(series)
    Pipeline(cfg, database).scan()
    with database.session() as s:
        states = {x.series_uid: (x.state, x.error) for x in s.query(db.Series)}
    assert states["1.2.3.1"][0] == db.REFUSED and "cannot be read" in states["1.2.3.1"][1]
    assert states["1.2.3.2"][0] == db.QUEUED


def test_a_series_that_fails_the_model_does_not_fail_the_series_batched_with_it(tmp_path: Path) -> None:
    """Two queued series in one batch; the model raises on one of them (an input it cannot take).
    Before, the whole batch failed; now only that series does."""
    from ltdiff_core import Standardizer
    from ltdiff_core.kernel_model import KernelModel

    # qa = "off": the 32² test volumes are outside the shipped envelope; this test is about the model.
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data")},
                        "rules": [{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "qa": "off"}]}, tmp_path)
    database = db.Database(cfg.db_url)
    database.create_all()
    with database.session() as s:
        for uid in ("1.2.4.1", "1.2.4.2"):
            files = make_ct_series(cfg.spool_dir / uid, n=2, size=32, seed=int(uid[-1]))
            series = db.Series(series_uid=uid, instance_count=2, state=db.COMPLETE, modality="CT",
                               convolution_kernel="Br40")
            series.instances = [db.Instance(sop_instance_uid=f"{uid}.{k}", sop_class_uid="1.2", transfer_syntax_uid="1.2",
                                            path=f"{uid}/{f.name}", size=f.stat().st_size) for k, f in enumerate(files)]
            s.add(series)
    worker = Pipeline(cfg, database)
    real = Standardizer.from_checkpoint(Path(__file__).resolve().parents[1] / "ltdiff_core/weights/linear.safetensors")

    class PicksOne:
        """The real linear model behind the model seam (KernelModel), raising for the volume whose
        first voxel is the marked one."""
        device, max_batch_pixels, info = real.device, real.max_batch_pixels, real.info

        def qa_envelope(self):  # noqa: ANN201
            return real.qa_envelope()

        def supported_geometry(self):  # noqa: ANN201
            return real.supported_geometry()

        def standardize(self, hu, spacing, steps=None, seed=0, progress=None, slice_keys=None):  # noqa: ANN001, ANN201
            if abs(float(hu[0, 0, 0]) - marked) < 1e-3:
                raise ValueError("cannot take this volume")
            return real.standardize(hu, spacing, steps=steps, seed=seed, slice_keys=slice_keys)

        def standardize_batch(self, vols, spacings, steps=None, seed=0, progress=None,  # noqa: ANN001, ANN201
                              slice_keys=None):
            keys = slice_keys or [None] * len(vols)
            return [self.standardize(v, sp, steps, seed, slice_keys=k) for v, sp, k in zip(vols, spacings, keys)]

    from ltdiff_core.dicomio.reader import read_series
    marked = float(read_series(sorted((cfg.spool_dir / "1.2.4.1").glob("*.dcm"))).hu[0, 0, 0])
    fake = PicksOne()
    assert isinstance(fake, KernelModel)
    worker.models.put("default", fake)
    worker.scan()
    assert worker.process() == 2
    with database.session() as s:
        states = {x.series_uid: (x.state, x.error) for x in s.query(db.Series)}
    assert states["1.2.4.1"][0] == db.FAILED and "cannot take this volume" in states["1.2.4.1"][1]
    assert states["1.2.4.2"][0] == db.DONE, states


def _edited(node: Node, raw: dict[str, Any], tmp: Path, steps: int) -> Pipeline:
    """A process started on the same database after the rule's steps were edited in the file."""
    import copy

    edited = copy.deepcopy(raw)
    edited["rules"][0]["steps"] = steps
    return Pipeline(parse_config(edited, tmp), node.db)


def test_a_job_runs_with_the_steps_of_the_rule_it_was_routed_by(tmp_path: Path) -> None:
    """Editing a rule's steps changes the series routed after the edit, not a job already queued
    (as its model, seed and destinations); a job routed before the steps were kept on jobs (NULL)
    takes the live rule's, as before."""
    raw: dict[str, Any] = {"completeness": {"stable_age_s": 0}, "processing": {"streaming": False},
                           "rules": [{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "steps": 2,
                                      "qa": "off"}]}
    node = Node(tmp_path, raw)
    try:
        for name in ("routed", "legacy"):
            files = make_ct_series(tmp_path / name, n=2, size=32, kernel="Br40", description=name)
            assert storescu(files, node.port, "LTDIFF").returncode == 0
        node.worker.scan()
        with node.db.session() as s:
            jobs = {j.series.series_description: j for j in s.scalars(select(db.Job))}
            assert {n: j.state for n, j in jobs.items()} == {"routed": db.QUEUED, "legacy": db.QUEUED}
            jobs["legacy"].rule_settings = None  # as a job queued by the previous release
        assert _edited(node, raw, tmp_path, steps=5).process() == 2
        with node.db.session() as s:
            sampler = {j.series.series_description: j.sampler for j in s.scalars(select(db.Job))}
        assert sampler["routed"]["steps"] == 2 and sampler["legacy"]["steps"] == 5, sampler
    finally:
        node.scp.stop(5)
        node.db.dispose()


def test_a_streaming_job_runs_with_the_steps_of_the_rule_it_was_routed_by(tmp_path: Path) -> None:
    """Slices standardized while the series arrives use the steps frozen when its streaming job
    started, not the ones of a rule edited since (the cached outputs name them)."""
    raw: dict[str, Any] = {"completeness": {"stable_age_s": 600},
                           "processing": {"stream_min_slices": 1, "stream_settle_s": 0},
                           "rules": [{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "steps": 2,
                                      "qa": "off"}]}
    node = Node(tmp_path, raw)
    try:
        files = make_ct_series(tmp_path / "s", n=2, size=32, kernel="Br40", description="s")
        assert storescu(files, node.port, "LTDIFF").returncode == 0
        node.worker.scan()
        with node.db.session() as s:
            assert [j.state for j in s.scalars(select(db.Job))] == [db.STREAMING]
        assert _edited(node, raw, tmp_path, steps=5).process() == 0  # nothing queued: streams instead
        with node.db.session() as s:
            prints = [r.fingerprint for r in s.scalars(select(db.StreamSlice))]
        assert len(prints) == 2 and all(p.endswith("|2|0") for p in prints), prints
    finally:
        node.scp.stop(5)
        node.db.dispose()


def _failed_series_with_output(cfg: Any, database: db.Database, uid: str, later_job_without_output: bool) -> None:
    """A failed series whose job 1 wrote its output (delivery failed); optionally a job 2 that
    failed before writing anything (e.g. refused by the QA gate)."""
    out = cfg.output_dir / "job-1"
    out.mkdir(parents=True)
    (out / "a.dcm").write_bytes(b"x")
    with database.session() as s:
        series = db.Series(series_uid=uid, instance_count=1, state=db.FAILED, modality="CT",
                           convolution_kernel="Br40")
        job = db.Job(version=1, state=db.FAILED, rule_name="br40-to-bl64", model="default", output_series_uid="1.2.9",
                     error="gave up after 3 attempts")
        job.deliveries = [db.Delivery(destination="pacs", state=db.FAILED,
                                      sends=[db.InstanceSend(sop_instance_uid="1.2.9.1", path="job-1/a.dcm")])]
        series.jobs = [job]
        if later_job_without_output:
            series.jobs.append(db.Job(version=2, state=db.FAILED, rule_name="br40-to-bl64", model="default", qa_mode="refuse",
                                      error="QA refused: noise 80 HU outside the training envelope"))
        s.add(series)


@pytest.mark.parametrize("later_job", [False, True], ids=["delivery-failed", "qa-refused-after"])
def test_retry_failed_resends_only_the_latest_jobs_output(tmp_path: Path, later_job: bool) -> None:
    """`retry --failed` re-sends a series whose latest job holds the output; when a later job
    failed without output (QA refusal), `retry --failed --force` reprocesses it with the gate
    forced instead of re-sending the older output."""
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "data")}}, tmp_path)
    database = db.Database(cfg.db_url)
    database.create_all()
    _failed_series_with_output(cfg, database, "1.2.5.1", later_job)
    worker = Pipeline(cfg, database)
    with database.session() as s:
        received = s.query(db.Series).one().last_received_at
    assert worker.retry(failed=True, force=True) == 1
    with database.session() as s:
        series = s.query(db.Series).one()
        assert series.last_received_at == received  # history stays; the retry is its own event
        if later_job:
            assert worker.resent == [] and series.state == db.RECEIVED and series.qa_force
            assert series.retry_requested_at is not None
            from dicom_node.decide.rules import SeriesProgress, completeness_reason

            stable = cfg.completeness.model_copy(update={"stable_age_s": 1e9})
            progress = SeriesProgress(series.instance_count, None, series.last_received_at, series.retry_requested_at)
            assert completeness_reason(progress, stable, db.utcnow()) == "retry"  # routed at once
        else:
            assert worker.resent == ["1.2.5.1"] and not series.qa_force
            assert series.jobs[0].deliveries[0].state == db.PENDING
    database.dispose()
