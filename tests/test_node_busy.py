"""BusyMeter: the share of the last window the receiver's handlers ran (streaming waits above
SATURATED). Times are passed explicitly where the arithmetic is checked."""
from __future__ import annotations

import threading
import time

import pytest

from dicom_node.receive import busy
from dicom_node.receive.busy import BusyMeter


def test_fraction_counts_only_the_window_and_caps_at_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(busy.time, "monotonic", lambda: clock[0])
    m = BusyMeter(window_s=1.0)
    for start in (98.0, 99.5, 99.8):  # 0.1 s handlers: the first is outside the window
        clock[0] = start
        m.begin()
        clock[0] = start + 0.1
        m.end()
    assert m.fraction(now=100.0) == pytest.approx(0.2)
    assert m.fraction(now=100.55) == pytest.approx(0.15)  # half of the one at 99.5 is still in the window
    assert m.fraction(now=100.65) == pytest.approx(0.1)  # now it has left
    assert m.fraction(now=101.0) == 0.0
    clock[0] = 101.0
    m.begin()  # a handler still running counts up to now
    assert m.fraction(now=101.4) == pytest.approx(0.4)
    assert not m.saturated() and m.fraction(now=101.0) == 0.0
    clock[0] = 101.5
    assert m.saturated()
    m.end()


def test_concurrent_handlers_add_up() -> None:
    m = BusyMeter(window_s=0.5)
    go = threading.Barrier(4)

    def handler() -> None:
        go.wait()
        m.begin()
        time.sleep(0.2)
        m.end()
    threads = [threading.Thread(target=handler) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 4 x 0.2 s in a 0.5 s window: 1.0 when they overlap; one handler alone is at most 0.4, so
    # more than that shows concurrent handlers add up (robust to threads starting late)
    assert m.fraction() > 0.45
    assert m.saturated()
    time.sleep(0.6)
    assert m.fraction() == 0.0 and not m.saturated()
