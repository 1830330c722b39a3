"""How the controller reaches the agents (pure): the ``connect`` and ``network_tag`` settings, the
node request they make, the address dialled per worker, a READY node lacking external IPs, the
self-delete refusal text, and gc acting on a published refusal."""

from __future__ import annotations

import dataclasses

import pytest
from google.api_core import exceptions as api_exceptions

from fray_tpu import naming
from fray_tpu.cloud_errors import CreateAction
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError, ProvisioningError
from fray_tpu.ops.gc import find_orphans, live_job_labels
from fray_tpu.provisioner import ReadySlice, SliceObservation, SliceSpec, missing_external_ips, node_request
from fray_tpu.worker.selfdelete import refusal_text


def spec(**overrides) -> SliceSpec:
    values = dict(name="fray-train-abc-0-0", tpu_type="v5litepod-16", runtime_version="v2-alpha-tpuv5-lite",
                  capacity="spot", labels=naming.resource_labels("job-1", 0, "ctl-1", 0), metadata={})
    values.update(overrides)
    return SliceSpec(**values)


def observation(external_ips: tuple[str, ...], name: str = "n", labels=None) -> SliceObservation:
    return SliceObservation(name=name, zone="us-west4-a", resource_name=f"projects/p/locations/us-west4-a/nodes/{name}",
                            state="READY", health=None, endpoints=("10.0.0.2", "10.0.0.3"), labels=labels or {},
                            error=None, queued_state=None, external_ips=external_ips)


def test_connect_defaults_to_internal_without_external_ips():
    """By default the controller dials internal addresses and nodes get no external IPs."""
    config = TpuClusterConfig(emulate=True)
    assert (config.connect, config.external_ips, config.network_tag) == ("internal", False, "fray-tpu")


def test_connect_external_implies_external_ips_and_round_trips():
    """connect=external (spec or FRAY_TPU_CONNECT) turns external IPs on; the spec round-trips."""
    config = TpuClusterConfig.from_spec("tpu?emulate=true&connect=External")
    assert (config.connect, config.external_ips) == ("external", True)
    assert TpuClusterConfig.from_spec(config.to_spec()) == config
    from_env = TpuClusterConfig.from_env({"FRAY_TPU_EMULATE": "true", "FRAY_TPU_CONNECT": "external",
                                          "FRAY_TPU_NETWORK_TAG": "train-vms"})
    assert (from_env.connect, from_env.external_ips, from_env.network_tag) == ("external", True, "train-vms")


def test_internal_connect_may_still_give_the_workers_external_ips():
    """external_ips=true with connect=internal is valid (egress for the VMs, controller in the VPC)."""
    config = TpuClusterConfig.from_spec("tpu?emulate=true&external_ips=true")
    assert (config.connect, config.external_ips) == ("internal", True)


@pytest.mark.parametrize("value, hint", [("extrenal", "did you mean 'external'"), ("public", "internal, external")])
def test_bad_connect_value_names_the_value_and_the_choices(value, hint):
    with pytest.raises(ConfigError, match=f"connect='{value}'") as raised:
        TpuClusterConfig.from_spec(f"tpu?emulate=true&connect={value}")
    assert hint in str(raised.value) and "internal, external" in str(raised.value)


def test_external_connect_with_external_ips_off_is_a_contradiction():
    with pytest.raises(ConfigError, match="connect=external.*external_ips=false"):
        TpuClusterConfig.from_spec("tpu?emulate=true&connect=external&external_ips=false")


@pytest.mark.parametrize("tag", ["Fray", "9lives", "ends-", "a" * 64, "under_score", ""])
def test_bad_network_tag_is_refused_before_provisioning(tag):
    if not tag:
        with pytest.raises(ConfigError, match="network_tag=''"):
            TpuClusterConfig(emulate=True, network_tag=tag)
        return
    with pytest.raises(ConfigError, match="is not a GCE network tag"):
        TpuClusterConfig.from_spec(f"tpu?emulate=true&network_tag={tag}")


def test_longest_network_tag_is_accepted():
    assert TpuClusterConfig(emulate=True, network_tag="a" * 63).network_tag == "a" * 63


def test_node_request_carries_the_tag_and_external_ips_for_connect_external():
    node = node_request(spec(external_ips=True, connect="external", network_tag="train-vms"))
    assert list(node.tags) == ["train-vms"]
    assert node.network_config.enable_external_ips is True
    assert list(node_request(spec()).tags) == ["fray-tpu"]


