"""Pure parts of the provisioner: spec → request mapping, observation rules, error classes, clients."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import tpu_v2
from google.rpc import status_pb2

from fray_tpu import naming
from fray_tpu.errors import CredentialsError
from fray_tpu.provisioner import (
    SliceObservation,
    SliceSpec,
    is_transient,
    make_tpu_client,
    node_request,
    operation_verdict,
    queued_resource_request,
)


def spec(**overrides) -> SliceSpec:
    values = dict(
        name="fray-train-abc-0-0",
        tpu_type="v5litepod-16",
        runtime_version="v2-alpha-tpuv5-lite",
        capacity="spot",
        labels=naming.resource_labels("job-1", 0, "ctl-1", 0),
        metadata={"startup-script": "#!/bin/sh\necho hi\n", "fray-tpu-agent-port": "8477"},
    )
    values.update(overrides)
    return SliceSpec(**values)


def has_scheduling(node: tpu_v2.Node) -> bool:
    return tpu_v2.Node.pb(node).HasField("scheduling_config")


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [
        ("spot", {"spot": True, "preemptible": False, "reserved": False}),
        ("preemptible", {"spot": False, "preemptible": True, "reserved": False}),
        ("reserved", {"spot": False, "preemptible": False, "reserved": True}),
    ],
)
def test_capacity_class_sets_the_scheduling_config(capacity, expected):
    scheduling = node_request(spec(capacity=capacity)).scheduling_config
    assert {key: getattr(scheduling, key) for key in expected} == expected


def test_on_demand_node_has_no_scheduling_config():
    assert not has_scheduling(node_request(spec(capacity="on-demand")))


def test_node_carries_type_runtime_labels_metadata_network_and_service_account():
    node = node_request(
        spec(network="net-a", subnetwork="sub-a", external_ips=True, service_account="sa@p.iam.gserviceaccount.com")
    )
    assert node.accelerator_type == "v5litepod-16"
    assert node.runtime_version == "v2-alpha-tpuv5-lite"
    assert dict(node.labels)[naming.LABEL_MANAGED] == naming.MANAGED_VALUE
    assert dict(node.labels)[naming.LABEL_JOB] == "job-1"
    assert dict(node.metadata) == {"startup-script": "#!/bin/sh\necho hi\n", "fray-tpu-agent-port": "8477"}
    assert (node.network_config.network, node.network_config.subnetwork) == ("net-a", "sub-a")
    assert node.network_config.enable_external_ips is True
    assert node.service_account.email == "sa@p.iam.gserviceaccount.com"
    assert list(node.service_account.scope) == ["https://www.googleapis.com/auth/cloud-platform"]


def test_internal_ips_and_default_service_account_by_default():
    node = node_request(spec())
    assert node.network_config.enable_external_ips is False
    assert not tpu_v2.Node.pb(node).HasField("service_account")


def test_spot_queued_resource_uses_the_spot_tier_and_one_named_node():
    resource = queued_resource_request(spec(queued=True), "proj", "us-west4-a")
    pb = tpu_v2.QueuedResource.pb(resource)
    assert pb.WhichOneof("tier") == "spot"
    [node_spec] = resource.tpu.node_spec
    assert node_spec.parent == "projects/proj/locations/us-west4-a"
    assert node_spec.node_id == "fray-train-abc-0-0"
    assert node_spec.node.accelerator_type == "v5litepod-16"
    assert dict(node_spec.node.labels)[naming.LABEL_CONTROLLER] == "ctl-1"
    # The tier carries the capacity class; the node itself asks for nothing special.
    assert not has_scheduling(node_spec.node)


def test_on_demand_and_reserved_queued_resources_use_the_guaranteed_tier():
    on_demand = tpu_v2.QueuedResource.pb(queued_resource_request(spec(queued=True, capacity="on-demand"), "p", "z"))
    assert on_demand.WhichOneof("tier") == "guaranteed"
    assert on_demand.reservation_name == ""
    reservation = "projects/p/locations/us-west4-a/reservations/r1"
    reserved = queued_resource_request(spec(queued=True, capacity="reserved", reservation=reservation), "p", "z")
    assert tpu_v2.QueuedResource.pb(reserved).WhichOneof("tier") == "guaranteed"
    assert reserved.reservation_name == reservation
    assert reserved.tpu.node_spec[0].node.scheduling_config.reserved


def test_unknown_capacity_class_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cheap'.*spot, preemptible, on-demand, reserved"):
        spec(capacity="cheap")


def test_queued_preemptible_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="capacity='spot'"):
        spec(queued=True, capacity="preemptible")


def observation(**overrides) -> SliceObservation:
    values = dict(
        name="n",
        zone="us-west4-a",
        resource_name="projects/p/locations/us-west4-a/nodes/n",
        state="READY",
        health=None,
        endpoints=("127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"),
        labels={},
        error=None,
        queued_state=None,
        expected_endpoints=4,
    )
    values.update(overrides)
    return SliceObservation(**values)


@pytest.mark.parametrize("state", ["PREEMPTED", "TERMINATED", "UNKNOWN", "DELETING", "GONE"])
def test_lost_states(state):
    assert observation(state=state).lost
    assert not observation(state=state).ready


@pytest.mark.parametrize("state", ["READY", "CREATING", "RESTARTING", "REPAIRING", "CREATE_FAILED"])
def test_states_that_are_not_lost(state):
    assert not observation(state=state).lost


def test_ready_needs_every_endpoint():
    assert observation().ready
    assert not observation(endpoints=("127.0.1.1", "127.0.1.2")).ready
    assert not observation(endpoints=("127.0.1.1", "", "127.0.1.3", "127.0.1.4")).ready
    assert not observation(state="CREATING").ready
    assert not observation(endpoints=()).ready


def test_progress_lines_are_readable():
    assert observation().describe() == "READY 4/4 endpoints"
    assert observation(endpoints=("127.0.1.1",)).describe() == "READY 1/4 endpoints"
    assert observation(state="CREATING", endpoints=()).describe() == "CREATING"
    assert (
        observation(state="CREATING", endpoints=(), queued_state="WAITING_FOR_RESOURCES").describe()
        == "queued WAITING_FOR_RESOURCES"
    )


def test_code_8_on_the_operation_is_a_stockout():
    """Code 8 on the operation is "no capacity" (next zone); code 3 "bad request" is fatal."""
    text, verdict = operation_verdict(status_pb2.Status(code=8, message='There is no more capacity in the zone "us-west4-a"'), "spot")
    assert text == 'out of capacity: RESOURCE_EXHAUSTED (code 8): There is no more capacity in the zone "us-west4-a"'
    assert observation(state="CREATE_FAILED", error=text, verdict=verdict).stockout
    other, other_verdict = operation_verdict(status_pb2.Status(code=3, message="bad request"), "spot")
    assert "INVALID_ARGUMENT" in other
    assert not observation(state="CREATE_FAILED", error=other, verdict=other_verdict).stockout


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (api_exceptions.TooManyRequests("slow down"), True),
        (api_exceptions.ResourceExhausted("rate"), True),
        (api_exceptions.ServiceUnavailable("unavailable"), True),
        (api_exceptions.DeadlineExceeded("deadline"), True),
        (api_exceptions.InternalServerError("internal"), True),
        (api_exceptions.InvalidArgument("bad"), False),
        (api_exceptions.NotFound("missing"), False),
        (api_exceptions.PermissionDenied("no"), False),
    ],
)
def test_transient_errors(error, transient):
    assert is_transient(error) is transient


def test_emulator_client_is_built_without_any_credential_lookup():
    client = make_tpu_client(emulator_endpoint="127.0.0.1:1")
    try:
        assert isinstance(client, tpu_v2.TpuClient)
    finally:
        client.transport.close()


def test_production_client_without_credentials_says_how_to_provide_them(monkeypatch, tmp_path):
    # No ADC file, no key file, no metadata server (the session guard set NO_GCE_CHECK).
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(CredentialsError) as raised:
        make_tpu_client(emulator_endpoint=None)
    message = str(raised.value)
    assert "gcloud auth application-default login" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message
    assert "service account" in message

