"""Local DICOM peers for the demo, the tests and the benchmark: DCMTK storescp/storescu/echoscu,
Orthanc, and the node itself as a ``dicom-node serve`` subprocess.

Every server binds loopback on a free port and is stopped by its PID (terminate, then kill),
also when the caller fails: use the context managers or call ``stop()`` in a finally block.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
#: Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb), for STOW-RS/QIDO-RS peers.
ORTHANC_DICOMWEB = next((str(p) for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                                          Path("/usr/lib/orthanc/libOrthancDicomWeb.so")) if p.exists()), None)


def dcmtk(tool: str) -> str:
    """Path of a DCMTK command line tool, skipping the Python environment's own ``bin``.

    pynetdicom installs console scripts with the same names (``storescp``, ``storescu``,
    ``echoscu``) but other options; an activated virtual environment would otherwise shadow DCMTK.
    """
    env_bin = Path(sys.prefix, "bin").resolve()
    for entry in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        if not entry or Path(entry).resolve() == env_bin:
            continue
        found = shutil.which(tool, path=entry)
        if found:
            return found
    raise FileNotFoundError(f"DCMTK's {tool} not found on PATH outside {env_bin}; install the Debian package dcmtk")


def peer_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc: TCP_NODELAY=1 (Debian builds stall ~45 ms per image without)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout} s")


@dataclass
class Peer:
    """A started server process; ``stop()`` ends it by PID (idempotent)."""

    proc: subprocess.Popen
    port: int
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        return subprocess.Popen(list(cmd), stdout=logf, stderr=subprocess.STDOUT, env=env or peer_env(),
                                cwd=cwd, start_new_session=True)


# --------------------------------------------------------------------------- DCMTK
def start_storescp(out_dir: Path, ae_title: str = "PACS", port: int | None = None,
                   extra: Sequence[str] = ()) -> Peer:
    """DCMTK storescp writing received files to ``out_dir`` (``.dcm`` extension)."""
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [dcmtk("storescp"), "--aetitle", ae_title, "-od", str(out_dir), "-fe", ".dcm",
           "--max-pdu", "131072", *extra, str(port)]
    proc = _spawn(cmd, out_dir.parent / f"storescp-{port}.log")
    peer = Peer(proc, port, out_dir.parent / f"storescp-{port}.log")
    try:
        wait_port(port, 15, proc)
    except BaseException:
        peer.stop()
        raise
    return peer


def storescu(files: Sequence[Path] | Path, port: int, called: str, calling: str = "STORESCU",
             extra: Sequence[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """Send files (or a directory, recursively) with DCMTK storescu; returns the completed process."""
    args = ["+sd", "+r", str(files)] if isinstance(files, Path) else [str(f) for f in files]
    cmd = [dcmtk("storescu"), "-aet", calling, "-aec", called, "--max-pdu", "131072", *extra, LOOPBACK, str(port), *args]
    return subprocess.run(cmd, env=peer_env(), capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, called: str, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, LOOPBACK, str(port)], env=peer_env(),
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- Orthanc
def start_orthanc(work_dir: Path, ae_title: str = "ORTHANC", modalities: dict[str, tuple[str, int]] | None = None,
                  timeout: float = 60.0, extra_config: dict[str, Any] | None = None,
                  dicomweb: bool = False) -> Peer:
    """Orthanc with a generated configuration: loopback REST API, DICOM on a free port, called-AE
    check on, only the listed modalities (name -> (AE title, port)) may store. ``extra_config``
    adds or overrides options (e.g. ``DicomTlsEnabled`` and its certificate paths). ``dicomweb``
    loads the DICOMweb plugin: STOW-RS/QIDO-RS/WADO-RS at ``extra["dicomweb_url"]``."""
    if ORTHANC is None:
        raise FileNotFoundError("Orthanc is not installed")
    if dicomweb and ORTHANC_DICOMWEB is None:
        raise FileNotFoundError("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
    work_dir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg = {
        "Name": "dicom-node-test",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {k: [ae, LOOPBACK, p] for k, (ae, p) in (modalities or {}).items()},
        "DicomCheckModalityHost": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "StableAge": 2,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        **({"Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
        **(extra_config or {}),
    }
    cfg_path = work_dir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log_path = work_dir / "orthanc.log"
    proc = _spawn([ORTHANC, str(cfg_path)], log_path, cwd=work_dir)
    peer = Peer(proc, dicom_port, log_path, {"http_port": http_port, "config": cfg_path})
    if dicomweb:
        peer.extra["dicomweb_url"] = f"http://{LOOPBACK}:{http_port}/dicom-web"
    try:
        wait_port(dicom_port, timeout, proc)
        wait_port(http_port, timeout, proc)
    except BaseException:
        peer.stop()
        raise
    return peer


def orthanc_get(peer: Peer, path: str) -> Any:
    """GET a REST resource of a test Orthanc (loopback only)."""
    url = f"http://{LOOPBACK}:{peer.extra['http_port']}{path}"
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback test server
        return json.loads(r.read())


def orthanc_get_bytes(peer: Peer, path: str) -> bytes:
    url = f"http://{LOOPBACK}:{peer.extra['http_port']}{path}"
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310
        return r.read()


# --------------------------------------------------------------------------- raw attackers
def associate_rq(called: str = "LTDIFF", calling: str = "ATTACKER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU proposing Verification, for raw-socket tests and benchmarks."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cx = build_context(Verification)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the node on loopback from the local address ``source`` (e.g. 127.0.0.2),
    so per-address limits hit the attacker and not the legitimate peer on 127.0.0.1."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect((LOOPBACK, port))
    return s


# --------------------------------------------------------------------------- the node
#: Watermark for loopback nodes (tests, demo, benchmarks) on a scratch disk: the production default
#: (max(5 %, 2 GiB) free) would refuse every instance on a small or busy build volume.
SCRATCH_DISK: dict[str, Any] = {"min_free_percent": 0.0, "min_free_mb": 64.0}


def write_node_config(path: Path, *, port: int, data_dir: Path, ae_title: str = "LTDIFF",
                      destinations: Sequence[dict[str, Any]] = (), rules: Sequence[dict[str, Any]] | None = None,
                      stable_age_s: float = 1.0, extra_node: dict[str, Any] | None = None,
                      processing: dict[str, Any] | None = None,
                      disk: dict[str, Any] | None = SCRATCH_DISK) -> Path:
    """A TOML configuration for a node on loopback (written by hand: TOML has no stdlib writer).

    ``disk`` is the ``[disk]`` watermark section (``None``: leave it out, i.e. the production default).
    """

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    node = {"ae_title": ae_title, "bind_address": LOOPBACK, "port": port, "data_dir": str(data_dir),
            **(extra_node or {})}
    lines = ["[node]", *(f"{k} = {val(v)}" for k, v in node.items()),
             "", "[completeness]", f"stable_age_s = {stable_age_s}", "scan_interval_s = 0.5",
             "", "[processing]", *(f"{k} = {val(v)}" for k, v in {"poll_interval_s": 0.5, **(processing or {})}.items()),
             "", "[logging]", 'level = "INFO"']
    if disk is not None:
        lines += ["", "[disk]", *(f"{k} = {val(v)}" for k, v in disk.items())]
    for d in destinations:
        lines += ["", "[[destinations]]", *(f"{k} = {val(v)}" for k, v in d.items())]
    for r in rules or []:
        lines += ["", "[[rules]]", *(f"{k} = {val(v)}" for k, v in r.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def node_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicom_node.app.cli", *args]


def start_node(config: Path, port: int, log_path: Path, timeout: float = 60.0) -> Peer:
    """``dicom-node serve`` as a subprocess; returns once its DICOM port accepts connections."""
    env = peer_env()
    proc = _spawn(node_cmd("--config", str(config), "serve"), log_path, env=env)
    peer = Peer(proc, port, log_path)
    try:
        wait_port(port, timeout, proc)
    except BaseException:
        peer.stop()
        raise
    return peer


def node_status(config: Path) -> dict[str, Any]:
    env = dict(os.environ)
    out = subprocess.run(node_cmd("--config", str(config), "status", "--json", "--last", "50", "--instances"),
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stdout)


def wait_for(predicate: Any, timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- test data
def make_ct_series(out_dir: Path, n: int = 4, size: int = 64, kernel: str = "Br40", seed: int = 0,
                   study_uid: str | None = None, manufacturer: str = "SIEMENS", description: str | None = None,
                   expected_count: int | None = None, transfer_syntax: str | None = None,
                   modality_extra: dict[str, Any] | None = None) -> list[Path]:
    """A small synthetic CT Image Storage series (noisy disc in air) written as files."""
    from ltdiff_core.dicomio.uids import make_uid
    from ltdiff_core.dicomio.writer import StudyInfo, ct_datasets, save_datasets

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    vol = np.where(disc, 40.0, -1000.0)[None].repeat(n, 0) + rng.normal(0, 10, (n, size, size))
    study = StudyInfo(study_uid=study_uid or make_uid(), frame_of_reference_uid=make_uid())
    dss = ct_datasets(vol.astype(np.float32), (1.5, 0.7, 0.7), study=study, kernel=kernel, series_number=2,
                      series_description=description)
    for ds in dss:
        ds.Manufacturer = manufacturer
        if expected_count is not None:
            ds.ImagesInAcquisition = expected_count
        for k, v in (modality_extra or {}).items():
            setattr(ds, k, v)
    kw = {"transfer_syntax": transfer_syntax} if transfer_syntax else {}
    return save_datasets(dss, out_dir, **kw)


@contextlib.contextmanager
def started(peer: Peer) -> Iterator[Peer]:
    try:
        yield peer
    finally:
        peer.stop()


def make_linear_checkpoint(path: Path, seed: int = 7, slices: int = 3, size: int = 128) -> Path:
    """A real (small) linear-filter checkpoint fitted on phantom slices: fast, runs on CPU."""
    from ltdiff_core.checkpoint import save_checkpoint
    from ltdiff_core.linear_filter import LinearFilterFitter
    from ltdiff_core.normalize import NORMALIZATION
    from ltdiff_core.phantom import generate_case

    case = generate_case(seed, slices, size=size)
    fitter = LinearFilterFitter()
    for z in range(case.br40.shape[0]):
        fitter.add(case.br40[z], case.bl64[z], (case.spacing[1], case.spacing[2]))
    filt = fitter.fit(with_residual=True)
    meta = {"name": "linear-kernel-filter-test", "version": "0.0.1", "method": "linear", "networks": {},
            "normalization": NORMALIZATION, "filter": {"pad": 32, "bin_lpcm": 0.1}, "training": {}, "metrics": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, filt.to_tensors("linear"), meta)
    return path


def resume_and_stop(procs: Any) -> None:
    """Stop every started process by its PID, first resuming any a test paused with SIGSTOP
    (a stopped process cannot handle the SIGTERM of ``stop``)."""
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        p.stop()


# --------------------------------------------------------------------------- hostile peers (after the login)
# Peers that log in and then misbehave (tests/test_net_limits.py, tests/test_node_disk.py,
# bench/bench_hostile.py).
_CT = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
def endless_c_store(port: int, total: int, source: str = "127.0.0.2", chunk: int = 65536,
                    called: str = "LTDIFF", command: bool = False) -> tuple[int, bool]:
    """A C-STORE-RQ whose data set fragments never say "last" (``command``: a command set whose
    fragments never do): up to ``total`` bytes are sent on one association. Returns (bytes the
    node took before it stopped the association, whether it did: aborted or closed)."""
    ae = AE("HOSTILE")
    ae.add_requested_context(_CT, [_EXPLICIT_LE])
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate(LOOPBACK, port, ae_title=called, bind_address=(source, 0))
    if not assoc.is_established:
        raise RuntimeError("association with the node failed")
    context_id = assoc.accepted_contexts[0].context_id
    rq = C_STORE()
    rq.MessageID, rq.Priority = 1, 0
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = _CT, "1.2.826.0.1.3680043.10.999.1"
    rq.DataSet = BytesIO(b"\0" * 8)
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    first = next(msg.encode_msg(context_id, 16384))  # the first P-DATA: the command set
    raw = assoc.dul.socket.socket
    sent, stopped = 0, False
    fragment = P_DATA()
    header = b"\x01" if command else b"\x00"  # command or data set fragment, never the last
    fragment.presentation_data_value_list = [[context_id, header + bytes(chunk)]]
    pdu = P_DATA_TF(fragment).encode()
    try:
        if not command:
            raw.sendall(P_DATA_TF(first).encode())
        while sent < total:
            if not assoc.is_established:
                stopped = True
                break
            raw.sendall(pdu)
            sent += chunk
    except OSError:
        stopped = True
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = stopped or not assoc.is_established
    if assoc.is_established:
        assoc.abort()
    return sent, stopped


def echo_loop(port: int, source: str, stop: threading.Event, counts: dict[str, int],
              called: str = "LTDIFF") -> None:
    """Keep one association open from ``source`` looping C-ECHO until ``stop``; reconnect at
    once whenever it is refused or ended. ``counts``: echoes answered, associations refused."""
    ae = AE("FLOOD")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    while not stop.is_set():
        try:
            assoc = ae.associate(LOOPBACK, port, ae_title=called, bind_address=(source, 0))
        except Exception:  # noqa: BLE001 - the node closed the connection: try again
            counts["refused"] = counts.get("refused", 0) + 1
            time.sleep(0.01)
            continue
        if not assoc.is_established:
            counts["refused"] = counts.get("refused", 0) + 1
            time.sleep(0.01)
            continue
        while assoc.is_established and not stop.is_set():
            rsp = assoc.send_c_echo()
            if rsp is None or "Status" not in rsp:
                break
            counts["echoes"] = counts.get("echoes", 0) + 1
        if assoc.is_established:
            assoc.release()


@contextlib.contextmanager
def echo_flood(port: int, sources: list[str], per_source: int) -> Iterator[dict[str, int]]:
    """``per_source`` :func:`echo_loop` threads from each address while the block runs."""
    stop = threading.Event()
    counts: dict[str, int] = {}
    threads = [threading.Thread(target=echo_loop, args=(port, src, stop, counts), daemon=True)
               for src in sources for _ in range(per_source)]
    for t in threads:
        t.start()
    try:
        yield counts
    finally:
        stop.set()
        for t in threads:
            t.join(15)


def conflicting_copies(files: list[Path], out: Path, rounds: int) -> list[Path]:
    """``rounds`` series that reuse the SOP Instance UIDs of ``files`` with other pixels."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for r in range(rounds):
        series_uid = pydicom.uid.generate_uid(prefix="1.2.826.0.1.3680043.10.999.")
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = series_uid
            px = bytearray(ds.PixelData)
            px[0:2] = ((r * 7 + 1) & 0xFFFF).to_bytes(2, "little")
            ds.PixelData = bytes(px)
            p = out / f"r{r:03d}-{k:03d}.dcm"
            ds.save_as(p)
            made.append(p)
    return made
