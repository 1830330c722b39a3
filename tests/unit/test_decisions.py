import pytest

from fray_tpu.decisions import (
    Action,
    AttemptOutcome,
    JobCounters,
    PrepareProblem,
    RetryLimits,
    TaskEnd,
    TaskOutcome,
    capacity_backoff,
    decide,
    judge_attempt,
    order_zones,
    prepare_outcome,
)


def end(i, outcome, slice_id=0, code=None, tail=""):
    return TaskEnd(task_index=i, slice_id=slice_id, worker_id=i % 4, outcome=outcome, exit_code=code, stderr_tail=tail)


def ok(n):
    return [end(i, TaskOutcome.SUCCEEDED, slice_id=i // 4, code=0) for i in range(n)]


def test_all_succeeded():
    assert judge_attempt(ok(8), task_count=8).outcome is AttemptOutcome.SUCCEEDED


def test_missing_hosts_is_not_success():
    assert judge_attempt(ok(3), task_count=4).outcome is AttemptOutcome.PREEMPTED


def test_user_failure_names_first_failure():
    ends = [end(2, TaskOutcome.FAILED, code=1, tail="Traceback\nValueError: boom"), end(0, TaskOutcome.CANCELLED)]
    verdict = judge_attempt(ends, task_count=4)
    assert verdict.outcome is AttemptOutcome.USER_FAILURE
    assert verdict.culprit.task_index == 2
    text = verdict.describe()
    assert "slice-0/worker-2" in text and "exit code 1" in text and "ValueError: boom" in text


def test_preemption_wins_over_user_failure():
    ends = [end(1, TaskOutcome.FAILED, code=1), end(5, TaskOutcome.LOST, slice_id=1)]
    verdict = judge_attempt(ends, task_count=8, lost_slices=[1])
    assert verdict.outcome is AttemptOutcome.PREEMPTED
    assert verdict.lost_slices == {1}


def test_lost_agent_is_preemption_of_its_slice():
    verdict = judge_attempt([end(6, TaskOutcome.LOST, slice_id=1)], task_count=8)
    assert verdict.outcome is AttemptOutcome.PREEMPTED and verdict.lost_slices == {1}


def test_bad_host_wins_over_user_failure():
    ends = [end(0, TaskOutcome.FAILED, code=1), end(5, TaskOutcome.BAD_HOST, slice_id=1, code=1)]
    verdict = judge_attempt(ends, task_count=8)
    assert verdict.outcome is AttemptOutcome.BAD_HOST and verdict.bad_slices == {1}


def test_cancel_wins():
    verdict = judge_attempt([end(0, TaskOutcome.FAILED, code=1)], task_count=4, lost_slices=[0], cancelled=True)
    assert verdict.outcome is AttemptOutcome.CANCELLED


def test_failure_budget():
    """User failures consume max_retries_failure; the one past it fails the job, naming the attempt."""
    limits, counters = RetryLimits(max_failures=2, max_preemptions=100), JobCounters()
    failure = judge_attempt([end(0, TaskOutcome.FAILED, code=3)], task_count=4)
    counters.attempts = 1
    assert decide(limits, counters, failure).action is Action.RETRY
    counters.attempts = 2
    assert decide(limits, counters, failure).action is Action.RETRY
    counters.attempts = 3
    final = decide(limits, counters, failure)
    assert final.action is Action.FAIL
    assert "attempt 3, max_retries_failure=2" in final.reason and "exit code 3" in final.reason
    assert counters.failures == 3 and counters.preemptions == 0


def test_preemption_budget_and_replacement():
    limits, counters = RetryLimits(max_failures=0, max_preemptions=1), JobCounters()
    verdict = judge_attempt([end(4, TaskOutcome.PREEMPTED, slice_id=1)], task_count=8, lost_slices=[1])
    first = decide(limits, counters, verdict)
    assert first.action is Action.RETRY and first.replace_slices == {1}
    second = decide(limits, counters, verdict)
    assert second.action is Action.FAIL
    assert "preempted 2 times" in second.reason and "max_retries_preemption=1" in second.reason


def test_bad_host_consumes_no_failure_budget_but_is_capped():
    limits, counters = RetryLimits(max_failures=0, max_preemptions=0, max_bad_hosts=2), JobCounters()
    verdict = judge_attempt([end(0, TaskOutcome.BAD_HOST, code=1)], task_count=4)
    assert decide(limits, counters, verdict).action is Action.RETRY
    assert decide(limits, counters, verdict).replace_slices == {0}
    assert counters.failures == 0 and counters.bad_hosts == 2
    assert decide(limits, counters, verdict).action is Action.FAIL


def test_an_environment_that_cannot_be_built_fails_at_once_whatever_the_budget():
    """It wins over a bad host beside it and spends no budget: retrying builds the same failure."""
    limits, counters = RetryLimits(max_failures=5, max_preemptions=5), JobCounters()
    ends = [end(1, TaskOutcome.BAD_HOST), end(0, TaskOutcome.ENVIRONMENT_FAILED, tail="error: No solution found")]
    verdict = judge_attempt(ends, task_count=4)
    assert verdict.outcome is AttemptOutcome.ENVIRONMENT_FAILURE and verdict.culprit.task_index == 0
    decision = decide(limits, counters, verdict)
    assert decision.action is Action.FAIL
    assert "not retried" in decision.reason and "No solution found" in decision.reason
    assert (counters.failures, counters.preemptions, counters.bad_hosts) == (0, 0, 0)


def test_success_and_stop():
    limits, counters = RetryLimits(max_failures=0, max_preemptions=0), JobCounters()
    assert decide(limits, counters, judge_attempt(ok(4), task_count=4)).action is Action.SUCCEED
    assert decide(limits, counters, judge_attempt([], task_count=4, cancelled=True)).action is Action.STOP
    assert counters == JobCounters()


@pytest.mark.parametrize("bad", [-1, 1.5, None])
def test_budget_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="max_failures"):
        RetryLimits(max_failures=bad, max_preemptions=0)


def test_capacity_backoff_grows_and_caps():
    delays = [capacity_backoff(t, base=1, cap=10) for t in range(1, 7)]
    assert delays == [1, 2, 4, 8, 10, 10]


def test_order_zones_moves_stocked_out_last():
    assert order_zones(["a", "b", "c"], ["a"]) == ["b", "c", "a"]


def test_counters_from_a_journal_of_another_version_ignore_unknown_keys():
    """Journaled counters load into the one store; keys it does not know are dropped."""
    assert JobCounters.from_mapping({"attempts": 3, "failures": 1, "warm_reuses": 7}) == JobCounters(attempts=3, failures=1)


@pytest.mark.parametrize(
    ("problem", "outcome"),
    [
        (PrepareProblem.ENVIRONMENT, TaskOutcome.ENVIRONMENT_FAILED),
        (PrepareProblem.HOST, TaskOutcome.BAD_HOST),
        (PrepareProblem.UNREACHABLE, TaskOutcome.LOST),
        (PrepareProblem.CHANNEL, TaskOutcome.BAD_HOST),
    ],
)
def test_prepare_failure_classification(problem, outcome):
    """An environment that cannot be built fails the job, an unreachable host is lost, the rest
    is the host's fault."""
    assert prepare_outcome(problem) is outcome
