"""The Fray cluster contract (../shared/fray-api.md): Marin's types when present, ours otherwise.

Marin's ``fray`` is not on the package registry, and an unrelated project owns the name there,
so Marin's fray is recognised by its shape (``fray.cluster.base.Cluster`` is an abstract class
with ``launch``), never by the bare name. When it is present its data types are re-exported, so
objects built by Marin code and by fray-tpu are the same classes. Otherwise this module defines
the same surface itself, accepting every field spelling Marin used in December 2025 (S2..S5).

The backend never reads those objects directly: it goes through the normalisers at the end
(``tpu_type_of``, ``normalize_entrypoint``, ``resolved_environment``, ``slice_count_of``,
``validate_request``), which work by duck typing on any generation of the types. Choosing and
building a cluster is ``fray_tpu.backend``'s.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import Any, Literal, NewType, Self

from fray_tpu import topology as _topology
from fray_tpu.errors import ConfigError, DeadlineExceeded

logger = logging.getLogger(__name__)

WAIT_INITIAL_DELAY_S = 0.1
WAIT_MAX_DELAY_S = 10.0


def find_marin_fray_base(import_module: Callable[[str], ModuleType] = importlib.import_module) -> ModuleType | None:
    """Marin's ``fray.cluster.base`` if it is importable and has the right shape, else None.

    Any failure while importing counts as absent: an unrelated package named ``fray`` may raise
    anything at import time, and must not break fray-tpu.
    """
    try:
        base = import_module("fray.cluster.base")
    except Exception:  # noqa: BLE001 - an unrelated `fray` may fail in any way
        return None
    return base if is_marin_fray_base(base) else None


def is_marin_fray_base(base: ModuleType | None) -> bool:
    """Marin's fray is recognised by shape, never by the bare name ``fray``: its
    ``fray.cluster.base.Cluster`` is an ABC whose abstract methods include ``launch``."""
    cluster = getattr(base, "Cluster", None)
    return (inspect.isclass(cluster) and inspect.isabstract(cluster)
            and "launch" in getattr(cluster, "__abstractmethods__", ()))


_marin_base = find_marin_fray_base()
USING_MARIN_FRAY: bool = _marin_base is not None


# --------------------------------------------------------------------------------------------
# Our definitions (used where Marin's fray is absent, or lacks a name)
# --------------------------------------------------------------------------------------------

JobId = NewType("JobId", str)

_TOPOLOGY_SHAPE = re.compile(r"^\d+(x\d+)+$")


@dataclass(frozen=True)
class TpuTopologyInfo:
    """Marin's view of a slice shape. ``host_count`` equals ``vm_count`` here: what a launcher
    needs is VMs (one agent and one JAX process each)."""

    name: str
    chip_count: int
    host_count: int
    vm_count: int
    chips_per_vm: int


@dataclass(frozen=True)
class CpuConfig:
    """CPU-only device. S2..S4 ``CpuConfig()``; S5 adds ``kind`` and ``variant``."""

    kind: str = "cpu"
    variant: str = "cpu"

    def chip_count(self) -> int:
        return 0


@dataclass(frozen=True)
class GpuConfig:
    """GPU device: ``GpuConfig(type=...)`` (S2..S4) or ``GpuConfig(variant=..., kind="gpu")`` (S5)."""

    variant: str | None = None
    kind: Any = "gpu"
    count: int = 1
    type: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kind, int) and not isinstance(self.kind, bool):
            # S2 positional spelling GpuConfig("H100", 2): the second argument is the count.
            object.__setattr__(self, "count", self.kind)
            object.__setattr__(self, "kind", "gpu")
        if self.kind != "gpu":
            raise ValueError(f"GpuConfig kind must be 'gpu', got {self.kind!r}")
        gpu = self.variant or self.type or "auto"
        object.__setattr__(self, "variant", gpu)
        object.__setattr__(self, "type", gpu)

    def chip_count(self) -> int:
        return self.count


@dataclass(frozen=True)
class TpuConfig:
    """One TPU slice type: ``TpuConfig(type="v5litepod-16")`` (S2..S4) or
    ``TpuConfig(variant="v5litepod-16", kind="tpu")`` (S5). Both attributes hold the slice type."""

    variant: str | None = None
    kind: str = "tpu"
    topology: str | None = None
    type: str | None = None

    def __post_init__(self) -> None:
        if self.kind != "tpu":
            if _TOPOLOGY_SHAPE.match(str(self.kind)) and self.topology is None:
                # S2 positional spelling TpuConfig("v4-8", "2x2x1"): the second argument is the topology.
                object.__setattr__(self, "topology", self.kind)
                object.__setattr__(self, "kind", "tpu")
            else:
                raise ValueError(f"TpuConfig kind must be 'tpu', got {self.kind!r}")
        slice_type = self.variant if self.variant is not None else self.type
        if not slice_type:
            raise ValueError("TpuConfig needs the slice type, e.g. TpuConfig(variant='v5litepod-16')")
        object.__setattr__(self, "variant", slice_type)
        object.__setattr__(self, "type", slice_type)

    def chip_count(self) -> int:
        """Chips of ONE slice."""
        return _topology.get_tpu_topology(self.variant).chip_count

    def vm_count(self) -> int:
        """VMs (hosts) of ONE slice."""
        return _topology.get_tpu_topology(self.variant).vm_count


DeviceConfig = CpuConfig | GpuConfig | TpuConfig


@dataclass
class ResourceConfig:
    """What one job needs. For a TPU device, ``replicas`` is the number of slices."""

    cpu: int = 1
    ram: str = "128m"
    disk: str = "1g"
    device: Any = field(default_factory=CpuConfig)
    replicas: int = 1
    preemptible: bool = True
    regions: Sequence[str] | None = None

    def chip_count(self) -> int:
        """Accelerator chips over all replicas (slices)."""
        return self.device.chip_count() * self.replicas

    @staticmethod
    def with_tpu(tpu_type: str, slice_count: int = 1, **kwargs: Any) -> ResourceConfig:
        return ResourceConfig(device=TpuConfig(variant=tpu_type), replicas=slice_count, **kwargs)

    @staticmethod
    def with_gpu(gpu_type: str = "auto", count: int = 1, **kwargs: Any) -> ResourceConfig:
        return ResourceConfig(device=GpuConfig(variant=gpu_type, count=count), **kwargs)

    @staticmethod
    def with_cpu(**kwargs: Any) -> ResourceConfig:
        return ResourceConfig(device=CpuConfig(), **kwargs)


@dataclass
class EnvironmentConfig:
    """Where and how the job's code runs: exactly one of ``workspace`` / ``docker_image``."""

    workspace: str | None = None
    docker_image: str | None = None
    pip_packages: Sequence[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    extras: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.workspace and self.docker_image:
            raise ValueError("EnvironmentConfig: set workspace or docker_image, not both")
        if not self.workspace and not self.docker_image:
            raise ValueError(
                "EnvironmentConfig: set workspace or docker_image (EnvironmentConfig.create() "
                "defaults workspace to the current directory)"
            )

    @staticmethod
    def create(*args: Any, **kwargs: Any) -> EnvironmentConfig:
        return create_environment(*args, **kwargs)


# Environment variables forwarded from the caller into every job when set.
FORWARDED_ENV_VARS = ("HF_TOKEN", "WANDB_API_KEY")
DEFAULT_ENV_VARS = {"HF_DATASETS_TRUST_REMOTE_CODE": "1", "TOKENIZERS_PARALLELISM": "false"}


def create_environment(
    workspace: str | None = None,
    docker_image: str | None = None,
    pip_packages: Sequence[str] | None = None,
    env_vars: dict[str, str | None] | None = None,
    extras: Sequence[str] | None = None,
) -> EnvironmentConfig:
    """An EnvironmentConfig with Marin's defaults: workspace = current directory, HF/tokenizer
    settings, ``HF_TOKEN``/``WANDB_API_KEY`` forwarded; user ``env_vars`` win; None values drop."""
    if workspace is None and docker_image is None:
        workspace = os.getcwd()
    defaults: dict[str, str | None] = {**DEFAULT_ENV_VARS, **{k: os.environ.get(k) for k in FORWARDED_ENV_VARS}}
    merged = {k: v for k, v in {**defaults, **(env_vars or {})}.items() if v is not None}
    return EnvironmentConfig(
        workspace=workspace,
        docker_image=docker_image,
        pip_packages=list(pip_packages or []),
        env_vars=merged,
        extras=list(extras or []),
    )


@dataclass(frozen=True)
class BinaryEntrypoint:
    command: str
    args: Sequence[str] = field(default_factory=list)


@dataclass(frozen=True)
class CallableEntrypoint:
    callable: Callable[..., Any]
    args: Sequence[Any] = field(default_factory=tuple)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entrypoint:
    """What the job runs. Two generations are accepted:

    - S2/S3 ``Entrypoint(binary=..., args=[...])`` or ``Entrypoint(callable=fn, function_args={...})``;
    - S4+ ``Entrypoint.from_callable(fn, args, kwargs)`` / ``Entrypoint.from_binary(cmd, args)``.

    An S2/S3 entrypoint also gets the equivalent S4 fields filled in, so either spelling reads.
    """

    binary: str | None = None
    args: Sequence[str] = field(default_factory=list)
    callable: Callable[..., Any] | None = None
    function_args: dict[str, Any] | None = None
    callable_entrypoint: CallableEntrypoint | None = None
    binary_entrypoint: BinaryEntrypoint | None = None

    def __post_init__(self) -> None:
        has_callable = self.callable is not None or self.callable_entrypoint is not None
        has_binary = self.binary is not None or self.binary_entrypoint is not None
        if has_callable == has_binary:
            raise ValueError(
                "Entrypoint needs exactly one thing to run: a callable or a binary, got "
                f"{'both' if has_callable else 'neither'} (use Entrypoint.from_callable or Entrypoint.from_binary)"
            )
        if self.args and self.binary is None:
            raise ValueError("Entrypoint: args only go with binary; pass a callable's arguments as function_args")
        if self.function_args is not None:
            if self.callable is None:
                raise ValueError("Entrypoint: function_args only go with callable")
            if not isinstance(self.function_args, dict):
                raise ValueError(
                    f"Entrypoint: function_args must be a dict of keyword arguments, got {type(self.function_args).__name__}"
                )
        if self.callable is not None:
            self._fill("callable_entrypoint", CallableEntrypoint(self.callable, (), dict(self.function_args or {})))
        if self.binary is not None:
            self._fill("binary_entrypoint", BinaryEntrypoint(self.binary, list(self.args)))

    def _fill(self, attribute: str, equivalent: Any) -> None:
        """Set the S4 spelling from the S2 one; both given (e.g. by dataclasses.replace) must agree."""
        present = getattr(self, attribute)
        if present is not None and present != equivalent:
            raise ValueError(f"Entrypoint: {attribute}={present!r} contradicts the S2 fields ({equivalent!r})")
        object.__setattr__(self, attribute, equivalent)

    @staticmethod
    def from_callable(c: Callable[..., Any], args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None) -> Entrypoint:
        return Entrypoint(callable_entrypoint=CallableEntrypoint(callable=c, args=args, kwargs=kwargs or {}))

    @staticmethod
    def from_binary(command: str, args: Sequence[str] = ()) -> Entrypoint:
        return Entrypoint(binary_entrypoint=BinaryEntrypoint(command=command, args=list(args)))


@dataclass
class JobRequest:
    """One job. Names need not be unique, but carry no whitespace."""

    name: str
    entrypoint: Any
    resources: Any = field(default_factory=ResourceConfig)
    environment: Any = None  # None means create_environment() at launch
    max_retries_failure: int = 0
    max_retries_preemption: int = 100

    def __post_init__(self) -> None:
        if any(ch.isspace() for ch in self.name):
            raise ValueError(f"Job name must not contain spaces: {self.name!r} (try {'_'.join(self.name.split())!r})")


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @staticmethod
    def finished(status: str) -> bool:
        return is_finished(status)


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED})


