"""DICOM TLS with real peers: DCMTK echoscu/storescu +tls against the node's TLS listener, the
node's TLS SCU sending to DCMTK storescp +tls and to Orthanc with DicomTlsEnabled. A throw-away
CA and certificates are made with the ``openssl`` command line tool for each test session."""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.store import db
from dicom_node.config import ConfigError, parse_config
from nodetools.peers import (
    LOOPBACK, dcmtk, echoscu, free_port, make_ct_series, orthanc_get, peer_env, start_orthanc,
    start_storescp, started,
)
from dicom_node.receive.scp import StorageSCP
from dicom_node.dispatch.scu import send_files
from dicom_node.tls import BCP195_CIPHERS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str) -> None:
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca: the trusted CA; node/peer: certificates it signed; rogue: a certificate from another CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line tool is required (Debian package openssl)")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "node", "ca")
    _leaf(d, "peer", "ca")
    _leaf(d, "rogue", "otherca")
    return d


def tls_section(pki: Path, **over: Any) -> dict[str, Any]:
    return {"certificate": str(pki / "node.crt"), "private_key": str(pki / "node.key"),
            "ca_file": str(pki / "ca.crt"), **over}


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path) -> Iterator[Any]:
    nodes: list[tuple[StorageSCP, db.Database]] = []

    def make(**tls: Any) -> StorageSCP:
        raw = {"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp_path / "data")},
               "tls": tls_section(pki, enabled=True, port=free_port(), **tls)}
        config = parse_config(raw, tmp_path)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        database = db.Database(config.db_url)
        database.create_all()
        scp = StorageSCP(config, database)
        scp.start()
        nodes.append((scp, database))
        return scp

    yield make
    for scp, database in nodes:
        scp.stop(drain_s=2)
        database.dispose()


