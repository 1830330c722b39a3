"""Waits with deadlines and fault scenarios on top of the emulator's control surface.

``control`` is an ``EmulatorControl`` (emulator process) or a ``Control`` (in-process emulator).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.api_core import exceptions
from google.cloud import tpu_v2

from fray_tpu.errors import DeadlineExceeded

from .client import polling

T = TypeVar("T")
POLL_INTERVAL_SECONDS = 0.02
DEFAULT_TIMEOUT_SECONDS = 20.0
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def wait_for(condition: Callable[[], T], what: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> T:
    """Poll ``condition`` until it returns a truthy value; raise naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"waited {timeout}s for {what}; last observed: {last!r}")
        pause.wait(POLL_INTERVAL_SECONDS)


def run_to_end(cluster, job_id: str, timeout: float):
    """Wait until the job has finished and released its slices; its final ``JobInfo``."""
    from fray_tpu.fray_api import JobStatus

    info = wait_for(lambda: (i := cluster.poll(job_id)) and JobStatus.finished(i.status) and i,
                    f"job {job_id} to finish", timeout)
    cluster.wait_released(job_id, timeout=timeout)
    return info


def location(project: str, zone: str) -> str:
    return f"projects/{project}/locations/{zone}"


def node_spec(
    accelerator_type: str,
    startup_script: str | None = None,
    labels: dict[str, str] | None = None,
    runtime_version: str | None = None,
    spot: bool = False,
    metadata: dict[str, str] | None = None,
) -> tpu_v2.Node:
    """A Node to create, with the generation's default runtime version."""
    values = dict(metadata or {})
    if startup_script is not None:
        values["startup-script"] = startup_script
    return tpu_v2.Node(
        accelerator_type=accelerator_type,
        runtime_version=runtime_version or RUNTIME_VERSIONS[accelerator_type.rsplit("-", 1)[0]],
        labels=labels or {},
        metadata=values,
        scheduling_config=tpu_v2.SchedulingConfig(spot=spot),
    )


def create_node(client: tpu_v2.TpuClient, parent: str, node_id: str, node: tpu_v2.Node, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> tpu_v2.Node:
    """Create and wait for the operation's result (the node as it became READY)."""
    return client.create_node(parent=parent, node_id=node_id, node=node, timeout=timeout).result(
        timeout=timeout, polling=polling(timeout)
    )


def delete_node(client: tpu_v2.TpuClient, name: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Delete and wait until the node is gone."""
    client.delete_node(name=name, timeout=timeout).result(timeout=timeout, polling=polling(timeout))


def node_state(client: tpu_v2.TpuClient, name: str) -> str:
    """The node's state name, or "GONE"."""
    try:
        return client.get_node(name=name, timeout=10).state.name
    except exceptions.NotFound:
        return "GONE"


def wait_node_state(client: tpu_v2.TpuClient, name: str, state: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    return wait_for(lambda: node_state(client, name) == state and state, f"node {name} to be {state}", timeout)


def queued_resource_state(client: tpu_v2.TpuClient, name: str) -> str:
    try:
        return client.get_queued_resource(name=name, timeout=10).state.state.name
    except exceptions.NotFound:
        return "GONE"


def wait_queued_resource_state(client, name: str, state: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    return wait_for(
        lambda: queued_resource_state(client, name) == state and state, f"queued resource {name} to be {state}", timeout
    )


def wait_hosts(control, node: str, predicate: Callable[[list[dict]], bool], what: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> list[dict]:
    def hosts_if_ready():
        try:
            hosts = control.hosts(node)
        except ValueError:
            return None
        return hosts if predicate(hosts) else None

    return wait_for(hosts_if_ready, f"hosts of {node}: {what}", timeout)


# -- fault scenarios: each undoes itself on exit -------------------------------------------


@contextlib.contextmanager
def stocked_out(control, zone: str, count: int | None = None, delay: float | None = None) -> Iterator[None]:
    """Creates in ``zone`` fail with code 8 on their operation while inside."""
    control.stockout(zone, count=count, delay=delay)
    try:
        yield
    finally:
        control.clear_stockout(zone)


@contextlib.contextmanager
def held_in_creating(control, pattern: str) -> Iterator[None]:
    """Nodes / queued resources matching ``pattern`` stay CREATING / WAITING_FOR_RESOURCES while inside."""
    control.hold_creating(pattern)
    try:
        yield
    finally:
        control.release(pattern)


@contextlib.contextmanager
def operations_never_finish(control) -> Iterator[None]:
    control.never_finish_operations(True)
    try:
        yield
    finally:
        control.never_finish_operations(False)


def error_burst(control, method: str, code: int | str = 429, count: int = 3) -> None:
    """The next ``count`` calls of ``method`` fail with ``code`` (429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, ...)."""
    control.fail_next(method, code, count)


def quota_exhausted(control, count: int = 1, zone: str | None = None) -> None:
    """The next ``count`` create calls fail on the call itself with RESOURCE_EXHAUSTED."""
    control.quota_error(count=count, zone=zone)
