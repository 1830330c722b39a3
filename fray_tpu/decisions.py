"""How an attempt ended, and what the job does next. Pure: no threads, no I/O.

The supervisor feeds in what it observed (task exits, lost slices, bad-host signatures) and
applies the returned decision. Retry policy, in one place:

- A **user failure** (non-zero exit or exception) consumes ``max_retries_failure``. The next
  attempt reuses the same slices: the agent cleans every host before each attempt, and keeping
  healthy slices makes the retry cost seconds instead of a provisioning round.
- A **preemption** (slice PREEMPTED/TERMINATED/gone, the ``preempted`` flag, or an agent lost
  without an exit) consumes ``max_retries_preemption``. Lost slices are deleted and replaced;
  surviving slices are reused and the whole gang restarts, with ``MEGASCALE_*`` recomputed.
- A **bad host** (TPU init signatures in stderr) is the machine's fault, not the user's: it
  consumes neither budget, the slice holding it is replaced, and a separate cap
  (``MAX_BAD_HOST_REPLACEMENTS``) stops a job that keeps landing on broken hardware.
- A job **environment that cannot be built** (an unresolvable requirement, a stale lock, a
  Python uv cannot find) is the job's fault and the same on every host and every try: the job
  fails at once, with the resolver's message.
- **No capacity anywhere** is not an attempt at all: provisioning keeps trying with backoff
  until the capacity deadline, consuming no budget.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MAX_BAD_HOST_REPLACEMENTS = 5


class TaskOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # The job's environment cannot be built (unresolvable requirement, stale lock, no such
    # Python): the job's fault, and the same on every host and every try.
    ENVIRONMENT_FAILED = "environment_failed"
    BAD_HOST = "bad_host"
    PREEMPTED = "preempted"
    LOST = "lost"  # the agent stopped answering without reporting an exit
    CANCELLED = "cancelled"


class AttemptOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    USER_FAILURE = "user_failure"
    ENVIRONMENT_FAILURE = "environment_failure"
    PREEMPTED = "preempted"
    BAD_HOST = "bad_host"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TaskEnd:
    task_index: int
    slice_id: int
    worker_id: int
    outcome: TaskOutcome
    exit_code: int | None = None
    signal: int | None = None
    stderr_tail: str = ""
    label: str = ""  # how logs name the task; slice-S/worker-W unless given

    @property
    def host(self) -> str:
        return self.label or f"slice-{self.slice_id}/worker-{self.worker_id}"

    def describe(self) -> str:
        how = f"exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
        if self.signal:
            how = f"signal {self.signal}"
        return f"{self.host} {self.outcome.value} ({how})"


@dataclass(frozen=True)
class AttemptVerdict:
    outcome: AttemptOutcome
    culprit: TaskEnd | None = None
    lost_slices: frozenset[int] = frozenset()
    bad_slices: frozenset[int] = frozenset()

    def describe(self) -> str:
        if self.outcome is AttemptOutcome.SUCCEEDED:
            return "every host succeeded"
        parts = [self.outcome.value.replace("_", " ")]
        if self.lost_slices:
            parts.append("lost slices " + ", ".join(f"slice-{s}" for s in sorted(self.lost_slices)))
        if self.culprit is not None:
            parts.append("first: " + self.culprit.describe())
            if self.culprit.stderr_tail.strip():
                parts.append("stderr tail:\n" + self.culprit.stderr_tail.rstrip())
        return "; ".join(parts)


def judge_attempt(
    ends: Sequence[TaskEnd],
    task_count: int,
    lost_slices: Iterable[int] = (),
    cancelled: bool = False,
) -> AttemptVerdict:
    """Classify one gang attempt.

    ``ends`` are the task ends in the order they were observed (the first failure is the
    culprit; later failures are usually the gang being stopped). Precedence: cancellation by
    the user, then preemption (a peer's death often makes the others fail), then an
    environment that cannot be built, then bad host, then user failure.
    """
    lost = frozenset(lost_slices) | {e.slice_id for e in ends if e.outcome in (TaskOutcome.PREEMPTED, TaskOutcome.LOST)}
    if cancelled:
        return AttemptVerdict(AttemptOutcome.CANCELLED, lost_slices=lost)
    first_preempted = next((e for e in ends if e.outcome in (TaskOutcome.PREEMPTED, TaskOutcome.LOST)), None)
    if lost:
        return AttemptVerdict(AttemptOutcome.PREEMPTED, culprit=first_preempted, lost_slices=lost)
    unbuildable = next((e for e in ends if e.outcome is TaskOutcome.ENVIRONMENT_FAILED), None)
    if unbuildable is not None:
        return AttemptVerdict(AttemptOutcome.ENVIRONMENT_FAILURE, culprit=unbuildable)
    bad = [e for e in ends if e.outcome is TaskOutcome.BAD_HOST]
    if bad:
        return AttemptVerdict(AttemptOutcome.BAD_HOST, culprit=bad[0], bad_slices=frozenset(e.slice_id for e in bad))
    failed = next((e for e in ends if e.outcome is TaskOutcome.FAILED), None)
    if failed is not None:
        return AttemptVerdict(AttemptOutcome.USER_FAILURE, culprit=failed)
    succeeded = {e.task_index for e in ends if e.outcome is TaskOutcome.SUCCEEDED}
    if len(succeeded) == task_count:
        return AttemptVerdict(AttemptOutcome.SUCCEEDED)
    # Ended without every host succeeding and without a failure: treat like a lost host.
    return AttemptVerdict(AttemptOutcome.PREEMPTED, lost_slices=lost)


class Action(enum.StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    action: Action
    replace_slices: frozenset[int] = frozenset()
    reason: str = ""


@dataclass(frozen=True)
class RetryLimits:
    """The request's budgets."""

    max_failures: int
    max_preemptions: int
    max_bad_hosts: int = MAX_BAD_HOST_REPLACEMENTS

    def __post_init__(self) -> None:
        for name in ("max_failures", "max_preemptions", "max_bad_hosts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass
class JobCounters:
    """What a job has used: the one store of retry counters (journaled, shown by the CLI)."""

    attempts: int = 0
    failures: int = 0
    preemptions: int = 0
    bad_hosts: int = 0
    capacity_waits: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> JobCounters:
        """Counters as journaled; keys of another version are ignored."""
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def decide(limits: RetryLimits, counters: JobCounters, verdict: AttemptVerdict) -> Decision:
    """Count the verdict in ``counters`` and say what to do next."""
    match verdict.outcome:
        case AttemptOutcome.SUCCEEDED:
            return Decision(Action.SUCCEED, reason="every host succeeded")
        case AttemptOutcome.CANCELLED:
            return Decision(Action.STOP, reason="terminated by the user")
        case AttemptOutcome.PREEMPTED:
            counters.preemptions += 1
            if counters.preemptions > limits.max_preemptions:
                return Decision(
                    Action.FAIL,
                    reason=f"preempted {counters.preemptions} times, more than max_retries_preemption="
                    f"{limits.max_preemptions}: {verdict.describe()}",
                )
            return Decision(Action.RETRY, replace_slices=verdict.lost_slices, reason=verdict.describe())
        case AttemptOutcome.BAD_HOST:
            counters.bad_hosts += 1
            if counters.bad_hosts > limits.max_bad_hosts:
                return Decision(
                    Action.FAIL,
                    reason=f"hit bad TPU hosts {counters.bad_hosts} times "
                    f"(limit {limits.max_bad_hosts}): {verdict.describe()}",
                )
            return Decision(Action.RETRY, replace_slices=verdict.bad_slices, reason=verdict.describe())
        case AttemptOutcome.ENVIRONMENT_FAILURE:
            return Decision(Action.FAIL, reason=f"the job's environment cannot be built (not retried): "
                                                f"{verdict.describe()}")
        case AttemptOutcome.USER_FAILURE:
            counters.failures += 1
            if counters.failures > limits.max_failures:
                return Decision(
                    Action.FAIL,
                    reason=f"failed (attempt {counters.attempts}, max_retries_failure={limits.max_failures}): "
                    f"{verdict.describe()}",
                )
            return Decision(Action.RETRY, reason=verdict.describe())
    raise AssertionError(f"unhandled attempt outcome {verdict.outcome!r}")


class PrepareProblem(enum.StrEnum):
    """Why preparing one host failed, as the channel reported it."""

    ENVIRONMENT = "environment"  # the agent says the job's Python environment cannot be built
    HOST = "host"  # the agent says the machine is at fault
    UNREACHABLE = "unreachable"  # the agent did not answer
    CHANNEL = "channel"  # any other channel error


def prepare_outcome(problem: PrepareProblem) -> TaskOutcome:
    """An environment that cannot be built fails the job at once; an unreachable host counts as
    lost (its slice is replaced as after a preemption); anything else is the machine's fault."""
    match problem:
        case PrepareProblem.ENVIRONMENT:
            return TaskOutcome.ENVIRONMENT_FAILED
        case PrepareProblem.UNREACHABLE:
            return TaskOutcome.LOST
    return TaskOutcome.BAD_HOST


def capacity_backoff(tries: int, *, base: float = 2.0, cap: float = 120.0) -> float:
    """Seconds to wait before trying every zone again after ``tries`` rounds without capacity."""
    return min(cap, base * (2 ** max(0, tries - 1)))


def order_zones(zones: Sequence[str], stocked_out: Iterable[str]) -> list[str]:
    """Zones in preference order, those that recently stocked out last (stable otherwise)."""
    out = set(stocked_out)
    return [z for z in zones if z not in out] + [z for z in zones if z in out]
