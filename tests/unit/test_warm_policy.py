"""The warm pool's decisions: what fits, what a job takes, when a slice expires, what is kept."""

from __future__ import annotations

import dataclasses

import pytest

from fray_tpu.supervisor.warm_policy import (
    SliceHealth,
    SliceShape,
    WarmSlice,
    choose,
    expired,
    fits,
    idle_seconds,
    keep_reason,
    next_expiry_in,
)

SHAPE = SliceShape(tpu_type="v5litepod-16", capacity="spot", runtime_version="v2-alpha-tpuv5-lite", queued=False,
                   network=None, subnetwork=None, external_ips=False, network_tag="fray-tpu", service_account=None,
                   image="abc")
ZONES = ["us-west4-a", "europe-west4-b"]


def warm(name: str, zone: str = "us-west4-a", since: float = 0.0, shape: SliceShape = SHAPE) -> WarmSlice:
    return WarmSlice(name, zone, shape, since)


@pytest.mark.parametrize("field, value", [
    ("tpu_type", "v5litepod-8"), ("capacity", "on-demand"), ("runtime_version", "v2-alpha-tpuv5"),
    ("queued", True), ("network", "other"), ("subnetwork", "sub"), ("external_ips", True), ("network_tag", "other-tag"),
    ("service_account", "sa@p.iam"), ("image", "def"),
])
def test_any_difference_in_shape_does_not_fit(field, value):
    assert fits(warm("a"), SHAPE, ZONES)
    assert not fits(warm("a"), dataclasses.replace(SHAPE, **{field: value}), ZONES)


def test_a_zone_the_job_does_not_allow_does_not_fit():
    assert not fits(warm("a", zone="us-central1-a"), SHAPE, ZONES)
    assert choose([warm("a", zone="us-central1-a")], SHAPE, ZONES, 1) == []


def test_a_multislice_job_takes_slices_of_one_zone_the_one_with_most():
    pool = [warm("w1", "us-west4-a", 1), warm("e1", "europe-west4-b", 1), warm("e2", "europe-west4-b", 2)]
    taken = choose(pool, SHAPE, ZONES, 3)
    assert {w.name for w in taken} == {"e1", "e2"}


def test_ties_follow_the_jobs_zone_order_and_newest_go_first():
    pool = [warm("e1", "europe-west4-b", 5), warm("w1", "us-west4-a", 1), warm("w2", "us-west4-a", 3)]
    assert [w.name for w in choose(pool, SHAPE, ZONES, 1)] == ["w2"]
    assert [w.name for w in choose(pool, SHAPE, ["europe-west4-b", "us-west4-a"], 1)] == ["e1"]


def test_never_more_than_asked_and_nothing_for_zero():
    pool = [warm(f"s{i}", since=i) for i in range(4)]
    assert [w.name for w in choose(pool, SHAPE, ZONES, 2)] == ["s3", "s2"]
    assert choose(pool, SHAPE, ZONES, 0) == []


def test_expiry_on_the_injected_clock():
    slice_ = warm("a", since=100.0)
    assert not expired(slice_, 159.9, keep_warm=60)
    assert expired(slice_, 160.0, keep_warm=60)
    assert idle_seconds(slice_, 130.0) == 30.0
    assert next_expiry_in([slice_, warm("b", since=120.0)], 130.0, 60) == 30.0
    assert next_expiry_in([], 130.0, 60) is None
    assert next_expiry_in([slice_], 500.0, 60) == 0.0


HEALTHY = SliceHealth(lost_in_last_attempt=False, node_lost=False, agents_answered=4, hosts=4, any_preempted_flag=False)


@pytest.mark.parametrize("health, keep_warm, pool_open, reason", [
    (HEALTHY, 300, True, None),
    (HEALTHY, 0, True, "keep_warm is 0"),
    (HEALTHY, 300, False, "shutting down"),
    (dataclasses.replace(HEALTHY, lost_in_last_attempt=True), 300, True, "last attempt lost it"),
    (dataclasses.replace(HEALTHY, node_lost=True), 300, True, "cloud reports it lost"),
    (dataclasses.replace(HEALTHY, any_preempted_flag=True), 300, True, "preempted"),
    (dataclasses.replace(HEALTHY, agents_answered=3), 300, True, "1 of 4 agents did not answer"),
])
def test_only_healthy_slices_are_kept(health, keep_warm, pool_open, reason):
    found = keep_reason(health, keep_warm, pool_open)
    assert found is None if reason is None else reason in found
