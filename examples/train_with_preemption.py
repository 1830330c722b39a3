"""A JAX training loop that checkpoints, survives a preemption, and resumes from its checkpoint.

``train`` fits a linear regression on synthetic data with plain gradient descent. Every
``checkpoint_every`` steps task 0 writes ``ckpt-STEP.npz`` into the checkpoint directory (written
to a temporary name, flushed, then renamed into place, so a reader never sees half a file), and
at start it resumes from the newest checkpoint there. It prints its step and loss.

``main`` is the driver: it launches ``train`` on one ``v5litepod-8`` (a single host, to keep the
demo quick) on the local Cloud TPU emulator, waits until a checkpoint exists, preempts the slice
through the emulator's fault control, and lets fray-tpu restart the job on a fresh slice; the
job resumes from its checkpoint and finishes. It prints the preemption count, the step the job
resumed from and the number of slices left alive (0).

The preemption comes with a notice, as Cloud TPU spot VMs get one: the emulator sets the
``preempted`` metadata flag ``PREEMPTION_NOTICE_SECONDS`` before it kills the hosts, the agent
reports it and fray-tpu stops the gang and counts a preemption.

The job gets JAX from its own environment, built with uv on the host (the VMs have nothing of
the controller's): ``main`` serves the demo's wheelhouse on loopback as the package index, as
``examples/multislice_jax.py`` does; the slice that replaces the preempted one downloads the
environment the first built from the staging bucket.

Run: ``python examples/train_with_preemption.py [--checkpoint-dir DIR] [--emulator-endpoint HOST:PORT]``
(without an endpoint, fray-tpu starts an emulator of its own).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

# The job function is shipped by value, so the hosts need not import this file.
if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

TPU_TYPE = "v5litepod-8"
STEPS = 300
CHECKPOINT_EVERY = 25
STEP_SECONDS = 0.02  # stands in for real work, so the preemption lands mid-run
LEARNING_RATE = 0.03
PREEMPTION_NOTICE_SECONDS = 1.0
CHECKPOINT_WAIT_SECONDS = 90.0
JOB_TIMEOUT_SECONDS = 120.0
# What the job imports, at the controller's versions (the callable is pickled here); numpy comes with jax.
JOB_PACKAGES = ("jax", "jaxlib")
CHECKPOINT_PATTERN = re.compile(r"ckpt-(\d+)\.npz")
RESUMED_LINE = re.compile(r"resumed from checkpoint at step (\d+)")


# -- the job (runs on the TPU host) ---------------------------------------------------------------

def latest_checkpoint(directory: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in directory.glob("ckpt-*.npz") if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(directory: Path, step: int, params: dict, loss: float) -> Path:
    import numpy as np

    final = directory / f"ckpt-{step:06d}.npz"
    partial = directory / f".ckpt-{step:06d}.npz.partial"
    with open(partial, "wb") as f:
        np.savez(f, step=step, loss=loss, **{k: np.asarray(v) for k, v in params.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, final)
    return final


def train(checkpoint_dir: str, steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY,
          step_seconds: float = STEP_SECONDS) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    directory = Path(checkpoint_dir)
    is_writer = os.environ.get("FRAY_TASK_INDEX", "0") == "0"

    # The same synthetic data on every attempt: y = X w* + b* + noise.
    data_key, noise_key = jax.random.split(jax.random.PRNGKey(0))
    features = jax.random.normal(data_key, (512, 8))
    true_w = jnp.arange(1.0, 9.0) / 4.0
    targets = features @ true_w + 0.5 + 0.01 * jax.random.normal(noise_key, (512,))

    def loss_fn(params):
        return jnp.mean((features @ params["w"] + params["b"] - targets) ** 2)

    @jax.jit
    def update(params):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree_util.tree_map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    step = 0
    checkpoint = latest_checkpoint(directory)
    if checkpoint is not None:
        with np.load(checkpoint) as saved:
            step = int(saved["step"])
            params = {"w": jnp.asarray(saved["w"]), "b": jnp.asarray(saved["b"])}
        print(f"resumed from checkpoint at step {step} ({checkpoint.name})", flush=True)
    else:
        print("no checkpoint yet: starting from step 0", flush=True)

    pause = threading.Event()
    loss = float(loss_fn(params))
    while step < steps:
        params, loss_value = update(params)
        step += 1
        loss = float(loss_value)
        if step % checkpoint_every == 0 or step == steps:
            if is_writer:
                save_checkpoint(directory, step, params, loss)
            print(f"step {step} loss {loss:.6f}", flush=True)
        pause.wait(step_seconds)
    print(f"done: step {step} loss {loss:.6f}", flush=True)


# -- the driver -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExampleResult:
    status: str
    error_message: str | None
    preemptions: int
    attempts: int
    resumed_from_step: int | None
    final_step: int
    final_loss: float
    slices_left: int  # alive after the job, besides those kept warm (shutdown deletes these)


class _ResumeWatcher(logging.Handler):
    """Picks the job's "resumed from checkpoint at step N" line out of its forwarded output."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_from: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = RESUMED_LINE.search(record.getMessage())
        if match and self.resumed_from is None:
            self.resumed_from = int(match.group(1))


