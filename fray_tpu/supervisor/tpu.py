"""TPU jobs: provision → boot → prepare → start (or resume) the gang → watch → retry or finish,
deleting every slice at the end.

A fresh attempt and a reattached one share one path: reattaching is resuming the gang an
earlier controller started (``_resume``), then following it like any other.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass

from fray_tpu import channel
from fray_tpu.costs import AttemptAccount, JobAccount
from fray_tpu.decisions import AttemptVerdict, JobCounters, TaskEnd, TaskOutcome, judge_attempt
from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.records import JobRecord
from fray_tpu.state.journal import Journal, JobRow, ResourceRow
from fray_tpu.multislice import gang_environments
from fray_tpu.planning import JobPlan
from fray_tpu.supervisor.credentials import BackgroundWrites, JobCredentials
from fray_tpu.supervisor.gang import Connected, Gang
from fray_tpu.supervisor.gang_run import TpuGangRun, observe_slices
from fray_tpu.supervisor.watch import lost_slices
from fray_tpu.supervisor.job import JobStopped, JobSupervisor
from fray_tpu.supervisor.phases import JobPhase
from fray_tpu.supervisor.slices import ControllerContext, SliceKeeper
from fray_tpu.supervisor.takeover import sort_journaled
from fray_tpu.workspace import check_workspace_lock, pack_workspace
from fray_tpu.multislice import TaskSlot

# How long a gang's other hosts wait for the first host's build of a missing job environment
# before building it themselves: longer than most builds (a minute or two from a mirror), short
# enough that a builder lost mid-build delays the gang by little more than a build.
ENV_BUILDER_WAIT_SECONDS = 300.0


@dataclass
class ResumeState:
    """Where a job stood when its controller went away, from the journal."""

    attempt: int
    attempt_id: str | None
    slices: dict[int, tuple[str, int, str, list[str]]]  # slice id -> (name, attempt, zone, endpoints)
    leftovers: tuple[ResourceRow, ...]  # live resources the job will not use: deleted on takeover
    counters: dict[str, int]
    credentials: JobCredentials
    extra: dict

    @classmethod
    def from_journal(cls, row: JobRow, journal: Journal, credentials: JobCredentials) -> ResumeState:
        takeover = sort_journaled(journal.resources(job_id=row.job_id))
        slices = {slice_id: (r.name, r.attempt, r.zone, list(r.endpoints)) for slice_id, r in takeover.adopt.items()}
        return cls(attempt=row.attempt, attempt_id=row.attempt_id, slices=slices, leftovers=takeover.delete,
                   counters=dict(row.counters), extra=dict(row.extra), credentials=credentials)


class Retake:
    """A slice taken warm could not be handed over and was deleted: acquire the gang again."""


@dataclass
class StartedAttempt:
    """An attempt whose gang is running: ``run`` reads its hosts, ``entry`` its accounting."""

    run: TpuGangRun
    entry: AttemptAccount | None


class TpuJobSupervisor(JobSupervisor):
    outlives_controller = True  # its gang runs on slices whose agents hold a lease

    def __init__(self, record: JobRecord, plan: JobPlan, context: ControllerContext,
                 resume: ResumeState | None = None):
        super().__init__(record, plan, plan.tasks, context.config.poll_interval)
        self.context = context
        self.config = context.config
        self.journal = record.journal
        self.resume = resume
        self.credentials = resume.credentials if resume is not None else JobCredentials.make()
        self.account = JobAccount(generation=plan.shape.generation, capacity=plan.capacity)
        self.writes = BackgroundWrites()  # the job's secret files, waited for before an attempt starts
        self.slices = SliceKeeper(record.job_id, plan, context, self.journal, self.credentials, self.writes,
                                  stop=self.stop_requested, progress=self.progress, set_phase=record.set_phase,
                                  count_capacity_wait=self._count_capacity_wait)
        self.gang = Gang(self.config, self.credentials, self.progress)
        self._bundle = None
        self._last_lost: frozenset[int] = frozenset()  # slices the last verdict lost or found bad

    def _count_capacity_wait(self) -> None:
        self.record.counters.capacity_waits += 1

    def setup(self) -> None:
        if self.resume is None:
            # A stale lock fails the job here, before any slice; a reattached job passed this at launch.
            check_workspace_lock(self.plan.workspace)
            self.writes.submit(self.credentials.store, self.journal, self.record.job_id)
        else:
            self.slices.delete_leftovers(self.resume.leftovers)
            self.slices.restore(self.resume.slices)
            restored = JobCounters.from_mapping(self.resume.counters)
            for name in JobCounters.__dataclass_fields__:
                setattr(self.record.counters, name, getattr(restored, name))
            self.account = JobAccount.from_extra({**self.account.to_extra(), **self.resume.extra})
        self.gang.start_leases(self.record.job_id)

    # -- one attempt -------------------------------------------------------------------------
    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        started = self._resume(attempt) if self.resume is not None else None
        if started is None:
            started = self._start(attempt)
        if isinstance(started, AttemptVerdict):
            return started
        verdict = None
        try:
            verdict = self.follow(started.run)
            self._last_lost = verdict.lost_slices | verdict.bad_slices
            return verdict
        finally:
            started.run.close()
            if started.entry is not None and not self.detach_requested.is_set():
                self._end_account(started.entry, verdict)

    def _start(self, attempt: int) -> StartedAttempt | AttemptVerdict:
        attempt_id = f"{self.record.job_id}-a{attempt}"
        retake = 0
        while isinstance(started := self._prepare_and_start(attempt, attempt_id), Retake):
            # The hosts already prepared hold the old id with the old gang's environment: the
            # gang with the replacement slice prepares under an id of its own.
            retake += 1
            attempt_id = f"{self.record.job_id}-a{attempt}.{retake}"
        return started

    def _prepare_and_start(self, attempt: int, attempt_id: str) -> StartedAttempt | AttemptVerdict | Retake:
        """Acquire the slices, form the gang, upload, prepare every host and start the attempt;
        the verdict of an attempt that cannot start, or ``Retake`` when a slice taken warm could
        not be handed over (deleted: acquire again).

        A gang whose hosts all have the job's environment already (warm slices whose last job
        prepared the same one, a retry on the slices of the last attempt) is started by the
        Prepare itself, in one round; any other gang is started once every host is prepared, so
        that no host runs while another still builds. Either way, what a restarted controller
        needs to reattach is durable before anything runs."""
        self.slices.ensure(attempt)
        self.record.set_phase(JobPhase.BOOTING)
        for slice_id, clients in self.slices.warm_clients.items():
            self.gang.adopt(slice_id, clients)
        self.slices.warm_clients.clear()
        unformed = self._form_gang(TaskOutcome.BAD_HOST, "agent never answered")
        if unformed is not None:
            return unformed
        environments = gang_environments([s.endpoints for s in self.slices.slices], self.plan.env,
                                         cluster_spec=self.context.cluster_spec,
                                         emulated=bool(self.context.emulator_endpoint),
                                         controller_python="%d.%d" % sys.version_info[:2])
        hand_over = dict(self.slices.hand_over_due)
        unreachable = self._upload_workspace()
        refused = {s: f"workspace upload failed: {why}" for s, why in unreachable.items() if s in hand_over}
        if unreachable.keys() - refused.keys():
            return self._verdict_for_hosts(unreachable, TaskOutcome.LOST, "workspace upload failed")
        if refused:
            return self._retake(refused)
        environment = self._environment_key()
        at_once = all(self.slices.environments.get(s) == environment for s in range(len(self.slices.slices)))
        specs = [self._attempt_spec(attempt_id, slot, environments[slot.index], start=at_once) for slot in self.slots]
        run = TpuGangRun(attempt_id, self.gang.clients(), self.slices.slices, self.context.provisioner,
                         self.gang.liveness)
        entry = None
        self.record.set_phase(JobPhase.PREPARING)
        if at_once:
            self.slices.confirm_taken(hand_over)
            entry = self._record_start(attempt, attempt_id, "prepared and started in one call: every host "
                                                            "has the job's environment")
        # The cloud's word on the slices taken warm, asked while their Prepares travel: a slice
        # it reports lost is not taken even where its agents still answer.
        prepared, problems, refused = self.gang.prepare(specs, hand_over, self.record.job_id, lost=lambda: lost_slices(
            observe_slices(self.context.provisioner, {s: self.slices.slices[s] for s in hand_over})))
        if at_once and (refused or problems or self.stop_requested.is_set()):
            self.gang.cancel(attempt_id, skip=refused)
            self.account.attempts.remove(entry)
            self._save_account()
        if refused:
            return self._retake(refused)
        if not at_once:
            self.slices.confirm_taken(hand_over)
        if hand_over and not self.account.started_warm:
            self.account.started_warm = list(self.slices.warm_taken)
        failed = self._prepare_failed(prepared, problems)
        if failed is not None:
            return failed
        self.slices.environments.update(dict.fromkeys(range(len(self.slices.slices)), environment))
        if self.stop_requested.is_set():
            raise JobStopped  # terminated while the hosts prepared: start nothing (or nothing more)
        if entry is None:
            entry = self._record_start(attempt, attempt_id, "")
        try:
            # Prepared and started at once: its events from the first on.
            run.start(from_seqs=[1] * len(specs) if at_once else None)
        except BaseException:
            run.close()
            self._end_account(entry, None)
            raise
        return StartedAttempt(run, entry)

    def _record_start(self, attempt: int, attempt_id: str, how: str) -> AttemptAccount:
        """Journal the attempt as started, with what a restarted controller needs to reattach
        (the job's secret, the warm slices' certificates), before anything runs."""
        self.record.set_attempt(attempt, attempt_id)
        self.progress(f"attempt {attempt}: starting on {len(self.slots)} hosts of {len(self.slices.slices)} slice(s)"
                      + (f" ({how})" if how else ""))
        entry = AttemptAccount(attempt, time.time(), [s.spec.name for s in self.slices.slices])
        self.account.attempts.append(entry)
        self._save_account()
        self.writes.wait()
        return entry

    def _retake(self, refused: dict[int, str]) -> Retake:
        for slice_id, why in sorted(refused.items()):
            self.gang.drop(slice_id)
            self.slices.refused(slice_id, why)
        return Retake()

    def _environment_key(self) -> Hashable:
        """What decides the job environment a host prepares: equal keys, equal environments."""
        plan = self.plan
        return (tuple(plan.pip_packages), tuple(plan.extras), plan.python_version, plan.index_url,
                self._bundle.digest if self._bundle else "")

    def _resume(self, attempt: int) -> StartedAttempt | AttemptVerdict | None:
        """Follow the attempt an earlier controller started, from where each host is now; None
        when there is nothing to resume (a fresh attempt follows)."""
        resume, self.resume = self.resume, None
        if not (resume.attempt_id and resume.attempt == attempt - 1 and self.slices.complete):
            return None
        self.record.counters.attempts = resume.attempt
        attempt_id = resume.attempt_id
        self.progress(f"reattaching to attempt {attempt_id}")
        self.record.set_phase(JobPhase.BOOTING)
        unformed = self._form_gang(TaskOutcome.LOST, "agent unreachable after the controller restarted")
        if unformed is not None:
            return unformed
        clients = self.gang.clients()
        from_seqs = []
        for client in clients:
            current = client.describe().current_attempt
            if current is None or current.attempt_id != attempt_id:
                return self._verdict_for_hosts({0: f"{client.address} no longer runs {attempt_id}"}, TaskOutcome.LOST,
                                               "attempt gone after the controller restarted")
            from_seqs.append(max(1, current.last_seq))
        run = TpuGangRun(attempt_id, clients, self.slices.slices, self.context.provisioner, self.gang.liveness)
        entry = self.account.open_attempt()
        try:
            run.start(from_seqs)
        except BaseException:
            run.close()
            raise
        self.record.set_phase(JobPhase.RUNNING)
        return StartedAttempt(run, entry)

    def _form_gang(self, dead_outcome: TaskOutcome, dead_why: str) -> AttemptVerdict | None:
        """Connect the gang; the verdict of an attempt it cannot form: a slice lost meanwhile is a
        preemption, hosts that never answered end as ``dead_outcome``."""
        connected = self._connect()
        if self.stop_requested.is_set():
            raise JobStopped
        if connected.lost:
            return self._verdict_for_hosts(connected.lost, TaskOutcome.PREEMPTED, "slice lost")
        if connected.dead:
            return self._verdict_for_hosts(connected.dead, dead_outcome, dead_why)
        return None

    def _connect(self) -> Connected:
        """Connect the gang, the slices' endpoints put in worker order (JAX's process 0 and the
        coordinator are worker 0); returns what kept the hosts from forming it."""
        connected = self.gang.connect(self.slices.slices, self.slices.guest_attributes, self.stop_requested,
                                      self.slices.known_certs, self.context.provisioner)
        for slice_id, order in connected.reordered.items():
            self.slices.reorder(slice_id, order)
        return connected

    def _save_account(self) -> None:
        self.journal.update_job(self.record.job_id, extra=self.account.to_extra())

    def _end_account(self, entry: AttemptAccount, verdict: AttemptVerdict | None) -> None:
        entry.ended = time.time()
        entry.outcome = verdict.outcome.value if verdict else "error"
        if verdict is not None:
            held = self.slices.slices
            entry.lost = [held[s].spec.name for s in verdict.lost_slices if held[s] is not None]
        self._save_account()

    def _attempt_spec(self, attempt_id: str, slot: TaskSlot, env: dict[str, str], *, start: bool = False
                      ) -> channel.AttemptSpec:
        payload = self.plan.payload
        common = dict(
            start=start,
            job_id=self.record.job_id, task_id=slot.label, task_index=slot.index, env=env,
            workspace_digest=self._bundle.digest if self._bundle else "",
            pip_packages=list(self.plan.pip_packages), extras=list(self.plan.extras),
            python_version=self.plan.python_version, index_url=self.plan.index_url,
            env_cache=self._env_cache(slot),
        )
        if payload.kind == "callable":
            return channel.AttemptSpec(attempt_id, pickled_callable=payload.pickled, **common)
        return channel.AttemptSpec(attempt_id, command=payload.command, args=list(payload.args), **common)

    def _env_cache(self, slot: TaskSlot) -> channel.EnvCache:
        """The staging bucket shares the job's environment between hosts and jobs: the gang's
        first host builds it when no host has before, the others download what it uploads."""
        endpoint, bucket = self.slices.staging()
        return channel.EnvCache(storage_endpoint=endpoint, bucket=bucket, builder=slot.index == 0,
                                wait_seconds=ENV_BUILDER_WAIT_SECONDS)

    def _upload_workspace(self) -> dict[int, str]:
        """Returns the slices that could not take the workspace (treated like lost hosts: the
        slice is replaced, the user's budget untouched)."""
        if self.plan.workspace is None:
            return {}
        if self._bundle is None or not self._bundle.path.exists():
            # Packed once per job; packed again only if the cache dropped the archive meanwhile.
            self._bundle = pack_workspace(self.plan.workspace)
            self.progress(f"workspace {self.plan.workspace}: {self._bundle.file_count} files, "
                          f"{self._bundle.size / 1e6:.1f} MB, digest {self._bundle.digest[:12]}")
        return self.gang.upload(self._bundle, lambda index: self.slots[index].slice_id)

    def _prepare_failed(self, prepared: dict[int, channel.PrepareResult],
                        problems: dict[int, tuple[TaskOutcome, str]]) -> AttemptVerdict | None:
        """Report the gang's environments; the verdict when a host could not be prepared."""
        for line in channel.describe_environments(
                [(self.slots[i].slice_id, self.slots[i].worker_id, result) for i, result in sorted(prepared.items())]):
            self.progress(line)
        if not problems:
            return None
        ends = [TaskEnd(self.slots[i].index, self.slots[i].slice_id, self.slots[i].worker_id, outcome,
                        stderr_tail=f"preparing the host failed: {why}", label=self.slots[i].label)
                for i, (outcome, why) in sorted(problems.items())]
        for end in ends:
            self.record.set_task(end.task_index, JobStatus.FAILED, end.describe())
        return judge_attempt(ends, len(self.slots))

    def _verdict_for_hosts(self, slices: dict[int, str], outcome: TaskOutcome, what: str) -> AttemptVerdict:
        ends = [TaskEnd(slot.index, slot.slice_id, slot.worker_id, outcome, stderr_tail=f"{what}: {slices[slot.slice_id]}",
                        label=slot.label)
                for slot in self.slots if slot.slice_id in slices and slot.worker_id == 0]
        return judge_attempt(ends, len(self.slots))

    # -- between attempts and at the end --------------------------------------------------------
    def prepare_retry(self, replace_slices: frozenset[int]) -> None:
        for slice_id in sorted(replace_slices):
            self.gang.drop(slice_id)
            self.slices.release(slice_id)
        for i in range(len(self.slots)):
            self.record.set_task(i, JobStatus.PENDING)

    def _close_unadopted_warm_clients(self) -> None:
        for clients in self.slices.warm_clients.values():  # taken warm, never adopted (stopped before)
            for client in clients:
                client.close()

    def let_go(self) -> None:
        self.gang.stop_leases()  # as when the process exits: the agents' lease runs out unless a controller reattaches
        self._close_unadopted_warm_clients()
        for slice_id in range(len(self.slices.slices)):
            self.gang.drop(slice_id)

    def release_everything(self) -> None:
        self.gang.stop_leases()
        self._close_unadopted_warm_clients()
        self.slices.release_all(self._last_lost, clients_of=self.gang.take_clients)
        for slice_id in range(len(self.slices.slices)):
            self.gang.drop(slice_id)
        if self.slices.handed_over:
            self.account.handed_over.extend(self.slices.handed_over)
            self._save_account()
        try:
            self.writes.wait()
        finally:
            self.journal.delete_secrets(self.record.job_id)