def is_finished(status: str) -> bool:
    """Whether a job (or task) with ``status`` has ended for good."""
    return status in FINISHED_STATUSES


@dataclass
class TaskStatus:
    status: JobStatus
    error_message: str | None = None


@dataclass
class JobInfo:
    job_id: JobId
    status: JobStatus
    tasks: list[TaskStatus]
    name: str
    error_message: str | None = None


# --------------------------------------------------------------------------------------------
# Marin's types take precedence where present
# --------------------------------------------------------------------------------------------

_REEXPORTED = (
    "CpuConfig",
    "GpuConfig",
    "TpuConfig",
    "ResourceConfig",
    "EnvironmentConfig",
    "BinaryEntrypoint",
    "CallableEntrypoint",
    "Entrypoint",
    "JobRequest",
    "JobStatus",
    "TaskStatus",
    "JobInfo",
    "JobId",
    "TpuTopologyInfo",
    "create_environment",
)

if _marin_base is not None:
    globals().update({name: getattr(_marin_base, name) for name in _REEXPORTED if hasattr(_marin_base, name)})
    _BaseCluster: type = _marin_base.Cluster
else:
    _BaseCluster = ABC


def get_tpu_topology(tpu_type: str) -> TpuTopologyInfo:
    """Marin's ``get_tpu_topology`` over fray-tpu's table (unknown types suggest near names)."""
    t = _topology.get_tpu_topology(tpu_type)
    return TpuTopologyInfo(
        name=t.name, chip_count=t.chip_count, host_count=t.vm_count, vm_count=t.vm_count, chips_per_vm=t.chips_per_vm
    )


