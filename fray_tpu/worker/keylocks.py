"""Locks per key (a digest) that hold across the agent's threads and other processes on the host.

A thread lock serialises this process (``flock`` is per open file, not per thread); a lock file
under ``directory`` serialises processes sharing it. Both waits have a deadline.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fray_tpu.errors import DeadlineExceeded

POLL_SECONDS = 0.05


class KeyLocks:
    def __init__(self, directory: Path, what: str):
        """``what`` names the guarded work in errors, e.g. "extracting bundle"."""
        self.directory = directory
        self.what = what
        self._guard = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}

    @contextmanager
    def exclusive(self, key: str, timeout: float) -> Iterator[None]:
        with self._guard:
            thread_lock = self._thread_locks.setdefault(key, threading.Lock())
        if not thread_lock.acquire(timeout=timeout):
            raise DeadlineExceeded(f"waited {timeout:.0f}s for another thread {self.what} {key}")
        try:
            lock_path = self.directory / f"{key}.lock"
            with open(lock_path, "w") as lock_file:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise DeadlineExceeded(
                                f"waited {timeout:.0f}s for {lock_path}, held by another process {self.what} {key}"
                            ) from None
                        time.sleep(POLL_SECONDS)
                try:
                    yield
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        finally:
            thread_lock.release()
