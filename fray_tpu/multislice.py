"""Where each task of a job runs and the environment it sees: computed here and nowhere else,
from scratch for every attempt. Pure.

Stale ``MEGASCALE_*`` after a preemption make ``jax.distributed.initialize()`` wait forever
(ray #62893), so nothing here is cached between attempts. The variable names are the wire
contract's (``fray_tpu.contract``); what every task sees (also in the README):

- the request's env vars, and ``FRAY_CLUSTER_SPEC`` (nested ``current_cluster()`` calls reach
  the same backend, an emulator started by the controller included);
- ``FRAY_SLICE_ID`` / ``FRAY_SLICE_COUNT``: this host's slice and the number of slices;
- ``FRAY_WORKER_ID`` / ``FRAY_WORKERS_PER_SLICE``: the worker index within the slice (the TPU
  ``agent-worker-number``) and the hosts per slice;
- ``FRAY_TASK_INDEX`` / ``FRAY_TASK_COUNT``: the global task index
  (``worker + slice * workers_per_slice``, equal to JAX's ``process_id``) and the total hosts;
- ``FRAY_REPLICA_ID`` / ``FRAY_REPLICA_COUNT``: Fray's replica of a TPU job is a slice;
- ``MEGASCALE_COORDINATOR_ADDRESS`` / ``MEGASCALE_NUM_SLICES`` / ``MEGASCALE_SLICE_ID`` /
  ``MEGASCALE_PORT``: only when there is more than one slice (tpu-facts.md);
- ``JAX_COORDINATOR_PORT=8476`` unless the request sets it;
- ``FRAY_JAX_COORDINATOR_ADDRESS``: slice 0 worker 0 at the JAX coordinator port; read by the
  emulator's JAX cluster plugin (real TPU VMs derive the same from metadata);
- on emulated hosts, JAX on the CPU with gloo collectives and the emulator's cluster plugin;
- ``FRAY_TPU_CONTROLLER_PYTHON``: the controller's Python version, so a callable pickled by
  value that does not load on the host's Python fails with a message saying why.

CPU replicas see the request's env vars, ``FRAY_CLUSTER_SPEC``, ``FRAY_REPLICA_ID`` /
``FRAY_REPLICA_COUNT`` and ``JAX_PLATFORMS=cpu``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fray_tpu import contract as c

MEGASCALE_PORT = c.MEGASCALE_PORT
JAX_COORDINATOR_PORT = c.JAX_COORDINATOR_PORT


@dataclass(frozen=True)
class TaskSlot:
    """Where task ``index`` of the job runs."""

    index: int
    slice_id: int
    worker_id: int
    label: str  # the log prefix: slice-S/worker-W, or replica-i for CPU jobs


def gang_layout(num_slices: int, hosts_per_slice: int) -> list[TaskSlot]:
    """Every task of a TPU gang in global task order: slice-major, like JAX's process ids."""
    return [TaskSlot(index=w + s * hosts_per_slice, slice_id=s, worker_id=w, label=f"slice-{s}/worker-{w}")
            for s in range(num_slices) for w in range(hosts_per_slice)]


def replica_layout(replicas: int) -> list[TaskSlot]:
    """The replicas of a CPU job, each its own "slice"."""
    return [TaskSlot(index=i, slice_id=i, worker_id=0, label=f"replica-{i}") for i in range(replicas)]


@dataclass(frozen=True)
class TaskPlacement:
    """Where one task of the gang runs, with its host's address."""

    slice_id: int
    worker_id: int
    task_index: int
    ip: str


def place_tasks(slice_worker_ips: Sequence[Sequence[str]]) -> list[TaskPlacement]:
    """One placement per host, in global task order."""
    if not slice_worker_ips:
        raise ValueError("a gang needs at least one slice")
    workers_per_slice = len(slice_worker_ips[0])
    if workers_per_slice == 0 or any(len(ips) != workers_per_slice for ips in slice_worker_ips):
        sizes = [len(ips) for ips in slice_worker_ips]
        raise ValueError(f"every slice of a gang must have the same non-zero number of hosts, got {sizes}")
    return [TaskPlacement(slice_id=t.slice_id, worker_id=t.worker_id, task_index=t.index,
                          ip=slice_worker_ips[t.slice_id][t.worker_id])
            for t in gang_layout(len(slice_worker_ips), workers_per_slice)]


