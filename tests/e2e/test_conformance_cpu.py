"""Marin's own cluster test cases (fray-api.md), against TpuCluster's CPU path."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import pytest

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import (
    Entrypoint,
    EnvironmentConfig,
    JobRequest,
    JobStatus,
    ResourceConfig,
)


@pytest.fixture
def cluster():
    c = TpuCluster(TpuClusterConfig(emulate=True))
    yield c
    c.shutdown(timeout=60)


def wait_status(cluster, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.poll(job_id)
        if JobStatus.finished(info.status):
            return info
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s: {cluster.poll(job_id)}")


def binary(name, *args):
    return JobRequest(name=name, entrypoint=Entrypoint.from_binary("python", list(args)),
                      environment=EnvironmentConfig.create())


def test_launched_job_is_listed(cluster):
    job_id = cluster.launch(binary("json-tool", "-m", "json.tool", "--help"))
    assert job_id in [info.job_id for info in cluster.list_jobs()]
    info = cluster.poll(job_id)
    assert info.name == "json-tool" and info.job_id == job_id


def test_terminate_is_prompt(cluster):
    job_id = cluster.launch(binary("sleeper", "-m", "time", "sleep", "10"))
    started = time.monotonic()
    cluster.terminate(job_id)
    assert time.monotonic() - started < 1.5
    assert cluster.poll(job_id).status == JobStatus.STOPPED


def test_binary_succeeds(cluster):
    job_id = cluster.launch(binary("json-help", "-m", "json.tool", "--help"))
    info = cluster.wait(job_id)
    assert info.status == "succeeded" and info.error_message is None


def test_closure_sees_env(cluster, tmp_path):
    out = tmp_path / "env.json"

    def write_env():
        def inner():
            out.write_text(json.dumps(dict(os.environ)))

        inner()

    request = JobRequest(name="env-writer", entrypoint=Entrypoint.from_callable(write_env),
                         environment=EnvironmentConfig.create(env_vars={"MY_CUSTOM_VAR": "hello"}))
    info = cluster.wait(cluster.launch(request))
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    env = json.loads(out.read_text())
    assert env["MY_CUSTOM_VAR"] == "hello"
    assert "FRAY_CLUSTER_SPEC" in env and env["JAX_PLATFORMS"] == "cpu"


def test_replicas_logs_and_failure(cluster, tmp_path, caplog):
    def replica_main(directory):
        replica = int(os.environ["FRAY_REPLICA_ID"])
        print(f"hello from {replica}")
        if replica == 1:
            sys.exit(1)
        with open(os.path.join(directory, f"replica-{replica}.json"), "w") as f:
            json.dump({"id": os.environ["FRAY_REPLICA_ID"], "count": os.environ["FRAY_REPLICA_COUNT"]}, f)

    request = JobRequest(name="replicas", entrypoint=Entrypoint.from_callable(replica_main, args=[str(tmp_path)]),
                         resources=ResourceConfig(replicas=3), environment=EnvironmentConfig.create())
    job_id = cluster.launch(request)
    with caplog.at_level(logging.INFO):
        info = cluster.monitor(job_id)
    text = caplog.text
    for i in range(3):
        assert f"[replica-{i}] hello from {i}" in text
    assert info.status == JobStatus.FAILED
    assert info.tasks[1].status == JobStatus.FAILED
    assert "replica-1" in info.error_message
    for i in (0, 2):
        assert json.loads((tmp_path / f"replica-{i}.json").read_text()) == {"id": str(i), "count": "3"}


def test_poll_unknown_id_raises_key_error(cluster):
    with pytest.raises(KeyError):
        cluster.poll("no-such-job")
    with pytest.raises(KeyError):
        cluster.terminate("no-such-job")


def test_failure_budget_retries_until_success(cluster, tmp_path):
    counter = tmp_path / "count"

    def flaky():
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n < 2:
            raise RuntimeError(f"failure number {n + 1}")

    request = JobRequest(name="flaky", entrypoint=Entrypoint.from_callable(flaky), max_retries_failure=2,
                         environment=EnvironmentConfig.create())
    job_id = cluster.launch(request)
    info = cluster.wait(job_id)
    assert info.status == JobStatus.SUCCEEDED and counter.read_text() == "3"
    assert cluster.job_counters(job_id).failures == 2


def test_failure_message_has_traceback(cluster):
    def boom():
        raise ValueError("the answer is not 41")

    info = cluster.wait(cluster.launch(JobRequest(name="boom", entrypoint=Entrypoint.from_callable(boom),
                                                  environment=EnvironmentConfig.create())))
    assert info.status == JobStatus.FAILED
    assert "replica-0" in info.error_message and "ValueError: the answer is not 41" in info.error_message


def test_local_clusters_run_side_by_side():
    from fray_tpu.local_runner import LocalCluster

    first, second = LocalCluster(), LocalCluster()
    try:
        jobs = [c.launch(binary(f"side-{i}", "-c", "print('ok')")) for i, c in enumerate((first, second))]
        assert [c.wait(j).status for c, j in zip((first, second), jobs)] == ["succeeded", "succeeded"]
    finally:
        first.shutdown(timeout=60)
        second.shutdown(timeout=60)