# --------------------------------------------------------------------------------------------
# The Cluster ABC
# --------------------------------------------------------------------------------------------


def wait_delays() -> Iterator[float]:
    """The polling schedule of ``Cluster.wait``: 0.1 s doubling up to 10 s, then 10 s forever."""
    delay = WAIT_INITIAL_DELAY_S
    while True:
        yield delay
        delay = min(delay * 2, WAIT_MAX_DELAY_S)


def _is_failure(status: str) -> bool:
    return status in (JobStatus.FAILED, JobStatus.STOPPED)


class Cluster(_BaseCluster):  # type: ignore[misc, valid-type]
    """A place that runs jobs. Subclasses implement launch/poll/monitor/terminate/list_jobs."""

    @abstractmethod
    def launch(self, request: JobRequest) -> JobId:
        """Validate, record, start in the background, return at once."""

    @abstractmethod
    def poll(self, job_id: JobId) -> JobInfo:
        """Current state; an unknown id raises KeyError."""

    @abstractmethod
    def monitor(self, job_id: JobId) -> JobInfo:
        """Block until finished, forwarding output lines to logging; return the final JobInfo."""

    @abstractmethod
    def terminate(self, job_id: JobId) -> None:
        """Stop the job promptly; an unknown id raises KeyError."""

    @abstractmethod
    def list_jobs(self) -> list[JobInfo]:
        """Every job this cluster knows."""

    @contextlib.contextmanager
    def connect(self) -> Iterator[Self]:
        """Older Marin revisions declare ``connect``; there is nothing to connect to."""
        yield self

    def wait(
        self,
        job_id: JobId | Sequence[JobId],
        raise_on_failure: bool = False,
        timeout: float | None = None,
    ) -> JobInfo | list[JobInfo]:
        """Block until the job (or every job of a list) finishes; return its final JobInfo(s).

        With ``raise_on_failure``, a failed or stopped job raises one RuntimeError naming every
        such job (a list is waited for in full first). ``timeout`` (seconds, default none:
        training runs take days) raises DeadlineExceeded naming the unfinished jobs.
        """
        single = isinstance(job_id, str)
        job_ids: list[JobId] = [job_id] if single else list(job_id)  # type: ignore[list-item]
        deadline = None if timeout is None else time.monotonic() + timeout
        final: dict[JobId, JobInfo] = {}
        delays = wait_delays()
        while True:
            for jid in job_ids:
                if jid not in final:
                    info = self.poll(jid)
                    if JobStatus.finished(info.status):
                        logger.info("Job %s finished with status %s", jid, info.status)
                        final[jid] = info
            if len(final) == len(job_ids):
                break
            delay = next(delays)
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pending = [jid for jid in job_ids if jid not in final]
                    raise DeadlineExceeded(f"Waited {timeout} s for jobs {pending} to finish; they are still running")
                delay = min(delay, remaining)
            time.sleep(delay)
        results = [final[jid] for jid in job_ids]
        if raise_on_failure:
            failed = [info for info in results if _is_failure(info.status)]
            if failed:
                detail = "; ".join(f"{info.job_id} ({info.name}) {info.status}: {info.error_message}" for info in failed)
                raise RuntimeError(f"{len(failed)} of {len(results)} job(s) failed: {detail}")
        return results[0] if single else results


