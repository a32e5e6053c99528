"""Transport guards for the SCP: what a peer can make the node do before (and beyond) a login.

pynetdicom 3.0 trusts the peer at the transport level: ``DULServiceProvider._read_pdu_data``
reads the 6-byte PDU header and then ``recv(pdu_length)`` on a blocking socket, so a declared
length of 0xFFFFFFF0 makes it buffer whatever is streamed (up to 4 GiB per connection), and a
peer that sends half an A-ASSOCIATE-RQ blocks that read for ever; ``Association.kill()`` then
waits for the DUL to reach Sta1, which never happens, and every such connection keeps counting
against ``maximum_associations``. Its association limit counts every acceptor thread, including
bare TCP connections (a port probe holds a slot for the ACSE timeout: 9 of 10 usable), and the
TLS handshake runs in the accept loop, so one silent TLS client stops every accept.

This module replaces those pieces at pynetdicom's documented extension points
(``AE.make_server(server_class=...)``, ``AssociationServer(request_handler=...)``) plus one
subclass of the DUL installed per association:

- :class:`GuardedDUL` reads each PDU against a deadline and refuses a declared length above the
  cap *before* reading the body: 64 KiB for the A-ASSOCIATE-RQ (Sta2), the node's Maximum Length
  Received for P-DATA-TF afterwards. Refusal is an A-ABORT (service provider, invalid PDU
  parameter value) and a closed connection.
- :class:`ConnectionGate` limits TCP connections per peer address and in total (checked in the
  accept loop, before any thread is started) and admits at most ``max_associations``
  associations, counted only once an A-ASSOCIATE-RQ has arrived, so half-open and idle
  connections never take an association slot. Slots are shared fairly: one peer address holds
  at most ``max_associations_per_address``, and when every slot is taken a new association takes
  a slot from an address that holds at least two more than its own, or from any association
  that has not stored for ``idle_association_s``; the slot given up is one not in a C-STORE at
  that moment, idle the longest (a C-ECHO loop is not work). Every refusal is logged with its
  reason, at most once per peer address, limit and :data:`REFUSAL_LOG_INTERVAL_S` (with the
  count of the lines not written).
- :class:`GuardedRequestHandler` runs the TLS handshake in the connection's own thread, under
  the same deadline as the A-ASSOCIATE-RQ.

A PDU that cannot be decoded before the association is answered with an A-ABORT and the
connection closed at once: in pynetdicom's state machine the acceptor would wait for the ARTIM
timer (the ACSE timeout) with the connection counted against the peer's address, though the
peer has gone.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.logs import log_event
from dicom_node.receive.reactor import ReactiveAssociation, ReactiveDUL

log = logging.getLogger("dicom_node.receive.transport")

PDU_HEADER_LENGTH = 6
ASSOCIATE_RQ_MAX_LENGTH = 65536  # an A-ASSOCIATE-RQ with 128 presentation contexts is ~13 KB
UNLIMITED_PDU_CAP = 2**26  # max_pdu = 0 ("unlimited") still has a ceiling: the largest configurable value
_PDU_TYPES = range(0x01, 0x08)
REFUSAL_LOG_INTERVAL_S = 10.0
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_NO_REASON = 0x00
_ABORT_UNRECOGNIZED_PDU = 0x01
_ABORT_INVALID_PARAMETER = 0x06

REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def reject_reason(source: int, diagnostic: int) -> str:
    """The A-ASSOCIATE-RJ Result Source/Reason-Diag pair as words (PS3.8 Table 9-21)."""
    return REJECT_REASONS.get((int(source), int(diagnostic)), f"source {source} diagnostic {diagnostic}")


@dataclass(frozen=True)
class Limits:
    """The pre-login limits of one node (all listeners share them)."""

    max_pdu: int  # the node's Maximum Length Received (0: unlimited, capped at UNLIMITED_PDU_CAP)
    max_associations: int  # associations past the A-ASSOCIATE-RQ, exactly
    max_connections_per_address: int  # open TCP connections from one peer address
    max_pending_connections: int  # connections that have not (yet) been admitted as an association
    acse_timeout_s: float  # TCP connect to complete A-ASSOCIATE-RQ (TLS handshake included)
    network_timeout_s: float  # one PDU, once its first byte arrived; also bounds a blocked send
    max_associations_per_address: int = 2**31  # associations one peer address may hold at once
    idle_association_s: float = float("inf")  # without a C-STORE this long, a slot may go to a newcomer

    @classmethod
    def from_config(cls, c: Any) -> Limits:
        return cls(max_pdu=c.max_pdu, max_associations=c.max_associations,
                   max_connections_per_address=c.max_connections_per_address,
                   max_pending_connections=c.max_pending_connections,
                   acse_timeout_s=c.acse_timeout_s, network_timeout_s=c.network_timeout_s,
                   max_associations_per_address=c.node.max_associations_per_address,
                   idle_association_s=c.node.idle_association_s)

    @property
    def max_connections(self) -> int:
        return self.max_associations + self.max_pending_connections

    def pdu_cap(self, pdu_type: int, awaiting_request: bool) -> int:
        """Largest PDU length accepted: the A-ASSOCIATE-RQ cap before the association, the
        negotiated Maximum Length Received for P-DATA-TF after it (other PDUs are a few bytes)."""
        if awaiting_request or pdu_type != 0x04:
            return ASSOCIATE_RQ_MAX_LENGTH
        return self.max_pdu or UNLIMITED_PDU_CAP


class _Refused(Exception):
    """A PDU the node will not read; the message is the reason logged."""


class GuardedDUL(ReactiveDUL):
    """DUL service provider whose PDU reader checks the declared length before the body and reads
    against a deadline (pynetdicom's reads block for ever and buffer any declared length); its
    reactor waits for work instead of polling (:mod:`dicom_node.receive.reactor`)."""

    def __init__(self, assoc: Association, limits: Limits, request_deadline: float) -> None:
        super().__init__(assoc)
        self._limits = limits
        self._request_deadline = request_deadline  # monotonic time the A-ASSOCIATE-RQ must be in by
        self._awaiting_request = True  # until a complete A-ASSOCIATE-RQ was read (the FSM may still be in Sta1)
        self._closed_before_request = threading.Event()
        self._abort_requested: str | None = None  # set by another thread, acted on by the reactor

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """As pynetdicom's, but the acceptor's wait for the A-ASSOCIATE-RQ ends as soon as the
        connection is gone: a port probe would otherwise hold its thread (and its per-address
        connection count) for the whole ACSE timeout."""
        if not (wait and self._awaiting_request):
            return super().receive_pdu(wait, timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.05 if end is None else max(0.0, min(0.05, end - time.monotonic()))
            item = super().receive_pdu(wait=True, timeout=step)
            if item is not None or self._closed_before_request.is_set():
                return item
            if end is not None and time.monotonic() >= end:
                return None

    # -------------------------------------------------------------- reading
    def _read_exact(self, n: int, deadline: float) -> bytearray:
        sock = self.socket.socket if self.socket is not None else None
        if sock is None:
            raise ConnectionError("transport closed")
        buf = bytearray()
        try:
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(min(n - len(buf), 65536))
                if not chunk:
                    raise ConnectionError("closed by the peer")
                buf += chunk
        finally:
            try:
                sock.settimeout(self._limits.network_timeout_s)  # bounds a send the peer never reads
            except OSError:
                pass
        return buf

    def _read_pdu_data(self) -> None:
        """Replaces pynetdicom's reader (same events: Evt3/4/6/10/12/13/16, Evt17, Evt19)."""
        awaiting_request = self._awaiting_request
        if awaiting_request:
            deadline, what = self._request_deadline, "A-ASSOCIATE-RQ not complete within acse_timeout_s"
        else:
            deadline, what = time.monotonic() + self._limits.network_timeout_s, \
                "PDU not complete within network_timeout_s"
        try:
            header = self._read_exact(PDU_HEADER_LENGTH, deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                raise _Refused(f"unknown PDU type 0x{pdu_type:02X}")
            cap = self._limits.pdu_cap(pdu_type, awaiting_request)
            if length > cap:
                raise _Refused(f"declared PDU length {length} exceeds the limit {cap}")
            body = self._read_exact(length, deadline)
        except _Refused as exc:
            reason_code = _ABORT_INVALID_PARAMETER if "length" in str(exc) else _ABORT_UNRECOGNIZED_PDU
            self._drop(str(exc), abort=reason_code, awaiting_request=awaiting_request)
            return
        except TimeoutError:
            self._drop(what, abort=None if awaiting_request else _ABORT_INVALID_PARAMETER,
                       awaiting_request=awaiting_request)
            return
        except (OSError, ConnectionError):
            if awaiting_request:
                self._closed_before_request.set()
            self.event_queue.put("Evt17")  # transport closed by the peer
            return
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is Evt19, as in pynetdicom
            log_event(log, "pdu_invalid", level=logging.WARNING, peer=self._peer(), reason=f"{type(exc).__name__}",
                      before_association=awaiting_request)
            if awaiting_request:  # nothing to wait for: abort and close now (frees the peer's slot)
                self._drop(f"invalid PDU ({type(exc).__name__})", abort=_ABORT_INVALID_PARAMETER,
                           awaiting_request=True)
            else:
                self.event_queue.put("Evt19")
            return
        self._awaiting_request = False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def abort_transport(self, reason: str) -> None:
        """A-ABORT (service provider, no reason given) and close, from the reactor's own thread
        (the DIMSE layer: a data set past its limits)."""
        self._drop(reason, abort=_ABORT_NO_REASON, awaiting_request=False)

    def request_abort(self, reason: str) -> None:
        """:meth:`abort_transport` from another thread: done by the reactor at its next turn, so
        the A-ABORT is never written between the bytes of a PDU it is sending."""
        self._abort_requested = reason
        self._wake()

    def _between_events(self) -> None:
        reason, self._abort_requested = self._abort_requested, None
        if reason is not None:
            self.abort_transport(reason)

    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except Exception:  # noqa: BLE001 - logging only
            return "?"

    def _drop(self, reason: str, abort: int | None, awaiting_request: bool) -> None:
        """Log why, send an A-ABORT when one is due, and close the transport connection (Evt17)."""
        log_event(log, "connection_closed", level=logging.WARNING, peer=self._peer(), reason=reason,
                  state=self.state_machine.current_state, before_association=awaiting_request)
        sock = self.socket
        if sock is None:
            return
        if abort is not None and sock.socket is not None:
            pdu = A_ABORT_RQ()
            pdu.source = _ABORT_SOURCE_PROVIDER
            pdu.reason_diagnostic = abort
            try:
                sock.socket.settimeout(1.0)
                sock.socket.sendall(pdu.encode())
            except OSError:
                pass
        if awaiting_request:
            self._closed_before_request.set()
        sock.close()  # puts Evt17: Sta2 -> Sta1 (AA-5), established -> A-P-ABORT indication (AA-4)


class LogLimiter:
    """One line per key every REFUSAL_LOG_INTERVAL_S, with the number not written since: a flood
    of connections or associations must not become a flood of log lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (last logged, suppressed)

    def log(self, key: tuple[str, ...], event: str, level: int = logging.WARNING, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-REFUSAL_LOG_INTERVAL_S, 0))
            if now - last < REFUSAL_LOG_INTERVAL_S:
                self._last[key] = (last, suppressed + 1)
                return
            if len(self._last) > 4096:
                self._last.clear()
            self._last[key] = (now, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        log_event(log, event, level=level, **fields)


class TokenBucket:
    """At most ``rate`` events a second on average (bursts up to one second's worth): ``wait``
    sleeps the caller's thread until the next event is due. One per association, so a peer that
    loops a request slows only itself."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self._tokens = self.capacity
        self._at = time.monotonic()

    def wait(self) -> float:
        """Take one token; returns the seconds slept for it."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        delay = (1.0 - self._tokens) / self.rate
        time.sleep(delay)
        self._tokens, self._at = 0.0, time.monotonic()
        return delay


@dataclass
class Slot:
    """An admitted association: where from, and when it last did work (a C-STORE)."""

    address: str
    admitted_at: float
    last_work: float = 0.0
    working: int = 0  # C-STORE handlers running

    def busy(self, assoc: Association) -> bool:
        """A C-STORE is handled, or its data set is arriving."""
        return bool(self.working or getattr(assoc.dimse, "receiving", False))

    def idle_s(self, assoc: Association, now: float) -> float:
        """Seconds without work (0 while busy)."""
        return 0.0 if self.busy(assoc) else now - max(self.admitted_at, self.last_work)


class ConnectionGate:
    """Connection and association admission shared by every listener of one node."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._connections: Counter[str] = Counter()
        self._admitted: dict[Association, Slot] = {}
        self.lines = LogLimiter()

    def log_refusal(self, host: str, reason: str, **fields: Any) -> None:
        """One ``connection_refused`` line per peer address and limit every REFUSAL_LOG_INTERVAL_S,
        with the number suppressed since: a connection flood must not become a log flood."""
        self.lines.log((host, reason.split(" (")[0]), "connection_refused", peer=host, reason=reason, **fields)

    # -------------------------------------------------------------- TCP connections
    def open_connection(self, host: str) -> str | None:
        """Count a new connection; the reason it is refused, or None."""
        with self._lock:
            if self._connections[host] >= self.limits.max_connections_per_address:
                return (f"max_connections_per_address ({self.limits.max_connections_per_address}) "
                        f"reached for {host}")
            if sum(self._connections.values()) >= self.limits.max_connections:
                return (f"connection limit reached (max_associations {self.limits.max_associations} "
                        f"+ max_pending_connections {self.limits.max_pending_connections})")
            self._connections[host] += 1
            return None

    def close_connection(self, host: str) -> None:
        with self._lock:
            self._connections[host] -= 1
            if self._connections[host] <= 0:
                del self._connections[host]

    def connections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._connections)

    # -------------------------------------------------------------- associations
    def admitted(self) -> int:
        with self._lock:
            self._prune()
            return len(self._admitted)

    def _prune(self) -> None:
        self._admitted = {a: slot for a, slot in self._admitted.items()
                          if a.is_alive() and not (a.is_released or a.is_aborted or a.is_rejected)}

    @contextmanager
    def working(self, assoc: Association) -> Iterator[None]:
        """Around a C-STORE handler: the association is doing work, not holding a slot idle."""
        slot = self._admitted.get(assoc)
        if slot is None:
            yield
            return
        slot.working += 1
        try:
            yield
        finally:
            slot.working -= 1
            slot.last_work = time.monotonic()

    def _victim(self, mine: int, now: float) -> Association | None:
        """The association to give up its slot to a newcomer whose address holds ``mine``: one
        not in a C-STORE, from an address holding at least ``mine + 2`` (fair share), or idle for
        idle_association_s; the address holding the most first, then the longest idle."""
        held = Counter(slot.address for slot in self._admitted.values())
        free = []
        for a, slot in self._admitted.items():
            idle = slot.idle_s(a, now)
            if not slot.busy(a) and (held[slot.address] >= mine + 2 or idle >= self.limits.idle_association_s):
                free.append((held[slot.address], idle, a))
        return max(free, key=lambda c: (c[0], c[1]))[2] if free else None

    def on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: admit the association (when every slot is taken, in the slot of one that
        gives it up, :meth:`_victim`) or reject it (transient, local limit exceeded)."""
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted:
            return  # refused by an earlier handler (calling AE pinned to another host)
        rq = assoc.requestor
        host = str(rq.address)
        now = time.monotonic()
        reason: str | None = None
        victim: Association | None = None
        lost: Slot | None = None
        with self._lock:
            self._prune()
            mine = sum(1 for slot in self._admitted.values() if slot.address == host)
            if mine >= self.limits.max_associations_per_address:
                reason = f"max_associations_per_address ({self.limits.max_associations_per_address}) reached for {host}"
            elif len(self._admitted) >= self.limits.max_associations:
                victim = self._victim(mine, now)
                if victim is None:
                    reason = f"max_associations ({self.limits.max_associations}) reached"
                else:
                    lost = self._admitted.pop(victim)
            if reason is None:
                self._admitted[assoc] = Slot(host, now)
        if victim is not None and lost is not None:
            self.lines.log((lost.address, "evicted"), "association_evicted", peer=lost.address,
                           idle_s=round(lost.idle_s(victim, now), 1), for_peer=host,
                           reason="every slot taken: slot given to a peer holding fewer, or idle too long")
            victim.dul.request_abort(f"association slot given to {host}")  # a GuardedDUL, like every admitted one
        if reason is not None:
            self.lines.log((host, reason.split(" (")[0]), "association_rejected",
                           calling_ae=str(rq.primitive.calling_ae_title).strip(), peer=host, reason=reason,
                           result="rejected-transient")
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit
            assoc.kill()

    def on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._admitted.pop(event.assoc, None)


class GuardedRequestHandler(RequestHandler):
    """One thread per connection: TLS handshake under the request deadline, the association with a
    :class:`GuardedDUL`, and the connection count released when the association thread ends."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        gate = self.server.gate
        host = str(self.client_address[0])
        deadline = time.monotonic() + gate.limits.acse_timeout_s
        sock = self.request
        try:
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.settimeout(gate.limits.acse_timeout_s)
                    sock.do_handshake()
                except (OSError, ValueError) as exc:  # ssl.SSLError, timeout and resets are OSErrors
                    why = "no TLS handshake within acse_timeout_s" if isinstance(exc, TimeoutError) else \
                        f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
                    gate.log_refusal(host, why, listener=self.server.listener)
                    return
            sock.settimeout(gate.limits.network_timeout_s)
            assoc = self._create_association_guarded(deadline)
            done = self.server.prepare(assoc) if self.server.prepare is not None else None
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            try:
                assoc.start()
                assoc.join()
            finally:
                if done is not None:
                    done()
        finally:
            gate.close_connection(host)
            try:
                sock.close()
            except OSError:
                pass

    def _create_association_guarded(self, deadline: float) -> Association:
        assoc = super()._create_association()
        plain = assoc.dul
        dul = GuardedDUL(assoc, self.server.gate.limits, deadline)
        dul.socket = plain.socket
        while not plain.event_queue.empty():  # Evt5, put by the AssociationSocket on creation
            dul.event_queue.put(plain.event_queue.get())
        assoc.dul = dul
        assoc.acse_timeout = assoc.acse_timeout  # the setters arm the new DUL's ARTIM and idle timers
        assoc.network_timeout = assoc.network_timeout
        return ReactiveAssociation.adopt(assoc, dul)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with :class:`ConnectionGate` admission and a non-blocking
    accept loop (the TLS handshake is deferred to the connection's thread)."""

    daemon_threads = True
    block_on_close = False  # connection threads live as long as their association
    # socketserver's listen backlog is 5: a burst of connections (an attack, or a router opening
    # several associations) overflows it and the kernel drops SYNs, delaying legitimate peers by 1-3 s.
    request_queue_size = 128

    def __init__(self, ae: AE, address: tuple[str, int], ae_title: str, contexts: list[Any],
                 ssl_context: ssl.SSLContext | None = None, evt_handlers: list[Any] | None = None, *,
                 gate: ConnectionGate, listener: str = "dicom", reuse_port: bool = False,
                 prepare: Callable[[Association], Callable[[], None]] | None = None) -> None:
        self.gate = gate
        self.listener = listener
        self.reuse_port = reuse_port
        self.prepare = prepare  # installs per-association machinery; returns what to run at its end
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)
        # Bound after the caller's handlers: a calling AE refused for its host is never counted.
        self.bind(evt.EVT_REQUESTED, gate.on_requested)
        for event in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED):
            self.bind(event, gate.on_closed)

    def server_bind(self) -> None:
        """pynetdicom's bind, plus SO_REUSEPORT when several receiver processes share the port
        (``node.reuse_port``; each process has its own gate, so the limits apply per process)."""
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        reason = self.gate.open_connection(host)
        if reason is not None:
            self.gate.log_refusal(host, reason, listener=self.listener)
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("unexpected error on a connection from %s", client_address[0])


def tls_peer(assoc: Association) -> dict[str, Any]:
    """Protocol, cipher suite and peer certificate subject of a TLS association ({} for plain TCP)."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    cert = sock.getpeercert() or {}
    subject = dict(item[0] for item in cert.get("subject", ()))
    cipher = sock.cipher()
    return {"tls": sock.version(), "cipher": cipher[0] if cipher else None,
            "peer_certificate": subject.get("commonName")}


def start_server(ae: AE, address: tuple[str, int], handlers: list[Any], gate: ConnectionGate,
                 ssl_context: ssl.SSLContext | None = None, listener: str = "dicom",
                 reuse_port: bool = False,
                 prepare: Callable[[Association], Callable[[], None]] | None = None) -> GuardedAssociationServer:
    """Start a guarded listener in a daemon thread (what ``AE.start_server(block=False)`` does).
    ``prepare`` is called with each association before it starts (the node's data set spooling,
    :mod:`dicom_node.receive.incoming`) and returns what to call when its thread has ended."""
    # pynetdicom's own limit counts every acceptor thread (half-open ones too); the gate enforces
    # the real one, so this only has to stay above what the gate lets in.
    ae.maximum_associations = gate.limits.max_connections + 1
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers,
                            server_class=GuardedAssociationServer, gate=gate, listener=listener,
                            reuse_port=reuse_port, prepare=prepare)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
    thread.start()
    ae._servers.append(server)  # so AE.shutdown()/active_associations see it, as start_server does
    return server


def no_delay(assoc: Any) -> None:
    """Switch Nagle's algorithm off on the association's TCP socket (both roles: the SCU sending
    series, the SCP answering every C-STORE).

    A C-STORE is a small command PDU followed by data PDUs. With Nagle on, the peer's delayed ACK
    holds the next small segment for up to ~40 ms per instance, which capped sending to a local
    Orthanc at ~20 instances/s (DCMTK peers need ``TCP_NODELAY=1`` for the same reason, see
    DEVELOPERS.md). pynetdicom does not set it, so it is set on the connected socket here."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket, or already closed: sending still works, only slower
        log.debug("TCP_NODELAY not set: %s", exc)