def test_slice_spec_refuses_external_connect_without_external_ips():
    with pytest.raises(ValueError, match="needs external_ips"):
        spec(connect="external")


def test_dial_address_follows_connect():
    """internal dials the endpoint itself; external dials its external IP, and says so clearly
    when none is known; reordering keeps each external IP with its endpoint."""
    endpoints, external = ("10.0.0.2", "10.0.0.3"), ("34.1.1.1", "34.1.1.2")
    internal = ReadySlice(spec(external_ips=True), "us-west4-a", "projects/p/locations/z/nodes/n", endpoints, external)
    assert [internal.dial_address(ip) for ip in endpoints] == list(endpoints)
    outside = dataclasses.replace(internal, spec=spec(external_ips=True, connect="external"))
    assert [outside.dial_address(ip) for ip in endpoints] == list(external)
    flipped = outside.reordered([1, 0])
    assert (flipped.endpoints, flipped.external_ips) == (endpoints[::-1], external[::-1])
    assert flipped.dial_address("10.0.0.2") == "34.1.1.1"
    unknown = dataclasses.replace(outside, external_ips=())
    with pytest.raises(ProvisioningError, match="no external IP is known for worker 10.0.0.2"):
        unknown.dial_address("10.0.0.2")


def test_ready_node_without_external_ips_is_fatal_for_connect_external():
    """A READY node some of whose workers have no external IP cannot be dialled: a FATAL verdict
    naming the workers and the org policy, not a wait; connect=internal does not care."""
    external = spec(external_ips=True, connect="external")
    verdict = missing_external_ips(external, observation(("34.1.1.1", "")))
    assert verdict is not None and verdict.action is CreateAction.FATAL
    assert "worker(s) 1 of 2" in verdict.message and "constraints/compute.vmExternalIpAccess" in verdict.fix
    assert missing_external_ips(external, observation(())).message.count("worker(s) 0, 1") == 1
    assert missing_external_ips(external, observation(("34.1.1.1", "34.1.1.2"))) is None
    assert missing_external_ips(spec(), observation(("", ""))) is None


def test_refusal_text_names_code_message_and_the_account_to_grant():
    error = api_exceptions.PermissionDenied("Permission 'tpu.nodes.delete' denied on 'projects/p/locations/z/nodes/n'")
    text = refusal_text("projects/p/locations/z/nodes/n", error, "sa@p.iam.gserviceaccount.com")
    assert text.startswith("self-delete refused: PERMISSION_DENIED: Permission 'tpu.nodes.delete' denied")
    assert "grant roles/tpu.admin (or a role with tpu.nodes.delete) to service account sa@p.iam.gserviceaccount.com" in text
    other = refusal_text("projects/p/locations/z/nodes/n", api_exceptions.FailedPrecondition("busy"), None)
    assert other.startswith("self-delete refused: FAILED_PRECONDITION: busy") and "grant" not in other


def test_gc_deletes_a_refused_self_delete_even_of_a_job_the_journal_calls_running():
    """The agents meant the slice gone: gc deletes it although its job is still 'running' in the
    journal (its driver died); the job's other slices stay."""
    labels = {naming.LABEL_JOB: naming.label_value("live-job")}
    refused = observation(("",) * 2, "refused", labels)
    kept = observation(("",) * 2, "kept", labels)
    orphans = find_orphans([refused, kept], live_job_labels(["live-job"]),
                           refused={("refused", "us-west4-a"): "self-delete refused: PERMISSION_DENIED: ..."})
    assert [o.observation.name for o in orphans] == ["refused"]
    assert "could not delete it (self-delete refused: PERMISSION_DENIED" in orphans[0].reason


def test_controller_service_host_rule():
    """FRAY_TPU_CONTROLLER_HOST wins; the emulator listens on loopback; production listens on (and
    advertises) this machine's address on its default route, loopback only when it has none."""
    from fray_tpu.actors.controller import BIND_HOST_ENV, service_host

    production = TpuClusterConfig(project="p")
    emulated = TpuClusterConfig(emulate=True)
    vpc = lambda: "10.128.0.7"  # noqa: E731 - the route probe, injected
    assert service_host(production, {BIND_HOST_ENV: " 10.1.2.3 "}, vpc) == "10.1.2.3"
    assert service_host(emulated, {BIND_HOST_ENV: "127.0.0.9"}, vpc) == "127.0.0.9"
    assert service_host(emulated, {}, vpc) == "127.0.0.1"
    assert service_host(production, {}, vpc) == "10.128.0.7"
    assert service_host(production, {}, lambda: None) == "127.0.0.1"
