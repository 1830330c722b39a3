"""The controller service: what the jobs, actors and clients of one controller ask it.

It runs in the driver's process beside the ``TpuCluster`` (same jobs, journal, CLI, costs) and
serves the processes of its jobs over the authenticated channel (``rpc.py``). It keeps:

- submissions: token -> job id, parent token, deadline (``JobRequest.timeout``), the job's
  reported exception; a child ends when its parent ends, a job past its deadline is stopped;
- the actor registry: endpoint -> address and owner; an entry goes with its owner's job;
- actor groups: members as jobs (CPU: one job per member on this machine; TPU: one job whose
  tasks, one per VM, are the members);
- named actors for the late-2025 job context (``get_if_exists``).

Only the methods in ``RPC_METHODS`` are callable from other processes.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fray_tpu import fray_api
from fray_tpu.actors import link as links
from fray_tpu.actors.rpc import ClusterCredentials, RpcServer
from fray_tpu.actors.serving import MemberSpec, serve_member
from fray_tpu.client_api import JobStatus, as_status
from fray_tpu.client_requests import translate
from fray_tpu.errors import ConfigError

log = logging.getLogger(__name__)

BIND_HOST_ENV = "FRAY_TPU_CONTROLLER_HOST"
HOUSEKEEPING_SECONDS = 0.25
UNLIMITED_RETRIES = 1_000_000
RPC_METHODS = frozenset({
    "submit", "job_state", "job_logs", "terminate", "report_failure", "register", "unregister", "lookup",
    "create_group", "group_state", "shutdown_group", "named_actor",
})


@dataclass
class Submission:
    token: str
    job_id: str
    parent: str | None
    deadline: float | None
    failure: tuple[bytes, str] | None = None
    failure_attempt: int = 0
    stopping: bool = False
    ended: bool = False


@dataclass
class Group:
    group_id: str
    name: str
    count: int
    members: list[str]  # submission tokens: one per member (CPU) or one for all (TPU)
    owner: str | None
    per_member_jobs: bool


@dataclass
class Registration:
    address: str  # where the actor listens: a TPU VM's internal address, or this machine's
    owner: str | None
    # Where a caller outside the VPC dials it with connect=external (the VM's external IP at the
    # same port; the address itself when it is not a VM's), once a lookup has asked.
    outside_address: str | None = None


@dataclass
class _State:
    submissions: dict[str, Submission] = field(default_factory=dict)
    by_job: dict[str, str] = field(default_factory=dict)
    registry: dict[str, Registration] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    named: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (group id, endpoint)


class ControllerService:
    def __init__(self, cluster: Any, host: str | None = None):
        self.cluster = cluster
        self.credentials = ClusterCredentials.create()
        self._state = _State()
        self._lock = threading.RLock()
        self.closed = False
        self._server = RpcServer(self.dispatch_remote, self.credentials,
                                 host or service_host(cluster.config), name="controller")
        self.address = self._server.address
        self._stop = threading.Event()
        threading.Thread(target=self._housekeeping, daemon=True, name="controller-housekeeping").start()

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self, "rpc_" + method)(*args, **kwargs)

    def dispatch_remote(self, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in RPC_METHODS:
            raise AttributeError(f"the controller has no method {method!r}")
        return self.dispatch(method, args, kwargs)

    def task_env(self, token: str) -> dict[str, str]:
        return {
            "FRAY_BACKEND": "tpu",
            links.CONTROLLER_ENV: self.address,
            links.CREDENTIALS_ENV: self.credentials.encode(),
            links.SUBMISSION_ENV: token,
        }

    # -- jobs --------------------------------------------------------------------------------
    def rpc_submit(self, request: Any, parent: str | None = None, adopt_existing: bool = True) -> str:
        """Launch; returns the job id. Names are not unique: every submit is a new job (as Marin's
        local and Ray backends do), so ``adopt_existing`` changes nothing."""
        token = secrets.token_hex(12)
        translated = translate(request, self.task_env(token))
        with self._lock:
            if parent is not None and parent not in self._state.submissions:
                raise ConfigError(f"unknown parent submission {parent!r}")
        config = self.cluster.config
        if translated.tpu_type is not None and not config.emulate and _is_loopback(self.address):
            log.warning("job %s runs on TPU VMs, but the controller service listens on %s: its tasks cannot reach "
                        "actors in this process, current_client(), or report their exceptions. Set %s to this "
                        "machine's VPC address.", request.name, self.address, BIND_HOST_ENV)
        elif translated.tpu_type is not None and config.connect == "external" and not os.environ.get(BIND_HOST_ENV):
            log.warning("job %s runs on TPU VMs reached at their external IPs (connect=external); its tasks dial "
                        "this controller service back at %s (this machine's address on its default route): set %s "
                        "to an address the VMs can reach, and allow TCP to it from them.", request.name,
                        self.address, BIND_HOST_ENV)
        job_id = self.cluster.launch(translated.request)
        deadline = time.monotonic() + translated.timeout if translated.timeout is not None else None
        with self._lock:
            self._state.submissions[token] = Submission(token, job_id, parent, deadline)
            self._state.by_job[job_id] = token
        return job_id

    def _submission(self, job_id: str) -> Submission | None:
        with self._lock:
            token = self._state.by_job.get(job_id)
            return self._state.submissions.get(token) if token else None

    def rpc_job_state(self, job_id: str) -> tuple[str, str | None, tuple[bytes, str] | None]:
        info = self.cluster.poll(job_id)
        submission = self._submission(job_id)
        return str(info.status), info.error_message, submission.failure if submission else None

    def rpc_job_logs(self, job_id: str, max_lines: int = 0) -> tuple[str, ...]:
        return self.cluster.job_output(job_id, max_lines)

    def rpc_terminate(self, job_id: str) -> None:
        self.cluster.terminate(job_id)

    def rpc_report_failure(self, token: str, blob: bytes, text: str) -> None:
        """The first exception of the job's latest attempt is the one ``wait()`` re-raises (the
        gang's other hosts are stopped because of it)."""
        with self._lock:
            submission = self._state.submissions.get(token)
        if submission is None:
            return
        attempt = self.cluster.job_counters(submission.job_id).attempts
        with self._lock:
            if submission.failure is None or submission.failure_attempt < attempt:
                submission.failure, submission.failure_attempt = (blob, text), attempt

    def job_of(self, token: str) -> str | None:
        with self._lock:
            submission = self._state.submissions.get(token)
            return submission.job_id if submission else None

    # -- the actor registry -------------------------------------------------------------------
    def rpc_register(self, endpoint: str, address: str, owner: str | None = None) -> None:
        with self._lock:
            self._state.registry[endpoint] = Registration(address, owner)

    def rpc_unregister(self, endpoint: str, address: str) -> None:
        with self._lock:
            current = self._state.registry.get(endpoint)
            if current is not None and current.address == address:
                del self._state.registry[endpoint]

    def rpc_lookup(self, endpoint: str, from_vm: bool = False) -> str | None:
        """Where ``endpoint`` is reached from the caller: a TPU VM dials its peers inside the VPC;
        this machine and its CPU jobs dial the VMs as the controller does (``connect``)."""
        with self._lock:
            registration = self._state.registry.get(endpoint)
        if registration is None:
            return None
        if from_vm or self.cluster.config.connect != "external":
            return registration.address
        if registration.outside_address is None:
            registration.outside_address = self._outside_address(registration.address)
        return registration.outside_address

    def _outside_address(self, address: str) -> str:
        """``address`` with a TPU VM's internal IP replaced by the VM's external one (the API's
        ``access_config.external_ip`` of that endpoint), from the slices this controller holds."""
        host, _, port = address.rpartition(":")
        for observed in self.cluster.live_slices():
            for internal, external in zip(observed.endpoints, observed.external_ips):
                if internal == host and external:
                    return f"{external}:{port}"
        return address

    # -- actor groups -------------------------------------------------------------------------
    def rpc_create_group(self, actor_class: type, args: tuple, kwargs: dict, *, name: str, count: int,
                         resources: Any, environment: Any, actor_config: Any, owner: str | None) -> tuple[str, int]:
        """Start the members; returns (group id, member count) at once."""
        from fray_tpu import client_api

        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"create_actor_group count must be an integer >= 1, got {count!r}")
        resources = resources if resources is not None else client_api.ResourceConfig()
        tpu_type = fray_api.tpu_type_of(resources.device)
        group_id = f"{name}-{secrets.token_hex(4)}"
        retries = _retries(actor_config)
        concurrency = getattr(actor_config, "max_concurrency", 1)
        common = dict(environment=environment, max_retries_failure=retries)
        if tpu_type is not None:
            tasks = getattr(resources, "replicas", 1)
            if tasks != count:
                raise ConfigError(f"a TPU actor group has one member per VM: count={count} but the resources have "
                                  f"{tasks} VMs ({tpu_type}); pass count={tasks}")
            spec = MemberSpec(group_id, name, None, concurrency)
            request = client_api.JobRequest(
                name=name, entrypoint=client_api.Entrypoint.from_callable(
                    serve_member, args=(actor_class, args, kwargs, spec)),
                resources=resources, replicas=count, **common)
            tokens = [self._token_of(self.rpc_submit(request, parent=owner))]
        else:
            tokens = []
            for index in range(count):
                spec = MemberSpec(group_id, name, index, concurrency)
                request = client_api.JobRequest(
                    name=f"{name}-{index}", entrypoint=client_api.Entrypoint.from_callable(
                        serve_member, args=(actor_class, args, kwargs, spec)),
                    resources=resources, replicas=1, **common)
                tokens.append(self._token_of(self.rpc_submit(request, parent=owner)))
        with self._lock:
            self._state.groups[group_id] = Group(group_id, name, count, tokens, owner, tpu_type is None)
        return group_id, count

    def _token_of(self, job_id: str) -> str:
        with self._lock:
            return self._state.by_job[job_id]

    def rpc_group_state(self, group_id: str) -> list[tuple[int, bool, bool, tuple[bytes, str] | None, str | None]]:
        """Per member: (index, ready, finished for good, its reported failure, its job's error)."""
        with self._lock:
            group = self._state.groups[group_id]
        rows = []
        for index in range(group.count):
            token = group.members[index] if group.per_member_jobs else group.members[0]
            with self._lock:
                submission = self._state.submissions[token]
                registered = f"{group.group_id}/{group.name}-{index}" in self._state.registry
            info = self.cluster.poll(submission.job_id)
            finished = JobStatus.finished(as_status(info.status))
            rows.append((index, registered and not finished, finished, submission.failure, info.error_message))
        return rows

    def rpc_shutdown_group(self, group_id: str) -> None:
        with self._lock:
            group = self._state.groups.get(group_id)
            jobs = [self._state.submissions[t].job_id for t in group.members] if group else []
        for job_id in jobs:
            self.cluster.terminate(job_id)
        with self._lock:
            for endpoint in [e for e in self._state.registry if e.startswith(group_id + "/")]:
                del self._state.registry[endpoint]

    def rpc_named_actor(self, name: str, actor_class: type, args: tuple, kwargs: dict, *, resources: Any,
                        actor_config: Any, get_if_exists: bool, owner: str | None) -> tuple[str, str]:
        """The late-2025 ``create_actor(name=..., get_if_exists=True)``: one actor per name for the
        whole controller. Returns (group id, endpoint of member 0)."""
        with self._lock:
            existing = self._state.named.get(name)
            if existing is not None and self._group_alive(existing[0]):
                if get_if_exists:
                    return existing
                raise ValueError(f"an actor named {name!r} already exists: pass get_if_exists=True to share it")
            group_id, _ = self.rpc_create_group(actor_class, args, kwargs, name=name, count=1, resources=resources,
                                                environment=None, actor_config=actor_config, owner=owner)
            named = (group_id, f"{group_id}/{name}-0")
            self._state.named[name] = named
            return named

    def _group_alive(self, group_id: str) -> bool:
        """False once every member ended, or the group is being stopped (its owner ended)."""
        with self._lock:
            group = self._state.groups[group_id]
            members = [self._state.submissions[t] for t in group.members]
            owner = self._state.submissions.get(group.owner) if group.owner else None
        if any(m.stopping for m in members):
            return False
        if owner is not None and JobStatus.finished(as_status(self.cluster.poll(owner.job_id).status)):
            return False
        return not all(finished for _, _, finished, _, _ in self.rpc_group_state(group_id))

    # -- lifetimes ---------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        while not self._stop.wait(HOUSEKEEPING_SECONDS):
            try:
                self._sweep()
            except Exception:  # noqa: BLE001 - this loop must outlive any one job
                log.exception("controller housekeeping")

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            submissions = list(self._state.submissions.values())
        for submission in submissions:
            if not submission.ended and JobStatus.finished(as_status(self.cluster.poll(submission.job_id).status)):
                submission.ended = True
        finished = {s.token for s in submissions if s.ended}
        for submission in submissions:
            if submission.ended or submission.stopping:
                continue
            past_deadline = submission.deadline is not None and now >= submission.deadline
            orphaned = submission.parent is not None and submission.parent in finished
            if past_deadline or orphaned:
                submission.stopping = True
                why = "its timeout passed" if past_deadline else "its parent job ended"
                log.info("stopping job %s: %s", submission.job_id, why)
                threading.Thread(target=self.cluster.terminate, args=(submission.job_id,), daemon=True).start()
        with self._lock:
            for endpoint, registration in list(self._state.registry.items()):
                if registration.owner in finished:
                    del self._state.registry[endpoint]

    def close(self) -> None:
        self.closed = True
        self._stop.set()
        self._server.stop()
        links.clear_local_service(self)


