"""TpuClient on the Cloud TPU emulator: TPU jobs (single slice and multislice), a TPU host calling
an actor hosted in the driver, and an actor group on a slice (one member per VM).

The ``fake_gcp`` fixture fails a test that leaves a node or queued resource alive.
"""

from __future__ import annotations

import json

import pytest
from client_jobs import Counter, HostInfo, fail_on_tpu, succeed, tpu_task_calls_actor
from package_fixtures import CLIENT_PACKAGES

from fray_tpu.client import TpuClient
from fray_tpu.client_api import Entrypoint, JobRequest, JobStatus, ResourceConfig, create_environment

# Client API tasks call actors over gRPC: on faithful hosts, their environments install it.

TIMEOUT = 180.0


@pytest.fixture(scope="module")
def client(job_index_client):
    return job_index_client


def tpu_job(name: str, fn, args, workspace: str, tpu_type: str = "v5litepod-16", slices: int = 1, **fields):
    return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=tuple(args)),
                      resources=ResourceConfig.with_tpu(tpu_type, slice_count=slices),
                      environment=create_environment(workspace=workspace, pip_packages=list(CLIENT_PACKAGES)),
                      **fields)


def release(client: TpuClient, job_id: str) -> None:
    client.cluster.wait_released(job_id, timeout=TIMEOUT)


def test_single_slice_job_runs_on_every_vm(client, fake_gcp, workspace):
    """with_tpu('v5litepod-16') is 4 tasks (one per VM) on one slice; the job succeeds on all."""
    handle = client.submit(tpu_job("tpu-one", succeed, [], workspace))
    assert handle.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    release(client, handle.job_id)
    logs = handle.logs()
    assert sorted(line.split("]")[0] for line in logs if "hello" in line) == [
        f"[slice-0/worker-{w}" for w in range(4)]


def test_tpu_failure_reraises_the_hosts_exception(client, fake_gcp, workspace):
    """A KeyError on one TPU host comes back from wait() as that KeyError."""
    handle = client.submit(tpu_job("tpu-fail", fail_on_tpu, [], workspace))
    with pytest.raises(KeyError, match="intentional failure on a TPU host"):
        handle.wait(timeout=TIMEOUT)
    release(client, handle.job_id)


def test_multislice_hosts_call_an_actor_hosted_in_the_driver(client, fake_gcp, workspace, out_dir):
    """slice_count=2 is 8 tasks over two slices; every TPU host calls the driver's actor, which
    counts all 8 calls."""
    hosted = client.host_actor(Counter, name="driver-counter")
    handle = client.submit(tpu_job("tpu-multi", tpu_task_calls_actor, [hosted.handle, str(out_dir)], workspace,
                                   slices=2))
    assert handle.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    release(client, handle.job_id)
    seen = [json.loads(p.read_text()) for p in sorted(out_dir.glob("task-*.json"))]
    assert len(seen) == 8
    assert sorted(s["value"] for s in seen) == list(range(1, 9))
    assert {s["slices"] for s in seen} == {"2"}
    assert hosted.handle.get() == 8
    hosted.shutdown()


def test_actor_group_on_a_slice_has_one_member_per_vm(client, fake_gcp, workspace):
    """An actor group with TPU resources runs one member on each VM of the slice; shutdown
    releases the slice."""
    resources = ResourceConfig.with_tpu("v5litepod-16")
    group = client.create_actor_group(HostInfo, name="tpu-actors", count=4, resources=resources,
                                      environment=create_environment(workspace=workspace,
                                                                     pip_packages=list(CLIENT_PACKAGES)))
    handles = group.wait_ready(timeout=TIMEOUT)
    where = [h.where() for h in handles]
    assert [index for index, _, _ in where] == [0, 1, 2, 3]
    assert len({ip for _, ip, _ in where}) == 4
    group.shutdown()
    job_ids = [info.job_id for info in client.cluster.list_jobs() if info.name == "tpu-actors"]
    for job_id in job_ids:
        release(client, job_id)
    assert group.is_done()


def test_tpu_actor_group_count_must_match_the_vms(client):
    with pytest.raises(ValueError, match="one member per VM"):
        client.create_actor_group(HostInfo, name="wrong", count=3, resources=ResourceConfig.with_tpu("v5litepod-16"))
