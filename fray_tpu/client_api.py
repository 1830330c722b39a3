"""The vocabulary of Marin's Fray of 2026 (the Client API): Marin's own when installed, else ours.

``marin-fray`` (import name ``fray``, Python >= 3.12) is recognised by shape, never by the bare
name: ``fray.types.JobRequest`` has ``replicas`` and ``processes_per_task`` and ``fray.actor``
has ``ActorContext``. Without it (Python 3.11, or the extra not installed) this module defines
the same names with the same fields, defaults and semantics, so code written against
``fray.types`` / ``fray.client`` / ``fray.actor`` runs unchanged against ``fray_tpu``:

- ``ResourceConfig.replicas`` counts tasks: ``with_tpu(type, slice_count=N)`` sets
  ``N x vm_count`` (one task per VM); ``JobRequest.replicas`` wins when set.
- ``TpuConfig.chip_count()`` is chips per VM (the late-2025 API counted per slice).
- ``JobStatus``, ``Entrypoint`` and ``EnvironmentConfig`` are the late-2025 ones (unchanged).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from fray_tpu import fray_api, topology


def _marin_modules() -> dict[str, Any] | None:
    try:
        modules = {name: importlib.import_module(f"fray.{name}")
                   for name in ("types", "client", "actor", "current_client")}
    except Exception:  # noqa: BLE001 - absent, or an unrelated package named fray
        return None
    request = getattr(modules["types"], "JobRequest", None)
    names = {f.name for f in fields(request)} if request is not None and hasattr(request, "__dataclass_fields__") else set()
    if {"replicas", "processes_per_task"} <= names and hasattr(modules["actor"], "ActorContext") \
            and hasattr(modules["current_client"], "set_current_client"):
        return modules
    return None


_MARIN = _marin_modules()
USING_MARIN_FRAY = _MARIN is not None
ANY_REGION = "*"

if _MARIN is not None:
    _types, _client, _actor, _current = (_MARIN[n] for n in ("types", "client", "actor", "current_client"))
    CpuConfig = _types.CpuConfig
    TpuConfig = _types.TpuConfig
    ResourceConfig = _types.ResourceConfig
    ActorConfig = _types.ActorConfig
    EnvironmentConfig = _types.EnvironmentConfig
    create_environment = _types.create_environment
    Entrypoint = _types.Entrypoint
    CallableEntrypoint = _types.CallableEntrypoint
    BinaryEntrypoint = _types.BinaryEntrypoint
    JobRequest = _types.JobRequest
    JobStatus = _types.JobStatus
    JobFailed = _client.JobFailed
    JobAlreadyExists = _client.JobAlreadyExists
    wait_all = _client.wait_all
    ActorUnavailableError = _actor.ActorUnavailableError
    ActorContext = _actor.ActorContext
    HostedActor = _actor.HostedActor
    current_actor = _actor.current_actor
    set_current_actor = _actor._set_current_actor
    reset_current_actor = _actor._reset_current_actor
    set_current_client = _current.set_current_client

    def explicit_client() -> Any:
        """The client set with ``set_current_client`` in this context, or None."""
        return _current._current_client_var.get()
else:
    CpuConfig = fray_api.CpuConfig
    EnvironmentConfig = fray_api.EnvironmentConfig
    create_environment = fray_api.create_environment
    Entrypoint = fray_api.Entrypoint
    CallableEntrypoint = fray_api.CallableEntrypoint
    BinaryEntrypoint = fray_api.BinaryEntrypoint
    JobStatus = fray_api.JobStatus

    @dataclass(frozen=True)
    class TpuConfig:  # type: ignore[no-redef]
        """A TPU slice type; ``chip_count()`` is chips per VM (per task), as in Marin's 2026 types."""

        variant: str
        kind: str = "tpu"
        topology: str | None = None

        def chip_count(self) -> int:
            return topology.get_tpu_topology(self.variant).chips_per_vm

        def vm_count(self) -> int:
            return topology.get_tpu_topology(self.variant).vm_count

    @dataclass
    class ResourceConfig:  # type: ignore[no-redef]
        """Per-task resources; ``replicas`` counts tasks (``with_tpu`` sets slices x VMs)."""

        cpu: float = 1
        ram: str = "4g"
        disk: str = "16g"
        device: Any = field(default_factory=CpuConfig)
        preemptible: bool = True
        regions: Sequence[str] | None = None
        zone: str | None = None
        target_cluster: str | None = None
        replicas: int = 1
        device_alternatives: Sequence[str] | None = None
        image: str | None = None

        def chip_count(self) -> int:
            return self.device.chip_count() * self.replicas

        @staticmethod
        def with_tpu(tpu_type: str | Sequence[str], *, slice_count: int = 1, **kwargs: Any) -> ResourceConfig:
            types = [tpu_type] if isinstance(tpu_type, str) else list(tpu_type)
            if not types:
                raise ValueError("with_tpu needs at least one TPU type, e.g. with_tpu('v5litepod-16')")
            shapes = [topology.get_tpu_topology(t) for t in types]
            if len({(s.vm_count, s.chips_per_vm) for s in shapes}) != 1:
                raise ValueError(f"TPU types {types} do not share vm_count and chips_per_vm: list only "
                                 f"interchangeable types")
            kwargs.setdefault("disk", "50g")
            return ResourceConfig(device=TpuConfig(variant=types[0]), replicas=slice_count * shapes[0].vm_count,
                                  device_alternatives=types[1:] or None, **kwargs)

        @staticmethod
        def with_cpu(**kwargs: Any) -> ResourceConfig:
            return ResourceConfig(device=CpuConfig(), **kwargs)

    @dataclass
    class ActorConfig:  # type: ignore[no-redef]
        max_concurrency: int = 1
        max_restarts: int | None = None
        max_task_retries: int | None = None
        priority: int = 0

    @dataclass
    class JobRequest:  # type: ignore[no-redef]
        name: str
        entrypoint: Any
        resources: Any = field(default_factory=ResourceConfig)
        environment: Any = None
        replicas: int | None = None
        processes_per_task: int = 1
        max_retries_failure: int = 0
        max_retries_preemption: int = 100
        max_task_failures: int = 0
        priority: int = 0
        timeout: Any = None  # seconds, or anything with to_seconds() (Marin's Duration)

        def __post_init__(self) -> None:
            if " " in self.name:
                raise ValueError(f"Job name {self.name!r} must not contain spaces")
            if self.replicas is None:
                self.replicas = self.resources.replicas

    class JobFailed(RuntimeError):  # type: ignore[no-redef]
        def __init__(self, job_id: str, status: Any):
            self.job_id = job_id
            self.failed_status = status
            super().__init__(f"Job {job_id} finished with status {status}")

    class JobAlreadyExists(RuntimeError):  # type: ignore[no-redef]
        def __init__(self, job_name: str, handle: Any = None):
            self.job_name = job_name
            self.handle = handle
            super().__init__(f"Job {job_name} already exists")

    def wait_all(jobs: Sequence[Any], *, timeout: float | None = None, raise_on_failure: bool = True) -> list:
        """Wait for every handle, polling ``status()`` with backoff (0.05 s up to 2 s)."""
        results: list = [None] * len(jobs)
        remaining = set(range(len(jobs)))
        start, delay = time.monotonic(), 0.05
        while remaining:
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"wait_all timed out after {timeout}s with {len(remaining)} job(s) unfinished")
            for i in sorted(remaining):
                status = jobs[i].status()
                if JobStatus.finished(status):
                    results[i] = status
                    remaining.discard(i)
                    if raise_on_failure and status in (JobStatus.FAILED, JobStatus.STOPPED):
                        raise JobFailed(jobs[i].job_id, status)
            if remaining:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return results

    class ActorUnavailableError(RuntimeError):  # type: ignore[no-redef]
        """The actor is gone, restarting, or unknown."""

    @dataclass(frozen=True)
    class ActorContext:  # type: ignore[no-redef]
        handle: Any
        index: int
        group_name: str
        shutdown_event: threading.Event | None = None
        _errors: list = field(default_factory=list, repr=False)

        def fail(self, exc: BaseException) -> None:
            self._errors.append(exc)
            if self.shutdown_event is not None:
                self.shutdown_event.set()

    class HostedActor:  # type: ignore[no-redef]
        def __init__(self, handle: Any, stop: Any = None):
            self.handle = handle
            self._stop = stop

        def shutdown(self) -> None:
            if self._stop is not None:
                self._stop()
                self._stop = None

    _actor_var: contextvars.ContextVar = contextvars.ContextVar("fray_tpu_actor_context", default=None)

    def current_actor() -> Any:
        ctx = _actor_var.get()
        if ctx is None:
            raise RuntimeError("current_actor() called outside of an actor's __init__")
        return ctx

    def set_current_actor(ctx: Any) -> Any:
        return _actor_var.set(ctx)

    def reset_current_actor(token: Any) -> None:
        _actor_var.reset(token)

    _client_var: contextvars.ContextVar = contextvars.ContextVar("fray_tpu_current_client", default=None)

    @contextlib.contextmanager
    def set_current_client(client: Any) -> Generator[Any, None, None]:
        token = _client_var.set(client)
        try:
            yield client
        finally:
            _client_var.reset(token)

    def explicit_client() -> Any:
        return _client_var.get()


def timeout_seconds(timeout: Any) -> float | None:
    """``JobRequest.timeout`` as seconds: None, a number, or Marin's ``Duration``."""
    if timeout is None:
        return None
    if hasattr(timeout, "to_seconds"):
        return float(timeout.to_seconds())
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        return float(timeout)
    raise ValueError(f"JobRequest.timeout={timeout!r} is neither seconds nor a Duration")


def as_status(value: str) -> Any:
    """A status string (either generation's enum) as this vocabulary's ``JobStatus``."""
    return JobStatus(str(value))
