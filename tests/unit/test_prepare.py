"""What the supervisor makes of the hosts' answers to Prepare: the failure kind the agent names
becomes a problem (then an outcome, in decisions.prepare_outcome), and the prepared hosts'
environments become one progress line."""

from __future__ import annotations

import pytest

from fray_tpu import channel
from fray_tpu.contract import BASE_ENV_DIGEST, PrepareFailureKind
from fray_tpu.decisions import PrepareProblem, TaskOutcome, prepare_outcome
from fray_tpu.supervisor.gang import classify_prepare_error


def _refused(kind: str) -> channel.PrepareFailed:
    return channel.PrepareFailed("refused", address="10.0.0.1:8477", code="FAILED_PRECONDITION", kind=kind)


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (_refused(PrepareFailureKind.ENVIRONMENT), PrepareProblem.ENVIRONMENT),
        (_refused(PrepareFailureKind.BAD_HOST), PrepareProblem.HOST),
        (_refused(PrepareFailureKind.CONTROLLER), PrepareProblem.HOST),
        (_refused("a-kind-of-a-newer-agent"), PrepareProblem.HOST),
        (channel.AgentUnreachable("gone", address="10.0.0.1:8477", code="UNAVAILABLE"), PrepareProblem.UNREACHABLE),
        (channel.ChannelError("odd", address="10.0.0.1:8477", code="INTERNAL"), PrepareProblem.CHANNEL),
    ],
)
def test_the_kind_the_agent_names_decides_the_problem(error, problem):
    """Only the environment kind is the job's own; any other kind, an unknown one included, is the host's."""
    assert classify_prepare_error(error) is problem


def test_an_environment_refusal_fails_the_task_as_the_environments():
    """The agent's "environment" kind ends the task as ENVIRONMENT_FAILED (no retry follows)."""
    assert prepare_outcome(classify_prepare_error(_refused("environment"))) is TaskOutcome.ENVIRONMENT_FAILED


def _prepared(digest: str, reused: bool, seconds: float = 0.0) -> channel.PrepareResult:
    return channel.PrepareResult(attempt_id="a", prepare_seconds=seconds, env_reused=reused, python="python",
                                 cleanup_notes=[], env_digest=digest, env_build_seconds=seconds)


def test_no_line_when_every_host_runs_the_agents_interpreter():
    """Hosts on the agent's own interpreter (or agents that report no digest) say nothing."""
    assert channel.describe_environments([_prepared(BASE_ENV_DIGEST, True), _prepared("", True)]) is None
    assert channel.describe_environments([]) is None


def test_the_line_says_where_the_environment_was_built_and_where_reused():
    """Built hosts with their slowest and fastest build, reused hosts counted, the digest shortened."""
    digest = "0123456789abcdef" * 2
    line = channel.describe_environments([_prepared(digest, False, 4.0), _prepared(digest, False, 2.5),
                                          _prepared(digest, True), _prepared(BASE_ENV_DIGEST, True)])
    assert line == ("Python environment 0123456789ab: built on 2 host(s) in 4.0s (slowest), 2.5s (fastest); "
                    "reused the cached environment on 1 host(s)")
    assert channel.describe_environments([_prepared(digest, True)] * 3) == (
        "Python environment 0123456789ab: reused the cached environment on 3 host(s)")
