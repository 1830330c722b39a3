"""TpuClient (Marin's 2026 Client API) with CPU jobs and CPU actors on the controller machine.

Contract checks for every handle method and request field, actors (groups, concurrency,
restarts, current_actor, unavailability), handles resolved from other jobs, nested submits and
the channel's authentication.
"""

from __future__ import annotations

import time
from pathlib import Path

import cloudpickle
import pytest
from client_jobs import (
    BrokenConstructor,
    Counter,
    FailsAtIndexOne,
    FailsOnRequest,
    Introspective,
    Relay,
    Waiter,
    block,
    fail_with_key_error,
    increment,
    print_lines,
    submit_blocking_child_and_return,
    submit_child_from_thread,
    succeed,
    write_env,
)
from fake_gcp import wait_for

from fray_tpu.actors.rpc import ClusterCredentials, RemoteTraceback, RpcClient, RpcRejected
from fray_tpu.client import TpuClient, TpuJobHandle
from fray_tpu.client_api import (
    ActorConfig,
    ActorUnavailableError,
    Entrypoint,
    JobFailed,
    JobRequest,
    JobStatus,
    ResourceConfig,
    wait_all,
)
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError

TIMEOUT = 90.0


@pytest.fixture(scope="module")
def client():
    c = TpuClient(TpuClusterConfig(emulate=True, poll_interval=0.2))
    yield c
    c.shutdown(wait=False)


def job(name: str, fn, *args, **fields) -> JobRequest:
    return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=args), **fields)


# -- jobs -------------------------------------------------------------------------------------

def test_submit_returns_at_once_and_succeeds(client):
    """submit returns a handle whose id contains the name; status goes PENDING/RUNNING -> SUCCEEDED."""
    handle = client.submit(job("contract-ok", succeed))
    assert "contract-ok" in handle.job_id
    assert handle.status() in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED)
    assert handle.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    assert handle.status() == JobStatus.SUCCEEDED
    assert "[replica-0] hello from the job" in handle.logs()


def test_failure_reraises_the_jobs_own_exception_with_remote_traceback(client):
    """wait() re-raises the callable's KeyError (class and message) with the remote stack as cause;
    raise_on_failure=False returns FAILED."""
    handle = client.submit(job("contract-fail", fail_with_key_error))
    with pytest.raises(KeyError, match="intentional failure") as caught:
        handle.wait(timeout=TIMEOUT)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "fail_with_key_error" in str(caught.value.__cause__)
    assert handle.wait(timeout=TIMEOUT, raise_on_failure=False) == JobStatus.FAILED


def test_wait_timeout_raises_timeout_error_and_terminate_stops(client):
    """A caller timeout raises TimeoutError; terminate() makes the job STOPPED."""
    handle = client.submit(job("contract-block", block))
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.5)
    handle.terminate()
    assert handle.wait(timeout=TIMEOUT) == JobStatus.STOPPED


def test_request_timeout_stops_the_job_without_polling(client):
    """JobRequest.timeout: past it the job is STOPPED even though nobody calls wait()."""
    handle = client.submit(job("contract-timeout", block, timeout=1.0))
    start = time.monotonic()
    wait_for(lambda: client.cluster.poll(handle.job_id).status == JobStatus.STOPPED, "the timeout to stop the job",
             TIMEOUT)
    assert time.monotonic() - start >= 1.0


def test_logs_are_a_bounded_binary_safe_tail(client):
    """logs(max_lines) returns the last lines only; undecodable bytes and carriage returns do not break it."""
    handle = client.submit(job("contract-logs", print_lines, 20))
    handle.wait(timeout=TIMEOUT)
    tail = handle.logs(max_lines=3)
    assert len(tail) == 3
    assert tail[0] == "[replica-0] line 18" and tail[1] == "[replica-0] line 19"
    assert "raw" in tail[2] and "progress 100%" in tail[2]
    assert len(handle.logs()) == 21


def test_duplicate_names_get_distinct_ids_and_wait_all(client):
    """Two submits of one name are two jobs; Marin's wait_all works on the handles and names a failure."""
    first, second = client.submit(job("same-name", succeed)), client.submit(job("same-name", succeed))
    assert first.job_id != second.job_id
    assert wait_all([first, second], timeout=TIMEOUT) == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
    failing = client.submit(job("same-name", fail_with_key_error))
    with pytest.raises(JobFailed):
        wait_all([first, failing], timeout=TIMEOUT)


def test_replicas_run_one_process_each(client, tmp_path):
    """JobRequest.replicas=3 on CPU runs three replicas with their ids."""
    handle = client.submit(job("replicas", write_env, str(tmp_path / "env"), replicas=3))
    assert handle.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    assert sorted(p.name for p in tmp_path.glob("env.*")) == ["env.0", "env.1", "env.2"]
    assert (tmp_path / "env.2").read_text() == "3"


