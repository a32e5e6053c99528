"""Hostile peers after the login, against a real ``dicom-node serve`` (loopback only): the node's
resident memory (VmRSS) and the data volume's free space over time.

    python -m bench.bench_hostile [--stream-mib 400] [--copies 63] [--quarantine-max-mb 8]
                                  [--flood-s 30] [--volume-mb 64] [--only endless|conflicts|flood]

* **endless data set**: one C-STORE whose data set never ends (``--stream-mib`` MiB of data
  fragments on one association), then four such streams of half that at once from four
  addresses (127.0.0.2-5); reported: MiB each stream got in before the node stopped it, peak and
  after-the-attack RSS, the least free space.
* **conflicting copies**: a series is acknowledged, then ``--copies`` series that reuse its SOP
  Instance UIDs with other pixels (512x512, 4 slices each), with ``disk.quarantine_max_mb`` set to
  ``--quarantine-max-mb``; then a new series. Reported: statuses, quarantine size, copies dropped,
  least free space, and whether the first and the new series were standardized.
* **C-ECHO flood**: three addresses (127.0.0.2-4) keep four associations each open, looping
  C-ECHO, for ``--flood-s``; a DCMTK ``storescu`` from 127.0.0.1 tries every 5 s. Reported: its
  successes, the node's log lines meanwhile, RSS.

The data directory is a ``--volume-mb`` tmpfs when run as root (mount permitted), else a temp
directory with the watermark set just below its free space. The functions :func:`endless_c_store`
and :func:`echo_loop` are the attacks themselves (the tests use them too).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.store.watermark import free_space
from nodetools import peers
from nodetools.peers import conflicting_copies, echo_flood, endless_c_store

MiB = 1 << 20


# --------------------------------------------------------------------------- measuring
class Sampler:
    """The node's VmRSS and the data volume's free space every ``interval`` seconds."""

    def __init__(self, pid: int, volume: Path, interval: float = 0.2) -> None:
        self.pid, self.volume, self.interval = pid, volume, interval
        self.samples: list[tuple[float, float, float]] = []  # (seconds, RSS MiB, free MiB)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_mib(self.pid), free_space(self.volume)[0] / MiB))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def timeline(self, lines: int = 12) -> str:
        """About ``lines`` samples, evenly spread."""
        every_s = max(1.0, (self.samples[-1][0] if self.samples else 0.0) / lines)
        out, next_t = [], 0.0
        for t, rss, free in self.samples:
            if t >= next_t:
                out.append(f"{t:5.1f}s {rss:6.0f} {free:7.1f}")
                next_t = t + every_s
        return "    t     RSS MiB  free MiB\n    " + "\n    ".join(out)


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@contextlib.contextmanager
def volume(tmp: Path, size_mb: int) -> Iterator[tuple[Path, float]]:
    """(data volume, min_free_mb): a tmpfs of ``size_mb`` with a quarter as threshold, or the
    temp directory with the threshold leaving ``size_mb`` * 3/4 usable."""
    mnt = tmp / "vol"
    mnt.mkdir()
    mounted = size_mb > 0 and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    try:
        yield mnt, (size_mb / 4 if mounted else free_space(mnt)[0] / MiB - size_mb * 3 / 4)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def start(tmp: Path, name: str, data: Path, min_free_mb: float, quarantine_max_mb: float = 1024.0,
          **node: Any) -> tuple[peers.Peer, int, Path]:
    """``dicom-node serve`` with its data directory on ``data``; (process, port, its config)."""
    port = peers.free_port()
    cfg = peers.write_node_config(tmp / f"{name}.toml", port=port, data_dir=data / name, stable_age_s=2.0,
                                  extra_node=node or None,
                                  rules=[{"name": "all", "match": {"Modality": "CT"}, "qa": "off"}],
                                  disk={"min_free_percent": 0.0, "min_free_mb": min_free_mb,
                                        "quarantine_max_mb": quarantine_max_mb})
    node_ = peers.start_node(cfg, port, tmp / f"{name}.log")
    if peers.echoscu(port, "LTDIFF").returncode != 0:
        node_.stop()
        raise RuntimeError("the node does not answer C-ECHO")
    return node_, port, cfg


def finish(node: peers.Peer, data: Path, name: str) -> None:
    """Stop the node and empty the volume for the next run."""
    node.stop()
    shutil.rmtree(data / name, ignore_errors=True)


def states(cfg: Path) -> dict[str, str]:
    """SeriesInstanceUID -> state, read from the node's database."""
    from dicom_node.admin.status import collect_status
    from dicom_node.config import load_config

    return {x["series_uid"]: x["state"] for x in collect_status(load_config(cfg), last=500)["series"]}


