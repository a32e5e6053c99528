"""STOW-RS destinations: a series sent through the pipeline's dispatch step arrives at Orthanc's DICOMweb
plugin and is found by QIDO-RS; unreachable servers, timeouts, HTTP 429/5xx and FailureReason
0xA7xx are transient (retried), other HTTP 4xx and failure reasons permanent, with the reason
recorded. Answers Orthanc cannot give on demand (400, 429, 503, 409 with per-instance failure
reasons, slow answers, credential checks) come from a small STOW-RS server on loopback that parses
the multipart request it receives and answers as the test scripts it."""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import test_net_tls
from fault_helpers import sending_pipeline
from dicomweb_client import DICOMwebClient
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import parse_config
from dicom_node.app.cli import main as cli_main
from nodetools.peers import (
    LOOPBACK, free_port, make_ct_series, make_linear_checkpoint, node_status, start_node, start_orthanc, storescu,
    wait_for, write_node_config,
)
from dicom_node.negotiation import PERMANENT, TRANSIENT
from dicom_node.dispatch.senders import sender_for
from dicom_node.dispatch.stow import batches, send_files_stow
from dicom_node.app.pipeline import Pipeline

pki = test_net_tls.pki  # the throw-away CA fixture (openssl), shared with the DICOM TLS tests


# --------------------------------------------------------------------------- a scripted STOW-RS server
@dataclass
class Answer:
    """One scripted reply: an HTTP status, per-instance FailureReason / WarningReason by position
    in the request, and an optional delay."""

    status: int = 200
    failures: dict[int, int] = field(default_factory=dict)
    warnings: dict[int, int] = field(default_factory=dict)
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    uids: list[str]


class StowServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, answers: list[Answer] | None = None, auth: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        super().__init__((LOOPBACK, port), _Handler)
        self.scheme = "http"
        if tls is not None:  # (certificate, private key): serve https
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*tls)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.answers = list(answers or [])
        self.auth = auth  # required Authorization header value; None: not checked
        self.requests: list[Request] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.server_address[1]}/dicom-web"

    def __enter__(self) -> StowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(10)


class _Handler(BaseHTTPRequestHandler):
    server: StowServer

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, body: bytes, ctype: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        uids = [str(pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))).SOPInstanceUID)
                for part in msg.iter_parts()]
        self.server.requests.append(Request(self.path, dict(self.headers), uids))
        if self.server.auth is not None and self.headers.get("Authorization") != self.server.auth:
            self._reply(401, b"credentials required", "text/plain", {"WWW-Authenticate": 'Basic realm="pacs"'})
            return
        a = self.server.answers.pop(0) if self.server.answers else Answer()
        time.sleep(a.delay_s)
        if a.status not in (200, 202, 409):
            self._reply(a.status, f"scripted {a.status}".encode(), "text/plain", a.headers)
            return
        ref, failed = [], []
        for i, uid in enumerate(uids):
            item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": [uid]}}
            if i in a.failures:
                failed.append({**item, "00081197": {"vr": "US", "Value": [a.failures[i]]}})
            else:
                warning = {"00081196": {"vr": "US", "Value": [a.warnings[i]]}} if i in a.warnings else {}
                ref.append({**item, **warning})
        doc = {"00081198": {"vr": "SQ", "Value": failed}, "00081199": {"vr": "SQ", "Value": ref}}
        self._reply(a.status, json.dumps(doc).encode(), "application/dicom+json", a.headers)


# --------------------------------------------------------------------------- helpers
def _dest(url: str, **over: Any) -> dict[str, Any]:
    return {"name": "WEB", "type": "stow-rs", "url": url, "max_retries": 3, "backoff_base_s": 0.2,
            "backoff_max_s": 0.2, "timeout_s": 5, **over}


def _delivery(pipeline: Pipeline) -> tuple[db.Delivery, list[db.InstanceSend], db.Job]:
    """The delivery, its instance sends (in file order) and its job, loaded for reading."""
    with pipeline.db.session() as s:
        d = s.scalars(select(db.Delivery)).one()
        sends = sorted(d.sends, key=lambda x: x.path)
        job = d.job
        _ = job.series.error
        s.expunge_all()
    return d, sends, job


