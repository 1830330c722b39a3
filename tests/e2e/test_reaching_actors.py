"""Actors on TPU VMs reached from a driver outside the VPC (``connect=external``), end to end on
the emulator: each VM's actor server listens on its internal address at a fixed actor port; the
driver dials the VM's external IP at that port (the emulator's 1:1 NAT carries it), while TPU
hosts dial each other at their internal addresses.

The ``fake_gcp`` fixture fails a test that leaves a node alive.
"""

from __future__ import annotations

import pytest
from client_jobs import HostInfo
from package_fixtures import CLIENT_PACKAGES

from fray_tpu.actors.controller import ControllerService
from fray_tpu.client import TpuClient
from fray_tpu.client_api import ResourceConfig, create_environment
from fray_tpu.config import TpuClusterConfig
from fray_tpu.contract import ACTOR_PORTS

TIMEOUT = 180.0
TPU_TYPE = "v5litepod-16"  # 4 VMs


@pytest.fixture
def outside_client(emulator_process, job_package_index):
    """A Client API controller dialling its VMs at their external IPs."""
    client = TpuClient(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                                        lease_period=30.0, capacity_deadline=60.0, keep_warm=0, connect="external",
                                        index_url=job_package_index.url))
    yield client
    client.shutdown(wait=False)


def test_a_driver_outside_the_vpc_calls_tpu_actors_at_their_external_ips(outside_client, fake_gcp, workspace):
    """Every member of a TPU actor group answers the driver; each VM's NAT carried the driver's
    connection to an actor port (the member listens only on its internal address); the registry
    keeps the internal address, which TPU hosts dial, and gives the driver the external one."""
    group = outside_client.create_actor_group(
        HostInfo, name="outside", count=4, resources=ResourceConfig.with_tpu(TPU_TYPE),
        environment=create_environment(workspace=workspace, pip_packages=list(CLIENT_PACKAGES)))
    handles = group.wait_ready(timeout=TIMEOUT)
    where = [handle.where() for handle in handles]
    assert [index for index, _, _ in where] == [0, 1, 2, 3]

    [node] = [s for s in outside_client.cluster.live_slices() if s.state == "READY"]
    internal, external = list(node.endpoints), list(node.external_ips)
    assert all(external) and not set(external) & set(internal)
    carried = fake_gcp.control.host_connections(node.resource_name.rsplit("/", 1)[-1])
    actor_addresses = {f"{ip}:{port}" for ip in external for port in ACTOR_PORTS}
    assert all(set(per_vm) & actor_addresses for per_vm in carried), f"a VM's actor port was never dialled: {carried}"

    service: ControllerService = outside_client._service
    for handle, (_, host_ip, _) in zip(handles, where):
        inside = service.rpc_lookup(handle.endpoint, True)
        outside = service.rpc_lookup(handle.endpoint)
        host, port = inside.rsplit(":", 1)
        assert host == host_ip and int(port) in ACTOR_PORTS
        assert outside == f"{external[internal.index(host)]}:{port}"
    group.shutdown()
    for info in outside_client.cluster.list_jobs():
        outside_client.cluster.wait_released(info.job_id, timeout=TIMEOUT)
    assert group.is_done()
