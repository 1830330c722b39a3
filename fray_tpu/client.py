"""``TpuClient``: Marin's 2026 Client API (``fray.client.Client``) on the fray-tpu controller.

Jobs go to the same ``TpuCluster`` machinery as ``launch()`` (journal, CLI, costs, retries):
a job submitted through either is visible to both. In a driver, ``TpuClient(config)`` /
``TpuClient.from_spec("tpu?...")`` owns a controller: the cluster plus the controller service
(``fray_tpu.actors.controller``) that the job's processes reach over the authenticated channel.
Inside a job or actor, ``TpuClient.attach()`` (what ``current_client()`` returns there) talks to
that same controller; what it submits is a child of the job and ends with it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

from fray_tpu.actors import link as links
from fray_tpu.actors.handles import TpuActorHandle
from fray_tpu.actors.rpc import unpack_exception
from fray_tpu.actors.serving import start_actor, stop_actor
from fray_tpu.client_api import (
    ActorConfig,
    HostedActor,
    JobFailed,
    JobStatus,
    ResourceConfig,
    as_status,
    explicit_client,
)

WAIT_POLL_MAX = 0.5
DEFAULT_READY_TIMEOUT = 300.0


class TpuJobFailed(JobFailed):
    """A failed job whose own exception did not come back (a binary, or a crash): names the error."""

    def __init__(self, job_id: str, status: Any, error_message: str | None):
        super().__init__(job_id, status)
        self.error_message = error_message
        self.args = (f"job {job_id} {status}: {error_message or 'no error message'}",)


class TpuJobHandle:
    """A job of a fray-tpu controller. Pickles to its id; resolves through the process's link."""

    def __init__(self, job_id: str, link: Any = None):
        self._job_id = job_id
        self._link = link

    @property
    def job_id(self) -> str:
        return self._job_id

    def __reduce__(self):
        return TpuJobHandle, (self._job_id,)

    def __repr__(self) -> str:
        return f"TpuJobHandle({self._job_id!r})"

    def _call(self, method: str, *args: Any) -> Any:
        if self._link is None:
            self._link = links.process_link()
        return self._link.call(method, *args)

    def status(self) -> Any:
        return as_status(self._call("job_state", self._job_id)[0])

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            status, error_message, failure = self._call("job_state", self._job_id)
            status = as_status(status)
            if JobStatus.finished(status):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self._job_id} still {status} after {timeout}s")
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, WAIT_POLL_MAX)
        if raise_on_failure and status == JobStatus.FAILED:
            if failure is not None:
                raise unpack_exception(*failure)
            raise TpuJobFailed(self._job_id, status, error_message)
        return status

    def logs(self, max_lines: int = 0) -> tuple[str, ...]:
        return tuple(self._call("job_logs", self._job_id, max_lines))

    def terminate(self) -> None:
        self._call("terminate", self._job_id)


class TpuActorGroup:
    """Members started by the controller; pickles to its identity."""

    def __init__(self, group_id: str, name: str, count: int, link: Any = None):
        self._group_id, self._name, self._count = group_id, name, count
        self._link = link
        self._yielded: set[int] = set()

    def __reduce__(self):
        return TpuActorGroup, (self._group_id, self._name, self._count)

    def _rows(self) -> list:
        if self._link is None:
            self._link = links.process_link()
        return self._link.call("group_state", self._group_id)

    def _handle(self, index: int) -> TpuActorHandle:
        return TpuActorHandle(f"{self._group_id}/{self._name}-{index}")

    @property
    def ready_count(self) -> int:
        return sum(1 for _, ready, _, _, _ in self._rows() if ready)

    def wait_ready(self, count: int | None = None, timeout: float = DEFAULT_READY_TIMEOUT) -> list[TpuActorHandle]:
        want = self._count if count is None else count
        if not 0 < want <= self._count:
            raise ValueError(f"wait_ready(count={count}) on a group of {self._count}")
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            rows = self._rows()
            ready = [index for index, is_ready, _, _, _ in rows if is_ready]
            if len(ready) >= want:
                chosen = ready[:want]
                self._yielded.update(chosen)
                return [self._handle(i) for i in chosen]
            dead = [row for row in rows if row[2] and not row[1]]
            if self._count - len(dead) < want:
                _, _, _, failure, error = dead[0]
                if failure is not None:
                    raise unpack_exception(*failure)
                raise RuntimeError(f"actor group {self._name}: member {dead[0][0]} ended ({error or 'stopped'}); "
                                   f"{want} ready member(s) can no longer be reached")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"actor group {self._name}: {len(ready)}/{want} member(s) ready after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, WAIT_POLL_MAX)

    def discover_new(self) -> list[TpuActorHandle]:
        fresh = [index for index, ready, _, _, _ in self._rows() if ready and index not in self._yielded]
        self._yielded.update(fresh)
        return [self._handle(i) for i in fresh]

    def is_done(self) -> bool:
        return all(finished for _, _, finished, _, _ in self._rows())

    def shutdown(self) -> None:
        if self._link is None:
            self._link = links.process_link()
        self._link.call("shutdown_group", self._group_id)


