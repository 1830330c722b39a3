"""gRPC services of the emulator: ``google.cloud.tpu.v2.Tpu``, ``google.longrunning.Operations``,
``google.cloud.location.Locations`` and the JSON fault-control service, as generic handlers on
the protobuf messages of the installed client library."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_status import rpc_status
from google.cloud.location import locations_pb2
from google.cloud.tpu_v2.types import cloud_tpu
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2, message
from google.rpc import status_pb2

from fray_tpu.emulator import catalog, control
from fray_tpu.emulator.metadata import principal_of
from fray_tpu.emulator.render import node_pb, operation_pb, queued_resource_pb
from fray_tpu.emulator.state import page_names
from fray_tpu.emulator.validation import ApiError, invalid, not_found, parse_location, parse_resource_name

if TYPE_CHECKING:
    from fray_tpu.emulator.emulator import Emulator

LOG = logging.getLogger(__name__)
TPU_SERVICE = "google.cloud.tpu.v2.Tpu"
OPERATIONS_SERVICE = "google.longrunning.Operations"
LOCATIONS_SERVICE = "google.cloud.location.Locations"
MAX_WORKERS = 64
DEFAULT_WAIT_OPERATION_SECONDS = 60.0


def _pb(proto_plus_type) -> type[message.Message]:
    return proto_plus_type.pb()


class TpuService:
    """google.cloud.tpu.v2.Tpu over the emulator's world."""

    def __init__(self, emulator: "Emulator"):
        self._world = emulator.world
        self._hosts = emulator.hosts

    def create_node(self, request):
        return operation_pb(self._world.create_node(request.parent, request.node_id, request.node))

    def get_node(self, request):
        return node_pb(self._world.get_node(request.name))

    def list_nodes(self, request):
        records, token = self._world.list_nodes(request.parent, request.page_size, request.page_token)
        return _pb(cloud_tpu.ListNodesResponse)(nodes=[node_pb(r) for r in records], next_page_token=token)

    def delete_node(self, request):
        return operation_pb(self._world.delete_node(request.name))

    def create_queued_resource(self, request):
        return operation_pb(
            self._world.create_queued_resource(request.parent, request.queued_resource_id, request.queued_resource)
        )

    def get_queued_resource(self, request):
        return queued_resource_pb(self._world.get_queued_resource(request.name))

    def list_queued_resources(self, request):
        records, token = self._world.list_queued_resources(request.parent, request.page_size, request.page_token)
        return _pb(cloud_tpu.ListQueuedResourcesResponse)(
            queued_resources=[queued_resource_pb(r) for r in records], next_page_token=token
        )

    def delete_queued_resource(self, request):
        return operation_pb(self._world.delete_queued_resource(request.name, request.force))

    def list_accelerator_types(self, request):
        location = parse_location(request.parent)
        names = [f"{location.name}/acceleratorTypes/{t}" for t in self._world.offered(location.zone)]
        page, token = page_names(names, request.page_size, request.page_token)
        return _pb(cloud_tpu.ListAcceleratorTypesResponse)(
            accelerator_types=[self._accelerator_type(name) for name in page], next_page_token=token
        )

    def get_accelerator_type(self, request):
        location, type_name = parse_resource_name(request.name, "acceleratorTypes")
        if type_name not in self._world.offered(location.zone):
            raise not_found(request.name)
        return self._accelerator_type(request.name)

    @staticmethod
    def _accelerator_type(name: str):
        type_name = name.rsplit("/", 1)[-1]
        shape = catalog.lookup_accelerator_type(type_name)
        accelerator = _pb(cloud_tpu.AcceleratorType)(name=name, type_=type_name)
        accelerator.accelerator_configs.add(
            type_=cloud_tpu.AcceleratorConfig.Type[catalog.ACCELERATOR_CONFIG_TYPES[shape.generation]],
            topology=shape.topology,
        )
        return accelerator

    def list_runtime_versions(self, request):
        location = parse_location(request.parent)
        names = [f"{location.name}/runtimeVersions/{v}" for v in catalog.runtime_versions()]
        page, token = page_names(names, request.page_size, request.page_token)
        return _pb(cloud_tpu.ListRuntimeVersionsResponse)(
            runtime_versions=[
                _pb(cloud_tpu.RuntimeVersion)(name=name, version=name.rsplit("/", 1)[-1]) for name in page
            ],
            next_page_token=token,
        )

    def get_runtime_version(self, request):
        _, version = parse_resource_name(request.name, "runtimeVersions")
        if version not in catalog.runtime_versions():
            raise not_found(request.name)
        return _pb(cloud_tpu.RuntimeVersion)(name=request.name, version=version)

    def get_guest_attributes(self, request):
        record = self._world.get_node(request.name)
        workers = [int(w) for w in request.worker_ids] if request.worker_ids else range(record.vm_count)
        per_worker = self._hosts.guest_attributes(record.uid) if record.ips else []
        query = request.query_path.strip("/")
        namespace, _, key = query.partition("/")
        response = _pb(cloud_tpu.GetGuestAttributesResponse)()
        for worker in workers:
            if not 0 <= worker < record.vm_count:
                raise invalid(f"worker id {worker} is out of range 0..{record.vm_count - 1}")
            entry = response.guest_attributes.add(query_path=request.query_path)
            attributes = per_worker[worker] if worker < len(per_worker) else {}
            for ns, values in sorted(attributes.items()):
                for k, v in sorted(values.items()):
                    if (not namespace or ns == namespace) and (not key or k == key):
                        entry.query_value.items.add(namespace=ns, key=k, value=v)
        return response


