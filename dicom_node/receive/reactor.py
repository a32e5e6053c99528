"""Event-driven reactors for the SCP's associations: wait for work instead of polling every 1 ms.

Each pynetdicom association runs two threads that poll: the DUL reactor sleeps 1 ms whenever it
found nothing to do (socket not readable, nothing to send), and the association reactor sleeps
1 ms before every look at the DIMSE queue (pynetdicom's own TODO: "make this event based"). Each
idle association so costs about a tenth of a core (``python -m bench.bench_reactor``), and four
busy ones spend a share of their CPU waking up to find nothing.

Here both threads block until there is work, with the same steps in the same order as
pynetdicom's loops:

- :class:`ReactiveDUL` waits in ``select`` on the association's socket and on a wake-up socket
  that any other thread's ``send_pdu``/``kill_dul`` (or an event put on its queues) writes to;
  a TLS socket's already-decrypted bytes count as readable.
- :class:`ReactiveAssociation` waits on an event set whenever the DUL completes a DIMSE message
  or queues an A-RELEASE/A-ABORT for it, and when the DUL thread ends.

Both still wake every :data:`IDLE_WAIT_S` to check their timers (ARTIM, network timeout): those
fire at most that much later than pynetdicom's polling would notice them.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

IDLE_WAIT_S = 0.05  # longest wait between two checks of a reactor's timers


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``on_put`` after each item is added: the reactor that reads it wakes."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class ReactiveDUL(DULServiceProvider):
    """pynetdicom's DUL reactor loop, blocking in ``select`` while there is nothing to do."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.event_queue = WakingQueue(self._wake)
        self.to_provider_queue = WakingQueue(self._wake)
        self.on_end: Callable[[], None] = lambda: None  # the association's wake-up (set by the handler)

    def _wake(self) -> None:
        """Interrupt the reactor's wait; a no-op from the reactor's own thread (it is not waiting)."""
        if threading.get_ident() == self.ident:
            return
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # buffer full (a wake-up is pending anyway) or closed
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()  # the reactor may be in its wait: it stops now, not IDLE_WAIT_S later
        return super().stop_dul()

    def _between_events(self) -> None:
        """Work other threads asked this reactor to do in its own thread (none here)."""

    def _wait_for_work(self) -> None:
        """Until the socket is readable, another thread queued work, or IDLE_WAIT_S passed."""
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or not self.socket._is_connected:
            time.sleep(self._run_loop_delay)  # no transport (yet, or any more): as pynetdicom
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes that select cannot see
        try:
            ready, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # closed under us: the next readiness check reports it
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom's loop (ARTIM check, then send one primitive or read one PDU, then one FSM
        event), waiting in :meth:`_wait_for_work` where it slept 1 ms."""
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    idle = True
                if idle:
                    self._wait_for_work()
                self._between_events()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:  # noqa: BLE001 - as pynetdicom: abort, bypassing the state machine
                    self._abort_on_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            for s in (self._wake_r, self._wake_w):
                s.close()
            self.on_end()

    def _abort_on_error(self) -> None:
        logging.getLogger("pynetdicom").exception("Exception in DUL.run(), aborting association")
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            self.socket.send(abort_pdu.encode())
        except Exception:  # noqa: BLE001 - the transport may be gone already
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class ReactiveAssociation(Association):
    """An acceptor whose reactor waits for a DIMSE message or an ACSE primitive instead of
    polling every 1 ms; the checks after each wake-up are pynetdicom's, in its order."""

    _wake_event: threading.Event

    @classmethod
    def adopt(cls, assoc: Association, dul: ReactiveDUL) -> ReactiveAssociation:
        """Make a freshly created (not started) acceptor and its DUL reactive: the queues the
        reactor reads wake it when the DUL adds to them."""
        assoc.__class__ = cls
        me: ReactiveAssociation = assoc  # type: ignore[assignment]
        me._wake_event = threading.Event()
        me.dimse.msg_queue = WakingQueue(me._wake_event.set)
        dul.to_user_queue = WakingQueue(me._wake_event.set)
        dul.on_end = me._wake_event.set
        return me

    def kill(self) -> None:
        self._wake_event.set()
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        idle = True
        while not self._kill:
            if idle:
                self._wake_event.wait(IDLE_WAIT_S)
            self._wake_event.clear()  # anything queued from here on sets it again
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            idle = not msg
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                self._trigger("EVT_RELEASED")
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                self._trigger("EVT_ABORTED")
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _trigger(self, name: str) -> None:
        from pynetdicom import evt

        evt.trigger(self, getattr(evt, name), {})
