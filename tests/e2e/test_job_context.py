"""The late-2025 job context inside fray-tpu jobs: run/put/get/wait on the host, and named actors
with get_if_exists shared by every job of the controller (fray_tpu's own context, and Marin's
``fray.job`` shape through the backend hook)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from client_jobs import create_named_and_return, share_named_counter, thread_context_basics

from fray_tpu.client import TpuClient
from fray_tpu.client_api import Entrypoint, JobRequest, JobStatus, wait_all
from fray_tpu.config import TpuClusterConfig

TIMEOUT = 120.0
STANDIN_FRAY = Path(__file__).resolve().parents[1] / "standin_fray"


@pytest.fixture(scope="module")
def client():
    c = TpuClient(TpuClusterConfig(emulate=True, poll_interval=0.2))
    yield c
    c.shutdown(wait=False)


def job(name: str, fn, *args) -> JobRequest:
    return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=args))


def test_run_put_get_wait_stay_local(client):
    assert client.submit(job("ctx-basics", thread_context_basics)).wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED


@pytest.mark.parametrize("marin_shape", [False, True], ids=["fray_tpu-context", "marin-fray.job-context"])
def test_two_running_jobs_share_one_named_actor(client, monkeypatch, marin_shape):
    """Two jobs running at once each create_actor(name=..., get_if_exists=True): both reach one
    actor (every increment of both lands in it), on the controller machine."""
    if marin_shape:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(STANDIN_FRAY), os.environ.get("PYTHONPATH")])))
    jobs = [client.submit(job(f"named-{i}", share_named_counter, marin_shape, 25, 50)) for i in range(2)]
    assert wait_all(jobs, timeout=TIMEOUT) == [JobStatus.SUCCEEDED] * 2
    lines = [line for j in jobs for line in j.logs() if "endpoint" in line]
    assert len(lines) == 2
    endpoints = {line.split("endpoint ")[1].split()[0] for line in lines}
    assert len(endpoints) == 1, lines
    assert all("TpuJobContext" in line for line in lines)


def test_a_named_actor_ends_with_its_job_and_its_name_is_freed(client):
    """A non-detached named actor belongs to the job that created it: after that job ends, the
    same name makes a new actor (fresh state)."""
    first = client.submit(job("owner-a", create_named_and_return, 5))
    assert first.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    second = client.submit(job("owner-b", create_named_and_return, 9))
    assert second.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    assert "[replica-0] value 5" in first.logs() and "[replica-0] value 9" in second.logs()
