"""The dry run behind ``fray-tpu plan``: what a request for N slices of a TPU type would create,
where it would be tried, and what it would cost per hour. Pure: nothing is created or called.

Bad input raises the same ConfigErrors a real job would (unknown type, bad region, bad
capacity class), before anything else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fray_tpu.config import TpuClusterConfig, resolve_zones
from fray_tpu.placement import placement_note
from fray_tpu.costs import PriceTable
from fray_tpu.errors import ConfigError
from fray_tpu.topology import get_tpu_topology


@dataclass(frozen=True)
class PlanReport:
    tpu_type: str
    generation: str
    slice_count: int
    vms_per_slice: int
    chips_per_vm: int
    chips_per_slice: int
    total_vms: int
    total_chips: int
    topology: str
    runtime_version: str
    capacity: str
    zones: tuple[str, ...]  # in the order they would be tried
    placement: str  # how the slices are placed in those zones
    hourly_usd: float  # all slices, list price (see fray_tpu.costs)
    usd_per_chip_hour: float
    peak_bf16_pflops: float  # all slices

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["zones"] = list(self.zones)
        d["hourly_usd"] = round(self.hourly_usd, 2)
        d["peak_bf16_pflops"] = round(self.peak_bf16_pflops, 3)
        return d

    def render_text(self) -> str:
        slices = "slice" if self.slice_count == 1 else "slices"
        rows = [
            ("TPU type", f"{self.tpu_type} ({self.generation}, topology {self.topology})"),
            ("slices", str(self.slice_count)),
            ("VMs", f"{self.total_vms} ({self.vms_per_slice} per slice)"),
            ("chips", f"{self.total_chips} ({self.chips_per_slice} per slice, {self.chips_per_vm} per VM)"),
            ("runtime version", self.runtime_version),
            ("capacity", self.capacity),
            ("zones, in order", ", ".join(self.zones)),
            ("placement", self.placement),
            ("price", f"${self.hourly_usd:,.2f}/hour for {self.slice_count} {slices} ({_usd(self.usd_per_chip_hour)} per chip-hour)"),
            ("peak bf16", f"{self.peak_bf16_pflops:,.2f} PFLOP/s"),
        ]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
        lines.append("(dry run: nothing was created; prices are list estimates, see fray_tpu.costs)")
        return "\n".join(lines)


def plan_report(
    tpu_type: str,
    slice_count: int,
    regions: list[str] | None,
    capacity: str | None,
    config: TpuClusterConfig,
    prices: PriceTable,
    *,
    preemptible: bool = True,
) -> PlanReport:
    """The plan for ``slice_count`` slices of ``tpu_type``.

    ``capacity`` (None: the config's) is validated like the config's; ``preemptible=False`` (the
    job must not be preempted) turns spot/preemptible into on-demand, as for a real job."""
    topology = get_tpu_topology(tpu_type)
    if isinstance(slice_count, bool) or not isinstance(slice_count, int) or slice_count < 1:
        raise ConfigError(f"slice_count must be a whole number of slices ≥ 1, got {slice_count!r}")
    planned = config if capacity is None else _with_capacity(config, capacity)
    capacity_class = planned.capacity_for(preemptible)
    zones = resolve_zones(tpu_type, regions, config)
    usd_per_chip_hour = prices.price(topology.generation, capacity_class)
    total_chips = topology.chip_count * slice_count
    return PlanReport(
        tpu_type=topology.name,
        generation=topology.generation,
        slice_count=slice_count,
        vms_per_slice=topology.vm_count,
        chips_per_vm=topology.chips_per_vm,
        chips_per_slice=topology.chip_count,
        total_vms=topology.vm_count * slice_count,
        total_chips=total_chips,
        topology=topology.topology,
        runtime_version=config.runtime_version_for(topology),
        capacity=capacity_class,
        zones=tuple(zones),
        placement=placement_note(slice_count, topology.vm_count),
        hourly_usd=total_chips * usd_per_chip_hour,
        usd_per_chip_hour=usd_per_chip_hour,
        peak_bf16_pflops=topology.peak_bf16_tflops * slice_count / 1000.0,
    )


def _usd(amount: float) -> str:
    """Cents when they are exact ($4.20), else 4 decimals ($0.9215)."""
    return f"${amount:.2f}" if abs(amount * 100 - round(amount * 100)) < 1e-9 else f"${amount:.4f}"


def _with_capacity(config: TpuClusterConfig, capacity: str) -> TpuClusterConfig:
    """The config with another capacity class, validated by the config's own rules (a reservation
    name only applies to reserved capacity, so it is dropped for other classes)."""
    wanted = capacity.strip().lower()
    reservation = config.reservation if wanted == "reserved" else None
    return dataclasses.replace(config, capacity=capacity, reservation=reservation)
