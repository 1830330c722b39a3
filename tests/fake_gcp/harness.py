"""What a test holds while the emulator runs: the endpoint, the control client, the project."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from google.cloud import tpu_v2

from fray_tpu.emulator import EmulatorControl, EmulatorTimings

from .client import make_tpu_client
from .process import EmulatorProcess
from .scenarios import location

PROJECT = "fray-tpu-test"
# Fast but ordered like the real service: READY before the create operation is done, etc.
TEST_TIMINGS = EmulatorTimings(
    create_delay=0.2,
    delete_delay=0.1,
    operation_lag=0.1,
    qr_wait_delay=0.1,
    qr_provision_delay=0.2,
    stockout_delay=0.1,
    preempt_notice=0.0,
)

@dataclass
class FakeGcp:
    """The emulator as a test sees it."""

    endpoint: str
    control: EmulatorControl
    project: str
    process: EmulatorProcess

    def parent(self, zone: str) -> str:
        return location(self.project, zone)

    def client(self) -> tpu_v2.TpuClient:
        return make_tpu_client(self.endpoint)

    def provisioner(self, *, poll_interval: float, retry, cleanup_timeout: float):
        """A ``SliceProvisioner`` on this emulator with a test's polling and retry speeds, closed
        when the ``with`` block ends."""
        from fray_tpu.provisioner import SliceProvisioner

        return contextlib.closing(SliceProvisioner(self.client(), self.project, api_timeout=5.0,
                                                   poll_interval=poll_interval, retry=retry,
                                                   cleanup_timeout=cleanup_timeout))

def leak_report(leaks: dict) -> str:
    return "resources left alive at the end of the test:\n" + json.dumps(leaks, indent=2, sort_keys=True)
