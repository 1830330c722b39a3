"""The capacity-wait policy on a fake clock: backoff, the deadline, the message, zone order."""

from __future__ import annotations

import pytest

from fray_tpu.errors import CapacityUnavailableError, ProvisioningError
from fray_tpu.supervisor.capacity import CapacityWait, GiveUp, WaitAgain


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def policy(deadline=600.0, zones=("a", "b", "c")):
    clock = Clock()
    return CapacityWait(deadline, "v5p-64", zones, clock), clock


def test_waits_grow_then_cap_and_say_why():
    """Each round without capacity waits longer (2, 4, 8 ... capped at 120 s), naming every slice's error."""
    wait, clock = policy(deadline=10_000)
    delays = []
    for _ in range(9):
        step = wait.after_failed_round({0: CapacityUnavailableError("stockout in a"), 1: CapacityUnavailableError("quota")})
        assert isinstance(step, WaitAgain)
        delays.append(step.delay)
        clock.now += step.delay
    assert delays == [2, 4, 8, 16, 32, 64, 120, 120, 120]
    assert step.message == "no capacity; trying again in 120s: slice-0: stockout in a; slice-1: quota"


def test_other_provisioning_errors_are_named_as_such():
    """A round that failed for a reason other than capacity says "provisioning failed"."""
    wait, _ = policy()
    step = wait.after_failed_round({0: CapacityUnavailableError("stockout"), 1: ProvisioningError("boot failed")})
    assert step.message.startswith("provisioning failed; trying again in 2s")


def test_the_last_wait_ends_at_the_deadline_then_gives_up():
    """No wait runs past the capacity deadline; the round after it gives up with the deadline named."""
    wait, clock = policy(deadline=5.0)
    first = wait.after_failed_round({0: CapacityUnavailableError("stockout")})
    clock.now += first.delay
    second = wait.after_failed_round({0: CapacityUnavailableError("stockout")})
    assert isinstance(second, WaitAgain) and second.delay == pytest.approx(3.0)
    clock.now += second.delay
    final = wait.after_failed_round({0: CapacityUnavailableError("stockout")})
    assert isinstance(final, GiveUp)
    assert final.message == ("gave up after 5s (capacity_deadline) without capacity for v5p-64 in a, b, c: "
                             "slice-0: stockout")


def test_zones_that_stocked_out_are_tried_last_next_round():
    """Zones without capacity in the last round move to the end, in their configured order."""
    wait, _ = policy()
    assert wait.zones() == ["a", "b", "c"]
    wait.after_failed_round({0: CapacityUnavailableError("x")}, stocked_out=["a"])
    assert wait.zones() == ["b", "c", "a"]
    wait.after_failed_round({0: CapacityUnavailableError("x")}, stocked_out=["c", "a"])
    assert wait.zones() == ["b", "a", "c"]
    wait.after_failed_round({0: CapacityUnavailableError("x")}, stocked_out=[])
    assert wait.zones() == ["a", "b", "c"]


@pytest.mark.parametrize("rounds", range(1, 40))
def test_no_wait_is_negative_or_past_the_deadline(rounds):
    """Whatever the number of rounds, a wait is within [0, time left]."""
    wait, clock = policy(deadline=300.0)
    start = clock.now
    for _ in range(rounds):
        step = wait.after_failed_round({0: CapacityUnavailableError("x")})
        if isinstance(step, GiveUp):
            assert clock.now >= start + 300.0
            return
        assert 0 <= step.delay <= start + 300.0 - clock.now
        clock.now += step.delay
