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
  Google and keep holding quota (SkyPilot #1468);
- its agents published that their lease lapsed and the TPU API refused their self-delete (the
  VMs' service account lacks ``tpu.nodes.delete``): no controller holds it, and its agents meant
  it gone, even when the journal still lists its job as running (the driver died).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from google.api_core import exceptions as api_exceptions

from fray_tpu import naming
from fray_tpu.contract import GUEST_NAMESPACE, GUEST_SELF_DELETE_REFUSED
from fray_tpu.errors import ProvisioningError
from fray_tpu.provisioner import SliceObservation, SliceProvisioner

log = logging.getLogger(__name__)

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
                 owned: Collection[tuple[str, str]] = (),
                 refused: Mapping[tuple[str, str], str] | None = None) -> list[Orphan]:
    """Pure: which of ``observed`` to delete, given the label values of the live jobs, the
    (name, zone) of slices a journal says are held (a running job's, a live warm pool's), and
    the slices whose agents published a refused self-delete ((name, zone) -> what they said)."""
    orphans = []
    refused = refused or {}
    for o in observed:
        job = o.labels.get(naming.LABEL_JOB, "")
        if (o.name, o.zone) in refused:
            orphans.append(Orphan(o, f"its lease lapsed and its agents could not delete it ({refused[o.name, o.zone]})"))
        elif o.queued_state in DEAD_QUEUED_STATES:
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
    observed = provisioner.list_managed(zones)
    refused = {(o.name, o.zone): why for o in observed if (why := self_delete_refusal(provisioner, o))}
    orphans = find_orphans(observed, live_job_labels(live_jobs), owned, refused)
    for orphan in orphans:
        o = orphan.observation
        report(f"orphan {o.name} in {o.zone} ({o.state}): {orphan.reason}")
        if delete:
            provisioner.delete(o.name, o.zone, deadline=time.monotonic() + delete_deadline, queued=orphan.queued)
            report(f"deleted {o.name} in {o.zone}")
    return orphans


def self_delete_refusal(provisioner: SliceProvisioner, observation: SliceObservation) -> str | None:
    """What a READY node's agents published when the TPU API refused their lease self-delete
    (one GetGuestAttributes call); None when nothing was, or it cannot be read now."""
    if not observation.ready:
        return None
    try:
        workers = provisioner.guest_attributes(observation.zone, observation.name, GUEST_NAMESPACE)
    except (ProvisioningError, api_exceptions.GoogleAPICallError) as error:  # gone meanwhile, or an outage
        log.warning("could not read the guest attributes of %s: %s", observation.name, error)
        return None
    return next((w[GUEST_SELF_DELETE_REFUSED] for w in workers if w.get(GUEST_SELF_DELETE_REFUSED)), None)
