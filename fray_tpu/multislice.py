"""The environment every host of a TPU gang sees, recomputed from scratch for every attempt.

Pure: fed the slices of one attempt (worker IPs in worker order), returns one env dict per task.
Stale ``MEGASCALE_*`` after a preemption make ``jax.distributed.initialize()`` wait forever
(ray #62893), so nothing here is cached between attempts.

Variables set on every task (documented contract, also in the README):

- ``FRAY_SLICE_ID`` / ``FRAY_SLICE_COUNT``: this host's slice and the number of slices.
- ``FRAY_WORKER_ID`` / ``FRAY_WORKERS_PER_SLICE``: the worker index within the slice (the TPU
  ``agent-worker-number``) and the hosts per slice.
- ``FRAY_TASK_INDEX`` / ``FRAY_TASK_COUNT``: the global task index
  (``worker + slice * workers_per_slice``, equal to JAX's ``process_id``) and the total hosts.
- ``FRAY_REPLICA_ID`` / ``FRAY_REPLICA_COUNT``: Fray's replica of a TPU job is a slice.
- ``MEGASCALE_COORDINATOR_ADDRESS`` / ``MEGASCALE_NUM_SLICES`` / ``MEGASCALE_SLICE_ID`` /
  ``MEGASCALE_PORT``: only when there is more than one slice (tpu-facts.md).
- ``JAX_COORDINATOR_PORT=8476`` unless the request sets it: GCP's TPU firewall opens 8476, not
  the 8482 that jax >= 0.8.1 defaults to (jax #35905).
- ``FRAY_JAX_COORDINATOR_ADDRESS``: slice 0 worker 0 at the JAX coordinator port; read by the
  emulator's JAX cluster plugin (real TPU VMs derive the same from metadata).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MEGASCALE_PORT = 8081
JAX_COORDINATOR_PORT = 8476


@dataclass(frozen=True)
class TaskPlacement:
    """Where one task of the gang runs."""

    slice_id: int
    worker_id: int
    task_index: int
    ip: str


def place_tasks(slice_worker_ips: Sequence[Sequence[str]]) -> list[TaskPlacement]:
    """One placement per host, in global task order (slice-major, like JAX's process ids)."""
    if not slice_worker_ips:
        raise ValueError("a gang needs at least one slice")
    workers_per_slice = len(slice_worker_ips[0])
    if workers_per_slice == 0 or any(len(ips) != workers_per_slice for ips in slice_worker_ips):
        sizes = [len(ips) for ips in slice_worker_ips]
        raise ValueError(f"every slice of a gang must have the same non-zero number of hosts, got {sizes}")
    return [
        TaskPlacement(slice_id=s, worker_id=w, task_index=w + s * workers_per_slice, ip=ip)
        for s, ips in enumerate(slice_worker_ips)
        for w, ip in enumerate(ips)
    ]


def megascale_environment(num_slices: int, slice_id: int, coordinator_ip: str) -> dict[str, str]:
    """The four MEGASCALE_* variables, or nothing for a single slice."""
    if num_slices <= 1:
        return {}
    return {
        "MEGASCALE_COORDINATOR_ADDRESS": f"{coordinator_ip}:{MEGASCALE_PORT}",
        "MEGASCALE_NUM_SLICES": str(num_slices),
        "MEGASCALE_SLICE_ID": str(slice_id),
        "MEGASCALE_PORT": str(MEGASCALE_PORT),
    }


def gang_environments(
    slice_worker_ips: Sequence[Sequence[str]],
    user_env: Mapping[str, str],
) -> list[dict[str, str]]:
    """The full per-task environment of one attempt, in global task order.

    ``user_env`` is the request's env (already including ``FRAY_CLUSTER_SPEC``); the variables
    computed here win over it except ``JAX_COORDINATOR_PORT``, which a user may choose.
    """
    placements = place_tasks(slice_worker_ips)
    num_slices = len(slice_worker_ips)
    workers_per_slice = len(slice_worker_ips[0])
    coordinator_ip = slice_worker_ips[0][0]
    jax_port = user_env.get("JAX_COORDINATOR_PORT") or str(JAX_COORDINATOR_PORT)
    environments = []
    for p in placements:
        env = dict(user_env)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "FRAY_SLICE_ID": str(p.slice_id),
                "FRAY_SLICE_COUNT": str(num_slices),
                "FRAY_WORKER_ID": str(p.worker_id),
                "FRAY_WORKERS_PER_SLICE": str(workers_per_slice),
                "FRAY_TASK_INDEX": str(p.task_index),
                "FRAY_TASK_COUNT": str(len(placements)),
                "FRAY_REPLICA_ID": str(p.slice_id),
                "FRAY_REPLICA_COUNT": str(num_slices),
                "JAX_COORDINATOR_PORT": jax_port,
                "FRAY_JAX_COORDINATOR_ADDRESS": f"{coordinator_ip}:{jax_port}",
            }
        )
        for stale in ("MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_PORT"):
            env.pop(stale, None)
        env.update(megascale_environment(num_slices, p.slice_id, coordinator_ip))
        environments.append(env)
    return environments
