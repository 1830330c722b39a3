"""Slices on Cloud TPU through the ``google-cloud-tpu`` v2 client: create, observe, acquire, delete.

The rules this module is built on (see ../shared/tpu-facts.md):

- Stockouts arrive on the create *operation* (code 8), quota and policy errors on the create
  POST. ``cloud_errors`` sorts each by status, ``ErrorInfo.reason`` and ``QuotaFailure``: next
  zone (no capacity), skip the zone or region (with the reason), retry the same zone later (a
  per-minute rate limit), or fail the job now (nothing a retry fixes).
- Creates go through one rate limiter per provisioner (one per controller and project).
- An API outage never deletes a slice: while listings fail, the last observation is kept (stale)
  and the wait goes on until the caller's deadline.
- Readiness is the node READY with every worker endpoint. The create operation is never waited
  on: it can finish long after the VMs booted. It is only peeked at for errors.
- Preempted nodes and failed queued resources are not deleted by Google, and a queued resource
  can be granted after the caller gave up. So whatever ``acquire`` created is deleted on every
  path that does not hand it to the caller, and deletion is verified by observing it gone.
- Observation is batched: one shared watcher per zone lists the zone at most once per poll
  interval for every concurrent caller, plus at most one extra call (queued-resource listing or
  one pending operation, round-robin).

Every client call passes ``timeout=`` and ``retry=None``; transient failures are retried here with
tenacity (exponential backoff with jitter, bounded attempts and total time).

Deadlines are absolute ``time.monotonic()`` values.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import timedelta
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.api_core import exceptions as api_exceptions
from google.cloud import tpu_v2
from google.rpc import code_pb2
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from fray_tpu import naming
from fray_tpu.config import CONNECT_MODES, DEFAULT_NETWORK_TAG
from fray_tpu.cloud_errors import CreateAction, CreateRateLimiter, CreateVerdict, classify, classify_call_error
from fray_tpu.errors import (
    CapacityUnavailableError,
    CreateRejectedError,
    DeadlineExceeded,
    NoUsableZoneError,
    ProvisioningError,
    UnknownTpuTypeError,
)
from fray_tpu.topology import get_tpu_topology, region_of
from fray_tpu.tpu_client import CLOUD_PLATFORM_SCOPE, make_tpu_client  # noqa: F401 - the one TPU client

log = logging.getLogger(__name__)

CAPACITY_CLASSES = ("spot", "preemptible", "on-demand", "reserved")

# Node states in which a slice is gone for good as far as a job is concerned.
LOST_STATES = frozenset({"PREEMPTED", "TERMINATED", "UNKNOWN", "DELETING", "GONE"})
GONE = "GONE"
CREATE_FAILED = "CREATE_FAILED"
# A tracked node the API does not list yet (just POSTed, or its queued resource is not granted).
CREATING = "CREATING"

T = TypeVar("T")


class CancelledError(ProvisioningError):
    """``acquire`` was cancelled by its caller; what it created has been deleted."""


class ZoneRefused(ProvisioningError):
    """A create was refused in one zone; ``verdict`` says what to do about it."""

    def __init__(self, verdict: CreateVerdict):
        super().__init__(verdict.describe())
        self.verdict = verdict


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class SliceSpec:
    """What to create: one TPU node (or one queued resource holding one node of the same id)."""

    name: str
    tpu_type: str
    runtime_version: str
    capacity: str  # "spot" | "preemptible" | "on-demand" | "reserved"
    labels: Mapping[str, str]
    metadata: Mapping[str, str]
    network: str | None = None
    subnetwork: str | None = None
    external_ips: bool = False
    # How the controller reaches the agents: "internal" (the workers' internal addresses) or
    # "external" (their access_config.external_ip; needs external_ips).
    connect: str = "internal"
    network_tag: str = DEFAULT_NETWORK_TAG
    service_account: str | None = None
    queued: bool = False
    # Queued resources only: ``projects/P/locations/Z/reservations/R`` for reserved capacity.
    reservation: str | None = None

    def __post_init__(self) -> None:
        if self.capacity not in CAPACITY_CLASSES:
            raise ValueError(
                f"capacity {self.capacity!r} of slice {self.name!r} is not one of {', '.join(CAPACITY_CLASSES)}"
            )
        if self.queued and self.capacity == "preemptible":
            raise ValueError(
                f"slice {self.name!r}: queued resources offer spot, on-demand or reserved capacity, "
                "not preemptible; use capacity='spot' or queued=False"
            )
        if self.connect not in CONNECT_MODES:
            raise ValueError(f"slice {self.name!r}: connect {self.connect!r} is not one of {', '.join(CONNECT_MODES)}")
        if self.connect == "external" and not self.external_ips:
            raise ValueError(f"slice {self.name!r}: connect='external' needs external_ips=True")


@dataclass(frozen=True)
class SliceObservation:
    """One node as last observed."""

    name: str
    zone: str
    resource_name: str
    state: str  # node state name, GONE when it vanished, CREATE_FAILED when its creation failed
    health: str | None
    endpoints: tuple[str, ...]  # worker IPs in worker order (empty while provisioning)
    labels: Mapping[str, str]
    error: str | None  # create-operation (or queued-resource) error text, if any
    queued_state: str | None  # queued resource state when created via one
    expected_endpoints: int | None = None  # workers of the accelerator type, when known
    verdict: CreateVerdict | None = None  # what the create error means, when creation failed
    stale_for: float = 0.0  # seconds since the listing this comes from last succeeded (API outage)
    # Each endpoint's access_config.external_ip ("" for none), in the order of ``endpoints``.
    external_ips: tuple[str, ...] = ()

    @property
    def lost(self) -> bool:
        return self.state in LOST_STATES

    @property
    def ready(self) -> bool:
        if self.state != "READY" or not self.endpoints or not all(self.endpoints):
            return False
        return self.expected_endpoints is None or len(self.endpoints) >= self.expected_endpoints

    @property
    def stockout(self) -> bool:
        """Creation failed for lack of capacity in the zone (the next zone may have it)."""
        return self.state == CREATE_FAILED and self.verdict is not None and self.verdict.action is CreateAction.NEXT_ZONE

    def describe(self) -> str:
        """One readable line: ``READY 4/4 endpoints``, ``CREATING``, ``queued WAITING_FOR_RESOURCES``."""
        if self.stale_for > 0:
            return f"{_replace(self, stale_for=0.0).describe()} (stale: the API has not answered for {self.stale_for:.0f}s)"
        if self.state == "CREATING" and self.queued_state and self.queued_state != "ACTIVE":
            return f"queued {self.queued_state}"
        if self.state == "READY":
            expected = self.expected_endpoints or len(self.endpoints)
            return f"READY {sum(1 for e in self.endpoints if e)}/{expected} endpoints"
        if self.error:
            return f"{self.state}: {self.error}"
        return self.state


@dataclass(frozen=True)
class ReadySlice:
    spec: SliceSpec
    zone: str
    resource_name: str
    # The workers' internal addresses: what they use among themselves (JAX, Megascale) and what
    # identifies each host (its published address, the certificate pinned for it).
    endpoints: tuple[str, ...]
    # Each endpoint's access_config.external_ip ("" for none), in the same order.
    external_ips: tuple[str, ...] = ()

    def dial_address(self, ip: str) -> str:
        """The address the controller dials for the worker at internal address ``ip``."""
        if self.spec.connect == "internal":
            return ip
        index = self.endpoints.index(ip)
        if index >= len(self.external_ips) or not self.external_ips[index]:
            raise ProvisioningError(f"connect=external, but no external IP is known for worker {ip} of "
                                    f"{self.resource_name} (the node lists none)")
        return self.external_ips[index]

    def reordered(self, order: Sequence[int]) -> ReadySlice:
        """The same slice with its endpoints (and external IPs) in ``order`` (endpoint indexes)."""
        return dataclasses.replace(self, endpoints=tuple(self.endpoints[i] for i in order),
                                   external_ips=tuple(self.external_ips[i] for i in order) if self.external_ips else ())


def missing_external_ips(spec: SliceSpec, observation: SliceObservation) -> CreateVerdict | None:
    """With connect=external, the verdict on a READY node some of whose workers have no external
    IP (an organization policy may strip or forbid them): nothing to dial, and no retry helps."""
    if spec.connect != "external":
        return None
    external = observation.external_ips
    missing = [i for i in range(len(observation.endpoints)) if i >= len(external) or not external[i]]
    if not missing:
        return None
    return CreateVerdict(
        CreateAction.FATAL, "no external IP to dial",
        f"node {observation.name} is READY but worker(s) {', '.join(map(str, missing))} of {len(observation.endpoints)} "
        "have no access_config.external_ip",
        "external IPs may be forbidden by an organization policy (constraints/compute.vmExternalIpAccess): "
        "run the controller inside the workers' VPC with connect=internal, or have the policy allow them",
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient API failures (429 on reads and deletes, 503, UNAVAILABLE,
    DEADLINE_EXCEEDED, INTERNAL)."""

    max_attempts: int = 6
    max_seconds: float = 60.0
    initial_backoff: float = 0.5
    max_backoff: float = 10.0


