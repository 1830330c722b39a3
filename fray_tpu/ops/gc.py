"""Orphan collection: find and delete fray-tpu resources that no live job owns.

Level-triggered, like a controller's reconcile: compare what the cloud has (every resource
carrying fray-tpu's labels, one list call per zone) with what the journal says is live, and
delete the difference. Safe to run at any time and any number of times.

A resource is an orphan when:
- its job is not a running job in the journal (finished, unknown, or from another state dir) —
  including a queued resource granted after its job gave up (marin #4724);
- it is a queued resource in FAILED or SUSPENDED: it never runs again and holds quota (marin #87);
- it is a warm slice (``fray_tpu.supervisor.pool``) whose controller is dead: no one can reach it;
- it is a node in a lost state (PREEMPTED, TERMINATED, ...): preempted nodes are not deleted by
  Google and keep holding quota (SkyPilot #1468).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from fray_tpu import naming
from fray_tpu.provisioner import SliceObservation, SliceProvisioner

DEAD_QUEUED_STATES = ("FAILED", "SUSPENDED")


@dataclass(frozen=True)
class Orphan:
    observation: SliceObservation
    reason: str

    @property
    def queued(self) -> bool:
        return self.observation.queued_state is not None

    def to_dict(self) -> dict:
        o = self.observation
        return {"name": o.name, "zone": o.zone, "state": o.state, "queued_state": o.queued_state,
                "job": o.labels.get(naming.LABEL_JOB), "reason": self.reason}


def find_orphans(observed: Iterable[SliceObservation], live_job_labels: set[str],
                 owned: Collection[tuple[str, str]] = ()) -> list[Orphan]:
    """Pure: which of ``observed`` to delete, given the label values of the live jobs and the
    (name, zone) of slices a journal says are held (a running job's, a live warm pool's)."""
    orphans = []
    for o in observed:
        job = o.labels.get(naming.LABEL_JOB, "")
        if o.queued_state in DEAD_QUEUED_STATES:
            orphans.append(Orphan(o, f"queued resource {o.queued_state}: it never runs again and holds quota"))
        elif job not in live_job_labels and (o.name, o.zone) not in owned:
            what = "queued resource granted after its job ended" if o.queued_state else "its job is not running"
            orphans.append(Orphan(o, f"{what} (job {job or 'unknown'})"))
        elif o.lost:
            orphans.append(Orphan(o, f"node {o.state}: lost, still holding quota"))
    return orphans


def live_job_labels(job_ids: Iterable[str]) -> set[str]:
    return {naming.label_value(job_id) for job_id in job_ids}


def collect(
    provisioner: SliceProvisioner,
    zones: Sequence[str],
    live_jobs: Iterable[str],
    *,
    delete: bool,
    delete_deadline: float = 600.0,
    report: Callable[[str], None] = lambda line: None,
    owned: Collection[tuple[str, str]] = (),
) -> list[Orphan]:
    """List orphans in ``zones``; with ``delete``, delete each (verified) and report progress."""
    orphans = find_orphans(provisioner.list_managed(zones), live_job_labels(live_jobs), owned)
    for orphan in orphans:
        o = orphan.observation
        report(f"orphan {o.name} in {o.zone} ({o.state}): {orphan.reason}")
        if delete:
            provisioner.delete(o.name, o.zone, deadline=time.monotonic() + delete_deadline, queued=orphan.queued)
            report(f"deleted {o.name} in {o.zone}")
    return orphans
