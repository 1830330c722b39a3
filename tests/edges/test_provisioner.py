"""SliceProvisioner against the emulator process, through the unmodified google-cloud-tpu client.

Every test ends with zero live nodes and queued resources (the ``fake_gcp`` fixture checks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from google.cloud import tpu_v2
from fake_gcp import (
    create_node,
    error_burst,
    held_in_creating,
    node_spec,
    node_state,
    operations_never_finish,
    queued_resource_state,
    quota_exhausted,
    stocked_out,
    wait_for,
)

from fray_tpu import naming
from fray_tpu.errors import CapacityUnavailableError, DeadlineExceeded, ProvisioningError
from fray_tpu.provisioner import (
    CancelledError,
    RetryPolicy,
    SliceProvisioner,
    SliceSpec,
    make_tpu_client,
    node_resource_name,
    queued_resource_name,
)


ZONE_A = "europe-west4-b"
ZONE_B = "us-west4-a"
POLL = 0.05
WAIT = 20.0  # generous ceiling for any single wait; tests finish far sooner


@pytest.fixture
def provisioner(fake_gcp) -> Iterator[SliceProvisioner]:
    with fake_gcp.provisioner(poll_interval=POLL, cleanup_timeout=WAIT,
                              retry=RetryPolicy(max_attempts=6, max_seconds=10.0, initial_backoff=0.02, max_backoff=0.1)) as provisioner:
        yield provisioner


@pytest.fixture
def client(fake_gcp):
    client = make_tpu_client(emulator_endpoint=fake_gcp.endpoint)
    yield client
    client.transport.close()


def slice_spec(name: str, tpu_type: str = "v5litepod-4", job: str = "job-1", **overrides) -> SliceSpec:
    values = dict(
        name=name,
        tpu_type=tpu_type,
        runtime_version="v2-alpha-tpuv5-lite",
        capacity="spot",
        labels=naming.resource_labels(job, 0, "ctl-1", 0),
        metadata={"startup-script": "#!/bin/sh\nexit 0\n"},
    )
    values.update(overrides)
    return SliceSpec(**values)


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


class Progress(list):
    """Collects on_progress lines."""

    def __call__(self, line: str) -> None:
        self.append(line)


def test_stockout_in_first_zone_moves_to_the_next(provisioner, client, fake_gcp):
    progress = Progress()
    with stocked_out(fake_gcp.control, ZONE_A):
        ready = provisioner.acquire(
            slice_spec("stock-a"), [ZONE_A, ZONE_B], deadline=deadline_in(WAIT), on_progress=progress
        )
    try:
        assert ready.zone == ZONE_B
        assert ready.resource_name == node_resource_name(fake_gcp.project, ZONE_B, "stock-a")
        assert len(ready.endpoints) == 1 and ready.endpoints[0].startswith("127.")
        assert progress[0] == f"creating in {ZONE_A}"
        assert f"{ZONE_A}: out of capacity; trying the next zone" in progress
        assert f"creating in {ZONE_B}" in progress
        assert progress[-1] == "READY 1/1 endpoints"
        assert node_state(client, node_resource_name(fake_gcp.project, ZONE_A, "stock-a")) == "GONE"
    finally:
        provisioner.delete("stock-a", ZONE_B, deadline=deadline_in(WAIT))
    assert node_state(client, ready.resource_name) == "GONE"


@pytest.mark.parametrize("code", [429, 503])
def test_error_bursts_on_list_and_create_are_retried_in_the_zone(provisioner, fake_gcp, code):
    error_burst(fake_gcp.control, "ListNodes", code, count=3)
    error_burst(fake_gcp.control, "CreateNode", code, count=2)
    error_burst(fake_gcp.control, "DeleteNode", code, count=2)
    ready = provisioner.acquire(slice_spec("burst"), [ZONE_A], deadline=deadline_in(WAIT))
    assert ready.zone == ZONE_A
    provisioner.delete("burst", ZONE_A, deadline=deadline_in(WAIT))
    counters = fake_gcp.control.counters()
    assert counters["CreateNode"] == 3  # two refused, then accepted
    assert counters["DeleteNode"] >= 3


def test_quota_error_on_create_moves_to_the_next_zone_without_retrying(provisioner, fake_gcp):
    quota_exhausted(fake_gcp.control, count=5, zone=ZONE_A)
    progress = Progress()
    ready = provisioner.acquire(slice_spec("quota"), [ZONE_A, ZONE_B], deadline=deadline_in(WAIT), on_progress=progress)
    try:
        assert ready.zone == ZONE_B
        assert any(ZONE_A in line and "quota" in line.lower() for line in progress)
        # One refused POST in zone A (quota is not retried in-zone), one accepted in zone B.
        assert fake_gcp.control.counters()["CreateNode"] == 2
    finally:
        provisioner.delete("quota", ZONE_B, deadline=deadline_in(WAIT))


def test_all_zones_out_raises_capacity_unavailable_naming_each_zone(provisioner, fake_gcp):
    quota_exhausted(fake_gcp.control, count=5, zone=ZONE_B)
    with stocked_out(fake_gcp.control, ZONE_A):
        with pytest.raises(CapacityUnavailableError) as raised:
            provisioner.acquire(slice_spec("nowhere"), [ZONE_A, ZONE_B], deadline=deadline_in(WAIT))
    message = str(raised.value)
    assert f"{ZONE_A}: out of capacity: There is no more capacity in the zone" in message
    assert f"{ZONE_B}: zone quota TPUV5sLitepodPerProjectPerZoneForTPUAPI" in message
    assert provisioner.list_managed([ZONE_A, ZONE_B]) == []


def test_node_stuck_in_creating_hits_its_deadline_and_is_deleted(provisioner, client, fake_gcp):
    resource = node_resource_name(fake_gcp.project, ZONE_A, "stuck")
    progress = Progress()
    with held_in_creating(fake_gcp.control, "stuck"):
        with pytest.raises(DeadlineExceeded) as raised:
            provisioner.acquire(slice_spec("stuck"), [ZONE_A], deadline=deadline_in(0.5), on_progress=progress)
        # Deleted (verified) before acquire raised, while still held in CREATING.
        assert node_state(client, resource) == "GONE"
    message = str(raised.value)
    assert resource in message
    assert "CREATING" in message
    assert "deadline" in message
    assert "CREATING" in progress
    assert progress[-1] == f"deleting stuck in {ZONE_A}"


def test_delete_while_creating(provisioner, client, fake_gcp):
    resource = node_resource_name(fake_gcp.project, ZONE_A, "early")
    with held_in_creating(fake_gcp.control, "early"):
        provisioner.create(slice_spec("early"), ZONE_A)
        wait_for(lambda: node_state(client, resource) == "CREATING", "node early listed as CREATING")
        provisioner.delete("early", ZONE_A, deadline=deadline_in(WAIT))
        assert node_state(client, resource) == "GONE"
    assert "early" not in provisioner.observe(ZONE_A)


def test_delete_of_a_missing_node_is_success(provisioner, fake_gcp):
    provisioner.delete("never-created", ZONE_A, deadline=deadline_in(WAIT))
    provisioner.delete("never-created", ZONE_A, deadline=deadline_in(WAIT), queued=True)
    assert "never-created" not in provisioner.observe(ZONE_A)


def test_preempted_node_is_lost_in_observation_and_stays_until_deleted(provisioner, client, fake_gcp):
    ready = provisioner.acquire(slice_spec("spot-1"), [ZONE_A], deadline=deadline_in(WAIT))
    assert not provisioner.observe(ZONE_A)["spot-1"].lost
    fake_gcp.control.preempt_node(ready.resource_name)
    observed = wait_for(lambda: provisioner.observe(ZONE_A)["spot-1"].lost and provisioner.observe(ZONE_A)["spot-1"],
                        "spot-1 observed lost")
    assert observed.state == "PREEMPTED"
    assert not observed.ready
    # Google does not delete preempted nodes: it still holds quota until we delete it.
    assert node_state(client, ready.resource_name) == "PREEMPTED"
    provisioner.delete("spot-1", ZONE_A, deadline=deadline_in(WAIT))
    assert node_state(client, ready.resource_name) == "GONE"


def test_vanished_node_is_observed_gone(provisioner, fake_gcp):
    ready = provisioner.acquire(slice_spec("poof"), [ZONE_A], deadline=deadline_in(WAIT))
    fake_gcp.control.vanish_node(ready.resource_name)
    observed = wait_for(lambda: provisioner.observe(ZONE_A)["poof"].state == "GONE" and provisioner.observe(ZONE_A)["poof"],
                        "poof observed GONE")
    assert observed.lost
    provisioner.delete("poof", ZONE_A, deadline=deadline_in(WAIT))
    assert "poof" not in provisioner.observe(ZONE_A)


def create_operations_of(client, parent: str, resource: str) -> list:
    listing = client.list_operations(request={"name": parent}, timeout=5, retry=None)
    return [
        operation
        for operation in listing.operations
        if (metadata := tpu_v2.OperationMetadata.deserialize(operation.metadata.value)).target == resource
        and metadata.verb == "create"
    ]


def test_operation_lagging_behind_ready_does_not_delay_readiness(provisioner, client, fake_gcp):
    with operations_never_finish(fake_gcp.control):
        ready = provisioner.acquire(slice_spec("laggy"), [ZONE_A], deadline=deadline_in(WAIT))
        try:
            [create_operation] = create_operations_of(client, fake_gcp.parent(ZONE_A), ready.resource_name)
            assert not create_operation.done  # the slice is ready while its operation still runs
            assert provisioner.observe(ZONE_A)["laggy"].ready
        finally:
            provisioner.delete("laggy", ZONE_A, deadline=deadline_in(WAIT))


def test_labels_metadata_and_capacity_land_on_the_node(provisioner, client, fake_gcp):
    labels = naming.resource_labels("job-labels", 3, "ctl-9", 1, extra={"team": "research"})
    metadata = {"startup-script": "#!/bin/sh\nexit 0\n", "fray-tpu-agent-port": "8477", "fray-tpu-job": "job-labels"}
    spec = slice_spec("labelled", tpu_type="v5litepod-16", labels=labels, metadata=metadata, capacity="preemptible")
    ready = provisioner.acquire(spec, [ZONE_B], deadline=deadline_in(WAIT))
    try:
        node = client.get_node(name=ready.resource_name, timeout=5, retry=None)
        assert dict(node.labels) == labels
        assert dict(node.metadata) == metadata
        assert node.scheduling_config.preemptible
        assert node.accelerator_type == "v5litepod-16"
        assert len(ready.endpoints) == 4 and len(set(ready.endpoints)) == 4
        assert ready.endpoints == tuple(e.ip_address for e in node.network_endpoints)
    finally:
        provisioner.delete("labelled", ZONE_B, deadline=deadline_in(WAIT))


def test_list_managed_finds_only_labelled_resources(fake_gcp, client):
    # One resource per page: every listing here pages.
    provisioner = SliceProvisioner(client, fake_gcp.project, api_timeout=5.0, poll_interval=POLL, list_page_size=1)
    create_node(client, fake_gcp.parent(ZONE_A), "not-ours", node_spec("v5litepod-4", labels={"team": "x"}))
    provisioner.acquire(slice_spec("ours-1", job="job-a"), [ZONE_A], deadline=deadline_in(WAIT))
    with held_in_creating(fake_gcp.control, "ours-2"):
        provisioner.create(slice_spec("ours-2", job="job-b", queued=True), ZONE_B)
        wait_for(
            lambda: queued_resource_state(client, queued_resource_name(fake_gcp.project, ZONE_B, "ours-2"))
            == "WAITING_FOR_RESOURCES",
            "ours-2 waiting for resources",
        )
        managed = {o.name: o for o in provisioner.list_managed([ZONE_A, ZONE_B])}
        assert set(managed) == {"ours-1", "ours-2"}
        assert managed["ours-1"].state == "READY" and managed["ours-1"].queued_state is None
        assert managed["ours-2"].queued_state == "WAITING_FOR_RESOURCES"
        assert managed["ours-2"].labels[naming.LABEL_JOB] == "job-b"
        only_a = provisioner.list_managed([ZONE_A, ZONE_B], {naming.LABEL_JOB: "job-a"})
        assert [o.name for o in only_a] == ["ours-1"]
        provisioner.delete("ours-2", ZONE_B, deadline=deadline_in(WAIT), queued=True)
    provisioner.delete("ours-1", ZONE_A, deadline=deadline_in(WAIT))
    provisioner.delete("not-ours", ZONE_A, deadline=deadline_in(WAIT))
    assert provisioner.list_managed([ZONE_A, ZONE_B]) == []


def test_queued_resource_becomes_ready_through_its_states(provisioner, client, fake_gcp):
    progress = Progress()
    ready = provisioner.acquire(
        slice_spec("queued-ok", queued=True), [ZONE_A], deadline=deadline_in(WAIT), on_progress=progress
    )
    try:
        assert ready.resource_name == node_resource_name(fake_gcp.project, ZONE_A, "queued-ok")
        assert progress[-1] == "READY 1/1 endpoints"
        assert provisioner.observe(ZONE_A)["queued-ok"].queued_state in ("PROVISIONING", "ACTIVE")
    finally:
        provisioner.delete("queued-ok", ZONE_A, deadline=deadline_in(WAIT), queued=True)
    assert queued_resource_state(client, queued_resource_name(fake_gcp.project, ZONE_A, "queued-ok")) == "GONE"
    assert node_state(client, ready.resource_name) == "GONE"


def test_error_bursts_on_the_queued_path_are_retried(provisioner, client, fake_gcp):
    error_burst(fake_gcp.control, "CreateQueuedResource", 429, count=1)
    error_burst(fake_gcp.control, "ListQueuedResources", 503, count=2)
    error_burst(fake_gcp.control, "GetOperation", 503, count=2)
    error_burst(fake_gcp.control, "DeleteQueuedResource", 503, count=1)
    ready = provisioner.acquire(slice_spec("queued-burst", queued=True), [ZONE_A], deadline=deadline_in(WAIT))
    provisioner.delete("queued-burst", ZONE_A, deadline=deadline_in(WAIT), queued=True)
    assert node_state(client, ready.resource_name) == "GONE"
    assert queued_resource_state(client, queued_resource_name(fake_gcp.project, ZONE_A, "queued-burst")) == "GONE"


def test_queued_resource_granted_after_the_give_up_leaves_nothing(provisioner, client, fake_gcp):
    qr = queued_resource_name(fake_gcp.project, ZONE_A, "late")
    node = node_resource_name(fake_gcp.project, ZONE_A, "late")
    with held_in_creating(fake_gcp.control, "late"):
        with pytest.raises(DeadlineExceeded, match="queued WAITING_FOR_RESOURCES"):
            provisioner.acquire(slice_spec("late", queued=True), [ZONE_A], deadline=deadline_in(0.5))
        assert queued_resource_state(client, qr) == "GONE"
    # Capacity arrives now (the hold is released): there is nothing left to grant it to.
    assert queued_resource_state(client, qr) == "GONE"
    assert node_state(client, node) == "GONE"


def test_cancel_deletes_what_was_created(provisioner, client, fake_gcp):
    cancel = threading.Event()

    def cancel_once_queued(line: str) -> None:
        if line.startswith("queued "):
            cancel.set()

    with held_in_creating(fake_gcp.control, "cancelled"):
        with pytest.raises(CancelledError, match="cancelled"):
            provisioner.acquire(
                slice_spec("cancelled", queued=True),
                [ZONE_A],
                deadline=deadline_in(WAIT),
                cancel=cancel,
                on_progress=cancel_once_queued,
            )
    assert queued_resource_state(client, queued_resource_name(fake_gcp.project, ZONE_A, "cancelled")) == "GONE"


def test_invalid_request_is_not_a_capacity_problem(provisioner, fake_gcp):
    with pytest.raises(ProvisioningError, match="runtime") as raised:
        provisioner.acquire(slice_spec("bad-runtime", runtime_version="no-such-runtime"), [ZONE_A, ZONE_B],
                            deadline=deadline_in(WAIT))
    assert not isinstance(raised.value, CapacityUnavailableError)


def test_api_calls_per_poll_are_bounded_for_concurrent_acquires(provisioner, fake_gcp):
    names = [f"many-{i}" for i in range(6)]
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = provisioner.acquire(slice_spec(name), [ZONE_A], deadline=deadline_in(WAIT))
        except Exception as error:  # reported by the assertion below
            results[name] = error

    with held_in_creating(fake_gcp.control, "many-"):
        started = time.monotonic()
        threads = [threading.Thread(target=run, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        # Let the acquires poll together for a while (at least 10 shared listings).
        wait_for(lambda: fake_gcp.control.counters().get("ListNodes", 0) >= 10, "10 listings of the zone")
    for thread in threads:
        thread.join(WAIT)
    elapsed = time.monotonic() - started
    counters = fake_gcp.control.counters()
    try:
        assert all(not isinstance(results.get(name), Exception) and name in results for name in names), results
        polls = elapsed / POLL
        observation_calls = counters.get("ListNodes", 0) + counters.get("GetOperation", 0)
        # One listing plus at most one operation peek per poll interval, however many slices.
        assert counters["ListNodes"] <= polls + 2
        assert observation_calls <= 2 * (polls + 2)
        assert "GetNode" not in counters
    finally:
        for name in names:
            provisioner.delete(name, ZONE_A, deadline=deadline_in(WAIT))
