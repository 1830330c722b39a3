"""The per-attempt buffer: bounded, never blocking a host's reader, counting what it drops; and a
job printing far faster than the journal can write keeps the controller's memory flat."""

from __future__ import annotations

import threading
import time
import tracemalloc

from fray_tpu.attempt_events import AttemptExit, AttemptStarted, Classification, LogBatch
from fray_tpu.decisions import AttemptOutcome
from fray_tpu.supervisor.attempt import AttemptBuffer, AttemptRun, follow_attempt
from fray_tpu.supervisor.records import JobRecord
from fray_tpu.supervisor.watch import GangWatch, LinesDropped, TaskSlot

OK = AttemptExit(code=0, signal=None, classification=Classification.OK, stderr_tail="")


def batch(lines: int, width: int = 10) -> LogBatch:
    return LogBatch("stdout", ["x" * width for _ in range(lines)], 0.0)


def test_output_over_the_bound_is_dropped_and_counted_but_exits_are_kept():
    """Past the byte bound, log batches are dropped (counted per task, reported first); an exit always fits."""
    buffer = AttemptBuffer(max_bytes=1000, max_events=100)
    for _ in range(20):
        buffer.put(0, batch(2))  # 2 * (10 + 64) bytes each: 6 fit
    buffer.put(1, batch(5))
    buffer.put(0, OK)
    assert buffer.peak_bytes <= 1000 + 64
    assert buffer.get(0) == (0, LinesDropped(28))
    assert buffer.get(0) == (1, LinesDropped(5))
    kept = []
    while (item := buffer.get(0)) is not None:
        kept.append(item)
    assert [index for index, _ in kept] == [0] * 7
    assert kept[-1] == (0, OK)
    assert buffer.dropped_lines == 33


def test_the_event_count_bounds_too():
    """Many small batches are bounded by count as well as bytes."""
    buffer = AttemptBuffer(max_bytes=1 << 30, max_events=3)
    for _ in range(5):
        buffer.put(0, batch(1, width=0))
    assert buffer.get(0) == (0, LinesDropped(2))


def test_get_times_out_on_an_empty_buffer():
    """An empty buffer answers None after the timeout instead of blocking the watch loop."""
    start = time.monotonic()
    assert AttemptBuffer().get(0.05) is None
    assert time.monotonic() - start >= 0.05


class SlowJournal:
    """A journal on a slow disk: every output write takes 2 ms."""

    def __init__(self) -> None:
        self.lines_written = 0
        self.notices: list[str] = []  # what the controller itself wrote

    def append_output(self, job_id, lines) -> None:
        time.sleep(0.002)
        self.lines_written += len(lines)
        self.notices += [line for line in lines if "[fray-tpu]" in line]

    def update_job(self, job_id, **fields) -> None:
        pass


class ChattyRun(AttemptRun):
    """One host printing as fast as it can: fresh 1 kB lines, 100 per batch, then a clean exit."""

    def __init__(self, batches: int, max_bytes: int):
        super().__init__()
        self.events = AttemptBuffer(max_bytes=max_bytes)
        self.lines_printed = 0
        self._batches = batches

    def start(self) -> None:
        threading.Thread(target=self._print, daemon=True).start()

    def _print(self) -> None:
        self.events.put(0, AttemptStarted(pid=1, timestamp=0))
        for b in range(self._batches):
            lines = [f"{b:06d}-{i:03d} " + "y" * 1000 for i in range(100)]
            self.lines_printed += len(lines)
            self.events.put(0, LogBatch("stdout", lines, 0.0))
        self.events.put(0, OK)

    def cancel_all(self, reason: str) -> None:
        raise AssertionError(f"a clean attempt is not cancelled ({reason})")


def test_a_job_printing_faster_than_the_journal_keeps_memory_flat_and_reports_drops():
    """200 MB of output against a 2 ms-per-write journal: the controller's traced memory stays
    within a few MB (buffer + output ring), the job still succeeds, and its output says exactly
    how many lines were dropped."""
    journal = SlowJournal()
    record = JobRecord("job-chatty", "chatty", ["slice-0/worker-0"], journal, log_capacity=1000)
    run = ChattyRun(batches=2000, max_bytes=1 << 20)
    slots = [TaskSlot(0, 0, 0, "slice-0/worker-0")]
    watch = GangWatch(slots, gang=True, clock=time.monotonic, poll_interval=0.2)
    tracemalloc.start()
    try:
        run.start()
        verdict = follow_attempt(record, run, watch, threading.Event(), poll_interval=0.2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.outcome is AttemptOutcome.SUCCEEDED
    produced_bytes = run.lines_printed * 1011
    assert produced_bytes > 200e6
    assert peak < 12e6, f"peak traced memory {peak / 1e6:.1f} MB for {produced_bytes / 1e6:.0f} MB of output"
    assert run.events.dropped_lines > 0
    drops = [line for line in journal.notices if "output line(s) dropped" in line]
    reported = sum(int(line.split("[fray-tpu] ")[1].split()[0]) for line in drops)
    assert reported == run.events.dropped_lines
    job_lines = journal.lines_written - len(journal.notices)
    assert job_lines + reported == run.lines_printed
