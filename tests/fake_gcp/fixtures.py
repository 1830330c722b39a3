"""pytest fixtures: one emulator process per test session, a clean emulator for every test that
uses it, and an automatic leak check at the end of each such test.

Register with ``pytest_plugins = ["fake_gcp.fixtures"]`` (tests/conftest.py or a test module).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import tpu_v2

from fray_tpu.emulator import EmulatorControl
from fray_tpu.errors import DeadlineExceeded

from .harness import PROJECT, TEST_TIMINGS, FakeGcp, leak_report
from .process import EmulatorProcess
from .scenarios import wait_for

DELETING_GRACE_SECONDS = 10.0


def _settled_leaks(control: EmulatorControl) -> dict:
    """The leaks once resources already DELETING have had time to go (in flight is not a leak)."""

    def settled() -> dict | None:
        leaks = control.leaks()
        deleting = [r for kind in leaks.values() for r in kind if r["state"] == "DELETING"]
        return None if deleting else leaks

    try:
        return wait_for(settled, "resources being deleted to be gone", DELETING_GRACE_SECONDS)
    except DeadlineExceeded:
        return control.leaks()


@pytest.fixture(scope="session")
def emulator_process(tmp_path_factory) -> Iterator[EmulatorProcess]:
    """``python -m fray_tpu.emulator`` for the whole session."""
    process = EmulatorProcess(timings=TEST_TIMINGS, root=tmp_path_factory.mktemp("fake-gcp"))
    process.start()
    yield process
    process.stop()


@pytest.fixture
def fake_gcp(emulator_process: EmulatorProcess) -> Iterator[FakeGcp]:
    """A clean emulator (no resources, no faults, test timings, zeroed counters); fails the test if
    it leaves any node or queued resource alive, then cleans up for the next test."""
    control = emulator_process.control
    control.reset()
    control.set_image(None)
    yield FakeGcp(emulator_process.endpoint, control, PROJECT, emulator_process)
    leaks = _settled_leaks(control)
    control.reset()
    if leaks["nodes"] or leaks["queued_resources"]:
        pytest.fail(leak_report(leaks), pytrace=False)


@pytest.fixture
def emulator_control(fake_gcp: FakeGcp) -> EmulatorControl:
    return fake_gcp.control


@pytest.fixture
def tpu_client(fake_gcp: FakeGcp) -> Iterator[tpu_v2.TpuClient]:
    """The unmodified TpuClient on an insecure channel with anonymous credentials."""
    client = fake_gcp.client()
    yield client
    client.transport.close()


@pytest.fixture
def workspace(tmp_path) -> str:
    """A small workspace for jobs (the default, the current directory, is the whole repository)."""
    path = tmp_path / "workspace"
    path.mkdir()
    (path / "README").write_text("a small workspace for test jobs\n")
    return str(path)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """Where job callables (local processes on emulated hosts) write what the test checks."""
    path = tmp_path / "out"
    path.mkdir()
    return path
