"""The emulator's network and IAM model, through the unmodified ``tpu_v2.TpuClient``: external IPs
(a second loopback address per VM, NAT'd to its own), network tags validated as GCE does, an org
policy forbidding external IPs, and a VM's service account refused a permission."""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.request

import pytest
from fake_gcp import create_node, delete_node, node_spec, node_state, polling, wait_for, wait_hosts
from google.api_core import exceptions
from google.cloud import tpu_v2

from fray_tpu.emulator import catalog

pytest_plugins = ["fake_gcp.fixtures"]

V5E_ZONE = "us-west4-a"
TIMEOUT = 30.0

# Each VM serves HTTP on its internal address at the agent port (as the agent does), answering
# with its identity from the metadata server (its service account, its external IP if any).
SERVE_SCRIPT = r"""
python3 - <<'PY'
import http.server, json, os, urllib.request
def get(path):
    request = urllib.request.Request(
        "http://" + os.environ["GCE_METADATA_HOST"] + "/computeMetadata/v1/" + path,
        headers={"Metadata-Flavor": "Google"})
    try:
        return urllib.request.urlopen(request, timeout=10).read().decode()
    except urllib.error.HTTPError as error:
        return "" if error.code == 404 else f"HTTP {error.code}"
identity = json.dumps({
    "ip": get("instance/network-interfaces/0/ip"),
    "external_ip": get("instance/network-interfaces/0/access-configs/0/external-ip"),
    "service_account": get("instance/service-accounts/default/email"),
    "token": json.loads(get("instance/service-accounts/default/token"))["access_token"],
}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(identity)))
        self.end_headers()
        self.wfile.write(identity)
    def log_message(self, *args):
        pass
http.server.HTTPServer((os.environ["FRAY_TPU_HOST_IP"], AGENT_PORT), Handler).serve_forever()
PY
"""


def serving_node(external_ips: bool, service_account: str = "") -> tpu_v2.Node:
    # The session's emulator puts its agents on the default port.
    node = node_spec("v5litepod-16", SERVE_SCRIPT.replace("AGENT_PORT", str(catalog.DEFAULT_AGENT_PORT)))
    node.network_config = tpu_v2.NetworkConfig(enable_external_ips=external_ips)
    node.tags = ["fray-tpu"]
    if service_account:
        node.service_account = tpu_v2.ServiceAccount(email=service_account)
    return node


def fetch(address: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://{address}/", timeout=5).read())


def answers(address: str) -> dict | None:
    try:
        return fetch(address)
    except OSError:
        return None


def refused(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=2).close()
    except OSError:
        return True
    return False


def test_external_ips_are_a_second_loopback_address_nated_to_the_vm(fake_gcp, tpu_client):
    """A node created with external IPs lists access_config.external_ip per endpoint (loopback,
    distinct from every internal address); the VM serving on its internal address is reachable
    at its external one (the NAT carries it and counts the connection), and its metadata server
    reports the external IP under access-configs, as GCE's does."""
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "ext-1", serving_node(external_ips=True), timeout=TIMEOUT)
    internal = [e.ip_address for e in node.network_endpoints]
    external = [e.access_config.external_ip for e in node.network_endpoints]
    assert len(set(internal + external)) == 8
    assert all(ipaddress.ip_address(ip).is_loopback for ip in external)
    port = node.network_endpoints[0].port
    for ip, ext in zip(internal, external):
        via_nat = wait_for(lambda: answers(f"{ext}:{port}"), f"the VM at {ip} through {ext}", TIMEOUT)
        assert via_nat["ip"] == ip and via_nat["external_ip"] == ext
    counts = fake_gcp.control.host_connections("ext-1")
    assert [list(c) for c in counts] == [[f"{ext}:{port}"] for ext in external]
    assert all(count >= 1 for c in counts for count in c.values())
    delete_node(tpu_client, node.name)
    assert all(refused(ext, port) for ext in external), "the NAT outlived its VM"


