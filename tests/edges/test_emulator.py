"""Conformance of the Cloud TPU emulator, driven through the unmodified ``tpu_v2.TpuClient`` against
the emulator running as its own process (tests/fake_gcp), plus its booted hosts and fault control."""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from fake_gcp import (
    EmulatorProcess,
    create_node,
    delete_node,
    held_in_creating,
    make_tpu_client,
    node_spec,
    node_state,
    operations_never_finish,
    polling,
    process_alive,
    queued_resource_state,
    stocked_out,
    wait_for,
    wait_hosts,
    wait_node_state,
    wait_queued_resource_state,
)
from google.api_core import exceptions
from google.cloud import tpu_v2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from fray_tpu.emulator import EmulatorTimings

pytest_plugins = ["fake_gcp.fixtures", "pytester"]

V5E_ZONE = "us-west4-a"
V4_ZONE = "us-central2-b"
TIMEOUT = 20.0

# Each host reads its identity from its own metadata server and writes it to worker.json.
IDENTITY_SCRIPT = r"""
setsid sleep 300 &
echo $! > detached.pid
python3 - <<'PY'
import json, os, urllib.request
def get(path):
    request = urllib.request.Request(
        "http://" + os.environ["GCE_METADATA_HOST"] + "/computeMetadata/v1/" + path,
        headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=10).read().decode()
identity = {
    "worker": get("instance/attributes/agent-worker-number"),
    "ip": get("instance/network-interfaces/0/ip"),
    "endpoints": get("instance/attributes/worker-network-endpoints"),
    "custom": get("instance/attributes/job-secret"),
}
with open("worker.json.tmp", "w") as f:
    json.dump(identity, f)
os.rename("worker.json.tmp", "worker.json")
PY
sleep 300
"""

# Each host long-polls `preempted` and records the value that ended the wait.
PREEMPT_WATCH_SCRIPT = r"""
python3 - <<'PY'
import os, urllib.request
url = "http://" + os.environ["GCE_METADATA_HOST"] + "/computeMetadata/v1/instance/preempted"
def get(query=""):
    request = urllib.request.Request(url + query, headers={"Metadata-Flavor": "Google"})
    return urllib.request.urlopen(request, timeout=90)
etag = get().headers["ETag"]
open("watching", "w").close()
body = get(f"?wait_for_change=true&timeout_sec=60&last_etag={etag}").read()
open("preempted.tmp", "w").write(body.decode())
os.rename("preempted.tmp", "preempted.txt")
PY
sleep 300
"""


def metadata_get(endpoint: str, path: str, flavor: bool = True) -> str:
    headers = {"Metadata-Flavor": "Google"} if flavor else {}
    request = urllib.request.Request(f"http://{endpoint}/computeMetadata/v1/{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Metadata-Flavor"] == "Google"
        return response.read().decode()




def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0]


# -- nodes ------------------------------------------------------------------------------------


def test_create_node_result_is_ready_with_one_endpoint_per_vm(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    operation = tpu_client.create_node(
        parent=parent, node_id="ready-1", node=node_spec("v5litepod-16", labels={"job": "j1"}, metadata={"k": "v"})
    )
    assert tpu_client.get_node(name=f"{parent}/nodes/ready-1").state == tpu_v2.Node.State.CREATING
    assert not tpu_client.get_node(name=f"{parent}/nodes/ready-1").network_endpoints
    node = operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT))
    assert node.name == f"{parent}/nodes/ready-1"
    assert node.state == tpu_v2.Node.State.READY
    assert node.health == tpu_v2.Node.Health.HEALTHY
    assert node.accelerator_type == "v5litepod-16"
    assert node.runtime_version == "v2-alpha-tpuv5-lite"
    assert dict(node.labels) == {"job": "j1"} and dict(node.metadata) == {"k": "v"}
    assert node.scheduling_config.spot is False and node.create_time
    assert len(node.network_endpoints) == 4
    ips = [endpoint.ip_address for endpoint in node.network_endpoints]
    assert len(set(ips)) == 4 and all(ipaddress.ip_address(ip).is_loopback for ip in ips)
    assert {endpoint.port for endpoint in node.network_endpoints} == {8477}
    assert operation.metadata.verb == "create" and operation.metadata.target == node.name
    assert tpu_client.get_node(name=node.name).network_endpoints == node.network_endpoints
    delete_node(tpu_client, node.name)
    assert node_state(tpu_client, node.name) == "GONE"