def wait_for_checkpoint(directory: Path, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        checkpoint = latest_checkpoint(directory)
        if checkpoint is not None:
            return checkpoint
        pause.wait(0.05)
    raise TimeoutError(f"no checkpoint appeared in {directory} within {timeout:.0f}s; is the job running?")


def run_example(checkpoint_dir: str, emulator_endpoint: str | None = None, state_dir: str | None = None,
                poll_interval: float = 0.2, index_url: str | None = None) -> ExampleResult:
    """Launch ``train`` on the emulator, preempt it once a checkpoint exists, let it resume.
    ``state_dir`` is the controller's journal directory (default: a new temporary one, so the
    demo never meets another fray-tpu controller's state); ``index_url`` the package index the
    host installs JAX from."""
    from fray_tpu.cluster import TpuCluster
    from fray_tpu.config import TpuClusterConfig
    from fray_tpu.emulator.control import EmulatorControl
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig
    from fray_tpu.package_index import pinned_like_this_interpreter

    import numpy as np

    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cluster = TpuCluster(TpuClusterConfig(
        emulate=True, emulator_endpoint=emulator_endpoint, poll_interval=poll_interval, lease_period=30.0,
        state_dir=state_dir or tempfile.mkdtemp(prefix="fray-tpu-train-state-"), index_url=index_url,
    ))
    watcher = _ResumeWatcher()
    # monitor() forwards the job's lines to this logger at INFO; let them reach the watcher.
    job_log = logging.getLogger("fray_tpu.job")
    previous_level = job_log.level
    if not job_log.isEnabledFor(logging.INFO):
        job_log.setLevel(logging.INFO)
    job_log.addHandler(watcher)
    try:
        job_id = cluster.launch(JobRequest(
            name="train-with-preemption",
            entrypoint=Entrypoint.from_callable(train, args=[str(directory)]),
            resources=ResourceConfig.with_tpu(TPU_TYPE),
            environment=EnvironmentConfig.create(workspace=os.path.dirname(os.path.abspath(__file__)),
                                                 pip_packages=pinned_like_this_interpreter(*JOB_PACKAGES)),
            max_retries_preemption=1,
        ))
        # The cluster knows its emulator's endpoint once the job is launched (it may have started it).
        control = EmulatorControl(cluster.config.emulator_endpoint)
        control.set_timings(preempt_notice=PREEMPTION_NOTICE_SECONDS)
        checkpoint = wait_for_checkpoint(directory, CHECKPOINT_WAIT_SECONDS)
        (node,) = cluster.live_slices()
        print(f"checkpoint {checkpoint.name} exists: preempting {node.resource_name}", flush=True)
        control.preempt_node(node.resource_name)

        info = cluster.monitor(job_id)
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT_SECONDS)
        counters = cluster.job_counters(job_id)
        final = latest_checkpoint(directory)
        with np.load(final) as saved:
            final_step, final_loss = int(saved["step"]), float(saved["loss"])
        result = ExampleResult(
            status=str(info.status), error_message=info.error_message, preemptions=counters.preemptions,
            attempts=counters.attempts, resumed_from_step=watcher.resumed_from, final_step=final_step,
            final_loss=final_loss,
            slices_left=len({s.name for s in cluster.live_slices()} - {w["name"] for w in cluster.warm_slices()}),
        )
    finally:
        job_log.removeHandler(watcher)
        job_log.setLevel(previous_level)
        cluster.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", help="where the job checkpoints (default: a new temporary directory)")
    parser.add_argument("--emulator-endpoint", help="a running emulator (default: fray-tpu starts one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="fray-tpu-train-ckpt-")
    from fray_tpu.package_index import LoopbackIndex, cache_dir, fill_wheelhouse, pinned_like_this_interpreter

    # The demo's wheelhouse (the same packages), filled once; emulated hosts download no interpreter.
    packages = pinned_like_this_interpreter(*JOB_PACKAGES)
    wheelhouse = fill_wheelhouse(cache_dir() / "demo", [*packages, *pinned_like_this_interpreter("cloudpickle")])
    os.environ.setdefault("FRAY_TPU_PYTHON_DOWNLOADS", "never")
    with LoopbackIndex(wheelhouse) as index:
        result = run_example(checkpoint_dir, args.emulator_endpoint, index_url=index.url)
    print(f"job {result.status} after {result.attempts} attempt(s); preemptions: {result.preemptions}")
    print(f"resumed from step {result.resumed_from_step}; final step {result.final_step}, loss {result.final_loss:.6f}")
    print(f"slices still alive after the job: {result.slices_left}")
    if result.error_message:
        print(result.error_message)
    ok = result.status == "succeeded" and result.preemptions == 1 and result.slices_left == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
