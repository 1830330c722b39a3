"""One running attempt, as the supervisor follows it: a bounded buffer fed by one reader per
host, drained by ``follow_attempt`` into the gang watch, whose effects it executes.

Memory is bounded per attempt: when the job prints faster than the journal can take its output,
the buffer fills and further output lines are dropped and counted (the job's output then says
how many); starts, exits and errors are always kept, so the attempt's end is never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from fray_tpu import attempt_events as events
from fray_tpu.decisions import AttemptVerdict
from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.records import JobRecord
from fray_tpu.supervisor.phases import JobPhase
from fray_tpu.supervisor.watch import AllRunning, AppendLines, CancelGang, Effect, GangWatch, LinesDropped, SetTask

log = logging.getLogger(__name__)

ATTEMPT_BUFFER_BYTES = 16 << 20
ATTEMPT_BUFFER_EVENTS = 16_384
_LINE_OVERHEAD = 64  # bytes counted per buffered line beyond its text, so empty lines count too


def in_parallel(fn: Callable, items: Sequence, max_threads: int | None = None) -> list:
    """``[fn(item) for item in items]``, each on its own thread (with ``max_threads``, that many
    threads share the items: for short calls repeated on every host, such as lease renewals).

    Plain threads, not an executor: ``concurrent.futures`` refuses new work once the interpreter
    has begun to exit, which is exactly when the exit policy cancels gangs and deletes slices.
    Exceptions propagate to the caller after every call has finished.
    """
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    workers = len(items) if max_threads is None else min(len(items), max_threads)

    def run(first: int) -> None:
        for index in range(first, len(items), workers):
            try:
                results[index] = fn(items[index])
            except BaseException as error:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class Pending:
    """The result of a call handed to ``CallThreads``."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def run(self, fn: Callable[[], object]) -> None:
        """Compute the result (``result()`` waits for ``finished()``)."""
        try:
            self._value = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised by result() in the waiting thread
            self._error = error

    def finished(self) -> None:
        self._done.set()

    def result(self) -> object:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class CallThreads:
    """Threads kept for a controller's calls (a gang's Prepares): a call is handed to an idle
    thread, so sending a gang's calls costs no thread start each (a start waits until the
    new thread is scheduled, milliseconds apiece on a loaded machine); a thread idle for
    ``idle_seconds`` ends. Plain threads, for the reason ``in_parallel`` gives."""

    def __init__(self, idle_seconds: float = 60.0):
        self._tasks: queue.SimpleQueue[tuple[Callable[[], object], Pending]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call that no submitted call has claimed
        self._idle_seconds = idle_seconds

    def submit(self, fn: Callable[[], object]) -> Pending:
        pending = Pending()
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._tasks.put((fn, pending))
        if start:
            threading.Thread(target=self._work, daemon=True, name="gang-call").start()
        return pending

    def _work(self) -> None:
        while True:
            try:
                fn, pending = self._tasks.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # no call is on its way to this thread: end it
                        self._idle -= 1
                        return
                continue
            pending.run(fn)
            with self._lock:
                self._idle += 1  # before the result is seen: the caller's next call finds this thread
            pending.finished()


# The controller's kept threads for the short calls on a job's way to its start: a gang's
# Prepares, the journal writes made beside them.
CALL_THREADS = CallThreads()


def _size(event: object) -> int:
    if isinstance(event, events.LogBatch):
        return sum(len(line) + _LINE_OVERHEAD for line in event.lines)
    return _LINE_OVERHEAD


# Events taken from the buffer before their effects are written: bounded in count and in bytes,
# since what is taken no longer counts against the buffer's own bound while it is written.
MAX_EVENTS_PER_BATCH = 4096
MAX_BYTES_PER_BATCH = 1 << 20


class AttemptBuffer:
    """``(task_index, event)`` pairs from every host of one attempt, bounded in bytes and
    events. ``put`` never blocks, so a slow consumer stalls no reader and no exit waits behind
    output; output that does not fit is counted and reported as ``LinesDropped``."""

    def __init__(self, max_bytes: int = ATTEMPT_BUFFER_BYTES, max_events: int = ATTEMPT_BUFFER_EVENTS):
        self.max_bytes = max_bytes
        self.max_events = max_events
        self._items: deque[tuple[int, object, int]] = deque()
        self._bytes = 0
        self._dropped: dict[int, int] = {}
        self.peak_bytes = 0
        self.dropped_lines = 0
        self._cond = threading.Condition()

    def put(self, index: int, event: object) -> None:
        size = _size(event)
        with self._cond:
            full = len(self._items) >= self.max_events or self._bytes + size > self.max_bytes
            if full and isinstance(event, events.LogBatch):
                self._dropped[index] = self._dropped.get(index, 0) + len(event.lines)
                self.dropped_lines += len(event.lines)
                return
            self._items.append((index, event, size))
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cond.notify()

    def get(self, timeout: float) -> tuple[int, object] | None:
        """The next pair (a ``LinesDropped`` first when lines were dropped), or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items and not self._dropped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._dropped:
                index = min(self._dropped)
                return index, LinesDropped(self._dropped.pop(index))
            index, event, size = self._items.popleft()
            self._bytes -= size
            return index, event


class JobDetached(Exception):
    """The supervisor was detached: it lets go of a job that goes on running on its slices."""


class AttemptRun:
    """One running attempt: its hosts' readers put ``(task_index, event)`` into ``events``."""

    def __init__(self) -> None:
        self.events = AttemptBuffer()

    def cancel_all(self, reason: str) -> None:
        raise NotImplementedError

    def lost_slices(self) -> set[int]:
        """Slices observed lost (preempted, deleted) since the attempt started."""
        return set()

    def unresponsive_tasks(self) -> set[int]:
        """Tasks whose host has shown no sign of life for the liveness deadline."""
        return set()

    def close(self) -> None:
        """Stop reading the hosts (the attempt itself is stopped by ``cancel_all``)."""


def follow_attempt(record: JobRecord, run: AttemptRun, watch: GangWatch, stop: threading.Event,
                   poll_interval: float, *, detach: threading.Event | None = None) -> AttemptVerdict:
    """Feed the attempt's events to ``watch`` until every task has ended, executing its effects;
    ``JobDetached`` as soon as ``detach`` is set (the attempt goes on, unobserved)."""

    def apply(effects: list[Effect]) -> None:
        # Lines and task states are written as one journal transaction each per batch of events,
        # not one per host: a 256-host gang's start is one write, not 256 of a 256-task row.
        lines: list[str] = []
        tasks: dict[int, tuple[JobStatus, str | None]] = {}

        def flush() -> None:
            if lines:
                record.append_lines(lines)
                lines.clear()
            if tasks:
                record.set_tasks(tasks)
                tasks.clear()

        for effect in effects:
            match effect:
                case AppendLines(more):
                    lines.extend(more)
                case SetTask(index, status, error):
                    tasks[index] = (status, error)
                case AllRunning():
                    flush()
                    record.set_phase(JobPhase.RUNNING)
                    record.set_status(JobStatus.RUNNING)
                case CancelGang(reason):
                    flush()
                    threading.Thread(target=run.cancel_all, args=(reason,), daemon=True, name="cancel-gang").start()
        flush()

    while not watch.done:
        if detach is not None and detach.is_set():
            raise JobDetached
        if stop.is_set():
            apply(watch.stop_requested())
        if watch.observation_due():
            apply(watch.observed(run.lost_slices(), run.unresponsive_tasks()))
        apply(watch.tick())
        if watch.done:
            break
        item = run.events.get(timeout=min(poll_interval, 0.5))
        effects: list[Effect] = []
        taken_bytes = 0
        for _ in range(MAX_EVENTS_PER_BATCH):
            if item is None:
                break
            effects.extend(watch.event(*item))
            taken_bytes += _size(item[1])
            if watch.done or taken_bytes >= MAX_BYTES_PER_BATCH:
                item = None
                break
            item = run.events.get(timeout=0)
        else:
            if item is not None:
                effects.extend(watch.event(*item))
        apply(effects)
    return watch.verdict(run.lost_slices())
