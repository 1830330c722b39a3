"""``fray-tpu doctor`` against the emulator: every check passes on a healthy emulated project, and
each injected misconfiguration fails its own check with the fix; no create call is ever made."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fray_tpu.config import TpuClusterConfig
from fray_tpu.ops.doctor import FAIL, OK, SKIP, WARN, ControllerPosition, run_checks
from fray_tpu.tpu_client import make_tpu_client

TIMEOUT = 60
TYPE = "v6e-4"
ZONES = "us-east5-a,us-east5-b"


def doctor(fake_gcp, tmp_path, *extra: str) -> tuple[int, dict[str, dict]]:
    spec = (f"tpu?emulate=true&emulator_endpoint={fake_gcp.endpoint}&project={fake_gcp.project}"
            f"&zones={ZONES}&state_dir={tmp_path / 'state'}")
    env = {k: v for k, v in os.environ.items() if k != "FRAY_CLUSTER_SPEC"}
    done = subprocess.run([sys.executable, "-m", "fray_tpu.ops.cli", "doctor", "--type", TYPE, "--json", "--spec", spec,
                           *extra], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.stdout, done.stderr
    return done.returncode, {c["name"]: c for c in json.loads(done.stdout)["checks"]}


def no_creates(fake_gcp) -> bool:
    counters = fake_gcp.control.counters()
    return counters.get("CreateNode", 0) == 0 and counters.get("CreateQueuedResource", 0) == 0


def test_doctor_passes_every_check_on_a_healthy_emulator(fake_gcp, tmp_path):
    """Exit 0; credentials, API, both zones, position and delivery all ok; no create call."""
    code, checks = doctor(fake_gcp, tmp_path)
    assert code == 0, checks
    assert [c["status"] for c in checks.values()] == [OK] * 6, checks
    assert f"zone us-east5-a offers {TYPE} with v2-alpha-tpuv6e" in checks
    assert no_creates(fake_gcp)


@pytest.mark.parametrize(
    ("fault", "check", "words", "fix"),
    [
        (("refuse", "api_disabled"), "Cloud TPU API", "not enabled", "gcloud services enable tpu.googleapis.com"),
        (("refuse", "unauthenticated"), "credentials", "not authenticated", "gcloud auth application-default login"),
        (("refuse", "forbidden_zone", "us-east5-b"), f"zone us-east5-b offers {TYPE} with v2-alpha-tpuv6e",
         "location policy", "remove the zone"),
        (("withdraw_type", "us-east5-b", TYPE), f"zone us-east5-b offers {TYPE} with v2-alpha-tpuv6e",
         "does not offer", "remove us-east5-b"),
    ],
)
def test_each_misconfiguration_fails_its_own_check_with_the_fix(fake_gcp, tmp_path, fault, check, words, fix):
    """The injected fault fails exactly its check (exit 1), which names the problem and the fix."""
    method, *args = fault
    if method == "refuse":
        fake_gcp.control.refuse(args[0], zone=args[1] if len(args) > 1 else None)
    else:
        fake_gcp.control.withdraw_type(*args)
    code, checks = doctor(fake_gcp, tmp_path)
    assert code == 1
    assert checks[check]["status"] == FAIL and words in checks[check]["found"] and fix in checks[check]["fix"]
    failing = [name for name, c in checks.items() if c["status"] == FAIL]
    assert failing == [check], checks
    fake_gcp.control.clear_refusals()
    assert no_creates(fake_gcp)


def test_real_project_checks_position_and_delivery(fake_gcp):
    """For a real project without external IPs: a controller off GCE fails the position check; a
    controller on GCE in another network fails it; delivery warns that the VMs need a route."""
    client = make_tpu_client(emulator_endpoint=fake_gcp.endpoint)
    config = TpuClusterConfig(project=fake_gcp.project, zones=["us-east5-a"], network="train-net")
    try:
        off_gce = run_checks(config, client, fake_gcp.project, [], credentials_found="test credentials",
                             position=lambda: None)
        elsewhere = run_checks(config, client, fake_gcp.project, [], credentials_found="test credentials",
                               position=lambda: ControllerPosition("us-east5-a", "projects/1/networks/default"))
        inside = run_checks(config, client, fake_gcp.project, [], credentials_found="test credentials",
                            position=lambda: ControllerPosition("us-east5-a", "projects/1/networks/train-net"))
    finally:
        client.transport.close()
    by_name = {c.name: c for c in off_gce}
    assert by_name["controller position"].status == FAIL and "connect=external" in by_name["controller position"].fix
    assert by_name["host bundle delivery"].status == WARN and "Cloud NAT" in by_name["host bundle delivery"].fix
    assert by_name["zones"].status == SKIP
    assert {c.name: c for c in elsewhere}["controller position"].status == FAIL
    assert {c.name: c for c in inside}["controller position"].status == OK
    assert no_creates(fake_gcp)


def test_controller_position_is_read_from_its_metadata_server(fake_gcp, tpu_client, monkeypatch):
    """On a (emulated) GCE VM the doctor reads its zone and network from the metadata server."""
    from fake_gcp import create_node, delete_node, node_spec

    from fray_tpu.ops.doctor import metadata_position

    node = create_node(tpu_client, fake_gcp.parent("us-east5-a"), "controller-vm", node_spec("v6e-4"))
    try:
        monkeypatch.setenv("GCE_METADATA_HOST", fake_gcp.control.hosts(node.name)[0]["metadata_endpoint"])
        position = metadata_position()
    finally:
        delete_node(tpu_client, node.name)
    assert position is not None and position.zone == "us-east5-a"
    assert position.network.endswith("/networks/default")
    monkeypatch.delenv("GCE_METADATA_HOST")
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    assert metadata_position() is None  # never probes the real metadata address in tests


def test_zone_offers_confirm_and_discover_against_the_api(fake_gcp):
    """ZoneOffers keeps zones the API says offer a type (one call per zone, cached), drops a
    withdrawn one, and discovers a zone of the same region the caller's list lacked."""
    from fray_tpu.zone_offers import ZoneOffers

    fake_gcp.control.withdraw_type("us-east1-d", TYPE)
    client = make_tpu_client(emulator_endpoint=fake_gcp.endpoint)
    try:
        offers = ZoneOffers(client, fake_gcp.project, api_timeout=5.0)
        assert offers.confirm(TYPE, ["us-east5-b", "us-east1-d"]) == ["us-east5-b"]
        assert "does not offer" in offers.why_not(TYPE, "us-east1-d")
        assert offers.discover(TYPE, ["us-east5-b"]) == ["us-east5-a"]  # same region, not in the list
        assert offers.confirm(TYPE, ["us-east5-b"]) == ["us-east5-b"]
    finally:
        client.transport.close()
    counters = fake_gcp.control.counters()
    assert counters["ListAcceleratorTypes"] == 3 and counters["ListLocations"] == 1  # cached after that
    assert no_creates(fake_gcp)
