"""Request validation with the real API's rules and status codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.rpc import code_pb2

from fray_tpu.emulator import catalog
from fray_tpu.topology import suggest_tpu_types

NODE_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_PATTERN = re.compile(r"^[a-z0-9_-]{0,63}$")
METADATA_KEY_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_NODE_ID_LENGTH = 63
MAX_LABELS = 64
MAX_METADATA_BYTES = 512 * 1024
_LOCATION = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)$")


class ApiError(Exception):
    """An error the API answers with: a google.rpc code and the message a caller sees."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return code_pb2.Code.Name(self.code)


def invalid(message: str) -> ApiError:
    return ApiError(code_pb2.INVALID_ARGUMENT, message)


def not_found(name: str) -> ApiError:
    return ApiError(code_pb2.NOT_FOUND, f"Resource '{name}' was not found")


@dataclass(frozen=True)
class Location:
    project: str
    zone: str

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"


def parse_location(parent: str, allow_wildcard: bool = False) -> Location:
    """``projects/P/locations/ZONE``; an unknown zone is NOT_FOUND like the real API."""
    match = _LOCATION.match(parent or "")
    if not match:
        raise invalid(f"Invalid parent {parent!r}: expected 'projects/<project>/locations/<zone>'")
    location = Location(match["project"], match["zone"])
    if allow_wildcard and location.zone == "-":
        return location
    if location.zone not in catalog.all_zones():
        raise ApiError(
            code_pb2.NOT_FOUND,
            f"Location {location.zone} is not found or access is unauthorized. "
            f"Zones offering TPUs: {', '.join(catalog.all_zones())}",
        )
    return location


def parse_resource_name(name: str, collection: str) -> tuple[Location, str]:
    """``projects/P/locations/Z/<collection>/<id>`` → (location, id)."""
    parts = (name or "").split("/")
    if len(parts) != 6 or parts[4] != collection or not parts[5]:
        raise invalid(f"Invalid resource name {name!r}: expected 'projects/<p>/locations/<zone>/{collection}/<id>'")
    return parse_location("/".join(parts[:4])), parts[5]


def check_resource_id(value: str, field: str) -> None:
    if not value:
        raise invalid(f"Field '{field}' is required")
    if len(value) > MAX_NODE_ID_LENGTH or not NODE_ID_PATTERN.match(value):
        raise invalid(
            f"Invalid value for field '{field}': {value!r}. It must match [a-z]([-a-z0-9]*[a-z0-9])? "
            f"and be at most {MAX_NODE_ID_LENGTH} characters"
        )


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise invalid(f"Too many labels: {len(labels)} (at most {MAX_LABELS})")
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.match(key):
            raise invalid(f"Invalid label key {key!r}: keys must match {LABEL_KEY_PATTERN.pattern}")
        if not LABEL_VALUE_PATTERN.match(value):
            raise invalid(f"Invalid label value {value!r} for key {key!r}: values must match {LABEL_VALUE_PATTERN.pattern}")


def check_metadata(metadata: dict[str, str]) -> None:
    for key in metadata:
        if not METADATA_KEY_PATTERN.match(key):
            raise invalid(f"Invalid metadata key {key!r}: keys must match {METADATA_KEY_PATTERN.pattern}")
    size = sum(len(key) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise invalid(f"Metadata is {size} bytes; the limit is {MAX_METADATA_BYTES} bytes")


def resolve_accelerator_type(accelerator_type: str, config_type: str, config_topology: str, zone: str) -> str:
    """The node's accelerator type, checked to be offered in ``zone``."""
    if accelerator_type and config_type:
        raise invalid("Only one of 'accelerator_type' and 'accelerator_config' may be set")
    if config_type:
        resolved = catalog.accelerator_type_from_config(config_type, config_topology)
        if resolved is None:
            raise invalid(f"Unsupported accelerator_config type={config_type} topology={config_topology!r}")
        accelerator_type = resolved
    if not accelerator_type:
        raise invalid("Field 'accelerator_type' (or 'accelerator_config') is required")
    shape = catalog.lookup_accelerator_type(accelerator_type)
    if shape is None:
        hint = suggest_tpu_types(accelerator_type)
        raise invalid(
            f"Invalid accelerator type {accelerator_type!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )
    if zone not in shape.zones:
        raise invalid(
            f"Accelerator type {accelerator_type!r} is not available in zone {zone!r}; "
            f"it is offered in {', '.join(shape.zones)}"
        )
    return accelerator_type


def check_runtime_version(version: str) -> None:
    if not version:
        raise invalid("Field 'runtime_version' is required")
    if version not in catalog.runtime_versions():
        raise invalid(
            f"Unknown runtime version {version!r}; available versions: {', '.join(catalog.runtime_versions())}"
        )
