"""CallThreads: the controller's kept threads for a gang's calls."""

from __future__ import annotations

import threading
import time

import pytest

from fray_tpu.supervisor.attempt import CallThreads

DEADLINE_SECONDS = 10.0


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_calls_run_at_once_on_threads_kept_for_the_next_calls_and_errors_reach_the_waiter():
    """Four calls run at the same time (each waits for all four to have started); the next four
    run on the same threads (no new thread); a call's exception is raised by its result()."""
    threads = CallThreads(idle_seconds=60.0)
    names: list[int] = []
    barrier = threading.Barrier(4, timeout=DEADLINE_SECONDS)

    def call(value: int) -> int:
        barrier.wait()
        names.append(threading.get_ident())
        return value * 2

    first = [threads.submit(lambda v=v: call(v)) for v in range(4)]
    assert [p.result() for p in first] == [0, 2, 4, 6]
    used = set(names)
    names.clear()
    second = [threads.submit(lambda v=v: call(v)) for v in range(4)]
    assert [p.result() for p in second] == [0, 2, 4, 6]
    assert set(names) == used

    def fail() -> None:
        raise ValueError("the host refused")

    with pytest.raises(ValueError, match="the host refused"):
        threads.submit(fail).result()


def test_a_thread_idle_for_its_idle_time_ends():
    """Idle threads do not stay forever."""
    before = threading.active_count()
    threads = CallThreads(idle_seconds=0.05)
    assert threads.submit(lambda: 1).result() == 1
    wait_until(lambda: threading.active_count() == before, "the idle call thread to end")
