"""One supervisor thread per job: turns the decision core's verdicts into edge calls.

The loop is the same for TPU gangs and CPU replicas: run an attempt, collect one end per
task, ``judge_attempt``, ``decide``, then finish or retry. What differs is the ``AttemptRun``
that starts the tasks and reports their events: ``TpuGangRun`` (agents on provisioned slices,
over the task channel) or ``LocalReplicasRun`` (subprocesses of this machine).

Every path out of ``TpuJobSupervisor.run`` deletes every slice the job created (verified).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fray_tpu import channel, naming, tls
from fray_tpu.bootstrap import GUEST_NAMESPACE
from fray_tpu.hostboot import bootstrapper_for, watch_boot
from fray_tpu.worker.runner import CONTROLLER_PYTHON_ENV
from fray_tpu.config import TpuClusterConfig
from fray_tpu.decisions import (
    Action,
    AttemptVerdict,
    RetryBudget,
    TaskEnd,
    TaskOutcome,
    capacity_backoff,
    decide,
    judge_attempt,
)
from fray_tpu.errors import CapacityUnavailableError, FrayTpuError
from fray_tpu.fray_api import JobStatus
from fray_tpu.jobs import JobRecord
from fray_tpu.multislice import gang_environments
from fray_tpu.planning import JobPlan
from fray_tpu.provisioner import CancelledError, ReadySlice, SliceProvisioner, SliceSpec, node_resource_name
from fray_tpu.worker import metadata as md

log = logging.getLogger(__name__)

CANCEL_GRACE_SECONDS = 5.0
# After cancelling a gang, how long hosts may take to report their exit before counting as lost.
CANCEL_REPORT_SECONDS = 30.0
EMULATOR_JAX_PLUGIN = "fray_tpu.jax_emulated_preload"
# Lines the controller itself adds to a job's output (progress, retries), as opposed to the job's.
PROGRESS_PREFIX = "[fray-tpu] "

_OUTCOMES = {
    channel.Classification.OK: TaskOutcome.SUCCEEDED,
    channel.Classification.USER_FAILURE: TaskOutcome.FAILED,
    channel.Classification.BAD_HOST: TaskOutcome.BAD_HOST,
    channel.Classification.PREEMPTED: TaskOutcome.PREEMPTED,
    channel.Classification.CANCELLED: TaskOutcome.CANCELLED,
    channel.Classification.UNSPECIFIED: TaskOutcome.FAILED,
}
_TASK_STATUS = {
    TaskOutcome.SUCCEEDED: JobStatus.SUCCEEDED,
    TaskOutcome.FAILED: JobStatus.FAILED,
    TaskOutcome.BAD_HOST: JobStatus.FAILED,
    TaskOutcome.PREEMPTED: JobStatus.FAILED,
    TaskOutcome.LOST: JobStatus.FAILED,
    TaskOutcome.CANCELLED: JobStatus.STOPPED,
}


class JobStopped(Exception):
    """terminate() was called; unwinds provisioning."""


@dataclass(frozen=True)
class TaskSlot:
    """Where task ``index`` of the job runs in the current attempt."""

    index: int
    slice_id: int
    worker_id: int
    label: str  # the log prefix: slice-S/worker-W, or replica-i for CPU jobs


_END = object()


def in_parallel(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]``, each on its own thread.

    Plain threads, not an executor: ``concurrent.futures`` refuses new work once the interpreter
    has begun to exit, which is exactly when the exit policy cancels gangs and deletes slices.
    Exceptions propagate to the caller after every call has finished.
    """
    results: list = [None] * len(items)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = fn(items[index])
        except BaseException as error:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class AttemptRun:
    """One running attempt: pushes ``(task_index, event)`` into ``events``; an exception
    object as event means the task's channel broke; ``_END`` means no more events."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def cancel_all(self, reason: str) -> None:
        raise NotImplementedError

    def lost_slices(self) -> set[int]:
        """Slices observed lost (preempted, deleted) since the attempt started."""
        return set()

    def unresponsive_tasks(self) -> set[int]:
        """Tasks whose host has shown no sign of life for the liveness deadline."""
        return set()


class Liveness:
    """When each agent last answered (an event, a lease renewal), by address."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def heard(self, address: str) -> None:
        with self._lock:
            self._last[address] = time.monotonic()

    def silent(self, addresses: Sequence[str]) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {a for a in addresses if now - self._last.get(a, now) > self.deadline}


def end_from_exit(slot: TaskSlot, event: channel.AttemptExit) -> TaskEnd:
    return TaskEnd(
        task_index=slot.index,
        slice_id=slot.slice_id,
        worker_id=slot.worker_id,
        outcome=_OUTCOMES[event.classification],
        exit_code=event.code,
        signal=event.signal,
        stderr_tail=event.stderr_tail or event.reason,
        label=slot.label,
    )


