"""Placement rules (pure): one zone per gang, hosts in the order of their own worker numbers."""

from __future__ import annotations

import pytest

from fray_tpu.errors import CapacityUnavailableError, CreateRejectedError, DeadlineExceeded, NoUsableZoneError
from fray_tpu.placement import (
    FailNow,
    GiveBack,
    GroupPlacement,
    Placed,
    WaitForCapacity,
    WorkerOrderMismatch,
    group_zone_order,
    placement_note,
    worker_order,
)

ZONES = ["us-east5-a", "us-east5-b", "us-east5-c"]


def test_held_slices_pin_the_group_to_their_zone():
    """Missing slices join the held ones' zone; with none held every allowed zone is tried."""
    allowed = ["us-east5-b", "us-east5-a"]
    assert group_zone_order(allowed, []) == allowed
    assert group_zone_order(allowed, ["us-east5-a", "us-east5-a"]) == ["us-east5-a"]
    assert group_zone_order(allowed, ["us-east5-a", "us-east5-b"]) == allowed  # split: cannot pin
    assert "one zone" in placement_note(2) and "one zone" not in placement_note(1)


def test_endpoints_out_of_order_are_put_in_worker_order():
    """Endpoint i's agent reports worker number reported[i]; the result lists endpoints by worker."""
    assert worker_order(["a", "b", "c"], [0, 1, 2]) == [0, 1, 2]
    assert worker_order(["a", "b", "c"], [2, 0, 1]) == [1, 2, 0]


@pytest.mark.parametrize("reported", [[0, 0, 1], [1, 2, 3], [0, 1]])
def test_worker_numbers_that_do_not_fit_refuse_the_gang(reported):
    """Duplicates, gaps or a count mismatch refuse the gang, naming each endpoint's answer."""
    with pytest.raises(WorkerOrderMismatch, match="refusing to start a gang") as raised:
        worker_order(["a", "b", "c"], reported)
    assert "a says" in str(raised.value)


def run_round(placement: GroupPlacement, errors_by_zone: dict[str, dict[int, Exception]]):
    """Drive one round as the shell does: the zones tried, the give-backs, the outcome."""
    tried, given_back = [], []
    while (zones := placement.next_group()) is not None:
        tried.append(zones)
        give_back = placement.after_group(errors_by_zone.get(zones[0], {}))
        if give_back is not None:
            given_back.append(give_back.message)
    return tried, given_back, placement.outcome()


def test_one_slice_walks_every_zone_in_one_acquire():
    """A single slice is one group of all zones: the provisioner moves from zone to zone itself."""
    tried, given_back, outcome = run_round(GroupPlacement(ZONES, [], 1), {})
    assert tried == [ZONES] and given_back == [] and outcome == Placed()


def test_a_gang_tries_one_zone_at_a_time_and_stops_at_the_first_that_takes_it():
    """Two slices: zone a gives one of them, so it is given back; zone b takes both; c is never tried."""
    stockout = CapacityUnavailableError("no capacity in us-east5-a")
    tried, given_back, outcome = run_round(GroupPlacement(ZONES, [], 2), {"us-east5-a": {1: stockout}})
    assert tried == [["us-east5-a"], ["us-east5-b"]]
    assert given_back == ["zone us-east5-a could not take all 2 slices; the group moves on to the next zone"]
    assert outcome == Placed()


def test_no_zone_with_capacity_waits_with_the_last_errors():
    """Every zone short of capacity: each gives back what it gave, the last says so, the round waits."""
    errors = {zone: {0: CapacityUnavailableError(f"stockout in {zone}")} for zone in ZONES}
    tried, given_back, outcome = run_round(GroupPlacement(ZONES, [], 2), errors)
    assert len(tried) == 3 and len(given_back) == 3
    assert given_back[-1] == "zone us-east5-c could not take all 2 slices; no zone is left this round"
    assert isinstance(outcome, WaitForCapacity) and outcome.errors == errors["us-east5-c"]


def test_held_slices_keep_the_missing_ones_in_their_zone_without_giving_back():
    """A replacement slice goes where the surviving ones are: one group, nothing given back on failure."""
    placement = GroupPlacement(ZONES, ["us-east5-b"], 2)
    tried, given_back, outcome = run_round(placement, {"us-east5-b": {1: CapacityUnavailableError("stockout")}})
    assert tried == [["us-east5-b"]] and given_back == [] and isinstance(outcome, WaitForCapacity)


def test_a_fatal_refusal_fails_now_without_trying_further_zones():
    """A refusal no retry heals (not "no usable zone") ends the round at once with that error."""
    fatal = CreateRejectedError("permission denied: tpu.nodes.create")
    tried, given_back, outcome = run_round(GroupPlacement(ZONES, [], 2),
                                           {"us-east5-a": {0: fatal, 1: CapacityUnavailableError("stockout")}})
    assert tried == [["us-east5-a"]] and given_back == [] and outcome == FailNow(fatal)


def test_every_zone_skipped_fails_now_naming_each_zone():
    """Each zone refusing the gang as unusable fails the job with every zone and its reason."""
    errors = {zone: {0: NoUsableZoneError(f"{zone} forbidden by org policy")} for zone in ZONES}
    _, _, outcome = run_round(GroupPlacement(ZONES, [], 2), errors)
    assert isinstance(outcome, FailNow) and isinstance(outcome.error, NoUsableZoneError)
    assert str(outcome.error) == ("no zone can take this job's slices: us-east5-a: us-east5-a forbidden by org policy; "
                                  "us-east5-b: us-east5-b forbidden by org policy; "
                                  "us-east5-c: us-east5-c forbidden by org policy")


def test_some_zones_skipped_and_others_short_of_capacity_wait():
    """A skipped zone among stocked-out ones is not a reason to fail: capacity may come back."""
    errors = {"us-east5-a": {0: NoUsableZoneError("forbidden")},
              "us-east5-b": {0: CapacityUnavailableError("stockout")},
              "us-east5-c": {1: DeadlineExceeded("not READY in time")}}
    _, _, outcome = run_round(GroupPlacement(ZONES, [], 2), errors)
    assert isinstance(outcome, WaitForCapacity)


def test_one_slice_with_no_usable_zone_fails_now():
    """A single slice whose acquire found no usable zone fails with the provisioner's own listing."""
    no_zone = NoUsableZoneError("no zone can take slice s: us-east5-a: forbidden")
    _, _, outcome = run_round(GroupPlacement(ZONES, [], 1), {"us-east5-a": {0: no_zone}})
    assert outcome == FailNow(no_zone)


def test_give_back_is_only_said_when_there_is_something_to_fail_over_from():
    """after_group returns a GiveBack for a failed multi-zone group, None for success."""
    placement = GroupPlacement(ZONES, [], 3)
    placement.next_group()
    assert isinstance(placement.after_group({2: CapacityUnavailableError("stockout")}), GiveBack)
    placement.next_group()
    assert placement.after_group({}) is None
    assert placement.next_group() is None and placement.outcome() == Placed()
