"""Stand-in for Marin's late-2025 ``fray.job.context``: a context variable for the default
context, ``get_default_job_ctx()`` creating one through this module's ``create_job_ctx("auto")``,
whose own "auto" is a thread context in a process without Ray."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

_job_context: ContextVar = ContextVar("fray_job_context", default=None)


class ThreadContext:
    """Marin's local fallback: every create_actor builds a private in-process object."""

    def __init__(self, max_workers: int = 1):
        self.pool = ThreadPoolExecutor(max_workers=max_workers)

    def create_actor(self, actor_class, *args, name=None, get_if_exists=False, lifetime="non_detached",
                     preemptible=True, **kwargs):
        return actor_class(*args, **kwargs)


@contextmanager
def fray_default_job_ctx(ctx):
    token = _job_context.set(ctx)
    try:
        yield ctx
    finally:
        _job_context.reset(token)


def get_default_job_ctx():
    ctx = _job_context.get()
    return ctx if ctx is not None else create_job_ctx(context_type="auto")


def create_job_ctx(context_type="auto", max_workers=1, **options):
    if context_type in ("auto", "threadpool"):
        return ThreadContext(max_workers=max_workers)
    raise ValueError(f"Unknown context type: {context_type}")