# ---------------------------------------------------------------------------------------------
# Spec → request (pure)


def zone_parent(project: str, zone: str) -> str:
    return f"projects/{project}/locations/{zone}"


def node_resource_name(project: str, zone: str, name: str) -> str:
    return f"{zone_parent(project, zone)}/nodes/{name}"


def queued_resource_name(project: str, zone: str, name: str) -> str:
    return f"{zone_parent(project, zone)}/queuedResources/{name}"


def node_request(spec: SliceSpec) -> tpu_v2.Node:
    """The ``Node`` body of a CreateNode (or of a queued resource's node spec) for ``spec``."""
    node = tpu_v2.Node(
        accelerator_type=spec.tpu_type,
        runtime_version=spec.runtime_version,
        labels=dict(spec.labels),
        metadata=dict(spec.metadata),
        # Firewall rules for the agent port (controller -> VMs) and the JAX/Megascale ports
        # (VM <-> VM) target this tag (README, "Ports and firewall").
        tags=[spec.network_tag],
        network_config=tpu_v2.NetworkConfig(
            network=spec.network or "",
            subnetwork=spec.subnetwork or "",
            enable_external_ips=spec.external_ips,
        ),
    )
    scheduling = {
        "spot": tpu_v2.SchedulingConfig(spot=True),
        "preemptible": tpu_v2.SchedulingConfig(preemptible=True),
        "reserved": tpu_v2.SchedulingConfig(reserved=True),
    }.get(spec.capacity)
    # A queued resource carries spot/on-demand in its tier; only "reserved" stays on its node.
    if scheduling is not None and (not spec.queued or spec.capacity == "reserved"):
        node.scheduling_config = scheduling
    if spec.service_account:
        node.service_account = tpu_v2.ServiceAccount(email=spec.service_account, scope=[CLOUD_PLATFORM_SCOPE])
    return node