def lost_end(slot: TaskSlot, why: str, outcome: TaskOutcome = TaskOutcome.LOST) -> TaskEnd:
    """The end of a task whose host can no longer report one."""
    return TaskEnd(slot.index, slot.slice_id, slot.worker_id, outcome, stderr_tail=why, label=slot.label)


def watch_attempt(
    record: JobRecord,
    run: AttemptRun,
    slots: Sequence[TaskSlot],
    *,
    stop: threading.Event,
    gang: bool,
    poll_interval: float,
) -> AttemptVerdict:
    """Consume the attempt's events until every task has ended, then judge it.

    ``gang``: the first task that does not succeed stops every other task (a half-running TPU
    gang deadlocks); CPU replicas run to their own ends instead.
    """
    ends: dict[int, TaskEnd] = {}
    order: list[TaskEnd] = []
    started: set[int] = set()
    lost_slices: set[int] = set()  # observed lost (node preempted, gone)
    noticed: set[int] = set()  # a host announced its preemption
    cancelling_since: float | None = None
    cancelled_by_user = False
    next_observation = time.monotonic() + poll_interval

    def cancel(reason: str) -> None:
        nonlocal cancelling_since
        if cancelling_since is None:
            cancelling_since = time.monotonic()
            record.append_lines([f"{PROGRESS_PREFIX}stopping every task: {reason}"])
            threading.Thread(target=run.cancel_all, args=(reason,), daemon=True, name="cancel-gang").start()

    def finish(slot: TaskSlot, end: TaskEnd) -> None:
        if slot.index in ends:
            return
        ends[slot.index] = end
        order.append(end)
        record.set_task(slot.index, _TASK_STATUS[end.outcome], None if end.outcome is TaskOutcome.SUCCEEDED else end.describe())
        if gang and end.outcome is not TaskOutcome.SUCCEEDED:
            cancel(f"{slot.label} ended: {end.outcome.value}")

    while len(ends) < len(slots):
        if stop.is_set() and not cancelled_by_user:
            cancelled_by_user = True
            cancel("terminated by the user")
        now = time.monotonic()
        if now >= next_observation:
            next_observation = now + poll_interval
            newly_lost = run.lost_slices() - lost_slices
            if newly_lost:
                lost_slices |= newly_lost
                cancel("lost " + ", ".join(f"slice-{s}" for s in sorted(newly_lost)))
                # Hosts of a lost slice report nothing more: end their tasks now rather than
                # waiting out their channels.
                for lost_slot in slots:
                    if lost_slot.slice_id in newly_lost:
                        finish(lost_slot, lost_end(lost_slot, "its slice was lost", TaskOutcome.PREEMPTED))
            for index in sorted(run.unresponsive_tasks() - set(ends)):
                silent = slots[index]
                finish(silent, lost_end(silent, "its host stopped answering (liveness deadline)"))
        if cancelling_since is not None and now - cancelling_since > CANCEL_GRACE_SECONDS + CANCEL_REPORT_SECONDS:
            for slot in slots:
                finish(slot, lost_end(slot, "no exit reported after the gang was stopped"))
            break
        try:
            index, event = run.events.get(timeout=min(poll_interval, 0.5))
        except queue.Empty:
            continue
        slot = slots[index]
        if isinstance(event, channel.LogBatch):
            record.append_lines([f"[{slot.label}] {line}" for line in event.lines])
        elif isinstance(event, channel.AttemptStarted):
            started.add(index)
            record.set_task(index, JobStatus.RUNNING)
            if len(started) == len(slots):
                record.set_phase("running")
                record.set_status(JobStatus.RUNNING)
                record.append_lines([f"{PROGRESS_PREFIX}running on all {len(slots)} task(s)"])
        elif isinstance(event, channel.AttemptExit):
            finish(slot, end_from_exit(slot, event))
        elif isinstance(event, channel.PreemptionNotice):
            noticed.add(slot.slice_id)
            cancel(f"{slot.label} is being preempted")
        elif isinstance(event, channel.EventsLost):
            missed = event.first_available_seq - event.requested_from_seq
            record.append_lines([f"[{slot.label}] [fray-tpu] {missed} output event(s) dropped by the host's buffer"])
        elif isinstance(event, Exception):
            finish(slot, lost_end(slot, str(event)))
        elif event is _END and index not in ends:
            finish(slot, lost_end(slot, "the event stream ended without an exit"))
    lost_slices |= run.lost_slices() | noticed
    return judge_attempt(order, len(slots), lost_slices=lost_slices, cancelled=cancelled_by_user)


