"""The Cloud TPU slice table: what each accelerator type is made of and where it is offered.

Pure data and lookups, no I/O. Facts come from ../shared/tpu-facts.md (Cloud TPU documentation):

- v4 and v5p type names count TensorCores (2 per chip); every VM holds 4 chips, so a slice of
  N cores has N/8 VMs.
- v5e (``v5litepod-N``) and v6e type names count chips; up to 8 chips sit on one VM, beyond that
  every VM holds 4 chips, so a slice of N > 8 chips has N/4 VMs.

The VM count is what a launcher needs: it equals the node's ``network_endpoints``, the number of
agents, and JAX's process count per slice.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from fray_tpu.errors import UnknownTpuTypeError

RUNTIME_VERSIONS: dict[str, str] = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Zones offering each generation, in preference order: first the zones Marin uses
# (tpu-facts.md), then the other zones Google's "TPU regions and zones" page lists for the US.
GENERATION_ZONES: dict[str, tuple[str, ...]] = {
    "v4": ("us-central2-b",),
    "v5e": ("europe-west4-b", "us-west4-a", "us-central1-a", "us-south1-a", "us-west1-c"),
    "v5p": ("us-central1-a", "us-east5-a"),
    "v6e": ("europe-west4-a", "us-east1-d", "us-east5-b", "us-central1-b", "us-east5-a"),
}

PEAK_BF16_TFLOPS_PER_CHIP: dict[str, float] = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

# The prefix of the accelerator type name of each generation.
GENERATION_PREFIX: dict[str, str] = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}

# Spellings users type for a generation that are not valid accelerator-type prefixes.
_PREFIX_ALIASES: dict[str, str] = {
    "v4": "v4",
    "v4p": "v4",
    "v5e": "v5litepod",
    "v5lite": "v5litepod",
    "v5litepod": "v5litepod",
    "v5-lite": "v5litepod",
    "v5-litepod": "v5litepod",
    "v5": "v5p",
    "v5p": "v5p",
    "v6e": "v6e",
    "v6": "v6e",
    "v6lite": "v6e",
    "v6litepod": "v6e",
    "v6e-lite": "v6e",
}

_TWO_D_TOPOLOGIES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

# v4 default topologies per tpu-facts.md (chip count → 3D shape).
_V4_TOPOLOGIES = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
}


@dataclass(frozen=True)
class TpuTopology:
    """One accelerator type: the shape of a single slice of it."""

    name: str
    generation: str  # "v4", "v5e", "v5p", "v6e"
    chip_count: int
    vm_count: int
    chips_per_vm: int
    topology: str
    runtime_version: str
    zones: tuple[str, ...]
    peak_bf16_tflops_per_chip: float

    @property
    def cores(self) -> int:
        """TensorCores in the slice: 2 per chip on v4/v5p, 1 per chip on v5e/v6e."""
        return self.chip_count * (2 if self.generation in ("v4", "v5p") else 1)

    @property
    def multi_host(self) -> bool:
        return self.vm_count > 1

    @property
    def peak_bf16_tflops(self) -> float:
        """Peak bf16 TFLOP/s of the whole slice."""
        return self.peak_bf16_tflops_per_chip * self.chip_count


def _derived_3d_topology(chips: int) -> str:
    """A plausible 3D shape for a v5p slice, DERIVED (not taken from Google's table).

    Up to 32 chips the shapes follow the v4 pattern; from 64 chips on, every dimension is a
    multiple of 4 (v5p slices are built from 4x4x4 cubes), chosen as close to a cube as possible.
    """
    if chips in _V4_TOPOLOGIES and chips <= 32:
        return _V4_TOPOLOGIES[chips]
    cubes = chips // 64
    best: tuple[int, int, int] = (1, 1, cubes)
    for a in range(1, cubes + 1):
        if cubes % a:
            continue
        for b in range(a, cubes // a + 1):
            if (cubes // a) % b:
                continue
            c = cubes // (a * b)
            if c < b:
                continue
            if c - a < best[2] - best[0]:
                best = (a, b, c)
    return "x".join(str(4 * d) for d in best)


def _build_table() -> dict[str, TpuTopology]:
    table: dict[str, TpuTopology] = {}

    def add(generation: str, number: int, chips: int, chips_per_vm: int, topology: str) -> None:
        name = f"{GENERATION_PREFIX[generation]}-{number}"
        table[name] = TpuTopology(
            name=name,
            generation=generation,
            chip_count=chips,
            vm_count=chips // chips_per_vm,
            chips_per_vm=chips_per_vm,
            topology=topology,
            runtime_version=RUNTIME_VERSIONS[generation],
            zones=GENERATION_ZONES[generation],
            peak_bf16_tflops_per_chip=PEAK_BF16_TFLOPS_PER_CHIP[generation],
        )

    for cores in (2**k for k in range(3, 13)):  # v4-8 … v4-4096
        add("v4", cores, cores // 2, 4, _V4_TOPOLOGIES[cores // 2])

    # v5p-8 … v5p-64, then every multiple of 128 cores up to v5p-12288.
    for cores in [8, 16, 32, 64, *range(128, 12288 + 1, 128)]:
        add("v5p", cores, cores // 2, 4, _derived_3d_topology(cores // 2))

    for generation in ("v5e", "v6e"):
        for chips in sorted(_TWO_D_TOPOLOGIES):
            add(generation, chips, chips, chips if chips <= 8 else 4, _TWO_D_TOPOLOGIES[chips])
    return table


_TABLE: dict[str, TpuTopology] = _build_table()
_NAME_PATTERN = re.compile(r"^(?P<prefix>[a-z0-9][a-z0-9-]*?)[-_ ]?(?P<number>\d+)$")


def all_tpu_types() -> list[str]:
    """Every known accelerator type name, grouped by generation, smallest first."""
    return list(_TABLE)


def get_tpu_topology(name: str) -> TpuTopology:
    """The slice shape of ``name``; an unknown name raises with the nearest valid names."""
    topology = _TABLE.get(name)
    if topology is None:
        raise UnknownTpuTypeError(_unknown_type_message(name))
    return topology


def region_of(zone: str) -> str:
    """``us-east5`` for ``us-east5-a``."""
    return zone.rsplit("-", 1)[0]


def generation_of(name: str) -> str:
    """``"v4"``, ``"v5e"``, ``"v5p"`` or ``"v6e"`` for a known accelerator type."""
    return get_tpu_topology(name).generation


def suggest_tpu_types(name: str, limit: int = 4) -> list[str]:
    """Valid names close to ``name``: the generation (aliases and typos fixed) with the same or
    the nearest sizes; failing that, the closest spellings."""
    text = str(name).strip().lower()
    suggestions: list[str] = []
    match = _NAME_PATTERN.match(text)
    if match:
        prefix = _resolve_prefix(match.group("prefix").rstrip("-_ "))
        if prefix is not None:
            suggestions.extend(_nearest_sizes(prefix, int(match.group("number"))))
    if not suggestions:
        suggestions = difflib.get_close_matches(text, list(_TABLE), n=limit, cutoff=0.75)
    return suggestions[:limit]


def _resolve_prefix(prefix: str) -> str | None:
    if prefix in _PREFIX_ALIASES:
        return _PREFIX_ALIASES[prefix]
    close = difflib.get_close_matches(prefix, list(_PREFIX_ALIASES), n=1, cutoff=0.75)
    return _PREFIX_ALIASES[close[0]] if close else None


def _nearest_sizes(prefix: str, number: int) -> list[str]:
    """The exact size if it exists under ``prefix``, else the valid sizes just below and above."""
    sizes = sorted(t.cores for t in _TABLE.values() if GENERATION_PREFIX[t.generation] == prefix)
    if number in sizes:
        return [f"{prefix}-{number}"]
    below = [s for s in sizes if s < number][-1:]
    above = [s for s in sizes if s > number][:1]
    return [f"{prefix}-{s}" for s in below + above]


def _unknown_type_message(name: str) -> str:
    suggestions = suggest_tpu_types(name)
    hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    families = ", ".join(f"{prefix}-N" for prefix in GENERATION_PREFIX.values())
    return (
        f"Unknown TPU type {name!r}.{hint} Valid types are {families} "
        f"(see fray_tpu.topology.all_tpu_types(); v5e slices are named 'v5litepod-N')."
    )
