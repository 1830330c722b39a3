"""An RL-shaped run on the Client API, as Marin's RL orchestration does it since 2026.

One **coordinator** job (CPU, ``preemptible=False``, never retried) hosts the shared actors in
its own process with ``current_client().host_actor(...)``:

- ``Curriculum``: collects the rollouts' results and keeps per-rollout counters, so a rollout
  restarted on a new slice resumes its numbering;
- ``WeightVersions``: the latest weight version the trainer published, and the run's end flag.

It then submits, from inside itself, a **trainer** on one TPU slice and ``ROLLOUTS`` **rollout**
jobs on one slice each (``v5litepod-4``), passing the actor handles as arguments (workers never
look actors up by name). Rollouts pull the latest version and report results; the trainer
publishes a new version every ``STEP_SECONDS`` until every rollout has reported
``reports_per_rollout`` results, then ends the run. Children are jobs of the coordinator: they
end with it. The coordinator prints one JSON line with the curriculum's final state.

A preempted rollout slice is replaced by fray-tpu (``max_retries_preemption``): the rollout
restarts on the new slice, resolves the same handles again and carries on; the coordinator and
its actors never notice.

Run: ``python examples/rl_loop.py [--emulator-endpoint HOST:PORT]`` (without an endpoint,
fray-tpu starts an emulator of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import cloudpickle

# Job functions and actor classes are shipped by value: the hosts need not import this file.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

TPU_TYPE = "v5litepod-4"
ROLLOUTS = 2
REPORTS_PER_ROLLOUT = 30
STEP_SECONDS = 0.1  # stands in for a training step / a batch of rollouts
RUN_DEADLINE_SECONDS = 240.0
COORDINATOR_LINE = "rl-coordinator "


# -- actors (hosted in the coordinator's process) -----------------------------------------------

class Curriculum:
    def __init__(self):
        self.reports: list[dict] = []
        self.per_rollout: dict[int, int] = {}

    def next_index(self, rollout: int) -> int:
        """Resume-safe numbering: a restarted rollout continues where its predecessor stopped."""
        return self.per_rollout.get(rollout, 0)

    def report(self, rollout: int, index: int, version: int, host: str) -> None:
        self.reports.append({"rollout": rollout, "index": index, "version": version, "host": host})
        self.per_rollout[rollout] = max(self.per_rollout.get(rollout, 0), index + 1)

    def counts(self) -> dict[int, int]:
        return dict(self.per_rollout)

    def state(self) -> dict:
        return {"reports": list(self.reports), "per_rollout": dict(self.per_rollout)}


class WeightVersions:
    def __init__(self):
        self.version = 0
        self.finished = False

    def publish(self, version: int) -> None:
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        self.version = version

    def latest(self) -> int:
        return self.version

    def finish(self) -> None:
        self.finished = True

    def done(self) -> bool:
        return self.finished


# -- workers (TPU jobs) -----------------------------------------------------------------------

def trainer(curriculum, weights, rollouts: int, reports_per_rollout: int) -> None:
    deadline = time.monotonic() + RUN_DEADLINE_SECONDS
    version = weights.latest()
    while time.monotonic() < deadline:
        counts = curriculum.counts()
        if len(counts) == rollouts and min(counts.values()) >= reports_per_rollout:
            break
        version += 1
        weights.publish(version)
        time.sleep(STEP_SECONDS)
    else:
        raise TimeoutError(f"rollouts did not report {reports_per_rollout} results each within "
                           f"{RUN_DEADLINE_SECONDS:.0f}s: {curriculum.counts()}")
    weights.finish()
    print(f"trainer published {version} versions", flush=True)


def rollout(curriculum, weights, rollout_id: int) -> None:
    host = os.environ.get("FRAY_TPU_HOST_IP", "local")
    index = curriculum.next_index(rollout_id)
    print(f"rollout {rollout_id} on {host} starts at result {index}", flush=True)
    deadline = time.monotonic() + RUN_DEADLINE_SECONDS
    pause = threading.Event()
    while not weights.done() and time.monotonic() < deadline:
        version = weights.latest()
        if version > 0:
            curriculum.report(rollout_id, index, version, host)
            index += 1
        pause.wait(STEP_SECONDS)


# -- the coordinator (a CPU job) ---------------------------------------------------------------

def coordinator(run_id: str, workspace: str, rollouts: int, reports_per_rollout: int,
                host_packages: tuple[str, ...] = ()) -> None:
    from fray_tpu.client import current_client
    from fray_tpu.client_api import Entrypoint, JobRequest, ResourceConfig, create_environment

    client = current_client()
    curriculum = client.host_actor(Curriculum, name=f"{run_id}-curriculum")
    weights = client.host_actor(WeightVersions, name=f"{run_id}-weights")
    print(COORDINATOR_LINE + json.dumps({"curriculum": curriculum.handle.endpoint,
                                         "weights": weights.handle.endpoint}), flush=True)
    # The TPU hosts' jobs call the actors over gRPC: their environments install it (host_packages).
    environment = create_environment(workspace=workspace, pip_packages=list(host_packages))

    def tpu_job(name: str, fn, *args) -> JobRequest:
        return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=args),
                          resources=ResourceConfig.with_tpu(TPU_TYPE), environment=environment,
                          max_retries_failure=0, max_retries_preemption=3)

    try:
        workers = [client.submit(tpu_job(f"{run_id}-rollout-{i}", rollout, curriculum.handle, weights.handle, i))
                   for i in range(rollouts)]
        train = client.submit(tpu_job(f"{run_id}-train", trainer, curriculum.handle, weights.handle, rollouts,
                                      reports_per_rollout))
        train.wait(raise_on_failure=True)
        statuses = [str(w.wait(timeout=RUN_DEADLINE_SECONDS, raise_on_failure=True)) for w in workers]
        state = curriculum.handle.state()
        print(COORDINATOR_LINE + json.dumps({"final": state, "rollouts": statuses,
                                             "version": weights.handle.latest()}), flush=True)
    finally:
        curriculum.shutdown()
        weights.shutdown()


def coordinator_request(run_id: str, workspace: str, rollouts: int = ROLLOUTS,
                        reports_per_rollout: int = REPORTS_PER_ROLLOUT, host_packages: tuple[str, ...] = ()):
    """The coordinator job; ``host_packages`` go into the TPU jobs' environments (gRPC and
    protobuf at the controller's versions, from the cluster's ``index_url``)."""
    from fray_tpu.client_api import Entrypoint, JobRequest, ResourceConfig, create_environment

    return JobRequest(
        name=f"{run_id}-coordinator",
        entrypoint=Entrypoint.from_callable(coordinator, args=(run_id, workspace, rollouts, reports_per_rollout,
                                                               tuple(host_packages))),
        resources=ResourceConfig.with_cpu(cpu=0.5, preemptible=False),
        environment=create_environment(workspace=workspace),
        max_retries_failure=0,
        max_retries_preemption=0,
    )


def coordinator_report(logs, key: str) -> dict | None:
    """The coordinator's JSON line holding ``key``, from its job's logs."""
    for line in logs:
        _, _, rest = line.partition(COORDINATOR_LINE)
        if rest:
            report = json.loads(rest)
            if key in report:
                return report
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator-endpoint", default=None)
    args = parser.parse_args(argv)
    from fray_tpu.client import TpuClient
    from fray_tpu.config import TpuClusterConfig

    client = TpuClient(TpuClusterConfig(emulate=True, emulator_endpoint=args.emulator_endpoint,
                                        state_dir=tempfile.mkdtemp(prefix="rl-loop-state-")))
    try:
        with tempfile.TemporaryDirectory(prefix="rl-loop-workspace-") as workspace:
            handle = client.submit(coordinator_request("rl-demo", workspace))
            status = handle.wait(raise_on_failure=True)
            final = coordinator_report(handle.logs(), "final")
            print(json.dumps({"status": str(status), "per_rollout": final["final"]["per_rollout"] if final else None,
                              "version": final["version"] if final else None}))
    finally:
        client.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