# --------------------------------------------------------------------------------------------
# Normalisers: read any generation of the types (ours or Marin's) by duck typing
# --------------------------------------------------------------------------------------------

DeviceKind = Literal["cpu", "gpu", "tpu"]


def device_kind(device: Any) -> DeviceKind:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for any generation's device config."""
    kind = getattr(device, "kind", None)
    if kind in ("cpu", "gpu", "tpu"):
        return kind
    class_name = type(device).__name__.lower()
    for candidate in ("tpu", "gpu", "cpu"):
        if class_name.startswith(candidate):
            return candidate  # type: ignore[return-value]
    raise ConfigError(f"Unrecognised device config {device!r}: use CpuConfig(), GpuConfig(...) or TpuConfig(...)")


def tpu_type_of(device: Any) -> str | None:
    """The slice type of a TPU device config (``variant`` if present, else ``type``); None for
    CPU and GPU devices."""
    if device is None or device_kind(device) != "tpu":
        return None
    for attribute in ("variant", "type"):
        value = getattr(device, attribute, None)
        if isinstance(value, str) and value and value != "tpu":
            return value
    raise ConfigError(f"TPU device config {device!r} names no slice type: use TpuConfig(variant='v5litepod-16')")


def slice_count_of(resources: Any) -> int:
    """Slices a TPU request asks for: ``ResourceConfig.replicas``.

    Marin revisions after December 2025 (recognised by ``device_alternatives``) count replicas
    per VM instead (``with_tpu`` multiplies by the VM count); those are converted back.
    """
    replicas = int(getattr(resources, "replicas", 1) or 1)
    tpu_type = tpu_type_of(getattr(resources, "device", None))
    if tpu_type is not None and hasattr(resources, "device_alternatives"):
        vms = _topology.get_tpu_topology(tpu_type).vm_count
        if replicas % vms == 0:
            return replicas // vms
    return replicas


