"""Hostile peers that need no login (raw sockets on loopback against the node's SCP): a huge
declared PDU length, half-open and idle connections, the association limit, rejection reasons,
and allow-list pins written as host names; and after the login (issue 23): a C-STORE data set
that never ends, one over the size limit, an invalid A-ASSOCIATE-RQ, a C-ECHO flood holding
every slot (the attacks are nodetools.peers' hostile peers, also run by ``bench/bench_hostile.py``).

Attack sockets bind other loopback addresses (127.0.0.2, 127.0.0.3) so that the per-address
limit applies to them and not to the legitimate DCMTK peer on 127.0.0.1.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.store import db
from dicom_node.config import ConfigError, parse_config
from nodetools.peers import (
    LOOPBACK, associate_rq, connect_from, echoscu, free_port, start_node, started, write_node_config,
)
from dicom_node.receive.scp import StorageSCP

MiB = 1 << 20


class RunningSCP:
    def __init__(self, tmp: Path, **node: Any) -> None:
        raw = {"node": {"bind_address": LOOPBACK, "port": free_port(), "data_dir": str(tmp / "data"), **node}}
        self.config = parse_config(raw, tmp)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = db.Database(self.config.db_url)
        self.db.create_all()
        self.scp = StorageSCP(self.config, self.db)
        self.port = self.scp.start()

    def stop(self) -> None:
        self.scp.stop(drain_s=2)
        self.db.dispose()


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    started_: list[RunningSCP] = []

    def make(**node: Any) -> RunningSCP:
        n = RunningSCP(tmp_path / f"n{len(started_)}", **node)
        started_.append(n)
        return n

    yield make
    for n in started_:
        n.stop()


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True when the node closed (or reset) the connection within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def stream_after_header(port: int, header: bytes, total: int, source: str = "127.0.0.2") -> int:
    """Send ``header`` then zeros up to ``total`` bytes; returns what the node took before closing."""
    chunk = bytes(MiB)
    sent = 0
    with connect_from(source, port) as s:
        s.settimeout(10)
        try:
            s.sendall(header)
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


def vm_kib(pid: int, key: str) -> int:
    """A VmRSS/VmHWM figure from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def echo_until_ok(port: int, timeout: float) -> float | None:
    """Seconds until a DCMTK C-ECHO succeeds (retrying), or None if it never did in ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if echoscu(port, "LTDIFF").returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


# ------------------------------------------------------------------------------ item 8
def test_huge_declared_pdu_length_before_association_is_not_buffered(tmp_path: Path) -> None:
    """0xFFFFFFF0 as the A-ASSOCIATE-RQ length, then 200 MB: the node's peak RSS must not follow."""
    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data")
    with started(start_node(cfg, port, tmp_path / "node.log")) as node:
        assert echo_until_ok(port, 20) is not None  # warm: every lazy import done before the baseline
        base = vm_kib(node.pid, "VmHWM")
        t0 = time.monotonic()
        sent = stream_after_header(port, struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0), 200 * MiB)
        seconds = time.monotonic() - t0
        growth_mib = (vm_kib(node.pid, "VmHWM") - base) / 1024
        print(f"pdu-length attack: sent {sent / MiB:.0f} MiB in {seconds:.1f} s, node peak RSS +{growth_mib:.1f} MiB")
        assert growth_mib < 32, f"node peak RSS grew {growth_mib:.0f} MiB while {sent / MiB:.0f} MiB were streamed"
        assert sent < 200 * MiB, "the node read the whole stream instead of closing the connection"
        assert echoscu(port, "LTDIFF").returncode == 0  # still serving
        assert "declared PDU length 4294967280 exceeds the limit 65536" in node.log()