def megascale_environment(num_slices: int, slice_id: int, coordinator_ip: str) -> dict[str, str]:
    """The four MEGASCALE_* variables, or nothing for a single slice."""
    if num_slices <= 1:
        return {}
    return {
        c.MEGASCALE_COORDINATOR_ADDRESS_ENV: f"{coordinator_ip}:{MEGASCALE_PORT}",
        c.MEGASCALE_NUM_SLICES_ENV: str(num_slices),
        c.MEGASCALE_SLICE_ID_ENV: str(slice_id),
        c.MEGASCALE_PORT_ENV: str(MEGASCALE_PORT),
    }


def gang_environments(
    slice_worker_ips: Sequence[Sequence[str]],
    user_env: Mapping[str, str],
    *,
    cluster_spec: str | None = None,
    emulated: bool = False,
    controller_python: str | None = None,
) -> list[dict[str, str]]:
    """The full per-task environment of one TPU attempt, in global task order.

    The variables computed here win over ``user_env`` except ``JAX_COORDINATOR_PORT``, which a
    user may choose, and, on emulated hosts, the JAX platform and collectives.
    """
    placements = place_tasks(slice_worker_ips)
    num_slices = len(slice_worker_ips)
    workers_per_slice = len(slice_worker_ips[0])
    coordinator_ip = slice_worker_ips[0][0]
    base = _job_environment(user_env, cluster_spec)
    if controller_python is not None:
        base[c.CONTROLLER_PYTHON_ENV] = controller_python
    if emulated:
        # Emulated hosts have no TPU: JAX runs on the CPU and finds its peers through the plugin.
        base.setdefault(c.JAX_PLATFORMS_ENV, "cpu")
        base.setdefault(c.JAX_CPU_COLLECTIVES_ENV, "gloo")
        base[c.RUNNER_PRELOAD_ENV] = c.EMULATOR_JAX_PLUGIN
    jax_port = base.get(c.JAX_COORDINATOR_PORT_ENV) or str(JAX_COORDINATOR_PORT)
    environments = []
    for p in placements:
        env = dict(base)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                c.SLICE_ID_ENV: str(p.slice_id),
                c.SLICE_COUNT_ENV: str(num_slices),
                c.WORKER_ID_ENV: str(p.worker_id),
                c.WORKERS_PER_SLICE_ENV: str(workers_per_slice),
                c.TASK_INDEX_ENV: str(p.task_index),
                c.TASK_COUNT_ENV: str(len(placements)),
                c.REPLICA_ID_ENV: str(p.slice_id),
                c.REPLICA_COUNT_ENV: str(num_slices),
                c.JAX_COORDINATOR_PORT_ENV: jax_port,
                c.JAX_COORDINATOR_ADDRESS_ENV: f"{coordinator_ip}:{jax_port}",
            }
        )
        for stale in c.MEGASCALE_ENVS:
            env.pop(stale, None)
        env.update(megascale_environment(num_slices, p.slice_id, coordinator_ip))
        environments.append(env)
    return environments


def replica_environments(replicas: int, user_env: Mapping[str, str], *, cluster_spec: str | None = None
                         ) -> list[dict[str, str]]:
    """The environment of each replica of a CPU job (on top of the controller's own)."""
    base = _job_environment(user_env, cluster_spec)
    return [{**base, c.REPLICA_ID_ENV: str(replica), c.REPLICA_COUNT_ENV: str(replicas),
             c.JAX_PLATFORMS_ENV: "cpu", "PYTHONUNBUFFERED": "1"}
            for replica in range(replicas)]


def _job_environment(user_env: Mapping[str, str], cluster_spec: str | None) -> dict[str, str]:
    env = dict(user_env)
    if cluster_spec is not None:
        env[c.CLUSTER_SPEC_ENV] = cluster_spec
    return env
