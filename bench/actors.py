"""Actor call round trips beside the task channel's, in one run.

Prints one JSON line per metric (median and p99 in milliseconds, sequential synchronous calls
of a method that returns its argument):
- task_channel_roundtrip: Describe on a real agent (the baseline: pinned TLS + secret + answer);
- actor_roundtrip driver->cpu-actor: the driver calls an actor running as its own process on the
  controller machine (``create_actor``);
- actor_roundtrip driver->hosted-actor: the driver calls an actor it hosts itself (loopback);
- actor_roundtrip tpu-host->driver-actor: a task on an emulated TPU host calls an actor hosted
  in the driver (the path RL rollouts use to reach the coordinator's actors).

    .venv/bin/python bench/actors.py [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import emit  # noqa: E402
from channel import percentile, start_agent  # noqa: E402
from fake_gcp.process import EmulatorProcess  # noqa: E402

from fray_tpu.package_index import LoopbackIndex, cache_dir, fill_wheelhouse, pinned_like_this_interpreter  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
TPU_TYPE = "v5litepod-4"
# What the TPU host's caller needs of the controller's packages (its actor link is gRPC).
HOST_PACKAGES = pinned_like_this_interpreter("grpcio", "protobuf")
JOB_TIMEOUT = 300.0
RESULT_PREFIX = "actor-bench "


class Echo:
    def echo(self, value):
        return value


def timed_calls(call, calls: int) -> list[float]:
    """Milliseconds per ``call(i)``, after 20 warm-up calls."""
    for _ in range(20):
        call(0)
    samples = []
    for i in range(calls):
        began = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - began) * 1e3)
    return samples


def summary(samples: list[float]) -> dict:
    return {"calls": len(samples), "median_ms": round(statistics.median(samples), 3),
            "p99_ms": round(percentile(samples, 0.99), 3)}


def call_from_tpu_host(handle, calls: int) -> None:
    print(RESULT_PREFIX + json.dumps(timed_calls(handle.echo, calls)), flush=True)


def bench_task_channel(calls: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-actors-agent-"))
    agent, client, server = start_agent(workdir)
    try:
        samples = timed_calls(lambda _: client.describe(), calls)
        emit({"metric": "task_channel_roundtrip", "call": "Describe", **summary(samples)})
    finally:
        client.close()
        agent.terminate()
        agent.wait(15)
        server.metadata.close()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_actors(calls: int) -> None:
    from fray_tpu.client import TpuClient
    from fray_tpu.client_api import Entrypoint, JobRequest, ResourceConfig, create_environment
    from fray_tpu.config import TpuClusterConfig

    state = tempfile.mkdtemp(prefix="fray-tpu-bench-actors-state-")
    workspace = tempfile.mkdtemp(prefix="fray-tpu-bench-actors-ws-")
    (Path(state) / "emulator").mkdir()
    emulator = EmulatorProcess(root=Path(state) / "emulator").start()
    # The host's task imports gRPC for its actor link: faithful hosts have nothing of the
    # controller's, so its job environment installs gRPC (at the controller's versions) from a
    # wheelhouse served on loopback.
    wheelhouse = fill_wheelhouse(cache_dir() / "actors", HOST_PACKAGES)
    index = LoopbackIndex(wheelhouse)
    os.environ.setdefault("FRAY_TPU_PYTHON_DOWNLOADS", "never")
    client = TpuClient(TpuClusterConfig(emulate=True, emulator_endpoint=emulator.endpoint, state_dir=state,
                                        poll_interval=0.2, index_url=index.url))
    try:
        cpu_actor = client.create_actor(Echo, name="bench-cpu")
        emit({"metric": "actor_roundtrip", "path": "driver->cpu-actor", **summary(timed_calls(cpu_actor.echo, calls))})
        hosted = client.host_actor(Echo, name="bench-hosted")
        emit({"metric": "actor_roundtrip", "path": "driver->hosted-actor",
              **summary(timed_calls(hosted.handle.echo, calls))})
        job = client.submit(JobRequest(
            name="bench-tpu-caller", entrypoint=Entrypoint.from_callable(call_from_tpu_host, args=(hosted.handle, calls)),
            resources=ResourceConfig.with_tpu(TPU_TYPE),
            environment=create_environment(workspace=workspace, pip_packages=HOST_PACKAGES)))
        job.wait(timeout=JOB_TIMEOUT)
        line = next(line for line in job.logs() if RESULT_PREFIX in line)
        samples = json.loads(line.split(RESULT_PREFIX, 1)[1])
        emit({"metric": "actor_roundtrip", "path": "tpu-host->driver-actor", "tpu_type": TPU_TYPE, **summary(samples)})
        hosted.shutdown()
    finally:
        client.shutdown(wait=False)
        index.close()
        emulator.stop()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    calls = max(args.calls, 200)
    bench_task_channel(calls)
    bench_actors(calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