# Any address off this machine: connecting a UDP socket to it sends nothing, it only makes the
# kernel pick the source address of the route there (the default route, on a GCE VM its VPC NIC).
_ROUTE_PROBE = ("10.255.255.254", 9)


def default_route_source() -> str | None:
    """This machine's address on its default route, or None when it has none."""
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(_ROUTE_PROBE)
        return probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()


def service_host(config: Any, environ: Any = None, route_source: Any = default_route_source) -> str:
    """Where the controller service listens, which is also the address its jobs' processes dial
    (``FRAY_TPU_CONTROLLER``): ``FRAY_TPU_CONTROLLER_HOST`` when set; on the emulator loopback
    (its VMs are loopback addresses of this machine); otherwise this machine's address on its
    default route (on a GCE VM in the workers' VPC, the address they reach with connect=internal;
    a controller outside the VPC, connect=external, sets the variable to one the VMs can reach)."""
    environ = os.environ if environ is None else environ
    if environ.get(BIND_HOST_ENV, "").strip():
        return environ[BIND_HOST_ENV].strip()
    if config.emulate:
        return "127.0.0.1"
    found = route_source()
    if found is None:
        log.warning("this machine has no default route; the controller service listens on 127.0.0.1, which TPU VMs "
                    "cannot reach: set %s", BIND_HOST_ENV)
        return "127.0.0.1"
    return found


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address.startswith("localhost")


def _retries(actor_config: Any) -> int:
    """``max_task_retries`` (else ``max_restarts``) as the member job's failure budget; -1 is unlimited."""
    for attribute in ("max_task_retries", "max_restarts"):
        value = getattr(actor_config, attribute, None)
        if value is not None:
            return UNLIMITED_RETRIES if value < 0 else int(value)
    return 0
