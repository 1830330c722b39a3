"""Request validation with the real API's rules and status codes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.protobuf import message
from google.rpc import code_pb2, error_details_pb2

from fray_tpu import contract
from fray_tpu.emulator import catalog
from fray_tpu.topology import region_of, suggest_tpu_types

NODE_ID_PATTERN = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_PATTERN = re.compile(r"^[a-z0-9_-]{0,63}$")
METADATA_KEY_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_NODE_ID_LENGTH = 63
MAX_LABELS = 64
MAX_METADATA_BYTES = 512 * 1024
# GCE network tags (what firewall rules target): RFC 1035 labels, at most 64 per instance.
NETWORK_TAG_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_NETWORK_TAGS = 64
_LOCATION = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)$")


class ApiError(Exception):
    """An error the API answers with: a google.rpc code, the message a caller sees and the
    status details (``ErrorInfo``, ``QuotaFailure``) Google attaches."""

    def __init__(self, code: int, message: str, details: tuple[message.Message, ...] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def code_name(self) -> str:
        return code_pb2.Code.Name(self.code)


def invalid(message: str) -> ApiError:
    return ApiError(code_pb2.INVALID_ARGUMENT, message)


def not_found(name: str) -> ApiError:
    return ApiError(code_pb2.NOT_FOUND, f"Resource '{name}' was not found")


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="googleapis.com", metadata=metadata)


def location_forbidden(project: str, zone: str) -> ApiError:
    """An org policy forbids the zone: 403 with reason LOCATION_POLICY_VIOLATED on every call."""
    return ApiError(
        code_pb2.PERMISSION_DENIED,
        f"Location {zone} violates constraint constraints/gcp.resourceLocations on the resource "
        f"projects/{project}/locations/{zone}.",
        (_error_info(contract.REASON_LOCATION_POLICY, service="tpu.googleapis.com", location=zone),),
    )


def api_disabled(project: str) -> ApiError:
    return ApiError(
        code_pb2.PERMISSION_DENIED,
        f"Cloud TPU API has not been used in project {project} before or it is disabled. Enable it by "
        f"visiting https://console.developers.google.com/apis/api/tpu.googleapis.com/overview?project={project} "
        "then retry.",
        (_error_info(contract.REASON_SERVICE_DISABLED, service="tpu.googleapis.com", consumer=f"projects/{project}"),),
    )


def permission_denied(permission: str, resource: str) -> ApiError:
    return ApiError(
        code_pb2.PERMISSION_DENIED,
        f"Permission '{permission}' denied on '{resource}'",
        (_error_info(contract.REASON_IAM_PERMISSION_DENIED, permission=permission, resource=resource),),
    )


def unauthenticated() -> ApiError:
    return ApiError(
        code_pb2.UNAUTHENTICATED,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
        "other valid authentication credential.",
        (_error_info(contract.REASON_ACCESS_TOKEN, service="tpu.googleapis.com"),),
    )


def rate_limited(method: str, project: str) -> ApiError:
    limit = f"{method} requests per minute"
    return ApiError(
        code_pb2.RESOURCE_EXHAUSTED,
        f"Quota exceeded for quota metric '{method} requests' and limit 'Maximum number of {limit}' of "
        f"service 'tpu.googleapis.com' for consumer 'project_number:{project}'.",
        (
            _error_info(contract.REASON_RATE_LIMIT, service="tpu.googleapis.com", quota_limit=limit),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"project_number:{project}",
                        description=limit,
                        quota_metric=f"tpu.googleapis.com/{method.lower()}_requests",
                        quota_id=f"{method}RequestsPerMinutePerProject",
                    )
                ]
            ),
        ),
    )


def resource_quota(zone: str, *, per_region: bool) -> ApiError:
    scope, where = ("Region", region_of(zone)) if per_region else ("Zone", zone)
    quota_id = f"TPUV5sLitepodPerProjectPer{scope}ForTPUAPI"
    return ApiError(
        code_pb2.RESOURCE_EXHAUSTED,
        f"Quota limit '{quota_id}' has been exceeded. Limit: 0 in {scope.lower()} {where}.",
        (
            _error_info(contract.REASON_QUOTA, service="tpu.googleapis.com", quota_limit=quota_id),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"{scope.lower()}:{where}", description=quota_id, quota_id=quota_id
                    )
                ]
            ),
        ),
    )


@dataclass(frozen=True)
class Location:
    project: str
    zone: str

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"


def parse_location(parent: str, allow_wildcard: bool = False) -> Location:
    """``projects/P/locations/ZONE``; an unknown zone is 403 PERMISSION_DENIED "not found or access
    is unauthorized", like the real API (it does not say which of the two)."""
    match = _LOCATION.match(parent or "")
    if not match:
        raise invalid(f"Invalid parent {parent!r}: expected 'projects/<project>/locations/<zone>'")
    location = Location(match["project"], match["zone"])
    if allow_wildcard and location.zone == "-":
        return location
    if location.zone not in catalog.all_zones():
        raise ApiError(
            code_pb2.PERMISSION_DENIED,
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


def check_tags(tags: list[str]) -> None:
    if len(tags) > MAX_NETWORK_TAGS:
        raise invalid(f"Too many network tags: {len(tags)} (at most {MAX_NETWORK_TAGS})")
    for tag in tags:
        if not NETWORK_TAG_PATTERN.match(tag):
            raise invalid(
                f"Invalid value for field 'node.tags': {tag!r}. Network tags must be 1-63 characters long and "
                "match the regular expression [a-z]([-a-z0-9]*[a-z0-9])?"
            )


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
        raise not_in_zone(accelerator_type, zone)
    return accelerator_type


def not_in_zone(accelerator_type: str, zone: str) -> ApiError:
    return invalid(
        f"Accelerator configuration {accelerator_type!r} could not be found in the zonal accelerator "
        f"configurations of zone {zone!r}"
    )


def check_runtime_version(version: str, accelerator_type: str) -> None:
    """Known, and made for the type's generation (a v4 image does not boot a v5e VM)."""
    if not version:
        raise invalid("Field 'runtime_version' is required")
    if version not in catalog.runtime_versions():
        raise invalid(
            f"Unknown runtime version {version!r}; available versions: {', '.join(catalog.runtime_versions())}"
        )
    if not catalog.runtime_fits(version, accelerator_type):
        raise invalid(
            f"Runtime version {version!r} is not supported by accelerator type {accelerator_type!r}; "
            f"use {', '.join(catalog.runtime_versions_for(accelerator_type))}"
        )
