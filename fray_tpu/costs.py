"""What a job's slices cost: a price table per TPU generation and capacity class, and the
accounting of a job's chip-hours (provisioned, running user code, lost to preemption, boot, idle).

Pure code, no I/O: the caller passes the slice intervals (from the journal) and ``now``.

Default prices (USD per chip-hour, list prices, no discounts, no VM disk or network charges)
-------------------------------------------------------------------------------------------
Read on 2026-11-27. Sources:

- [G] Google, Cloud TPU pricing, https://cloud.google.com/tpu/pricing. The stored copy of that
  page available to us was an old revision (v4 preview); current per-chip prices were therefore
  taken from [S].
- [S] SkyPilot's GCP catalog, ``skypilot-org/skypilot-catalog`` ``catalogs/v8/gcp/vms.csv``
  (commit 8427bbff988abdd050a9f51addd314ef31cb4e85), generated from Google's Cloud Billing
  Catalog API SKUs (per-slice prices; divided here by the slice's chip count). On-demand prices
  are the same in every US region listed; spot prices vary by region, see below.
- [T] Google's Trillium (v6e) GA announcement, as quoted by Neowin
  (https://neowin.net/amp/google-takes-on-nvidia-blackwell-gpus-with-the-new-trillium-tpus):
  "starting at $2.7000 per chip-hour ... 1-year and 3-year commitments ... $1.8900 per
  chip-hour and $1.2200 per chip-hour".

Capacity classes:

- ``on-demand``: the US list price [S]; identical in every US region in [S]. (Europe and Asia
  cost more: e.g. v5e 1.56 and v6e 2.97 in europe-west4.)
- ``spot``: Spot prices are set per region and change over time. The default is the price in
  [S] for one US zone fray-tpu tries for the generation (named below); other US zones in [S]
  range from about half to the same value. Override for your zone (see below).
- ``preemptible``: billed on the same "Preemptible" SKUs as spot ([S]'s fetcher maps spot to
  them), so the default equals spot.
- ``reserved``: ASSUMPTION: reserved capacity comes with a committed-use discount; the default
  is the 1-year commitment price per chip-hour. Only v6e's is verified ([T]); the v4, v5e and
  v5p values are remembered from Google's pricing page and could NOT be verified from the
  sources above (marked below). Put your contract's price in ``FRAY_TPU_PRICES``.

Overrides: ``PriceTable.from_mapping({"v5e": {"spot": 0.6}})`` or the environment variable
``FRAY_TPU_PRICES='{"v5e": {"spot": 0.6}}'`` (``PriceTable.from_env``); both are merged over the
defaults, so name only what differs.

Accounting semantics (``job_cost``)
-----------------------------------
A ``SliceInterval`` is one slice's life during one attempt of a job. Per slice (``slice_id``):

- **provisioned**: from ``provisioned_at`` (the create call) to ``released_at`` (the delete), or
  to ``now`` while the slice is held. This is the billed time. Intervals of the same slice
  (a healthy slice kept for the next attempt) are billed once: the union of their windows,
  ending at the slice's deletion (the ``released_at`` any of them carries; the earliest if
  several do).
- **running**: ``running_from`` → ``running_until`` (or release / ``now`` while running) of
  attempts that did NOT end in preemption: user code ran on the chips (whether it succeeded or
  failed).
- **lost to preemption**: the running time *and* the boot time of intervals marked
  ``preempted`` (the attempt ended because of a preemption; the caller decides whether to mark
  only the lost slice or every slice of the gang).
- **boot**: ``provisioned_at`` → ``running_from`` (or → release / ``now`` when it never ran) of
  intervals not marked ``preempted``.
- **idle**: the rest of the provisioned time, e.g. after the run until deletion.

Where a slice's windows overlap, a moment counts once, in the first matching bucket of:
running, lost to preemption, boot, idle. So provisioned = running + lost + boot + idle.
Windows are clipped to the slice's provisioned window. Chip-hours are chips × hours; the
estimated cost is each slice's provisioned chip-hours × the price of its generation and
capacity class. ``ready_at`` (node READY) is carried for reports and does not change buckets.
"""

from __future__ import annotations

