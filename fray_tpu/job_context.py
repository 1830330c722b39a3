"""The late-2025 job context (Marin's ``fray.job``) inside fray-tpu jobs.

``run``/``put``/``get``/``wait`` stay on the host (a thread pool, as Marin's thread context).
``create_actor(cls, ..., name=..., get_if_exists=True, preemptible=False)`` goes to the
controller's actor runtime (``fray_tpu.actors``): every job of the controller that asks for the
same name gets the same actor, served as its own process on the controller machine (never on a
preemptible TPU VM). ``lifetime="detached"`` keeps it for the controller's life; otherwise it
ends with the job that created it, as Ray's owned actors do.

When Marin's ``fray.job`` is importable, ``create_job_ctx("auto")`` (and so
``get_default_job_ctx()``) returns this context inside fray-tpu tasks (``fray_tpu.backend_hook``);
without it, ``fray_tpu.job_context.get_default_job_ctx()`` is the equivalent.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from types import ModuleType
from typing import Any

from fray_tpu.actors import link as links
from fray_tpu.client_api import ActorConfig, ResourceConfig

DEFAULT_READY_TIMEOUT = 300.0


class TpuJobContext:
    def __init__(self, max_workers: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, os.cpu_count() or 1)),
                                        thread_name_prefix="fray-job-ctx")

    def put(self, obj: Any) -> Any:
        return obj

    def get(self, ref: Any) -> Any:
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        return ref.result() if isinstance(ref, Future) else ref

    def run(self, fn: Callable, *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def wait(self, futures: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        pending = set(futures)
        done: set = {f for f in pending if f.done()}
        while len(done) < min(num_returns, len(futures)) and pending - done:
            finished, _ = wait_futures(pending - done, timeout=timeout, return_when=FIRST_COMPLETED)
            if not finished:
                break
            done |= finished
        ready = [f for f in futures if f in done][:num_returns]
        return ready, [f for f in futures if f not in ready]

    def create_actor(self, actor_class: type, *args: Any, name: str | None = None, get_if_exists: bool = False,
                     lifetime: str = "non_detached", preemptible: bool = True, num_cpus: float | None = None,
                     max_restarts: int | None = None, **kwargs: Any) -> Any:
        from fray_tpu.client import TpuActorGroup, TpuClient

        owner = None if lifetime == "detached" else links.own_submission()
        config = ActorConfig(max_restarts=max_restarts)
        resources = ResourceConfig(cpu=num_cpus if num_cpus is not None else 1, preemptible=preemptible)
        if name is None:
            return TpuClient.attach().create_actor(actor_class, *args, name=actor_class.__name__.lower(),
                                                   resources=resources, actor_config=config, **kwargs)
        group_id, _ = links.process_link().call(
            "named_actor", name, actor_class, args, kwargs, resources=resources, actor_config=config,
            get_if_exists=get_if_exists, owner=owner)
        return TpuActorGroup(group_id, name, 1).wait_ready(timeout=DEFAULT_READY_TIMEOUT)[0]


_context: contextvars.ContextVar[TpuJobContext | None] = contextvars.ContextVar("fray_tpu_job_ctx", default=None)
_process_context: TpuJobContext | None = None


def create_job_ctx(context_type: str = "auto", max_workers: int = 1, **options: Any) -> TpuJobContext:
    if context_type not in ("auto", "threadpool"):
        raise ValueError(f"fray-tpu's job context is 'auto' (threads on the host, actors on the controller); "
                         f"got {context_type!r}")
    return TpuJobContext(max_workers=max_workers)


def get_default_job_ctx() -> TpuJobContext:
    global _process_context
    ctx = _context.get()
    if ctx is not None:
        return ctx
    if _process_context is None:
        _process_context = create_job_ctx()
    return _process_context


def looks_like_marin_job_context(module: ModuleType) -> bool:
    return all(callable(getattr(module, name, None))
               for name in ("create_job_ctx", "get_default_job_ctx", "fray_default_job_ctx"))


def patch_marin_job_context(module: ModuleType) -> None:
    """Inside a fray-tpu task, Marin's ``create_job_ctx("auto")`` returns a ``TpuJobContext``;
    every other context type, and every process outside fray-tpu, resolves as before."""
    marin_create = getattr(module, "create_job_ctx", None)
    if not looks_like_marin_job_context(module) or getattr(marin_create, "_fray_tpu_hooked", False):
        return

    def create(context_type: str = "auto", max_workers: int = 1, *args: Any, **options: Any) -> Any:
        if context_type == "auto" and links.in_task() and os.environ.get("FRAY_BACKEND") == "tpu":
            return TpuJobContext(max_workers=max_workers)
        return marin_create(context_type, max_workers, *args, **options)

    create._fray_tpu_hooked = True
    create.__doc__ = marin_create.__doc__
    module.create_job_ctx = create