@pytest.mark.parametrize("fields, message", [
    ({"processes_per_task": 2}, "processes_per_task"),
    ({"resources": ResourceConfig.with_tpu("v5litepod-16"), "replicas": 6}, "whole number of v5litepod-16 slices"),
    ({"resources": ResourceConfig(regions=["us-central2"], zone="europe-west4-a")}, "not in regions"),
    ({"resources": ResourceConfig(regions=["*", "us-central2"])}, "mixes"),
    ({"max_task_failures": -1}, "max_task_failures"),
    ({"timeout": -5}, "timeout"),
])
def test_bad_requests_fail_before_anything_runs(client, fields, message):
    """Each bad request raises a ConfigError (a ValueError) naming the field, and launches nothing."""
    before = len(client.cluster.list_jobs())
    with pytest.raises(ConfigError, match=message):
        client.submit(job("bad", succeed, **fields))
    assert len(client.cluster.list_jobs()) == before


def test_a_job_is_visible_to_the_cluster_api(client):
    """A job submitted through the client is one of the controller's jobs (same table and journal)."""
    handle = client.submit(job("both-apis", succeed))
    handle.wait(timeout=TIMEOUT)
    assert client.cluster.poll(handle.job_id).name == "both-apis"
    assert handle.job_id in {info.job_id for info in client.cluster.list_jobs()}


def test_channel_credentials_never_reach_the_journal(client):
    """The journaled plan keeps the controller's address but not its key or secret; neither
    appears anywhere in the journal's files."""
    import pickle

    from fray_tpu.actors.link import CONTROLLER_ENV, CREDENTIALS_ENV

    handle = client.submit(job("journaled", succeed))
    handle.wait(timeout=TIMEOUT)
    journal = client.cluster.journal()
    plan = pickle.loads(journal.job(handle.job_id).plan_blob)
    assert CREDENTIALS_ENV not in plan.env and plan.env[CONTROLLER_ENV] == client.controller_address
    secret = client._service.credentials.secret.encode()
    key = client._service.credentials.key_pem.split(b"\n")[1]
    for path in journal.state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret not in data and key not in data, path


def test_job_handle_pickles_to_its_id(client):
    handle = client.submit(job("pickled-handle", succeed))
    copy = cloudpickle.loads(cloudpickle.dumps(handle))
    assert isinstance(copy, TpuJobHandle) and copy.job_id == handle.job_id
    assert copy.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED


# -- current_client inside jobs, nested submits ------------------------------------------------

def test_current_client_in_a_thread_of_a_job_submits_a_child(client):
    """Inside a job, current_client() in a thread the user starts is a TpuClient of the same
    controller, and its submit succeeds."""
    handle = client.submit(job("nested-thread", submit_child_from_thread))
    assert handle.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    assert any("grandchild" in info.job_id for info in client.cluster.list_jobs())


def test_a_child_job_ends_with_its_parent(client, tmp_path):
    """A job submitted from inside a job is stopped when its parent ends."""
    marker = tmp_path / "child-id"
    parent = client.submit(job("parent", submit_blocking_child_and_return, str(marker)))
    assert parent.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    child = TpuJobHandle(marker.read_text())
    assert child.wait(timeout=TIMEOUT) == JobStatus.STOPPED


# -- actors -------------------------------------------------------------------------------------

def test_actor_calls_remote_submit_sync_and_errors(client):
    """create_actor blocks until constructed (args and kwargs reach __init__); .remote/.submit give
    futures, a plain call is synchronous, a method's own exception is re-raised."""
    counter = client.create_actor(Counter, 10, name="calls", step=2)
    assert counter.incr() == 12
    assert counter.incr.remote(by=3).result(timeout=TIMEOUT) == 15
    assert counter.get.submit().result(timeout=TIMEOUT) == 15
    with pytest.raises(ValueError, match="method failed on purpose"):
        counter.explode.remote().result(timeout=TIMEOUT)
    with pytest.raises(AttributeError):
        counter._private()


def test_a_methods_timeout_keyword_reaches_the_method(client):
    """Keyword arguments named like transport options (timeout) are the method's own."""
    waiter = client.create_actor(Waiter, name="waiter")
    assert waiter.wait(timeout=7.5) == 7.5
    assert waiter.wait.remote(timeout=2.5).result(timeout=TIMEOUT) == 2.5


def test_max_concurrency_one_serialises_calls(client):
    """Ten concurrent increments on a default actor yield exactly 1..10 (no lost update)."""
    counter = client.create_actor(Counter, name="serial")
    futures = [counter.incr.remote() for _ in range(10)]
    assert sorted(f.result(timeout=TIMEOUT) for f in futures) == list(range(1, 11))