import dataclasses

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fray_tpu.config import CAPACITY_CLASSES
from fray_tpu.errors import ConfigError
from fray_tpu.state import ResourceState
from fray_tpu.topology import RUNTIME_VERSIONS, get_tpu_topology

PRICES_ENV = "FRAY_TPU_PRICES"
GENERATIONS: tuple[str, ...] = tuple(RUNTIME_VERSIONS)

# USD per chip-hour; see the module docstring for the sources ([S], [T]) and assumptions.
_DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "v4": {
        "on-demand": 3.22,  # [S] v4-8 (4 chips) $12.88/h, us-central2
        "spot": 0.9215,  # [S] us-central2-b
        "preemptible": 0.9215,  # same SKU as spot
        "reserved": 2.03,  # 1-year commitment; UNVERIFIED (not in [S] or [T])
    },
    "v5e": {
        "on-demand": 1.20,  # [S] v5litepod-1 $1.20/h, US regions
        "spot": 0.48,  # [S] us-west4-a (us-central1-a: 0.245, us-east5: 0.60)
        "preemptible": 0.48,  # same SKU as spot
        "reserved": 0.84,  # 1-year commitment; UNVERIFIED (not in [S] or [T])
    },
    "v5p": {
        "on-demand": 4.20,  # [S] v5p-12288 (6144 chips) $25804.80/h, US regions
        "spot": 1.68,  # [S] us-east5-a (us-central1-a: 0.93)
        "preemptible": 1.68,  # same SKU as spot
        "reserved": 2.94,  # 1-year commitment; UNVERIFIED (not in [S] or [T])
    },
    "v6e": {
        "on-demand": 2.70,  # [S] v6e-1 $2.70/h, US regions; [T]
        "spot": 1.35,  # [S] us-east5-b (us-east1-d, us-central1: 0.573)
        "preemptible": 1.35,  # same SKU as spot
        "reserved": 1.89,  # [T] 1-year commitment
    },
}

_CAPACITY_ALIASES = {"on_demand": "on-demand", "ondemand": "on-demand", "standard": "on-demand"}


def _frozen(prices: Mapping[str, Mapping[str, float]]) -> Mapping[str, Mapping[str, float]]:
    return MappingProxyType({g: MappingProxyType(dict(classes)) for g, classes in prices.items()})


@dataclass(frozen=True)
class PriceTable:
    """USD per chip-hour for every generation × capacity class."""

    prices: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: _frozen(_DEFAULT_PRICES))

    @classmethod
    def default(cls) -> PriceTable:
        return cls(_frozen(_DEFAULT_PRICES))

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Mapping[str, Any]], base: PriceTable | None = None) -> PriceTable:
        """``overrides`` (``{"v5e": {"spot": 0.6}}``) merged over ``base`` (the defaults)."""
        return (base or cls.default()).merged(overrides, source="the price overrides")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PriceTable:
        """The defaults, with the JSON in ``FRAY_TPU_PRICES`` (if set) merged over them."""
        env = os.environ if environ is None else environ
        text = env.get(PRICES_ENV, "").strip()
        if not text:
            return cls.default()
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{PRICES_ENV} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}. "
                f'Write e.g. {PRICES_ENV}=\'{{"v5e": {{"spot": 0.6}}}}\''
            ) from None
        return cls.default().merged(overrides, source=PRICES_ENV)

    def merged(self, overrides: Any, source: str) -> PriceTable:
        if not isinstance(overrides, Mapping):
            raise ConfigError(
                f"{source} must map generation to {{capacity class: USD per chip-hour}}, "
                f'e.g. {{"v5e": {{"spot": 0.6}}}}; got {overrides!r}'
            )
        prices = {g: dict(classes) for g, classes in self.prices.items()}
        for raw_generation, classes in overrides.items():
            generation = _generation(raw_generation, source)
            if not isinstance(classes, Mapping):
                raise ConfigError(
                    f"{source}: {raw_generation!r} must map capacity class to a price, "
                    f'e.g. {{"{generation}": {{"spot": 0.6}}}}; got {classes!r}'
                )
            for raw_capacity, value in classes.items():
                capacity = _capacity(raw_capacity, source)
                prices[generation][capacity] = _price(value, f"{source}: {generation}.{capacity}")
        return PriceTable(_frozen(prices))

    def price(self, generation: str, capacity: str) -> float:
        """USD per chip-hour; unknown generations or classes raise ConfigError naming the valid ones."""
        return self.prices[_generation(generation, "the price table")][_capacity(capacity, "the price table")]

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {g: dict(classes) for g, classes in self.prices.items()}


