"""Records of the emulated world → the v2 API's protobuf messages."""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.cloud.tpu_v2.types import cloud_tpu
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, message, timestamp_pb2
from google.rpc import status_pb2

from fray_tpu.emulator import catalog

if TYPE_CHECKING:
    from fray_tpu.emulator.state import NodeRecord, OperationRecord, QueuedRecord

NodePb = cloud_tpu.Node.pb()
QueuedResourcePb = cloud_tpu.QueuedResource.pb()
OperationMetadataPb = cloud_tpu.OperationMetadata.pb()
_HEALTHY_STATES = ("READY",)


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def packed(value: message.Message) -> any_pb2.Any:
    wrapper = any_pb2.Any()
    wrapper.Pack(value)
    return wrapper


def node_pb(record: "NodeRecord") -> message.Message:
    node = NodePb()
    node.CopyFrom(record.spec)
    node.name = record.name
    node.id = record.uid
    node.accelerator_type = record.accelerator_type
    shape = catalog.lookup_accelerator_type(record.accelerator_type)
    node.accelerator_config.type_ = cloud_tpu.AcceleratorConfig.Type[catalog.ACCELERATOR_CONFIG_TYPES[shape.generation]]
    node.accelerator_config.topology = shape.topology
    node.state = NodePb.State.Value(record.state)
    if record.health is not None:
        node.health = NodePb.Health.Value(record.health)
    else:
        node.health = NodePb.Health.Value("HEALTHY") if record.state in _HEALTHY_STATES else 0
    node.api_version = NodePb.ApiVersion.Value("V2")
    node.create_time.CopyFrom(timestamp(record.create_time))
    node.queued_resource = record.queued_resource
    node.multislice_node = record.multislice
    node.cidr_block = node.cidr_block or "10.130.0.0/20"
    del node.network_endpoints[:]
    order = record.endpoint_order or range(len(record.ips))
    for worker in order:
        endpoint = node.network_endpoints.add(ip_address=record.ips[worker], port=record.agent_port)
        if record.external_ips:
            endpoint.access_config.external_ip = record.external_ips[worker]
    return node


def queued_resource_pb(record: "QueuedRecord") -> message.Message:
    queued = QueuedResourcePb()
    queued.CopyFrom(record.spec)
    queued.name = record.name
    queued.create_time.CopyFrom(timestamp(record.create_time))
    state_type = type(queued.state)
    queued.state.Clear()
    queued.state.state = state_type.State.Value(record.state)
    queued.state.state_initiator = state_type.StateInitiator.Value(record.state_initiator)
    data_field = {
        "WAITING_FOR_RESOURCES": None,
        "PROVISIONING": "provisioning_data",
        "ACTIVE": "active_data",
        "FAILED": "failed_data",
        "DELETING": "deleting_data",
        "SUSPENDED": "suspended_data",
    }.get(record.state)
    if data_field:
        getattr(queued.state, data_field).SetInParent()
    if record.state == "FAILED" and record.error:
        queued.state.failed_data.error.CopyFrom(status_pb2.Status(code=record.error[0], message=record.error[1]))
    return queued


def operation_pb(record: "OperationRecord") -> operations_pb2.Operation:
    metadata = OperationMetadataPb(
        target=record.target, verb=record.verb, api_version="v2", cancel_requested=record.cancel_requested
    )
    metadata.create_time.CopyFrom(timestamp(record.create_time))
    if record.end_time is not None:
        metadata.end_time.CopyFrom(timestamp(record.end_time))
    operation = operations_pb2.Operation(name=record.name, done=record.done, metadata=packed(metadata))
    if record.done:
        if record.error is not None:
            operation.error.CopyFrom(status_pb2.Status(code=record.error[0], message=record.error[1]))
        elif record.response is not None:
            operation.response.CopyFrom(packed(record.response))
    return operation