class JobSupervisor(threading.Thread):
    """The retry loop common to every job; subclasses run attempts."""

    def __init__(self, record: JobRecord, plan: JobPlan, poll_interval: float):
        super().__init__(name=f"supervisor-{record.job_id}", daemon=True)
        self.record = record
        self.plan = plan
        self.poll_interval = poll_interval
        self.stop_requested = threading.Event()
        self.budget = RetryBudget(max_failures=plan.max_failures, max_preemptions=plan.max_preemptions)
        self.slots = [
            TaskSlot(index=i, slice_id=i // plan.hosts_per_slice, worker_id=i % plan.hosts_per_slice, label=name)
            for i, name in enumerate(plan.task_names)
        ]

    def terminate(self) -> None:
        self.stop_requested.set()

    def progress(self, line: str) -> None:
        log.info("job %s: %s", self.record.job_id, line)
        self.record.append_lines([PROGRESS_PREFIX + line])

    def run(self) -> None:
        status, error = JobStatus.FAILED, "internal error"
        try:
            status, error = self.run_attempts()
        except JobStopped:
            status, error = JobStatus.STOPPED, None
        except FrayTpuError as e:
            status, error = JobStatus.FAILED, str(e)
        except Exception as e:  # noqa: BLE001 - the job must end with a status, never hang
            log.exception("supervisor of job %s crashed", self.record.job_id)
            status, error = JobStatus.FAILED, f"fray-tpu internal error: {type(e).__name__}: {e}"
        finally:
            if status is JobStatus.STOPPED:
                for i, task in enumerate(self.record.info().tasks):
                    if not JobStatus.finished(task.status):
                        self.record.set_task(i, JobStatus.STOPPED)
            # The status is final once the user's processes are gone; slices are deleted after
            # it (wait_released() / shutdown() wait for that), so terminate() is prompt.
            self.record.set_phase(str(status))
            self.record.set_status(status, error)
            self.progress(f"job {status}" + (f": {error}" if error else ""))
            try:
                self.release_everything()
            except Exception:  # noqa: BLE001 - logged; `fray-tpu gc` finds leftovers by label
                log.exception("releasing the resources of job %s failed", self.record.job_id)

    def run_attempts(self) -> tuple[JobStatus, str | None]:
        while True:
            if self.stop_requested.is_set():
                raise JobStopped
            self.record.counters.attempts += 1
            attempt = self.record.counters.attempts
            verdict = self.run_one_attempt(attempt)
            decision = decide(self.budget, verdict)
            self.record.counters.failures = self.budget.failures
            self.record.counters.preemptions = self.budget.preemptions
            self.record.counters.bad_hosts = self.budget.bad_hosts
            if decision.action is Action.SUCCEED:
                return JobStatus.SUCCEEDED, None
            if decision.action is Action.STOP:
                raise JobStopped
            if decision.action is Action.FAIL:
                return JobStatus.FAILED, decision.reason
            self.progress(f"attempt {attempt} ended ({verdict.outcome.value}); retrying: {decision.reason}")
            self.prepare_retry(decision.replace_slices)

    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        raise NotImplementedError

    def prepare_retry(self, replace_slices: frozenset[int]) -> None:
        """Between attempts; TPU jobs replace lost slices here."""

    def release_everything(self) -> None:
        """Runs on every exit path."""


# -- CPU jobs: local subprocesses -----------------------------------------------------------

class LocalReplicasRun(AttemptRun):
    """The replicas of a CPU job as process groups on this machine, through the same attempt
    machinery the TPU agent uses (line batching, process-group cancel)."""

    def __init__(self, attempt_id: str, plan: JobPlan, workdir: Path):
        super().__init__()
        from fray_tpu.worker.attempt import Attempt, LaunchPlan

        self._attempts = []
        payload_file = None
        if plan.payload.kind == "callable":
            payload_file = workdir / f"{attempt_id}.payload"
            payload_file.write_bytes(plan.payload.pickled)
        cwd = plan.workspace or Path.cwd()
        for replica in range(plan.replicas):
            env = {**os.environ, **plan.env, "FRAY_REPLICA_ID": str(replica), "FRAY_REPLICA_COUNT": str(plan.replicas),
                   "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
            if payload_file is not None:
                argv = [sys.executable, "-m", "fray_tpu.worker.runner", str(payload_file)]
                # The runner must find fray_tpu even when the workspace is the working directory.
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), _package_root(), env.get("PYTHONPATH")]))
            else:
                argv = [local_command(plan.payload.command), *plan.payload.args]
            self._attempts.append(Attempt(f"{attempt_id}-r{replica}", LaunchPlan(argv=argv, env=env, cwd=cwd),
                                          record_token=lambda token: None, is_preempted=lambda: False))
        for index, attempt in enumerate(self._attempts):
            attempt.start()
            threading.Thread(target=self._follow, args=(index, attempt), daemon=True, name=f"replica-{index}").start()

    def _follow(self, index: int, attempt) -> None:
        try:
            for message in attempt.events.follow(1, lambda: True):
                event = channel.to_event(message)
                if event is not None:
                    self.events.put((index, event))
        except Exception as error:  # noqa: BLE001 - reported as the task's end
            self.events.put((index, error))
        self.events.put((index, _END))

    def cancel_all(self, reason: str) -> None:
        in_parallel(lambda attempt: attempt.cancel(CANCEL_GRACE_SECONDS, reason), self._attempts)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def local_command(command: str) -> str:
    """``python`` in a Fray binary entrypoint means this interpreter (as Marin's local cluster
    runs it), not whatever ``python`` is first on PATH."""
    return sys.executable if command in ("python", "python3") else command