def queued_resource_request(spec: SliceSpec, project: str, zone: str) -> tpu_v2.QueuedResource:
    """A queued resource for one node named like the queued resource; the tier follows capacity
    (spot → spot tier, otherwise guaranteed; reserved also marks the node reserved and names the
    reservation when one is given)."""
    node_spec = tpu_v2.QueuedResource.Tpu.NodeSpec(
        parent=zone_parent(project, zone), node_id=spec.name, node=node_request(spec)
    )
    resource = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[node_spec]))
    if spec.capacity == "spot":
        resource.spot = tpu_v2.QueuedResource.Spot()
    else:
        resource.guaranteed = tpu_v2.QueuedResource.Guaranteed()
    if spec.capacity == "reserved" and spec.reservation:
        resource.reservation_name = spec.reservation
    return resource


# ---------------------------------------------------------------------------------------------
# Error classification (pure)

_TRANSIENT = (
    api_exceptions.TooManyRequests,  # includes ResourceExhausted
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.GatewayTimeout,
    api_exceptions.BadGateway,
)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, _TRANSIENT)


def operation_error_text(code: int, message: str) -> str:
    """``RESOURCE_EXHAUSTED (code 8): …``: the operation's error as the API gave it."""
    return f"{code_pb2.Code.Name(code) if code in code_pb2.Code.values() else code} (code {code}): {message}"


def operation_verdict(status, capacity: str) -> tuple[str, CreateVerdict]:
    """The text and verdict of a create operation's (or a FAILED queued resource's) error."""
    verdict = classify(status.code, status.message, status.details, capacity=capacity, on_operation=True)
    return f"{verdict.reason}: {operation_error_text(status.code, status.message)}", verdict


def _expected_workers(accelerator_type: str) -> int | None:
    try:
        return get_tpu_topology(accelerator_type).vm_count
    except UnknownTpuTypeError:
        return None


def _enum_name(value) -> str:
    return getattr(value, "name", str(value))


# ---------------------------------------------------------------------------------------------
# The shared per-zone watcher


@dataclass
class _Tracked:
    """A slice this provisioner created (or is deleting) in one zone."""

    name: str
    queued: bool
    since: float  # monotonic time it was tracked
    operation: str | None = None  # create operation, peeked at for errors only
    operation_error: str | None = None
    operation_verdict: CreateVerdict | None = None
    capacity: str = ""
    operation_done: bool = False
    seen: bool = False  # listed at least once (as a node or a queued resource)
    deleting: bool = False


@dataclass(frozen=True)
class _Snapshot:
    taken_at: float  # when the node listing started
    nodes: Mapping[str, tpu_v2.Node]
    queued_taken_at: float  # when the queued-resource listing started (-inf: never)
    queued: Mapping[str, tpu_v2.QueuedResource]


_LIST_QUEUED = object()


class _ZoneWatcher:
    """Lists one zone at most once per poll interval on behalf of every caller.

    A refresh is one ListNodes (all pages) plus at most one extra call, taken round-robin from
    ListQueuedResources (while a queued resource is tracked) and GetOperation for each tracked
    create operation not yet known to be finished. Callers that find the snapshot stale while a
    refresh runs wait for it and share its result.
    """

    def __init__(self, provisioner: SliceProvisioner, zone: str):
        self._provisioner = provisioner
        self.zone = zone
        self._lock = threading.Lock()  # guards _tracked and _snapshot
        self._refresh_lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._snapshot: _Snapshot | None = None
        self._extra_cursor = 0

    def track(self, name: str, *, queued: bool, operation: str | None, capacity: str = "") -> None:
        with self._lock:
            self._tracked[name] = _Tracked(
                name=name, queued=queued, since=time.monotonic(), operation=operation, capacity=capacity
            )

    def mark_deleting(self, name: str, *, queued: bool) -> None:
        with self._lock:
            tracked = self._tracked.setdefault(name, _Tracked(name=name, queued=queued, since=time.monotonic()))
            tracked.queued = tracked.queued or queued
            tracked.deleting = True

    def untrack(self, name: str) -> None:
        with self._lock:
            self._tracked.pop(name, None)

    def pending_operation(self, name: str) -> str | None:
        """The create operation of ``name`` if it is not known to be finished."""
        with self._lock:
            tracked = self._tracked.get(name)
            return tracked.operation if tracked is not None and not tracked.operation_done else None

    def snapshot(self) -> _Snapshot:
        """A snapshot at most one poll interval old."""
        with self._refresh_lock:
            current = self._snapshot
            if current is not None and time.monotonic() - current.taken_at < self._provisioner.poll_interval:
                return current
            return self._refresh()

    def _refresh(self) -> _Snapshot:
        taken_at = time.monotonic()
        nodes = {_short_name(node.name): node for node in self._provisioner._list_nodes(self.zone)}
        with self._lock:
            need_queued = any(t.queued for t in self._tracked.values())
            pending_operations = [
                t.operation for t in self._tracked.values() if t.operation and not t.operation_done and not t.deleting
            ]
            previous = self._snapshot
        queued_taken_at, queued = (previous.queued_taken_at, previous.queued) if previous else (float("-inf"), {})
        extras: list[object] = ([_LIST_QUEUED] if need_queued else []) + pending_operations
        if extras:
            extra = extras[self._extra_cursor % len(extras)]
            self._extra_cursor += 1
            if extra is _LIST_QUEUED:
                queued_taken_at = time.monotonic()
                queued = {_short_name(qr.name): qr for qr in self._provisioner._list_queued_resources(self.zone)}
            else:
                self.peek_operation(str(extra))
        with self._lock:
            for name, tracked in self._tracked.items():
                if name in nodes or (name in queued and queued_taken_at >= tracked.since):
                    tracked.seen = True
            self._snapshot = _Snapshot(taken_at, nodes, queued_taken_at, queued)
            return self._snapshot

    def peek_operation(self, operation_name: str) -> None:
        """Record whether a create operation finished with an error; one try, never blocks long."""
        operation = self._provisioner._peek_operation(operation_name)
        if operation is None or not operation.done:
            return
        with self._lock:
            for tracked in self._tracked.values():
                if tracked.operation == operation_name:
                    tracked.operation_done = True
                    if operation.HasField("error"):
                        tracked.operation_error, tracked.operation_verdict = operation_verdict(
                            operation.error, tracked.capacity
                        )

    def observations(self, snapshot: _Snapshot) -> dict[str, SliceObservation]:
        """Every listed node, plus every tracked slice the listing does not show (CREATING while
        pending, CREATE_FAILED after an error, GONE once vanished)."""
        result: dict[str, SliceObservation] = {}
        project = self._provisioner.project
        with self._lock:
            tracked = {name: _Tracked(**vars(t)) for name, t in self._tracked.items()}
        for name, node in snapshot.nodes.items():
            qr = snapshot.queued.get(name)
            observation = _node_observation(node, self.zone, qr)
            entry = tracked.get(name)
            if entry is not None and entry.operation_error and observation.state != "READY":
                observation = _replace(
                    observation, state=CREATE_FAILED, error=entry.operation_error, verdict=entry.operation_verdict
                )
            result[name] = observation
        for name, entry in tracked.items():
            if name in result:
                continue
            qr = snapshot.queued.get(name)
            state, error, verdict = _absent_state(entry, qr, snapshot)
            result[name] = SliceObservation(
                name=name,
                zone=self.zone,
                resource_name=node_resource_name(project, self.zone, name),
                state=state,
                health=None,
                endpoints=(),
                labels=_queued_labels(qr) if qr is not None else {},
                error=error,
                queued_state=_qr_state_name(qr) if qr is not None else None,
                verdict=verdict,
            )
        return result