class TpuClient:
    def __init__(self, config: Any = None, *, cluster: Any = None, _link: Any = None):
        self._owned = _link is None
        self._hosted: list[HostedActor] = []
        self._groups: list[TpuActorGroup] = []
        self._jobs: list[TpuJobHandle] = []
        self._lock = threading.Lock()
        if _link is not None:
            self._link, self.cluster, self._service = _link, None, None
            return
        from fray_tpu.actors.controller import ControllerService
        from fray_tpu.cluster import TpuCluster

        self.cluster = cluster if cluster is not None else TpuCluster(config)
        self._service = ControllerService(self.cluster)
        self._link = links.set_local_service(self._service)
        if self._link.service is not self._service:
            # Another controller of this process already serves handles here; this one still
            # serves its own jobs over its own address.
            self._link = links.LocalLink(self._service)

    @classmethod
    def from_spec(cls, spec: str) -> TpuClient:
        from fray_tpu.cluster import TpuCluster

        return cls(cluster=TpuCluster.from_spec(spec))

    @classmethod
    def attach(cls) -> TpuClient:
        """The client of the controller this process belongs to (inside a job or actor)."""
        return cls(_link=links.process_link())

    @property
    def controller_address(self) -> str:
        return self._link.address

    def _owner(self) -> str | None:
        """What this client creates belongs to the job it runs in (None: to the driver)."""
        return None if self._owned else links.own_submission()

    # -- jobs --------------------------------------------------------------------------------
    def submit(self, request: Any, adopt_existing: bool = True) -> TpuJobHandle:
        job_id = self._link.call("submit", request, self._owner(), adopt_existing)
        handle = TpuJobHandle(job_id, self._link)
        with self._lock:
            self._jobs.append(handle)
        return handle

    # -- actors ------------------------------------------------------------------------------
    def create_actor_group(self, actor_class: type, *args: Any, name: str, count: int,
                           resources: Any = None, environment: Any = None, actor_config: Any = None,
                           **kwargs: Any) -> TpuActorGroup:
        group_id, count = self._link.call(
            "create_group", actor_class, args, kwargs, name=name, count=count,
            resources=resources if resources is not None else ResourceConfig(),
            environment=environment, actor_config=actor_config or ActorConfig(), owner=self._owner())
        group = TpuActorGroup(group_id, name, count, self._link)
        with self._lock:
            self._groups.append(group)
        return group

    def create_actor(self, actor_class: type, *args: Any, name: str, resources: Any = None, environment: Any = None,
                     actor_config: Any = None, **kwargs: Any) -> TpuActorHandle:
        """A group of one; blocks until it is constructed (its constructor's error is raised)."""
        group = self.create_actor_group(actor_class, *args, name=name, count=1, resources=resources,
                                        environment=environment, actor_config=actor_config, **kwargs)
        return group.wait_ready()[0]

    def host_actor(self, actor_class: type, *args: Any, name: str, actor_config: Any = None,
                   **kwargs: Any) -> HostedActor:
        """Serve the actor in this process; its handle works from every job of the controller."""
        config = actor_config or ActorConfig()
        endpoint = f"hosted-{os.getpid()}-{secrets.token_hex(4)}/{name}-0"
        _, server = start_actor(actor_class, args, kwargs, endpoint=endpoint, index=0, group_name=name,
                                max_concurrency=getattr(config, "max_concurrency", 1), owner=self._owner())
        hosted = HostedActor(TpuActorHandle(endpoint), stop=lambda: stop_actor(endpoint, server))
        with self._lock:
            self._hosted.append(hosted)
        return hosted

    # -- lifetime ----------------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop hosted actors and actor groups; with ``wait`` let this client's jobs finish, else
        stop them. An owning client then shuts its controller down."""
        with self._lock:
            hosted, groups, jobs = list(self._hosted), list(self._groups), list(self._jobs)
            self._hosted, self._groups, self._jobs = [], [], []
        for actor in hosted:
            actor.shutdown()
        for group in groups:
            group.shutdown()
        for job in jobs:
            if wait:
                job.wait(raise_on_failure=False)
            else:
                job.terminate()
        if self._owned:
            self._service.close()
            self.cluster.shutdown()


_default_lock = threading.Lock()
_default: TpuClient | None = None


def default_client() -> TpuClient:
    """The process's client: attached to its controller inside a job, else one owned client
    configured from the environment (``FRAY_CLUSTER_SPEC=tpu?...`` or ``FRAY_TPU_*``)."""
    global _default
    with _default_lock:
        if _default is None:
            if links.in_task():
                _default = TpuClient.attach()
            else:
                spec = os.environ.get("FRAY_CLUSTER_SPEC", "")
                from fray_tpu.backend import is_tpu_spec

                _default = TpuClient.from_spec(spec) if is_tpu_spec(spec) else TpuClient()
        return _default


def current_client() -> Any:
    """Marin's resolution for code without Marin's fray: the client set with
    ``set_current_client``, else this process's ``TpuClient``."""
    return explicit_client() or default_client()
