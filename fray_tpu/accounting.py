"""Chip-hours and cost of a job, from what the journal recorded.

The supervisor writes, in the job row's ``extra``: ``generation``, ``capacity`` and ``attempts``
(one entry per attempt: number, start and end times, outcome, and the names of the slices it ran
on). Each slice's own lifetime (created, ready, deleted) is its ``ResourceRow``. This module joins
the two into ``costs.SliceInterval``s; ``costs.job_cost`` does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

from fray_tpu.costs import JobCost, PriceTable, SliceInterval, job_cost


def slice_intervals(extra: dict, resources: Sequence) -> list[SliceInterval]:
    generation = extra.get("generation")
    capacity = extra.get("capacity")
    if not generation or not capacity:
        return []
    attempts = extra.get("attempts", [])
    intervals = []
    for resource in resources:
        if resource.state == "failed":
            continue  # never existed past a stockout: nothing billed
        used = [a for a in attempts if resource.name in a.get("slices", [])]
        common = dict(slice_id=resource.slice_id, chips=resource.chips, generation=generation, capacity=capacity,
                      provisioned_at=resource.created, ready_at=resource.ready_at, released_at=resource.deleted_at)
        if not used:
            intervals.append(SliceInterval(attempt=resource.attempt, running_from=None, running_until=None,
                                           preempted=False, **common))
        for attempt in used:
            intervals.append(SliceInterval(
                attempt=attempt["attempt"], running_from=attempt.get("started"), running_until=attempt.get("ended"),
                preempted=attempt.get("outcome") == "preempted" and resource.name in attempt.get("lost", []),
                **common,
            ))
    return intervals


def cost_of(extra: dict, resources: Sequence, now: float, prices: PriceTable | None = None) -> JobCost:
    return job_cost(slice_intervals(extra, resources), now, prices or PriceTable.from_env())
