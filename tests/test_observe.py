"""The observation endpoint (issue 9 §3): /metrics, /healthz and the status page.

One real `dicom-node serve` process with `[http]` on a free loopback port receives a small series
from DCMTK storescu (with distinctive patient identifiers), standardizes it with the shipped linear
model and sends it to a DCMTK storescp PACS; then Prometheus' own parser reads /metrics, /healthz
answers, and Debian's chromium (headless) loads the status page. The health checks' failure
answers and the refusal classes are exercised on a node database without a running node.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fault_helpers import NodeRig, c_store, make_rig
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.store import db
from dicom_node.config import ConfigError, Http, load_config, parse_config
from dicom_node.observe.metrics import REFUSAL_CLASSES, refusal_class
from dicom_node.observe.server import ObserveServer
from nodetools.peers import LOOPBACK, free_port, make_ct_series, storescu, wait_for, write_node_config

PATIENT_NAME = "Zyxquorth^Ambrosine"
PATIENT_ID = "PIDQX88413"
BIRTH_DATE = "19230405"
CHROMIUM = shutil.which("chromium")


def get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET on the loopback endpoint; HTTP errors included."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=30) as r:  # noqa: S310 - loopback
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


# --------------------------------------------------------------------------- configuration
def test_http_section_defaults_to_off_on_loopback() -> None:
    assert load_config(None).http == Http(enabled=False, host="127.0.0.1", port=9400)
    cfg = parse_config({"http": {"enabled": True, "host": "0.0.0.0", "port": 0}})
    assert cfg.http == Http(enabled=True, host="0.0.0.0", port=0)  # an explicit address is the admin's choice
    for raw, key in (({"port": 70000}, "http.port"), ({"enabled": "yes"}, "http.enabled"),
                     ({"hots": "x"}, "http.hots"), ({"host": " "}, "http.host")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({"http": raw})


# --------------------------------------------------------------------------- without a node
def node_config(tmp_path: Path, http: str = "enabled = true\nport = 0") -> Any:
    """A loopback node configuration with an ``[http]`` section (its node is not started)."""
    cfg_path = write_node_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data")
    cfg_path.write_text(cfg_path.read_text() + f"\n[http]\n{http}\n")
    return load_config(cfg_path)


@pytest.fixture
def idle(tmp_path: Path) -> Iterator[tuple[ObserveServer, Any]]:
    """The endpoint over a node database whose node is not running (no heartbeat yet)."""
    cfg = node_config(tmp_path)
    cfg.spool_dir.mkdir(parents=True)
    database = db.Database(cfg.db_url)
    database.create_all()
    server = ObserveServer(cfg, database)
    server.start()
    try:
        yield server, cfg
    finally:
        server.stop()
        database.dispose()


def test_ipv6_loopback(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, 'enabled = true\nhost = "::1"\nport = 0')
    server = ObserveServer(cfg)
    port = server.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=10) as r:  # noqa: S310 - loopback
            pytest.fail(f"expected 503 without a node, got {r.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and "checks" in json.loads(exc.read())
    finally:
        server.stop()
        server.db.dispose()


def test_a_taken_http_port_stops_the_start_before_the_dicom_listener(tmp_path: Path) -> None:
    from dicom_node.app.service import NodeService, StartError

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        cfg = node_config(tmp_path, f"enabled = true\nport = {taken.getsockname()[1]}")
        service = NodeService(cfg)
        try:
            with pytest.raises(StartError, match=f"http.port = {taken.getsockname()[1]}: cannot listen"):
                service.start()
        finally:
            service.db.dispose()
    assert not cfg.pid_file.exists() and service.scp is None and service.scheduler is None
    with socket.socket() as probe:
        assert probe.connect_ex((LOOPBACK, cfg.port)) != 0  # the DICOM port was never opened


def test_healthz_names_the_failed_check(idle: tuple[ObserveServer, Any]) -> None:
    server, cfg = idle
    assert server.port and server.port != 9400  # port 0: any free port
    status, ctype, body = get(server.port, "/healthz")
    report = json.loads(body)
    assert status == 503 and ctype == "application/json"
    assert report["checks"]["database"]["ok"] and report["checks"]["spool"]["ok"]
    assert not report["checks"]["scheduler"]["ok"] and "no heartbeat" in report["checks"]["scheduler"]["detail"]

    now = db.utcnow()
    with server.db.session() as s:
        s.add(db.Heartbeat(ae_title=cfg.ae_title, pid=os.getpid(), hostname=socket.gethostname(), roles="receive",
                           port=1, started_at=now, heartbeat_at=now))
    status, _, body = get(server.port, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True

    shutil.rmtree(cfg.spool_dir)
    cfg.spool_dir.write_bytes(b"")  # the spool path is a file: nothing can be created in it
    status, _, body = get(server.port, "/healthz")
    report = json.loads(body)
    assert status == 503 and not report["checks"]["spool"]["ok"] and report["checks"]["database"]["ok"]

    with server.db.session() as s:
        s.scalars(db.select(db.Heartbeat).where(db.Heartbeat.pid == os.getpid())).one().stopped_at = db.utcnow()
    assert not json.loads(get(server.port, "/healthz")[2])["checks"]["scheduler"]["ok"]


def test_an_unreadable_database_gives_500_and_503(tmp_path: Path) -> None:
    (tmp_path / "db-is-a-directory").mkdir()
    cfg_path = write_node_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                                 extra_node={"database_url": f"sqlite:///{tmp_path / 'db-is-a-directory'}"})
    cfg_path.write_text(cfg_path.read_text() + "\n[http]\nenabled = true\nport = 0\n")
    cfg = load_config(cfg_path)
    cfg.spool_dir.mkdir(parents=True)
    server = ObserveServer(cfg)
    port = server.start()
    try:
        assert get(port, "/metrics")[0] == 500
        status, _, body = get(port, "/healthz")
        checks = json.loads(body)["checks"]
        assert status == 503 and not checks["database"]["ok"] and checks["spool"]["ok"]
        assert get(port, "/healthz")[0] == 503  # the server thread survived the errors
    finally:
        server.stop()
        server.db.dispose()


def test_refusals_are_counted_in_a_fixed_set_of_classes(idle: tuple[ObserveServer, Any]) -> None:
    server, _ = idle
    statuses = [0xA700, 0xA701, 0x0122, 0xA900, 0xC000, 0xC123, 0x0110]
    with server.db.session() as s:
        for k, st in enumerate(statuses):
            s.add(db.Refusal(status=st, reason=f"reason text {k} that must not become a label"))
    m = metrics(server.port)
    refused = {dict(labels)["reason"]: v for (name, labels), v in m.items() if name == "dicom_node_instances_refused_total"}
    assert refused == {"out_of_resources": 2, "sop_class_not_supported": 1, "data_set_mismatch": 1,
                       "cannot_understand": 2, "other": 1}
    assert set(refused) == set(REFUSAL_CLASSES) and refusal_class(0xA7FF) == "out_of_resources"
    assert m[("dicom_node_series", (("state", "done"),))] == 0
    assert m[("dicom_node_spool_free_bytes", ())] > 0
    assert get(server.port, "/thumb/1/before.png")[0] == 404 and get(server.port, "/nothing")[0] == 404


# --------------------------------------------------------------------------- a real node
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeRig, int]]:
    tmp = tmp_path_factory.mktemp("observe")
    http_port = free_port()
    rig = make_rig(tmp, extra_sections=f"[http]\nenabled = true\nport = {http_port}")
    try:
        wait_for(lambda: "http_listening" in rig.log(), 30, 0.2, "http_listening")
        yield rig, http_port
    finally:
        rig.stop()


@pytest.fixture(scope="module")
def processed(node: tuple[NodeRig, int], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 4-slice Br40 series with distinctive patient identifiers, standardized and delivered,
    and one instance refused at receive (SOPInstanceUID missing -> 0xA900)."""
    rig, _ = node
    tmp = tmp_path_factory.mktemp("series")
    files = make_ct_series(tmp / "in", n=4, size=64, description="OBSERVE <b>chest</b>",
                           modality_extra={"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID,
                                           "PatientBirthDate": BIRTH_DATE})
    r = storescu(files, rig.port, "LTDIFF", timeout=60)
    assert r.returncode == 0, r.stderr
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    series = rig.wait_state(uid, ["done", "failed", "refused"], timeout=60)
    assert series["state"] == "done", series
    bad = pydicom.dcmread(files[0])
    del bad.SOPInstanceUID  # sent as a file: pynetdicom takes the UID from its meta information
    bad.save_as(tmp / "bad.dcm", enforce_file_format=False)
    assert c_store(rig.port, [tmp / "bad.dcm"])[0][0] == 0xA900
    return {"uid": uid, "series": series, "job": series["jobs"][-1]}