@dataclass(frozen=True)
class NormalizedEntrypoint:
    """One shape for every Entrypoint spelling: a callable with args/kwargs, or a command."""

    kind: Literal["callable", "binary"]
    callable: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    command: str | None = None
    command_args: tuple[str, ...] = ()


def normalize_entrypoint(entrypoint: Any) -> NormalizedEntrypoint:
    callable_entrypoint = getattr(entrypoint, "callable_entrypoint", None)
    if callable_entrypoint is not None:
        return NormalizedEntrypoint(
            kind="callable",
            callable=callable_entrypoint.callable,
            args=tuple(getattr(callable_entrypoint, "args", ()) or ()),
            kwargs=dict(getattr(callable_entrypoint, "kwargs", None) or {}),
        )
    binary_entrypoint = getattr(entrypoint, "binary_entrypoint", None)
    if binary_entrypoint is not None:
        return NormalizedEntrypoint(
            kind="binary",
            command=binary_entrypoint.command,
            command_args=tuple(str(a) for a in (getattr(binary_entrypoint, "args", ()) or ())),
        )
    if getattr(entrypoint, "callable", None) is not None:
        return NormalizedEntrypoint(
            kind="callable",
            callable=entrypoint.callable,
            kwargs=dict(getattr(entrypoint, "function_args", None) or {}),
        )
    if getattr(entrypoint, "binary", None) is not None:
        return NormalizedEntrypoint(
            kind="binary",
            command=entrypoint.binary,
            command_args=tuple(str(a) for a in (getattr(entrypoint, "args", ()) or ())),
        )
    raise ConfigError(
        f"Entrypoint {entrypoint!r} has nothing to run: use Entrypoint.from_callable(fn) or Entrypoint.from_binary(cmd, args)"
    )


