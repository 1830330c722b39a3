"""A multislice JAX job on 2 x v5litepod-16 (8 hosts), run through Fray's unchanged API.

By default it runs on the local Cloud TPU emulator (``FRAY_CLUSTER_SPEC=tpu?emulate=true``);
point ``FRAY_CLUSTER_SPEC`` at a real project (``tpu?project=...&zone=...``) to run it on TPUs.
Every host calls ``jax.distributed.initialize()`` with no arguments, prints its process id and
its slice's ``MEGASCALE_*``, and joins one global collective that only adds up if all 8
processes took part. The driver then checks that no slice is left alive.

The job gets JAX from its own environment, built with uv on every host. On the emulator (the
default spec), the driver serves a wheelhouse on loopback as the package index: filled once
with ``pip download`` (kept under ``~/.cache/fray-tpu/wheelhouse``), so a second run downloads
nothing. With a spec of your own, the hosts install from its ``index_url`` (uv's default: PyPI).
"""

from __future__ import annotations

import logging
import os
import sys
import time

SLICES = 2
TPU_TYPE = "v5litepod-16"
DEFAULT_SPEC = "tpu?emulate=true&poll_interval=0.5"
# What the job imports, at the controller's versions (the callable is pickled here).
JOB_PACKAGES = ("jax", "jaxlib")


def multislice_main(expected_processes: int) -> None:
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    jax.distributed.initialize()
    megascale = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MEGASCALE_")}
    print(f"process {jax.process_index()}/{jax.process_count()} slice {os.environ['FRAY_SLICE_ID']} "
          f"worker {os.environ['FRAY_WORKER_ID']} {megascale}", flush=True)
    # Each process contributes its id + 1; only a full group of n processes sums to n(n+1)/2.
    total = int(multihost_utils.process_allgather(jnp.array([jax.process_index() + 1])).sum())
    expected = expected_processes * (expected_processes + 1) // 2
    if jax.process_count() != expected_processes or total != expected:
        raise RuntimeError(f"collective saw {jax.process_count()} processes summing to {total}, expected {expected}")
    print(f"process {jax.process_index()}: global sum over {jax.process_count()} processes = {total} (expected {expected})",
          flush=True)
    jax.distributed.shutdown()


def main() -> int:
    # force: `fray-tpu demo` configured logging at WARNING already; the demo shows its progress lines.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    from fray_tpu.package_index import LoopbackIndex, cache_dir, fill_wheelhouse, pinned_like_this_interpreter

    packages = pinned_like_this_interpreter(*JOB_PACKAGES)
    index = None
    if "FRAY_CLUSTER_SPEC" not in os.environ:
        wheelhouse = fill_wheelhouse(cache_dir() / "demo", [*packages, *pinned_like_this_interpreter("cloudpickle")])
        index = LoopbackIndex(wheelhouse)
        os.environ["FRAY_CLUSTER_SPEC"] = f"{DEFAULT_SPEC}&index_url={index.url}"
        # Emulated hosts find the interpreter locally: nothing is downloaded but from the index.
        os.environ.setdefault("FRAY_TPU_PYTHON_DOWNLOADS", "never")
    try:
        return run(packages)
    finally:
        if index is not None:
            index.close()


def run(packages: list[str]) -> int:
    from fray_tpu import current_cluster
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig
    from fray_tpu.topology import get_tpu_topology

    cluster = current_cluster()
    processes = SLICES * get_tpu_topology(TPU_TYPE).vm_count
    started = time.monotonic()
    job_id = cluster.launch(JobRequest(
        name="multislice-demo",
        entrypoint=Entrypoint.from_callable(multislice_main, args=(processes,)),
        resources=ResourceConfig.with_tpu(TPU_TYPE, slice_count=SLICES),
        environment=EnvironmentConfig.create(workspace=os.path.dirname(os.path.abspath(__file__)),
                                             pip_packages=packages),
    ))
    info = cluster.monitor(job_id)
    cluster.wait_released(job_id)
    print(f"job {job_id}: {info.status} in {time.monotonic() - started:.1f}s, "
          f"{len(info.tasks)} tasks: {[t.status.value for t in info.tasks]}")
    if info.error_message:
        print(info.error_message)
    cost = cluster.job_cost(job_id)
    print(f"cost: {cost.chip_hours_provisioned:.4f} chip-hours provisioned ({cost.chip_hours_running:.4f} running "
          f"user code, {cost.chip_hours_boot:.4f} booting), estimated ${cost.estimated_usd:.2f}")
    warm = {w["name"] for w in cluster.warm_slices()}
    leftovers = [s for s in cluster.live_slices() if s.name not in warm]
    print(f"slices kept warm for the next job of this shape: {len(warm)} (shutdown deletes them)")
    print(f"slices still alive after the job: {len(leftovers)}")
    cluster.shutdown()
    return 0 if info.status == "succeeded" and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
