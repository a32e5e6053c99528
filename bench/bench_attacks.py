"""Measure what pre-login attacks do to ``dicom-node serve`` on this machine (loopback only).

    python -m bench.bench_attacks [--stream-mib 200] [--hold-s 60] [--acse-timeout-s N]

* PDU-length attack: one connection declares an A-ASSOCIATE-RQ of 0xFFFFFFF0 bytes and streams
  ``--stream-mib`` MiB of zeros; reported: MiB the node accepted before closing, and the growth of
  the node's peak resident memory (VmHWM in /proc/PID/status).
* Lockout: 12 connections each send half an A-ASSOCIATE-RQ and 12 only connect (from 127.0.0.2
  and 127.0.0.3, kept open by the attacker); DCMTK echoscu from 127.0.0.1 is retried every
  0.2 s; reported: seconds until the first successful C-ECHO (">hold" if none within
  ``--hold-s``). Then the same with the 12 idle connections alone.

The node is started from the current directory's code (``python -m dicom_node.app.cli``), so the
script measures whatever checkout it is run in.
"""
from __future__ import annotations

import argparse
import socket
import struct
import tempfile
import time
from pathlib import Path

from nodetools import peers

MiB = 1 << 20


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise KeyError("VmHWM")


def _first_echo(port: int, hold_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < hold_s:
        if peers.echoscu(port, "LTDIFF").returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


def _node(tmp: Path, name: str, acse_timeout_s: float | None) -> tuple[peers.Peer, int]:
    port = peers.free_port()
    extra = {"acse_timeout_s": acse_timeout_s} if acse_timeout_s else None
    cfg = peers.write_node_config(tmp / f"{name}.toml", port=port, data_dir=tmp / name, extra_node=extra)
    node = peers.start_node(cfg, port, tmp / f"{name}.log")
    if _first_echo(port, 30) is None:
        node.stop()
        raise RuntimeError("the node does not answer C-ECHO")
    return node, port


def pdu_length_attack(tmp: Path, stream_mib: int, acse: float | None) -> str:
    node, port = _node(tmp, "pdu", acse)
    try:
        base = _hwm_kib(node.pid)
        sent = 0
        t0 = time.monotonic()
        with peers.connect_from("127.0.0.2", port) as s:
            s.settimeout(30)
            try:
                s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
                while sent < stream_mib * MiB:
                    s.sendall(bytes(MiB))
                    sent += MiB
            except OSError:
                pass
        dt = time.monotonic() - t0
        time.sleep(0.5)
        growth = (_hwm_kib(node.pid) - base) / 1024
        return (f"PDU length 0xFFFFFFF0 + {stream_mib} MiB: node took {sent / MiB:.0f} MiB in {dt:.1f} s, "
                f"peak RSS +{growth:.1f} MiB")
    finally:
        node.stop()


def lockout(tmp: Path, hold_s: float, half_open: bool, acse: float | None) -> str:
    node, port = _node(tmp, "half" if half_open else "idle", acse)
    rq = peers.associate_rq()
    attack: list[socket.socket] = []
    try:
        if half_open:
            for _ in range(12):
                s = peers.connect_from("127.0.0.2", port)
                s.sendall(rq[: len(rq) // 2])
                attack.append(s)
        attack += [peers.connect_from("127.0.0.3", port) for _ in range(12)]
        time.sleep(0.3)
        t = _first_echo(port, hold_s)
        what = "12 half-open + 12 idle" if half_open else "12 idle"
        return f"{what} connections: first legitimate C-ECHO after " + (f"{t:.1f} s" if t is not None
                                                                         else f"> {hold_s:.0f} s (none)")
    finally:
        for s in attack:
            s.close()
        node.stop(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream-mib", type=int, default=200)
    ap.add_argument("--hold-s", type=float, default=60.0)
    ap.add_argument("--acse-timeout-s", type=float, default=None, help="node.acse_timeout_s (default: the node's)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(pdu_length_attack(tmp, a.stream_mib, a.acse_timeout_s), flush=True)
        print(lockout(tmp, a.hold_s, True, a.acse_timeout_s), flush=True)
        print(lockout(tmp, a.hold_s, False, a.acse_timeout_s), flush=True)


if __name__ == "__main__":
    main()
