"""Where emulated VMs keep their /run: shared memory while it has room, else disk, so that a
256-host emulation cannot fill this machine's memory."""

from __future__ import annotations

import pytest

from fray_tpu.emulator import hosts
from fray_tpu.emulator.hosts import HostRuntime


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    shared_memory = tmp_path / "shm"  # stands in for /dev/shm, whatever this machine has
    shared_memory.mkdir()
    monkeypatch.setattr(hosts, "SHARED_MEMORY", shared_memory)
    runtime = HostRuntime(tmp_path / "hosts", "runs")
    yield runtime
    runtime.stop_all()


def test_run_dirs_go_to_shared_memory_while_it_has_room_then_to_disk(runtime, monkeypatch):
    """A node fits in shared memory at the normal budget; one whose VMs would take more than the
    machine has boots with its /run on disk."""
    assert runtime._shared_run_root.parent == hosts.SHARED_MEMORY
    assert runtime._run_root_for(4) == runtime._shared_run_root
    monkeypatch.setattr(hosts, "RUN_DIR_BUDGET_BYTES", 1 << 50)
    assert runtime._run_root_for(4) == runtime._disk_run_root