def test_create_operation_may_finish_after_the_node_is_ready(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    with operations_never_finish(fake_gcp.control):
        operation = tpu_client.create_node(parent=parent, node_id="slow-op", node=node_spec("v5litepod-8"))
        wait_node_state(tpu_client, f"{parent}/nodes/slow-op", "READY")
        assert not operation.done()
    assert operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT)).state == tpu_v2.Node.State.READY
    delete_node(tpu_client, f"{parent}/nodes/slow-op")


def test_list_nodes_pages_through_every_node(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.set_timings(create_delay=0.0, operation_lag=0.0, delete_delay=0.0)
    operations = [
        tpu_client.create_node(parent=parent, node_id=f"page-{i}", node=node_spec("v5litepod-1")) for i in range(5)
    ]
    for operation in operations:
        operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT))
    fake_gcp.control.reset_counters()
    pages = list(tpu_client.list_nodes(request={"parent": parent, "page_size": 2}).pages)
    assert [len(page.nodes) for page in pages] == [2, 2, 1]
    assert sorted(n.name.rsplit("/", 1)[-1] for p in pages for n in p.nodes) == [f"page-{i}" for i in range(5)]
    assert fake_gcp.control.counters()["ListNodes"] == 3
    assert list(tpu_client.list_nodes(parent=fake_gcp.parent(V4_ZONE))) == []
    everywhere = list(tpu_client.list_nodes(parent=f"projects/{fake_gcp.project}/locations/-"))
    assert len(everywhere) == 5
    with pytest.raises(exceptions.InvalidArgument, match="page_token"):
        tpu_client.list_nodes(request={"parent": parent, "page_token": "not-a-token!"})
    deletes = [tpu_client.delete_node(name=f"{parent}/nodes/page-{i}") for i in range(5)]
    for operation in deletes:
        operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT))


@pytest.mark.parametrize(
    ("zone", "node_id", "node", "error", "message"),
    [
        (V5E_ZONE, "Bad_Name", node_spec("v5litepod-8"), exceptions.InvalidArgument, "node_id"),
        (V5E_ZONE, "x" * 64, node_spec("v5litepod-8"), exceptions.InvalidArgument, "at most 63"),
        (V5E_ZONE, "ends-with-", node_spec("v5litepod-8"), exceptions.InvalidArgument, "node_id"),
        (V5E_ZONE, "bad-label", node_spec("v5litepod-8", labels={"Job": "x"}), exceptions.InvalidArgument, "label key"),
        (V5E_ZONE, "bad-value", node_spec("v5litepod-8", labels={"job": "X Y"}), exceptions.InvalidArgument, "label value"),
        (V4_ZONE, "wrong-zone", node_spec("v5litepod-16"), exceptions.InvalidArgument, "could not be found in the zonal accelerator configurations"),
        (V5E_ZONE, "bad-type", tpu_v2.Node(accelerator_type="v5e-16", runtime_version="v2-alpha-tpuv5-lite"),
         exceptions.InvalidArgument, "v5litepod-16"),
        (V5E_ZONE, "bad-runtime", node_spec("v5litepod-8", runtime_version="tpu-vm-nope"),
         exceptions.InvalidArgument, "runtime version"),
        ("us-nowhere1-z", "no-zone", node_spec("v5litepod-8"), exceptions.PermissionDenied,
         "us-nowhere1-z is not found or access is unauthorized"),
    ],
)
def test_create_node_rejects_invalid_requests(fake_gcp, tpu_client, zone, node_id, node, error, message):
    with pytest.raises(error, match=message):
        tpu_client.create_node(parent=fake_gcp.parent(zone), node_id=node_id, node=node)
    assert fake_gcp.control.leaks()["nodes"] == []


def test_already_exists_and_not_found(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "twice", node_spec("v5litepod-8"))
    with pytest.raises(exceptions.AlreadyExists, match="twice"):
        tpu_client.create_node(parent=parent, node_id="twice", node=node_spec("v5litepod-8"))
    delete_node(tpu_client, node.name)
    with pytest.raises(exceptions.NotFound):
        tpu_client.get_node(name=node.name)
    with pytest.raises(exceptions.NotFound):
        tpu_client.delete_node(name=node.name)


