"""The state directory: one journal per controller process, and the view across all of them.

Layout::

    STATE_DIR/controllers/<controller id>/   a Journal (journal.sqlite3, controller.lock, secrets/)
    STATE_DIR/stop-requests/<job id>         `fray-tpu stop` asks whichever controller runs the job

Each controller writes only its own journal, under that journal's lock, so any number of driver
processes share one state directory (Marin users launch from several terminals at once). A
controller that starts adopts the journals whose lock is free — their controller died — and so
reattaches to their running jobs; a journal whose controller lives is never adopted. Readers
(the CLI) see every journal at once through ``JournalSet``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from fray_tpu.state import ResourceState
from fray_tpu.state.journal import DB_FILENAME, LOCK_FILENAME, Journal, JobRow, ResourceRow, WarmPeriod

CONTROLLERS_DIR = "controllers"


def controller_dir(state_dir: Path, controller_id: str) -> Path:
    return Path(state_dir) / CONTROLLERS_DIR / controller_id


def journal_dirs(state_dir: Path) -> list[Path]:
    """Every controller journal of the state directory, oldest first."""
    root = Path(state_dir) / CONTROLLERS_DIR
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if (d / DB_FILENAME).exists()]
    return sorted(found, key=lambda d: (d / DB_FILENAME).stat().st_mtime)


def is_held(journal_dir: Path) -> bool:
    """Whether a live process holds this journal's controller lock.

    Read from /proc/locks where it exists, so a controller starting right now never finds the
    lock taken by this probe; elsewhere, a shared lock tried and dropped at once."""
    lock = Path(journal_dir) / LOCK_FILENAME
    try:
        found = os.stat(lock)
    except FileNotFoundError:
        return False
    proc_locks = Path("/proc/locks")
    if proc_locks.exists():
        device = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
        return any(
            "FLOCK" in fields and device in fields and "->" not in fields
            for fields in (entry.split() for entry in proc_locks.read_text().splitlines())
        )
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the probe's lock, if taken
    return False


class JournalSet:
    """Read-only view of every journal of a state directory, with ``Journal``'s read methods."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.journals = [Journal(d, controller_id="reader", readonly=True) for d in journal_dirs(self.state_dir)]

    def close(self) -> None:
        for journal in self.journals:
            journal.close()

    def jobs(self, *, unfinished_only: bool = False) -> list[JobRow]:
        rows = [row for j in self.journals for row in j.jobs(unfinished_only=unfinished_only)]
        return sorted(rows, key=lambda row: row.created, reverse=True)

    def journal_of(self, job_id: str) -> Journal:
        for journal in self.journals:
            try:
                journal.job(job_id)
                return journal
            except KeyError:
                continue
        count = sum(len(j.jobs()) for j in self.journals)
        raise KeyError(f"unknown job id {job_id!r}: the state directory {self.state_dir} records {count} job(s)")

    def job(self, job_id: str) -> JobRow:
        return self.journal_of(job_id).job(job_id)

    def resources(self, *, job_id: str | None = None, live_only: bool = False) -> list[ResourceRow]:
        journals: Sequence[Journal] = [self.journal_of(job_id)] if job_id is not None else self.journals
        return [r for j in journals for r in j.resources(job_id=job_id, live_only=live_only)]

    def output(self, job_id: str, *, after: int = 0, limit: int = 10_000) -> tuple[list[str], int]:
        return self.journal_of(job_id).output(job_id, after=after, limit=limit)

    def owned_slices(self) -> set[tuple[str, str]]:
        """(name, zone) of the slices someone still holds: a running job's (whatever job its
        labels name: a slice taken from the warm pool keeps the labels it was created with), and
        the warm slices of a live controller's pool. A dead controller's warm slice is an orphan."""
        owned = set()
        for journal in self.journals:
            running = {row.job_id for row in journal.jobs(unfinished_only=True)}
            pool_alive = None
            for row in journal.resources(live_only=True):
                if row.job_id in running:
                    owned.add((row.name, row.zone))
                elif row.state == ResourceState.WARM:
                    if pool_alive is None:
                        pool_alive = is_held(journal.state_dir)
                    if pool_alive:
                        owned.add((row.name, row.zone))
        return owned

    def warm_periods(self) -> list[WarmPeriod]:
        return [p for j in self.journals for p in j.warm_periods()]

    def controller_alive(self, job_id: str) -> bool:
        """Whether the controller that journals ``job_id`` is running."""
        return is_held(self.journal_of(job_id).state_dir)
