"""``TpuCluster``: Fray's Cluster interface on Cloud TPU slices (and local CPU replicas).

``launch`` validates and plans the request (every user error surfaces here, before anything is
provisioned), records the job and starts its supervisor thread; everything slow happens there.
With ``emulate=true`` and no endpoint, the cluster starts a Cloud TPU emulator process of its
own on first use and stops it at shutdown; the spec handed to jobs points at it, so nested
``current_cluster()`` calls inside a job reach the same emulated cloud.

Durable state: jobs, attempts, every slice (recorded before it is created) and job output are
journaled in the state directory (``state_dir`` in the config, else ``$FRAY_TPU_STATE_DIR``, else
``$XDG_STATE_HOME/fray-tpu``), one journal per controller (``fray_tpu.state.journals``), so several
driver processes share a state directory. A new ``TpuCluster`` adopts the journals of controllers
that died: it lists their jobs and reattaches to the running TPU jobs (``poll``, ``monitor`` from
the reattach point on, ``wait``, ``terminate``). CPU jobs are local processes that die with their
controller: an adopting controller marks them failed.

Exit policy: at interpreter exit, SIGTERM/SIGINT handled by the caller, or ``shutdown()``, running
jobs are terminated and every slice they hold is deleted, unless the cluster was built with
``detach_on_exit=True``: then jobs keep running, a controller restarted on the state directory
reattaches, and without one the agents' lease lapses and every slice deletes itself.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fray_tpu import naming
from fray_tpu.config import EMULATED_PROJECT, TpuClusterConfig
from fray_tpu.errors import DeadlineExceeded, UnknownRegionError
from fray_tpu.fray_api import Cluster, JobId, JobInfo, JobStatus
from fray_tpu.supervisor.records import JobRecord, JobTable
from fray_tpu.state import ResourceState
from fray_tpu.state.journal import Journal, JournalLockedError, JobRow, default_state_dir
from fray_tpu.state.journals import controller_dir, journal_dirs
from fray_tpu.placement import multislice_warning
from fray_tpu.planning import JobPlan, plan_job
from fray_tpu.supervisor.job import JobSupervisor
from fray_tpu.supervisor.phases import JobPhase
from fray_tpu.supervisor.pool import WarmPool
from fray_tpu.supervisor.local import LocalJobSupervisor
from fray_tpu.supervisor.credentials import JobCredentials
from fray_tpu.supervisor.slices import ControllerContext
from fray_tpu.supervisor.tpu import ResumeState, TpuJobSupervisor
from fray_tpu.supervisor.watch import PROGRESS_PREFIX

log = logging.getLogger(__name__)
job_log = logging.getLogger("fray_tpu.job")

EMULATOR_START_TIMEOUT = 60.0
STOP_REQUESTS_DIR = "stop-requests"
STOP_REQUEST_POLL_SECONDS = 1.0
SHUTDOWN_TIMEOUT = 600.0
EMULATED_STORAGE_DIR = "emulated-storage"



class TpuCluster(Cluster):
    def __init__(self, config: TpuClusterConfig | None = None, *, detach_on_exit: bool = False):
        self.config = config if config is not None else TpuClusterConfig.from_env()
        self.controller_id = naming.new_controller_id()
        self.detach_on_exit = detach_on_exit
        self.state_dir = default_state_dir(configured=self.config.state_dir)
        self._journal: Journal | None = None
        self._adopted: list[Journal] = []
        self._jobs = JobTable()
        self._supervisors: dict[str, JobSupervisor] = {}
        self._lock = threading.RLock()
        self._context: ControllerContext | None = None
        self._emulator: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="fray-tpu-controller-"))
        self._zones_used: set[str] = set()
        self._zone_offers = None  # fray_tpu.zone_offers.ZoneOffers, built with the controller context
        atexit.register(self.shutdown)
        _exit_on_sigterm()

    @classmethod
    def from_spec(cls, spec: str) -> TpuCluster:
        return cls(TpuClusterConfig.from_spec(spec, environ=os.environ))

    # -- the Fray interface ------------------------------------------------------------------
    def launch(self, request) -> JobId:
        plan = plan_job(request, self.config)
        if plan.is_tpu:
            plan = self._confirmed_zones(plan)
            warning = multislice_warning(plan.replicas, plan.shape.vm_count)
            if warning:
                log.warning("job %s (%d x %s): %s", plan.name, plan.replicas, plan.tpu_type, warning)
        journal = self.journal()
        job_id = JobId(naming.new_job_id(plan.name))
        journal.add_job(self._job_row(job_id, plan))
        record = JobRecord(job_id, plan.name, plan.task_names, journal=journal)
        if plan.is_tpu:
            self._zones_used.update(plan.zones)
            supervisor: JobSupervisor = TpuJobSupervisor(record, plan, self._controller_context())
        else:
            supervisor = LocalJobSupervisor(record, plan, self._workdir, self._cluster_spec)
        self._jobs.add(record)
        with self._lock:
            self._supervisors[job_id] = supervisor
        supervisor.start()
        log.info("launched job %s (%s) on %s", job_id, plan.name,
                 f"{plan.replicas} x {plan.tpu_type}" if plan.is_tpu else f"{plan.replicas} local replica(s)")
        return job_id

    def poll(self, job_id: JobId) -> JobInfo:
        return self._record(job_id).info()

    def monitor(self, job_id: JobId) -> JobInfo:
        record = self._record(job_id)
        cursor = 0
        while True:
            finished = JobStatus.finished(record.status)
            chunk = record.read_lines(cursor, timeout=0.5)
            if chunk.missed:
                job_log.warning("[%s] %d output lines were dropped before they could be shown", job_id, chunk.missed)
            for line in chunk.lines:
                # Progress lines were logged by the supervisor already.
                if not line.startswith(PROGRESS_PREFIX):
                    job_log.info("%s", line)
            cursor = chunk.next_cursor
            if finished and not chunk.lines:
                return record.info()

    def terminate(self, job_id: JobId) -> None:
        record = self._record(job_id)
        with self._lock:
            supervisor = self._supervisors.get(job_id)
        if supervisor is None:
            return  # finished before this controller started: nothing runs
        supervisor.terminate()
        # Promptly "stopped": the user's processes are being cancelled; slices go away behind it.
        record.wait_finished(timeout=1.0)

    def list_jobs(self) -> list[JobInfo]:
        self.journal()
        return [record.info() for record in self._jobs.all()]

    # -- beyond the interface ---------------------------------------------------------------
    def job_counters(self, job_id: JobId):
        """Attempts, failures, preemptions, bad hosts and capacity waits of a job."""
        return self._record(job_id).counters

    def job_output(self, job_id: JobId, max_lines: int = 0) -> tuple[str, ...]:
        """The retained tail of the job's own output lines (all retained when ``max_lines`` is 0),
        without the controller's progress lines."""
        lines = [line for line in self._record(job_id).read_lines(0, timeout=0).lines
                 if not line.startswith(PROGRESS_PREFIX)]
        return tuple(lines[-max_lines:] if max_lines > 0 else lines)

    def wait_released(self, job_id: JobId, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Block until the job's supervisor has finished, slices deleted included."""
        self._record(job_id)
        with self._lock:
            supervisor = self._supervisors.get(job_id)
        if supervisor is None:
            return
        supervisor.join(timeout)
        if supervisor.is_alive():
            raise DeadlineExceeded(f"job {job_id} still releasing its slices after {timeout:.0f}s")

    def job_cost(self, job_id: JobId):
        """Chip-hours provisioned, running, lost to preemption and boot, and estimated USD."""
        from fray_tpu.costs import cost_of

        journal = self._record(job_id).journal
        return cost_of(journal.job(job_id).extra, journal.resources(job_id=job_id), time.time())

    def warm_slices(self) -> list[dict]:
        """The warm pool: each slice's name, zone, type, idle time and time left."""
        if self._context is None or self._context.pool is None:
            return []
        return self._context.pool.warm_slices()

    def pool_waste(self):
        """Idle chip-hours and estimated USD of this controller's warm pool (no job pays them)."""
        from fray_tpu.costs import pool_waste

        return pool_waste(self.journal().warm_periods(), time.time())

    def live_slices(self) -> list:
        """Every slice (node or queued resource) this controller created that still exists."""
        if self._context is None:
            return []
        labels = {naming.LABEL_CONTROLLER: naming.label_value(self.controller_id)}
        return self._context.provisioner.list_managed(sorted(self._zones_used), labels)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Terminate running jobs (unless detaching), wait for their cleanup, stop our emulator."""
        with self._lock:
            supervisors = list(self._supervisors.values())
        if self._context is not None and self._context.pool is not None:
            # Closed first: the jobs terminated below delete their slices instead of offering them.
            self._context.pool.close(timeout)
        # Detaching lets go of TPU jobs (their slices run on); CPU jobs die with this process.
        for supervisor in supervisors:
            if self.detach_on_exit and supervisor.outlives_controller:
                supervisor.detach()
            else:
                supervisor.terminate()
        deadline = time.monotonic() + timeout
        for supervisor in supervisors:
            supervisor.join(max(0.0, deadline - time.monotonic()))
        if self._context is not None:
            self._context.provisioner.close()
        with self._lock:
            own = self._journal
            unused = own is not None and not own.jobs()
            for journal in [own, *self._adopted]:
                if journal is not None:
                    journal.close()
            self._journal, self._adopted = None, []
            if unused:
                shutil.rmtree(own.state_dir, ignore_errors=True)  # a controller that ran nothing leaves nothing
        if self._emulator is not None and self._emulator.poll() is None:
            self._emulator.terminate()
            try:
                self._emulator.wait(30)
            except subprocess.TimeoutExpired:
                self._emulator.kill()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- the journal -------------------------------------------------------------------------
    def journal(self) -> Journal:
        """This controller's journal, opened on first use. Opening adopts the journals of dead
        controllers on the same state directory: their jobs are listed, and their running TPU
        jobs reattached."""
        with self._lock:
            if self._journal is None:
                self._journal = Journal(controller_dir(self.state_dir, self.controller_id),
                                        controller_id=self.controller_id)
                self._adopt_dead_controllers()
                threading.Thread(target=self._watch_stop_requests, daemon=True,
                                 name=f"stop-requests-{self.controller_id}").start()
            return self._journal

    def _adopt_dead_controllers(self) -> None:
        for directory in journal_dirs(self.state_dir):
            if directory == self._journal.state_dir:
                continue
            try:
                journal = Journal(directory, controller_id=self.controller_id)
            except JournalLockedError:
                continue  # its controller is alive (in this process or another)
            self._adopted.append(journal)
            self._restore(journal)

    def _watch_stop_requests(self) -> None:
        """``fray-tpu stop JOB`` from another process drops a file; the owning controller acts."""
        requests = self.state_dir / STOP_REQUESTS_DIR
        while self._journal is not None:
            for path in list(requests.glob("*")) if requests.is_dir() else []:
                with self._lock:
                    supervisor = self._supervisors.get(path.name)
                if supervisor is not None:
                    log.info("stop requested for job %s", path.name)
                    supervisor.terminate()
                    path.unlink(missing_ok=True)
            time.sleep(STOP_REQUEST_POLL_SECONDS)

    def _record(self, job_id: JobId) -> JobRecord:
        self.journal()
        return self._jobs.get(job_id)

    def _job_row(self, job_id: JobId, plan: JobPlan) -> JobRow:
        now = time.time()
        return JobRow(
            job_id=job_id, name=plan.name, status=str(JobStatus.PENDING), error_message=None, phase=str(JobPhase.PENDING),
            created=now, updated=now, finished=None, controller_id=self.controller_id,
            kind="tpu" if plan.is_tpu else "cpu", tpu_type=plan.tpu_type, slice_count=plan.replicas,
            task_names=plan.task_names, task_statuses=[(str(JobStatus.PENDING), None)] * len(plan.task_names),
            counters={}, attempt=0, attempt_id=None, plan_blob=pickle.dumps(_without_credentials(plan)),
        )

    def _restore(self, journal: Journal) -> None:
        """Take over the jobs of a dead controller's journal (which this controller now holds)."""
        self._delete_dead_pool(journal)
        for row in journal.jobs():
            record = JobRecord.from_row(row, journal)
            self._jobs.add(record)
            if row.finished is not None:
                continue
            if row.kind != "tpu":
                record.set_status(JobStatus.FAILED, "the controller running this CPU job exited; its local processes "
                                  "ended with it")
                continue
            plan: JobPlan = pickle.loads(row.plan_blob)
            self._zones_used.update(plan.zones)
            journal.update_job(row.job_id, controller_id=self.controller_id)
            credentials = JobCredentials.stored(journal, row.job_id)
            if credentials is None:
                # Its slices were made or handed over for a secret nobody holds: they answer no one.
                record.set_status(JobStatus.FAILED, "the controller running this job exited before its first attempt "
                                  "started; no attempt ran, launch it again")
                held = [r for r in journal.resources(job_id=row.job_id, live_only=True) if r.state != ResourceState.WARM]
                self._delete_journaled(journal, held, "a slice of a job whose controller died before it started")
                continue
            resume = ResumeState.from_journal(row, journal, credentials)
            supervisor = TpuJobSupervisor(record, plan, self._controller_context(), resume=resume)
            self._supervisors[row.job_id] = supervisor
            log.info("reattaching to job %s (%s), attempt %d", row.job_id, row.name, row.attempt)
            supervisor.start()

    def _delete_dead_pool(self, journal: Journal) -> None:
        """A dead controller's warm slices answer no one (its pool's secret died with it): delete
        them now rather than pay until their lease lapses."""
        warm = [r for r in journal.resources(live_only=True) if r.state == ResourceState.WARM]
        self._delete_journaled(journal, warm, "a warm slice of a dead controller")

    def _delete_journaled(self, journal: Journal, rows: list, what: str) -> None:
        """Delete these journaled resources in the background (``what`` names them in errors)."""
        if not rows:
            return
        provisioner = self._controller_context().provisioner

        def delete(row) -> None:
            try:
                journal.update_resource(row.name, row.zone, state=ResourceState.DELETING)
                provisioner.delete(row.name, row.zone, deadline=time.monotonic() + self.config.delete_deadline,
                                   queued=row.kind == "queued")
                journal.update_resource(row.name, row.zone, state=ResourceState.DELETED, deleted_at=time.time())
            except Exception as error:  # noqa: BLE001 - reported; gc finds it by label
                log.error("could not delete %s, %s: %s", row.name, what, error)

        for row in rows:
            self._zones_used.add(row.zone)
            threading.Thread(target=delete, args=(row,), daemon=True, name=f"delete-{row.name}").start()

    # -- wiring --------------------------------------------------------------------------------
    def _cluster_spec(self) -> str:
        """What a CPU job's replicas get as FRAY_CLUSTER_SPEC: the TPU jobs' spec once an
        emulator runs, so nested calls reach the same emulated cloud."""
        with self._lock:
            return self._context.cluster_spec if self._context is not None else self.config.to_spec()

    def _confirmed_zones(self, plan: JobPlan) -> JobPlan:
        """The plan with only the zones the API says offer its type (cached per zone); the
        table's zones stay when the API cannot say. None left: a clear error before anything."""
        from fray_tpu.zone_offers import ZoneOffers

        context = self._controller_context()
        if self._zone_offers is None:
            self._zone_offers = ZoneOffers(context.provisioner.client, context.provisioner.project,
                                           api_timeout=self.config.api_timeout)
        zones = tuple(self._zone_offers.confirm(plan.tpu_type, plan.zones))
        if not self.config.emulate and not self.config.zones:
            # A real project may be offered the type in zones of these regions the table lacks.
            zones += tuple(self._discovered_zones(plan.tpu_type, plan.zones))
        if not zones:
            raise UnknownRegionError(
                f"no zone can take {plan.tpu_type} for project {context.provisioner.project}: "
                + "; ".join(f"{zone}: {self._zone_offers.why_not(plan.tpu_type, zone)}" for zone in plan.zones)
                + f". `fray-tpu doctor --type {plan.tpu_type}` checks each zone.")
        return dataclasses.replace(plan, zones=zones) if zones != plan.zones else plan

    def _discovered_zones(self, tpu_type: str, zones) -> list[str]:
        from google.api_core import exceptions as api_exceptions

        try:
            return self._zone_offers.discover(tpu_type, zones)
        except api_exceptions.GoogleAPICallError as error:
            log.warning("could not list the project's locations (%s); trying the table's zones only", error)
            return []

    def _controller_context(self) -> ControllerContext:
        with self._lock:
            if self._context is None:
                from fray_tpu.provisioner import RetryPolicy, SliceProvisioner
                from fray_tpu.tpu_client import make_tpu_client

                endpoint = None
                if self.config.emulate:
                    endpoint = self.config.emulator_endpoint or self._start_emulator()
                    # Users read the endpoint of the emulator the cluster started from its config.
                    self.config.emulator_endpoint = endpoint
                provisioner = SliceProvisioner(
                    make_tpu_client(emulator_endpoint=endpoint),
                    self.config.project or EMULATED_PROJECT,
                    api_timeout=self.config.api_timeout,
                    poll_interval=self.config.poll_interval,
                    retry=RetryPolicy(max_seconds=self.config.api_retry_seconds,
                                      max_backoff=min(RetryPolicy.max_backoff, self.config.api_retry_seconds / 4)),
                )
                pool = WarmPool(self.config, provisioner) if self.config.keep_warm > 0 else None
                self._context = ControllerContext(self.config, provisioner, self.controller_id, endpoint,
                                                  self.config.to_spec(), pool=pool)
            return self._context

    def _start_emulator(self) -> str:
        # Its VMs go with it, its bucket stays (under the state directory), as a real bucket
        # outlives the VMs: the next run finds the host bundle and job environments staged.
        command = [sys.executable, "-m", "fray_tpu.emulator", "--exit-with-parent",
                   "--agent-port", str(self.config.agent_port), "--root", str(self._workdir / "emulator"),
                   "--storage-root", str(self.state_dir / EMULATED_STORAGE_DIR)]
        self._emulator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = _read_line(self._emulator.stdout, EMULATOR_START_TIMEOUT)
        if not line:
            raise DeadlineExceeded(f"the Cloud TPU emulator ({' '.join(command)}) did not announce its endpoint "
                                   f"within {EMULATOR_START_TIMEOUT:.0f}s")
        endpoint = json.loads(line)["endpoint"]
        log.info("started a Cloud TPU emulator at %s", endpoint)
        return endpoint


def _without_credentials(plan: JobPlan) -> JobPlan:
    """The plan as journaled: the controller's channel credentials (``TpuClient`` jobs) stay in
    memory only; they die with the controller that made them."""
    from fray_tpu.actors.link import CREDENTIALS_ENV

    if CREDENTIALS_ENV not in plan.env:
        return plan
    return dataclasses.replace(plan, env={k: v for k, v in plan.env.items() if k != CREDENTIALS_ENV})


def _exit_on_sigterm() -> None:
    """SIGTERM would end the process without running atexit (and the exit policy): turn it into
    a normal exit, unless the program installed its own handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def request_stop(state_dir: Path, job_id: str) -> Path:
    """Ask the controller that owns ``state_dir`` to terminate ``job_id`` (used by the CLI)."""
    requests = Path(state_dir) / STOP_REQUESTS_DIR
    requests.mkdir(parents=True, exist_ok=True)
    path = requests / job_id
    path.touch()
    return path


def _read_line(stream, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""
