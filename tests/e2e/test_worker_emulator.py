"""The agent on emulated TPU VMs: a v5litepod-16 node whose startup-script (the real bootstrap)
runs `python -m fray_tpu.worker` on each of its 4 hosts; the controller dials all of them."""

from __future__ import annotations

import os
import time

from fake_gcp import node_spec, node_state, polling, wait_for

import fray_tpu
from fray_tpu import tls
from fray_tpu.contract import GUEST_NAMESPACE, GUEST_TLS_CERT
from fray_tpu.config import TpuClusterConfig
from fray_tpu.hostboot import bootstrapper_for
from fray_tpu.channel import (
    AgentClient,
    AgentUnreachable,
    AttemptExit,
    AttemptSpec,
    AttemptStarted,
    Classification,
    LogBatch,
)
from fray_tpu.worker import metadata as md
from worker_host import collect


ZONE = "us-west4-a"
TIMEOUT = 60.0


def test_a_v5litepod_16_boots_four_agents_that_run_a_closure_and_delete_the_node_when_the_lease_lapses(
    fake_gcp, tpu_client
):
    secret = tls.make_secret()
    parent = fake_gcp.parent(ZONE)
    name = f"{parent}/nodes/agents-1"
    metadata = {
        md.ATTR_SECRET_SHA256: tls.secret_sha256(secret),
        md.ATTR_NODE: name,
        md.ATTR_API_ENDPOINT: fake_gcp.endpoint,
        md.ATTR_LEASE_SECONDS: "120",
        md.ATTR_SELF_DELETE: "true",
        md.ATTR_JOB: "emulated-job",
    }
    config = TpuClusterConfig(emulate=True, emulator_endpoint=fake_gcp.endpoint)
    script = bootstrapper_for(config, fake_gcp.endpoint).startup_script("v2-alpha-tpuv5-lite")
    node = tpu_client.create_node(
        parent=parent, node_id="agents-1", node=node_spec("v5litepod-16", startup_script=script, metadata=metadata)
    ).result(timeout=TIMEOUT, polling=polling(TIMEOUT))
    addresses = [f"{endpoint.ip_address}:{endpoint.port}" for endpoint in node.network_endpoints]
    assert len(addresses) == 4
    certs = wait_for(lambda: agent_certs(tpu_client, name), "every agent to publish its certificate", TIMEOUT)
    clients = [AgentClient(a, secret=secret, pinned_cert_pem=cert, timeout=10, reconnect_seconds=5)
               for a, cert in zip(addresses, certs)]
    try:
        run_the_slice(fake_gcp, tpu_client, name, node, clients)
    except Exception as error:
        raise AssertionError(f"{error}\n{host_logs(fake_gcp, name)}") from error
    finally:
        for client in clients:
            client.close()


def agent_certs(tpu_client, name: str) -> list[bytes] | None:
    """Each worker's certificate from its guest attributes (one GetGuestAttributes call)."""
    response = tpu_client.get_guest_attributes(request={"name": name, "query_path": f"{GUEST_NAMESPACE}/{GUEST_TLS_CERT}"})
    certs = [[item.value.encode() for item in entry.query_value.items] for entry in response.guest_attributes]
    return [c[0] for c in certs] if certs and all(certs) else None


def host_logs(fake_gcp, name: str) -> str:
    logs = []
    for worker in range(4):
        try:
            logs.append(f"--- worker {worker}:\n{fake_gcp.control.host_log(name, worker)}")
        except Exception as error:  # noqa: BLE001 - diagnostics only
            logs.append(f"--- worker {worker}: no log ({error})")
    return "\n".join(logs)


def run_the_slice(fake_gcp, tpu_client, name, node, clients: list[AgentClient]) -> None:
    infos = [client.wait_until_up(time.monotonic() + TIMEOUT) for client in clients]
    assert [info.worker_number for info in infos] == [0, 1, 2, 3]
    assert {info.accelerator_type for info in infos} == {"v5litepod-16"}
    assert [info.ip for info in infos] == [endpoint.ip_address for endpoint in node.network_endpoints]

    # A standard-library callable pickled by reference: the hosts' Python 3.10 loads it (a
    # function of this module, pickled by value by Python 3.11, it could not).
    for client in clients:
        client.prepare(AttemptSpec.for_callable("hello", os.system, ("echo hello $FRAY_TPU_WORKER_NUMBER",)))
    streams = [client.start("hello") for client in clients]
    for worker, stream in enumerate(streams):
        events = collect(stream, TIMEOUT)
        assert [line for e in events if isinstance(e, LogBatch) for line in e.lines] == [f"hello {worker}"]
        assert events[-1].classification == Classification.OK

    for client in clients:
        client.prepare(AttemptSpec("forever", command="sleep", args=["600"]))
    streams = [client.start("forever") for client in clients]
    for stream in streams:
        assert isinstance(stream.next_event(timeout=TIMEOUT), AttemptStarted)
    # The controller shortens its lease and goes silent: the hosts stop their attempts and
    # worker 0 deletes the node (which may take the other hosts down before their own lease ends).
    for client in clients:
        client.renew_lease(1.0)
    outcomes = []
    for stream in streams:
        try:
            finished = collect(stream, TIMEOUT)[-1]
        except AgentUnreachable:
            outcomes.append("host gone with the node")
            continue
        assert isinstance(finished, AttemptExit)
        assert finished.classification == Classification.CANCELLED and "lease expired" in finished.reason
        outcomes.append("cancelled")
    assert outcomes[0] == "cancelled", "worker 0 stops its attempt before it deletes the node"
    wait_for(lambda: node_state(tpu_client, name) == "GONE", f"node {name} to delete itself", TIMEOUT)
