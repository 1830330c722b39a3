"""The controller's lease on this host: when it is not renewed in time, the attempt stops.

The clock starts when the agent starts, with a first term as long as the controller may take to
renew it the first time (its boot deadline: it renews a gang's agents once every slice of the
gang serves, and slices become READY minutes apart), so a controller that dies before its first
renewal still does not leave the slice running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Lease:
    def __init__(self, period_seconds: float, on_expired: Callable[[], None], *,
                 first_period_seconds: float | None = None):
        if period_seconds <= 0:
            raise ValueError(f"lease period must be positive, got {period_seconds}")
        self._period = period_seconds
        self._on_expired = on_expired
        self._lock = threading.Lock()
        self._expires_at = time.monotonic() + max(period_seconds, first_period_seconds or 0.0)
        self._expired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def expired(self) -> bool:
        return self._expired

    def remaining(self) -> float:
        with self._lock:
            return max(0.0, self._expires_at - time.monotonic())

    def renew(self, period_seconds: float | None = None) -> float:
        """Extends the lease by `period_seconds` (or the current period) from now."""
        with self._lock:
            if period_seconds is not None and period_seconds > 0:
                self._period = period_seconds
            self._expires_at = time.monotonic() + self._period
            self._expired = False
            return self._period

    def _watch(self) -> None:
        # A tenth of the period (at most 1 s): expiry is noticed promptly even for short leases.
        while not self._stop.wait(min(1.0, self._period / 10)):
            with self._lock:
                due = not self._expired and time.monotonic() >= self._expires_at
                if due:
                    self._expired = True
            if due:
                self._on_expired()
