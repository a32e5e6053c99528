"""How busy the receiver is: the share of the last second its C-STORE handlers were running.

Streaming (:mod:`dicom_node.process.stream`) standardizes slices while a series arrives, on the same
cores and, in one ``serve`` process, under the same interpreter lock as the receiver. When a
sender pushes as fast as the node can take instances, every model call slows receiving (``bench/bench_receive.py``
measures both), so the streamer waits while the
receiver is saturated and uses the gaps a paced sender (a scanner reconstructing) leaves.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator

WINDOW_S = 1.0
# At full speed about half of each C-STORE cycle is the node's handler (the other half is
# pynetdicom's PDU handling); a sender at 20 images/s keeps it near a tenth.
SATURATED = 0.25


class BusyMeter:
    """Intervals of handler work (from any association thread) over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._spans: deque[tuple[float, float]] = deque()
        self._open: dict[int, float] = {}  # thread id -> start of the handler running now

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the block (one handler call) as busy time."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        with self._lock:
            self._open[threading.get_ident()] = time.monotonic()

    def end(self) -> None:
        now = time.monotonic()
        with self._lock:
            start = self._open.pop(threading.get_ident(), None)
            if start is not None:
                self._spans.append((start, now))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._spans and self._spans[0][1] < now - self.window_s:
            self._spans.popleft()

    def fraction(self, now: float | None = None) -> float:
        """Handler time in the last window over the window (concurrent handlers add up; at most 1)."""
        now = time.monotonic() if now is None else now
        lo = now - self.window_s
        with self._lock:
            self._prune(now)
            spans = list(self._spans) + [(s, now) for s in self._open.values()]
        busy = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in spans)
        return min(1.0, busy / self.window_s)

    def saturated(self) -> bool:
        return self.fraction() >= SATURATED
