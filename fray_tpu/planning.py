"""Turn a Fray ``JobRequest`` into a plan, rejecting bad input before anything is provisioned.

Pure apart from pickling the callable (which is what proves it can be shipped). Everything a
user can get wrong is caught here, with the bad value and the fix in the message.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import pickletools
import site
import sys
import sysconfig
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
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


def pickle_callable(fn: Any, args: tuple, kwargs: Mapping[str, Any], workspace: Path | None = None) -> bytes:
    """cloudpickle the call, or say exactly which object cannot be shipped to the hosts.

    What the call refers to by reference from a module the hosts cannot import (outside the
    workspace and not installed in the environment: a test file, a script beside the driver, a
    helper directory put on sys.path) is shipped by value instead.
    """
    call = (fn, tuple(args), dict(kwargs))
    by_value: list[ModuleType] = []
    try:
        with _PICKLE_LOCK:
            try:
                while True:
                    pickled = cloudpickle.dumps(call)
                    unimportable = [m for m in _modules_by_reference(pickled) if not _importable_on_hosts(m, workspace)]
                    if not unimportable:
                        return pickled
                    for module in unimportable:
                        cloudpickle.register_pickle_by_value(module)
                        by_value.append(module)
            finally:
                for module in by_value:
                    cloudpickle.unregister_pickle_by_value(module)
    except Exception as error:  # noqa: BLE001 - pickling raises many types; all mean "cannot ship"
        culprit = _find_unpicklable(fn, args, kwargs)
        shipped = "".join(
            f" {module.__name__} ({module.__file__}) cannot be imported on the hosts, so it was shipped by value: "
            f"move it into the workspace ({workspace}) or install it in the environment (pip_packages)."
            for module in by_value
        )
        raise ConfigError(
            f"Cannot ship the job's callable to the TPU hosts: {culprit or 'the call'} cannot be pickled "
            f"({type(error).__name__}: {error}).{shipped} Pass plain data (paths, configs) and create locks, "
            f"clients, sockets or open files inside the function instead."
        ) from error


_PICKLE_LOCK = threading.Lock()
_GLOBAL_OPS = {"GLOBAL", "STACK_GLOBAL", "INST"}
_MEMO_OPS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def _modules_by_reference(pickled: bytes) -> list[ModuleType]:
    """The loaded modules that `pickled` imports on unpickling (its GLOBAL and STACK_GLOBAL
    opcodes; pickle pushes STACK_GLOBAL's module and name just before it)."""
    names: set[str] = set()
    pushed: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in ("GLOBAL", "INST"):
            names.add(arg.split(" ", 1)[0])
        elif opcode.name == "STACK_GLOBAL":
            if len(pushed) >= 2 and isinstance(pushed[-2], str):
                names.add(pushed[-2])
        if opcode.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif opcode.name in _GET_OPS:
            pushed.append(memo.get(arg))
        elif opcode.name not in _MEMO_OPS:
            pushed.append(arg if isinstance(arg, str) and opcode.name not in _GLOBAL_OPS else None)
    return [sys.modules[name] for name in sorted(names) if name in sys.modules]


def _importable_on_hosts(module: ModuleType, workspace: Path | None) -> bool:
    """Whether the hosts can import `module` by name: built in, in the standard library, at its
    place in the workspace, or installed in the environment (site-packages, a .pth entry, a
    distribution)."""
    name = module.__name__
    top = name.partition(".")[0]
    path = getattr(module, "__file__", None)
    if name == "__main__" or path is None or top in sys.stdlib_module_names:
        return True  # __main__ is shipped by value by cloudpickle itself
    resolved = Path(path).resolve()
    # The hosts put the workspace itself on sys.path: `a.b` is importable from `<workspace>/a/b.py`.
    depth = name.count(".") + (1 if resolved.stem == "__init__" else 0)
    if workspace is not None and depth < len(resolved.parents) and resolved.parents[depth] == workspace.resolve():
        return True
    if any(resolved.is_relative_to(root) for root in _installed_roots()):
        return True
    return top in _distribution_packages()


@functools.cache
def _distribution_packages() -> frozenset[str]:
    """Top-level names installed distributions provide (editable installs included)."""
    return frozenset(importlib.metadata.packages_distributions())


@functools.cache
def _installed_roots() -> tuple[Path, ...]:
    """Where this environment's installed code lives: stdlib, site-packages, and the directories
    their .pth files add (editable installs)."""
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    roots = [Path(p) for key in ("stdlib", "platstdlib", "purelib", "platlib")
             if (p := sysconfig.get_paths().get(key))]
    roots.extend(Path(d) for d in site_dirs)
    for site_dir in site_dirs:
        for pth in sorted(Path(site_dir).glob("*.pth")):
            try:
                lines = pth.read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            roots.extend(Path(site_dir, line.strip()) for line in lines
                         if line.strip() and not line.startswith(("#", "import ", "import\t")))
    return tuple(dict.fromkeys(root.resolve() for root in roots))


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
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ConfigError(
                f"Environment variable name {key!r} is invalid: use a non-empty string without '=' or NUL bytes"
            )
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"Environment variable {key}={value!r} is a {type(value).__name__}, not a string: pass str({value!r})"
            )
        if "\0" in value:
            # An environment is a list of NUL-terminated strings: no process can be given this one.
            raise ConfigError(
                f"Environment variable {key}={value!r} contains a NUL byte, which no process environment can "
                f"hold: remove it (or encode the value, e.g. base64)"
            )
        env[key] = value
    return env


def _payload(request: Any, workspace: Path | None) -> Payload:
    entry = fray_api.normalize_entrypoint(request.entrypoint)
    if entry.kind == "callable":
        if not callable(entry.callable):
            raise ConfigError(f"Entrypoint callable {entry.callable!r} is not callable")
        return Payload(kind="callable", pickled=pickle_callable(entry.callable, entry.args, entry.kwargs, workspace))
    if not entry.command:
        raise ConfigError("Entrypoint binary is empty: use Entrypoint.from_binary('python', ['-m', 'mod'])")
    for i, part in enumerate([entry.command, *entry.command_args]):
        if "\0" in str(part):
            what = "command" if i == 0 else f"argument {i - 1}"
            raise ConfigError(f"Entrypoint binary {what} {part!r} contains a NUL byte, which no process can be "
                              f"given: remove it")
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
        payload=_payload(request, workspace_path),
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