@pytest.mark.parametrize("length", [16384 + 1, 0xFFFFFFF0])
def test_p_data_longer_than_max_pdu_aborts_the_association(scp_factory: Any, length: int) -> None:
    """After the association the cap is the negotiated maximum: the node aborts on the header alone
    (one byte over: without waiting for a body; 0xFFFFFFF0: without buffering the stream)."""
    node = scp_factory(max_pdu=16384)
    ae = AE("SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="LTDIFF")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    sent = 0
    try:
        raw.sendall(struct.pack(">BBL", 0x04, 0, length))
        while length > 16385 and sent < 64 * MiB:
            raw.sendall(bytes(MiB))
            sent += MiB
    except OSError:
        pass
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not assoc.is_established, "the node kept reading a PDU longer than the negotiated maximum"
        assert sent < 64 * MiB
    finally:
        assoc.abort()


# ------------------------------------------------------------------------------ item 9
def test_half_open_and_idle_connections_do_not_lock_out_legitimate_peers(scp_factory: Any) -> None:
    node = scp_factory(acse_timeout_s=3.0)
    rq = associate_rq()
    attack = []
    for _ in range(12):  # each sends half an A-ASSOCIATE-RQ and then nothing
        s = connect_from("127.0.0.2", node.port)
        s.sendall(rq[: len(rq) // 2])
        attack.append(s)
    attack += [connect_from("127.0.0.3", node.port) for _ in range(12)]  # idle TCP connections
    time.sleep(0.5)
    try:
        lockout = echo_until_ok(node.port, 20)
        print(f"half-open attack: first legitimate C-ECHO after {lockout} s")
        assert lockout is not None and lockout < 3.0, f"legitimate C-ECHO locked out ({lockout})"
        # The node closes every attack connection itself, within the ACSE timeout (+ scheduling).
        t0 = time.monotonic()
        assert all(closed_by_peer(s, max(0.1, 6.0 - (time.monotonic() - t0))) for s in attack)
    finally:
        for s in attack:
            s.close()


def _is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_storescu_succeeds_while_attack_connections_stay_open(scp_factory: Any, tmp_path: Path) -> None:
    """The attacker keeps 24 connections (half of them with half an A-ASSOCIATE-RQ) open from 6
    addresses, reconnecting whenever the node closes one; a DCMTK storescu still gets through."""
    from nodetools.peers import make_ct_series, storescu

    node = scp_factory(acse_timeout_s=2.0)
    rq = associate_rq()
    files = make_ct_series(tmp_path / "in", n=2, size=32)
    stop = threading.Event()
    reconnects = [0]

    def attacker() -> None:
        socks: dict[int, socket.socket] = {}
        while not stop.is_set():
            for i in range(24):
                s = socks.get(i)
                if s is not None and not _is_closed(s):
                    continue
                if s is not None:
                    s.close()
                    reconnects[0] += 1
                try:
                    s = connect_from(f"127.0.0.{2 + i % 6}", node.port)
                    if i % 2 == 0:
                        s.sendall(rq[: len(rq) // 2])
                    socks[i] = s
                except OSError:
                    socks.pop(i, None)
            time.sleep(0.05)
        for s in socks.values():
            s.close()

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        time.sleep(2.5)  # at least one round of closes and reconnects
        t0 = time.monotonic()
        r = storescu(files, node.port, "LTDIFF", timeout=30)
        seconds = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert seconds < 5, seconds
        assert reconnects[0] >= 12  # the node did close the attack connections
    finally:
        stop.set()
        thread.join(10)


def test_max_associations_is_honoured_exactly_even_after_a_port_probe(scp_factory: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A bare TCP probe (a monitor, a port check) held one of the 10 slots: only 9 were usable."""
    node = scp_factory(max_associations=10, max_connections_per_address=16, max_associations_per_address=16)
    socket.create_connection((LOOPBACK, node.port)).close()  # the probe
    time.sleep(0.3)
    ae = AE("SCU")
    ae.add_requested_context(Verification)
    caplog.set_level(logging.INFO)
    assocs = [ae.associate(LOOPBACK, node.port, ae_title="LTDIFF") for _ in range(11)]
    try:
        assert [a.is_established for a in assocs] == [True] * 10 + [False]
        assert assocs[10].is_rejected
        rejected = [r for r in caplog.records if r.getMessage() == "association_rejected"]
        assert rejected and all(getattr(r, "fields", {}).get("reason") for r in rejected)
        assert "max_associations (10) reached" in {r.fields["reason"] for r in rejected}
    finally:
        for a in assocs:
            if a.is_established:
                a.release()
    # Released slots are free again at once.
    again = ae.associate(LOOPBACK, node.port, ae_title="LTDIFF")
    assert again.is_established
    again.release()


def test_every_rejection_log_line_gives_a_reason(scp_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    node = scp_factory(allowed_calling_aes=["ECHOSCU"])
    caplog.set_level(logging.INFO)
    assert echoscu(node.port, "LTDIFF", "INTRUDER").returncode != 0
    assert echoscu(node.port, "NOTUS", "ECHOSCU").returncode != 0
    deadline = time.monotonic() + 5  # logged by the node's thread, possibly after the peer exited
    while len(rejected := [r for r in caplog.records if r.getMessage() == "association_rejected"]) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rejected) == 2
    reasons = {r.fields.get("reason") for r in rejected}
    assert reasons == {"calling AE title not recognised", "called AE title not recognised"}


def test_per_address_connection_limit_refuses_with_a_reason(scp_factory: Any,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    node = scp_factory(max_connections_per_address=3)
    caplog.set_level(logging.INFO)
    conns = [connect_from("127.0.0.4", node.port) for _ in range(12)]
    try:
        assert all(closed_by_peer(s, 1.0) for s in conns[3:])
        assert not closed_by_peer(conns[0], 0.3)
        refused = [r for r in caplog.records if r.getMessage() == "connection_refused"]
        # One line per address and limit every 10 s: a connection flood is not a log flood.
        assert len(refused) == 1
        assert refused[0].fields["reason"] == "max_connections_per_address (3) reached for 127.0.0.4"
        assert echoscu(node.port, "LTDIFF").returncode == 0  # another address is not affected
    finally:
        for s in conns:
            s.close()


def test_allow_list_pin_written_as_a_host_name(scp_factory: Any) -> None:
    node = scp_factory(allowed_calling_aes=[{"ae_title": "ECHOSCU", "host": "localhost"}])
    r = echoscu(node.port, "LTDIFF", "ECHOSCU")
    assert r.returncode == 0, r.stderr


def test_allow_list_pin_that_does_not_resolve_is_a_config_error(tmp_path: Path) -> None:
    raw = {"node": {"allowed_calling_aes": ["OK", {"ae_title": "PACS", "host": "no-such-host.invalid"}]}}
    with pytest.raises(ConfigError, match=r"node\.allowed_calling_aes\[1\]\.host: host name does not resolve"):
        parse_config(raw, tmp_path)


def test_limit_keys_are_validated(tmp_path: Path) -> None:
    for key in ("max_connections_per_address", "max_pending_connections", "acse_timeout_s",
                "max_associations_per_address", "idle_association_s", "max_echo_per_s", "max_dataset_mb"):
        with pytest.raises(ConfigError, match=rf"node\.{key}: must be positive"):
            parse_config({"node": {key: 0}}, tmp_path)
    with pytest.raises(ConfigError, match=r"node\.max_dataset_mb: must be <= 4096 \(got 5000.0\)"):
        parse_config({"node": {"max_dataset_mb": 5000.0}}, tmp_path)
    with pytest.raises(ConfigError, match=r"disk\.quarantine_max_mb: must be >= 0"):
        parse_config({"disk": {"quarantine_max_mb": -1.0}}, tmp_path)
    c = parse_config({}, tmp_path)
    assert c.acse_timeout_s == 5.0 and c.max_connections_per_address == 4 and c.max_pending_connections == 32
    assert (c.node.max_associations_per_address, c.node.idle_association_s, c.node.max_echo_per_s,
            c.node.max_dataset_mb, c.disk.quarantine_max_mb) == (4, 10.0, 5.0, 32.0, 1024.0)


def test_a_port_probe_frees_its_connection_at_once(scp_factory: Any) -> None:
    """connect + close (a monitor's port check) must not count against its address for seconds."""
    node = scp_factory(max_connections_per_address=1, acse_timeout_s=30.0)
    socket.create_connection((LOOPBACK, node.port)).close()
    time.sleep(0.5)
    r = echoscu(node.port, "LTDIFF")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 3
    while node.scp.gate.connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.scp.gate.connections() == {}


def test_refusal_lines_carry_the_suppressed_count(scp_factory: Any, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.receive import transport

    monkeypatch.setattr(transport, "REFUSAL_LOG_INTERVAL_S", 1.0)
    node = scp_factory(max_connections_per_address=1)
    caplog.set_level(logging.INFO)
    held = connect_from("127.0.0.5", node.port)
    try:
        for _ in range(5):
            with connect_from("127.0.0.5", node.port) as s:
                assert closed_by_peer(s, 1.0)
        time.sleep(1.1)
        with connect_from("127.0.0.5", node.port) as s:
            assert closed_by_peer(s, 1.0)
        lines = [r.fields for r in caplog.records if r.getMessage() == "connection_refused"]
        assert len(lines) == 2 and "suppressed" not in lines[0] and lines[1]["suppressed"] == 4
    finally:
        held.close()


# ------------------------------------------------------------------------------ issue 23
def _incoming_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool" / ".incoming").glob("*") if p.is_file()]


def test_endless_c_store_data_set_is_spooled_bounded_and_aborted(tmp_path: Path) -> None:
    """Item 2. Before: a data set that never ends was buffered whole (800 MB streamed: RSS
    141 -> 957 MB, still 959 MB after the close). Now it is spooled to disk as it arrives, no
    longer kept past node.max_dataset_mb, and the association is aborted past twice that; memory
    stays flat during and after, for one stream and for four at once from four addresses."""
    from nodetools.peers import endless_c_store

    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data",
                            extra_node={"max_dataset_mb": 4.0})
    with started(start_node(cfg, port, tmp_path / "node.log")) as node:
        assert echo_until_ok(port, 20) is not None
        base_hwm, base_rss = vm_kib(node.pid, "VmHWM"), vm_kib(node.pid, "VmRSS")
        sent, stopped = endless_c_store(port, 200 * MiB)
        results: list[tuple[int, bool]] = []
        threads = [threading.Thread(target=lambda src: results.append(endless_c_store(port, 100 * MiB, source=src)),
                                    args=(f"127.0.0.{2 + i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(0.5)
        peak_mib = (vm_kib(node.pid, "VmHWM") - base_hwm) / 1024
        after_mib = (vm_kib(node.pid, "VmRSS") - base_rss) / 1024
        print(f"endless data set: node took {sent / MiB:.1f} MiB of 200, then 4 x "
              f"{[round(r[0] / MiB, 1) for r in results]} MiB; peak RSS +{peak_mib:.1f} MiB, after +{after_mib:.1f} MiB")
        assert stopped and sent < 32 * MiB, f"the node read {sent / MiB:.0f} MiB of one data set"
        assert len(results) == 4 and all(ok and n < 32 * MiB for n, ok in results), results
        assert peak_mib < 32 and after_mib < 32, (peak_mib, after_mib)
        assert _incoming_files(tmp_path / "data") == []
        assert echoscu(port, "LTDIFF").returncode == 0
    assert node.log().count("C-STORE data set past 2 x node.max_dataset_mb") == 5


def test_endless_command_set_is_aborted(scp_factory: Any) -> None:
    """A command set whose fragments never end is not a data set to spool: pynetdicom would keep
    it in memory without limit; the node aborts it past 1 MiB."""
    from nodetools.peers import endless_c_store

    node = scp_factory()
    sent, stopped = endless_c_store(node.port, 64 * MiB, command=True)
    assert stopped and sent < 16 * MiB, sent


def test_data_set_larger_than_max_dataset_mb_is_refused_with_out_of_resources(scp_factory: Any,
                                                                            tmp_path: Path) -> None:
    """Item 2, the cap: before, any size was acknowledged 0x0000. The data set that ends after
    the limit is answered 0xA700 with the reason, nothing of it is kept, and the association
    goes on (the next instance is stored)."""
    from fault_helpers import c_store

    from nodetools.peers import make_ct_series

    node = scp_factory(max_dataset_mb=1.0)
    (big,) = make_ct_series(tmp_path / "big", n=1, size=900)  # 1.5 MiB of pixels: past the cap, not twice
    (small,) = make_ct_series(tmp_path / "small", n=1, size=32)
    assert c_store(node.port, [big, small]) == [
        (0xA700, "data set larger than node.max_dataset_mb (1 MiB)"), (0, "")]
    with node.db.session() as s:
        assert [i.sop_instance_uid for i in s.query(db.Instance)] == [
            str(pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID)]
    assert _incoming_files(node.config.data_dir) == []


def test_invalid_pdu_before_association_frees_the_address_at_once(scp_factory: Any) -> None:
    """Item 6. Before: after an A-ASSOCIATE-RQ that does not decode, the node waited for the
    ARTIM timer (the ACSE timeout, 30 s here) with the connection counted against the address,
    though the peer had gone. Now it answers A-ABORT and closes at once."""
    node = scp_factory(max_connections_per_address=1, acse_timeout_s=30.0)
    with connect_from("127.0.0.6", node.port) as s:
        s.sendall(bytes([0x01, 0, 0, 0, 0, 4, 0, 1, 0, 0]))  # an A-ASSOCIATE-RQ too short to decode
        s.settimeout(3)
        answer = s.recv(64)
    assert answer[:1] == b"\x07", answer  # A-ABORT
    deadline = time.monotonic() + 3
    while node.scp.gate.connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.scp.gate.connections() == {}
    ae = AE("SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, node.port, ae_title="LTDIFF", bind_address=("127.0.0.6", 0))
    try:
        assert assoc.is_established
    finally:
        if assoc.is_established:
            assoc.release()


def test_echo_flood_does_not_lock_out_a_storing_peer(tmp_path: Path) -> None:
    """Item 4. Before: three addresses looping C-ECHO on 4 associations each held all 10 slots;
    a legitimate storescu was refused 6 of 6 times, and the node wrote thousands of log lines.
    Now a newcomer takes a slot from an address that holds two more than its own (one not in a
    C-STORE), C-ECHO is answered at most max_echo_per_s per association, and one line per
    association (and per refused address and limit every 10 s) is written."""
    from nodetools.peers import echo_flood

    from nodetools.peers import make_ct_series, storescu

    port = free_port()
    cfg = write_node_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "data")
    files = make_ct_series(tmp_path / "in", n=3, size=32)
    with started(start_node(cfg, port, tmp_path / "node.log")) as node:
        assert echo_until_ok(port, 20) is not None
        with echo_flood(port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"], 4) as counts:
            deadline = time.monotonic() + 10
            while counts.get("echoes", 0) < 50 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # every slot is held by the flood now
            lines_before = node.log().count("\n")
            codes = []
            for _ in range(3):
                codes.append(storescu(files, port, "LTDIFF", timeout=30).returncode)
                time.sleep(1.0)
            lines = node.log().count("\n") - lines_before
        print(f"echo flood: storescu {codes}, flood {counts}, node log lines meanwhile {lines}")
        assert counts.get("echoes", 0) >= 50  # the flood did run and hold its associations
        assert codes == [0, 0, 0]
        assert lines < 150, lines
    assert "event=association_evicted" in node.log()
