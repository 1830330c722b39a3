"""The gang watch as a pure state machine: events in, effects and a verdict out, on a fake clock."""

from __future__ import annotations

import random

import pytest

from fray_tpu.attempt_events import AttemptExit, AttemptStarted, Classification, EventsLost, LogBatch, PreemptionNotice
from fray_tpu.decisions import Action, AttemptOutcome, JobCounters, RetryLimits, TaskOutcome, decide
from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.watch import (
    CANCEL_GRACE_SECONDS,
    CANCEL_REPORT_SECONDS,
    AllRunning,
    AppendLines,
    CancelGang,
    GangWatch,
    LinesDropped,
    SetTask,
    SliceSeen,
    StreamEnded,
    TaskSlot,
    lost_slices,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def slots(slices: int, hosts: int) -> list[TaskSlot]:
    return [TaskSlot(i, i // hosts, i % hosts, f"slice-{i // hosts}/worker-{i % hosts}") for i in range(slices * hosts)]


def watch(slices=2, hosts=2, gang=True, poll=1.0):
    clock = Clock()
    return GangWatch(slots(slices, hosts), gang=gang, clock=clock, poll_interval=poll), clock


def exit_(classification=Classification.OK, code=0, tail=""):
    return AttemptExit(code=code, signal=None, classification=classification, stderr_tail=tail)


def cancels(effects):
    return [e for e in effects if isinstance(e, CancelGang)]


def start_all(w):
    effects = []
    for slot in w.slots:
        effects += w.event(slot.index, AttemptStarted(pid=1, timestamp=0))
    return effects


def test_every_host_succeeding_is_success_and_running_is_reported_once():
    """The job becomes running when the last task starts, and success needs every task's exit."""
    w, _ = watch()
    effects = start_all(w)
    assert [e for e in effects if isinstance(e, AllRunning)] == [AllRunning(4)]
    assert SetTask(0, JobStatus.RUNNING) in effects
    for i in range(3):
        w.event(i, exit_())
        assert not w.done
    w.event(3, exit_())
    assert w.done and w.verdict().outcome is AttemptOutcome.SUCCEEDED


def test_user_failure_on_one_host_stops_the_gang_and_blames_that_host():
    """A non-zero exit on one host cancels every other host once and makes it the culprit."""
    w, _ = watch()
    start_all(w)
    effects = w.event(2, exit_(Classification.USER_FAILURE, code=3, tail="ValueError: boom"))
    assert cancels(effects) == [CancelGang("slice-1/worker-0 ended: failed")]
    assert SetTask(2, JobStatus.FAILED, "slice-1/worker-0 failed (exit code 3)") in effects
    for i in (0, 1, 3):
        assert cancels(w.event(i, exit_(Classification.CANCELLED, code=None))) == []
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.USER_FAILURE and verdict.culprit.task_index == 2
    assert "ValueError: boom" in verdict.describe()


def test_cpu_replicas_run_to_their_own_ends():
    """Without gang semantics a failed replica stops no other replica."""
    w, _ = watch(slices=3, hosts=1, gang=False)
    assert cancels(w.event(0, exit_(Classification.USER_FAILURE, code=1))) == []
    w.event(1, exit_())
    w.event(2, exit_())
    assert w.verdict().outcome is AttemptOutcome.USER_FAILURE


def test_preemption_mid_attempt_ends_the_lost_slice_at_once_and_replaces_only_it():
    """A slice the cloud reports lost ends its tasks as preempted without waiting for their channels."""
    w, clock = watch()
    start_all(w)
    w.event(0, LogBatch("stdout", ["step 1"], 0))
    clock.now += 1.0
    assert w.observation_due()
    effects = w.observed({1}, set())
    assert cancels(effects) == [CancelGang("lost slice-1")]
    assert {e.index for e in effects if isinstance(e, SetTask)} == {2, 3}
    w.event(0, exit_(Classification.CANCELLED, code=None))
    w.event(1, exit_(Classification.CANCELLED, code=None))
    assert w.done
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.PREEMPTED and verdict.lost_slices == {1}
    decision = decide(RetryLimits(0, 3), JobCounters(attempts=1), verdict)
    assert decision.action is Action.RETRY and decision.replace_slices == {1}


def test_a_slice_the_api_cannot_list_is_not_lost():
    """An observation that failed (an API outage) counts the slice as it was: no cancel, no end."""
    assert lost_slices({0: SliceSeen.THERE, 1: SliceSeen.UNKNOWN, 2: SliceSeen.LOST}) == {2}
    w, clock = watch()
    start_all(w)
    clock.now += 1.0
    effects = w.observed(lost_slices({0: SliceSeen.UNKNOWN, 1: SliceSeen.UNKNOWN}), set())
    assert effects == [] and not w.cancelling and not w.done


def test_preemption_notice_counts_its_slice_as_lost():
    """A host announcing its preemption stops the gang; its slice is replaced even if it exits cleanly."""
    w, _ = watch()
    start_all(w)
    assert cancels(w.event(3, PreemptionNotice(0))) == [CancelGang("slice-1/worker-1 is being preempted")]
    for i in range(4):
        w.event(i, exit_(Classification.CANCELLED, code=None))
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.PREEMPTED and verdict.lost_slices == {1}


def test_silent_host_is_lost_and_its_slice_replaced():
    """A host past the liveness deadline ends as lost; the attempt counts as a preemption of its slice."""
    w, clock = watch()
    start_all(w)
    clock.now += 5
    effects = w.observed(set(), {1})
    assert SetTask(1, JobStatus.FAILED, "slice-0/worker-1 lost (no exit code)") in effects
    assert cancels(effects) == [CancelGang("slice-0/worker-1 ended: lost")]
    for i in (0, 2, 3):
        w.event(i, exit_(Classification.CANCELLED, code=None))
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.PREEMPTED and verdict.lost_slices == {0}
    assert "liveness deadline" in verdict.describe()


def test_bad_host_replaces_its_slice_without_consuming_the_failure_budget():
    """A TPU-init failure on one host is the machine's fault: its slice is replaced, failures stay 0."""
    w, _ = watch()
    start_all(w)
    w.event(1, exit_(Classification.BAD_HOST, code=1, tail="TPU initialization failed"))
    for i in (0, 2, 3):
        w.event(i, exit_(Classification.CANCELLED, code=None))
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.BAD_HOST and verdict.bad_slices == {0}
    counters = JobCounters(attempts=1)
    decision = decide(RetryLimits(0, 0), counters, verdict)
    assert decision.action is Action.RETRY and decision.replace_slices == {0}
    assert counters.failures == 0 and counters.bad_hosts == 1


def test_cancel_before_anything_started_stops_the_job():
    """A terminate arriving while hosts prepare: the gang is cancelled once and the job stops."""
    w, _ = watch()
    effects = w.stop_requested()
    assert cancels(effects) == [CancelGang("terminated by the user")]
    assert w.stop_requested() == []
    for i in range(4):
        w.event(i, exit_(Classification.CANCELLED, code=None))
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.CANCELLED
    assert decide(RetryLimits(0, 0), JobCounters(attempts=1), verdict).action is Action.STOP


def test_hosts_silent_after_cancel_are_lost_once_the_report_time_is_over():
    """After a cancel, hosts get grace + report time to exit; then their tasks end as lost."""
    w, clock = watch()
    start_all(w)
    w.stop_requested()
    w.event(0, exit_(Classification.CANCELLED, code=None))
    clock.now += CANCEL_GRACE_SECONDS + CANCEL_REPORT_SECONDS
    assert w.tick() == [] and not w.done
    clock.now += 0.1
    ended = [e.index for e in w.tick() if isinstance(e, SetTask)]
    assert ended == [1, 2, 3] and w.done
    assert w.verdict().outcome is AttemptOutcome.CANCELLED


def test_broken_channel_and_stream_end_without_exit_are_lost_hosts():
    """A channel error or a stream ending before an exit ends the task as lost (a preemption)."""
    w, _ = watch(slices=1, hosts=2)
    w.event(0, ConnectionError("agent went away"))
    w.event(1, StreamEnded())
    verdict = w.verdict()
    assert verdict.outcome is AttemptOutcome.PREEMPTED and verdict.culprit.stderr_tail == "agent went away"


def test_stream_end_after_exit_changes_nothing():
    """The end-of-stream marker that follows every exit does not end the task a second time."""
    w, _ = watch(slices=1, hosts=1)
    assert w.event(0, exit_()) != []
    assert w.event(0, StreamEnded()) == []
    assert w.verdict().outcome is AttemptOutcome.SUCCEEDED


def test_output_lines_are_prefixed_and_drops_reported():
    """Log lines carry the host's label; drops by the host or the controller are announced with counts."""
    w, _ = watch(slices=1, hosts=2)
    assert w.event(1, LogBatch("stdout", ["a", "b"], 0)) == [AppendLines(("[slice-0/worker-1] a", "[slice-0/worker-1] b"))]
    [lost] = w.event(0, EventsLost(requested_from_seq=5, first_available_seq=12))
    assert "7 output event(s) dropped by the host's buffer" in lost.lines[0]
    [dropped] = w.event(1, LinesDropped(300))
    assert dropped.lines[0].startswith("[slice-0/worker-1] [fray-tpu] 300 output line(s) dropped")


def test_observation_is_due_every_poll_interval():
    """The shell looks at the cloud once per poll interval, counted from the last look."""
    w, clock = watch(poll=2.0)
    assert not w.observation_due()
    clock.now += 2.0
    assert w.observation_due()
    w.observed(set(), set())
    assert not w.observation_due()
    clock.now += 1.9
    assert not w.observation_due()


_FAILING = [Classification.USER_FAILURE, Classification.BAD_HOST, Classification.PREEMPTED]


@pytest.mark.parametrize("seed", range(300))
def test_random_attempts_keep_the_watch_invariants(seed):
    """Random mixes of events: every task ends exactly once, the gang is cancelled at most once
    and only after something went wrong, and the verdict agrees with what happened."""
    rng = random.Random(seed)
    n_slices, hosts = rng.randint(1, 3), rng.randint(1, 4)
    gang = rng.random() < 0.8
    w, clock = watch(n_slices, hosts, gang=gang)
    n = n_slices * hosts
    effects = []
    stopped = lost_seen = bad_seen = failed_seen = False
    pending = list(range(n))
    rng.shuffle(pending)
    while not w.done:
        clock.now += rng.uniform(0, 3)
        roll = rng.random()
        if roll < 0.05:
            stopped = True
            effects += w.stop_requested()
        elif roll < 0.10:
            lost = {rng.randrange(n_slices)}
            lost_seen = True
            effects += w.observed(lost, set())
        elif roll < 0.13:
            silent = rng.randrange(n)
            ended = {e.index for e in effects if isinstance(e, SetTask) and e.status is not JobStatus.RUNNING}
            lost_seen = lost_seen or silent not in ended
            effects += w.observed(set(), {silent})
        elif roll < 0.18:
            effects += w.tick()
        else:
            index = pending[0] if pending else rng.randrange(n)
            kind = rng.random()
            if kind < 0.75:
                classification = Classification.OK
            elif kind < 0.85:
                classification = Classification.USER_FAILURE
                failed_seen = True
            elif kind < 0.92:
                classification = Classification.BAD_HOST
                bad_seen = True
            else:
                classification = Classification.PREEMPTED
                lost_seen = True
            effects += w.event(index, exit_(classification, code=0 if classification is Classification.OK else 1))
            if pending:
                pending.pop(0)
    task_ends = [e for e in effects if isinstance(e, SetTask) and e.status is not JobStatus.RUNNING]
    assert sorted(e.index for e in task_ends) == list(range(n)), "every task ends exactly once"
    cancel_effects = cancels(effects)
    assert len(cancel_effects) <= 1
    if cancel_effects and not stopped:
        assert lost_seen or failed_seen or bad_seen
    verdict = w.verdict()
    if stopped:
        assert verdict.outcome is AttemptOutcome.CANCELLED
    elif verdict.outcome is AttemptOutcome.SUCCEEDED:
        assert not (lost_seen or failed_seen or bad_seen)
        assert all(e.status is JobStatus.SUCCEEDED for e in task_ends)
    elif verdict.outcome is AttemptOutcome.USER_FAILURE:
        assert failed_seen and verdict.culprit.outcome is TaskOutcome.FAILED
    elif verdict.outcome is AttemptOutcome.BAD_HOST:
        assert bad_seen


def test_liveness_counts_a_host_silent_only_after_the_deadline():
    """A host is silent once nothing was heard from it for longer than the deadline; hearing revives it."""
    from fray_tpu.supervisor.gang_run import Liveness

    clock = Clock()
    liveness = Liveness(30.0, clock)
    liveness.heard("a")
    liveness.heard("b")
    clock.now += 30.0
    assert liveness.silent(["a", "b"]) == set()
    liveness.heard("b")
    clock.now += 0.1
    assert liveness.silent(["a", "b", "never-heard"]) == {"a"}
