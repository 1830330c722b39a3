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


def _prepared(digest: str, source: str, seconds: float = 0.0, note: str = "") -> channel.PrepareResult:
    return channel.PrepareResult(attempt_id="a", prepare_seconds=seconds, env_reused=source in ("local", "base"),
                                 python="python", cleanup_notes=[], env_digest=digest, env_source=source,
                                 env_seconds=seconds, env_note=note)


def test_no_line_when_every_host_runs_the_agents_interpreter():
    """Hosts on the agent's own interpreter (or agents that report no digest) say nothing."""
    assert channel.describe_environments([(0, 0, _prepared(BASE_ENV_DIGEST, "base")), (0, 1, _prepared("", ""))]) == []
    assert channel.describe_environments([]) == []


def test_each_slice_says_where_its_hosts_got_the_environment_and_in_how_long():
    """Per slice: the builder with its note (the upload), downloads with their slowest and
    fastest time, hosts that had it already; the digest shortened."""
    digest = "0123456789abcdef" * 2
    lines = channel.describe_environments([
        (0, 0, _prepared(digest, "built", 30.0, "built in 25.0s; uploaded gs://b/x in 5.0s")),
        (0, 1, _prepared(digest, "bucket", 4.0)), (0, 2, _prepared(digest, "bucket", 2.5)),
        (0, 3, _prepared(BASE_ENV_DIGEST, "base")),
        (1, 0, _prepared(digest, "local")), (1, 1, _prepared(digest, "local")),
    ])
    assert lines == [
        "slice-0: Python environment 0123456789ab: built with uv on worker 0 in 30.0s; downloaded from the bucket "
        "on 2 hosts in 4.0s (slowest), 2.5s (fastest) (worker 0: built in 25.0s; uploaded gs://b/x in 5.0s)",
        "slice-1: Python environment 0123456789ab: reused from the host's own cache on 2 hosts",
    ]


def test_an_agent_that_names_no_source_is_read_from_its_reuse_flag():
    """Older agents report only env_reused: reused reads as the host's own cache, else built."""
    old = channel.PrepareResult(attempt_id="a", prepare_seconds=3.0, env_reused=False, python="p", cleanup_notes=[],
                                env_digest="ab" * 16, env_build_seconds=3.0)
    assert channel.describe_environments([(0, 0, old)]) == [
        "slice-0: Python environment abababababab: built with uv on worker 0 in 3.0s"]