def test_node_without_external_ips_has_no_access_config_and_no_second_address(fake_gcp, tpu_client):
    """Without enable_external_ips (the API's default) endpoints carry no external IP, the VM's
    metadata has no access config, nothing is NAT'd, and the VM runs as the project's default
    compute service account."""
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "int-1", serving_node(external_ips=False), timeout=TIMEOUT)
    assert [e.access_config.external_ip for e in node.network_endpoints] == [""] * 4
    port = node.network_endpoints[0].port
    identity = wait_for(lambda: answers(f"{node.network_endpoints[0].ip_address}:{port}"), "the VM", TIMEOUT)
    assert identity["external_ip"] == ""
    number = catalog.project_number(fake_gcp.project)
    assert identity["service_account"] == f"{number}-compute@developer.gserviceaccount.com"
    assert fake_gcp.control.host_connections("int-1") == [{}] * 4
    hosts = wait_hosts(fake_gcp.control, "int-1", lambda hs: len(hs) == 4, "booted")
    assert {h["external_ip"] for h in hosts} == {None}
    delete_node(tpu_client, node.name)


@pytest.mark.parametrize("tag", ["Fray-TPU", "1fray", "fray-", "a" * 64, "fray_tpu", ""])
def test_bad_network_tags_are_refused_like_gce(fake_gcp, tpu_client, tag):
    """A network tag that is no RFC 1035 label (lower case, 1-63 characters) is INVALID_ARGUMENT
    on the POST, naming the tag; nothing is created."""
    node = node_spec("v5litepod-4")
    node.tags = [tag]
    with pytest.raises(exceptions.InvalidArgument, match="node.tags"):
        tpu_client.create_node(parent=fake_gcp.parent(V5E_ZONE), node_id="bad-tag", node=node, timeout=TIMEOUT)
    assert node_state(tpu_client, f"{fake_gcp.parent(V5E_ZONE)}/nodes/bad-tag") == "GONE"


def test_org_policy_forbidding_external_ips_fails_the_create_operation(fake_gcp, tpu_client):
    """With constraints/compute.vmExternalIpAccess forbidding external IPs, a create asking for
    them fails on its operation with FAILED_PRECONDITION naming the constraint, and the node goes
    away; a create without external IPs is unaffected."""
    fake_gcp.control.forbid_external_ips()
    parent = fake_gcp.parent(V5E_ZONE)
    try:
        operation = tpu_client.create_node(parent=parent, node_id="ext-forbidden",
                                           node=serving_node(external_ips=True), timeout=TIMEOUT)
        with pytest.raises(exceptions.GoogleAPICallError) as raised:
            operation.result(timeout=TIMEOUT, polling=polling(TIMEOUT))
        assert raised.value.grpc_status_code.name == "FAILED_PRECONDITION"
        assert "constraints/compute.vmExternalIpAccess" in raised.value.message
        assert node_state(tpu_client, f"{parent}/nodes/ext-forbidden") == "GONE"
        fine = create_node(tpu_client, parent, "int-allowed", node_spec("v5litepod-4"), timeout=TIMEOUT)
        delete_node(tpu_client, fine.name)
    finally:
        fake_gcp.control.forbid_external_ips(False)


def test_a_vm_service_account_denied_delete_is_refused_403_and_others_are_not(fake_gcp, tpu_client):
    """deny_permission refuses DeleteNode made with the VM's token (from its metadata server) with
    403 PERMISSION_DENIED naming tpu.nodes.delete and the node; the same call with the controller's
    own credentials (no VM token) deletes it."""
    account = "trainer@fray-tpu-test.iam.gserviceaccount.com"
    parent = fake_gcp.parent(V5E_ZONE)
    node = create_node(tpu_client, parent, "sa-1", serving_node(external_ips=False, service_account=account),
                       timeout=TIMEOUT)
    port = node.network_endpoints[0].port
    identity = wait_for(lambda: answers(f"{node.network_endpoints[0].ip_address}:{port}"), "the VM", TIMEOUT)
    assert identity["service_account"] == account
    fake_gcp.control.deny_permission(account, "tpu.nodes.delete")
    as_vm = (("authorization", f"Bearer {identity['token']}"),)
    with pytest.raises(exceptions.PermissionDenied, match="tpu.nodes.delete") as raised:
        tpu_client.delete_node(name=node.name, timeout=TIMEOUT, metadata=as_vm)
    assert node.name in raised.value.message
    assert tpu_client.get_node(name=node.name, timeout=TIMEOUT, metadata=as_vm).state.name == "READY"
    delete_node(tpu_client, node.name)