class LocalJobSupervisor(JobSupervisor):
    def __init__(self, record: JobRecord, plan: JobPlan, workdir: Path, poll_interval: float = 0.5):
        super().__init__(record, plan, poll_interval)
        self.slots = [TaskSlot(index=i, slice_id=i, worker_id=0, label=f"replica-{i}") for i in range(plan.replicas)]
        self.workdir = workdir

    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        run = LocalReplicasRun(f"{self.record.job_id}-a{attempt}", self.plan, self.workdir)
        self.record.set_status(JobStatus.RUNNING)
        return watch_attempt(self.record, run, self.slots, stop=self.stop_requested, gang=False,
                             poll_interval=self.poll_interval)


# -- TPU jobs: gangs on provisioned slices ----------------------------------------------------

@dataclass
class ControllerContext:
    """What every TPU job of one controller shares."""

    config: TpuClusterConfig
    provisioner: SliceProvisioner
    controller_id: str
    emulator_endpoint: str | None


SECRET_NAME = "channel-secret"


@dataclass
class ResumeState:
    """Where a job stood when its controller went away, from the journal."""

    attempt: int
    attempt_id: str | None
    slices: dict[int, tuple[str, int, str, list[str]]]  # slice id -> (name, attempt, zone, endpoints)
    counters: dict[str, int]
    secret: str
    extra: dict

    @classmethod
    def from_journal(cls, row, journal) -> ResumeState:
        slices = {}
        for resource in journal.resources(job_id=row.job_id, live_only=True):
            if resource.state == "ready" and resource.endpoints:
                slices[resource.slice_id] = (resource.name, resource.attempt, resource.zone, list(resource.endpoints))
        return cls(
            attempt=row.attempt,
            attempt_id=row.attempt_id,
            slices=slices,
            counters=dict(row.counters),
            extra=dict(row.extra),
            secret=journal.load_secret(row.job_id, SECRET_NAME).decode(),
        )


class TpuGangRun(AttemptRun):
    """One attempt on every host of every slice, over the task channel."""

    def __init__(self, attempt_id: str, clients: Sequence[channel.AgentClient], slices: Sequence[ReadySlice],
                 provisioner: SliceProvisioner, liveness: Liveness):
        super().__init__()
        self.attempt_id = attempt_id
        self._clients = clients
        self._slices = slices
        self._provisioner = provisioner
        self._liveness = liveness
        self._streams: list[channel.EventStream] = []
        for client in clients:
            liveness.heard(client.address)

    def start(self) -> None:
        self._follow_all(lambda c: c.start(self.attempt_id))

    def resume(self, from_seqs: Sequence[int]) -> None:
        """Follow an attempt started by an earlier controller, from each host's ``from_seq``."""
        seqs = dict(zip(self._clients, from_seqs))
        self._follow_all(lambda c: c.watch(self.attempt_id, seqs[c]))

    def _follow_all(self, open_stream: Callable[[channel.AgentClient], channel.EventStream]) -> None:
        self._streams = in_parallel(open_stream, self._clients)
        for index, stream in enumerate(self._streams):
            threading.Thread(target=self._follow, args=(index, stream), daemon=True,
                             name=f"events-{self.attempt_id}-{index}").start()

    def _follow(self, index: int, stream: channel.EventStream) -> None:
        address = self._clients[index].address
        try:
            for event in stream:
                self._liveness.heard(address)
                self.events.put((index, event))
        except Exception as error:  # noqa: BLE001 - a broken channel is this task's end
            self.events.put((index, error))
        self.events.put((index, _END))

    def cancel_all(self, reason: str) -> None:
        def cancel(client: channel.AgentClient) -> None:
            try:
                client.cancel(self.attempt_id, CANCEL_GRACE_SECONDS)
            except Exception as error:  # noqa: BLE001 - a host already gone (or its channel closed) is cancelled
                log.info("cancel on %s: %s", client.address, error)

        in_parallel(cancel, self._clients)

    def lost_slices(self) -> set[int]:
        lost = set()
        for slice_id, ready in enumerate(self._slices):
            observed = self._provisioner.observe(ready.zone).get(ready.spec.name)
            if observed is None or observed.lost:
                lost.add(slice_id)
        return lost

    def unresponsive_tasks(self) -> set[int]:
        silent = self._liveness.silent([c.address for c in self._clients])
        return {i for i, client in enumerate(self._clients) if client.address in silent}

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