def test_metrics_are_read_from_the_database(node: tuple[NodeRig, int], processed: dict[str, Any]) -> None:
    _, port = node
    m = metrics(port)
    assert m[("dicom_node_instances_received_total", ())] == 4
    assert m[("dicom_node_series", (("state", "done"),))] == 1
    assert m[("dicom_node_series", (("state", "failed"),))] == 0
    assert m[("dicom_node_instances_refused_total", (("reason", "data_set_mismatch"),))] == 1
    for stage in ("read", "model", "derive", "send"):
        assert m[("dicom_node_stage_duration_seconds_count", (("stage", stage),))] == 1, stage
        assert m[("dicom_node_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", stage)))] == 1
    assert m[("dicom_node_stage_duration_seconds_sum", (("stage", "model"),))] == pytest.approx(
        processed["job"]["durations_s"]["model"], abs=1e-3)
    assert m[("dicom_node_jobs_queued", ())] == 0 and m[("dicom_node_deliveries_pending", ())] == 0
    assert m[("dicom_node_deliveries_failed_total", ())] == 0 and m[("dicom_node_delivery_retries_total", ())] == 0
    assert m[("dicom_node_spool_free_bytes", ())] > 0

    def loaded_models() -> list[dict[str, str]]:  # the heartbeat records a loaded model within 5 s
        return [dict(labels) for (name, labels), v in metrics(port).items() if name == "dicom_node_model_loaded" and v == 1]
    loaded = wait_for(loaded_models, 15, 0.5, "model_loaded in /metrics")
    assert len(loaded) == 1 and loaded[0]["ae_title"] == "LTDIFF" and "linear" in loaded[0]["model"]
    ages = {dict(labels)["roles"]: v for (name, labels), v in m.items() if name == "dicom_node_heartbeat_age_seconds"}
    assert list(ages) == ["receive,decide,process,dispatch"] and 0 <= ages["receive,decide,process,dispatch"] < 15


