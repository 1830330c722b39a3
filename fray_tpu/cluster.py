"""``TpuCluster``: Fray's Cluster interface on Cloud TPU slices (and local CPU replicas).

``launch`` validates and plans the request (every user error surfaces here, before anything is
provisioned), records the job and starts its supervisor thread; everything slow happens there.
With ``emulate=true`` and no endpoint, the cluster starts a Cloud TPU emulator process of its
own on first use and stops it at shutdown; the spec handed to jobs points at it, so nested
``current_cluster()`` calls inside a job reach the same emulated cloud.

Exit policy: at interpreter exit (or ``shutdown()``), running jobs are terminated and every
slice they hold is deleted, unless the cluster was built with ``detach_on_exit=True`` (then the
agents' lease lapses and the slices delete themselves).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fray_tpu import naming
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import DeadlineExceeded
from fray_tpu.fray_api import Cluster, JobId, JobInfo, JobStatus
from fray_tpu.jobs import JobRecord, JobTable
from fray_tpu.planning import plan_job
from fray_tpu.supervisor import PROGRESS_PREFIX, ControllerContext, JobSupervisor, LocalJobSupervisor, TpuJobSupervisor

log = logging.getLogger(__name__)
job_log = logging.getLogger("fray_tpu.job")

EMULATOR_START_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 600.0



class TpuCluster(Cluster):
    def __init__(self, config: TpuClusterConfig | None = None, *, detach_on_exit: bool = False):
        self.config = config if config is not None else TpuClusterConfig.from_env()
        self.controller_id = naming.new_controller_id()
        self.detach_on_exit = detach_on_exit
        self._jobs = JobTable()
        self._supervisors: dict[str, JobSupervisor] = {}
        self._lock = threading.Lock()
        self._context: ControllerContext | None = None
        self._emulator: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="fray-tpu-controller-"))
        self._zones_used: set[str] = set()
        atexit.register(self.shutdown)

    @classmethod
    def from_spec(cls, spec: str) -> TpuCluster:
        return cls(TpuClusterConfig.from_spec(spec, environ=os.environ))

    # -- the Fray interface ------------------------------------------------------------------
    def launch(self, request) -> JobId:
        plan = plan_job(request, self.config, self._job_spec_for(request))
        job_id = JobId(naming.new_job_id(plan.name))
        record = JobRecord(job_id, plan.name, plan.task_names)
        if plan.is_tpu:
            self._zones_used.update(plan.zones)
            supervisor: JobSupervisor = TpuJobSupervisor(record, plan, self._controller_context())
        else:
            supervisor = LocalJobSupervisor(record, plan, self._workdir)
        self._jobs.add(record)
        with self._lock:
            self._supervisors[job_id] = supervisor
        supervisor.start()
        log.info("launched job %s (%s) on %s", job_id, plan.name,
                 f"{plan.replicas} x {plan.tpu_type}" if plan.is_tpu else f"{plan.replicas} local replica(s)")
        return job_id

    def poll(self, job_id: JobId) -> JobInfo:
        return self._jobs.get(job_id).info()

    def monitor(self, job_id: JobId) -> JobInfo:
        record = self._jobs.get(job_id)
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
        record = self._jobs.get(job_id)
        with self._lock:
            supervisor = self._supervisors[job_id]
        supervisor.terminate()
        # Promptly "stopped": the user's processes are being cancelled; slices go away behind it.
        record.wait_finished(timeout=1.0)

    def list_jobs(self) -> list[JobInfo]:
        return [record.info() for record in self._jobs.all()]

    # -- beyond the interface ---------------------------------------------------------------
    def job_counters(self, job_id: JobId):
        """Attempts, failures, preemptions, bad hosts and capacity waits of a job."""
        return self._jobs.get(job_id).counters

    def wait_released(self, job_id: JobId, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Block until the job's supervisor has finished, slices deleted included."""
        with self._lock:
            supervisor = self._supervisors[job_id]
        supervisor.join(timeout)
        if supervisor.is_alive():
            raise DeadlineExceeded(f"job {job_id} still releasing its slices after {timeout:.0f}s")

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
        if not self.detach_on_exit:
            for supervisor in supervisors:
                supervisor.terminate()
            deadline = time.monotonic() + timeout
            for supervisor in supervisors:
                supervisor.join(max(0.0, deadline - time.monotonic()))
        if self._context is not None:
            self._context.provisioner.close()
        if self._emulator is not None and self._emulator.poll() is None:
            self._emulator.terminate()
            try:
                self._emulator.wait(30)
            except subprocess.TimeoutExpired:
                self._emulator.kill()

    # -- wiring --------------------------------------------------------------------------------
    def _job_spec_for(self, request) -> str:
        """The spec jobs receive in FRAY_CLUSTER_SPEC (the emulator endpoint included)."""
        from fray_tpu.fray_api import tpu_type_of

        if tpu_type_of(request.resources.device) is not None:
            self._controller_context()
        return self.config.to_spec()

    def _controller_context(self) -> ControllerContext:
        with self._lock:
            if self._context is None:
                from fray_tpu.provisioner import SliceProvisioner, make_tpu_client

                endpoint = None
                if self.config.emulate:
                    endpoint = self.config.emulator_endpoint or self._start_emulator()
                    self.config.emulator_endpoint = endpoint
                provisioner = SliceProvisioner(
                    make_tpu_client(emulator_endpoint=endpoint),
                    self.config.project or "fray-tpu-emulated",
                    api_timeout=self.config.api_timeout,
                    poll_interval=self.config.poll_interval,
                )
                self._context = ControllerContext(self.config, provisioner, self.controller_id, endpoint)
            return self._context

    def _start_emulator(self) -> str:
        command = [sys.executable, "-m", "fray_tpu.emulator", "--exit-with-parent",
                   "--agent-port", str(self.config.agent_port), "--root", str(self._workdir / "emulator")]
        self._emulator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = _read_line(self._emulator.stdout, EMULATOR_START_TIMEOUT)
        if not line:
            raise DeadlineExceeded(f"the Cloud TPU emulator ({' '.join(command)}) did not announce its endpoint "
                                   f"within {EMULATOR_START_TIMEOUT:.0f}s")
        endpoint = json.loads(line)["endpoint"]
        log.info("started a Cloud TPU emulator at %s", endpoint)
        return endpoint


def _read_line(stream, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""
