"""The per-job loop, common to TPU gangs and CPU replicas: run an attempt, judge it, decide,
then finish or retry. Subclasses say how an attempt runs (``tpu.TpuJobSupervisor``,
``local.LocalJobSupervisor``).

Every path out of ``run`` ends the job with a status and releases what it holds.
"""

from __future__ import annotations

import logging
import threading
import time

from fray_tpu.decisions import Action, AttemptVerdict, RetryLimits, decide
from fray_tpu.errors import FrayTpuError
from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.records import JobRecord
from fray_tpu.planning import JobPlan
from fray_tpu.supervisor.attempt import AttemptRun, JobDetached, follow_attempt
from fray_tpu.supervisor.phases import JobPhase
from fray_tpu.supervisor.watch import PROGRESS_PREFIX, GangWatch, TaskSlot

log = logging.getLogger(__name__)


class JobStopped(Exception):
    """terminate() was called; unwinds provisioning."""


class JobSupervisor(threading.Thread):
    """The retry loop common to every job; subclasses run attempts."""

    stop_gang_on_failure = True  # the first task that does not succeed stops the others
    outlives_controller = False  # True: detach() leaves it running for a later controller

    def __init__(self, record: JobRecord, plan: JobPlan, slots: list[TaskSlot], poll_interval: float):
        super().__init__(name=f"supervisor-{record.job_id}", daemon=True)
        self.record = record
        self.plan = plan
        self.slots = slots
        self.poll_interval = poll_interval
        self.stop_requested = threading.Event()
        self.detach_requested = threading.Event()
        self.limits = RetryLimits(max_failures=plan.max_failures, max_preemptions=plan.max_preemptions)

    def terminate(self) -> None:
        self.stop_requested.set()

    def detach(self) -> None:
        """Stop supervising without touching the job: no status, no cancel, no release. A
        controller that opens the same state directory later reattaches to it."""
        self.detach_requested.set()
        self.stop_requested.set()  # unwinds waits; the detach flag keeps them from stopping the job

    def progress(self, line: str) -> None:
        log.info("job %s: %s", self.record.job_id, line)
        self.record.append_lines([PROGRESS_PREFIX + line])

    def run(self) -> None:
        try:
            self.setup()
            status, error = self.run_attempts()
        except (JobStopped, JobDetached):
            if self.detach_requested.is_set():
                self.let_go()
                return
            status, error = JobStatus.STOPPED, None
        except FrayTpuError as e:
            status, error = JobStatus.FAILED, str(e)
        except Exception as e:  # noqa: BLE001 - the job must end with a status, never hang
            log.exception("supervisor of job %s crashed", self.record.job_id)
            status, error = JobStatus.FAILED, f"fray-tpu internal error: {type(e).__name__}: {e}"
        self.finish(status, error)

    def finish(self, status: JobStatus, error: str | None) -> None:
        if status is JobStatus.STOPPED:
            for i, task in enumerate(self.record.info().tasks):
                if not JobStatus.finished(task.status):
                    self.record.set_task(i, JobStatus.STOPPED)
        # The status is final once the user's processes are gone; slices are deleted after
        # it (wait_released() / shutdown() wait for that), so terminate() is prompt.
        self.record.set_phase(JobPhase.ended(status))
        self.record.set_status(status, error)
        self.progress(f"job {status}" + (f": {error}" if error else ""))
        try:
            self.release_everything()
        except Exception:  # noqa: BLE001 - logged; `fray-tpu gc` finds leftovers by label
            log.exception("releasing the resources of job %s failed", self.record.job_id)

    def run_attempts(self) -> tuple[JobStatus, str | None]:
        counters = self.record.counters
        while True:
            if self.stop_requested.is_set():
                raise JobStopped
            counters.attempts += 1
            attempt = counters.attempts
            verdict = self.run_one_attempt(attempt)
            decision = decide(self.limits, counters, verdict)
            if decision.action is Action.SUCCEED:
                return JobStatus.SUCCEEDED, None
            if decision.action is Action.STOP:
                raise JobStopped
            if decision.action is Action.FAIL:
                return JobStatus.FAILED, decision.reason
            self.progress(f"attempt {attempt} ended ({verdict.outcome.value}); retrying: {decision.reason}")
            self.prepare_retry(decision.replace_slices)

    def follow(self, run: AttemptRun) -> AttemptVerdict:
        """Watch a started attempt until every task has ended."""
        watch = GangWatch(self.slots, gang=self.stop_gang_on_failure, clock=time.monotonic, poll_interval=self.poll_interval)
        return follow_attempt(self.record, run, watch, self.stop_requested, self.poll_interval,
                              detach=self.detach_requested)

    def setup(self) -> None:
        """First thing on the supervisor's thread (constructors start nothing, write nothing)."""

    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        raise NotImplementedError

    def prepare_retry(self, replace_slices: frozenset[int]) -> None:
        """Between attempts; TPU jobs replace lost slices here."""

    def release_everything(self) -> None:
        """Runs on every exit path but a detach."""

    def let_go(self) -> None:
        """Runs when the supervisor detached: drop connections and threads, keep every resource."""
