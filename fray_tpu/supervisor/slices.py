"""A TPU job's slices: acquired in parallel, every slice of an attempt in one zone (journaled
before each create), waited for with the capacity policy, restored from the journal after a
controller restart, and released.

Every slice this keeper creates is deleted by ``release_all`` (``fray-tpu gc`` finds anything a
crash left behind by label).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

from fray_tpu import channel, naming, tls
from fray_tpu import contract as md
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import CapacityUnavailableError, FrayTpuError, ProvisioningError
from fray_tpu.hostboot import bootstrapper_for
from fray_tpu.state.journal import Journal, ResourceRow, ResourceState
from fray_tpu.placement import FailNow, GroupPlacement, Placed
from fray_tpu.planning import JobPlan
from fray_tpu.provisioner import CancelledError, ReadySlice, SliceProvisioner, SliceSpec, node_resource_name
from fray_tpu.supervisor.attempt import in_parallel
from fray_tpu.supervisor.capacity import CapacityWait, GiveUp
from fray_tpu.supervisor.credentials import BackgroundWrites, JobCredentials
from fray_tpu.supervisor.job import JobStopped
from fray_tpu.supervisor.phases import JobPhase
from fray_tpu.supervisor.pool import POOL_JOB_ID, WarmPool
from fray_tpu.supervisor.warm_policy import SliceShape

log = logging.getLogger(__name__)


@dataclass
class ControllerContext:
    """What every TPU job of one controller shares."""

    config: TpuClusterConfig
    provisioner: SliceProvisioner
    controller_id: str
    emulator_endpoint: str | None
    cluster_spec: str  # what tasks get as FRAY_CLUSTER_SPEC (the emulator endpoint included)
    pool: WarmPool | None = None


class SliceKeeper:
    """The job's slices by slice id (None: not held)."""

    def __init__(self, job_id: str, plan: JobPlan, context: ControllerContext, journal: Journal,
                 credentials: JobCredentials, writes: BackgroundWrites, *, stop: threading.Event, progress: Callable[[str], None],
                 set_phase: Callable[[JobPhase], None], count_capacity_wait: Callable[[], None]):
        self.job_id = job_id
        self.plan = plan
        self.context = context
        self.config = context.config
        self.journal = journal
        self.credentials = credentials
        self._writes = writes
        self.slices: list[ReadySlice | None] = [None] * plan.replicas
        # Each host's pinned certificate (address -> PEM) of the slices taken warm: they keep the
        # identities they booted with, so no boot is watched for them.
        self.certs: dict[int, dict[str, bytes]] = {}
        self.warm_taken: list[str] = []
        self.warm_clients: dict[int, list[channel.AgentClient]] = {}  # connections that came with warm slices
        self.hand_over_due: dict[int, int] = {}  # slices taken warm, not yet handed over -> the attempt taking them
        # The job environment known to be on every host of a slice (``environment_key``): what
        # its last job prepared there (taken warm), or what this job's last Prepare did.
        self.environments: dict[int, Hashable] = {}
        self.handed_over: list[ResourceRow] = []  # this job's rows of the slices it left to the warm pool
        self._stop = stop
        self._progress = progress
        self._set_phase = set_phase
        self._count_capacity_wait = count_capacity_wait
        self._deletions: list[threading.Thread] = []
        # Rendered (its host bundle built and staged) by the first ensure(), before anything is
        # provisioned; restore() only checks names, which do not depend on it.
        self._startup_script: str | None = None

    def spec(self, slice_id: int, attempt: int) -> SliceSpec:
        name = naming.slice_name(self.plan.name, self.job_id, attempt, slice_id)
        metadata = {
            md.ATTR_STARTUP_SCRIPT: self._startup_script or "",
            md.ATTR_SECRET_SHA256: tls.secret_sha256(self.credentials.secret),
            md.ATTR_NODE: name,
            md.ATTR_AGENT_PORT: str(self.config.agent_port),
            md.ATTR_LEASE_SECONDS: str(self.config.lease_period),
            md.ATTR_FIRST_LEASE_SECONDS: str(self.config.boot_deadline + self.config.lease_period),
            md.ATTR_TLS_LEAF_SECONDS: str(self.config.tls_leaf_validity),
            md.ATTR_SELF_DELETE: "true",
            md.ATTR_JOB: self.job_id,
            md.ATTR_CONTROLLER: self.context.controller_id,
        }
        if self.context.emulator_endpoint:
            metadata[md.ATTR_API_ENDPOINT] = self.context.emulator_endpoint
        return SliceSpec(
            name=name,
            tpu_type=self.plan.tpu_type,
            runtime_version=self.plan.runtime_version,
            capacity=self.plan.capacity,
            labels=naming.resource_labels(self.job_id, attempt, self.context.controller_id, slice_id,
                                          extra=self.plan.labels),
            metadata=metadata,
            network=self.config.network,
            subnetwork=self.config.subnetwork,
            external_ips=self.config.external_ips,
            connect=self.config.connect,
            network_tag=self.config.network_tag,
            service_account=self.config.service_account,
            queued=self.plan.queued,
        )

    def shape(self) -> SliceShape:
        """What a warm slice must match to serve this job (after ``ensure`` rendered the startup script)."""
        script = self._startup_script
        return SliceShape(
            tpu_type=self.plan.tpu_type, capacity=self.plan.capacity, runtime_version=self.plan.runtime_version,
            queued=self.plan.queued, network=self.config.network, subnetwork=self.config.subnetwork,
            external_ips=self.config.external_ips, network_tag=self.config.network_tag,
            service_account=self.config.service_account,
            image=hashlib.sha256(script.encode()).hexdigest(),
        )

    def known_certs(self, slice_id: int) -> dict[str, bytes] | None:
        return self.certs.get(slice_id)

    def _take_warm(self, attempt: int) -> None:
        """Fill missing slices from the controller's warm pool (one zone; the rest is created
        there first). Their hosts are handed over to the job by its first Prepare
        (``hand_over_due``); until then the journal keeps them as the pool's."""
        missing = [i for i, s in enumerate(self.slices) if s is None]
        pool = self.context.pool
        if pool is None or not missing:
            return
        taken = pool.take(self.shape(), self.plan.zones, len(missing), self.journal, self.job_id)
        for slice_id, warm in zip(missing, taken):
            name = warm.ready.spec.name
            self.slices[slice_id] = dataclasses.replace(
                warm.ready, spec=dataclasses.replace(self.spec(slice_id, attempt), name=name))
            self.certs[slice_id] = warm.certificates()
            self.warm_clients[slice_id] = warm.clients
            self.hand_over_due[slice_id] = attempt
            if warm.env_key is not None:
                self.environments[slice_id] = warm.env_key
            self._writes.submit(self.credentials.store_slice_certs, self.journal, self.job_id, name,
                                self.certs[slice_id])
            self._progress(f"slice-{slice_id}: took warm slice {name} in {warm.ready.zone}")

    def confirm_taken(self, slice_ids: Collection[int]) -> None:
        """The job's Prepare handed these warm slices' hosts over to it: journaled as the job's
        (before its attempt starts, so a restarted controller reattaches to them)."""
        now = time.time()
        for slice_id in sorted(slice_ids):
            ready = self.slices[slice_id]
            self.journal.update_resource(ready.spec.name, ready.zone, job_id=self.job_id,
                                         attempt=self.hand_over_due.pop(slice_id), slice_id=slice_id,
                                         state=ResourceState.READY, created=now, ready_at=now)
            self.warm_taken.append(ready.spec.name)

    def refused(self, slice_id: int, why: str) -> None:
        """A warm slice whose hosts could not be handed over (preempted, gone, busy): deleted;
        the next ``ensure`` takes or creates another, in the same attempt."""
        self.hand_over_due.pop(slice_id, None)
        self._progress(f"slice-{slice_id}: warm slice {self.slices[slice_id].spec.name} not taken: {why}; "
                       "taking or creating another")
        self.release(slice_id)

    def restore(self, slices: dict[int, tuple[str, int, str, list[str]]]) -> None:
        """Take back the ready slices an earlier controller held (slice id -> name, attempt, zone, endpoints)."""
        for slice_id, (name, attempt, zone, endpoints) in slices.items():
            spec = self.spec(slice_id, attempt)
            warm_certs = self.credentials.load_slice_certs(self.journal, self.job_id, name)
            if warm_certs is not None:
                spec = dataclasses.replace(spec, name=name)
                self.certs[slice_id] = warm_certs
            if spec.name != name:
                raise FrayTpuError(f"journal slice {name} does not match job {self.job_id} (expected {spec.name}): "
                                   f"was the journal written by another fray-tpu version?")
            self.slices[slice_id] = ReadySlice(spec, zone, node_resource_name(self.context.provisioner.project, zone, name),
                                               tuple(endpoints), self._external_ips(name, zone, endpoints))

    def _external_ips(self, name: str, zone: str, endpoints: list[str]) -> tuple[str, ...]:
        """The external IPs of a slice taken back from the journal (which keeps only the internal
        addresses), in the journal's endpoint order: asked of the API when connect=external."""
        if self.config.connect != "external":
            return ()
        try:
            observed = self.context.provisioner.observe(zone).get(name)
        except ProvisioningError as error:
            log.warning("could not list %s for the external IPs of %s (%s); it cannot be dialled", zone, name, error)
            return ()
        if observed is None:
            return ()
        by_ip = dict(zip(observed.endpoints, observed.external_ips))
        return tuple(by_ip.get(ip, "") for ip in endpoints)

    def reorder(self, slice_id: int, order: list[int]) -> None:
        """Put the slice's endpoints in worker order (``order``: endpoint indexes), here and in the journal."""
        ready = self.slices[slice_id].reordered(order)
        self.slices[slice_id] = ready
        self.journal.update_resource(ready.spec.name, ready.zone, endpoints=list(ready.endpoints))

    @property
    def complete(self) -> bool:
        return all(self.slices)

    def guest_attributes(self, slice_id: int) -> list[dict[str, str]]:
        """What every worker of a held slice published (its boot phases, its agent's
        certificate), in worker order: one GetGuestAttributes call."""
        ready = self.slices[slice_id]
        return self.context.provisioner.guest_attributes(ready.zone, ready.spec.name, md.GUEST_NAMESPACE)

    def staging(self) -> tuple[str, str]:
        """The staging bucket (API root as the VMs reach it, name) the host bundle travels
        through, which also carries the job environments hosts build."""
        return bootstrapper_for(self.config, self.context.emulator_endpoint).staging()

    def ensure(self, attempt: int) -> None:
        """Acquire every missing slice, every slice of the attempt in one zone
        (``placement.GroupPlacement``): in parallel in a zone; when one cannot be had there, what
        the zone gave is released and the group tries the next zone. Without capacity anywhere,
        back off and try again until the capacity deadline (no budget is consumed by waiting). A
        refusal no retry heals fails the job now, as does every zone being skipped."""
        if self._startup_script is None:
            # Before anything is provisioned: a bundle that cannot be built fails the job here.
            bootstrapper = bootstrapper_for(self.config, self.context.emulator_endpoint)
            self._startup_script = bootstrapper.startup_script(self.plan.runtime_version)
        wait = CapacityWait(self.config.capacity_deadline, self.plan.tpu_type, self.plan.zones, time.monotonic)
        self._take_warm(attempt)
        while True:
            missing = [i for i, s in enumerate(self.slices) if s is None]
            if not missing:
                return
            self._set_phase(JobPhase.PROVISIONING)
            # Slices taken warm hold the gang to their zone, like any slice already held.
            placement = GroupPlacement(wait.zones(), [s.zone for s in self.slices if s is not None], len(self.slices))
            stocked_out: set[str] = set()
            while (zones := placement.next_group()) is not None:
                errors = self._acquire_group(missing, attempt, zones, wait.deadline, stocked_out)
                if self._stop.is_set() or any(isinstance(e, CancelledError) for e in errors.values()):
                    raise JobStopped
                give_back = placement.after_group(errors)
                if give_back is not None:
                    for slice_id in missing:
                        self.release(slice_id)
                    self._progress(give_back.message)
            outcome = placement.outcome()
            if isinstance(outcome, Placed):
                return
            if isinstance(outcome, FailNow):
                raise outcome.error
            self._count_capacity_wait()
            step = wait.after_failed_round(outcome.errors, sorted(stocked_out))
            if isinstance(step, GiveUp):
                raise CapacityUnavailableError(step.message)
            self._progress(step.message)
            if self._stop.wait(step.delay):
                raise JobStopped

    def _acquire_group(self, missing: list[int], attempt: int, zones: list[str], capacity_deadline: float,
                       stocked_out: set[str]) -> dict[int, Exception]:
        """Acquire the ``missing`` slices in parallel in ``zones``; the errors by slice id."""
        errors: dict[int, Exception] = {}
        threads = [threading.Thread(target=self._acquire, args=(i, attempt, zones, capacity_deadline, errors, stocked_out),
                                    daemon=True)
                   for i in missing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors

    def _acquire(self, slice_id: int, attempt: int, zones: list[str], capacity_deadline: float,
                 errors: dict[int, Exception], stocked_out: set[str]) -> None:
        spec = self.spec(slice_id, attempt)
        zones_tried: list[str] = []
        self._progress(f"slice-{slice_id}: requested {spec.tpu_type} ({spec.capacity}) as {spec.name}, "
                       f"zones {', '.join(zones)}")

        def before_create(zone: str) -> None:
            zones_tried.append(zone)
            self._journal_creating(spec, slice_id, attempt, zone)

        try:
            ready = self.context.provisioner.acquire(
                spec, zones,
                deadline=time.monotonic() + self.config.create_deadline,
                cancel=self._stop,
                on_progress=lambda line: self._progress(f"slice-{slice_id}: {line}"),
                before_create=before_create,
                capacity_deadline=capacity_deadline,
            )
        except Exception as error:  # noqa: BLE001 - classified by the placement and capacity policies
            errors[slice_id] = error
            # acquire moves on to the next zone only when a zone cannot take the slice.
            stocked_out.update(zones_tried if isinstance(error, CapacityUnavailableError) else zones_tried[:-1])
            for zone in zones_tried:  # acquire deleted whatever it created
                self.journal.update_resource(spec.name, zone, state=ResourceState.FAILED)
            return
        stocked_out.update(zones_tried[:-1])
        for zone in zones_tried[:-1]:
            self.journal.update_resource(spec.name, zone, state=ResourceState.FAILED)
        self.journal.update_resource(spec.name, ready.zone, state=ResourceState.READY, endpoints=list(ready.endpoints),
                                     ready_at=time.time())
        self.slices[slice_id] = ready

    def _journal_creating(self, spec: SliceSpec, slice_id: int, attempt: int, zone: str) -> None:
        if any(r.name == spec.name and r.zone == zone for r in self.journal.resources(job_id=self.job_id)):
            # A later provisioning round of the same attempt reuses the slice's name.
            self.journal.update_resource(spec.name, zone, state=ResourceState.CREATING, endpoints=[], created=time.time(),
                                         ready_at=None, deleted_at=None)
            return
        self.journal.add_resource(ResourceRow(
            job_id=self.job_id, attempt=attempt, slice_id=slice_id, name=spec.name, zone=zone,
            kind="queued" if spec.queued else "node", state=ResourceState.CREATING, endpoints=[], created=time.time(),
            ready_at=None, deleted_at=None, tpu_type=spec.tpu_type, chips=self.plan.shape.chip_count,
        ))

    def release(self, slice_id: int) -> None:
        """Forget the slice and delete it in the background (``release_all`` waits for deletions)."""
        ready = self.slices[slice_id]
        self.slices[slice_id] = None
        self.certs.pop(slice_id, None)
        self.environments.pop(slice_id, None)
        if ready is None:
            return
        thread = threading.Thread(target=self._delete, args=(slice_id, ready), daemon=True,
                                  name=f"delete-{ready.spec.name}")
        thread.start()
        self._deletions.append(thread)

    def _delete(self, slice_id: int, ready: ReadySlice) -> None:
        self._delete_resource(slice_id, ready.spec.name, ready.zone, queued=ready.spec.queued)

    def _delete_resource(self, slice_id: int, name: str, zone: str, *, queued: bool) -> None:
        try:
            self.journal.update_resource(name, zone, state=ResourceState.DELETING)
            self.context.provisioner.delete(name, zone, deadline=time.monotonic() + self.config.delete_deadline,
                                            queued=queued)
            self.journal.update_resource(name, zone, state=ResourceState.DELETED, deleted_at=time.time())
            self._progress(f"slice-{slice_id}: deleted {name} in {zone}")
        except Exception as error:  # noqa: BLE001 - reported; gc finds it by label
            log.error("job %s: could not delete slice %s in %s: %s (`fray-tpu gc` will find it by label)",
                      self.job_id, name, zone, error)
            self._progress(f"slice-{slice_id}: NOT DELETED: {error}")

    def delete_leftovers(self, rows: Sequence[ResourceRow]) -> None:
        """On takeover: delete, in parallel and before the job goes on, the journaled resources
        the job will not use (``takeover.sort_journaled``): half-created nodes and queued
        resources, deletions the dead controller had not seen through."""
        for row in rows:
            self._progress(f"slice-{row.slice_id}: deleting {row.name} in {row.zone}, left {row.state} "
                           "by the controller that went away")
        in_parallel(lambda row: self._delete_resource(row.slice_id, row.name, row.zone, queued=row.kind == "queued"),
                    list(rows))

    def release_all(self, lost: Collection[int] = (),
                    clients_of: Callable[[int], list[channel.AgentClient]] | None = None) -> None:
        """With ``clients_of`` (the job's connections to each slice's agents), offer each slice
        to the warm pool (which decides whether it is healthy enough); delete the others."""
        pool = self.context.pool
        for slice_id, ready in enumerate(self.slices):
            if ready is None:
                continue
            # A slice is offered only under the image (startup script) this controller rendered.
            if clients_of is not None and pool is not None and self._startup_script is not None:
                # Taken warm but never handed over (stopped before its Prepare): still the pool's row.
                never_held = self.hand_over_due.pop(slice_id, None) is not None
                holder = POOL_JOB_ID if never_held else self.job_id
                row = next(r for r in self.journal.resources(job_id=holder) if r.name == ready.spec.name)
                why_not = pool.offer(ready, self.shape(), clients_of(slice_id), self.journal,
                                     lost_in_last_attempt=slice_id in lost, chips=row.chips, released_by=self.job_id,
                                     env_key=None if never_held else self.environments.get(slice_id))
                if why_not is None:
                    if not never_held:
                        self.handed_over.append(dataclasses.replace(row, deleted_at=time.time()))
                    self.slices[slice_id] = None
                    self._progress(f"slice-{slice_id}: {ready.spec.name} kept warm for the next job of its shape")
                    continue
                self._progress(f"slice-{slice_id}: not kept warm: {why_not}")
            self.release(slice_id)
        for thread in self._deletions:
            thread.join(self.config.delete_deadline + 60)