def wait_states(cfg: Path, uids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        now = states(cfg)
        if all(now.get(u) in ("done", "failed", "refused") for u in uids) or time.monotonic() > deadline:
            return {u: now.get(u, "absent") for u in uids}
        time.sleep(0.5)


# --------------------------------------------------------------------------- the runs
def endless(tmp: Path, data: Path, min_free_mb: float, stream_mib: int) -> str:
    node, port, _ = start(tmp, "endless", data, min_free_mb)
    try:
        base = rss_mib(node.pid)
        with Sampler(node.pid, data) as s:
            one = endless_c_store(port, stream_mib * MiB)
            results: list[tuple[int, bool]] = []
            threads = [threading.Thread(target=lambda src: results.append(
                endless_c_store(port, stream_mib * MiB // 2, source=src)), args=(f"127.0.0.{2 + i}",))
                for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            time.sleep(3)
        after = rss_mib(node.pid)
        peak = rss_mib(node.pid, "VmHWM")
        least = min(f for _, _, f in s.samples)
        lines = [f"endless data set: 1 x {stream_mib} MiB offered, node took {one[0] / MiB:.0f} MiB, "
                 f"{'stopped' if one[1] else 'NOT stopped'}; 4 x {stream_mib // 2} MiB at once: took "
                 + ", ".join(f"{r[0] / MiB:.0f}" for r in results) + " MiB, "
                 + ("all stopped" if all(r[1] for r in results) else "NOT all stopped"),
                 f"  RSS before {base:.0f} MiB, peak {peak:.0f} MiB, 3 s after {after:.0f} MiB; "
                 f"least free space {least:.1f} MiB (watermark {min_free_mb:.1f} MiB)",
                 "  C-ECHO after: " + ("ok" if peers.echoscu(port, "LTDIFF").returncode == 0 else "FAILED"),
                 s.timeline()]
        return "\n".join(lines)
    finally:
        finish(node, data, "endless")


def _outcomes(r: subprocess.CompletedProcess) -> dict[str, int]:
    """C-STORE outcomes in a verbose DCMTK storescu output."""
    text = r.stdout + r.stderr
    return {k: text.count(k) for k in ("Success", "Error: CannotUnderstand", "Refused: OutOfResources")
            if text.count(k)}


def conflicts(tmp: Path, data: Path, min_free_mb: float, copies: int, quarantine_max_mb: float) -> str:
    node, port, cfg = start(tmp, "conflicts", data, min_free_mb, quarantine_max_mb=quarantine_max_mb)
    try:
        first = peers.make_ct_series(tmp / "first", n=4, size=512, seed=1)
        fresh = peers.make_ct_series(tmp / "fresh", n=4, size=512, seed=2)
        uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
        fresh_uid = str(pydicom.dcmread(fresh[0]).SeriesInstanceUID)
        bad = conflicting_copies(first, tmp / "copies", copies)
        with Sampler(node.pid, data) as s:
            a = peers.storescu(first, port, "LTDIFF", extra=["-v"])
            b = peers.storescu(tmp / "copies", port, "LTDIFF", extra=["-v", "-nh"], timeout=900)
            first_state = wait_states(cfg, [uid], 60)[uid]
            c = peers.storescu(fresh, port, "LTDIFF", extra=["-v"])
            fresh_state = wait_states(cfg, [fresh_uid], 60)[fresh_uid]
        quarantine = sum(p.stat().st_size for p in (data / "conflicts" / "quarantine").rglob("*") if p.is_file())
        dropped = sum(1 for line in (tmp / "conflicts.log").read_text().splitlines() if "event=quarantine_dropped" in line)
        least = min(f for _, _, f in s.samples)
        return "\n".join([
            f"conflicting copies: first series {_outcomes(a)} -> {first_state}; {copies} copies x {len(first)} "
            f"({len(bad) * 0.5:.0f} MiB offered) {_outcomes(b)}; new series {_outcomes(c)} -> {fresh_state}",
            f"  quarantine {quarantine / MiB:.1f} MiB (disk.quarantine_max_mb {quarantine_max_mb:g}), "
            f"{dropped} oldest copies dropped; least free space {least:.1f} MiB (watermark {min_free_mb:.1f} MiB)",
            s.timeline()])
    finally:
        finish(node, data, "conflicts")


def flood(tmp: Path, data: Path, min_free_mb: float, flood_s: float) -> str:
    node, port, _ = start(tmp, "flood", data, min_free_mb)
    log = tmp / "flood.log"
    files = peers.make_ct_series(tmp / "flood-in", n=4, size=64, seed=3)
    try:
        before = len(log.read_text().splitlines())
        tries, ok, seconds = 0, 0, []
        with Sampler(node.pid, data) as s, echo_flood(port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 4) as counts:
            time.sleep(2.0)  # every slot taken
            end = time.monotonic() + flood_s
            while time.monotonic() < end:
                t0 = time.monotonic()
                r = peers.storescu(files, port, "LTDIFF", timeout=60)
                tries += 1
                if r.returncode == 0:
                    ok += 1
                    seconds.append(time.monotonic() - t0)
                time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
        lines = len(log.read_text().splitlines()) - before
        return "\n".join([
            f"C-ECHO flood (3 addresses x 4 associations, {flood_s:g} s): storescu from 127.0.0.1 succeeded "
            f"{ok} of {tries}" + (f" ({min(seconds):.2f}-{max(seconds):.2f} s each)" if seconds else "")
            + f"; flood: {counts.get('echoes', 0)} echoes answered, {counts.get('refused', 0)} associations refused",
            f"  node log lines meanwhile: {lines}; RSS {min(r for _, r, _ in s.samples):.0f}-"
            f"{max(r for _, r, _ in s.samples):.0f} MiB"])
    finally:
        finish(node, data, "flood")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream-mib", type=int, default=400)
    ap.add_argument("--copies", type=int, default=63)
    ap.add_argument("--quarantine-max-mb", type=float, default=8.0)
    ap.add_argument("--flood-s", type=float, default=30.0)
    ap.add_argument("--volume-mb", type=int, default=64)
    ap.add_argument("--only", choices=("endless", "conflicts", "flood"), action="append")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with volume(tmp, a.volume_mb) as (data, min_free_mb):
            runs = a.only or ["endless", "conflicts", "flood"]
            if "endless" in runs:
                print(endless(tmp, data, min_free_mb, a.stream_mib), flush=True)
            if "conflicts" in runs:
                print(conflicts(tmp, data, min_free_mb, a.copies, a.quarantine_max_mb), flush=True)
            if "flood" in runs:
                print(flood(tmp, data, min_free_mb, a.flood_s), flush=True)


if __name__ == "__main__":
    main()
