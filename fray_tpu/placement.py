"""Where the slices of one attempt go (pure).

Every slice of a gang goes to one zone: Megascale traffic between zones is slow or broken, and
Google's own multislice keeps a job's slices in one zone. So an attempt fails over as a group:
when one slice cannot be had in a zone, the slices it did get there are given back and the whole
group tries the next zone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def group_zone_order(allowed: Sequence[str], held: Iterable[str]) -> list[str]:
    """The zones to try, in order, for the missing slices of an attempt whose other slices are
    held in ``held`` (their zones). Held slices pin the group to their zone, when it is allowed
    and they agree on one; otherwise every allowed zone, in order."""
    held_zones = set(held)
    if len(held_zones) == 1:
        (zone,) = held_zones
        if zone in allowed:
            return [zone]
    return list(allowed)


def placement_note(slice_count: int, vms_per_slice: int = 2) -> str:
    """The plan's one line on placement (with the single-host multislice warning)."""
    if slice_count <= 1:
        return "the first zone in order with capacity"
    note = f"all {slice_count} slices in one zone (the first in order with capacity for all; failover as a group)"
    warning = multislice_warning(slice_count, vms_per_slice)
    return f"{note}; WARNING: {warning}" if warning else note


def multislice_warning(slice_count: int, vms_per_slice: int) -> str | None:
    """Why several single-host slices may not form one Megascale job, or None."""
    if slice_count <= 1 or vms_per_slice > 1:
        return None
    return ("several single-host slices: Google documents Multislice for multi-host slices (GKE refuses "
            "single-host ones), so Megascale over DCN may not work; prefer one multi-host slice of the same "
            "chip count, or run the slices as independent replicas")


class WorkerOrderMismatch(ValueError):
    """The agents of a slice do not report one distinct worker number each, 0..n-1."""


def worker_order(endpoints: Sequence[str], reported: Sequence[int]) -> list[int]:
    """The endpoint indexes in worker order, from the worker number each endpoint's agent
    reported (``reported[i]`` for ``endpoints[i]``). JAX's process 0 and the coordinator are worker
    0 by ``agent-worker-number``, so an endpoint list out of order is reordered; numbers that are
    not one each of 0..n-1 refuse the gang."""
    count = len(endpoints)
    if sorted(reported) != list(range(count)):
        pairs = ", ".join(f"{address} says {number}" for address, number in zip(endpoints, reported))
        raise WorkerOrderMismatch(
            f"the {count} agents of the slice report worker numbers {list(reported)}, not one each of "
            f"0..{count - 1} ({pairs}); refusing to start a gang whose process ids would be wrong"
        )
    position = {number: index for index, number in enumerate(reported)}
    return [position[number] for number in range(count)]