def dcmtk_tls(tool: str, port: int, pki: Path, cert: str = "peer", ca: str = "ca", extra: tuple[str, ...] = (),
              files: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [dcmtk(tool), "-aet", tool.upper(), "-aec", "LTDIFF"]
    cmd += ["+tla"] if cert == "" else ["+tls", str(pki / f"{cert}.key"), str(pki / f"{cert}.crt")]
    cmd += ["+cf", str(pki / f"{ca}.crt"), *extra, LOOPBACK, str(port), *map(str, files)]
    return subprocess.run(cmd, env=peer_env(), capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------ the node's SCP
def test_dcmtk_echo_and_store_over_tls_and_plain_tcp_stays(tls_node: Any, pki: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    scp = tls_node()
    caplog.set_level("INFO")
    tls_port, plain_port = scp.ports["dicom-tls"], scp.ports["dicom"]
    r = dcmtk_tls("echoscu", tls_port, pki)
    assert r.returncode == 0, r.stderr
    accepted = next(x for x in caplog.records if x.getMessage() == "association_accepted")
    assert accepted.fields["tls"] in ("TLSv1.2", "TLSv1.3") and accepted.fields["peer_certificate"] == "localhost"
    if accepted.fields["tls"] == "TLSv1.2":
        assert accepted.fields["cipher"] in BCP195_CIPHERS.split(":")
    print("negotiated with DCMTK:", accepted.fields["tls"], accepted.fields["cipher"])
    files = make_ct_series(tmp_path / "in", n=3, size=32)
    r = dcmtk_tls("storescu", tls_port, pki, files=tuple(files))
    assert r.returncode == 0, r.stderr
    with scp.db.session() as s:
        assert s.query(db.Instance).count() == 3
    assert echoscu(plain_port, "LTDIFF").returncode == 0  # plain TCP on node.port, as configured
    plain_on_tls = echoscu(tls_port, "LTDIFF")  # a plain DICOM client on the TLS port gets nowhere
    assert plain_on_tls.returncode != 0


@pytest.mark.parametrize("cert", ["rogue", ""], ids=["untrusted-certificate", "no-certificate"])
def test_client_without_a_trusted_certificate_is_refused(tls_node: Any, pki: Path, cert: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    scp = tls_node(require_client_certificate=True)
    caplog.set_level("INFO")
    r = dcmtk_tls("echoscu", scp.ports["dicom-tls"], pki, cert=cert)
    assert r.returncode != 0
    deadline = time.monotonic() + 5  # with TLS 1.3 the client may give up before the node has logged
    while not (refused := [x for x in caplog.records if x.getMessage() == "connection_refused"]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused and "TLS handshake failed" in refused[0].fields["reason"]


def _tls12_client(pki: Path, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    ctx.load_verify_locations(str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "peer.crt"), str(pki / "peer.key"))
    return ctx


def test_tls12_uses_a_bcp195_suite_and_other_suites_are_refused(tls_node: Any, pki: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    scp = tls_node()
    caplog.set_level("INFO")
    ae = AE("TLS12")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, scp.ports["dicom-tls"], ae_title="LTDIFF",
                         tls_args=(_tls12_client(pki, "ALL:@SECLEVEL=0"), "localhost"))
    assert assoc.is_established
    assoc.release()
    accepted = next(x for x in caplog.records if x.getMessage() == "association_accepted")
    assert accepted.fields["tls"] == "TLSv1.2" and accepted.fields["cipher"] in BCP195_CIPHERS.split(":")
    # A TLS 1.2 client offering only CBC suites with RSA key exchange (not BCP 195) gets no session.
    weak = ae.associate(LOOPBACK, scp.ports["dicom-tls"], ae_title="LTDIFF",
                        tls_args=(_tls12_client(pki, "AES128-SHA:AES256-SHA:@SECLEVEL=0"), "localhost"))
    assert not weak.is_established


def test_verification_off_accepts_a_client_without_certificate(tls_node: Any, pki: Path) -> None:
    scp = tls_node(require_client_certificate=False)
    r = dcmtk_tls("echoscu", scp.ports["dicom-tls"], pki, cert="")
    assert r.returncode == 0, r.stderr


def test_silent_tcp_connections_on_the_tls_port_do_not_block_the_listener(tls_node: Any, pki: Path) -> None:
    """pynetdicom runs the handshake in the accept loop: one client that never speaks stopped it."""
    scp = tls_node()
    silent = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect((LOOPBACK, scp.ports["dicom-tls"]))
        silent.append(s)
    try:
        t0 = time.monotonic()
        r = dcmtk_tls("echoscu", scp.ports["dicom-tls"], pki)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 4
    finally:
        for s in silent:
            s.close()


def test_only_tls_when_plain_tcp_is_off(tmp_path: Path, pki: Path) -> None:
    raw = {"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp_path / "d")},
           "tls": tls_section(pki, enabled=True, port=free_port(), plain_tcp=False)}
    config = parse_config(raw, tmp_path)
    config.data_dir.mkdir(parents=True)
    database = db.Database(config.db_url)
    database.create_all()
    scp = StorageSCP(config, database)
    try:
        assert scp.start() == config.tls.port
        assert set(scp.ports) == {"dicom-tls"}
        with socket.socket() as s:
            assert s.connect_ex((LOOPBACK, config.port)) != 0
    finally:
        scp.stop(drain_s=1)
        database.dispose()


# ------------------------------------------------------------------------------ the node's SCU
def _dest(pki: Path, port: int, ae: str, tmp_path: Path, **tls: Any) -> Any:
    raw = {"tls": tls_section(pki, **tls.pop("settings", {})),
           "destinations": [{"name": "PACS", "ae_title": ae, "host": LOOPBACK, "port": port, "timeout_s": 10,
                             "tls": True, **tls}]}
    return parse_config(raw, tmp_path).destinations[0]


def test_scu_sends_to_dcmtk_storescp_over_tls(pki: Path, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "in", n=3, size=32)
    extra = ["+tls", str(pki / "peer.key"), str(pki / "peer.crt"), "+cf", str(pki / "ca.crt")]  # -rc: default
    with started(start_storescp(tmp_path / "pacs", extra=extra)) as pacs:
        out = send_files(_dest(pki, pacs.port, "PACS", tmp_path), files, "LTDIFF")
        assert out.failure is None and out.sent == 3, out.error
        assert len(list((tmp_path / "pacs").glob("*.dcm"))) == 3
        # A server whose certificate does not chain to our CA is not sent to.
        bad = _dest(pki, pacs.port, "PACS", tmp_path, settings={"ca_file": str(pki / "otherca.crt")})
        out = send_files(bad, files, "LTDIFF")
        assert out.sent == 0 and out.failure is not None


def test_scu_sends_to_orthanc_with_dicom_tls(pki: Path, tmp_path: Path) -> None:
    files = make_ct_series(tmp_path / "in", n=2, size=32)
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "peer.crt"),
           "DicomTlsPrivateKey": str(pki / "peer.key"), "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
           "DicomTlsRemoteCertificateRequired": True}
    with started(start_orthanc(tmp_path / "orthanc", modalities={"NODE": ("LTDIFF", 1)}, extra_config=tls)) as orth:
        out = send_files(_dest(pki, orth.port, "ORTHANC", tmp_path), files, "LTDIFF")
        assert out.failure is None and out.sent == 2, out.error
        assert len(orthanc_get(orth, "/instances")) == 2


# ------------------------------------------------------------------------------ configuration
def test_tls_configuration_errors_name_the_key(tmp_path: Path, pki: Path) -> None:
    cases = [
        ({"enabled": True}, r"tls\.certificate: required"),
        ({"enabled": True, "certificate": str(pki / "node.crt"), "private_key": str(pki / "peer.key"),
          "ca_file": str(pki / "ca.crt")}, r"tls\.private_key: cannot load"),
        ({**tls_section(pki), "enabled": True, "ca_file": str(tmp_path / "missing.pem")}, r"tls\.ca_file: file not found"),
        ({**tls_section(pki), "enabled": True, "min_version": "TLSv1.1"}, r"tls\.min_version"),
        ({**tls_section(pki), "enabled": True, "ciphers": "NO-SUCH-CIPHER"}, r"tls\.ciphers"),
        ({"plain_tcp": False}, r"tls\.plain_tcp"),
        ({**tls_section(pki), "enabled": True, "port": 11112}, r"tls\.port: must differ"),
    ]
    for section, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            parse_config({"node": {"port": 11112}, "tls": section}, tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.certificate: required .*destinations\[0\] uses tls"):
        parse_config({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 1, "tls": True}]}, tmp_path)
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls_server_name: only meaningful with tls = true"):
        parse_config({"destinations": [{"name": "P", "ae_title": "P", "host": "h", "port": 1,
                                        "tls_server_name": "pacs"}]}, tmp_path)


def test_conformance_statement_describes_the_tls_profile(tmp_path: Path, pki: Path) -> None:
    from dicom_node.admin.conformance import conformance_statement

    raw = {"node": {"port": 11112}, "tls": tls_section(pki, enabled=True, port=2762),
           "destinations": [{"name": "PACS", "ae_title": "P", "host": LOOPBACK, "port": 104, "tls": True}]}
    text = conformance_statement(parse_config(raw, tmp_path))
    for expected in ("DICOM TLS on 0.0.0.0:2762 and plain TCP on 0.0.0.0:11112", "BCP 195 TLS Profile",
                     "ECDHE-RSA-AES128-GCM-SHA256", "client certificate required", "TLS to PACS",
                     "A-ABORT", "4 TCP connections per peer address"):
        assert expected in text, expected
    plain = conformance_statement(parse_config({}, tmp_path))
    assert "No TLS is configured" in plain and "no TLS)" in plain


def test_orthanc_sends_to_the_node_tls_listener(tls_node: Any, pki: Path, tmp_path: Path) -> None:
    import json
    import urllib.request

    scp = tls_node()
    (f,) = make_ct_series(tmp_path / "in", n=1, size=32)
    tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "peer.crt"),
           "DicomTlsPrivateKey": str(pki / "peer.key"), "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
           "DicomModalities": {"NODE": {"AET": "LTDIFF", "Host": LOOPBACK, "Port": scp.ports["dicom-tls"],
                                        "UseDicomTls": True}}}
    with started(start_orthanc(tmp_path / "orthanc", extra_config=tls)) as orth:
        base = f"http://{LOOPBACK}:{orth.extra['http_port']}"

        def post(path: str, body: bytes) -> Any:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=body, method="POST"),
                                        timeout=60) as r:  # noqa: S310 - loopback test server
                return json.loads(r.read())

        instance = post("/instances", f.read_bytes())["ID"]
        post("/modalities/NODE/store", json.dumps({"Resources": [instance], "Synchronous": True}).encode())
    with scp.db.session() as s:
        assert s.query(db.Instance).count() == 1
