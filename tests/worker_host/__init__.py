"""The worker-host harness: agents as local processes on loopback IPs, each with its own fake
metadata server (what the emulator gives a VM, minus the TPU API)."""

from .harness import (
    AGENT_PORT,
    AgentHost,
    AgentSlice,
    FakeMetadata,
    collect,
    make_slice,
    one_host,
    processes_marked,
    random_loopback_ips,
    teardown_slice,
)

__all__ = [
    "AGENT_PORT",
    "AgentHost",
    "AgentSlice",
    "FakeMetadata",
    "collect",
    "make_slice",
    "one_host",
    "processes_marked",
    "random_loopback_ips",
    "teardown_slice",
]