def test_healthz_is_ok_on_a_running_node(node: tuple[NodeRig, int], processed: dict[str, Any]) -> None:
    status, _, body = get(node[1], "/healthz")
    report = json.loads(body)
    assert status == 200 and report["ok"], report
    assert set(report["checks"]) == {"database", "spool", "scheduler"}
    for path in ("/metrics", "/healthz"):
        body = get(node[1], path)[2].decode()
        assert PATIENT_ID not in body and "Zyxquorth" not in body


def chromium(args: list[str], profile: Path, timeout: float = 45) -> str:
    """Run headless chromium once; its whole process group is killed by PID afterwards."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of this chromium only (its renderer, zygote)
        except ProcessLookupError:
            pass
        proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is installed by scripts/bootstrap.sh")
def test_status_page_in_a_headless_browser(node: tuple[NodeRig, int], processed: dict[str, Any],
                                           tmp_path: Path) -> None:
    _, port = node
    url = f"http://{LOOPBACK}:{port}/"
    dom = chromium(["--dump-dom", url], tmp_path / "profile")
    uid, job = processed["uid"], processed["job"]["job"]
    assert "dicom-node" in dom and "UP" in dom
    row = dom.split(f'data-series-uid="{uid}"', 1)[1].split("</tr>", 1)[0]
    assert 'class="done">done<' in row and processed["job"]["output_series_uid"] in row
    assert "SOPInstanceUID missing" in dom  # the refusal, with its reason
    assert "OBSERVE &lt;b&gt;chest&lt;/b&gt;" in row and "<b>" not in dom  # network text is escaped
    for phi in (PATIENT_NAME, PATIENT_NAME.replace("^", " "), "Zyxquorth", "Ambrosine", PATIENT_ID, BIRTH_DATE):
        assert phi not in dom, phi
    for which in ("before", "after"):
        assert f'src="thumb/{job}/{which}.png"' in row
        status, ctype, png = get(port, f"/thumb/{job}/{which}.png")
        img = Image.open(io.BytesIO(png))
        assert status == 200 and ctype == "image/png" and img.format == "PNG" and img.size == (96, 96)
        assert len(img.getcolors(256) or []) > 8, f"{which} thumbnail is flat"  # a windowed image, not a blank
    shot = tmp_path / "page.png"
    chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path / "profile2")
    page = Image.open(shot)
    assert page.size == (1200, 900) and len(page.convert("L").getcolors(65536) or []) > 16
