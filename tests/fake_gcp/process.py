"""The emulator as its own process: ``python -m fray_tpu.emulator``, endpoint read from stdout."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fray_tpu.emulator import EmulatorControl, EmulatorTimings
from fray_tpu.errors import DeadlineExceeded

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie or a dead one has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


class EmulatorProcess:
    """A running ``python -m fray_tpu.emulator`` with its endpoint and a control client."""

    def __init__(self, timings: EmulatorTimings | None = None, root: Path | None = None):
        self.root = root or Path(tempfile.mkdtemp(prefix="fray-tpu-fake-gcp-"))
        self.timings = timings or EmulatorTimings()
        self.stderr_path = self.root / "emulator.stderr.log"
        self._process: subprocess.Popen | None = None
        self.endpoint: str | None = None
        self.control: EmulatorControl | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> "EmulatorProcess":
        command = [
            sys.executable,
            "-m",
            "fray_tpu.emulator",
            "--port",
            "0",
            "--root",
            str(self.root / "hosts"),
            "--timings",
            json.dumps(self.timings.to_dict()),
            "--exit-with-parent",
        ]
        with open(self.stderr_path, "ab") as stderr:
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=dict(os.environ)
            )
        announcement = self._read_announcement()
        self.endpoint = announcement["endpoint"]
        self.control = EmulatorControl(self.endpoint)
        return self

    def _read_announcement(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        stdout = self._process.stdout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                line = stdout.readline()
                if not line:
                    break
                return json.loads(line)
        self.stop()
        raise DeadlineExceeded(
            f"the emulator process did not print its endpoint within {START_TIMEOUT_SECONDS}s; "
            f"stderr: {self.stderr_path.read_text(errors='replace')[-2000:]}"
        )

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a deadline; returns the exit code."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if self._process.stdout:
            self._process.stdout.close()
        return self._process.returncode

    def __enter__(self) -> "EmulatorProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
