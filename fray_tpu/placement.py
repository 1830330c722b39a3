"""Where the slices of one attempt go (pure).

Every slice of a gang goes to one zone: Megascale traffic between zones is slow or broken, and
Google's own multislice keeps a job's slices in one zone. So an attempt fails over as a group:
when one slice cannot be had in a zone, the slices it did get there are given back and the whole
group tries the next zone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fray_tpu.errors import CreateRejectedError, NoUsableZoneError


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


@dataclass(frozen=True)
class Placed:
    """Every missing slice was acquired."""


@dataclass(frozen=True)
class FailNow:
    """No retry heals this: the job fails with ``error`` (Google's words and the fix)."""

    error: CreateRejectedError


@dataclass(frozen=True)
class WaitForCapacity:
    """No zone could take the group this round: wait for capacity (``errors``: why, by slice id)."""

    errors: Mapping[int, Exception]


@dataclass(frozen=True)
class GiveBack:
    """The zone could not take the whole group: release what it gave, say ``message``."""

    message: str


class GroupPlacement:
    """One provisioning round of an attempt's missing slices (pure): the zones to try, a group at
    a time, and what each group's errors mean. One slice walks every zone in one acquire (the
    provisioner moves on by itself); several slices try one zone at a time, together.

    The shell acquires ``next_group()``'s zones, feeds the errors to ``after_group`` (executing
    the ``GiveBack`` it may return), and once ``next_group()`` is None acts on ``outcome()``."""

    def __init__(self, zones: Sequence[str], held: Iterable[str], slice_count: int):
        self.slice_count = slice_count
        if slice_count <= 1:
            self._groups = [list(zones)]
        else:
            self._groups = [[zone] for zone in group_zone_order(zones, held)]
        self._tried = 0
        self._errors: Mapping[int, Exception] = {}
        self._skipped: dict[str, str] = {}  # zone -> why no slice can go there
        self._final: Placed | FailNow | None = None

    def next_group(self) -> list[str] | None:
        """The zones of the next group to try, or None when the round is over."""
        if self._final is not None or self._tried >= len(self._groups):
            return None
        self._tried += 1
        return self._groups[self._tried - 1]

    def after_group(self, errors: Mapping[int, Exception]) -> GiveBack | None:
        """``errors``: why each missing slice was not acquired in the group just tried."""
        self._errors = dict(errors)
        if not errors:
            self._final = Placed()
            return None
        fatal = [e for e in errors.values() if isinstance(e, CreateRejectedError) and not isinstance(e, NoUsableZoneError)]
        if fatal:
            self._final = FailNow(fatal[0])
            return None
        if len(self._groups) == 1:
            return None  # one slice, or a group pinned to its held zone: nowhere to fail over to
        (zone,) = self._groups[self._tried - 1]
        no_zone = [e for e in errors.values() if isinstance(e, NoUsableZoneError)]
        if no_zone:
            self._skipped[zone] = str(no_zone[0])
        then = "the group moves on to the next zone" if self._tried < len(self._groups) else "no zone is left this round"
        return GiveBack(f"zone {zone} could not take all {self.slice_count} slices; {then}")

    def outcome(self) -> Placed | FailNow | WaitForCapacity:
        """What the round came to (after ``next_group()`` returned None)."""
        if self._final is not None:
            return self._final
        if self._skipped and len(self._skipped) == len(self._groups):
            return FailNow(NoUsableZoneError("no zone can take this job's slices: " + "; ".join(
                f"{zone}: {reason}" for zone, reason in self._skipped.items())))
        if len(self._groups) == 1 and all(isinstance(e, NoUsableZoneError) for e in self._errors.values()):
            return FailNow(next(iter(self._errors.values())))
        return WaitForCapacity(self._errors)


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
