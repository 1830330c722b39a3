"""A wire-level emulator of the Cloud TPU API v2 that boots every VM of a slice as a local process.

``Emulator`` runs in-process; ``python -m fray_tpu.emulator`` runs it as its own process and
prints its endpoint; ``EmulatorControl(endpoint)`` injects faults into either.
"""

from fray_tpu.emulator.control import Control, EmulatorControl
from fray_tpu.emulator.emulator import Emulator
from fray_tpu.emulator.timings import EmulatorTimings

__all__ = ["Control", "Emulator", "EmulatorControl", "EmulatorTimings"]
