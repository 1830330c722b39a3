"""What the controller knows about one job: its status, tasks, counters and recent output.

Thread-safe; written by the job's supervisor, read by poll/monitor/list_jobs. The output is a
bounded ring (a job runs for days): ``monitor`` reads from a cursor and is told how many lines
it missed if it fell behind, instead of the controller's memory growing without end.

Every change is written through to the job's journal, so a controller that restarts on the
same state directory sees the job as it was.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fray_tpu.decisions import JobCounters
from fray_tpu.fray_api import JobId, JobInfo, JobStatus, TaskStatus
from fray_tpu.supervisor.phases import JobPhase, next_phase

if TYPE_CHECKING:
    from fray_tpu.state.journal import Journal, JobRow

DEFAULT_LOG_CAPACITY = 200_000


@dataclass(frozen=True)
class LogChunk:
    lines: list[str]
    next_cursor: int
    missed: int


class JobRecord:
    def __init__(self, job_id: JobId, name: str, task_names: list[str], journal: Journal,
                 log_capacity: int = DEFAULT_LOG_CAPACITY):
        self.job_id = job_id
        self.journal = journal
        self.name = name
        self.created = time.time()
        self.task_names = list(task_names)
        self.counters = JobCounters()
        self._status = JobStatus.PENDING
        self._tasks = [TaskStatus(status=JobStatus.PENDING) for _ in task_names]
        self._error: str | None = None
        self._phase = JobPhase.PENDING
        self._lines: deque[str] = deque(maxlen=log_capacity)
        self._appended = 0  # lines ever appended; the ring holds the last len(self._lines)
        self._changed = threading.Condition()

    # -- written by the supervisor -------------------------------------------------------
    def set_phase(self, phase: JobPhase) -> None:
        with self._changed:
            self._phase = phase = next_phase(self._phase, phase)
            self._changed.notify_all()
        self._save(phase=str(phase), counters=dataclasses.asdict(self.counters))

    def set_status(self, status: JobStatus, error: str | None = None) -> None:
        with self._changed:
            if JobStatus.finished(self._status):
                return  # a finished job stays finished
            self._status = status
            if error is not None:
                self._error = error
            self._changed.notify_all()
        finished = time.time() if JobStatus.finished(status) else None
        self._save(status=str(status), error_message=self._error, finished=finished,
                   counters=dataclasses.asdict(self.counters), task_statuses=self._task_rows())

    def set_task(self, index: int, status: JobStatus, error: str | None = None) -> None:
        with self._changed:
            self._tasks[index] = TaskStatus(status=status, error_message=error)
            self._changed.notify_all()
        self._save(task_statuses=self._task_rows())

    def set_tasks(self, updates: Mapping[int, tuple[JobStatus, str | None]]) -> None:
        """Several tasks' states, in one journal write."""
        with self._changed:
            for index, (status, error) in updates.items():
                self._tasks[index] = TaskStatus(status=status, error_message=error)
            self._changed.notify_all()
        self._save(task_statuses=self._task_rows())

    def set_attempt(self, attempt: int, attempt_id: str | None) -> None:
        self._save(attempt=attempt, attempt_id=attempt_id, counters=dataclasses.asdict(self.counters))

    def append_lines(self, lines: Iterable[str]) -> None:
        with self._changed:
            lines = list(lines)
            for line in lines:
                self._lines.append(line)
                self._appended += 1
            self._changed.notify_all()
        if lines:
            self.journal.append_output(self.job_id, lines)

    def _task_rows(self) -> list[tuple[str, str | None]]:
        with self._changed:
            return [(str(t.status), t.error_message) for t in self._tasks]

    def _save(self, **fields) -> None:
        self.journal.update_job(self.job_id, **fields)

    @classmethod
    def from_row(cls, row: JobRow, journal: Journal) -> JobRecord:
        """A job as the journal last saw it (a restarted controller's view)."""
        record = cls(JobId(row.job_id), row.name, list(row.task_names), journal=journal)
        record.created = row.created
        record.counters = JobCounters.from_mapping(row.counters)
        record._status = JobStatus(row.status)
        record._error = row.error_message
        record._phase = JobPhase(row.phase)
        record._tasks = [TaskStatus(status=JobStatus(status), error_message=error) for status, error in row.task_statuses]
        return record

    # -- read by the cluster ---------------------------------------------------------------
    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def phase(self) -> JobPhase:
        return self._phase

    def info(self) -> JobInfo:
        with self._changed:
            return JobInfo(
                job_id=self.job_id,
                status=self._status,
                tasks=list(self._tasks),
                name=self.name,
                error_message=self._error,
            )

    def read_lines(self, cursor: int, timeout: float) -> LogChunk:
        """Lines from absolute index ``cursor`` on, waiting up to ``timeout`` for new ones."""
        with self._changed:
            if cursor >= self._appended and not JobStatus.finished(self._status):
                self._changed.wait(timeout)
            end = self._appended
            first = end - len(self._lines)
            start = max(cursor, first)
            lines = [self._lines[i - first] for i in range(start, end)]
            return LogChunk(lines=lines, next_cursor=end, missed=start - cursor)

    def wait_finished(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: JobStatus.finished(self._status), timeout)


@dataclass
class JobTable:
    """Every job this controller knows, by id."""

    _jobs: dict[str, JobRecord] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: JobRecord) -> None:
        with self._lock:
            self._jobs[record.job_id] = record

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._jobs.get(job_id)
        if record is None:
            raise KeyError(f"unknown job id {job_id!r}: this cluster knows {len(self._jobs)} job(s)")
        return record

    def all(self) -> list[JobRecord]:
        with self._lock:
            return list(self._jobs.values())