def test_quota_error_fails_the_create_call_itself(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.quota_error(count=1)
    with pytest.raises(exceptions.ResourceExhausted, match="Quota"):
        tpu_client.create_node(parent=parent, node_id="quota", node=node_spec("v5litepod-8"))
    assert node_state(tpu_client, f"{parent}/nodes/quota") == "GONE"
    node = create_node(tpu_client, parent, "quota", node_spec("v5litepod-8"))
    delete_node(tpu_client, node.name)


def test_stockout_fails_the_operation_with_code_8_and_leaves_no_node(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    with stocked_out(fake_gcp.control, V5E_ZONE):
        operation = tpu_client.create_node(parent=parent, node_id="stocked", node=node_spec("v5litepod-16"))
        with pytest.raises(exceptions.ResourceExhausted, match="no more capacity"):
            operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT))
    assert operation.exception().code == 429 and operation.operation.error.code == 8
    assert node_state(tpu_client, f"{parent}/nodes/stocked") == "GONE"
    other = create_node(tpu_client, fake_gcp.parent("europe-west4-b"), "stocked", node_spec("v5litepod-16"))
    delete_node(tpu_client, other.name)


def test_stockout_with_count_fails_only_that_many_creates(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.stockout(V5E_ZONE, count=1, delay=0.0)
    first = tpu_client.create_node(parent=parent, node_id="first", node=node_spec("v5litepod-8"))
    with pytest.raises(exceptions.ResourceExhausted):
        first.result(timeout=TIMEOUT, polling=polling(TIMEOUT))
    node = create_node(tpu_client, parent, "second", node_spec("v5litepod-8"))
    delete_node(tpu_client, node.name)


@pytest.mark.parametrize(("code", "error"), [(429, exceptions.TooManyRequests), (503, exceptions.ServiceUnavailable)])
def test_injected_failures_hit_the_next_calls_of_a_method(fake_gcp, tpu_client, code, error):
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.fail_next("ListNodes", code, count=2)
    for _ in range(2):
        with pytest.raises(error):
            list(tpu_client.list_nodes(parent=parent))
    assert list(tpu_client.list_nodes(parent=parent)) == []
    assert fake_gcp.control.counters()["ListNodes"] == 3


def test_control_rejects_unknown_methods_and_zones_naming_the_valid_ones(fake_gcp):
    with pytest.raises(ValueError, match="ListNodes"):
        fake_gcp.control.fail_next("ListNode", 503)
    with pytest.raises(ValueError, match="us-west4-a"):
        fake_gcp.control.stockout("us-west4-z")
    with pytest.raises(ValueError, match="no booted node"):
        fake_gcp.control.hosts("no-such-node")


def test_delete_while_creating(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    with held_in_creating(fake_gcp.control, "held"):
        create = tpu_client.create_node(parent=parent, node_id="held-1", node=node_spec("v5litepod-8"))
        assert node_state(tpu_client, f"{parent}/nodes/held-1") == "CREATING"
        delete_node(tpu_client, f"{parent}/nodes/held-1")
    assert node_state(tpu_client, f"{parent}/nodes/held-1") == "GONE"
    with pytest.raises(exceptions.Aborted):
        create.result(timeout=TIMEOUT, polling=polling(TIMEOUT))


def test_hold_keeps_a_node_creating_until_released(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.hold_creating("stuck")
    operation = tpu_client.create_node(parent=parent, node_id="stuck", node=node_spec("v5litepod-8"))
    with pytest.raises(TimeoutError):
        operation.result(timeout=0.5, polling=polling(0.5))
    assert node_state(tpu_client, f"{parent}/nodes/stuck") == "CREATING"
    fake_gcp.control.release("stuck")
    assert operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT)).state == tpu_v2.Node.State.READY
    delete_node(tpu_client, f"{parent}/nodes/stuck")


def test_vanished_node_is_not_found(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "ghost", node_spec("v5litepod-8"))
    fake_gcp.control.vanish_node(node.name)
    with pytest.raises(exceptions.NotFound):
        tpu_client.get_node(name=node.name)
    assert fake_gcp.control.leaks()["nodes"] == []


# -- hosts --------------------------------------------------------------------------------------


def test_startup_script_runs_on_every_host_with_its_own_metadata(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(
        tpu_client, parent, "boot-16", node_spec("v5litepod-16", IDENTITY_SCRIPT, metadata={"job-secret": "s3"})
    )
    hosts = wait_hosts(
        fake_gcp.control, node.name, lambda hs: all((Path(h["workdir"]) / "worker.json").exists() for h in hs), "all wrote worker.json"
    )
    identities = [json.loads((Path(h["workdir"]) / "worker.json").read_text()) for h in hosts]
    node_ips = [endpoint.ip_address for endpoint in node.network_endpoints]
    assert [i["worker"] for i in identities] == ["0", "1", "2", "3"]
    assert [i["ip"] for i in identities] == node_ips == [h["ip"] for h in hosts]
    assert len(set(node_ips)) == 4 and all(ipaddress.ip_address(ip).is_loopback for ip in node_ips)
    assert all([e.split(":")[2] for e in i["endpoints"].split(",")] == node_ips for i in identities)
    assert {i["custom"] for i in identities} == {"s3"}
    assert len({h["workdir"] for h in hosts}) == 4 and all(h["alive"] for h in hosts)

    endpoint = hosts[2]["metadata_endpoint"]
    assert endpoint.startswith(hosts[2]["ip"] + ":")
    assert "WORKER_ID: '2'" in metadata_get(endpoint, "instance/attributes/tpu-env")
    assert metadata_get(endpoint, "instance/attributes/accelerator-type") == "v5litepod-16"
    assert metadata_get(endpoint, "instance/preempted") == "FALSE"
    assert metadata_get(endpoint, "instance/zone").endswith(f"/zones/{V5E_ZONE}")
    assert metadata_get(endpoint, "project/project-id") == fake_gcp.project
    assert "startup-script" in metadata_get(endpoint, "instance/attributes/").split()
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        metadata_get(endpoint, "instance/attributes/agent-worker-number", flavor=False)
    assert forbidden.value.code == 403

    pids = [h["pid"] for h in hosts]
    detached = [int((Path(h["workdir"]) / "detached.pid").read_text()) for h in hosts]
    assert all(process_alive(pid) for pid in pids + detached)
    delete_node(tpu_client, node.name)
    wait_for(lambda: not any(process_alive(pid) for pid in pids + detached), "every host process to end")
    assert not any(h["alive"] for h in fake_gcp.control.hosts(node.name))


def test_preemption_flips_preempted_then_kills_hosts_and_node_stays(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V4_ZONE)
    fake_gcp.control.set_timings(preempt_notice=2.0)
    node = create_node(tpu_client, parent, "spot-1", node_spec("v4-16", PREEMPT_WATCH_SCRIPT, spot=True))
    wait_hosts(fake_gcp.control, node.name, lambda hs: all((Path(h["workdir"]) / "watching").exists() for h in hs), "watching")
    fake_gcp.control.preempt_node(node.name)
    hosts = wait_hosts(
        fake_gcp.control, node.name, lambda hs: all((Path(h["workdir"]) / "preempted.txt").exists() for h in hs), "saw preemption"
    )
    assert [(Path(h["workdir"]) / "preempted.txt").read_text() for h in hosts] == ["TRUE", "TRUE"]
    wait_node_state(tpu_client, node.name, "PREEMPTED")
    wait_hosts(fake_gcp.control, node.name, lambda hs: not any(h["alive"] for h in hs), "all killed")
    assert [n.name for n in tpu_client.list_nodes(parent=parent)] == [node.name]
    assert fake_gcp.control.leaks()["nodes"][0]["state"] == "PREEMPTED"
    delete_node(tpu_client, node.name)


def test_kill_freeze_thaw_and_set_preempted_on_one_host(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V4_ZONE)
    node = create_node(tpu_client, parent, "faulty", node_spec("v4-32", "sleep 300"))
    hosts = wait_hosts(fake_gcp.control, node.name, lambda hs: all(h["alive"] for h in hs), "alive")
    assert len(hosts) == 4
    fake_gcp.control.kill_host(node.name, 1)
    hosts = fake_gcp.control.hosts(node.name)
    assert [h["alive"] for h in hosts] == [True, False, True, True]
    fake_gcp.control.freeze_host(node.name, 2)
    assert fake_gcp.control.hosts(node.name)[2]["frozen"]
    wait_for(lambda: process_state(hosts[2]["pid"]) == "T", "host 2 to be stopped")
    fake_gcp.control.thaw_host(node.name, 2)
    wait_for(lambda: process_state(hosts[2]["pid"]) == "S", "host 2 to run again")
    fake_gcp.control.set_preempted(node.name, 3)
    assert metadata_get(hosts[3]["metadata_endpoint"], "instance/preempted") == "TRUE"
    assert metadata_get(hosts[0]["metadata_endpoint"], "instance/preempted") == "FALSE"
    assert node_state(tpu_client, node.name) == "READY"
    delete_node(tpu_client, node.name)


def test_guest_attributes_written_on_a_host_are_readable_through_the_api(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V4_ZONE)
    script = r"""python3 - <<'PY'
import os, urllib.request
request = urllib.request.Request(
    "http://" + os.environ["GCE_METADATA_HOST"] + "/computeMetadata/v1/instance/guest-attributes/fray/ready",
    data=b"yes-" + os.environ["FRAY_TPU_HOST_IP"].encode(), method="PUT", headers={"Metadata-Flavor": "Google"})
urllib.request.urlopen(request, timeout=10).read()
PY
"""
    node = create_node(tpu_client, parent, "guests", node_spec("v4-16", script))

    def attributes():
        response = tpu_client.get_guest_attributes(request={"name": node.name, "query_path": "fray/"})
        values = [[item.value for item in g.query_value.items] for g in response.guest_attributes]
        return values if all(values) else None

    values = wait_for(attributes, "both hosts to publish fray/ready")
    assert values == [[f"yes-{e.ip_address}"] for e in node.network_endpoints]
    delete_node(tpu_client, node.name)


# -- queued resources ---------------------------------------------------------------------------


def queued_resource(parent: str, node: tpu_v2.Node, node_id: str = "", node_count: int = 0, prefix: str = ""):
    spec = tpu_v2.QueuedResource.Tpu.NodeSpec(parent=parent, node=node)
    if node_count:
        spec.multislice_params = tpu_v2.QueuedResource.Tpu.NodeSpec.MultisliceParams(
            node_count=node_count, node_id_prefix=prefix
        )
    else:
        spec.node_id = node_id
    return tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[spec]), spot=tpu_v2.QueuedResource.Spot())


