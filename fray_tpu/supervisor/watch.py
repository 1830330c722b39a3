"""The gang watch (pure, injected clock): fed an attempt's events, decides when it stops.

The shell (``attempt.follow_attempt``) feeds it every event from the hosts, what it observed
of the cloud (lost slices) and of the agents (silent hosts), and executes the effects it
returns: lines for the job's output, task statuses, one "cancel the gang". When every task has
an end, ``verdict()`` judges the attempt (``decisions.judge_attempt``).

``gang=True``: the first task that does not succeed stops every other task (a half-running TPU
gang deadlocks); CPU replicas (``gang=False``) run to their own ends instead.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fray_tpu import attempt_events as events
from fray_tpu.decisions import AttemptVerdict, TaskEnd, TaskOutcome, judge_attempt
from fray_tpu.fray_api import JobStatus
from fray_tpu.multislice import TaskSlot

CANCEL_GRACE_SECONDS = 5.0
# After cancelling a gang, how long hosts may take to report their exit before counting as lost.
CANCEL_REPORT_SECONDS = 30.0
# Lines the controller itself adds to a job's output (progress, retries), as opposed to the job's.
PROGRESS_PREFIX = "[fray-tpu] "

_OUTCOMES = {
    events.Classification.OK: TaskOutcome.SUCCEEDED,
    events.Classification.USER_FAILURE: TaskOutcome.FAILED,
    events.Classification.BAD_HOST: TaskOutcome.BAD_HOST,
    events.Classification.PREEMPTED: TaskOutcome.PREEMPTED,
    events.Classification.CANCELLED: TaskOutcome.CANCELLED,
    events.Classification.UNSPECIFIED: TaskOutcome.FAILED,
}
_TASK_STATUS = {
    TaskOutcome.SUCCEEDED: JobStatus.SUCCEEDED,
    TaskOutcome.FAILED: JobStatus.FAILED,
    TaskOutcome.BAD_HOST: JobStatus.FAILED,
    TaskOutcome.PREEMPTED: JobStatus.FAILED,
    TaskOutcome.LOST: JobStatus.FAILED,
    TaskOutcome.CANCELLED: JobStatus.STOPPED,
}


@dataclass(frozen=True)
class StreamEnded:
    """A host's event stream ended (with or without an exit before it)."""


@dataclass(frozen=True)
class LinesDropped:
    """The controller's buffer for the attempt was full: ``count`` output lines of this task
    were dropped rather than letting memory grow."""

    count: int


class SliceSeen(enum.StrEnum):
    """What one look at the cloud said of a slice the attempt runs on."""

    THERE = "there"
    LOST = "lost"  # preempted, terminated, deleted, gone
    UNKNOWN = "unknown"  # the listing failed (an API outage): nothing is concluded


def lost_slices(seen: Mapping[int, SliceSeen]) -> set[int]:
    """The slices that count as lost. An unknown one counts as it was: an API outage never ends
    a running attempt, and the next observation looks again."""
    return {slice_id for slice_id, what in seen.items() if what is SliceSeen.LOST}


# -- effects the shell executes ------------------------------------------------------------

@dataclass(frozen=True)
class AppendLines:
    lines: tuple[str, ...]


@dataclass(frozen=True)
class SetTask:
    index: int
    status: JobStatus
    error: str | None = None


@dataclass(frozen=True)
class CancelGang:
    reason: str


@dataclass(frozen=True)
class AllRunning:
    """Every task has started: the job is running."""

    count: int


Effect = AppendLines | SetTask | CancelGang | AllRunning


def end_from_exit(slot: TaskSlot, event: events.AttemptExit) -> TaskEnd:
    return TaskEnd(
        task_index=slot.index,
        slice_id=slot.slice_id,
        worker_id=slot.worker_id,
        outcome=_OUTCOMES[event.classification],
        exit_code=event.code,
        signal=event.signal,
        stderr_tail=event.stderr_tail or event.reason,
        label=slot.label,
    )


def lost_end(slot: TaskSlot, why: str, outcome: TaskOutcome = TaskOutcome.LOST) -> TaskEnd:
    """The end of a task whose host can no longer report one."""
    return TaskEnd(slot.index, slot.slice_id, slot.worker_id, outcome, stderr_tail=why, label=slot.label)


