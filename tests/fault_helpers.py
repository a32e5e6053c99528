"""Helpers for the fault tests: the node as a real `dicom-node serve` subprocess with DCMTK storescp
as PACS, direct reads of its database, and a pynetdicom sender that reports each C-STORE status
(DCMTK storescu refuses to send some of the malformed files these tests need)."""
from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.store import db
from dicom_node.config import load_config
from dicom_node.admin.status import collect_status
from nodetools.peers import (
    LOOPBACK, ROOT, SCRATCH_DISK, Peer, free_port, start_node, start_storescp, wait_for, write_node_config,
)

LINEAR = ROOT / "ltdiff_core" / "weights" / "linear.safetensors"  # shipped, trained at 0.7 mm, fast on CPU
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class NodeRig:
    """A node with a storescp PACS (unique file names: every C-STORE received is one file)."""

    tmp: Path
    port: int
    config: Path
    node: Peer | None
    pacs: Peer | None
    pacs_dir: Path
    data_dir: Path
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        log = self.tmp / f"node-{len(self.logs)}.log"
        self.logs.append(log)
        self.node = start_node(self.config, self.port, log)

    def kill9(self) -> None:
        assert self.node is not None
        self.node.stop(sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        if self.pacs is not None:
            self.pacs.stop()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def status(self) -> dict[str, Any]:
        """`dicom-node status --json` read in-process (the CLI's own start-up would dominate polls)."""
        return collect_status(load_config(self.config), last=500, with_instances=True)

    def pacs_files(self) -> list[Path]:
        return sorted(self.pacs_dir.glob("*.dcm"))

    def series(self, uid: str) -> dict[str, Any] | None:
        return next((x for x in self.status()["series"] if x["series_uid"] == uid), None)

    def wait_state(self, uid: str, states: Sequence[str], timeout: float = 90) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            x = self.series(uid)
            return x if x and x["state"] in states else None
        try:
            return wait_for(done, timeout, 0.3, f"series in {states}")
        except TimeoutError:
            print(self.log()[-4000:])
            raise

    def database(self) -> db.Database:
        return db.Database(load_config(self.config).db_url)

    def audit(self) -> list[dict[str, Any]]:
        path = load_config(self.config).audit_path
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_rig(tmp: Path, *, pacs_extra: Sequence[str] = (), destination: dict[str, Any] | None = None,
             stable_age_s: float = 1.0, node_extra: dict[str, Any] | None = None, start: bool = True,
             extra_sections: str = "", with_pacs: bool = True, processing: dict[str, Any] | None = None,
             model: str | Path = LINEAR) -> NodeRig:
    pacs_dir = tmp / "pacs"
    pacs = start_storescp(pacs_dir, "PACS", extra=["+uf", *pacs_extra]) if with_pacs else None
    port = free_port()
    dest = {"name": "pacs", "ae_title": "PACS", "host": LOOPBACK, "port": pacs.port if pacs else free_port(),
            "backoff_base_s": 0.5, "timeout_s": 10, **(destination or {})}
    cfg = write_node_config(
        tmp / "node.toml", port=port, data_dir=tmp / "data", stable_age_s=stable_age_s,
        extra_node={"uid_root": "1.2.826.0.1.3680043.10.999.", **(node_extra or {})},
        destinations=[dest],
        # qa = "flag": the small synthetic series are outside the shipped envelope; these tests are
        # about receive/send faults, and "flag" still runs the gate over every case.
        rules=[{"name": "br40", "match": {"ConvolutionKernel": "Br40*"}, "model": str(model),
                "destinations": ["pacs"], "qa": "flag"}],
        disk=None if "[disk]" in extra_sections else SCRATCH_DISK, processing=processing,
    )
    if extra_sections:
        cfg.write_text(cfg.read_text() + "\n" + extra_sections + "\n")
    rig = NodeRig(tmp, port, cfg, None, pacs, pacs_dir, tmp / "data")
    if start:
        try:
            rig.start()
        except BaseException:
            rig.stop()
            raise
    return rig


def c_store(port: int, items: Sequence[Path | pydicom.Dataset], called: str = "LTDIFF",
            calling: str = "FAULTS", syntaxes: Sequence[str] | None = None) -> list[tuple[int | None, str]]:
    """Send files (raw bytes as stored, via pynetdicom's file path mode) or datasets over one
    association; returns (status, ErrorComment) per item."""
    from pynetdicom import _config
    _config.STORE_SEND_CHUNKED_DATASET = True  # files are sent as stored: meta UIDs, raw data set bytes
    ae = AE(ae_title=calling)
    ts = list(syntaxes or ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    classes = set()
    for it in items:
        if isinstance(it, Path):
            meta = pydicom.filereader.read_file_meta_info(it)  # the data set may be broken
            classes.add(str(meta.MediaStorageSOPClassUID))
            ts_file = str(meta.TransferSyntaxUID)
            if ts_file not in ts:
                ts.append(ts_file)
        else:
            classes.add(str(it.SOPClassUID))
    for uid in sorted(classes or {CT}):
        for syntax in ts:  # one context per syntax: each file goes in its own syntax, as stored
            ae.add_requested_context(uid, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    if not assoc.is_established and assoc.rejected_contexts:
        raise ValueError("no presentation context accepted for " + ", ".join(sorted(classes)))
    assert assoc.is_established, "association with the node failed"
    out: list[tuple[int | None, str]] = []
    try:
        for it in items:
            rsp = assoc.send_c_store(str(it) if isinstance(it, Path) else it)
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            out.append((status, str(rsp.get("ErrorComment", "")) if rsp is not None else ""))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def rows(database: db.Database, model: Any, **where: Any) -> list[Any]:
    with database.session() as s:
        q = select(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return list(s.scalars(q))


def sending_pipeline(tmp: Path, dest: dict[str, Any], n: int = 3) -> tuple[Any, list[Path]]:
    """A node state with one processed series (output on disk) waiting to be sent to ``dest``,
    as after a model run; returns the pipeline and the output files."""
    from dicom_node.config import parse_config
    from nodetools.peers import make_ct_series
    from dicom_node.app.pipeline import Pipeline

    cfg = parse_config({"node": {"data_dir": str(tmp / "data"), "ae_title": "LTDIFF"},
                        "destinations": [dest], "rules": [{"name": "r", "destinations": [dest["name"]]}]}, tmp)
    database = db.Database(cfg.db_url)
    database.create_all()
    files = make_ct_series(cfg.output_dir / "job-1", n=n, size=32)
    with database.session() as s:
        series = db.Series(series_uid="1.2.3.4", instance_count=n, state=db.SENDING)
        job = db.Job(series=series, state=db.SENDING, rule_name="r", model="default", destinations=[dest["name"]],
                     instance_count=n, output_count=n,
                     output_series_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID))
        d = db.Delivery(destination=dest["name"])
        d.sends = [db.InstanceSend(sop_instance_uid=str(pydicom.dcmread(f).SOPInstanceUID),
                                   path=f"job-1/{f.name}") for f in files]
        job.deliveries.append(d)
        s.add(series)
    return Pipeline(cfg, database), files
