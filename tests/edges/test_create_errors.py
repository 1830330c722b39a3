"""Google's create refusals, answered the way Google answers them.

Each test drives ``SliceProvisioner.acquire`` against the emulator process, whose fault controls
answer with the real codes, messages and ``ErrorInfo``/``QuotaFailure`` details; each checks the
action taken, the create calls the emulator counted, and that nothing is left (the ``fake_gcp``
fixture fails a test that leaves a resource alive).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from fake_gcp import stocked_out

from fray_tpu import naming
from fray_tpu.errors import CapacityUnavailableError, CreateRejectedError, DeadlineExceeded
from fray_tpu.provisioner import RetryPolicy, SliceProvisioner, SliceSpec

# v6e is offered in two zones of us-east5 and one of us-east1 (topology.GENERATION_ZONES).
EAST5_A, EAST5_B, EAST1 = "us-east5-a", "us-east5-b", "us-east1-d"
POLL = 0.05
WAIT = 20.0


@pytest.fixture
def provisioner(fake_gcp) -> Iterator[SliceProvisioner]:
    with fake_gcp.provisioner(poll_interval=POLL, cleanup_timeout=WAIT,
                              retry=RetryPolicy(max_attempts=3, max_seconds=0.3, initial_backoff=0.02, max_backoff=0.05)) as provisioner:
        yield provisioner


def spec(name: str, **overrides) -> SliceSpec:
    values = dict(
        name=name,
        tpu_type="v6e-4",
        runtime_version="v2-alpha-tpuv6e",
        capacity="spot",
        labels=naming.resource_labels("job-1", 0, "ctl-1", 0),
        metadata={"startup-script": "#!/bin/sh\nexit 0\n"},
    )
    values.update(overrides)
    return SliceSpec(**values)


def creates(fake_gcp) -> int:
    counters = fake_gcp.control.counters()
    return counters.get("CreateNode", 0) + counters.get("CreateQueuedResource", 0)


def acquire(provisioner, slice_spec, zones, progress=None, **kwargs):
    return provisioner.acquire(slice_spec, zones, deadline=time.monotonic() + WAIT, on_progress=progress, **kwargs)


@pytest.mark.parametrize(
    ("refusal", "line"),
    [
        # A PerProjectPerZone QuotaFailure: no capacity for us here, the next zone may have it.
        ("zone_quota", f"{EAST5_A}: zone quota TPUV5sLitepodPerProjectPerZoneForTPUAPI; trying the next zone"),
        # 403 LOCATION_POLICY_VIOLATED: the zone is not for this project, skipped with the reason.
        ("forbidden_zone", f"{EAST5_A}: forbidden by the organization's location policy; skipping it"),
    ],
)
def test_a_zone_that_refuses_is_left_for_the_next_with_its_reason(provisioner, fake_gcp, refusal, line):
    """The refused zone's create is counted, the progress names its reason, the next zone takes
    the slice; once it is deleted nothing is left (the fixture's leak check covers the refused
    zone, which a forbidden zone does not even let us list)."""
    fake_gcp.control.refuse(refusal, zone=EAST5_A)
    progress: list[str] = []
    ready = acquire(provisioner, spec("zr"), [EAST5_A, EAST5_B], progress.append)
    assert ready.zone == EAST5_B
    assert line in progress
    assert creates(fake_gcp) == 2
    provisioner.delete("zr", EAST5_B, deadline=time.monotonic() + WAIT)
    assert provisioner.list_managed([EAST5_B]) == []


def test_region_quota_skips_every_zone_of_the_region(provisioner, fake_gcp):
    """A PerProjectPerRegion QuotaFailure in us-east5-a: us-east5-b is not even tried."""
    fake_gcp.control.refuse("region_quota", zone=EAST5_A)
    progress: list[str] = []
    ready = acquire(provisioner, spec("rq"), [EAST5_A, EAST5_B, EAST1], progress.append)
    assert ready.zone == EAST1
    assert any(line.startswith(f"{EAST5_B}: skipped (region quota") for line in progress)
    assert creates(fake_gcp) == 2  # us-east5-a refused, us-east5-b skipped, us-east1-d accepted
    provisioner.delete("rq", EAST1, deadline=time.monotonic() + WAIT)


def test_every_zone_skipped_fails_at_once_listing_each_zone(provisioner, fake_gcp):
    """One zone forbidden, one not offering the type: CreateRejectedError at once (no waiting for
    capacity), naming each zone with its reason."""
    fake_gcp.control.refuse("forbidden_zone", zone=EAST5_A)
    started = time.monotonic()
    with pytest.raises(CreateRejectedError) as raised:
        acquire(provisioner, spec("nowhere"), [EAST5_A, "us-west4-a"])
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert f"{EAST5_A}: forbidden by the organization's location policy" in message
    assert "us-west4-a: type not offered in this zone" in message
    assert "could not be found in the zonal accelerator configurations" in message
    assert creates(fake_gcp) == 2
    fake_gcp.control.clear_refusals()
    assert provisioner.list_managed([EAST5_A, "us-west4-a"]) == []


@pytest.mark.parametrize(
    ("kind", "words", "fix"),
    [
        ("permission_denied", "Permission 'tpu.nodes.create' denied", "roles/tpu.admin"),
        ("api_disabled", "Cloud TPU API has not been used in project", "gcloud services enable tpu.googleapis.com"),
        ("unauthenticated", "invalid authentication credentials", "gcloud auth application-default login"),
    ],
)
def test_fatal_refusals_fail_the_job_now_with_the_api_message(provisioner, fake_gcp, kind, words, fix):
    """Permission, API disabled, credentials: no other zone is tried; the error carries the API's
    message and the fix."""
    fake_gcp.control.refuse(kind)
    with pytest.raises(CreateRejectedError) as raised:
        acquire(provisioner, spec("fatal"), [EAST5_A, EAST1])
    assert words in str(raised.value) and fix in str(raised.value)
    assert fake_gcp.control.counters().get("CreateNode", 0) == 1


def test_runtime_version_not_fitting_the_type_is_fatal(provisioner, fake_gcp):
    """A v5e image on a v6e slice: INVALID_ARGUMENT, fatal, one create call."""
    with pytest.raises(CreateRejectedError, match="is not supported by accelerator type 'v6e-4'"):
        acquire(provisioner, spec("badrt", runtime_version="v2-alpha-tpuv5-lite"), [EAST5_A, EAST1])
    assert creates(fake_gcp) == 1


def test_rate_limit_is_retried_in_the_same_zone(provisioner, fake_gcp):
    """429 RATE_LIMIT_EXCEEDED (per-minute QuotaFailure) three times: same zone, fourth call
    accepted, never called "no capacity"."""
    fake_gcp.control.refuse("rate_limit", count=3)
    progress: list[str] = []
    ready = acquire(provisioner, spec("rl"), [EAST5_A, EAST1], progress.append)
    assert ready.zone == EAST5_A
    assert not any("capacity" in line for line in progress)
    assert creates(fake_gcp) == 4
    provisioner.delete("rl", EAST5_A, deadline=time.monotonic() + WAIT)


def test_stocked_out_queued_resource_waits_and_is_granted_without_recreation(provisioner, fake_gcp):
    """A queued resource in a stocked-out zone waits past its create budget (progress shows
    WAITING_FOR_RESOURCES) and is granted when capacity returns; one create call."""
    progress: list[str] = []
    capacity_back = threading.Event()

    def on_progress(line: str) -> None:
        progress.append(line)
        if line == "queued WAITING_FOR_RESOURCES" and not capacity_back.is_set():
            capacity_back.set()
            # Capacity returns well after the 0.3 s create budget has run out.
            threading.Timer(1.0, fake_gcp.control.clear_stockout, args=(EAST5_A,)).start()

    fake_gcp.control.stockout(EAST5_A)
    started = time.monotonic()
    ready = provisioner.acquire(
        spec("qwait", queued=True), [EAST5_A], deadline=started + 0.3,
        capacity_deadline=started + WAIT, on_progress=on_progress,
    )
    assert ready.zone == EAST5_A
    assert time.monotonic() - started > 1.0
    assert "queued WAITING_FOR_RESOURCES" in progress
    assert fake_gcp.control.counters()["CreateQueuedResource"] == 1
    provisioner.delete("qwait", EAST5_A, deadline=time.monotonic() + WAIT, queued=True)


def test_queued_resource_that_expires_fails_with_its_real_error(provisioner, fake_gcp):
    """Its queueing policy expires (capacity_deadline): FAILED named by the expiry, deleted."""
    with stocked_out(fake_gcp.control, EAST5_A):
        started = time.monotonic()
        with pytest.raises(CapacityUnavailableError) as raised:
            provisioner.acquire(spec("qexp", queued=True), [EAST5_A], deadline=started + 0.5,
                                capacity_deadline=started + 1.0)
    message = str(raised.value)
    assert "queued request expired without capacity" in message and "valid_until" in message
    assert fake_gcp.control.counters()["CreateQueuedResource"] == 1
    assert provisioner.list_managed([EAST5_A]) == []


def test_list_storm_longer_than_a_retry_round_keeps_the_slice(provisioner, fake_gcp):
    """Every ListNodes answers 503 for 3 s (ten times the 0.3 s retry round) while the slice is
    provisioning: acquire keeps its stale observation and returns the READY slice, not deleted."""
    fake_gcp.control.set_timings(create_delay=1.0)
    fake_gcp.control.fail_for("ListNodes", 3.0, 503)
    progress: list[str] = []
    started = time.monotonic()
    ready = acquire(provisioner, spec("storm"), [EAST5_A], progress.append)
    assert time.monotonic() - started >= 3.0
    assert ready.zone == EAST5_A and ready.endpoints
    assert any("the API has not answered" in line for line in progress)
    assert fake_gcp.control.counters().get("DeleteNode", 0) == 0
    assert creates(fake_gcp) == 1
    provisioner.delete("storm", EAST5_A, deadline=time.monotonic() + WAIT)


def test_delete_answered_aborted_twice_completes(provisioner, fake_gcp):
    """409 ABORTED ("unable to queue the operation") twice, then the delete goes through."""
    acquire(provisioner, spec("abort"), [EAST5_A])
    fake_gcp.control.fail_next("DeleteNode", "ABORTED", 2)
    provisioner.delete("abort", EAST5_A, deadline=time.monotonic() + WAIT)
    assert fake_gcp.control.counters()["DeleteNode"] == 3
    assert provisioner.list_managed([EAST5_A]) == []


def test_delete_that_outlasts_its_deadline_names_the_resource_and_the_command(provisioner, fake_gcp):
    """Deletes fail for longer than several retry rounds: the delete keeps retrying until its
    deadline, then names what is left and the exact command that deletes it."""
    acquire(provisioner, spec("stuck-del"), [EAST5_A])
    fake_gcp.control.fail_for("DeleteNode", 60.0, 503)
    with pytest.raises(DeadlineExceeded) as raised:
        provisioner.delete("stuck-del", EAST5_A, deadline=time.monotonic() + 1.5)
    message = str(raised.value)
    assert f"projects/{fake_gcp.project}/locations/{EAST5_A}/nodes/stuck-del may still exist (READY)" in message
    assert f"gcloud compute tpus tpu-vm delete stuck-del --zone={EAST5_A} --project={fake_gcp.project} --quiet" in message
    assert fake_gcp.control.counters()["DeleteNode"] > 3  # more than one retry round
    fake_gcp.control.end_outage("DeleteNode")
    provisioner.delete("stuck-del", EAST5_A, deadline=time.monotonic() + WAIT)
