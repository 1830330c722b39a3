"""Test harness around the Cloud TPU emulator: the emulator as its own process, the unmodified
client pointed at it, fault scenarios, and the leak check (see ``fixtures``)."""

from .client import make_tpu_client, polling
from .harness import PROJECT, TEST_TIMINGS, FakeGcp, leak_report
from .process import EmulatorProcess, process_alive
from .scenarios import (
    create_node,
    delete_node,
    error_burst,
    held_in_creating,
    location,
    node_spec,
    node_state,
    operations_never_finish,
    queued_resource_state,
    quota_exhausted,
    run_to_end,
    stocked_out,
    wait_for,
    wait_hosts,
    wait_node_state,
    wait_queued_resource_state,
)

__all__ = [
    "PROJECT",
    "TEST_TIMINGS",
    "EmulatorProcess",
    "FakeGcp",
    "create_node",
    "delete_node",
    "error_burst",
    "held_in_creating",
    "leak_report",
    "location",
    "make_tpu_client",
    "node_spec",
    "node_state",
    "operations_never_finish",
    "polling",
    "queued_resource_state",
    "quota_exhausted",
    "run_to_end",
    "stocked_out",
    "wait_for",
    "wait_hosts",
    "wait_node_state",
    "wait_queued_resource_state",
]