def _short_name(resource_name: str) -> str:
    return resource_name.rsplit("/", 1)[-1]


def _qr_state_name(qr: tpu_v2.QueuedResource) -> str:
    return _enum_name(qr.state.state)


def _queued_labels(qr: tpu_v2.QueuedResource) -> dict[str, str]:
    """Queued resources carry no labels of their own; their node spec does."""
    for spec in qr.tpu.node_spec:
        return dict(spec.node.labels)
    return {}


def _qr_error(qr: tpu_v2.QueuedResource, capacity: str = "") -> tuple[str, CreateVerdict]:
    """A FAILED queued resource named by its real error (a bad request, or its queueing policy
    expired), with the verdict on it."""
    text, verdict = operation_verdict(qr.state.failed_data.error, capacity)
    return f"queued resource FAILED, {text}", verdict


def _absent_state(
    entry: _Tracked, qr: tpu_v2.QueuedResource | None, snapshot: _Snapshot
) -> tuple[str, str | None, CreateVerdict | None]:
    """The state of a tracked slice whose node is not listed (with the create error's verdict)."""
    if entry.operation_error:
        return CREATE_FAILED, entry.operation_error, entry.operation_verdict
    if qr is not None:
        state = _qr_state_name(qr)
        if state == "FAILED":
            return CREATE_FAILED, *_qr_error(qr, entry.capacity)
        if state in ("SUSPENDING", "SUSPENDED"):
            return GONE, f"queued resource {state}", None
        if state == "DELETING":
            return "DELETING", None, None
        if state == "ACTIVE" and entry.seen and snapshot.taken_at > snapshot.queued_taken_at:
            return GONE, None, None  # granted, its node was listed, and now it is not
        return CREATING, None, None
    if entry.seen:
        return GONE, None, None
    if entry.operation_done and not entry.queued and snapshot.taken_at > entry.since:
        return GONE, None, None  # created fine, yet absent from a listing made after the POST
    return CREATING, None, None


def _replace(observation: SliceObservation, **changes) -> SliceObservation:
    return SliceObservation(**{**vars(observation), **changes})


def _node_observation(node: tpu_v2.Node, zone: str, qr: tpu_v2.QueuedResource | None) -> SliceObservation:
    return SliceObservation(
        name=_short_name(node.name),
        zone=zone,
        resource_name=node.name,
        state=_enum_name(node.state),
        health=_enum_name(node.health) if node.health else None,
        endpoints=tuple(endpoint.ip_address for endpoint in node.network_endpoints),
        external_ips=tuple(endpoint.access_config.external_ip for endpoint in node.network_endpoints),
        labels=dict(node.labels),
        error=None,
        queued_state=_qr_state_name(qr) if qr is not None else None,
        expected_endpoints=_expected_workers(node.accelerator_type),
    )


# ---------------------------------------------------------------------------------------------
# The provisioner