class OperationsService:
    """google.longrunning.Operations over the emulator's world."""

    def __init__(self, emulator: "Emulator"):
        self._world = emulator.world

    def get_operation(self, request):
        return operation_pb(self._world.get_operation(request.name))

    def list_operations(self, request):
        records, token = self._world.list_operations(request.name, request.page_size, request.page_token)
        return operations_pb2.ListOperationsResponse(
            operations=[operation_pb(r) for r in records], next_page_token=token
        )

    def delete_operation(self, request):
        self._world.delete_operation(request.name)
        return empty_pb2.Empty()

    def cancel_operation(self, request):
        self._world.cancel_operation(request.name)
        return empty_pb2.Empty()

    def wait_operation(self, request, context: grpc.ServicerContext):
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        remaining = context.time_remaining()
        candidates = [t for t in (timeout, remaining) if t is not None]
        wait = min(candidates) if candidates else DEFAULT_WAIT_OPERATION_SECONDS
        return operation_pb(self._world.wait_operation(request.name, max(0.0, wait - 0.05)))


class LocationsService:
    def list_locations(self, request):
        project = request.name.removeprefix("projects/")
        return locations_pb2.ListLocationsResponse(
            locations=[
                locations_pb2.Location(name=f"projects/{project}/locations/{zone}", location_id=zone)
                for zone in catalog.all_zones()
            ]
        )

    def get_location(self, request):
        location = parse_location(request.name)
        return locations_pb2.Location(name=location.name, location_id=location.zone)


def _abort(context: grpc.ServicerContext, error: ApiError) -> None:
    """Abort with the status Google sends: code, message and packed details (``ErrorInfo``,
    ``QuotaFailure``) in ``grpc-status-details-bin``, which google-api-core decodes."""
    packed = []
    for detail in error.details:
        value = any_pb2.Any()
        value.Pack(detail)
        packed.append(value)
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=error.code, message=error.message, details=packed)))


def _project_and_zone(request) -> tuple[str, str | None]:
    """The project and zone a request addresses (its ``parent`` or ``name``)."""
    for field_name in ("parent", "name"):
        value = getattr(request, field_name, "")
        if isinstance(value, str) and value.startswith("projects/"):
            parts = value.split("/")
            zone = parts[3] if len(parts) > 3 and parts[2] == "locations" and parts[3] != "-" else None
            return parts[1], zone
    return "", None