class GangWatch:
    def __init__(self, slots: Sequence[TaskSlot], *, gang: bool, clock: Callable[[], float], poll_interval: float,
                 cancel_timeout: float = CANCEL_GRACE_SECONDS + CANCEL_REPORT_SECONDS):
        self.slots = list(slots)
        self.gang = gang
        self._clock = clock
        self._poll_interval = poll_interval
        self._cancel_timeout = cancel_timeout
        self._ends: dict[int, TaskEnd] = {}
        self._order: list[TaskEnd] = []
        self._started: set[int] = set()
        self._lost_slices: set[int] = set()  # observed lost (node preempted, gone)
        self._noticed: set[int] = set()  # a host announced its preemption
        self._cancelling_since: float | None = None
        self._cancelled_by_user = False
        self._next_observation = clock() + poll_interval

    @property
    def done(self) -> bool:
        return len(self._ends) >= len(self.slots)

    @property
    def cancelling(self) -> bool:
        return self._cancelling_since is not None

    # -- inputs ------------------------------------------------------------------------------
    def stop_requested(self) -> list[Effect]:
        """The user terminated the job."""
        if self._cancelled_by_user:
            return []
        self._cancelled_by_user = True
        return self._cancel("terminated by the user")

    def observation_due(self) -> bool:
        """Whether the shell should look at the cloud and the agents' liveness now."""
        return self._clock() >= self._next_observation

    def observed(self, lost_slices: set[int], silent_tasks: set[int]) -> list[Effect]:
        """What the shell saw: slices the cloud reports lost, tasks whose host stopped answering."""
        self._next_observation = self._clock() + self._poll_interval
        effects: list[Effect] = []
        newly_lost = set(lost_slices) - self._lost_slices
        if newly_lost:
            self._lost_slices |= newly_lost
            effects += self._cancel("lost " + ", ".join(f"slice-{s}" for s in sorted(newly_lost)))
            # Hosts of a lost slice report nothing more: end their tasks now rather than
            # waiting out their channels.
            for slot in self.slots:
                if slot.slice_id in newly_lost:
                    effects += self._finish(slot, lost_end(slot, "its slice was lost", TaskOutcome.PREEMPTED))
        for index in sorted(set(silent_tasks) - set(self._ends)):
            slot = self.slots[index]
            effects += self._finish(slot, lost_end(slot, "its host stopped answering (liveness deadline)"))
        return effects

    def tick(self) -> list[Effect]:
        """Time passed: hosts that did not report an exit long after the gang was stopped are lost."""
        if self._cancelling_since is None or self._clock() - self._cancelling_since <= self._cancel_timeout:
            return []
        effects: list[Effect] = []
        for slot in self.slots:
            effects += self._finish(slot, lost_end(slot, "no exit reported after the gang was stopped"))
        return effects

    def event(self, index: int, event: object) -> list[Effect]:
        """One event of task ``index``: a channel event, an exception (its channel broke),
        ``StreamEnded`` or ``LinesDropped``."""
        slot = self.slots[index]
        if isinstance(event, events.LogBatch):
            return [AppendLines(tuple(f"[{slot.label}] {line}" for line in event.lines))]
        if isinstance(event, events.AttemptStarted):
            self._started.add(index)
            effects: list[Effect] = [SetTask(index, JobStatus.RUNNING)]
            if len(self._started) == len(self.slots):
                effects.append(AllRunning(len(self.slots)))
                effects.append(AppendLines((f"{PROGRESS_PREFIX}running on all {len(self.slots)} task(s)",)))
            return effects
        if isinstance(event, events.AttemptExit):
            return self._finish(slot, end_from_exit(slot, event))
        if isinstance(event, events.PreemptionNotice):
            self._noticed.add(slot.slice_id)
            return self._cancel(f"{slot.label} is being preempted")
        if isinstance(event, events.EventsLost):
            missed = event.first_available_seq - event.requested_from_seq
            return [AppendLines((f"[{slot.label}] {PROGRESS_PREFIX}{missed} output event(s) dropped by the host's buffer",))]
        if isinstance(event, LinesDropped):
            return [AppendLines((f"[{slot.label}] {PROGRESS_PREFIX}{event.count} output line(s) dropped: the "
                                 f"controller could not write them as fast as the job printed",))]
        if isinstance(event, Exception):
            return self._finish(slot, lost_end(slot, str(event)))
        if isinstance(event, StreamEnded):
            return self._finish(slot, lost_end(slot, "the event stream ended without an exit"))
        return []

    def verdict(self, lost_slices: set[int] = frozenset()) -> AttemptVerdict:
        """The attempt's verdict; ``lost_slices``: a last look at the cloud."""
        lost = self._lost_slices | set(lost_slices) | self._noticed
        return judge_attempt(self._order, len(self.slots), lost_slices=lost, cancelled=self._cancelled_by_user)

    # -- internals ---------------------------------------------------------------------------
    def _cancel(self, reason: str) -> list[Effect]:
        if self._cancelling_since is not None:
            return []
        self._cancelling_since = self._clock()
        return [AppendLines((f"{PROGRESS_PREFIX}stopping every task: {reason}",)), CancelGang(reason)]

    def _finish(self, slot: TaskSlot, end: TaskEnd) -> list[Effect]:
        if slot.index in self._ends:
            return []
        self._ends[slot.index] = end
        self._order.append(end)
        effects: list[Effect] = [SetTask(slot.index, _TASK_STATUS[end.outcome],
                                         None if end.outcome is TaskOutcome.SUCCEEDED else end.describe())]
        if self.gang and end.outcome is not TaskOutcome.SUCCEEDED:
            effects += self._cancel(f"{slot.label} ended: {end.outcome.value}")
        return effects