def entrypoint_parts(entrypoint: Any) -> tuple[str, Any, tuple[Any, ...], dict[str, Any]]:
    """``(kind, callable_or_command, args, kwargs)``; a binary has empty kwargs."""
    n = normalize_entrypoint(entrypoint)
    if n.kind == "callable":
        return n.kind, n.callable, n.args, n.kwargs
    return n.kind, n.command, n.command_args, {}


def resolved_environment(request: Any) -> Any:
    """The request's environment; None means ``create_environment()`` (Marin's rule)."""
    environment = getattr(request, "environment", None)
    return environment if environment is not None else create_environment()


def validate_request(request: Any) -> None:
    """Reject, before anything is provisioned, what no backend could run: raises ConfigError."""
    name = getattr(request, "name", None)
    if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
        raise ConfigError(f"Job name {name!r} must be a non-empty string without spaces")
    normalize_entrypoint(request.entrypoint)
    resources = request.resources
    replicas = getattr(resources, "replicas", 1)
    if not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"ResourceConfig.replicas must be an integer >= 1, got {replicas!r}")
    tpu_type = tpu_type_of(getattr(resources, "device", None))
    if tpu_type is not None:
        _topology.get_tpu_topology(tpu_type)
    for budget in ("max_retries_failure", "max_retries_preemption"):
        value = getattr(request, budget, 0)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"JobRequest.{budget} must be an integer >= 0, got {value!r}")
    regions = getattr(resources, "regions", None)
    if isinstance(regions, str):
        raise ConfigError(f"ResourceConfig.regions must be a list, got the string {regions!r}: write [{regions!r}]")


__all__ = [
    "USING_MARIN_FRAY",
    "BinaryEntrypoint",
    "CallableEntrypoint",
    "Cluster",
    "CpuConfig",
    "DeviceConfig",
    "DeviceKind",
    "Entrypoint",
    "EnvironmentConfig",
    "GpuConfig",
    "JobId",
    "JobInfo",
    "JobRequest",
    "JobStatus",
    "NormalizedEntrypoint",
    "ResourceConfig",
    "TaskStatus",
    "TpuConfig",
    "TpuTopologyInfo",
    "create_environment",
    "device_kind",
    "entrypoint_parts",
    "FINISHED_STATUSES",
    "find_marin_fray_base",
    "is_finished",
    "is_marin_fray_base",
    "get_tpu_topology",
    "normalize_entrypoint",
    "resolved_environment",
    "slice_count_of",
    "tpu_type_of",
    "validate_request",
    "wait_delays",
]
