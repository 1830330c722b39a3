"""Cleaning a host before an attempt: leftover processes, the libtpu lockfile, busy TPU devices.

An attempt's processes are tracked three ways, so that none can leave:
- a unique `FRAY_TPU_ATTEMPT_TOKEN` in the environment, appended to a file in the agent's state
  directory before the process starts (found after an agent restart too; an unrelated process
  that reused a pid is never touched), but a process may scrub its environment;
- a cgroup v2 per attempt, where the host lets the agent create one (root on the VM): membership
  is inherited by every descendant and cannot be left without privileges;
- the agent as child subreaper (`python -m fray_tpu.worker` sets it): a daemon that double-forks
  and calls `setsid` is re-parented to the agent, not to init, so every live descendant of the
  agent is a process of an attempt (the agent runs nothing else once an attempt is prepared),
  except the spare runner (`spare.py`): an interpreter started for the next attempt, which runs
  nothing of any job until an attempt claims it, and which cleaning therefore leaves alone.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.contract import ATTEMPT_TOKEN_ENV as TOKEN_ENV

TPU_DEVICE_GLOBS = ("/dev/vfio/[0-9]*", "/dev/accel*")
_PROC = Path("/proc")
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
CGROUP_PARENT = "fray-tpu"
ATTEMPT_CGROUP_PREFIX = "attempt-"
# An empty attempt cgroup of another agent this old was left by a dead agent (a live one fills a
# new one within milliseconds and removes it once empty): removed.
STALE_CGROUP_SECONDS = 60.0
# "off" keeps the agent from creating cgroups (a host whose cgroup manager must not be disturbed).
CGROUPS_ENV = "FRAY_TPU_AGENT_CGROUPS"
_JOIN_CGROUP_AND_EXEC = '{ echo 0 >"$0"; } 2>/dev/null; exec "$@"'


class HostNotClean(RuntimeError):
    """Leftover processes or busy TPU devices survived cleaning past the deadline."""


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    state: str

    @property
    def live(self) -> bool:
        return self.state not in ("Z", "X")


def processes() -> Iterator[ProcessInfo]:
    # Plain os calls and bytes: this runs on every attempt's exit and clean (a few hundred
    # processes on a VM), where pathlib and text decoding cost more than the reads.
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        try:
            with open(f"{_PROC}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split(None, 3)
        yield ProcessInfo(pid=int(name), ppid=int(fields[1]), pgid=int(fields[2]), state=fields[0].decode())


def live_group_members(pgid: int) -> list[int]:
    """Pids of the group that are still running (zombies only wait to be reaped)."""
    return [p.pid for p in processes() if p.pgid == pgid and p.live]


def live_descendants(pid: int, table: list[ProcessInfo] | None = None) -> list[int]:
    """Live processes below `pid` in the process tree (not `pid` itself), from `table` (a
    reading of the process table) or a new reading."""
    children: dict[int, list[ProcessInfo]] = {}
    for info in processes() if table is None else table:
        children.setdefault(info.ppid, []).append(info)
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child.live:
                found.append(child.pid)
            frontier.append(child.pid)
    return found


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def become_child_subreaper() -> bool:
    """Orphans below this process are re-parented to it instead of init (Linux >= 3.4)."""
    return _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def is_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    return _libc().prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) == 0 and value.value == 1


def reap_orphans(keep: set[int], table: list[ProcessInfo] | None = None) -> None:
    """Collects the exit status of dead orphans adopted by this subreaper, except `keep` (children
    whose status their own `Popen.wait` collects: taking it would make theirs look like 0), from
    `table` (a reading of the process table) or a new reading."""
    me = os.getpid()
    for info in processes() if table is None else table:
        if info.ppid == me and not info.live and info.pid not in keep:
            try:
                os.waitpid(info.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def cgroup2_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        before, _, after = line.partition(" - ")
        if after.split()[:1] == ["cgroup2"]:
            return Path(before.split()[4])
    return None


class AttemptCgroups:
    """One cgroup v2 per attempt, under `fray-tpu/<state-dir digest>` beside the agent's own cgroup.

    Named by the state directory, so an agent restarted on the same directory finds what an
    earlier one left. `create` returns None where the host does not allow it (no cgroup v2, not
    root, no delegation): the token and the subreaper still track everything.
    """

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def create(cls, state_dir: Path) -> AttemptCgroups | None:
        mount = cgroup2_mount()
        if mount is None or os.environ.get(CGROUPS_ENV) == "off":
            return None
        try:
            own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.startswith("0::"))
        except (OSError, StopIteration):
            return None
        parent = mount / own.lstrip("/") / CGROUP_PARENT
        name = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
        cgroups = cls(parent / name)
        try:
            cgroups.root.mkdir(parents=True, exist_ok=True)
            probe = cgroups.root / "probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError:
            return None
        cgroups._remove_stale(parent)
        return cgroups

    def _remove_stale(self, parent: Path) -> None:
        """Empty cgroups of dead agents (on an emulated host many agents share the machine)."""
        for base in parent.iterdir():
            if base == self.root or not base.is_dir():
                continue
            for attempt in base.glob(ATTEMPT_CGROUP_PREFIX + "*"):
                try:
                    if time.time() - attempt.stat().st_mtime > STALE_CGROUP_SECONDS:
                        attempt.rmdir()
                except OSError:
                    pass  # populated, or just removed by its agent
            try:
                base.rmdir()
            except OSError:
                pass

    def path(self, token: str) -> Path:
        return self.root / f"{ATTEMPT_CGROUP_PREFIX}{token}"

    def add(self, token: str) -> Path:
        path = self.path(token)
        path.mkdir(parents=True, exist_ok=True)
        return path / "cgroup.procs"

    def members(self, token: str) -> list[int]:
        try:
            return [int(pid) for pid in (self.path(token) / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def tokens(self) -> set[str]:
        return {path.name[len(ATTEMPT_CGROUP_PREFIX):] for path in self.root.glob(ATTEMPT_CGROUP_PREFIX + "*")}

    def kill(self, token: str) -> None:
        try:
            (self.path(token) / "cgroup.kill").write_text("1")
        except OSError:
            kill_pids(self.members(token))  # before Linux 5.14

    def remove(self, token: str) -> None:
        try:
            self.path(token).rmdir()
        except OSError:
            pass  # gone already, or still populated: the next clean kills and removes it


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


class ProcessTracker:
    """An attempt's processes by process group and token only: for processes the controller runs
    itself (CPU jobs), where there is no host to clean and nothing to record."""

    def record(self, token: str) -> None:
        pass

    def claim_spare(self, token: str) -> None:
        pass

    def forget(self, token: str) -> None:
        pass

    def tracked_argv(self, token: str, argv: list[str]) -> list[str]:
        return argv

    def started(self, pid: int) -> None:
        pass

    def exited(self, pid: int) -> None:
        pass

    def members(self, token: str, main_pid: int) -> list[int]:
        return sorted(set(live_group_members(main_pid)) | set(processes_with_tokens({token})))

    def signal(self, token: str, main_pid: int, sig: int) -> None:
        try:
            os.killpg(main_pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        kill_pids(self.members(token, main_pid), sig)


class HostCleaner(ProcessTracker):
    """Tracks each attempt's processes (token, cgroup, subreaper) and cleans the host between them."""

    def __init__(self, state_dir: Path, lockfile: Path, *, check_devices: bool, deadline_seconds: float = 60.0):
        self._record = state_dir / "attempt-processes"
        self._lockfile = lockfile
        self._check_devices = check_devices
        self._deadline_seconds = deadline_seconds
        self.cgroups = AttemptCgroups.create(state_dir)
        self._subreaper = is_child_subreaper()
        # Tokens an earlier agent on this host recorded: processes that agent started are not
        # this one's descendants, so only the token (and the cgroup) finds them.
        self._earlier_tokens = self.recorded_tokens()
        self._lock = threading.Lock()
        # Held while cleaning and while a spare runner starts, so a clean never meets a spare
        # half started (its token recorded, its pid not yet known).
        self._clean_lock = threading.Lock()
        # Held while a spare runner is forked and registered, and while the agent's descendants
        # are listed: a spare between fork and registration is never taken for an attempt's.
        self._spawn_lock = threading.Lock()
        # Spare runners not claimed by an attempt: token -> pid. Cleaning spares them.
        self._spares: dict[str, int] = {}
        # Whether an attempt may have run since the last clean (a hand-over followed by a Prepare
        # cleans once, not twice). True at start: an earlier agent may have left anything.
        self._dirty = True
        # The attempt whose processes are the agent's only descendants (None while one is prepared).
        self._owner: str | None = None
        # Main processes whose exit status their Popen collects.
        self._mains: set[int] = set()

    def record(self, token: str) -> None:
        """Remembers an attempt's token before its process exists, so an agent crash cannot lose it."""
        self._append_record(token)
        with self._lock:
            self._owner = token
            self._dirty = True

    def _append_record(self, token: str) -> None:
        # Written, not synced: what a crashed agent wrote is in the page cache for the next one;
        # only an OS crash loses it, and that ends every process it could name.
        with self._record.open("a") as f:
            f.write(token + "\n")

    def start_spare(self, token: str, argv: list[str], **popen: object) -> subprocess.Popen:
        """Start a spare runner under ``token`` (recorded first, like an attempt's, so that an
        agent restarted after a crash kills it); cleaning leaves it alone until it is claimed
        (``claim_spare``) or gone (``spare_gone``)."""
        with self._clean_lock:
            self._append_record(token)
            with self._spawn_lock:
                process = subprocess.Popen(self.tracked_argv(token, argv), **popen)
                with self._lock:
                    self._spares[token] = process.pid
                    self._mains.add(process.pid)
        return process

    def claim_spare(self, token: str) -> None:
        """The spare runner of ``token`` becomes an attempt's main process (recorded already)."""
        with self._lock:
            self._spares.pop(token, None)
            self._owner = token
            self._dirty = True

    def spare_gone(self, token: str) -> None:
        """An unclaimed spare runner was killed and reaped: forget it."""
        with self._lock:
            pid = self._spares.pop(token, None)
            self._mains.discard(pid)
        self.forget(token)

    def _spared(self) -> tuple[set[str], set[int]]:
        with self._lock:
            return set(self._spares), set(self._spares.values())

    def tracked_argv(self, token: str, argv: list[str]) -> list[str]:
        """`argv` run so that its process joins the attempt's cgroup before it execs (so nothing
        forks first): a shell writes its own pid to `cgroup.procs`, then execs `argv` in place.
        (Not a `preexec_fn`: forking the gRPC agent to run Python in the child crashes it.) A
        failed move leaves the process to the token and the subreaper."""
        if self.cgroups is None:
            return argv
        try:
            procs = self.cgroups.add(token)
        except OSError:
            return argv
        return ["/bin/sh", "-c", _JOIN_CGROUP_AND_EXEC, str(procs), *argv]

    def started(self, pid: int) -> None:
        with self._lock:
            self._mains.add(pid)

    def exited(self, pid: int) -> None:
        with self._lock:
            self._mains.discard(pid)

    def members(self, token: str, main_pid: int) -> list[int]:
        """Live processes of the attempt: its group, its token, its cgroup, and while it owns the
        agent's descendants (a subreaper's orphans included), all of them."""
        if self._owns_descendants(token):
            # Every process of the attempt (its group, whatever kept its token) descends from this
            # subreaper agent, orphans re-parented to it: one look at the process table is enough.
            found = set(self._agent_descendants())
        else:
            found = set(super().members(token, main_pid))
        if self.cgroups is not None:
            found.update(self.cgroups.members(token))
        found.discard(os.getpid())
        return sorted(found)

    def signal(self, token: str, main_pid: int, sig: int) -> None:
        if sig == signal.SIGKILL and self.cgroups is not None:
            self.cgroups.kill(token)
        super().signal(token, main_pid, sig)

    def _owns_descendants(self, token: str) -> bool:
        with self._lock:
            return self._owner == token and self._subreaper

    def _agent_descendants(self) -> list[int]:
        """Every live descendant of this (subreaper) agent, after reaping the orphans that died."""
        with self._spawn_lock:
            with self._lock:
                keep = set(self._mains)
                spares = set(self._spares.values())
            table = list(processes())
            reap_orphans(keep, table)
            return [pid for pid in live_descendants(os.getpid(), table) if pid not in spares]

    def forget(self, token: str) -> None:
        """An attempt ended with every process of it gone: the next clean need not look for it.
        (Not synced: losing this only costs the next clean one scan.)"""
        remaining = self.recorded_tokens() - {token}
        self._record.write_text("".join(t + "\n" for t in sorted(remaining)))
        if self.cgroups is not None:
            self.cgroups.remove(token)

    def recorded_tokens(self) -> set[str]:
        try:
            return set(self._record.read_text().split())
        except FileNotFoundError:
            return set()

    def leftovers(self, tokens: set[str]) -> list[int]:
        """Live processes of earlier attempts: by token, by cgroup, and every descendant of a
        subreaper agent (nothing else of the agent runs between attempts)."""
        spare_tokens, spare_pids = self._spared()
        searched = tokens - spare_tokens
        if self._subreaper:
            # What this agent started descends from it (orphans re-parented to it): reading every
            # process's environment is needed only for what an earlier agent started.
            searched &= self._earlier_tokens
        found = set(processes_with_tokens(searched))
        if self.cgroups is not None:
            for token in self.cgroups.tokens() - spare_tokens:
                found.update(self.cgroups.members(token))
        if self._subreaper:
            found.update(self._agent_descendants())
        found.discard(os.getpid())
        return sorted(found - spare_pids)

    def kill_recorded(self, tokens: set[str], deadline: float) -> list[int]:
        """Kills every live process of an earlier attempt; returns the pids it found."""
        leftovers = self.leftovers(tokens)
        if not leftovers:
            return []
        if self.cgroups is not None:
            for token in self.cgroups.tokens() - self._spared()[0]:
                self.cgroups.kill(token)
        kill_pids(leftovers)
        if not wait_until(lambda: not self.leftovers(tokens), deadline):
            raise HostNotClean(f"processes of earlier attempts survived SIGKILL: {self.leftovers(tokens)}")
        return leftovers

    def clean(self) -> list[str]:
        """Makes the host ready for a new attempt; returns notes on what it found."""
        with self._clean_lock:
            return self._clean()

    def _clean(self) -> list[str]:
        with self._lock:
            self._owner = None
            if not self._dirty:
                return []  # cleaned already, and no attempt has run since
        notes: list[str] = []
        deadline = time.monotonic() + self._deadline_seconds
        killed = self.kill_recorded(self.recorded_tokens(), deadline)
        if killed:
            notes.append(f"killed {len(killed)} leftover process(es) of earlier attempts: {killed}")
        spare_tokens = self._spared()[0]
        self._record.write_text("".join(t + "\n" for t in sorted(spare_tokens)))
        if self.cgroups is not None:
            for token in self.cgroups.tokens() - spare_tokens:
                self.cgroups.remove(token)
        if self._lockfile.exists():
            self._lockfile.unlink()
            notes.append(f"removed stale {self._lockfile}")
        if self._check_devices:
            notes.extend(self._free_devices(deadline))
        with self._lock:
            self._dirty = self._owner is not None
            self._earlier_tokens = set()
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
