"""Turn a Fray ``JobRequest`` into a plan, rejecting bad input before anything is provisioned.

Pure apart from pickling the callable (which is what proves it can be shipped). Everything a
user can get wrong is caught here, with the bad value and the fix in the message.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cloudpickle

from fray_tpu import fray_api, topology
from fray_tpu.config import TpuClusterConfig, resolve_zones
from fray_tpu.errors import ConfigError
from fray_tpu.multislice import TaskSlot, gang_layout, replica_layout


@dataclass(frozen=True)
class Payload:
    """What runs on every host (or replica): a pickled callable or a command."""

    kind: Literal["callable", "binary"]
    pickled: bytes = b""
    command: str = ""
    args: tuple[str, ...] = ()

    def describe(self) -> str:
        return "callable" if self.kind == "callable" else " ".join((self.command, *self.args))


@dataclass(frozen=True)
class JobPlan:
    name: str
    payload: Payload
    env: Mapping[str, str]
    workspace: Path | None
    pip_packages: tuple[str, ...]
    extras: tuple[str, ...]
    max_failures: int
    max_preemptions: int
    replicas: int
    # TPU only (tpu_type None means a CPU job of `replicas` local processes)
    tpu_type: str | None = None
    shape: topology.TpuTopology | None = None
    zones: tuple[str, ...] = ()
    capacity: str = "on-demand"
    runtime_version: str = ""
    queued: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    # The hosts' job environment: built with uv on this Python, from this index ("" = uv's default).
    python_version: str = ""
    index_url: str = ""

    @property
    def is_tpu(self) -> bool:
        return self.tpu_type is not None

    @property
    def hosts_per_slice(self) -> int:
        return self.shape.vm_count if self.shape else 1

    @property
    def tasks(self) -> list[TaskSlot]:
        if not self.is_tpu:
            return replica_layout(self.replicas)
        return gang_layout(self.replicas, self.hosts_per_slice)

    @property
    def task_names(self) -> list[str]:
        return [task.label for task in self.tasks]


def pickle_callable(fn: Any, args: tuple, kwargs: Mapping[str, Any]) -> bytes:
    """cloudpickle the call, or say exactly which object cannot be shipped to the hosts."""
    try:
        return cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    except Exception as error:  # noqa: BLE001 - pickling raises many types; all mean "cannot ship"
        culprit = _find_unpicklable(fn, args, kwargs)
        raise ConfigError(
            f"Cannot ship the job's callable to the TPU hosts: {culprit or 'the call'} cannot be pickled "
            f"({type(error).__name__}: {error}). Pass plain data (paths, configs) and create locks, "
            f"clients, sockets or open files inside the function instead."
        ) from error


def _picklable(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001
        return False


def _find_unpicklable(fn: Any, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
    for i, arg in enumerate(args):
        if not _picklable(arg):
            return f"positional argument {i} ({type(arg).__name__})"
    for key, value in kwargs.items():
        if not _picklable(value):
            return f"keyword argument {key!r} ({type(value).__name__})"
    name = getattr(fn, "__qualname__", repr(fn))
    if inspect.isfunction(fn):
        closure = inspect.getclosurevars(fn)
        for kind, variables in (("captured variable", closure.nonlocals), ("global", closure.globals)):
            for var, value in variables.items():
                if not _picklable(value):
                    return f"{kind} {var!r} ({type(value).__name__}) used by {name}"
    return f"the callable {name}"


def job_environment(env_vars: Mapping[str, Any] | None) -> dict[str, str]:
    """The request's env vars, checked (``multislice`` adds what fray-tpu sets per attempt)."""
    env: dict[str, str] = {}
    for key, value in (env_vars or {}).items():
        if not isinstance(key, str) or not key or "=" in key:
            raise ConfigError(f"Environment variable name {key!r} is invalid: use a non-empty string without '='")
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"Environment variable {key}={value!r} is a {type(value).__name__}, not a string: pass str({value!r})"
            )
        env[key] = value
    return env


def _payload(request: Any) -> Payload:
    entry = fray_api.normalize_entrypoint(request.entrypoint)
    if entry.kind == "callable":
        if not callable(entry.callable):
            raise ConfigError(f"Entrypoint callable {entry.callable!r} is not callable")
        return Payload(kind="callable", pickled=pickle_callable(entry.callable, entry.args, entry.kwargs))
    if not entry.command:
        raise ConfigError("Entrypoint binary is empty: use Entrypoint.from_binary('python', ['-m', 'mod'])")
    return Payload(kind="binary", command=entry.command, args=tuple(entry.command_args))


def plan_job(request: Any, config: TpuClusterConfig) -> JobPlan:
    """Validate ``request`` against ``config`` and plan it."""
    fray_api.validate_request(request)
    environment = fray_api.resolved_environment(request)
    if getattr(environment, "docker_image", None):
        raise ConfigError(
            f"EnvironmentConfig.docker_image={environment.docker_image!r} is not supported by fray-tpu: "
            f"jobs run in the TPU VM's Python with the workspace uploaded; use "
            f"EnvironmentConfig.create(workspace=..., pip_packages=[...]) instead"
        )
    workspace = getattr(environment, "workspace", None)
    workspace_path = Path(workspace).resolve() if workspace else None
    if workspace_path is not None and not workspace_path.is_dir():
        raise ConfigError(f"EnvironmentConfig.workspace={workspace!r} is not a directory")
    resources = request.resources
    common = dict(
        name=request.name,
        payload=_payload(request),
        env=job_environment(getattr(environment, "env_vars", None)),
        workspace=workspace_path,
        pip_packages=tuple(getattr(environment, "pip_packages", None) or ()),
        extras=tuple(getattr(environment, "extras", None) or ()),
        max_failures=request.max_retries_failure,
        max_preemptions=request.max_retries_preemption,
        python_version=config.job_python_version(),
        index_url=config.index_url or "",
    )
    tpu_type = fray_api.tpu_type_of(resources.device)
    if tpu_type is None:
        if fray_api.device_kind(resources.device) == "gpu":
            raise ConfigError("GPU jobs are not supported by fray-tpu: request TpuConfig(...) or CpuConfig()")
        return JobPlan(replicas=resources.replicas, **common)
    shape = topology.get_tpu_topology(tpu_type)
    zones = tuple(resolve_zones(tpu_type, getattr(resources, "regions", None), config))
    return JobPlan(
        replicas=fray_api.slice_count_of(resources),
        tpu_type=tpu_type,
        shape=shape,
        zones=zones,
        capacity=config.capacity_for(bool(getattr(resources, "preemptible", True))),
        runtime_version=config.runtime_version_for(shape),
        queued=config.queued,
        labels=dict(config.labels),
        **common,
    )