class SliceProvisioner:
    """Creates, watches and deletes TPU slices. Thread-safe: one instance serves every job."""

    def __init__(
        self,
        client: tpu_v2.TpuClient,
        project: str,
        *,
        api_timeout: float = 30.0,
        poll_interval: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        cleanup_timeout: float = 600.0,
        list_page_size: int = 0,
        creates_per_minute: float = 45.0,
    ):
        """``cleanup_timeout``: how long ``acquire`` keeps trying to delete what it created when it
        gives up (its own deadline has usually passed by then). ``list_page_size`` 0 lets the
        server choose. ``creates_per_minute``: this provisioner's create calls, all jobs together
        (Google allows about 91 per minute per project; stay well below)."""
        self.client = client
        self.project = project
        self.api_timeout = api_timeout
        self.poll_interval = poll_interval
        self.retry = retry
        self.cleanup_timeout = cleanup_timeout
        self.list_page_size = list_page_size
        self.create_limiter = CreateRateLimiter(creates_per_minute)
        self._watchers: dict[str, _ZoneWatcher] = {}
        self._watchers_lock = threading.Lock()

    # -- API calls (each with timeout=, retry=None, and our own retry policy)

    def _call(self, method: Callable[..., T], request, *, what: str, is_create: bool = False) -> T:
        def retryable(error: BaseException) -> bool:
            if is_create and isinstance(error, api_exceptions.TooManyRequests):
                return False  # quota or rate limit: create() decides by the error's details
            return is_transient(error)

        retrying = Retrying(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(self.retry.max_attempts) | stop_after_delay(self.retry.max_seconds),
            wait=wait_random_exponential(multiplier=self.retry.initial_backoff, max=self.retry.max_backoff),
            before_sleep=lambda state: log.info(
                "retrying %s after %s (attempt %d)", what, state.outcome.exception(), state.attempt_number
            ),
            reraise=True,
        )
        try:
            return retrying(method, request=request, timeout=self.api_timeout, retry=None)
        except api_exceptions.GoogleAPICallError as error:
            if retryable(error):
                raise ProvisioningError(
                    f"{what} kept failing with transient errors for up to {self.retry.max_attempts} attempts "
                    f"or {self.retry.max_seconds:.0f}s; last: {error}"
                ) from error
            raise

    def _list_nodes(self, zone: str) -> list[tpu_v2.Node]:
        return self._list_pages(
            self.client.list_nodes, tpu_v2.ListNodesRequest, "nodes", zone, what=f"ListNodes in {zone}"
        )

    def _list_queued_resources(self, zone: str) -> list[tpu_v2.QueuedResource]:
        return self._list_pages(
            self.client.list_queued_resources,
            tpu_v2.ListQueuedResourcesRequest,
            "queued_resources",
            zone,
            what=f"ListQueuedResources in {zone}",
        )

    def _list_pages(self, method, request_type, field_name: str, zone: str, *, what: str) -> list:
        # One page per call so each page gets the retry policy; the pager's own iteration would
        # fetch later pages with no retries.
        items: list = []
        token = ""
        for _ in range(_MAX_PAGES):
            request = request_type(parent=zone_parent(self.project, zone), page_size=self.list_page_size, page_token=token)
            page = self._call(method, request, what=what)
            items.extend(getattr(page, field_name))
            token = page.next_page_token
            if not token:
                return items
        raise ProvisioningError(f"{what} returned more than {_MAX_PAGES} pages; giving up on the listing")

    def _peek_operation(self, name: str):
        try:
            return self.client.get_operation(request={"name": name}, timeout=self.api_timeout, retry=None)
        except api_exceptions.NotFound:
            log.info("operation %s expired before it was checked", name)
            return None
        except api_exceptions.GoogleAPICallError as error:
            log.info("could not check operation %s (%s); will check again", name, error)
            return None

    def _watcher(self, zone: str) -> _ZoneWatcher:
        with self._watchers_lock:
            watcher = self._watchers.get(zone)
            if watcher is None:
                watcher = self._watchers[zone] = _ZoneWatcher(self, zone)
            return watcher

    # -- verbs

    def create(
        self,
        spec: SliceSpec,
        zone: str,
        *,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
        queue_until: float | None = None,
    ) -> None:
        """POST the node (or queued resource). Returns once the API accepted it; never waits for
        the operation. Every POST takes a slot of the create rate limiter first. A per-minute rate
        limit is waited out and retried in the same zone until ``deadline``; any other refusal
        raises ``ZoneRefused`` with Google's verdict (next zone, skip, fatal). A name that already
        exists is adopted: names are unique per attempt, so it is ours (a retried POST whose first
        try landed). ``queue_until`` (monotonic) becomes a queued resource's queueing policy, so
        Google expires the request when the caller stops waiting."""
        parent = zone_parent(self.project, zone)
        if spec.queued:
            resource = queued_resource_request(spec, self.project, zone)
            if queue_until is not None:
                resource.queueing_policy = tpu_v2.QueuedResource.QueueingPolicy(
                    valid_until_duration=timedelta(seconds=max(1.0, queue_until - time.monotonic()))
                )
            request = tpu_v2.CreateQueuedResourceRequest(
                parent=parent, queued_resource_id=spec.name, queued_resource=resource
            )
            method, what = self.client.create_queued_resource, f"CreateQueuedResource {spec.name} in {zone}"
        else:
            request = tpu_v2.CreateNodeRequest(parent=parent, node_id=spec.name, node=node_request(spec))
            method, what = self.client.create_node, f"CreateNode {spec.name} in {zone}"
        watcher = self._watcher(zone)
        pause = cancel if cancel is not None else threading.Event()
        end = deadline if deadline is not None else time.monotonic() + self.retry.max_seconds
        for attempt in range(_MAX_POLLS):
            wait = self.create_limiter.reserve()
            if wait > 0 and (pause.wait(min(wait, max(0.0, end - time.monotonic()))) or time.monotonic() >= end):
                self._raise_if_cancelled(cancel, what)
                raise ZoneRefused(CreateVerdict(CreateAction.RATE_LIMITED, "create rate limiter",
                                                f"{what} found no create slot before its deadline"))
            try:
                operation = self._call(method, request, what=what, is_create=True)
            except api_exceptions.AlreadyExists:
                log.info("%s: already exists; adopting it", what)
                watcher.track(spec.name, queued=spec.queued, operation=None, capacity=spec.capacity)
                return
            except api_exceptions.GoogleAPICallError as error:
                verdict = classify_call_error(error, capacity=spec.capacity)
                if verdict.action is not CreateAction.RATE_LIMITED:
                    raise ZoneRefused(verdict) from error
                backoff = min(self.retry.max_backoff, self.retry.initial_backoff * 2**attempt)
                log.info("%s: rate limited (%s); retrying in %.1fs", what, error.message, backoff)
                if pause.wait(min(backoff, max(0.0, end - time.monotonic()))) or time.monotonic() >= end:
                    self._raise_if_cancelled(cancel, what)
                    raise ZoneRefused(verdict) from error
                continue
            watcher.track(spec.name, queued=spec.queued, operation=operation.operation.name, capacity=spec.capacity)
            return
        raise ProvisioningError(f"{what}: gave up after {_MAX_POLLS} attempts")

    @staticmethod
    def _raise_if_cancelled(cancel: threading.Event | None, what: str) -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"{what} was cancelled before it was sent")

    def guest_attributes(self, zone: str, name: str, namespace: str) -> list[dict[str, str]]:
        """Every worker's guest attributes under ``namespace/``, one entry per worker in worker
        order (the v2 API's answer has no worker ids): one API call."""
        request = tpu_v2.GetGuestAttributesRequest(name=node_resource_name(self.project, zone, name),
                                                   query_path=f"{namespace}/")
        response = self._call(self.client.get_guest_attributes, request, what=f"reading guest attributes of {name}")
        return [{item.key: item.value for item in entry.query_value.items if item.namespace == namespace}
                for entry in response.guest_attributes]

    def observe(self, zone: str) -> dict[str, SliceObservation]:
        """Every node in ``zone`` plus every slice this provisioner is creating there, by node id,
        from a listing at most one poll interval old (shared with every other caller)."""
        watcher = self._watcher(zone)
        return watcher.observations(watcher.snapshot())

    def acquire(
        self,
        spec: SliceSpec,
        zones: Sequence[str],
        *,
        deadline: float,
        cancel: threading.Event | None = None,
        on_progress: Callable[[str], None] | None = None,
        before_create: Callable[[str], None] | None = None,
        capacity_deadline: float | None = None,
    ) -> ReadySlice:
        """Create ``spec`` in the first of ``zones`` with capacity and wait until it is READY with
        every worker endpoint. No capacity moves on to the next zone; a zone (or region) that is
        not for this project is skipped with its reason; a refusal no retry heals raises
        ``CreateRejectedError`` at once, as does every zone being skipped. Anything else (the
        deadline, ``cancel``, any error) deletes what was created, verified, and raises.

        A queued resource waiting for capacity (WAITING_FOR_RESOURCES) waits until
        ``capacity_deadline`` (its queueing policy expires then too); ``deadline - now`` is the
        create budget, applied from the moment it is PROVISIONING.

        ``before_create(zone)`` runs before each create call, so a journal can record the
        resource before it exists."""
        if not zones:
            raise ValueError(f"acquire({spec.name!r}) needs at least one zone")
        report = _ProgressReporter(on_progress)
        started = time.monotonic()
        create_budget = deadline - started
        queue_until = max(capacity_deadline, deadline) if spec.queued and capacity_deadline is not None else None
        outcomes: dict[str, CreateVerdict] = {}
        skipped_regions: dict[str, CreateVerdict] = {}
        for zone in zones:
            if queue_until is not None and outcomes and time.monotonic() >= queue_until:
                break  # the queue expired: say so below rather than "deadline"
            self._raise_if_stopped(spec, zone, None, started, deadline if queue_until is None else queue_until, cancel)
            if region_of(zone) in skipped_regions:
                outcomes[zone] = skipped_regions[region_of(zone)]
                report(f"{zone}: skipped ({outcomes[zone].reason} in its region)")
                continue
            report(f"creating in {zone}")
            if before_create is not None:
                before_create(zone)
            try:
                self.create(spec, zone, deadline=deadline, cancel=cancel, queue_until=queue_until)
            except ZoneRefused as refused:
                outcome: ReadySlice | CreateVerdict = refused.verdict  # refused: nothing was created
            except BaseException as error:
                # The POST may have landed before it failed (a timeout): make sure nothing remains.
                self._cleanup(spec, zone, report, error)
                raise
            else:
                try:
                    outcome = self._await_ready(spec, zone, started, deadline, create_budget, queue_until, cancel, report)
                except BaseException as error:
                    self._cleanup(spec, zone, report, error)
                    raise
                if isinstance(outcome, ReadySlice):
                    return outcome
                self._cleanup(spec, zone, report, None)
            if outcome.action is CreateAction.FATAL:
                raise CreateRejectedError(
                    f"creating slice {spec.name} ({spec.tpu_type}, {spec.capacity}) in {zone} was refused: "
                    f"{outcome.describe()}. No retry can fix this; nothing was left behind."
                )
            if outcome.action in (CreateAction.RATE_LIMITED, CreateAction.TRANSIENT):
                raise ProvisioningError(
                    f"creating slice {spec.name} in {zone} was still refused at its deadline: {outcome.describe()}; "
                    "nothing was left behind"
                )
            outcomes[zone] = outcome
            if outcome.action is CreateAction.SKIP_REGION:
                skipped_regions[region_of(zone)] = outcome
            verb = "trying the next zone" if outcome.action is CreateAction.NEXT_ZONE else "skipping it"
            report(f"{zone}: {outcome.reason}; {verb}")
        listing = "; ".join(f"{zone}: {verdict.describe()}" for zone, verdict in outcomes.items())
        if all(verdict.action is CreateAction.SKIP_ZONE for verdict in outcomes.values()):
            raise NoUsableZoneError(
                f"no zone can take slice {spec.name} ({spec.tpu_type}, {spec.capacity}): {listing}. "
                "Nothing was left behind; fix the zones or the project, waiting will not help."
            )
        raise CapacityUnavailableError(
            f"no capacity for slice {spec.name} ({spec.tpu_type}, {spec.capacity}) in any of its zones: "
            + listing
            + ". Nothing was left behind; retry later or add zones."
        )

    def _await_ready(
        self,
        spec: SliceSpec,
        zone: str,
        started: float,
        deadline: float,
        create_budget: float,
        queue_until: float | None,
        cancel: threading.Event | None,
        report: _ProgressReporter,
    ) -> ReadySlice | CreateVerdict:
        """The ready slice, or Google's verdict on why the zone cannot have it.

        While listings fail (an API outage) the last observation is kept, marked stale, and the
        wait goes on: only the deadline, a cancel or a terminal state ends it. A queued resource
        not yet granted waits until ``queue_until``; the create budget runs from PROVISIONING."""
        watcher = self._watcher(zone)
        pause = cancel if cancel is not None else threading.Event()
        peeked_after_gone = False
        last: SliceObservation | None = None
        last_listed = time.monotonic()
        provisioning_since: float | None = None
        outage_logged: ProvisioningError | None = None
        for _ in range(_MAX_POLLS):
            try:
                observation = watcher.observations(watcher.snapshot())[spec.name]
            except ProvisioningError as error:
                if outage_logged is None:
                    log.warning("listing %s failed (%s); keeping the last observation until it answers", zone, error)
                    outage_logged = error
                observation = None
            else:
                if outage_logged is not None:
                    log.warning("listing %s answers again after %.0fs", zone, time.monotonic() - last_listed)
                outage_logged = None
            if observation is None:
                silent = time.monotonic() - last_listed
                if last is not None:
                    report(_replace(last, stale_for=silent).describe())
                else:
                    report(f"not observed yet (the API has not answered for {silent:.0f}s)")
            else:
                last_listed = time.monotonic()
                tracked_operation = watcher.pending_operation(spec.name)
                if observation.state == GONE and tracked_operation and not peeked_after_gone:
                    # It vanished: a failed create operation says why (stockout deletes the node).
                    peeked_after_gone = True
                    watcher.peek_operation(tracked_operation)
                    continue
                last = observation
                report(observation.describe())
                if observation.ready:
                    return missing_external_ips(spec, observation) or ReadySlice(
                        spec, zone, observation.resource_name, observation.endpoints, observation.external_ips)
                if observation.state == CREATE_FAILED:
                    return observation.verdict or CreateVerdict(
                        CreateAction.FATAL, "create failed", observation.error or "no reason given"
                    )
                if observation.lost:
                    return CreateVerdict(
                        CreateAction.NEXT_ZONE,
                        f"slice {observation.state} before it became ready",
                        observation.error or observation.state,
                    )
                waiting = spec.queued and observation.queued_state in (None, "CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES")
                if not waiting and provisioning_since is None:
                    provisioning_since = time.monotonic()
            if queue_until is not None and provisioning_since is None:
                # Google expires the request at queue_until; a few more polls see it FAILED.
                effective = queue_until + _EXPIRY_GRACE_POLLS * self.poll_interval
            elif queue_until is not None:
                effective = provisioning_since + create_budget
            else:
                effective = deadline
            self._raise_if_stopped(spec, zone, last, started, effective, cancel)
            pause.wait(max(0.0, min(self.poll_interval, effective - time.monotonic())))
        raise ProvisioningError(f"gave up watching {spec.name} in {zone} after {_MAX_POLLS} polls; last: {last}")

    def _raise_if_stopped(
        self,
        spec: SliceSpec,
        zone: str,
        observation: SliceObservation | None,
        started: float,
        deadline: float,
        cancel: threading.Event | None,
    ) -> None:
        last = f"; last state {observation.describe()}" if observation else ""
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"acquiring slice {spec.name} in {zone} was cancelled{last}")
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"slice {node_resource_name(self.project, zone, spec.name)} ({spec.tpu_type}) was not READY "
                f"with all its worker endpoints by its deadline ({deadline - started:.1f}s after acquire "
                f"started){last}; nothing of it is left. Raise the provisioning timeout or try other zones."
            )

    def _cleanup(self, spec: SliceSpec, zone: str, report: _ProgressReporter, cause: BaseException | None) -> None:
        report(f"deleting {spec.name} in {zone}")
        try:
            self.delete(spec.name, zone, deadline=time.monotonic() + self.cleanup_timeout, queued=spec.queued)
        except Exception as error:
            if cause is None:
                raise
            cause.add_note(f"deleting {spec.name} in {zone} afterwards failed too: {error}")
            log.error("could not delete %s in %s after %s: %s", spec.name, zone, cause, error)

    def delete(self, name: str, zone: str, *, deadline: float, queued: bool = False) -> None:
        """Delete a node (or a queued resource with force, which deletes its node too) and return
        once a listing made after the request shows it gone. Idempotent: NotFound is success.

        A CREATING node can be deleted (the real API and the emulator both accept it; the
        emulator aborts its create operation). A refusal for now (FAILED_PRECONDITION, 409
        ABORTED "unable to queue the operation" while another operation runs) and transient
        failures that outlast one retry round are retried until ``deadline``, as is a request for
        a resource that is still listed and not DELETING. At the deadline the error (and the log)
        names what is left and the exact command that deletes it.
        """
        watcher = self._watcher(zone)
        watcher.mark_deleting(name, queued=queued)
        issued_at = time.monotonic()
        accepted = self._issue_delete(name, zone, queued=queued, node=not queued)
        node = qr = None
        confirmed = False
        for _ in range(_MAX_POLLS):
            time.sleep(max(0.0, min(self.poll_interval, deadline - time.monotonic())))
            try:
                snapshot = watcher.snapshot()
            except ProvisioningError as error:
                log.warning("listing %s while deleting %s failed (%s); will look again", zone, name, error)
                snapshot = None
            if snapshot is not None:
                node = snapshot.nodes.get(name)
                qr = snapshot.queued.get(name) if queued else None
                current = snapshot.taken_at > issued_at and (not queued or snapshot.queued_taken_at > issued_at)
                if node is None and qr is None and current and accepted:
                    watcher.untrack(name)
                    return
                confirmed = True
            if time.monotonic() >= deadline:
                raise self._deletion_left_behind(name, zone, queued, node, qr, confirmed)
            interval = self._reissue_interval if accepted else 2 * self.poll_interval
            qr_pending = qr is not None and _qr_state_name(qr) != "DELETING"
            node_pending = node is not None and _enum_name(node.state) != "DELETING" and (not queued or qr is None)
            if time.monotonic() - issued_at >= interval and (qr_pending or node_pending or not accepted):
                issued_at = time.monotonic()
                accepted = self._issue_delete(
                    name, zone, queued=qr_pending or (queued and not accepted), node=node_pending or (not queued and not accepted)
                )
        raise ProvisioningError(f"gave up verifying the deletion of {name} in {zone} after {_MAX_POLLS} polls")

    def _deletion_left_behind(self, name, zone, queued, node, qr, confirmed) -> DeadlineExceeded:
        """The loud error of a deletion that did not finish: what is left and how to delete it."""
        if node is not None:
            state = _enum_name(node.state)
        elif qr is not None:
            state = f"queued resource {_qr_state_name(qr)}"
        else:
            state = "not yet confirmed gone" if confirmed else "unknown: the API did not answer"
        if queued:
            command = f"gcloud compute tpus queued-resources delete {name} --zone={zone} --project={self.project} --force --quiet"
            resource = queued_resource_name(self.project, zone, name)
        else:
            command = f"gcloud compute tpus tpu-vm delete {name} --zone={zone} --project={self.project} --quiet"
            resource = node_resource_name(self.project, zone, name)
        message = (
            f"{resource} may still exist ({state}) at the deadline of its deletion and may be billed: "
            f"delete it with `{command}` (or run `fray-tpu gc`)"
        )
        log.error("LEFT BEHIND: %s", message)
        return DeadlineExceeded(message)

    @property
    def _reissue_interval(self) -> float:
        return max(4 * self.poll_interval, 1.0)

    def _issue_delete(self, name: str, zone: str, *, queued: bool, node: bool) -> bool:
        """Send the delete request(s); False when one was refused for now (to be sent again)."""
        requests = []
        if queued:
            requests.append(
                (
                    self.client.delete_queued_resource,
                    tpu_v2.DeleteQueuedResourceRequest(name=queued_resource_name(self.project, zone, name), force=True),
                    f"DeleteQueuedResource {name} in {zone}",
                )
            )
        if node:
            requests.append(
                (
                    self.client.delete_node,
                    tpu_v2.DeleteNodeRequest(name=node_resource_name(self.project, zone, name)),
                    f"DeleteNode {name} in {zone}",
                )
            )
        accepted = True
        for method, request, what in requests:
            try:
                self._call(method, request, what=what)
            except api_exceptions.NotFound:
                pass  # already gone: deleting is idempotent
            except (api_exceptions.FailedPrecondition, api_exceptions.Aborted) as error:
                log.info("%s refused for now (%s); will retry", what, error.message)
                accepted = False
            except ProvisioningError as error:  # transient failures outlasted one retry round
                log.warning("%s: %s; will retry until the deletion deadline", what, error)
                accepted = False
        return accepted

    def list_managed(self, zones: Sequence[str], labels: Mapping[str, str] = {}) -> list[SliceObservation]:  # noqa: B006
        """Every node and queued resource in ``zones`` that carries fray-tpu's labels and every
        label of ``labels``, freshly listed (for gc and orphan detection). A queued resource and
        its node are one observation (``queued_state`` set)."""
        found: list[SliceObservation] = []
        for zone in zones:
            queued = {_short_name(qr.name): qr for qr in self._list_queued_resources(zone)}
            nodes = {_short_name(node.name): node for node in self._list_nodes(zone)}
            for name, node in nodes.items():
                if _is_managed(node.labels, labels):
                    found.append(_node_observation(node, zone, queued.get(name)))
            for name, qr in queued.items():
                qr_labels = _queued_labels(qr)
                if name in nodes or not _is_managed(qr_labels, labels):
                    continue
                state = _qr_state_name(qr)
                error, verdict = _qr_error(qr) if state == "FAILED" else (None, None)
                found.append(
                    SliceObservation(
                        name=name,
                        zone=zone,
                        resource_name=qr.name,
                        state=CREATE_FAILED if state == "FAILED" else CREATING,
                        health=None,
                        endpoints=(),
                        labels=qr_labels,
                        error=error,
                        queued_state=state,
                        verdict=verdict,
                    )
                )
        return found

    def close(self) -> None:
        """Close the client's channel; the provisioner is unusable afterwards."""
        self.client.transport.close()


_MAX_PAGES = 1000
_EXPIRY_GRACE_POLLS = 10
# Bounds the wait loops; deadlines end them long before in practice.
_MAX_POLLS = 10_000_000


def _is_managed(resource_labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    if resource_labels.get(naming.LABEL_MANAGED) != naming.MANAGED_VALUE:
        return False
    return all(resource_labels.get(key) == value for key, value in wanted.items())


class _ProgressReporter:
    """Calls ``on_progress`` once per distinct line; a failing callback never breaks acquire."""

    def __init__(self, on_progress: Callable[[str], None] | None):
        self._on_progress = on_progress
        self._last: str | None = None

    def __call__(self, line: str) -> None:
        if line == self._last or self._on_progress is None:
            return
        self._last = line
        try:
            self._on_progress(line)
        except Exception:
            log.exception("progress callback failed on %r", line)
