"""How long the emulated Cloud TPU takes for each transition (seconds, emulator clock)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class EmulatorTimings:
    """Delays of the emulated state machines. Real Cloud TPU takes minutes; these defaults keep
    the same order of events at test speed. All zero is valid (benchmarks)."""

    create_delay: float = 0.5  # node CREATING → READY
    delete_delay: float = 0.2  # node or queued resource DELETING → gone
    operation_lag: float = 0.2  # a create operation finishes this long AFTER its resource is ready
    qr_wait_delay: float = 0.3  # queued resource WAITING_FOR_RESOURCES → PROVISIONING
    qr_provision_delay: float = 0.5  # queued resource nodes CREATING → READY (then ACTIVE)
    stockout_delay: float = 0.3  # create → operation fails with code 8 in a stocked-out zone
    preempt_notice: float = 0.0  # `preempted` reads TRUE this long before the hosts are killed

    @classmethod
    def zero(cls) -> "EmulatorTimings":
        return cls(**{field.name: 0.0 for field in dataclasses.fields(cls)})

    @classmethod
    def from_json(cls, text: str, base: "EmulatorTimings | None" = None) -> "EmulatorTimings":
        """``base`` with the fields of a JSON object replaced; unknown fields are an error."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"timings must be a JSON object of seconds, got {text!r}")
        return (base or cls()).replaced(**values)

    def replaced(self, **values: float) -> "EmulatorTimings":
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown timing(s) {unknown}; known timings are {sorted(known)}")
        for name, value in values.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"timing {name}={value!r} must be a number of seconds >= 0")
        return dataclasses.replace(self, **{name: float(value) for name, value in values.items()})

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
