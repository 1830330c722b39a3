"""Callables and actor classes that run inside jobs and actors of the Client API tests.

Shipped by value (the hosts and job processes cannot import ``tests/``). Waits inside them are
bounded loops with a deadline.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 90.0


def succeed() -> None:
    print("hello from the job", flush=True)


def fail_with_key_error() -> None:
    raise KeyError("intentional failure")


def block(seconds: float = DEADLINE) -> None:
    threading.Event().wait(seconds)


def print_lines(count: int) -> None:
    for i in range(count):
        print(f"line {i}", flush=True)
    sys.stdout.buffer.write(b"raw \xff\xfe bytes\rprogress 50%\rprogress 100%\n")
    sys.stdout.flush()


def write_env(path: str) -> None:
    with open(f"{path}.{os.environ['FRAY_REPLICA_ID']}", "w") as f:
        f.write(os.environ["FRAY_REPLICA_COUNT"])


def increment(handle, times: int) -> None:
    for _ in range(times):
        handle.incr()


def submit_child_from_thread() -> None:
    """current_client() in a thread the job starts, and a nested submit from there."""
    from fray_tpu.client import TpuClient
    from fray_tpu.client_api import Entrypoint, JobRequest
    from fray_tpu.client import current_client

    result: list = []

    def run() -> None:
        client = current_client()
        handle = client.submit(JobRequest(name="grandchild", entrypoint=Entrypoint.from_callable(succeed)))
        result.append((isinstance(client, TpuClient), str(handle.wait())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(DEADLINE)
    print(f"thread result {result}", flush=True)
    assert result == [(True, "succeeded")], result


def submit_blocking_child_and_return(marker: str) -> None:
    from fray_tpu.client_api import Entrypoint, JobRequest
    from fray_tpu.client import current_client

    child = current_client().submit(JobRequest(name="orphan", entrypoint=Entrypoint.from_callable(block)))
    print(f"child {child.job_id}", flush=True)
    deadline = time.monotonic() + DEADLINE
    while child.status() != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(marker, "w") as f:
        f.write(child.job_id)


class Counter:
    def __init__(self, start: int = 0, *, step: int = 1):
        self.value = start
        self.step = step

    def incr(self, by: int | None = None) -> int:
        current = self.value
        time.sleep(0.001)  # widens the window a concurrent call would need to lose an update
        self.value = current + (self.step if by is None else by)
        return self.value

    def get(self) -> int:
        return self.value

    def explode(self) -> None:
        raise ValueError("method failed on purpose")


class Introspective:
    """Records what current_actor() said during __init__."""

    def __init__(self):
        from fray_tpu.client_api import current_actor

        ctx = current_actor()
        self.seen = (ctx.index, ctx.group_name, ctx.handle.endpoint)
        self.pid = os.getpid()

    def describe(self):
        return self.seen, self.pid


class FailsOnRequest:
    """``crash()`` makes the member fail via ctx.fail(); its replacement starts from scratch."""

    def __init__(self):
        from fray_tpu.client_api import current_actor

        self.ctx = current_actor()
        self.calls = 0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def crash(self) -> None:
        self.ctx.fail(RuntimeError("asked to fail"))


class BrokenConstructor:
    def __init__(self):
        raise ZeroDivisionError("constructor failed on purpose")


def call_actor_from_actor(handle) -> int:
    return handle.incr(100)


class Relay:
    """An actor that calls another actor through a handle it was given."""

    def __init__(self, target):
        self.target = target

    def forward(self) -> int:
        return self.target.incr(1000)


def tpu_task_calls_actor(handle, out_dir: str) -> None:
    """Every TPU host calls the actor and records what it saw."""
    import json

    value = handle.incr()
    index = os.environ["FRAY_TASK_INDEX"]
    with open(os.path.join(out_dir, f"task-{index}.json"), "w") as f:
        json.dump({"value": value, "slices": os.environ.get("MEGASCALE_NUM_SLICES"),
                   "host_ip": os.environ.get("FRAY_TPU_HOST_IP")}, f)


def fail_on_tpu() -> None:
    if os.environ["FRAY_TASK_INDEX"] == "1":
        raise KeyError("intentional failure on a TPU host")
    threading.Event().wait(DEADLINE)


class HostInfo:
    def __init__(self):
        from fray_tpu.client_api import current_actor

        self.index = current_actor().index

    def where(self):
        return self.index, os.environ.get("FRAY_TPU_HOST_IP"), os.getpid()


def share_named_counter(use_marin_module: bool, times: int, expected_total: int) -> None:
    """The late-2025 pattern: each job asks its job context for the actor by name."""
    if use_marin_module:
        from fray.job import get_default_job_ctx
    else:
        from fray_tpu.job_context import get_default_job_ctx

    ctx = get_default_job_ctx()
    counter = ctx.create_actor(Counter, name="shared-by-name", get_if_exists=True, preemptible=False)
    for _ in range(times):
        ctx.get(counter.incr.remote())
    deadline = time.monotonic() + DEADLINE
    while counter.get() < expected_total and time.monotonic() < deadline:
        time.sleep(0.05)
    total = counter.get()
    print(f"context {type(ctx).__name__} endpoint {counter.endpoint} total {total}", flush=True)
    assert total == expected_total, total


def thread_context_basics() -> None:
    from fray_tpu.job_context import get_default_job_ctx

    ctx = get_default_job_ctx()
    futures = [ctx.run(pow, 2, n) for n in range(4)]
    ready, _ = ctx.wait(futures, num_returns=4)
    assert len(ready) == 4
    assert ctx.get(futures) == [1, 2, 4, 8]
    assert ctx.get(ctx.put("x")) == "x"


class Waiter:
    def wait(self, timeout: float) -> float:
        """A method whose own keyword is named ``timeout``."""
        return timeout


class FailsAtIndexOne:
    def __init__(self):
        from fray_tpu.client_api import current_actor

        if current_actor().index == 1:
            raise LookupError("member 1 cannot start")

    def ok(self) -> bool:
        return True


def create_named_and_return(value: int) -> None:
    from fray_tpu.job_context import get_default_job_ctx

    counter = get_default_job_ctx().create_actor(Counter, value, name="owned-by-a-job", get_if_exists=True)
    print(f"value {counter.get()}", flush=True)