def delete_queued(client, name: str, force: bool) -> None:
    client.delete_queued_resource(request={"name": name, "force": force}).result(
        timeout=TIMEOUT, polling=polling(TIMEOUT)
    )


def test_queued_resource_single_node_becomes_active_and_needs_force_to_delete(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    name = f"{parent}/queuedResources/qr-one"
    operation = tpu_client.create_queued_resource(
        parent=parent, queued_resource_id="qr-one", queued_resource=queued_resource(parent, node_spec("v5litepod-8"), "qr-node")
    )
    assert operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT)).name == name
    wait_queued_resource_state(tpu_client, name, "ACTIVE")
    node = tpu_client.get_node(name=f"{parent}/nodes/qr-node")
    assert node.state == tpu_v2.Node.State.READY and node.queued_resource == name
    with pytest.raises(exceptions.FailedPrecondition, match="force"):
        tpu_client.delete_queued_resource(name=name)
    delete_queued(tpu_client, name, force=True)
    assert queued_resource_state(tpu_client, name) == "GONE"
    assert node_state(tpu_client, node.name) == "GONE"


def test_queued_resource_multislice_creates_node_count_nodes(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    name = f"{parent}/queuedResources/qr-multi"
    tpu_client.create_queued_resource(
        parent=parent,
        queued_resource_id="qr-multi",
        queued_resource=queued_resource(parent, node_spec("v5litepod-16"), node_count=2, prefix="slice"),
    )
    wait_queued_resource_state(tpu_client, name, "ACTIVE")
    nodes = {n.name.rsplit("/", 1)[-1]: n for n in tpu_client.list_nodes(parent=parent)}
    assert sorted(nodes) == ["slice-0", "slice-1"]
    assert all(n.multislice_node and len(n.network_endpoints) == 4 for n in nodes.values())
    all_ips = [e.ip_address for n in nodes.values() for e in n.network_endpoints]
    assert len(set(all_ips)) == 8
    delete_queued(tpu_client, name, force=True)
    assert list(tpu_client.list_nodes(parent=parent)) == []


def test_stocked_out_queued_resource_waits_until_capacity_returns(fake_gcp, tpu_client):
    """A queued resource in a stocked-out zone stays WAITING_FOR_RESOURCES (it does not fail) while
    another zone's is granted meanwhile, and is granted once capacity returns."""
    parent = fake_gcp.parent(V5E_ZONE)
    other_parent = fake_gcp.parent("europe-west4-b")
    name = f"{parent}/queuedResources/qr-wait"
    other = f"{other_parent}/queuedResources/qr-other"
    with stocked_out(fake_gcp.control, V5E_ZONE):
        tpu_client.create_queued_resource(
            parent=parent, queued_resource_id="qr-wait", queued_resource=queued_resource(parent, node_spec("v5litepod-8"), "waits")
        )
        tpu_client.create_queued_resource(
            parent=other_parent, queued_resource_id="qr-other",
            queued_resource=queued_resource(other_parent, node_spec("v5litepod-8"), "other"),
        )
        wait_queued_resource_state(tpu_client, other, "ACTIVE")
        assert queued_resource_state(tpu_client, name) == "WAITING_FOR_RESOURCES"
    wait_queued_resource_state(tpu_client, name, "ACTIVE")
    delete_queued(tpu_client, name, force=True)
    delete_queued(tpu_client, other, force=True)
    assert queued_resource_state(tpu_client, name) == "GONE"


def test_queued_resource_expires_by_its_queueing_policy_and_stays_until_deleted(fake_gcp, tpu_client):
    """A waiting queued resource whose valid_until passes is FAILED with the expiry error (not a
    stockout) and stays listed until deleted."""
    parent = fake_gcp.parent(V5E_ZONE)
    name = f"{parent}/queuedResources/qr-expire"
    request = queued_resource(parent, node_spec("v5litepod-8"), "never")
    request.queueing_policy = tpu_v2.QueuedResource.QueueingPolicy(valid_until_duration={"seconds": 0, "nanos": 300_000_000})
    with stocked_out(fake_gcp.control, V5E_ZONE):
        tpu_client.create_queued_resource(parent=parent, queued_resource_id="qr-expire", queued_resource=request)
        wait_queued_resource_state(tpu_client, name, "FAILED")
    failed = tpu_client.get_queued_resource(name=name)
    assert failed.state.failed_data.error.code == 4
    assert "valid_until" in failed.state.failed_data.error.message
    assert [q.name for q in tpu_client.list_queued_resources(parent=parent)] == [name]
    assert node_state(tpu_client, f"{parent}/nodes/never") == "GONE"
    delete_queued(tpu_client, name, force=False)
    assert queued_resource_state(tpu_client, name) == "GONE"


def test_queued_resource_granted_late_and_suspended_on_preemption(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    name = f"{parent}/queuedResources/qr-late"
    with held_in_creating(fake_gcp.control, "qr-late"):
        tpu_client.create_queued_resource(
            parent=parent, queued_resource_id="qr-late", queued_resource=queued_resource(parent, node_spec("v5litepod-8"), "late-node")
        )
        wait_for(lambda: fake_gcp.control.leaks()["queued_resources"], "the queued resource to exist")
        assert queued_resource_state(tpu_client, name) == "WAITING_FOR_RESOURCES"
    wait_queued_resource_state(tpu_client, name, "ACTIVE")
    fake_gcp.control.preempt_node(f"{parent}/nodes/late-node")
    wait_queued_resource_state(tpu_client, name, "SUSPENDED")
    assert node_state(tpu_client, f"{parent}/nodes/late-node") == "PREEMPTED"
    delete_queued(tpu_client, name, force=True)


# -- operations, catalog, reports -----------------------------------------------------------------


def test_operations_list_wait_and_delete(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "ops", node_spec("v5litepod-8"))
    operations = list(tpu_client.list_operations(request={"name": parent}).operations)
    assert [o.done for o in operations] == [True]
    delete = tpu_client.delete_node(name=node.name)
    stub = grpc.insecure_channel(fake_gcp.endpoint).unary_unary(
        "/google.longrunning.Operations/WaitOperation",
        request_serializer=operations_pb2.WaitOperationRequest.SerializeToString,
        response_deserializer=operations_pb2.Operation.FromString,
    )
    waited = stub(
        operations_pb2.WaitOperationRequest(name=delete.operation.name, timeout=duration_pb2.Duration(seconds=10)),
        timeout=15,
    )
    assert waited.done and not waited.HasField("error")
    tpu_client.delete_operation(request={"name": delete.operation.name})
    with pytest.raises(exceptions.NotFound):
        tpu_client.get_operation(request={"name": delete.operation.name})


def test_catalog_of_accelerator_types_and_runtime_versions(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    types = [t.type_ for t in tpu_client.list_accelerator_types(parent=parent)]
    assert "v5litepod-16" in types and "v4-8" not in types
    accelerator = tpu_client.get_accelerator_type(name=f"{parent}/acceleratorTypes/v5litepod-16")
    assert accelerator.accelerator_configs[0].topology == "4x4"
    with pytest.raises(exceptions.NotFound):
        tpu_client.get_accelerator_type(name=f"{parent}/acceleratorTypes/v4-8")
    versions = [v.version for v in tpu_client.list_runtime_versions(parent=parent)]
    assert "v2-alpha-tpuv5-lite" in versions and "tpu-ubuntu2204-base" in versions


def test_counters_and_leak_report(fake_gcp, tpu_client):
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "counted", node_spec("v5litepod-8", labels={"fray-job": "j7"}))
    counters = fake_gcp.control.counters()
    assert counters["CreateNode"] == 1 and counters["GetOperation"] >= 1
    assert fake_gcp.control.leaks()["nodes"] == [
        {"name": node.name, "state": "READY", "labels": {"fray-job": "j7"}, "queued_resource": ""}
    ]
    delete_node(tpu_client, node.name)
    assert fake_gcp.control.leaks() == {"nodes": [], "queued_resources": []}


def test_leak_check_fails_a_test_that_leaves_a_node_and_cleans_up_after_it(pytester):
    pytester.makepyfile(
        test_leaky="""
        from fake_gcp import create_node, node_spec

        pytest_plugins = ["fake_gcp.fixtures"]

        def test_leaves_a_node(fake_gcp, tpu_client):
            create_node(tpu_client, fake_gcp.parent("us-west4-a"), "leaked", node_spec("v5litepod-8"))

        def test_next_test_starts_clean(fake_gcp):
            assert fake_gcp.control.leaks() == {"nodes": [], "queued_resources": []}
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*resources left alive at the end of the test*", "*nodes/leaked*"])


def test_emulator_process_prints_endpoint_and_stops_cleanly_on_sigterm(tmp_path):
    process = EmulatorProcess(timings=EmulatorTimings.zero(), root=tmp_path)
    process.start()
    try:
        host, port = process.endpoint.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        client = make_tpu_client(process.endpoint)
        parent = f"projects/standalone/locations/{V5E_ZONE}"
        node = create_node(client, parent, "lonely", node_spec("v5litepod-8", "sleep 300"))
        hosts = wait_hosts(process.control, node.name, lambda hs: all(h["alive"] for h in hs), "alive")
        client.transport.close()
    finally:
        exit_code = process.stop()
    assert exit_code == 0
    wait_for(lambda: not process_alive(hosts[0]["pid"]), "the host to end with the emulator")
    assert not os.path.exists(f"/proc/{process.pid}")


def test_repairing_and_maintenance_health_fault_controls(fake_gcp, tpu_client):
    """A READY node put into REPAIRING reads REPAIRING (hosts still up) and READY again after its
    repair time; a health fault shows UNHEALTHY_MAINTENANCE until cleared; the endpoint reversal
    fault lists a new node's endpoints in reverse worker order."""
    parent = fake_gcp.parent(V5E_ZONE)
    fake_gcp.control.reverse_endpoints(True)
    created = create_node(tpu_client, parent, "repaired", node_spec("v5litepod-16"))
    name = created.name
    hosts = fake_gcp.control.hosts(name)
    assert [e.ip_address for e in tpu_client.get_node(name=name).network_endpoints] == [h["ip"] for h in reversed(hosts)]
    fake_gcp.control.repair_node(name, 0.5)
    assert node_state(tpu_client, name) == "REPAIRING"
    assert all(h["metadata_endpoint"] for h in fake_gcp.control.hosts(name))  # the VMs stay up
    wait_node_state(tpu_client, name, "READY")
    fake_gcp.control.set_node_health(name, "UNHEALTHY_MAINTENANCE")
    assert tpu_client.get_node(name=name).health.name == "UNHEALTHY_MAINTENANCE"
    fake_gcp.control.set_node_health(name, None)
    assert tpu_client.get_node(name=name).health.name == "HEALTHY"
    delete_node(tpu_client, name)
