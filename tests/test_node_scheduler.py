"""The scheduler's wake: a step woken while it runs runs once more when it ends (not skipped)."""
from __future__ import annotations

import threading

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.app.scheduler import _Waker


def test_wake_while_running_runs_the_step_once_more() -> None:
    waker = _Waker(BackgroundScheduler())
    runs: list[int] = []
    inside = threading.Event()
    release = threading.Event()

    def step() -> None:
        runs.append(1)
        if len(runs) == 1:
            inside.set()
            release.wait(5)
    run = waker.step("process", step)
    t = threading.Thread(target=run)
    t.start()
    assert inside.wait(5)
    waker.wake("process")  # while the first run is inside the step
    waker.wake("process")  # several wakes: one more run
    release.set()
    t.join(5)
    assert len(runs) == 2
    run()  # not woken: one run
    assert len(runs) == 3
