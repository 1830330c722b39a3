"""Fault control and reports of a running emulator.

``Control`` acts on an in-process ``Emulator``; ``EmulatorControl(endpoint)`` offers the same
methods to a test talking to an emulator process, over an extra gRPC service on the emulator's
port (``fray_tpu.emulator.Control/Call``, JSON in and out, no protos).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc
from google.cloud import tpu_v2
from google.rpc import code_pb2

from fray_tpu.emulator import catalog, state
from fray_tpu.emulator.state import InjectedFailure, Stockout

if TYPE_CHECKING:
    from fray_tpu.emulator.emulator import Emulator

CONTROL_SERVICE = "fray_tpu.emulator.Control"
_NODE_HEALTH = tuple(n for n in tpu_v2.Node.Health.__members__ if n != "HEALTH_UNSPECIFIED")
CONTROL_METHOD = f"/{CONTROL_SERVICE}/Call"
CONTROL_TIMEOUT_SECONDS = 60.0

# HTTP statuses the REST API answers with → the gRPC code the same failure has on the wire.
_HTTP_TO_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    409: code_pb2.ALREADY_EXISTS,
    412: code_pb2.FAILED_PRECONDITION,
    429: code_pb2.RESOURCE_EXHAUSTED,
    499: code_pb2.CANCELLED,
    500: code_pb2.INTERNAL,
    501: code_pb2.UNIMPLEMENTED,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.DEADLINE_EXCEEDED,
}


def status_code(code: int | str) -> int:
    """A google.rpc code from a gRPC code (3, "UNAVAILABLE") or an HTTP status (429, "503")."""
    if isinstance(code, str) and not code.isdigit():
        try:
            return code_pb2.Code.Value(code.upper())
        except ValueError:
            raise ValueError(f"unknown status code name {code!r}; use e.g. 'RESOURCE_EXHAUSTED' or 429") from None
    number = int(code)
    if number in _HTTP_TO_CODE:
        return _HTTP_TO_CODE[number]
    if 1 <= number <= 16:
        return number
    raise ValueError(f"unknown status code {code!r}; use an HTTP status {sorted(_HTTP_TO_CODE)} or a gRPC code 1..16")


class Control:
    """Fault injection and reports on an in-process emulator."""

    def __init__(self, emulator: "Emulator"):
        self._emulator = emulator
        self._world = emulator.world
        self._hosts = emulator.hosts

    def _changed_and_pumped(self) -> None:
        with self._world.cond:
            self._world.changed()
        self._emulator.pump()

    # -- resources ------------------------------------------------------------------------

    def preempt_node(self, name: str) -> None:
        """Preempt a READY node: `preempted` reads TRUE on every host, then (after
        ``preempt_notice``) its hosts are killed and the node is PREEMPTED (it stays, holding
        quota, until deleted); its queued resource becomes SUSPENDED."""
        self._world.preempt_node(name)
        self._emulator.pump()

    def repair_node(self, name: str, seconds: float) -> None:
        """A READY node is REPAIRING for ``seconds`` (hosts stay up), then READY again."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self._world.repair_node(name, seconds)
        self._emulator.pump()

    def set_node_health(self, name: str, health: str | None) -> None:
        """Report ``health`` (a Node.Health name such as UNHEALTHY_MAINTENANCE; None: derived)."""
        if health is not None and health not in _NODE_HEALTH:
            raise ValueError(f"unknown health {health!r}; one of {', '.join(_NODE_HEALTH)}")
        self._world.set_node_health(name, health)

    def hostname_endpoints(self, value: bool = True) -> None:
        """Hosts booted from now on serve ``worker-network-endpoints`` in the newer hostname-only
        format instead of ``host:uid:ip`` triples."""
        with self._world.cond:
            self._world.hostname_endpoints = value

    def reverse_endpoints(self, value: bool = True) -> None:
        """Nodes made READY from now on list their network endpoints in reverse worker order
        (each host's metadata keeps its true agent-worker-number and endpoint list)."""
        with self._world.cond:
            self._world.reverse_endpoints = value

    def vanish_node(self, name: str) -> None:
        """The node disappears (NOT_FOUND from now on) and its hosts end."""
        self._world.vanish_node(name)
        self._emulator.pump()

    def forbid_external_ips(self, value: bool = True) -> None:
        """An organization policy (constraints/compute.vmExternalIpAccess) forbids external IPs:
        creates with ``enable_external_ips`` from now on fail on their operation with
        FAILED_PRECONDITION, and the node goes away."""
        with self._world.cond:
            self._world.external_ips_forbidden = value

    def deny_permission(self, service_account: str, permission: str = "tpu.nodes.delete") -> None:
        """Calls made with ``service_account``'s token (a VM's, from its metadata server) that need
        ``permission`` answer 403 PERMISSION_DENIED, as when its IAM roles lack it."""
        if not permission.startswith("tpu."):
            raise ValueError(f"permission {permission!r} is not a Cloud TPU permission (tpu.nodes.delete, ...)")
        with self._world.cond:
            self._world.denied_permissions.setdefault(service_account, set()).add(permission)

    def hold_creating(self, pattern: str) -> None:
        """Keep nodes (in CREATING) and queued resources (in WAITING_FOR_RESOURCES) whose id starts
        with ``pattern`` (or whose full name does, if ``pattern`` contains '/') until released."""
        with self._world.cond:
            self._world.holds.add(pattern)
            self._world.changed()

    def release(self, pattern: str | None = None) -> None:
        """Release one hold, or every hold when ``pattern`` is None."""
        with self._world.cond:
            if pattern is None:
                self._world.holds.clear()
            else:
                self._world.holds.discard(pattern)
        self._changed_and_pumped()

    # -- failures -------------------------------------------------------------------------

    def stockout(self, zone: str, count: int | None = None, delay: float | None = None) -> None:
        """Node creates in ``zone`` fail on their operation with code 8 after ``delay`` seconds
        (default ``timings.stockout_delay``); ``count`` creates fail, or all until
        ``clear_stockout`` when None. Queued resources there wait in WAITING_FOR_RESOURCES while
        the stockout lasts (until cleared, or their queueing policy expires), as real ones do."""
        if zone not in catalog.all_zones():
            raise ValueError(f"unknown zone {zone!r}; zones: {', '.join(catalog.all_zones())}")
        with self._world.cond:
            self._world.stockouts[zone] = Stockout(count, delay)

    def clear_stockout(self, zone: str) -> None:
        """Capacity returns to ``zone``: waiting queued resources there are granted."""
        with self._world.cond:
            self._world.stockouts.pop(zone, None)
        self._changed_and_pumped()

    def quota_error(self, count: int = 1, zone: str | None = None) -> None:
        """The next ``count`` create calls (in ``zone``, or anywhere) fail on the call itself with
        429 RESOURCE_EXHAUSTED and a ``QuotaFailure`` naming a per-zone TPU quota."""
        self.refuse("zone_quota", zone=zone, count=count)

    def refuse(self, kind: str, zone: str | None = None, count: int | None = None) -> None:
        """Answer calls the way Google refuses them, with its codes, messages and details:
        ``forbidden_zone`` (403 LOCATION_POLICY_VIOLATED on every call in ``zone``),
        ``api_disabled`` (403 SERVICE_DISABLED on every call), ``unauthenticated`` (401 on every
        call), ``permission_denied`` (403 IAM_PERMISSION_DENIED on creates), ``rate_limit`` (429
        RATE_LIMIT_EXCEEDED, a per-minute QuotaFailure, on creates), ``zone_quota`` /
        ``region_quota`` (429 with a PerProjectPerZone / PerProjectPerRegion QuotaFailure on
        creates in ``zone`` or its region). ``count`` calls, or all until ``clear_refusals``."""
        if kind not in state.REFUSAL_KINDS:
            raise ValueError(f"unknown refusal kind {kind!r}; kinds: {', '.join(state.REFUSAL_KINDS)}")
        if zone is not None and zone not in catalog.all_zones():
            raise ValueError(f"unknown zone {zone!r}; zones: {', '.join(catalog.all_zones())}")
        if kind == "forbidden_zone" and zone is None:
            raise ValueError("refuse('forbidden_zone') needs the zone to forbid")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 or None, got {count}")
        with self._world.cond:
            self._world.refusals.append(state.Refusal(kind, zone, state.REFUSAL_KINDS[kind], count))

    def withdraw_type(self, zone: str, tpu_type: str) -> None:
        """``zone`` stops offering ``tpu_type``: it is not listed there, and creates of it answer
        400 "could not be found in the zonal accelerator configurations"."""
        if tpu_type not in catalog.accelerator_types_in_zone(zone):
            raise ValueError(f"{zone} does not offer {tpu_type!r} in the first place")
        with self._world.cond:
            self._world.withdrawn.add((zone, tpu_type))

    def clear_refusals(self) -> None:
        with self._world.cond:
            self._world.refusals.clear()

    def fail_for(self, method: str, seconds: float, code: int | str = 503) -> None:
        """Every call of ``method`` fails with ``code`` for the next ``seconds`` (emulator clock):
        an outage or a storm of errors, however many calls arrive meanwhile."""
        if method not in catalog.API_METHODS:
            raise ValueError(f"unknown API method {method!r}; methods: {', '.join(catalog.API_METHODS)}")
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        with self._world.cond:
            self._world.storms[method] = (status_code(code), self._world.now() + seconds)

    def fail_next(self, method: str, code: int | str = 503, count: int = 1) -> None:
        """The next ``count`` calls of ``method`` (e.g. "ListNodes", "GetOperation") fail with
        ``code`` (an HTTP status like 429/503 or a gRPC code name)."""
        if method not in catalog.API_METHODS:
            raise ValueError(f"unknown API method {method!r}; methods: {', '.join(catalog.API_METHODS)}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._world.cond:
            self._world.injected.setdefault(method, []).append(InjectedFailure(status_code(code), count))

    def end_outage(self, method: str) -> None:
        """End a ``fail_for`` outage of ``method`` now."""
        with self._world.cond:
            self._world.storms.pop(method, None)

    def never_finish_operations(self, value: bool = True) -> None:
        """While set, no operation completes (resources still change state)."""
        with self._world.cond:
            self._world.never_finish = value
        self._changed_and_pumped()

    def set_timings(self, **values: float) -> dict[str, float]:
        with self._world.cond:
            self._world.timings = self._world.timings.replaced(**values)
            return self._world.timings.to_dict()

    def timings(self) -> dict[str, float]:
        with self._world.cond:
            return self._world.timings.to_dict()

    # -- hosts ----------------------------------------------------------------------------

    def _uid(self, node: str) -> int:
        return self._hosts.uid_of(node)

    def kill_host(self, node: str, worker: int) -> None:
        """SIGKILL one host's processes; its metadata server keeps answering (the VM is up)."""
        self._hosts.kill(self._uid(node), worker, stop_metadata=False)

    def freeze_host(self, node: str, worker: int) -> None:
        """SIGSTOP one host's processes."""
        self._hosts.freeze(self._uid(node), worker)

    def thaw_host(self, node: str, worker: int) -> None:
        self._hosts.thaw(self._uid(node), worker)

    def set_preempted(self, node: str, worker: int, value: bool = True) -> None:
        """Set the ``instance/preempted`` metadata value of one host, nothing else."""
        self._hosts.set_preempted(self._uid(node), worker, value)

    def hosts(self, node: str) -> list[dict]:
        """Each VM of the node's latest incarnation: worker, ip, metadata endpoint, pid, workdir,
        alive, frozen, preempted."""
        return self._hosts.describe(self._uid(node))

    def host_log(self, node: str, worker: int) -> str:
        return self._hosts.log(self._uid(node), worker)

    def agent_log(self, node: str, worker: int) -> str:
        return self._hosts.agent_log(self._uid(node), worker)

    def reboot_host(self, node: str, worker: int) -> None:
        """Reboot one VM: its processes end, its disk and guest attributes stay, the startup-script runs again."""
        self._hosts.reboot(self._uid(node), worker)

    def set_image(self, profile: str | None) -> None:
        """Boot every later node from the image ``profile`` (fray_tpu.emulator.images); None: by runtime version."""
        self._hosts.set_image(profile)

    def host_connections(self, node: str) -> list[dict[str, int]]:
        """Per VM of the node's latest incarnation, TCP connections accepted so far at each of
        its external addresses (the NAT to the VM's own address): ``{"ip:port": count}``."""
        return self._hosts.connections(self._uid(node))

    def storage_endpoint(self) -> str:
        """The emulated Cloud Storage JSON API (``http://host:port``) the controller and the VMs use."""
        return self._emulator.storage.endpoint

    def storage_counters(self) -> dict[str, int]:
        with self._emulator.storage.lock:
            return dict(self._emulator.storage.counters)

    # -- reports --------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        with self._world.cond:
            return dict(self._world.counters)

    def reset_counters(self) -> None:
        with self._world.cond:
            self._world.counters.clear()

    def leaks(self) -> dict[str, list[dict]]:
        """Every node and queued resource alive, with state and labels."""
        return self._world.leaks()

    def reset(self, remove_resources: bool = True) -> None:
        """Back to a clean emulator: faults cleared, timings restored, counters zeroed and (by
        default) every resource removed with its hosts."""
        self._world.clear_faults()
        with self._world.cond:
            self._world.timings = self._emulator.initial_timings
            self._world.counters.clear()
        if remove_resources:
            self._world.remove_everything()
        self._emulator.pump()


CONTROL_METHODS = tuple(
    name for name in vars(Control) if not name.startswith("_") and callable(getattr(Control, name))
)


def dispatch(control: Control, body: bytes) -> bytes:
    """Run one JSON-encoded control call; errors come back as data, raised by the client."""
    try:
        request = json.loads(body)
        method = request["method"]
        if method not in CONTROL_METHODS:
            raise ValueError(f"unknown control method {method!r}; known: {', '.join(CONTROL_METHODS)}")
        result = getattr(control, method)(**request.get("args", {}))
        return json.dumps({"result": result}).encode()
    except (ValueError, TypeError, KeyError) as error:
        return json.dumps({"error": str(error), "type": "ValueError"}).encode()
    except Exception as error:  # noqa: BLE001 - reported to the remote caller
        return json.dumps({"error": f"{type(error).__name__}: {error}", "type": "RuntimeError"}).encode()


class EmulatorControl:
    """The ``Control`` methods of an emulator running as its own process."""

    def __init__(self, endpoint: str, timeout: float = CONTROL_TIMEOUT_SECONDS):
        self.endpoint = endpoint
        self._timeout = timeout
        self._channel = grpc.insecure_channel(endpoint)
        self._call_rpc = self._channel.unary_unary(CONTROL_METHOD)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EmulatorControl":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, /, **args: Any) -> Any:
        body = json.dumps({"method": method, "args": args}).encode()
        reply = json.loads(self._call_rpc(body, timeout=self._timeout, wait_for_ready=True))
        if "error" in reply:
            raise (ValueError if reply["type"] == "ValueError" else RuntimeError)(
                f"emulator control {method}: {reply['error']}"
            )
        return reply["result"]

    def preempt_node(self, name: str) -> None:
        self._call("preempt_node", name=name)

    def vanish_node(self, name: str) -> None:
        self._call("vanish_node", name=name)

    def forbid_external_ips(self, value: bool = True) -> None:
        self._call("forbid_external_ips", value=value)

    def deny_permission(self, service_account: str, permission: str = "tpu.nodes.delete") -> None:
        self._call("deny_permission", service_account=service_account, permission=permission)

    def host_connections(self, node: str) -> list[dict[str, int]]:
        return self._call("host_connections", node=node)

    def repair_node(self, name: str, seconds: float) -> None:
        self._call("repair_node", name=name, seconds=seconds)

    def set_node_health(self, name: str, health: str | None) -> None:
        self._call("set_node_health", name=name, health=health)

    def reverse_endpoints(self, value: bool = True) -> None:
        self._call("reverse_endpoints", value=value)

    def hostname_endpoints(self, value: bool = True) -> None:
        self._call("hostname_endpoints", value=value)

    def hold_creating(self, pattern: str) -> None:
        self._call("hold_creating", pattern=pattern)

    def release(self, pattern: str | None = None) -> None:
        self._call("release", pattern=pattern)

    def stockout(self, zone: str, count: int | None = None, delay: float | None = None) -> None:
        self._call("stockout", zone=zone, count=count, delay=delay)

    def clear_stockout(self, zone: str) -> None:
        self._call("clear_stockout", zone=zone)

    def quota_error(self, count: int = 1, zone: str | None = None) -> None:
        self._call("quota_error", count=count, zone=zone)

    def fail_next(self, method: str, code: int | str = 503, count: int = 1) -> None:
        self._call("fail_next", method=method, code=code, count=count)

    def refuse(self, kind: str, zone: str | None = None, count: int | None = None) -> None:
        self._call("refuse", kind=kind, zone=zone, count=count)

    def clear_refusals(self) -> None:
        self._call("clear_refusals")

    def withdraw_type(self, zone: str, tpu_type: str) -> None:
        self._call("withdraw_type", zone=zone, tpu_type=tpu_type)

    def fail_for(self, method: str, seconds: float, code: int | str = 503) -> None:
        self._call("fail_for", method=method, seconds=seconds, code=code)

    def end_outage(self, method: str) -> None:
        self._call("end_outage", method=method)

    def never_finish_operations(self, value: bool = True) -> None:
        self._call("never_finish_operations", value=value)

    def set_timings(self, **values: float) -> dict[str, float]:
        return self._call("set_timings", **values)

    def timings(self) -> dict[str, float]:
        return self._call("timings")

    def kill_host(self, node: str, worker: int) -> None:
        self._call("kill_host", node=node, worker=worker)

    def freeze_host(self, node: str, worker: int) -> None:
        self._call("freeze_host", node=node, worker=worker)

    def thaw_host(self, node: str, worker: int) -> None:
        self._call("thaw_host", node=node, worker=worker)

    def set_preempted(self, node: str, worker: int, value: bool = True) -> None:
        self._call("set_preempted", node=node, worker=worker, value=value)

    def hosts(self, node: str) -> list[dict]:
        return self._call("hosts", node=node)

    def host_log(self, node: str, worker: int) -> str:
        return self._call("host_log", node=node, worker=worker)

    def agent_log(self, node: str, worker: int) -> str:
        return self._call("agent_log", node=node, worker=worker)

    def reboot_host(self, node: str, worker: int) -> None:
        self._call("reboot_host", node=node, worker=worker)

    def set_image(self, profile: str | None) -> None:
        self._call("set_image", profile=profile)

    def storage_endpoint(self) -> str:
        return self._call("storage_endpoint")

    def storage_counters(self) -> dict[str, int]:
        return self._call("storage_counters")

    def counters(self) -> dict[str, int]:
        return self._call("counters")

    def reset_counters(self) -> None:
        self._call("reset_counters")

    def leaks(self) -> dict[str, list[dict]]:
        return self._call("leaks")

    def reset(self, remove_resources: bool = True) -> None:
        self._call("reset", remove_resources=remove_resources)