def _stow_dest(url: str, tmp: Path, **over: Any) -> Any:
    return parse_config({"destinations": [_dest(url, **over)]}, tmp).destinations[0]


@pytest.fixture(scope="module")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Orthanc with the DICOMweb plugin for the module (each test uses its own series)."""
    with start_orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True) as peer:
        yield peer


# --------------------------------------------------------------------------- Orthanc
def test_series_arrives_by_stow_and_is_found_by_qido(tmp_path: Path, orthanc_web: Any) -> None:
    url = orthanc_web.extra["dicomweb_url"]
    worker, files = sending_pipeline(tmp_path, _dest(url, max_instances_per_request=2), n=5)
    assert worker.send() == 1
    d, sends, job = _delivery(worker)
    assert d.state == db.SENT and d.attempts == 1 and d.error is None
    assert all(x.state == db.SENT and x.status == 0 for x in sends)
    assert job.state == db.DONE
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    found = DICOMwebClient(url).search_for_instances(search_filters={"SeriesInstanceUID": series_uid})
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(x.sop_instance_uid for x in sends)


def test_standardized_series_from_a_running_node_is_found_by_qido(tmp_path: Path, orthanc_web: Any) -> None:
    """`dicom-node serve` receives a Br40 series by C-STORE, standardizes it and STOW-RSes the
    derived series; QIDO-RS for its new SeriesInstanceUID returns every instance."""
    url = orthanc_web.extra["dicomweb_url"]
    ckpt = make_linear_checkpoint(tmp_path / "linear.safetensors")
    port = free_port()
    conf = write_node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                             destinations=[_dest(url, max_instances_per_request=3)],
                             rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": str(ckpt),
                                     "destinations": ["WEB"]}])
    files = make_ct_series(tmp_path / "in", n=4, size=64)
    with start_node(conf, port, tmp_path / "node.log") as node:
        assert storescu(files, port, "LTDIFF").returncode == 0
        st = wait_for(lambda: (lambda s: s if s["series"] and s["series"][0]["state"] in ("done", "failed") else None)(
            node_status(conf)), 120, 0.5, "series sent")
        series = st["series"][0]
        assert series["state"] == "done", (series, node.log()[-3000:])
    job = series["jobs"][0]
    assert [(d["destination"], d["state"], d["sent"], d["total"]) for d in job["deliveries"]] == [("WEB", "sent", 4, 4)]
    found = DICOMwebClient(url).search_for_instances(search_filters={"SeriesInstanceUID": job["output_series_uid"]})
    assert len(found) == 4 and job["output_series_uid"] != str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    first = found[0]
    ds = DICOMwebClient(url).retrieve_instance(first["0020000D"]["Value"][0], job["output_series_uid"],
                                               first["00080018"]["Value"][0])  # WADO-RS: the stored object
    assert ds.ImageType[0] == "DERIVED" and ds.pixel_array.shape == (64, 64)
    assert "stow_rs_series" in node.log() and "requests=2" in node.log()


def test_echo_of_a_stow_rs_destination_is_a_qido_request(tmp_path: Path, orthanc_web: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    url = orthanc_web.extra["dicomweb_url"]
    conf = write_node_config(tmp_path / "node.toml", port=free_port(), data_dir=tmp_path / "data",
                             destinations=[_dest(url), _dest(url.replace("/dicom-web", "/nope"), name="BAD")])
    assert cli_main(["--config", str(conf), "echo", "--destination", "WEB"]) == 0
    assert capsys.readouterr().out.strip() == f"QIDO-RS {url}: the service answers"
    assert cli_main(["--config", str(conf), "echo", "--destination", "BAD"]) == 1
    assert "HTTP 404 Not Found" in capsys.readouterr().out


def test_wrong_root_is_a_permanent_404_with_the_reason(tmp_path: Path, orthanc_web: Any) -> None:
    url = orthanc_web.extra["dicomweb_url"].replace("/dicom-web", "/no-such-root")
    worker, _ = sending_pipeline(tmp_path, _dest(url))
    assert worker.send() == 1
    time.sleep(0.3)
    assert worker.send() == 0  # nothing left to retry
    d, sends, job = _delivery(worker)
    assert d.state == db.FAILED and d.attempts == 1
    assert d.error.startswith("permanent: STOW-RS HTTP 404 Not Found") and "Unknown resource" in d.error
    assert job.state == db.FAILED and "WEB: permanent: STOW-RS HTTP 404" in job.series.error
    assert all(x.state != db.SENT and "HTTP 404" in x.error for x in sends)


def test_https_verifies_the_server_against_the_configured_ca(tmp_path: Path, pki: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``ca_file`` is the trust anchor, even where REQUESTS_CA_BUNDLE names another bundle
    (requests lets that variable override ``Session.verify``)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki / "otherca.crt"))
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with StowServer(tls=(pki / "peer.crt", pki / "peer.key")) as server:
        trusted = send_files_stow(_stow_dest(server.url, tmp_path, ca_file=str(pki / "ca.crt")), files)
        rogue = send_files_stow(_stow_dest(server.url, tmp_path, ca_file=str(pki / "otherca.crt")), files)
    assert trusted.failure is None and trusted.sent == 2 and len(server.requests) == 1
    assert rogue.failure == TRANSIENT and rogue.sent == 0
    assert "not established" in rogue.error and "CERTIFICATE_VERIFY_FAILED" in rogue.error


# --------------------------------------------------------------------------- scripted server
def test_unreachable_url_is_transient_and_retried_until_the_server_is_up(tmp_path: Path) -> None:
    port = free_port()
    worker, files = sending_pipeline(tmp_path, _dest(f"http://{LOOPBACK}:{port}/dicom-web"))
    assert worker.send() == 1  # connection refused: nothing listening yet
    d, sends, _ = _delivery(worker)
    assert d.state == db.PENDING and d.attempts == 1 and "retry 1/3" in d.error and "not established" in d.error
    assert all(x.attempts == 0 and "not established" in x.error for x in sends)  # never reached the server
    with StowServer(port) as server:
        time.sleep(0.3)
        assert worker.send() == 1
    d, sends, job = _delivery(worker)
    assert d.state == db.SENT and d.attempts == 2 and job.state == db.DONE
    assert [r.uids for r in server.requests] == [[x.sop_instance_uid for x in sends]]


@pytest.mark.parametrize(("status", "kind"), [(400, PERMANENT), (429, TRANSIENT), (503, TRANSIENT)])
def test_http_status_classification_through_the_worker(tmp_path: Path, status: int, kind: str) -> None:
    headers = {"Retry-After": "7"} if status == 429 else {}
    with StowServer(answers=[Answer(status, headers=headers)]) as server:
        worker, _ = sending_pipeline(tmp_path, _dest(server.url))
        assert worker.send() == 1
        d, sends, job = _delivery(worker)
        assert f"STOW-RS HTTP {status}" in d.error and f"scripted {status}" in d.error
        if kind == PERMANENT:
            assert d.state == db.FAILED and d.error.startswith("permanent:") and job.state == db.FAILED
        else:
            assert d.state == db.PENDING and d.error.startswith("retry 1/3")
            if status == 429:
                assert "Retry-After 7" in d.error
            time.sleep(0.3)
            assert worker.send() == 1  # the next answer is 200
            d, sends, job = _delivery(worker)
            assert d.state == db.SENT and d.attempts == 2 and job.state == db.DONE
    assert len(server.requests) == (1 if kind == PERMANENT else 2)
    assert all(r.path == "/dicom-web/studies" for r in server.requests)


def test_a_redirect_is_permanent_and_not_followed(tmp_path: Path) -> None:
    """requests would follow a 301 with a GET, whose 200 would read as "all stored"."""
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with StowServer(answers=[Answer(301, headers={"Location": "/elsewhere/studies"})]) as server:
        out = send_files_stow(_stow_dest(server.url, tmp_path), files)
    assert out.failure == PERMANENT and out.sent == 0 and len(server.requests) == 1
    assert out.error == ("STOW-RS HTTP 301 Moved Permanently redirects to /elsewhere/studies; "
                         "set url to the service's own address (permanent)")


def test_per_instance_failure_reasons_and_warnings(tmp_path: Path) -> None:
    """409 with FailedSOPSequence: 0xA700 is retried, 0xC000 fails; 202 with WarningReason is stored."""
    with StowServer(answers=[Answer(409, failures={1: 0xA700}), Answer(200)]) as server:
        worker, _ = sending_pipeline(tmp_path, _dest(server.url), n=3)
        assert worker.send() == 1
        d, sends, _ = _delivery(worker)
        assert d.state == db.PENDING and "FailureReason 0xA700 (transient; HTTP 409)" in d.error
        assert [x.state for x in sends] == [db.SENT, db.PENDING, db.SENT] and sends[1].status == 0xA700
        time.sleep(0.3)
        assert worker.send() == 1
        d, sends, _ = _delivery(worker)
        assert d.state == db.SENT and all(x.state == db.SENT for x in sends)
        assert [len(r.uids) for r in server.requests] == [3, 1]  # only the failed instance again

    files = make_ct_series(tmp_path / "out", n=3, size=32)
    with StowServer(answers=[Answer(202, failures={0: 0xC000}, warnings={2: 0xB000})]) as server:
        out = send_files_stow(_stow_dest(server.url, tmp_path), files)
    assert out.failure == PERMANENT and "FailureReason 0xC000 (permanent; HTTP 202)" in out.error
    assert [r.status for r in out.results] == [0xC000, 0, 0xB000] and out.sent == 2


def test_batches_report_each_instance_before_the_next_request(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=5, size=32)
    seen: list[tuple[int, int]] = []
    with StowServer() as server:
        out = send_files_stow(_stow_dest(server.url, tmp_path, max_instances_per_request=2), files,
                              on_result=lambda k, r: seen.append((k, len(server.requests))))
        assert out.failure is None and out.sent == 5
        assert [len(r.uids) for r in server.requests] == [2, 2, 1]
        assert seen == [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3)]
        tiny = send_files_stow(_stow_dest(server.url, tmp_path, max_request_mb=0.001), files[:2])
        assert tiny.sent == 2 and [len(r.uids) for r in server.requests[3:]] == [1, 1]
    assert [list(b) for b in batches([5, 5, 5, 20, 1], 10, 12)] == [[0, 1], [2], [3], [4]]


def test_no_answer_within_the_timeout_is_transient(tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "out", n=2, size=32)
    with StowServer(answers=[Answer(delay_s=2.0)]) as server:
        t0 = time.monotonic()
        out = send_files_stow(_stow_dest(server.url, tmp_path, timeout_s=0.5), files)
        assert time.monotonic() - t0 < 1.8
    assert out.failure == TRANSIENT and "within 0.5 s (timeout)" in out.error
    assert all(r.status is None and not r.ok for r in out.results)


def test_credentials_come_from_env_or_file_and_never_reach_the_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import base64

    monkeypatch.setenv("STOW_PASSWORD", "s3cret-pw")
    (tmp_path / "token").write_text("tok-123\n")
    files = make_ct_series(tmp_path / "out", n=1, size=32)
    caplog.set_level(logging.DEBUG)
    basic = "Basic " + base64.b64encode(b"node:s3cret-pw").decode()
    with StowServer(auth=basic) as server:
        ok = send_files_stow(_stow_dest(server.url, tmp_path, username="node", password_env="STOW_PASSWORD"), files)
        bad = send_files_stow(_stow_dest(server.url, tmp_path, token_file="token"), files)
    assert ok.failure is None and ok.sent == 1
    assert bad.failure == PERMANENT and "HTTP 401" in bad.error
    assert server.requests[1].headers["Authorization"] == "Bearer tok-123"
    assert "s3cret-pw" not in caplog.text and "tok-123" not in caplog.text


def test_sender_for_follows_the_destination_type(tmp_path: Path) -> None:
    from dicom_node.dispatch.scu import send_files

    cfg = parse_config({"destinations": [_dest("http://h/dicom-web"),
                                         {"name": "PACS", "ae_title": "PACS", "host": "h", "port": 104}]}, tmp_path)
    assert sender_for(cfg.destination("WEB")) is send_files_stow
    assert sender_for(cfg.destination("PACS")) is send_files
