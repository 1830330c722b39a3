"""Reaching the agents, end to end on the emulator: ``connect=external`` (nodes with external IPs,
the controller dialling them through each VM's NAT) and ``connect=internal`` (nodes without
external IPs, dialled at their internal addresses); an org policy forbidding external IPs; the
network tag on every node. Every test ends with zero resources left (the ``fake_gcp`` fixture).

The job callables are module-level functions shipped by value; their waits are bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
from fake_gcp import wait_for
from fake_gcp.host_jobs import wait_for_file, write_json

from fray_tpu import contract
from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig
from fray_tpu.naming import LABEL_JOB, label_value

cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT = 120.0
HOST_DEADLINE = 90.0
TPU_TYPE = "v5litepod-16"  # 4 VMs


def record_env_until(out_dir: str, go_file: str) -> None:
    """Write what this host sees, then wait (bounded) until the test lets the job finish."""
    write_json(Path(out_dir) / f"env-{os.environ['FRAY_TASK_INDEX']}.json", {
        "host_ip": os.environ.get(contract.HOST_IP_ENV),
        "coordinator": os.environ.get(contract.JAX_COORDINATOR_ADDRESS_ENV),
    })
    if not wait_for_file(go_file, HOST_DEADLINE):
        raise SystemExit(f"{go_file} never appeared")


@contextlib.contextmanager
def cluster_with(emulator_process, **config) -> Iterator[TpuCluster]:
    values = dict(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                  capacity_deadline=60.0, keep_warm=0)
    cluster = TpuCluster(TpuClusterConfig(**{**values, **config}))
    try:
        yield cluster
    finally:
        cluster.shutdown(timeout=JOB_TIMEOUT)


def request(out_dir: Path, workspace: str) -> JobRequest:
    return JobRequest(
        name="connect",
        entrypoint=Entrypoint.from_callable(record_env_until, args=[str(out_dir), str(out_dir / "go")]),
        resources=ResourceConfig.with_tpu(TPU_TYPE),
        environment=EnvironmentConfig.create(workspace=workspace),
    )


def job_node(fake_gcp, job_id: str) -> str:
    """The full name of the job's one READY node."""
    def ready():
        nodes = [n for n in fake_gcp.control.leaks()["nodes"]
                 if n["labels"].get(LABEL_JOB) == label_value(job_id) and n["state"] == "READY"]
        return nodes[0]["name"] if len(nodes) == 1 else None

    return wait_for(ready, f"the READY node of {job_id}", JOB_TIMEOUT)


def run_and_observe(cluster: TpuCluster, fake_gcp, out_dir: Path, workspace: str):
    """Run the job until every host reported, look at its node (through the API) and at the
    connections each VM's external address carried, then let it finish: (node, connections,
    what the hosts saw, the job's end)."""
    job_id = cluster.launch(request(out_dir, workspace))
    wait_for(lambda: len(list(out_dir.glob("env-*.json"))) == 4, "every host to report", JOB_TIMEOUT)
    name = job_node(fake_gcp, job_id)
    client = fake_gcp.client()
    try:
        node = client.get_node(name=name, timeout=30)
    finally:
        client.transport.close()
    connections = fake_gcp.control.host_connections(name.rsplit("/", 1)[-1])
    seen = {p.name: json.loads(p.read_text()) for p in out_dir.glob("env-*.json")}
    (out_dir / "go").write_text("")
    info = wait_for(lambda: (i := cluster.poll(job_id)) and JobStatus.finished(i.status) and i,
                    f"job {job_id} to finish", JOB_TIMEOUT)
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
    return node, connections, seen, info


def test_connect_external_dials_every_agent_at_its_external_ip(emulator_process, fake_gcp, workspace, out_dir):
    """connect=external: the node is created with external IPs and the fray-tpu tag; the job runs;
    every VM's external address carried the controller's connections (the agent listens only on
    its internal address, so they came through the NAT); the hosts still use the internal
    addresses among themselves (the JAX coordinator is worker 0's internal IP)."""
    with cluster_with(emulator_process, connect="external") as cluster:
        node, connections, seen, info = run_and_observe(cluster, fake_gcp, out_dir, workspace)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert node.network_config.enable_external_ips is True and list(node.tags) == ["fray-tpu"]
    internal = [e.ip_address for e in node.network_endpoints]
    external = [e.access_config.external_ip for e in node.network_endpoints]
    assert all(external) and not set(external) & set(internal)
    port = node.network_endpoints[0].port
    carried = {address: count for per_vm in connections for address, count in per_vm.items()}
    assert set(carried) == {f"{ip}:{port}" for ip in external}
    assert all(count >= 1 for count in carried.values()), f"an external address was never dialled: {carried}"
    assert {s["host_ip"] for s in seen.values()} == set(internal)
    coordinators = {s["coordinator"].rsplit(":", 1)[0] for s in seen.values()}
    assert coordinators <= set(internal) and len(coordinators) == 1


def test_connect_internal_on_nodes_without_external_ips(emulator_process, fake_gcp, workspace, out_dir):
    """connect=internal (the default) creates nodes without external IPs (no access_config, nothing
    NAT'd) carrying a configured network tag, and the job runs on the internal addresses."""
    with cluster_with(emulator_process, network_tag="train-vms") as cluster:
        node, connections, _, info = run_and_observe(cluster, fake_gcp, out_dir, workspace)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert node.network_config.enable_external_ips is False and list(node.tags) == ["train-vms"]
    assert [e.access_config.external_ip for e in node.network_endpoints] == [""] * 4
    assert connections == [{}] * 4


def test_connect_external_forbidden_by_org_policy_fails_at_once(emulator_process, fake_gcp, workspace, out_dir):
    """An org policy forbidding external IPs fails the create operation: the job fails at once
    (no other zone is tried, no hang) naming the constraint and connect=internal, leaving nothing."""
    fake_gcp.control.forbid_external_ips()
    started = time.monotonic()
    with cluster_with(emulator_process, connect="external") as cluster:
        job_id = cluster.launch(request(out_dir, workspace))
        info = wait_for(lambda: (i := cluster.poll(job_id)) and JobStatus.finished(i.status) and i,
                        f"job {job_id} to finish", JOB_TIMEOUT)
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
    assert info.status == JobStatus.FAILED
    assert "constraints/compute.vmExternalIpAccess" in info.error_message
    assert "connect=internal" in info.error_message
    assert time.monotonic() - started < 30, "the job waited instead of failing at once"
    creates = fake_gcp.control.counters().get("CreateNode", 0)
    assert creates == 1, f"{creates} creates: an org policy holds in every zone"
