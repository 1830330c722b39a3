"""Cleaning a host before an attempt: leftover processes, the libtpu lockfile, busy TPU devices.

Every attempt process starts with a unique `FRAY_TPU_ATTEMPT_TOKEN` in its environment, and the
token is appended to a file in the agent's state directory before the process starts. Cleaning
kills every live process that carries a recorded token (whatever group or session it moved to),
so leftovers are found after an agent restart too, and an unrelated process that reused a pid
is never touched.
"""

from __future__ import annotations

import glob
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.contract import ATTEMPT_TOKEN_ENV as TOKEN_ENV

TPU_DEVICE_GLOBS = ("/dev/vfio/[0-9]*", "/dev/accel*")
_PROC = Path("/proc")


class HostNotClean(RuntimeError):
    """Leftover processes or busy TPU devices survived cleaning past the deadline."""


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    pgid: int
    state: str


def processes() -> Iterator[ProcessInfo]:
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        yield ProcessInfo(pid=int(entry.name), pgid=int(fields[2]), state=fields[0])


def live_group_members(pgid: int) -> list[int]:
    """Pids of the group that are still running (zombies only wait to be reaped)."""
    return [p.pid for p in processes() if p.pgid == pgid and p.state not in ("Z", "X")]


def processes_with_tokens(tokens: set[str]) -> list[int]:
    if not tokens:
        return []
    wanted = {f"{TOKEN_ENV}={token}".encode() for token in tokens}
    me = os.getpid()
    found = []
    for info in processes():
        if info.pid == me or info.state in ("Z", "X"):
            continue
        try:
            environ = (_PROC / str(info.pid) / "environ").read_bytes()
        except OSError:
            continue
        if wanted.intersection(environ.split(b"\0")):
            found.append(info.pid)
    return found


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until(condition, deadline: float, interval: float = 0.02) -> bool:
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def device_holders(device_paths: list[str]) -> dict[int, str]:
    """Pids (not this one) with an open file descriptor on one of `device_paths`."""
    wanted = set(device_paths)
    holders: dict[int, str] = {}
    me = os.getpid()
    for info in processes():
        if info.pid == me:
            continue
        fd_dir = _PROC / str(info.pid) / "fd"
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in wanted:
                holders[info.pid] = target
                break
    return holders


class HostCleaner:
    def __init__(self, state_dir: Path, lockfile: Path, *, check_devices: bool, deadline_seconds: float = 60.0):
        self._record = state_dir / "attempt-processes"
        self._lockfile = lockfile
        self._check_devices = check_devices
        self._deadline_seconds = deadline_seconds

    def record(self, token: str) -> None:
        """Remembers an attempt's token before its process exists, so a crash cannot lose it."""
        with self._record.open("a") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())

    def forget(self, token: str) -> None:
        """An attempt ended with every process of it gone: the next clean need not look for it.
        (Not synced: losing this only costs the next clean one scan.)"""
        remaining = self.recorded_tokens() - {token}
        self._record.write_text("".join(t + "\n" for t in sorted(remaining)))

    def recorded_tokens(self) -> set[str]:
        try:
            return set(self._record.read_text().split())
        except FileNotFoundError:
            return set()

    def kill_recorded(self, tokens: set[str], deadline: float) -> list[int]:
        """Kills every live process carrying one of `tokens`; returns the pids it found."""
        leftovers = processes_with_tokens(tokens)
        if not leftovers:
            return []
        kill_pids(leftovers)
        if not wait_until(lambda: not processes_with_tokens(tokens), deadline):
            raise HostNotClean(
                f"processes of earlier attempts survived SIGKILL: {processes_with_tokens(tokens)}"
            )
        return leftovers

    def clean(self) -> list[str]:
        """Makes the host ready for a new attempt; returns notes on what it found."""
        notes: list[str] = []
        deadline = time.monotonic() + self._deadline_seconds
        killed = self.kill_recorded(self.recorded_tokens(), deadline)
        if killed:
            notes.append(f"killed {len(killed)} leftover process(es) of earlier attempts: {killed}")
        self._record.write_text("")
        if self._lockfile.exists():
            self._lockfile.unlink()
            notes.append(f"removed stale {self._lockfile}")
        if self._check_devices:
            notes.extend(self._free_devices(deadline))
        return notes

    def _free_devices(self, deadline: float) -> list[str]:
        devices = sorted(path for pattern in TPU_DEVICE_GLOBS for path in glob.glob(pattern))
        if not devices:
            return []
        holders = device_holders(devices)
        if not holders:
            return []
        kill_pids(list(holders))
        if not wait_until(lambda: not device_holders(devices), deadline, interval=0.2):
            raise HostNotClean(
                f"TPU devices still held after {self._deadline_seconds:.0f}s: {device_holders(devices)}"
            )
        return [f"killed {len(holders)} process(es) holding TPU devices: {holders}"]
