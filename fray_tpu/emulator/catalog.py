"""What the emulated Cloud TPU offers: zones, accelerator types per zone, runtime versions.

Derived from ``fray_tpu.topology`` so the emulator and the launcher agree on every shape.
"""

from __future__ import annotations

import hashlib
from functools import cache

from fray_tpu.errors import UnknownTpuTypeError
from fray_tpu.topology import GENERATION_ZONES, RUNTIME_VERSIONS, TpuTopology, all_tpu_types, get_tpu_topology

# Generation → AcceleratorConfig.Type enum name of the v2 API.
ACCELERATOR_CONFIG_TYPES: dict[str, str] = {"v4": "V4", "v5e": "V5LITE_POD", "v5p": "V5P", "v6e": "V6E"}

# Runtime versions the real API lists besides the per-generation defaults (all accepted).
_EXTRA_RUNTIME_VERSIONS = (
    "tpu-vm-base",
    "tpu-vm-v4-base",
    "tpu-vm-v4-pt-2.0",
    "tpu-vm-tf-2.16.1-pjrt",
    "tpu-vm-tf-2.17.0-pjrt",
    "v2-alpha",
    "v2-alpha-tpuv5-lite",
    "v2-tpuv5-litepod",
    "v2-alpha-tpuv6e",
)

# Runtime versions built for one generation only; the rest (base images) are accepted for any.
_GENERATION_RUNTIME_VERSIONS: dict[str, tuple[str, ...]] = {
    "v4": ("tpu-vm-v4-base", "tpu-vm-v4-pt-2.0"),
    "v5e": ("v2-alpha-tpuv5-lite", "v2-tpuv5-litepod"),
    "v5p": ("v2-alpha-tpuv5",),
    "v6e": ("v2-alpha-tpuv6e",),
}

DEFAULT_AGENT_PORT = 8477

# Every API method the emulator serves (and counts), by its gRPC method name.
TPU_METHODS = (
    "CreateNode",
    "GetNode",
    "ListNodes",
    "DeleteNode",
    "CreateQueuedResource",
    "GetQueuedResource",
    "ListQueuedResources",
    "DeleteQueuedResource",
    "ListAcceleratorTypes",
    "GetAcceleratorType",
    "ListRuntimeVersions",
    "GetRuntimeVersion",
    "GetGuestAttributes",
)
OPERATIONS_METHODS = ("GetOperation", "ListOperations", "DeleteOperation", "CancelOperation", "WaitOperation")
LOCATIONS_METHODS = ("ListLocations", "GetLocation")
API_METHODS = TPU_METHODS + OPERATIONS_METHODS + LOCATIONS_METHODS


@cache
def all_zones() -> tuple[str, ...]:
    zones: list[str] = []
    for generation_zones in GENERATION_ZONES.values():
        zones.extend(zone for zone in generation_zones if zone not in zones)
    return tuple(sorted(zones))


@cache
def runtime_versions() -> tuple[str, ...]:
    return tuple(sorted(set(RUNTIME_VERSIONS.values()) | set(_EXTRA_RUNTIME_VERSIONS)))


def runtime_fits(version: str, accelerator_type: str) -> bool:
    """A generation-specific runtime version only boots its own generation."""
    shape = lookup_accelerator_type(accelerator_type)
    if shape is None:
        return True
    owner = next((g for g, versions in _GENERATION_RUNTIME_VERSIONS.items() if version in versions), None)
    return owner is None or owner == shape.generation


def runtime_versions_for(accelerator_type: str) -> tuple[str, ...]:
    return tuple(v for v in runtime_versions() if runtime_fits(v, accelerator_type))


@cache
def accelerator_types_in_zone(zone: str) -> tuple[str, ...]:
    return tuple(name for name in all_tpu_types() if zone in get_tpu_topology(name).zones)


def lookup_accelerator_type(name: str) -> TpuTopology | None:
    try:
        return get_tpu_topology(name)
    except UnknownTpuTypeError:
        return None


def accelerator_type_from_config(config_type: str, topology: str) -> str | None:
    """The accelerator type name of an ``accelerator_config{type, topology}``, if one matches."""
    for name in all_tpu_types():
        shape = get_tpu_topology(name)
        if ACCELERATOR_CONFIG_TYPES[shape.generation] == config_type and shape.topology == topology:
            return name
    return None


def project_number(project: str) -> int:
    """A stable 12-digit project number for a project id (real projects have one too)."""
    return 100_000_000_000 + int(hashlib.sha256(project.encode()).hexdigest(), 16) % 900_000_000_000
