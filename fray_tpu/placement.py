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


def placement_note(slice_count: int) -> str:
    """The plan's one line on placement."""
    if slice_count <= 1:
        return "the first zone in order with capacity"
    return f"all {slice_count} slices in one zone (the first in order with capacity for all; failover as a group)"
