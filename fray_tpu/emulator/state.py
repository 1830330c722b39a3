"""The emulated Cloud TPU's state machines: nodes, queued resources and operations.

No I/O. Every public method takes the world lock; time comes from injected clocks. Transitions
that happen by themselves (CREATING → READY, DELETING → gone, ...) carry a due time;
``advance(now)`` applies every transition that is due and returns the side effects (boot or kill
hosts) for the caller to carry out outside the lock, in order.
"""

from __future__ import annotations

import base64
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from google.cloud.tpu_v2.types import cloud_tpu
from google.protobuf import empty_pb2, message
from google.rpc import code_pb2

from fray_tpu.emulator import catalog, validation
from fray_tpu.emulator.render import node_pb, queued_resource_pb
from fray_tpu.emulator.timings import EmulatorTimings
from fray_tpu.emulator.validation import (
    ApiError,
    Location,
    check_labels,
    check_metadata,
    check_resource_id,
    check_tags,
    check_runtime_version,
    invalid,
    not_found,
    parse_location,
    parse_resource_name,
    resolve_accelerator_type,
)
from fray_tpu.topology import region_of


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
STOCKOUT_MESSAGE = (
    "There is no more capacity in the zone \"{zone}\"; you can try in another zone where Cloud TPU "
    "Nodes are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x{eid}]"
)
# A queued resource whose queueing policy expired before capacity came. The code is our best
# reading of the API (unverified against a real expiry): the request's deadline passed.
QR_EXPIRED_CODE = code_pb2.DEADLINE_EXCEEDED
QR_EXPIRED_MESSAGE = (
    "Queued resource {name} could not be provisioned before the valid_until time of its queueing "
    "policy; there was not enough capacity in the zone"
)
# An organization policy (constraints/compute.vmExternalIpAccess) forbids the VMs' external IPs:
# GCE's wording (its 412 conditionNotMet); that the TPU API reports it on the create operation is
# our reading, unverified against a real project.
EXTERNAL_IP_POLICY_MESSAGE = (
    "Constraint constraints/compute.vmExternalIpAccess violated for project {project}. Add instance "
    "projects/{project}/zones/{zone}/instances/{node} to the constraint to use external IP with it."
)
_MAX_ADVANCE_PASSES = 16
MAX_OPERATIONS = 10_000


@dataclass(frozen=True)
class HostBoot:
    """Everything the host runtime needs to boot the VMs of one READY node."""

    uid: int
    name: str
    project: str
    project_number: int
    zone: str
    node_id: str
    accelerator_type: str
    runtime_version: str
    ips: tuple[str, ...]
    agent_port: int
    metadata: dict[str, str]
    labels: dict[str, str]
    hostname_endpoints: bool = False  # serve worker-network-endpoints in the newer hostname-only format
    # One per VM when the node was created with enable_external_ips: a second loopback address,
    # NAT'd to the VM's own (the VM never sees it on an interface, as on GCE).
    external_ips: tuple[str, ...] = ()
    service_account: str = ""  # the VMs' service account (the project's default compute one if unset)


@dataclass(frozen=True)
class Effect:
    """A side effect for the host runtime: ``boot`` (with ``boot``), ``preempt_flag``, ``kill`` or
    ``discard`` (a deleted node's disks)."""

    kind: str
    uid: int
    boot: HostBoot | None = None


@dataclass
class NodeRecord:
    name: str
    location: Location
    node_id: str
    uid: int
    spec: message.Message  # the Node the caller sent: labels, metadata, configs as given
    accelerator_type: str
    vm_count: int
    state: str
    create_time: float
    due: float | None
    stockout: bool = False
    create_error: tuple[int, str] | None = None  # the create operation fails with this when due
    ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()  # access_config.external_ip per worker (enable_external_ips)
    create_operation: str | None = None
    queued_resource: str = ""
    multislice: bool = False
    preempt_kill_at: float | None = None
    agent_port: int = catalog.DEFAULT_AGENT_PORT
    health: str | None = None  # a fault-set Node.Health name; None: derived from the state
    endpoint_order: tuple[int, ...] | None = None  # a fault-set order of network_endpoints


def service_account_of(record: NodeRecord) -> str:
    """The node's service account: as created, else the project's default compute one."""
    email = record.spec.service_account.email
    return email or f"{catalog.project_number(record.location.project)}-compute@developer.gserviceaccount.com"


