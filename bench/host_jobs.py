"""The benchmarks' job functions. A benchmark copies this file into its job's workspace and
imports it from there (``benchlib.load_host_jobs``), so fray-tpu pickles the functions by
reference and they load on the hosts' own Python (the emulator's default image runs Python 3.10,
this controller 3.11). Ray, whose workers do not see the workspace, pickles them by value.""" 

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

HOSTS = 4
HOST_BLOCK_SECONDS = 60.0  # how long a blocking job function waits for its go file


def _stamp(path: Path, value: float) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(repr(value))
    os.replace(partial, path)


def record_start(out_dir: str, tag: str) -> None:
    """Write when user code started on this host, as ``TAG-TASKINDEX``."""
    _stamp(Path(out_dir) / f"{tag}-{os.environ['FRAY_TASK_INDEX']}", time.time())


def fail_first_attempts(out_dir: str, failures: int) -> None:
    """Record this attempt's start (tagged by attempt id); task 0 fails the first ``failures``
    attempts (counted with one exclusively created file per attempt) once all hosts run,
    stamping when it raises."""
    started = time.time()
    directory = Path(out_dir)
    attempt_id = os.environ["FRAY_TPU_ATTEMPT_ID"]
    _stamp(directory / f"start-{attempt_id}-{os.environ['FRAY_TASK_INDEX']}", started)
    if os.environ["FRAY_TASK_INDEX"] != "0":
        return
    for attempt in range(1, failures + 2):
        try:
            with open(directory / f"attempt-{attempt}", "x"):
                break
        except FileExistsError:
            continue
    if attempt <= failures:
        # Fail only once every host of this attempt runs: a gang whose first task fails at once
        # is stopped before the others start, and then there is no "all 4 running" to measure.
        deadline = time.monotonic() + HOST_BLOCK_SECONDS
        while len(list(directory.glob(f"start-{attempt_id}-*"))) < HOSTS and time.monotonic() < deadline:
            time.sleep(0.005)
        _stamp(directory / f"fail-{attempt_id}", time.time())
        raise RuntimeError(f"failing attempt {attempt} on purpose")


def block_then_record(out_dir: str, marker: str) -> None:
    """First attempt: record the start, then wait (bounded) to be preempted. Once ``marker``
    exists (written by the driver before preempting), record the start and return."""
    second = os.path.exists(marker)
    record_start(out_dir, "recovered" if second else "running")
    if second:
        return
    deadline = time.monotonic() + HOST_BLOCK_SECONDS
    pause = threading.Event()
    while time.monotonic() < deadline and not pause.wait(0.05):
        pass
    raise SystemExit("never preempted")


def gang_member(out_dir: str, tag: str, index: int | None = None) -> int:
    """Record when this process started running user code, then a tiny computation."""
    started = time.time()
    if index is None:
        index = int(os.environ["FRAY_TASK_INDEX"])
    path = Path(out_dir) / f"{tag}-{index}"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(repr(started))
    os.replace(partial, path)
    return index + sum(i * i for i in range(10_000)) % 7


def fail_once_then_run(out_dir: str) -> None:
    """Attempt 1: task 0 stamps ``raise`` and raises at once. Every attempt's tasks stamp their
    start as ``start-ATTEMPT_ID``."""
    attempt_id = os.environ["FRAY_TPU_ATTEMPT_ID"]
    gang_member(out_dir, f"start-{attempt_id}")
    if os.environ["FRAY_TASK_INDEX"] != "0":
        return
    try:
        with open(Path(out_dir) / "failed-once", "x"):
            pass
    except FileExistsError:
        return
    (Path(out_dir) / "raise").write_text(repr(time.time()))
    raise RuntimeError("first attempt fails on purpose (warm-attempt benchmark)")
