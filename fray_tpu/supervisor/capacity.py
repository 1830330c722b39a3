"""How long a job waits for capacity (pure, injected clock).

No capacity anywhere is not an attempt: provisioning tries every zone again with backoff until
the capacity deadline, consuming no retry budget. Zones that stocked out in the last round are
tried last in the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fray_tpu.decisions import capacity_backoff, order_zones
from fray_tpu.errors import CapacityUnavailableError


@dataclass(frozen=True)
class WaitAgain:
    delay: float
    message: str


@dataclass(frozen=True)
class GiveUp:
    message: str


class CapacityWait:
    """One per attempt's provisioning: fed each failed round, says how long to wait or gives up."""

    def __init__(self, deadline_seconds: float, tpu_type: str, zones: Sequence[str], clock: Callable[[], float]):
        self._deadline_seconds = deadline_seconds
        self.deadline = clock() + deadline_seconds  # on ``clock``: a queued resource waits until then too
        self._tpu_type = tpu_type
        self._zones = list(zones)
        self._clock = clock
        self._stocked_out: set[str] = set()
        self.rounds = 0

    def zones(self) -> list[str]:
        """The zones to try this round, in order."""
        return order_zones(self._zones, self._stocked_out)

    def after_failed_round(self, errors: Mapping[int, Exception], stocked_out: Sequence[str] = ()) -> WaitAgain | GiveUp:
        """``errors``: why each missing slice was not acquired; ``stocked_out``: zones that had
        no capacity this round."""
        self.rounds += 1
        self._stocked_out = set(stocked_out)
        summary = "; ".join(f"slice-{i}: {e}" for i, e in sorted(errors.items()))
        now = self._clock()
        if now >= self.deadline:
            return GiveUp(f"gave up after {self._deadline_seconds:.0f}s (capacity_deadline) without capacity "
                          f"for {self._tpu_type} in {', '.join(self._zones)}: {summary}")
        delay = min(capacity_backoff(self.rounds), max(0.0, self.deadline - now))
        kind = "no capacity" if all(isinstance(e, CapacityUnavailableError) for e in errors.values()) else "provisioning failed"
        return WaitAgain(delay, f"{kind}; trying again in {delay:.0f}s: {summary}")