@dataclass(frozen=True)
class PlannedNode:
    """A node a queued resource creates once it is granted."""

    location: Location
    node_id: str
    spec: message.Message
    accelerator_type: str
    multislice: bool


@dataclass
class QueuedRecord:
    name: str
    location: Location
    qr_id: str
    spec: message.Message  # the QueuedResource the caller sent
    nodes_to_create: list[PlannedNode]
    state: str
    create_time: float
    due: float | None
    expires_at: float | None = None  # queueing_policy's valid_until (emulator clock)
    state_initiator: str = "USER"
    error: tuple[int, str] | None = None
    node_names: list[str] = field(default_factory=list)


@dataclass
class OperationRecord:
    name: str
    location: Location
    target: str
    verb: str
    create_time: float
    done: bool = False
    end_time: float | None = None
    response: message.Message | None = None
    error: tuple[int, str] | None = None
    cancel_requested: bool = False
    finish_at: float | None = None  # when the pending outcome becomes visible
    waits_for_gone: str | None = None  # a delete operation finishes when this resource is gone


@dataclass
class Stockout:
    remaining: int | None  # None: until cleared
    delay: float | None  # None: timings.stockout_delay


CREATE_METHODS = frozenset({"CreateNode", "CreateQueuedResource"})


@dataclass
class Refusal:
    """A fault that answers calls the way Google refuses them (see ``Control.refuse``)."""

    kind: str
    zone: str | None  # None: every zone
    methods: frozenset[str] | None  # None: every method
    remaining: int | None  # None: until cleared

    def applies(self, method: str, zone: str | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.zone is None:
            return True
        if zone is None:
            return False
        return zone == self.zone or (self.kind == "region_quota" and region_of(zone) == region_of(self.zone))


def refusal_error(kind: str, method: str, project: str, zone: str | None) -> ApiError:
    where = f"projects/{project}/locations/{zone or '-'}"
    if kind == "forbidden_zone":
        return validation.location_forbidden(project, zone or "-")
    if kind == "api_disabled":
        return validation.api_disabled(project)
    if kind == "unauthenticated":
        return validation.unauthenticated()
    if kind == "permission_denied":
        verb = "queuedResources" if "Queued" in method else "nodes"
        return validation.permission_denied(f"tpu.{verb}.create", where)
    if kind == "rate_limit":
        return validation.rate_limited(method, str(catalog.project_number(project)))
    if kind in ("zone_quota", "region_quota"):
        return validation.resource_quota(zone or "-", per_region=kind == "region_quota")
    raise ValueError(f"unknown refusal kind {kind!r}; kinds: {', '.join(REFUSAL_KINDS)}")


# kind → the methods it refuses (None: every method).
REFUSAL_KINDS: dict[str, frozenset[str] | None] = {
    "forbidden_zone": None,
    "api_disabled": None,
    "unauthenticated": None,
    "permission_denied": CREATE_METHODS,
    "rate_limit": CREATE_METHODS,
    "zone_quota": CREATE_METHODS,
    "region_quota": CREATE_METHODS,
}


# The IAM permission each method needs (what a denied service account's call is refused for).
METHOD_PERMISSIONS = {
    "CreateNode": "tpu.nodes.create",
    "GetNode": "tpu.nodes.get",
    "ListNodes": "tpu.nodes.list",
    "DeleteNode": "tpu.nodes.delete",
    "GetGuestAttributes": "tpu.nodes.get",
    "CreateQueuedResource": "tpu.queuedResources.create",
    "GetQueuedResource": "tpu.queuedResources.get",
    "ListQueuedResources": "tpu.queuedResources.list",
    "DeleteQueuedResource": "tpu.queuedResources.delete",
    "GetOperation": "tpu.operations.get",
}


@dataclass
class InjectedFailure:
    code: int
    remaining: int


class IpAllocator:
    """Distinct loopback addresses 127.A.B.C: A fixed per emulator, B.C counting from ``start``.

    Two emulators on one machine pick A and ``start`` at random, so their hosts' addresses (and
    the agent port on them) practically never collide.
    """

    ADDRESSES_PER_OCTET = 256 * 254

    def __init__(self, first_octet: int, start: int = 0):
        if not 1 <= first_octet <= 254:
            raise ValueError(f"first octet {first_octet} must be in 1..254")
        self.first_octet = first_octet
        self._next = itertools.count(start)

    def allocate(self) -> str:
        index = next(self._next) % self.ADDRESSES_PER_OCTET
        return f"127.{self.first_octet}.{index // 254}.{index % 254 + 1}"


def page_names(names: list[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    """Keyset paging over sorted names: the token is the last name of the previous page."""
    if page_size < 0:
        raise invalid(f"page_size must be >= 0, got {page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = ""
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            raise invalid(f"Invalid page_token {page_token!r}; pass the next_page_token of the previous page")
    remaining = [name for name in sorted(names) if name > after]
    page = remaining[:size]
    more = len(remaining) > size
    return page, base64.urlsafe_b64encode(page[-1].encode()).decode() if more else ""


def _matches(patterns: set[str], name: str, short_id: str) -> bool:
    """A hold pattern with '/' is a full-name prefix; without, a resource-id prefix."""
    return any(name.startswith(p) if "/" in p else short_id.startswith(p) for p in patterns)


class World:
    def __init__(
        self,
        timings: EmulatorTimings,
        ip_allocator: IpAllocator,
        agent_port: int = catalog.DEFAULT_AGENT_PORT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.cond = threading.Condition()
        self.timings = timings
        self.agent_port = agent_port
        self._ips = ip_allocator
        self._clock = clock
        self._wall = wall_clock
        self._uids = itertools.count(int(wall_clock()) % 1_000_000 * 1000 + 1)
        self.nodes: dict[str, NodeRecord] = {}
        self.queued: dict[str, QueuedRecord] = {}
        self.operations: dict[str, OperationRecord] = {}
        self.counters: dict[str, int] = {}
        self.stockouts: dict[str, Stockout] = {}
        self.refusals: list[Refusal] = []
        self.storms: dict[str, tuple[int, float]] = {}  # method → (code, until)
        self.injected: dict[str, list[InjectedFailure]] = {}
        self.holds: set[str] = set()
        self.never_finish = False
        self.reverse_endpoints = False  # nodes made READY list their endpoints in reverse worker order
        self.hostname_endpoints = False  # hosts booted serve hostname-only worker-network-endpoints
        self.external_ips_forbidden = False  # an org policy forbids external IPs: such creates fail
        # Service account email -> the permissions it lacks (calls made with its token are refused).
        self.denied_permissions: dict[str, set[str]] = {}
        self.withdrawn: set[tuple[str, str]] = set()  # (zone, accelerator type) no longer offered
        self._effects: list[Effect] = []
        self.dirty = False
        self.closed = False

    # ----------------------------------------------------------------- bookkeeping

    def changed(self) -> None:
        """Wake the ticker and every waiter; call with the lock held."""
        self.dirty = True
        self.cond.notify_all()

    def record_call(self, method: str) -> ApiError | None:
        """Count an API call; return the injected failure it must answer with, if any."""
        with self.cond:
            self.counters[method] = self.counters.get(method, 0) + 1
            storm = self.storms.get(method)
            if storm is not None:
                if self._clock() < storm[1]:
                    return ApiError(storm[0], f"Injected outage of {method} (emulator fault control)")
                del self.storms[method]
            queue = self.injected.get(method, [])
            if not queue:
                return None
            failure = queue[0]
            failure.remaining -= 1
            if failure.remaining <= 0:
                queue.pop(0)
            return ApiError(failure.code, f"Injected failure of {method} (emulator fault control)")

    def now(self) -> float:
        return self._clock()

    def offered(self, zone: str) -> tuple[str, ...]:
        """The accelerator types ``zone`` offers now."""
        with self.cond:
            return tuple(t for t in catalog.accelerator_types_in_zone(zone) if (zone, t) not in self.withdrawn)

    def refusal(self, method: str, project: str, zone: str | None) -> ApiError | None:
        """The refusal fault a call of ``method`` in ``zone`` answers with, if any (counted down)."""
        with self.cond:
            for refusal in self.refusals:
                if refusal.applies(method, zone):
                    if refusal.remaining is not None:
                        refusal.remaining -= 1
                        if refusal.remaining <= 0:
                            self.refusals.remove(refusal)
                    return refusal_error(refusal.kind, method, project, zone)
            return None

    def permission_refusal(self, method: str, principal: str | None, resource: str) -> ApiError | None:
        """403 when the caller (a VM's service account, by its token) lacks ``method``'s permission."""
        permission = METHOD_PERMISSIONS.get(method)
        if principal is None or permission is None:
            return None
        with self.cond:
            denied = permission in self.denied_permissions.get(principal, ())
        return validation.permission_denied(permission, resource) if denied else None

    def _new_operation(self, location: Location, target: str, verb: str) -> OperationRecord:
        self._forget_old_operations()
        stamp = int(self._wall() * 1000)
        name = f"{location.name}/operations/operation-{stamp}-{uuid.uuid4().hex[:24]}"
        operation = OperationRecord(name, location, target, verb, self._wall())
        self.operations[name] = operation
        return operation

    def _forget_old_operations(self) -> None:
        """Keep memory bounded in long runs: drop the oldest finished operations past a cap."""
        if len(self.operations) < MAX_OPERATIONS:
            return
        finished = [name for name, o in self.operations.items() if o.done]
        for name in finished[: len(self.operations) - MAX_OPERATIONS + 1]:
            del self.operations[name]

    def _finish(self, operation: OperationRecord, at: float, response=None, error=None) -> None:
        operation.finish_at = at
        operation.response = response
        operation.error = error

    # ----------------------------------------------------------------- nodes

    def _validated_node(self, location: Location, node_id: str, node: message.Message, field_name: str):
        check_resource_id(node_id, field_name)
        config = node.accelerator_config
        config_type = cloud_tpu.AcceleratorConfig.Type(config.type_).name if config.type_ else ""
        accelerator_type = resolve_accelerator_type(node.accelerator_type, config_type, config.topology, location.zone)
        if (location.zone, accelerator_type) in self.withdrawn:
            raise validation.not_in_zone(accelerator_type, location.zone)
        check_runtime_version(node.runtime_version, accelerator_type)
        check_labels(dict(node.labels))
        check_metadata(dict(node.metadata))
        check_tags(list(node.tags))
        name = f"{location.name}/nodes/{node_id}"
        if name in self.nodes:
            raise ApiError(code_pb2.ALREADY_EXISTS, f"Resource '{name}' already exists")
        return name, accelerator_type

    def _consume_stockout(self, zone: str) -> tuple[bool, float]:
        stockout = self.stockouts.get(zone)
        if stockout is None:
            return False, 0.0
        if stockout.remaining is not None:
            stockout.remaining -= 1
            if stockout.remaining <= 0:
                del self.stockouts[zone]
        return True, self.timings.stockout_delay if stockout.delay is None else stockout.delay

    def _add_node(
        self, location, node_id, name, accelerator_type, spec, due, queued_resource="", multislice=False
    ) -> NodeRecord:
        shape = catalog.lookup_accelerator_type(accelerator_type)
        record = NodeRecord(
            name=name,
            location=location,
            node_id=node_id,
            uid=next(self._uids),
            spec=spec,
            accelerator_type=accelerator_type,
            vm_count=shape.vm_count,
            state="CREATING",
            create_time=self._wall(),
            due=due,
            queued_resource=queued_resource,
            multislice=multislice,
            agent_port=self.agent_port,
        )
        self.nodes[name] = record
        return record

    def create_node(self, parent: str, node_id: str, node: message.Message) -> OperationRecord:
        with self.cond:
            location = parse_location(parent)
            name, accelerator_type = self._validated_node(location, node_id, node, "node_id")
            stockout, stockout_delay = self._consume_stockout(location.zone)
            now = self._clock()
            due = now + (stockout_delay if stockout else self.timings.create_delay)
            record = self._add_node(location, node_id, name, accelerator_type, node, due)
            record.stockout = stockout
            if self.external_ips_forbidden and node.network_config.enable_external_ips:
                # GCE refuses the VMs, so the create operation fails (the POST itself is accepted).
                record.create_error = (code_pb2.FAILED_PRECONDITION, EXTERNAL_IP_POLICY_MESSAGE.format(
                    project=catalog.project_number(location.project), zone=location.zone, node=node_id))
            operation = self._new_operation(location, name, "create")
            record.create_operation = operation.name
            self.changed()
            return operation

    def get_node(self, name: str) -> NodeRecord:
        with self.cond:
            parse_resource_name(name, "nodes")
            record = self.nodes.get(name)
            if record is None:
                raise not_found(name)
            return record

    def list_nodes(self, parent: str, page_size: int, page_token: str) -> tuple[list[NodeRecord], str]:
        with self.cond:
            location = parse_location(parent, allow_wildcard=True)
            names = [
                n.name
                for n in self.nodes.values()
                if n.location.project == location.project and location.zone in ("-", n.location.zone)
            ]
            page, token = page_names(names, page_size, page_token)
            return [self.nodes[name] for name in page], token

    def delete_node(self, name: str) -> OperationRecord:
        with self.cond:
            location, _ = parse_resource_name(name, "nodes")
            record = self.nodes.get(name)
            if record is None:
                raise not_found(name)
            self._start_node_deletion(record, self._clock())
            operation = self._new_operation(location, name, "delete")
            operation.waits_for_gone = name
            self.changed()
            return operation

    def _start_node_deletion(self, record: NodeRecord, now: float) -> None:
        if record.state == "DELETING":
            return
        if record.state == "CREATING" and record.create_operation in self.operations:
            operation = self.operations[record.create_operation]
            if not operation.done and operation.finish_at is None:
                self._finish(operation, now, error=(code_pb2.ABORTED, f"Node {record.name} was deleted while creating"))
        if record.ips:
            self._effects.append(Effect("kill", record.uid))
        record.state = "DELETING"
        record.preempt_kill_at = None
        record.due = now + self.timings.delete_delay

    def _make_ready(self, record: NodeRecord, now: float) -> None:
        record.state = "READY"
        record.due = None
        record.ips = tuple(self._ips.allocate() for _ in range(record.vm_count))
        if record.spec.network_config.enable_external_ips:
            record.external_ips = tuple(self._ips.allocate() for _ in range(record.vm_count))
        if self.reverse_endpoints:
            record.endpoint_order = tuple(reversed(range(record.vm_count)))
        spec = record.spec
        self._effects.append(
            Effect(
                "boot",
                record.uid,
                HostBoot(
                    uid=record.uid,
                    name=record.name,
                    project=record.location.project,
                    project_number=catalog.project_number(record.location.project),
                    zone=record.location.zone,
                    node_id=record.node_id,
                    accelerator_type=record.accelerator_type,
                    runtime_version=spec.runtime_version,
                    ips=record.ips,
                    agent_port=self.agent_port,
                    metadata=dict(spec.metadata),
                    labels=dict(spec.labels),
                    hostname_endpoints=self.hostname_endpoints,
                    external_ips=record.external_ips,
                    service_account=service_account_of(record),
                ),
            )
        )
        operation = self.operations.get(record.create_operation or "")
        if operation is not None and not operation.done and operation.finish_at is None:
            self._finish(operation, now + self.timings.operation_lag, response=node_pb(record))

    def _fail_stockout(self, record: NodeRecord, now: float) -> None:
        message_text = STOCKOUT_MESSAGE.format(zone=record.location.zone, eid=uuid.uuid4().hex[:16])
        self._fail_create(record, now, (code_pb2.RESOURCE_EXHAUSTED, message_text))

    def _fail_create(self, record: NodeRecord, now: float, error: tuple[int, str]) -> None:
        """The create fails on its operation and the node goes away."""
        operation = self.operations.get(record.create_operation or "")
        if operation is not None and not operation.done:
            self._finish(operation, now, error=error)
        del self.nodes[record.name]

    def preempt_node(self, name: str) -> NodeRecord:
        with self.cond:
            record = self._resolve_node(name)
            if record.state != "READY":
                raise ValueError(f"node {record.name} is {record.state}; only a READY node can be preempted")
            if record.preempt_kill_at is None:
                self._effects.append(Effect("preempt_flag", record.uid))
                record.preempt_kill_at = self._clock() + self.timings.preempt_notice
            self.changed()
            return record

    def repair_node(self, name: str, seconds: float) -> NodeRecord:
        """A READY node goes REPAIRING (its VMs stay up) and is READY again after ``seconds``."""
        with self.cond:
            record = self._resolve_node(name)
            if record.state != "READY":
                raise ValueError(f"node {record.name} is {record.state}; only a READY node can be repaired")
            record.state = "REPAIRING"
            record.due = self._clock() + seconds
            self.changed()
            return record

    def set_node_health(self, name: str, health: str | None) -> NodeRecord:
        with self.cond:
            record = self._resolve_node(name)
            record.health = health
            self.changed()
            return record

    def vanish_node(self, name: str) -> NodeRecord:
        with self.cond:
            record = self._resolve_node(name)
            if record.ips:
                self._effects.append(Effect("kill", record.uid))
            del self.nodes[record.name]
            self.changed()
            return record

    def _resolve_node(self, name: str) -> NodeRecord:
        """A node by full name, or by node id when exactly one node has it."""
        if name in self.nodes:
            return self.nodes[name]
        matches = [n for n in self.nodes.values() if n.node_id == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted(self.nodes)) or "none"
        raise ValueError(f"no single node named {name!r}; nodes alive: {known}")

    def node_named(self, name: str) -> NodeRecord:
        with self.cond:
            return self._resolve_node(name)

    # ----------------------------------------------------------------- queued resources

    def create_queued_resource(self, parent: str, qr_id: str, queued: message.Message) -> OperationRecord:
        with self.cond:
            location = parse_location(parent)
            check_resource_id(qr_id, "queued_resource_id")
            name = f"{location.name}/queuedResources/{qr_id}"
            if name in self.queued:
                raise ApiError(code_pb2.ALREADY_EXISTS, f"Resource '{name}' already exists")
            if not queued.tpu.node_spec:
                raise invalid("Field 'queued_resource.tpu.node_spec' is required")
            planned: list[PlannedNode] = []
            for index, spec in enumerate(queued.tpu.node_spec):
                spec_location = parse_location(spec.parent)
                if spec_location != location:
                    raise invalid(f"node_spec[{index}].parent {spec.parent!r} must equal the parent {parent!r}")
                params = spec.multislice_params
                if spec.node_id and params.node_count:
                    raise invalid(f"node_spec[{index}]: set only one of 'node_id' and 'multislice_params'")
                if params.node_count:
                    if params.node_count < 1:
                        raise invalid(f"node_spec[{index}].multislice_params.node_count must be >= 1")
                    prefix = params.node_id_prefix or qr_id
                    ids = [f"{prefix}-{i}" for i in range(params.node_count)]
                    multislice = True
                else:
                    ids = [spec.node_id]
                    multislice = False
                for node_id in ids:
                    _, accelerator_type = self._validated_node(
                        location, node_id, spec.node, f"node_spec[{index}].node_id"
                    )
                    if any(p.node_id == node_id for p in planned):
                        raise invalid(f"node id {node_id!r} appears twice in the queued resource")
                    planned.append(PlannedNode(location, node_id, spec.node, accelerator_type, multislice))
            now = self._clock()
            record = QueuedRecord(
                name=name,
                location=location,
                qr_id=qr_id,
                spec=queued,
                nodes_to_create=planned,
                state="WAITING_FOR_RESOURCES",
                create_time=self._wall(),
                due=now + self.timings.qr_wait_delay,
                expires_at=self._valid_until(queued.queueing_policy, now),
            )
            self.queued[name] = record
            operation = self._new_operation(location, name, "create")
            self._finish(operation, now + self.timings.operation_lag, response=queued_resource_pb(record))
            self.changed()
            return operation

    def _valid_until(self, policy: message.Message, now: float) -> float | None:
        """When an unfulfilled queued resource expires: ``valid_until_duration`` from now, or
        ``valid_until_time`` (wall clock) mapped onto the emulator clock."""
        if policy.HasField("valid_until_duration"):
            return now + policy.valid_until_duration.ToTimedelta().total_seconds()
        if policy.HasField("valid_until_time"):
            return now + (policy.valid_until_time.ToDatetime().timestamp() - self._wall())
        return None

    def get_queued_resource(self, name: str) -> QueuedRecord:
        with self.cond:
            parse_resource_name(name, "queuedResources")
            record = self.queued.get(name)
            if record is None:
                raise not_found(name)
            return record

    def list_queued_resources(self, parent: str, page_size: int, page_token: str) -> tuple[list[QueuedRecord], str]:
        with self.cond:
            location = parse_location(parent, allow_wildcard=True)
            names = [
                q.name
                for q in self.queued.values()
                if q.location.project == location.project and location.zone in ("-", q.location.zone)
            ]
            page, token = page_names(names, page_size, page_token)
            return [self.queued[name] for name in page], token

    def delete_queued_resource(self, name: str, force: bool) -> OperationRecord:
        with self.cond:
            location, _ = parse_resource_name(name, "queuedResources")
            record = self.queued.get(name)
            if record is None:
                raise not_found(name)
            live_nodes = [self.nodes[n] for n in record.node_names if n in self.nodes]
            if live_nodes and not force:
                raise ApiError(
                    code_pb2.FAILED_PRECONDITION,
                    f"Queued resource {name} in state {record.state} still has nodes "
                    f"({', '.join(n.node_id for n in live_nodes)}); delete with force=true to delete them too",
                )
            now = self._clock()
            for node in live_nodes:
                self._start_node_deletion(node, now)
            if record.state != "DELETING":
                record.state = "DELETING"
                record.due = now + self.timings.delete_delay
            operation = self._new_operation(location, name, "delete")
            operation.waits_for_gone = name
            self.changed()
            return operation

    def _provision(self, record: QueuedRecord, now: float) -> None:
        record.state = "PROVISIONING"
        record.due = None
        names = [f"{p.location.name}/nodes/{p.node_id}" for p in record.nodes_to_create]
        taken = [name for name in names if name in self.nodes]
        if taken:
            record.state = "FAILED"
            record.state_initiator = "SERVICE"
            record.error = (code_pb2.ALREADY_EXISTS, f"Node(s) {', '.join(taken)} already exist")
            return
        for planned, name in zip(record.nodes_to_create, names):
            self._add_node(
                planned.location,
                planned.node_id,
                name,
                planned.accelerator_type,
                planned.spec,
                now + self.timings.qr_provision_delay,
                queued_resource=record.name,
                multislice=planned.multislice,
            )
            record.node_names.append(name)

    # ----------------------------------------------------------------- operations

    def get_operation(self, name: str) -> OperationRecord:
        with self.cond:
            operation = self.operations.get(name)
            if operation is None:
                raise not_found(name)
            return operation

    def list_operations(self, name: str, page_size: int, page_token: str) -> tuple[list[OperationRecord], str]:
        with self.cond:
            location = parse_location(name, allow_wildcard=True)
            names = [
                o.name
                for o in self.operations.values()
                if o.location.project == location.project and location.zone in ("-", o.location.zone)
            ]
            page, token = page_names(names, page_size, page_token)
            return [self.operations[n] for n in page], token

    def delete_operation(self, name: str) -> None:
        with self.cond:
            if self.operations.pop(name, None) is None:
                raise not_found(name)
            self.changed()

    def cancel_operation(self, name: str) -> None:
        with self.cond:
            operation = self.operations.get(name)
            if operation is None:
                raise not_found(name)
            operation.cancel_requested = True
            if not operation.done:
                operation.done = True
                operation.end_time = self._wall()
                operation.response = None
                operation.error = (code_pb2.CANCELLED, f"Operation {name} was cancelled")
            self.changed()

    def wait_operation(self, name: str, timeout: float) -> OperationRecord:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                operation = self.operations.get(name)
                if operation is None:
                    raise not_found(name)
                remaining = deadline - time.monotonic()
                if operation.done or remaining <= 0 or self.closed:
                    return operation
                self.cond.wait(remaining)

    def close(self) -> None:
        """End every wait (the emulator is stopping)."""
        with self.cond:
            self.closed = True
            self.changed()

    # ----------------------------------------------------------------- time

    def advance(self) -> list[Effect]:
        """Apply every due transition; return the side effects to carry out, in order."""
        with self.cond:
            now = self._clock()
            for _ in range(_MAX_ADVANCE_PASSES):
                if not self._advance_once(now):
                    break
            effects, self._effects = self._effects, []
            self.dirty = False
            self.cond.notify_all()
            return effects

    def _advance_once(self, now: float) -> bool:
        changed = False
        for record in list(self.nodes.values()):
            changed |= self._advance_node(record, now)
        for record in list(self.queued.values()):
            changed |= self._advance_queued(record, now)
        for operation in self.operations.values():
            changed |= self._advance_operation(operation, now)
        return changed

    def _due(self, due: float | None, now: float) -> bool:
        return due is not None and now >= due

    def _advance_node(self, record: NodeRecord, now: float) -> bool:
        if record.state == "CREATING" and self._due(record.due, now):
            if _matches(self.holds, record.name, record.node_id):
                return False
            if record.stockout:
                self._fail_stockout(record, now)
            elif record.create_error is not None:
                self._fail_create(record, now, record.create_error)
            else:
                self._make_ready(record, now)
            return True
        if record.state == "DELETING" and self._due(record.due, now):
            del self.nodes[record.name]
            if record.ips:
                self._effects.append(Effect("discard", record.uid))
            return True
        if record.state == "REPAIRING" and self._due(record.due, now):
            record.state = "READY"
            record.due = None
            return True
        if self._due(record.preempt_kill_at, now):
            record.preempt_kill_at = None
            record.state = "PREEMPTED"
            self._effects.append(Effect("kill", record.uid))
            return True
        return False

    def _advance_queued(self, record: QueuedRecord, now: float) -> bool:
        if record.state == "WAITING_FOR_RESOURCES" and self._due(record.expires_at, now):
            # Real queued resources wait for capacity; only their queueing policy ends the wait.
            record.state = "FAILED"
            record.state_initiator = "SERVICE"
            record.due = None
            record.error = (QR_EXPIRED_CODE, QR_EXPIRED_MESSAGE.format(name=record.name))
            return True
        if record.state == "WAITING_FOR_RESOURCES" and self._due(record.due, now):
            if _matches(self.holds, record.name, record.qr_id) or record.location.zone in self.stockouts:
                return False
            self._provision(record, now)
            return True
        if record.state in ("PROVISIONING", "ACTIVE"):
            nodes = [self.nodes.get(name) for name in record.node_names]
            if any(n is None or n.state in ("PREEMPTED", "TERMINATED") or n.preempt_kill_at for n in nodes):
                record.state = "SUSPENDED"
                record.state_initiator = "SERVICE"
                return True
            if record.state == "PROVISIONING" and all(n.state == "READY" for n in nodes):
                record.state = "ACTIVE"
                return True
            return False
        if record.state == "DELETING" and self._due(record.due, now):
            if any(name in self.nodes for name in record.node_names):
                return False
            del self.queued[record.name]
            return True
        return False

    def _advance_operation(self, operation: OperationRecord, now: float) -> bool:
        if operation.done:
            return False
        if operation.waits_for_gone and operation.finish_at is None:
            if operation.waits_for_gone not in self.nodes and operation.waits_for_gone not in self.queued:
                self._finish(operation, now, response=empty_pb2.Empty())
        if self.never_finish or not self._due(operation.finish_at, now):
            return False
        operation.done = True
        operation.end_time = self._wall()
        return True

    def next_due(self) -> float | None:
        """The earliest time a transition becomes due, or None when nothing will happen by itself."""
        with self.cond:
            dues: list[float] = []
            for node in self.nodes.values():
                if node.state == "CREATING" and not _matches(self.holds, node.name, node.node_id):
                    dues.append(node.due)
                elif node.state in ("DELETING", "REPAIRING"):
                    dues.append(node.due)
                if node.preempt_kill_at is not None:
                    dues.append(node.preempt_kill_at)
            for queued in self.queued.values():
                if queued.state == "WAITING_FOR_RESOURCES":
                    dues.append(queued.expires_at)
                    waits = _matches(self.holds, queued.name, queued.qr_id) or queued.location.zone in self.stockouts
                    if not waits:
                        dues.append(queued.due)
                elif queued.state == "DELETING" and not any(n in self.nodes for n in queued.node_names):
                    dues.append(queued.due)
            if not self.never_finish:
                dues.extend(o.finish_at for o in self.operations.values() if not o.done)
            dues = [d for d in dues if d is not None]
            return min(dues) if dues else None

    # ----------------------------------------------------------------- faults and reports

    def leaks(self) -> dict[str, list[dict]]:
        with self.cond:
            return {
                "nodes": [
                    {"name": n.name, "state": n.state, "labels": dict(n.spec.labels), "queued_resource": n.queued_resource}
                    for n in sorted(self.nodes.values(), key=lambda n: n.name)
                ],
                "queued_resources": [
                    {"name": q.name, "state": q.state, "labels": self._queued_labels(q)}
                    for q in sorted(self.queued.values(), key=lambda q: q.name)
                ],
            }

    @staticmethod
    def _queued_labels(record: QueuedRecord) -> dict[str, str]:
        labels: dict[str, str] = {}
        for spec in record.spec.tpu.node_spec:
            labels.update(spec.node.labels)
        return labels

    def remove_everything(self) -> None:
        """Drop every resource at once (harness cleanup after a leak), killing all hosts."""
        with self.cond:
            for record in self.nodes.values():
                if record.ips:
                    self._effects.append(Effect("kill", record.uid))
            self.nodes.clear()
            self.queued.clear()
            self.operations.clear()
            self.changed()

    def clear_faults(self) -> None:
        with self.cond:
            self.stockouts.clear()
            self.refusals.clear()
            self.storms.clear()
            self.injected.clear()
            self.holds.clear()
            self.never_finish = False
            self.reverse_endpoints = False
            self.hostname_endpoints = False
            self.external_ips_forbidden = False
            self.denied_permissions.clear()
            self.withdrawn.clear()
            self.changed()
