"""examples/rl_loop.py end to end on the emulator, with one rollout's slice preempted mid-run.

Checks: the preempted rollout restarts on a new slice (new host) and keeps talking to the same
actors hosted in the coordinator (its result numbering resumes without gap or repeat); the other
rollout never restarts; the coordinator's state is whole; every slice is released at the end
(the ``fake_gcp`` fixture fails the test on a leak).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_gcp import wait_for
from package_fixtures import CLIENT_PACKAGES

from fray_tpu.actors.handles import TpuActorHandle
from fray_tpu.client import TpuClient
from fray_tpu.client_api import JobStatus
from fray_tpu.naming import LABEL_JOB, label_value


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 240.0
REPORTS = 40


@pytest.fixture(scope="module")
def rl_loop():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import rl_loop

        yield rl_loop
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def client(job_index_client):
    return job_index_client


def job_named(client: TpuClient, name: str):
    return next((info for info in client.cluster.list_jobs() if info.name == name), None)


def test_rl_loop_survives_a_rollout_preemption(rl_loop, client, fake_gcp, workspace):
    coordinator = client.submit(rl_loop.coordinator_request("rl-test", workspace, reports_per_rollout=REPORTS,
                                                                  host_packages=CLIENT_PACKAGES))
    endpoints = wait_for(lambda: rl_loop.coordinator_report(coordinator.logs(), "curriculum"),
                         "the coordinator to host its actors", TIMEOUT)
    curriculum = TpuActorHandle(endpoints["curriculum"])  # the driver calls an actor inside a job
    wait_for(lambda: curriculum.counts().get(0, 0) >= 3, "rollout 0 to report 3 results", TIMEOUT)

    rollout0 = job_named(client, "rl-test-rollout-0")
    nodes = [n for n in fake_gcp.control.leaks()["nodes"] if n["labels"].get(LABEL_JOB) == label_value(rollout0.job_id)]
    assert len(nodes) == 1  # v5litepod-4: one VM
    fake_gcp.control.preempt_node(nodes[0]["name"])

    assert coordinator.wait(timeout=TIMEOUT) == JobStatus.SUCCEEDED
    final = rl_loop.coordinator_report(coordinator.logs(), "final")
    assert final["rollouts"] == ["succeeded", "succeeded"]
    reports = final["final"]["reports"]
    by_rollout = {r: [x for x in reports if x["rollout"] == r] for r in (0, 1)}
    for rollout, mine in by_rollout.items():
        assert [x["index"] for x in mine] == list(range(len(mine))), f"rollout {rollout} numbering"
        assert len(mine) >= REPORTS
        versions = [x["version"] for x in mine]
        assert versions == sorted(versions)
    hosts0 = [x["host"] for x in by_rollout[0]]
    assert len(set(hosts0)) == 2, "rollout 0 should have moved to a new slice"
    assert len({x["host"] for x in by_rollout[1]}) == 1
    assert client.cluster.job_counters(rollout0.job_id).preemptions == 1
    assert client.cluster.job_counters(job_named(client, "rl-test-rollout-1").job_id).preemptions == 0
    assert final["version"] >= max(x["version"] for x in reports)

    for info in client.cluster.list_jobs():
        if info.name.startswith("rl-test"):
            assert JobStatus.finished(info.status)
            client.cluster.wait_released(info.job_id, timeout=TIMEOUT)
