"""CPU jobs: the replicas run as local process groups, through the same attempt machinery the
TPU agent uses (line batching, process-group cancel), watched like a gang that does not stop
at its first failure."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from fray_tpu import channel
from fray_tpu.contract import RUNNER_MODULE
from fray_tpu.decisions import AttemptVerdict
from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.records import JobRecord
from fray_tpu.multislice import replica_environments
from fray_tpu.planning import JobPlan
from fray_tpu.supervisor.attempt import AttemptRun, in_parallel
from fray_tpu.supervisor.job import JobSupervisor
from fray_tpu.supervisor.watch import CANCEL_GRACE_SECONDS, StreamEnded


class LocalReplicasRun(AttemptRun):
    """The replicas of a CPU job as process groups on this machine, one reader each."""

    def __init__(self, attempt_id: str, plan: JobPlan, workdir: Path, cluster_spec: str):
        super().__init__()
        from fray_tpu.worker.attempt import Attempt, LaunchPlan

        self._attempts = []
        payload_file = None
        if plan.payload.kind == "callable":
            payload_file = workdir / f"{attempt_id}.payload"
            payload_file.write_bytes(plan.payload.pickled)
        cwd = plan.workspace or Path.cwd()
        environments = replica_environments(plan.replicas, plan.env, cluster_spec=cluster_spec)
        for replica, task_env in enumerate(environments):
            env = {**os.environ, **task_env}
            if payload_file is not None:
                argv = [sys.executable, "-m", RUNNER_MODULE, str(payload_file)]
                # The runner must find fray_tpu even when the workspace is the working directory.
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), _package_root(), env.get("PYTHONPATH")]))
            else:
                argv = [local_command(plan.payload.command), *plan.payload.args]
            self._attempts.append(Attempt(f"{attempt_id}-r{replica}", LaunchPlan(argv=argv, env=env, cwd=cwd),
                                          is_preempted=lambda: False))

    def start(self) -> None:
        for index, attempt in enumerate(self._attempts):
            attempt.start()
            threading.Thread(target=self._follow, args=(index, attempt), daemon=True, name=f"replica-{index}").start()

    def _follow(self, index: int, attempt) -> None:
        try:
            for message in attempt.events.follow(1, lambda: True):
                event = channel.to_event(message)
                if event is not None:
                    self.events.put(index, event)
        except Exception as error:  # noqa: BLE001 - reported as the task's end
            self.events.put(index, error)
        self.events.put(index, StreamEnded())

    def cancel_all(self, reason: str) -> None:
        in_parallel(lambda attempt: attempt.cancel(CANCEL_GRACE_SECONDS, reason), self._attempts)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


def local_command(command: str) -> str:
    """``python`` in a Fray binary entrypoint means this interpreter (as Marin's local cluster
    runs it), not whatever ``python`` is first on PATH."""
    return sys.executable if command in ("python", "python3") else command


class LocalJobSupervisor(JobSupervisor):
    stop_gang_on_failure = False  # replicas run to their own ends

    def __init__(self, record: JobRecord, plan: JobPlan, workdir: Path, cluster_spec: Callable[[], str],
                 poll_interval: float = 0.5):
        super().__init__(record, plan, plan.tasks, poll_interval)
        self.workdir = workdir
        self.cluster_spec = cluster_spec

    def run_one_attempt(self, attempt: int) -> AttemptVerdict:
        run = LocalReplicasRun(f"{self.record.job_id}-a{attempt}", self.plan, self.workdir, self.cluster_spec())
        run.start()
        self.record.set_status(JobStatus.RUNNING)
        return self.follow(run)
