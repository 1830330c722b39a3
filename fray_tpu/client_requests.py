"""Turn a 2026 ``JobRequest`` (the Client API's shape) into the controller's late-2025 request.

Pure: every user error is raised here with the value and the fix, before anything is
provisioned. The callable runs inside ``TASK_MAIN`` (the runner calls it through
``RUNNER_TASK_MAIN_ENV``; it gives the job its ``current_client`` and reports its exception back);
the controller's variables are added to the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fray_tpu import fray_api, topology
from fray_tpu.contract import RUNNER_TASK_MAIN_ENV
from fray_tpu.client_api import ANY_REGION, timeout_seconds
from fray_tpu.errors import ConfigError


@dataclass(frozen=True)
class TranslatedRequest:
    request: Any  # a fray_api.JobRequest (slices as replicas for TPU)
    timeout: float | None
    tpu_type: str | None
    tasks: int  # tasks the job runs: replicas (one per VM for TPU jobs)


def _budget(request: Any, name: str) -> int:
    value = getattr(request, name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"JobRequest.{name} must be an integer >= 0, got {value!r}")
    return value


def placement(resources: Any) -> list[str] | None:
    """``regions`` and ``zone`` as the controller's zone/region list (None: anywhere)."""
    regions = getattr(resources, "regions", None)
    zone = getattr(resources, "zone", None)
    if isinstance(regions, str):
        raise ConfigError(f"ResourceConfig.regions must be a list, got the string {regions!r}: write [{regions!r}]")
    regions = list(regions) if regions is not None else None
    if regions is not None and ANY_REGION in regions:
        if len(regions) > 1:
            raise ConfigError(f"ResourceConfig.regions={regions} mixes {ANY_REGION!r} (anywhere) with named regions: "
                              f"use one or the other")
        regions = None
    if zone:
        if regions and not any(zone == r or zone.startswith(r + "-") for r in regions):
            raise ConfigError(f"ResourceConfig.zone={zone!r} is not in regions={regions}: drop one or make them agree")
        return [zone]
    return regions


def device_env(device: Any) -> dict[str, str]:
    """The device's default env vars (Marin's ``default_env_vars``, e.g. ``LIBTPU_INIT_ARGS``),
    without ``JAX_PLATFORMS``: fray-tpu sets that per platform (the emulator runs JAX on the CPU)."""
    defaults = getattr(device, "default_env_vars", None)
    return {k: v for k, v in (defaults() if callable(defaults) else {}).items() if k != "JAX_PLATFORMS"}


def _environment(environment: Any, task_env: Mapping[str, str], defaults: Mapping[str, str]) -> Any:
    if environment is None:
        base = fray_api.create_environment()
        workspace, pip, extras, env_vars = base.workspace, base.pip_packages, base.extras, base.env_vars
    else:
        if getattr(environment, "docker_image", None):
            raise ConfigError(f"EnvironmentConfig.docker_image={environment.docker_image!r} is not supported by "
                              f"fray-tpu: jobs run in the VM's Python with the workspace uploaded")
        workspace = environment.workspace or fray_api.create_environment().workspace
        pip, extras = environment.pip_packages, environment.extras
        env_vars = dict(environment.env_vars or {})
    return fray_api.EnvironmentConfig(workspace=workspace, pip_packages=list(pip or []), extras=list(extras or []),
                                      env_vars={**defaults, **env_vars, **task_env})


# What every callable of a Client API job runs inside (its current_client, its exception reported).
TASK_MAIN = "fray_tpu.actors.taskmain:run_task"


def translate(request: Any, task_env: Mapping[str, str]) -> TranslatedRequest:
    name = getattr(request, "name", None)
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
        raise ConfigError(f"Job name {name!r} must be a non-empty string without spaces")
    processes = getattr(request, "processes_per_task", 1)
    if processes != 1:
        raise ConfigError(f"JobRequest.processes_per_task={processes!r} is not supported by fray-tpu (it is for GPU "
                          f"process groups): a TPU task is one process per VM; leave it at 1")
    resources = request.resources
    replicas = getattr(request, "replicas", None) or getattr(resources, "replicas", 1) or 1
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"JobRequest.replicas must be an integer >= 1, got {replicas!r}")
    budgets = {b: _budget(request, b) for b in ("max_retries_failure", "max_retries_preemption", "max_task_failures")}
    timeout = timeout_seconds(getattr(request, "timeout", None))
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"JobRequest.timeout={timeout}s must be positive")
    regions = placement(resources)
    tpu_type = fray_api.tpu_type_of(resources.device)
    if fray_api.device_kind(resources.device) == "gpu":
        raise ConfigError("GPU jobs are not supported by fray-tpu: use ResourceConfig.with_tpu(...) or with_cpu()")
    if tpu_type is not None:
        vms = topology.get_tpu_topology(tpu_type).vm_count
        if replicas % vms:
            raise ConfigError(
                f"JobRequest.replicas={replicas} is not a whole number of {tpu_type} slices ({vms} VMs each, one "
                f"task per VM): use ResourceConfig.with_tpu({tpu_type!r}, slice_count=N), i.e. replicas = N x {vms}")
        device, count = fray_api.TpuConfig(variant=tpu_type), replicas // vms
    else:
        device, count = fray_api.CpuConfig(), replicas
    kind, target, args, kwargs = fray_api.entrypoint_parts(request.entrypoint)
    if kind == "callable":
        entrypoint = fray_api.Entrypoint.from_callable(target, args=list(args), kwargs=dict(kwargs))
        task_env = {**task_env, RUNNER_TASK_MAIN_ENV: TASK_MAIN}
    else:
        entrypoint = fray_api.Entrypoint.from_binary(target, list(args))
    translated = fray_api.JobRequest(
        name=name,
        entrypoint=entrypoint,
        resources=fray_api.ResourceConfig(device=device, replicas=count, regions=regions,
                                          preemptible=bool(getattr(resources, "preemptible", True))),
        environment=_environment(getattr(request, "environment", None), task_env, device_env(resources.device)),
        max_retries_failure=budgets["max_retries_failure"],
        max_retries_preemption=budgets["max_retries_preemption"],
    )
    return TranslatedRequest(translated, timeout, tpu_type, replicas)
