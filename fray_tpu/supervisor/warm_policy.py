"""The warm pool's decisions (pure: no threads, no network; the clock is passed in).

Whether a finished job's slice is healthy enough to keep, whether a warm slice fits a request,
which warm slices a job takes, and when a warm slice expires. The shell that holds, cleans,
leases and deletes warm slices is ``fray_tpu.supervisor.pool``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SliceShape:
    """Everything a slice was created with that a job can tell apart: a slice fits a request
    only if all of it is equal (the zone is checked separately, against the job's allowed zones)."""

    tpu_type: str
    capacity: str
    runtime_version: str
    queued: bool
    network: str | None
    subnetwork: str | None
    external_ips: bool
    network_tag: str
    service_account: str | None
    image: str  # what the VMs booted: the startup script's digest (agent version included)


@dataclass(frozen=True)
class WarmSlice:
    name: str
    zone: str
    shape: SliceShape
    warm_since: float  # on the pool's clock


@dataclass(frozen=True)
class SliceHealth:
    """What the shell observed about a finished job's slice before keeping it."""

    lost_in_last_attempt: bool  # preempted, lost or bad host according to the job's last verdict
    node_lost: bool  # the cloud reports it PREEMPTED/TERMINATED/gone
    agents_answered: int
    hosts: int
    any_preempted_flag: bool  # an agent reports the `preempted` metadata flag


def keep_reason(health: SliceHealth, keep_warm: float, pool_open: bool) -> str | None:
    """None when the slice should go warm; otherwise why it is deleted instead."""
    if keep_warm <= 0:
        return "keep_warm is 0"
    if not pool_open:
        return "the controller is shutting down"
    if health.lost_in_last_attempt:
        return "the job's last attempt lost it"
    if health.node_lost:
        return "the cloud reports it lost"
    if health.any_preempted_flag:
        return "an agent reports it preempted"
    if health.agents_answered < health.hosts:
        return f"{health.hosts - health.agents_answered} of {health.hosts} agents did not answer"
    return None


def fits(warm: WarmSlice, shape: SliceShape, zones: Sequence[str]) -> bool:
    return warm.shape == shape and warm.zone in zones


def choose(warm: Sequence[WarmSlice], shape: SliceShape, zones: Sequence[str], count: int) -> list[WarmSlice]:
    """The warm slices a job needing ``count`` slices of ``shape`` in ``zones`` takes: all from
    one zone (a gang stays in one zone), the zone with the most fitting slices (ties: the job's
    zone order), newest first so that under light load the older ones expire and the pool
    shrinks. The job creates the rest (in that zone first)."""
    if count <= 0:
        return []
    by_zone: dict[str, list[WarmSlice]] = {}
    for candidate in warm:
        if fits(candidate, shape, zones):
            by_zone.setdefault(candidate.zone, []).append(candidate)
    if not by_zone:
        return []
    zone = max(by_zone, key=lambda z: (min(len(by_zone[z]), count), -list(zones).index(z)))
    newest_first = sorted(by_zone[zone], key=lambda w: w.warm_since, reverse=True)
    return newest_first[:count]


def expired(warm: WarmSlice, now: float, keep_warm: float) -> bool:
    return now - warm.warm_since >= keep_warm


def next_expiry_in(warm: Sequence[WarmSlice], now: float, keep_warm: float) -> float | None:
    """Seconds until the next warm slice expires (None: the pool is empty)."""
    if not warm:
        return None
    return max(0.0, min(w.warm_since + keep_warm for w in warm) - now)


def idle_seconds(warm: WarmSlice, now: float) -> float:
    return max(0.0, now - warm.warm_since)