def _generation(name: Any, source: str) -> str:
    text = str(name).strip().lower()
    if text in GENERATIONS:
        return text
    close = difflib.get_close_matches(text, GENERATIONS, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"Unknown TPU generation {name!r} in {source}{hint}; valid generations: {', '.join(GENERATIONS)} "
        "(v5e is the generation of 'v5litepod-N' types)"
    )


def _capacity(name: Any, source: str) -> str:
    text = str(name).strip().lower()
    text = _CAPACITY_ALIASES.get(text, text)
    if text in CAPACITY_CLASSES:
        return text
    close = difflib.get_close_matches(text, CAPACITY_CLASSES, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"Unknown capacity class {name!r} in {source}{hint}; valid classes: {', '.join(CAPACITY_CLASSES)}")


def _price(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a non-negative number of USD per chip-hour, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceInterval:
    """One slice during one attempt. Times are epoch seconds; ``None`` = not (yet) happened."""

    slice_id: int
    attempt: int
    chips: int
    generation: str
    capacity: str
    provisioned_at: float
    ready_at: float | None
    running_from: float | None
    running_until: float | None
    released_at: float | None
    preempted: bool


@dataclass(frozen=True)
class JobCost:
    """Chip-hours of a job by bucket (see the module docstring) and its estimated cost.

    ``by_capacity`` is the estimated USD per capacity class."""

    chip_hours_provisioned: float
    chip_hours_running: float
    chip_hours_lost_preemption: float
    chip_hours_boot: float
    chip_hours_idle: float
    estimated_usd: float
    by_capacity: dict[str, float]
    started_warm: int = 0  # slices the job took from the warm pool instead of creating them

    def to_dict(self) -> dict[str, Any]:
        """Chip-hours to 4 decimals (0.36 chip-seconds), USD to cents."""
        return {
            "chip_hours_provisioned": round(self.chip_hours_provisioned, 4),
            "chip_hours_running": round(self.chip_hours_running, 4),
            "chip_hours_lost_preemption": round(self.chip_hours_lost_preemption, 4),
            "chip_hours_boot": round(self.chip_hours_boot, 4),
            "chip_hours_idle": round(self.chip_hours_idle, 4),
            "estimated_usd": round(self.estimated_usd, 2),
            "by_capacity": {capacity: round(usd, 2) for capacity, usd in sorted(self.by_capacity.items())},
            "started_warm": self.started_warm,
        }


@dataclass
class AttemptAccount:
    """One attempt as the journal records it (times in epoch seconds)."""

    attempt: int
    started: float
    slices: list[str]  # names of the slices it ran on
    ended: float | None = None
    outcome: str | None = None  # an AttemptOutcome value, or "error"
    lost: list[str] = field(default_factory=list)  # slices lost to preemption in it

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attempt": self.attempt, "started": self.started, "slices": list(self.slices)}
        if self.ended is not None:
            data.update(ended=self.ended, outcome=self.outcome, lost=list(self.lost))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttemptAccount:
        return cls(attempt=int(data["attempt"]), started=float(data.get("started", 0.0)),
                   slices=list(data.get("slices", [])), ended=data.get("ended"), outcome=data.get("outcome"),
                   lost=list(data.get("lost", [])))


@dataclass(frozen=True)
class _HandedOver:
    """A journal resource row as a job account keeps it (the fields ``slice_intervals`` reads)."""

    job_id: str
    attempt: int
    slice_id: int
    name: str
    zone: str
    kind: str
    state: str
    endpoints: list
    created: float
    ready_at: float | None
    deleted_at: float | None
    tpu_type: str
    chips: int


@dataclass
class JobAccount:
    """What the journal keeps of a TPU job for its cost, in the job row's ``extra`` column; each
    slice's own lifetime (created, ready, deleted) is its ``ResourceRow``."""

    generation: str | None = None
    capacity: str | None = None
    attempts: list[AttemptAccount] = field(default_factory=list)
    started_warm: list[str] = field(default_factory=list)  # slices taken from the warm pool, not created
    # Slices the job left to the warm pool: their journal rows as they were then (the pool, then
    # the next job, hold the rows afterwards), released when the job ended.
    handed_over: list[Any] = field(default_factory=list)

    def to_extra(self) -> dict[str, Any]:
        extra = {"generation": self.generation, "capacity": self.capacity,
                 "attempts": [a.to_dict() for a in self.attempts]}
        if self.started_warm:
            extra["started_warm"] = list(self.started_warm)
        if self.handed_over:
            extra["handed_over"] = [dataclasses.asdict(r) for r in self.handed_over]
        return extra

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> JobAccount:
        extra = extra or {}
        return cls(generation=extra.get("generation"), capacity=extra.get("capacity"),
                   attempts=[AttemptAccount.from_dict(a) for a in extra.get("attempts", [])],
                   started_warm=list(extra.get("started_warm", [])),
                   handed_over=[_HandedOver(**r) for r in extra.get("handed_over", [])])

    def open_attempt(self) -> AttemptAccount | None:
        """The attempt that has started and not ended (the one a restarted controller resumes)."""
        return next((a for a in self.attempts if a.ended is None), None)

    def slice_intervals(self, resources: Sequence[Any]) -> list[SliceInterval]:
        """Each slice during each attempt it ran, joined from the journal's resource rows."""
        if not self.generation or not self.capacity:
            return []
        intervals = []
        held = {r.name for r in resources}
        for resource in [*resources, *(r for r in self.handed_over if r.name not in held)]:
            if resource.state == ResourceState.FAILED:
                continue  # never existed past a stockout: nothing billed
            used = [a for a in self.attempts if resource.name in a.slices]
            common = dict(slice_id=resource.slice_id, chips=resource.chips, generation=self.generation,
                          capacity=self.capacity, provisioned_at=resource.created, ready_at=resource.ready_at,
                          released_at=resource.deleted_at)
            if not used:
                intervals.append(SliceInterval(attempt=resource.attempt, running_from=None, running_until=None,
                                               preempted=False, **common))
            for attempt in used:
                intervals.append(SliceInterval(
                    attempt=attempt.attempt, running_from=attempt.started, running_until=attempt.ended,
                    preempted=attempt.outcome == "preempted" and resource.name in attempt.lost, **common))
        return intervals


def slice_rate(tpu_type: str | None, capacity: str, prices: PriceTable) -> tuple[int, float | None]:
    """(chips, USD per chip-hour) of a slice; (0, None) for a type this fray-tpu does not know."""
    if not tpu_type:
        return 0, None
    try:
        shape = get_tpu_topology(tpu_type)
        return shape.chip_count, prices.price(shape.generation, capacity)
    except ConfigError:
        return 0, None


def usd_for(chips: int, usd_per_chip_hour: float, seconds: float) -> float:
    """What ``chips`` chips cost for ``seconds`` at ``usd_per_chip_hour``."""
    return chips * usd_per_chip_hour * seconds / _SECONDS_PER_HOUR


@dataclass(frozen=True)
class PoolWaste:
    """Idle time of the controller's warm pool (slices between jobs): waste, charged to no job."""

    chip_hours_idle: float
    estimated_usd: float
    slices_warm_now: int

    def to_dict(self) -> dict[str, Any]:
        return {"chip_hours_idle": round(self.chip_hours_idle, 4), "estimated_usd": round(self.estimated_usd, 2),
                "slices_warm_now": self.slices_warm_now}


def pool_waste(periods: Sequence[Any], now: float, prices: PriceTable | None = None) -> PoolWaste:
    """From the journal's warm periods (``since``, ``until`` or None while warm, type, capacity)."""
    prices = prices or PriceTable.from_env()
    chip_hours = usd = 0.0
    for period in periods:
        seconds = max(0.0, (period.until if period.until is not None else now) - period.since)
        chip_hours += period.chips * seconds / _SECONDS_PER_HOUR
        _, price = slice_rate(period.tpu_type, period.capacity, prices)
        if price is not None:
            usd += usd_for(period.chips, price, seconds)
    return PoolWaste(chip_hours, usd, sum(1 for p in periods if p.until is None))


def cost_of(extra: Mapping[str, Any] | None, resources: Sequence[Any], now: float,
            prices: PriceTable | None = None) -> JobCost:
    """A job's cost from its journal row's ``extra`` and its resource rows."""
    account = JobAccount.from_extra(extra)
    cost = job_cost(account.slice_intervals(resources), now, prices or PriceTable.from_env())
    return dataclasses.replace(cost, started_warm=len(account.started_warm))


# Buckets in the order that decides a moment covered by several windows.
_RUNNING, _LOST, _BOOT = 0, 1, 2
_SECONDS_PER_HOUR = 3600.0


def job_cost(intervals: Sequence[SliceInterval], now: float, prices: PriceTable) -> JobCost:
    """The chip-hours and estimated cost of a job's slice intervals, open ones counted up to ``now``."""
    by_slice: dict[int, list[SliceInterval]] = {}
    for interval in intervals:
        by_slice.setdefault(interval.slice_id, []).append(interval)

    totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # provisioned, running, lost, boot, idle (chip-seconds)
    by_capacity: dict[str, float] = {}
    for slice_id, slice_intervals in by_slice.items():
        chips, generation, capacity = _slice_identity(slice_id, slice_intervals)
        price = prices.price(generation, capacity)
        provisioned, buckets = _slice_seconds(slice_intervals, now)
        totals[0] += chips * provisioned
        for bucket, seconds in enumerate(buckets):
            totals[1 + bucket] += chips * seconds
        totals[4] += chips * (provisioned - sum(buckets))
        usd = chips * provisioned / _SECONDS_PER_HOUR * price
        by_capacity[capacity] = by_capacity.get(capacity, 0.0) + usd

    hours = [t / _SECONDS_PER_HOUR for t in totals]
    return JobCost(
        chip_hours_provisioned=hours[0],
        chip_hours_running=hours[1],
        chip_hours_lost_preemption=hours[2],
        chip_hours_boot=hours[3],
        chip_hours_idle=max(0.0, hours[4]),
        estimated_usd=sum(by_capacity.values()),
        by_capacity=by_capacity,
    )


def _slice_identity(slice_id: int, intervals: list[SliceInterval]) -> tuple[int, str, str]:
    identities = {(i.chips, i.generation, i.capacity) for i in intervals}
    if len(identities) > 1:
        raise ValueError(
            f"Slice {slice_id} has intervals with different (chips, generation, capacity): {sorted(identities)}; "
            "one slice id must name one slice"
        )
    chips, generation, capacity = identities.pop()
    if chips < 0:
        raise ValueError(f"Slice {slice_id} has a negative chip count {chips}")
    return chips, generation, capacity


def _slice_seconds(intervals: list[SliceInterval], now: float) -> tuple[float, list[float]]:
    """(provisioned seconds, [running, lost, boot] seconds) of one slice, overlaps counted once."""
    releases = [i.released_at for i in intervals if i.released_at is not None]
    end = min(releases) if releases else now  # a slice is deleted once, whichever interval says so
    provisioned_windows: list[tuple[float, float]] = []
    labelled: list[tuple[float, float, int]] = []
    for i in intervals:
        start = i.provisioned_at
        if end <= start:
            continue
        provisioned_windows.append((start, end))
        run_start = _clip(i.running_from, start, end)
        boot_end = run_start if run_start is not None else end
        labelled.append((start, boot_end, _LOST if i.preempted else _BOOT))
        if run_start is not None:
            run_end = _clip(i.running_until, run_start, end)
            labelled.append((run_start, end if run_end is None else run_end, _LOST if i.preempted else _RUNNING))

    edges = sorted({t for window in provisioned_windows for t in window} | {t for s, e, _ in labelled for t in (s, e)})
    provisioned = 0.0
    buckets = [0.0, 0.0, 0.0]
    for left, right in zip(edges, edges[1:]):
        if not any(s <= left and right <= e for s, e in provisioned_windows):
            continue
        provisioned += right - left
        covering = [bucket for s, e, bucket in labelled if s <= left and right <= e and s < e]
        if covering:
            buckets[min(covering)] += right - left
    return provisioned, buckets


def _clip(t: float | None, low: float, high: float) -> float | None:
    return None if t is None else min(max(t, low), high)