def test_actor_group_ready_discover_done_shutdown(client):
    """A group of 3: wait_ready in index order, current_actor() saw index and group, members are
    separate processes; discover_new yields each member not yet handed out, once; shutdown makes them unavailable and done."""
    group = client.create_actor_group(Introspective, name="trio", count=3)
    first_two = group.wait_ready(count=2, timeout=TIMEOUT)
    assert len(first_two) == 2
    wait_for(lambda: group.ready_count == 3, "all three members to be ready", TIMEOUT)
    assert len(group.discover_new()) == 1 and group.discover_new() == []
    handles = group.wait_ready(timeout=TIMEOUT)
    described = [h.describe() for h in handles]
    assert [seen[0] for seen, _ in described] == [0, 1, 2]
    assert all(seen[1] == "trio" and seen[2] == h.endpoint for (seen, _), h in zip(described, handles))
    assert len({pid for _, pid in described}) == 3
    assert group.discover_new() == []
    assert not group.is_done()
    copy = cloudpickle.loads(cloudpickle.dumps(group))  # a group pickles to its identity
    assert copy.ready_count == 3 and [h.endpoint for h in copy.wait_ready(timeout=TIMEOUT)] == [h.endpoint for h in handles]
    group.shutdown()
    wait_for(group.is_done, "the group to be done after shutdown", TIMEOUT)
    with pytest.raises(ActorUnavailableError):
        handles[0].describe()


def test_one_members_constructor_failure_spares_its_siblings(client):
    """Member 1's constructor fails: wait_ready() for all raises its error, the two others serve,
    and the group is not done."""
    group = client.create_actor_group(FailsAtIndexOne, name="partly-broken", count=3)
    with pytest.raises(LookupError, match="member 1 cannot start"):
        group.wait_ready(timeout=TIMEOUT)
    survivors = group.wait_ready(count=2, timeout=TIMEOUT)
    assert [h.endpoint.rsplit("-", 1)[1] for h in survivors] == ["0", "2"]
    assert all(h.ok() for h in survivors)
    assert not group.is_done()
    group.shutdown()


def test_constructor_failure_raises_from_create_actor(client):
    with pytest.raises(ZeroDivisionError, match="constructor failed on purpose"):
        client.create_actor(BrokenConstructor, name="broken")


def test_fail_restarts_the_actor_with_fresh_state(client):
    """ctx.fail() with max_task_retries=1 restarts the member: unavailable meanwhile, then fresh."""
    actor = client.create_actor(FailsOnRequest, name="restartable", actor_config=ActorConfig(max_task_retries=1))
    assert actor.bump() == 1 and actor.bump() == 2
    actor.crash()

    def fresh_count():
        try:
            return actor.bump()
        except ActorUnavailableError:
            return None

    assert wait_for(fresh_count, "the restarted actor to answer", TIMEOUT) == 1


def test_two_jobs_share_one_actor_through_a_handle_argument(client):
    """Handles passed as arguments to two concurrently running jobs reach the same actor."""
    counter = client.create_actor(Counter, name="shared")
    jobs = [client.submit(job(f"incrementer-{i}", increment, counter, 20)) for i in range(2)]
    assert wait_all(jobs, timeout=TIMEOUT) == [JobStatus.SUCCEEDED] * 2
    assert counter.get() == 40


def test_hosted_actor_is_reachable_from_jobs_and_other_actors(client):
    """host_actor serves in the driver; a job and another actor call it through its handle."""
    hosted = client.host_actor(Counter, name="in-driver")
    handle = hosted.handle
    assert client.submit(job("uses-hosted", increment, handle, 3)).wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    relay = client.create_actor(Relay, handle, name="relay")
    assert relay.forward() == 1003
    hosted.shutdown()
    with pytest.raises(ActorUnavailableError):
        handle.get()


def test_unknown_actor_is_unavailable(client):
    from fray_tpu.actors.handles import TpuActorHandle

    with pytest.raises(ActorUnavailableError, match="not running"):
        TpuActorHandle("nobody/none-0").get()


# -- the channel -----------------------------------------------------------------------------------

def test_channel_refuses_wrong_secret_before_unpickling(client):
    """A caller with the right certificate but another secret is refused (UNAUTHENTICATED)."""
    real = client._service.credentials
    impostor = RpcClient(client.controller_address, ClusterCredentials(real.cert_pem, b"", "not-the-secret"))
    with pytest.raises(RpcRejected):
        impostor.call("lookup", "anything", timeout=10)


def test_channel_refuses_a_different_certificate(client):
    """A server is only trusted with the controller's own certificate (TLS pinning)."""
    other = ClusterCredentials.create()
    stranger = RpcClient(client.controller_address, ClusterCredentials(other.cert_pem, b"", client._service.credentials.secret))
    with pytest.raises(ConnectionError):
        stranger.call("lookup", "anything", timeout=10)


def test_only_listed_methods_are_callable_remotely(client):
    real = client._service.credentials
    with pytest.raises(AttributeError, match="no method"):
        RpcClient(client.controller_address, real).call("close", timeout=10)
    assert not Path("/nonexistent").exists()