class TpuJobSupervisor(JobSupervisor):
    """Provision → boot → gang-run → watch → retry or finish, deleting every slice at the end."""

    def __init__(self, record: JobRecord, plan: JobPlan, context: ControllerContext,
                 resume: ResumeState | None = None):
        super().__init__(record, plan, context.config.poll_interval)
        self.context = context
        self.config = context.config
        self.journal = record.journal
        self.resume = resume
        self.slices: list[ReadySlice | None] = [None] * plan.replicas
        self.accounting = {"generation": plan.shape.generation, "capacity": plan.capacity, "attempts": []}
        self._startup_script: str | None = None  # rendered (bundle built and staged) before provisioning
        if resume is None:
            self._secret = tls.make_secret()
            if self.journal is not None:
                self.journal.store_secret(record.job_id, SECRET_NAME, self._secret.encode())
        else:
            self._secret = resume.secret
            for slice_id, (name, attempt, zone, endpoints) in resume.slices.items():
                spec = self.slice_spec(slice_id, attempt)
                if spec.name != name:
                    raise FrayTpuError(f"journal slice {name} does not match job {record.job_id} (expected {spec.name}): "
                                       f"was the journal written by another fray-tpu version?")
                self.slices[slice_id] = ReadySlice(spec, zone, node_resource_name(context.provisioner.project, zone, name),
                                                   tuple(endpoints))
            for key, value in resume.counters.items():
                if hasattr(record.counters, key):
                    setattr(record.counters, key, value)
            self.budget.failures = record.counters.failures
            self.budget.preemptions = record.counters.preemptions
            self.budget.bad_hosts = record.counters.bad_hosts
            self.accounting = {**self.accounting, **resume.extra}
        self._clients: dict[int, list[channel.AgentClient]] = {}
        self._deletions: list[threading.Thread] = []
        self._bundle = None
        self.liveness = Liveness(self.config.liveness_deadline)
        self._lease_stop = threading.Event()
        self._lease_thread = threading.Thread(target=self._renew_leases, daemon=True, name=f"lease-{record.job_id}")
        self._lease_thread.start()

    # -- provisioning ------------------------------------------------------------------------
    def slice_spec(self, slice_id: int, attempt: int) -> SliceSpec:
        job_id = self.record.job_id
        name = naming.slice_name(self.plan.name, job_id, attempt, slice_id)
        metadata = {
            md.ATTR_STARTUP_SCRIPT: self._startup_script or "",
            md.ATTR_SECRET_SHA256: tls.secret_sha256(self._secret),
            md.ATTR_NODE: name,
            md.ATTR_AGENT_PORT: str(self.config.agent_port),
            md.ATTR_LEASE_SECONDS: str(self.config.lease_period),
            md.ATTR_SELF_DELETE: "true",
            md.ATTR_JOB: job_id,
            md.ATTR_CONTROLLER: self.context.controller_id,
        }
        if self.context.emulator_endpoint:
            metadata[md.ATTR_API_ENDPOINT] = self.context.emulator_endpoint
        return SliceSpec(
            name=name,
            tpu_type=self.plan.tpu_type,
            runtime_version=self.plan.runtime_version,
            capacity=self.plan.capacity,
            labels=naming.resource_labels(job_id, attempt, self.context.controller_id, slice_id, extra=self.plan.labels),
            metadata=metadata,
            network=self.config.network,
            subnetwork=self.config.subnetwork,
            external_ips=self.config.external_ips,
            service_account=self.config.service_account,
            queued=self.plan.queued,
        )

    def ensure_slices(self, attempt: int) -> None:
        """Acquire every missing slice in parallel; without capacity anywhere, back off and try
        again until the capacity deadline (no budget is consumed by waiting)."""
        if self._startup_script is None:
            # Before anything is provisioned: a bundle that cannot be built fails the job here.
            bootstrapper = bootstrapper_for(self.config, self.context.emulator_endpoint)
            self._startup_script = bootstrapper.startup_script(self.plan.runtime_version)
        capacity_deadline = time.monotonic() + self.config.capacity_deadline
        rounds = 0
        while True:
            missing = [i for i, s in enumerate(self.slices) if s is None]
            if not missing:
                return
            self.record.set_phase("provisioning")
            errors: dict[int, Exception] = {}

            def acquire(slice_id: int) -> None:
                spec = self.slice_spec(slice_id, attempt)
                zones_tried: list[str] = []
                self.progress(f"slice-{slice_id}: requested {spec.tpu_type} ({spec.capacity}) as {spec.name}, "
                              f"zones {', '.join(self.plan.zones)}")

                def before_create(zone: str) -> None:
                    zones_tried.append(zone)
                    self._journal_resource(spec, slice_id, attempt, zone)

                try:
                    ready = self.context.provisioner.acquire(
                        spec,
                        self.plan.zones,
                        deadline=time.monotonic() + self.config.create_deadline,
                        cancel=self.stop_requested,
                        on_progress=lambda line: self.progress(f"slice-{slice_id}: {line}"),
                        before_create=before_create,
                    )
                except Exception as error:  # noqa: BLE001 - classified below
                    errors[slice_id] = error
                    for zone in zones_tried:  # acquire deleted whatever it created
                        self._journal_resource_state(spec.name, zone, "failed")
                    return
                for zone in zones_tried[:-1]:
                    self._journal_resource_state(spec.name, zone, "failed")
                self._journal_resource_state(spec.name, ready.zone, "ready", endpoints=list(ready.endpoints),
                                             ready_at=time.time())
                self.slices[slice_id] = ready

            threads = [threading.Thread(target=acquire, args=(i,), daemon=True) for i in missing]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if self.stop_requested.is_set() or any(isinstance(e, CancelledError) for e in errors.values()):
                raise JobStopped
            if not errors:
                return
            rounds += 1
            self.record.counters.capacity_waits += 1
            summary = "; ".join(f"slice-{i}: {e}" for i, e in sorted(errors.items()))
            if time.monotonic() >= capacity_deadline:
                raise CapacityUnavailableError(
                    f"gave up after {self.config.capacity_deadline:.0f}s (capacity_deadline) without capacity "
                    f"for {self.plan.tpu_type} in {', '.join(self.plan.zones)}: {summary}")
            delay = min(capacity_backoff(rounds), max(0.0, capacity_deadline - time.monotonic()))
            kind = "no capacity" if all(isinstance(e, CapacityUnavailableError) for e in errors.values()) else "provisioning failed"
            self.progress(f"{kind}; trying again in {delay:.0f}s: {summary}")
            if self.stop_requested.wait(delay):
                raise JobStopped

    def connect_agents(self) -> dict[int, str]:
        """Wait for every agent of every slice; returns slices whose agents never answered."""
        self.record.set_phase("booting")
        dead: dict[int, str] = {}
        deadline = time.monotonic() + self.config.boot_deadline
        booting = {s: len(ready.endpoints) for s, ready in enumerate(self.slices) if s not in self._clients}
        if booting:
            boot = watch_boot(self._read_boot_reports, booting, deadline=deadline, poll_interval=self.poll_interval,
                              stop=self.stop_requested, progress=self.progress)
            if self.stop_requested.is_set():
                raise JobStopped
            if boot.dead:
                return boot.dead
            for slice_id in booting:
                self._clients[slice_id] = [
                    channel.AgentClient(f"{ip}:{self.config.agent_port}", secret=self._secret,
                                        pinned_cert_pem=boot.certs[(slice_id, worker)])
                    for worker, ip in enumerate(self.slices[slice_id].endpoints)
                ]
        up = dict.fromkeys(self._clients, 0)
        lock = threading.Lock()

        def wait_up(slice_id: int, client: channel.AgentClient) -> None:
            try:
                client.wait_until_up(deadline)
            except (channel.ChannelError, FrayTpuError) as error:
                dead[slice_id] = str(error)
                return
            with lock:
                up[slice_id] += 1
                count = up[slice_id]
            self.progress(f"slice-{slice_id}: booting, {count}/{len(self._clients[slice_id])} agents up")

        in_parallel(lambda pair: wait_up(*pair), [(s, c) for s, clients in self._clients.items() for c in clients])
        return dead

    def _read_boot_reports(self, slice_id: int) -> list[dict[str, str]]:
        ready = self.slices[slice_id]
        return self.context.provisioner.guest_attributes(ready.zone, ready.spec.name, GUEST_NAMESPACE)

    def _journal_resource(self, spec: SliceSpec, slice_id: int, attempt: int, zone: str) -> None:
        if self.journal is None:
            return
        from fray_tpu.journal import ResourceRow

        if any(r.name == spec.name and r.zone == zone for r in self.journal.resources(job_id=self.record.job_id)):
            # A later provisioning round of the same attempt reuses the slice's name.
            self.journal.update_resource(spec.name, zone, state="creating", endpoints=[], created=time.time(),
                                         ready_at=None, deleted_at=None)
            return
        self.journal.add_resource(ResourceRow(
            job_id=self.record.job_id, attempt=attempt, slice_id=slice_id, name=spec.name, zone=zone,
            kind="queued" if spec.queued else "node", state="creating", endpoints=[], created=time.time(),
            ready_at=None, deleted_at=None, tpu_type=spec.tpu_type, chips=self.plan.shape.chip_count,
        ))

    def _journal_resource_state(self, name: str, zone: str, state: str, **fields) -> None:
        if self.journal is not None:
            self.journal.update_resource(name, zone, state=state, **fields)

    # -- one attempt -------------------------------------------------------------------------
    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        if self.resume is not None:
            resume, self.resume = self.resume, None
            if resume.attempt_id and resume.attempt == attempt - 1 and all(self.slices):
                self.record.counters.attempts = resume.attempt
                return self.reattach(resume.attempt_id)
        self.ensure_slices(attempt)
        dead = self.connect_agents()
        if self.stop_requested.is_set():
            raise JobStopped
        if dead:
            return self._verdict_for_hosts(dead, TaskOutcome.BAD_HOST, "agent never answered")
        clients = [c for s in range(len(self.slices)) for c in self._clients[s]]
        attempt_id = f"{self.record.job_id}-a{attempt}"
        environments = gang_environments([s.endpoints for s in self.slices], self._user_env())
        unreachable = self._upload_workspace(clients)
        if unreachable:
            return self._verdict_for_hosts(unreachable, TaskOutcome.LOST, "workspace upload failed")
        specs = [self._attempt_spec(attempt_id, slot, environments[slot.index]) for slot in self.slots]
        self.record.set_phase("preparing")
        failed = self._prepare(clients, specs)
        if failed:
            return failed
        run = TpuGangRun(attempt_id, clients, self.slices, self.context.provisioner, self.liveness)
        self.record.set_attempt(attempt, attempt_id)
        self.progress(f"attempt {attempt}: starting on {len(clients)} hosts of {len(self.slices)} slice(s)")
        entry = {"attempt": attempt, "started": time.time(), "slices": [s.spec.name for s in self.slices]}
        self.accounting["attempts"].append(entry)
        self._save_accounting()
        verdict = None
        try:
            run.start()
            verdict = watch_attempt(self.record, run, self.slots, stop=self.stop_requested, gang=True,
                                    poll_interval=self.poll_interval)
            return verdict
        finally:
            run.close()
            self._end_accounting(entry, verdict)

    def reattach(self, attempt_id: str) -> AttemptVerdict:
        """Follow the attempt an earlier controller started, from where each host is now."""
        self.progress(f"reattaching to attempt {attempt_id}")
        dead = self.connect_agents()
        if dead:
            return self._verdict_for_hosts(dead, TaskOutcome.LOST, "agent unreachable after the controller restarted")
        clients = [c for s in range(len(self.slices)) for c in self._clients[s]]
        from_seqs = []
        for client in clients:
            current = client.describe().current_attempt
            if current is None or current.attempt_id != attempt_id:
                return self._verdict_for_hosts({0: f"{client.address} no longer runs {attempt_id}"}, TaskOutcome.LOST,
                                               "attempt gone after the controller restarted")
            from_seqs.append(max(1, current.last_seq))
        run = TpuGangRun(attempt_id, clients, self.slices, self.context.provisioner, self.liveness)
        entry = next((a for a in self.accounting["attempts"] if a.get("ended") is None), None)
        verdict = None
        try:
            run.resume(from_seqs)
            self.record.set_phase("running")
            verdict = watch_attempt(self.record, run, self.slots, stop=self.stop_requested, gang=True,
                                    poll_interval=self.poll_interval)
            return verdict
        finally:
            run.close()
            if entry is not None:
                self._end_accounting(entry, verdict)

    def _save_accounting(self) -> None:
        if self.journal is not None:
            self.journal.update_job(self.record.job_id, extra=self.accounting)

    def _end_accounting(self, entry: dict, verdict: AttemptVerdict | None) -> None:
        entry["ended"] = time.time()
        entry["outcome"] = verdict.outcome.value if verdict else "error"
        if verdict is not None:
            entry["lost"] = [self.slices[s].spec.name for s in verdict.lost_slices if self.slices[s] is not None]
        self._save_accounting()

    def _user_env(self) -> dict[str, str]:
        env = dict(self.plan.env)
        env[CONTROLLER_PYTHON_ENV] = "%d.%d" % sys.version_info[:2]
        if self.context.emulator_endpoint:
            # Emulated hosts have no TPU: JAX runs on the CPU and finds its peers through the plugin.
            env.setdefault("JAX_PLATFORMS", "cpu")
            env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
            env["FRAY_TPU_RUNNER_PRELOAD"] = EMULATOR_JAX_PLUGIN
        return env

    def _attempt_spec(self, attempt_id: str, slot: TaskSlot, env: dict[str, str]) -> channel.AttemptSpec:
        payload = self.plan.payload
        common = dict(
            job_id=self.record.job_id, task_id=slot.label, task_index=slot.index, env=env,
            workspace_digest=self._bundle.digest if self._bundle else "",
            pip_packages=list(self.plan.pip_packages), extras=list(self.plan.extras),
        )
        if payload.kind == "callable":
            return channel.AttemptSpec(attempt_id, pickled_callable=payload.pickled, **common)
        return channel.AttemptSpec(attempt_id, command=payload.command, args=list(payload.args), **common)

    def _upload_workspace(self, clients: Sequence[channel.AgentClient]) -> dict[int, str]:
        """Upload the workspace bundle where it is missing; returns the slices that could not
        take it (treated like lost hosts: the slice is replaced, the user's budget untouched)."""
        if self.plan.workspace is None:
            return {}
        if self._bundle is None or not self._bundle.path.exists():
            from fray_tpu.workspace import pack_workspace

            # Packed once per job; packed again only if the cache dropped the archive meanwhile.
            self._bundle = pack_workspace(self.plan.workspace)
            self.progress(f"workspace {self.plan.workspace}: {self._bundle.file_count} files, "
                          f"{self._bundle.size / 1e6:.1f} MB, digest {self._bundle.digest[:12]}")
        failed: dict[int, str] = {}

        def upload(index: int) -> None:
            try:
                clients[index].upload_bundle(self._bundle)
            except Exception as error:  # noqa: BLE001 - any failure means this host lacks the bundle
                failed[self.slots[index].slice_id] = f"{clients[index].address}: {error}"

        in_parallel(upload, range(len(clients)))
        return failed

    def _prepare(self, clients: Sequence[channel.AgentClient], specs: Sequence[channel.AttemptSpec]) -> AttemptVerdict | None:
        problems: dict[int, tuple[TaskOutcome, str]] = {}

        def prepare(index: int) -> None:
            try:
                clients[index].prepare(specs[index])
            except channel.PrepareFailed as error:
                outcome = TaskOutcome.FAILED if error.kind == "user" else TaskOutcome.BAD_HOST
                problems[index] = (outcome, str(error))
            except channel.AgentUnreachable as error:
                problems[index] = (TaskOutcome.LOST, str(error))
            except channel.ChannelError as error:
                problems[index] = (TaskOutcome.BAD_HOST, str(error))

        in_parallel(prepare, range(len(clients)))
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
            self._release_slice(slice_id, background=True)
        for i in range(len(self.slots)):
            self.record.set_task(i, JobStatus.PENDING)

    def _release_slice(self, slice_id: int, *, background: bool) -> None:
        ready = self.slices[slice_id]
        self.slices[slice_id] = None
        for client in self._clients.pop(slice_id, []):
            client.close()
        if ready is None:
            return

        def delete() -> None:
            try:
                self._journal_resource_state(ready.spec.name, ready.zone, "deleting")
                self.context.provisioner.delete(ready.spec.name, ready.zone,
                                                deadline=time.monotonic() + self.config.delete_deadline,
                                                queued=ready.spec.queued)
                self._journal_resource_state(ready.spec.name, ready.zone, "deleted", deleted_at=time.time())
                self.progress(f"slice-{slice_id}: deleted {ready.spec.name} in {ready.zone}")
            except Exception as error:  # noqa: BLE001 - reported; gc finds it by label
                log.error("job %s: could not delete slice %s in %s: %s (`fray-tpu gc` will find it by label)",
                          self.record.job_id, ready.spec.name, ready.zone, error)

        if background:
            thread = threading.Thread(target=delete, daemon=True, name=f"delete-{ready.spec.name}")
            thread.start()
            self._deletions.append(thread)
        else:
            delete()

    def release_everything(self) -> None:
        self._lease_stop.set()
        for slice_id in range(len(self.slices)):
            self._release_slice(slice_id, background=True)
        for thread in self._deletions:
            thread.join(self.config.delete_deadline + 60)
        if self.journal is not None:
            self.journal.delete_secrets(self.record.job_id)

    def _renew_leases(self) -> None:
        """Renew every agent's lease, in parallel so one frozen host delays no other; each
        answer is also a sign of life for the liveness deadline."""
        period = self.config.lease_period
        interval = min(period, self.config.liveness_deadline) / 3

        def renew(client: channel.AgentClient) -> None:
            try:
                client.renew_lease(period, timeout=interval)
                self.liveness.heard(client.address)
            except Exception as error:  # noqa: BLE001 - this loop must outlive any one host
                log.debug("lease renewal on %s: %s", client.address, error)

        while not self._lease_stop.wait(interval):
            in_parallel(renew, [c for clients in list(self._clients.values()) for c in clients])