def _caller(context: grpc.ServicerContext) -> str | None:
    """The service account whose VM token the call carries (None: another caller, such as the
    controller with its own credentials)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return principal_of(value[len("Bearer "):].strip())
    return None


def _resource(request) -> str:
    for field_name in ("name", "parent"):
        value = getattr(request, field_name, "")
        if isinstance(value, str) and value:
            return value
    return ""


def _handler(world, method: str, request_type, call: Callable, with_context: bool = False):
    def serve(request, context: grpc.ServicerContext):
        failure = world.record_call(method)
        if failure is not None:
            _abort(context, failure)
        refusal = world.refusal(method, *_project_and_zone(request))
        if refusal is not None:
            _abort(context, refusal)
        denied = world.permission_refusal(method, _caller(context), _resource(request))
        if denied is not None:
            _abort(context, denied)
        try:
            return call(request, context) if with_context else call(request)
        except ApiError as error:
            _abort(context, error)
        except Exception:
            LOG.exception("emulator failed to serve %s", method)
            raise

    return grpc.unary_unary_rpc_method_handler(
        serve, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
    )


def build_server(emulator: "Emulator") -> grpc.Server:
    world = emulator.world
    tpu = TpuService(emulator)
    operations = OperationsService(emulator)
    locations = LocationsService()
    tpu_methods = {
        "CreateNode": (cloud_tpu.CreateNodeRequest, tpu.create_node),
        "GetNode": (cloud_tpu.GetNodeRequest, tpu.get_node),
        "ListNodes": (cloud_tpu.ListNodesRequest, tpu.list_nodes),
        "DeleteNode": (cloud_tpu.DeleteNodeRequest, tpu.delete_node),
        "CreateQueuedResource": (cloud_tpu.CreateQueuedResourceRequest, tpu.create_queued_resource),
        "GetQueuedResource": (cloud_tpu.GetQueuedResourceRequest, tpu.get_queued_resource),
        "ListQueuedResources": (cloud_tpu.ListQueuedResourcesRequest, tpu.list_queued_resources),
        "DeleteQueuedResource": (cloud_tpu.DeleteQueuedResourceRequest, tpu.delete_queued_resource),
        "ListAcceleratorTypes": (cloud_tpu.ListAcceleratorTypesRequest, tpu.list_accelerator_types),
        "GetAcceleratorType": (cloud_tpu.GetAcceleratorTypeRequest, tpu.get_accelerator_type),
        "ListRuntimeVersions": (cloud_tpu.ListRuntimeVersionsRequest, tpu.list_runtime_versions),
        "GetRuntimeVersion": (cloud_tpu.GetRuntimeVersionRequest, tpu.get_runtime_version),
        "GetGuestAttributes": (cloud_tpu.GetGuestAttributesRequest, tpu.get_guest_attributes),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="emulator-rpc"))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                TPU_SERVICE,
                {name: _handler(world, name, _pb(request), call) for name, (request, call) in tpu_methods.items()},
            ),
            grpc.method_handlers_generic_handler(
                OPERATIONS_SERVICE,
                {
                    "GetOperation": _handler(world, "GetOperation", operations_pb2.GetOperationRequest, operations.get_operation),
                    "ListOperations": _handler(
                        world, "ListOperations", operations_pb2.ListOperationsRequest, operations.list_operations
                    ),
                    "DeleteOperation": _handler(
                        world, "DeleteOperation", operations_pb2.DeleteOperationRequest, operations.delete_operation
                    ),
                    "CancelOperation": _handler(
                        world, "CancelOperation", operations_pb2.CancelOperationRequest, operations.cancel_operation
                    ),
                    "WaitOperation": _handler(
                        world,
                        "WaitOperation",
                        operations_pb2.WaitOperationRequest,
                        operations.wait_operation,
                        with_context=True,
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                LOCATIONS_SERVICE,
                {
                    "ListLocations": _handler(
                        world, "ListLocations", locations_pb2.ListLocationsRequest, locations.list_locations
                    ),
                    "GetLocation": _handler(world, "GetLocation", locations_pb2.GetLocationRequest, locations.get_location),
                },
            ),
            grpc.method_handlers_generic_handler(
                control.CONTROL_SERVICE,
                {
                    "Call": grpc.unary_unary_rpc_method_handler(
                        lambda body, context: control.dispatch(emulator.control, body)
                    )
                },
            ),
        )
    )
    return server
