"""What every benchmark script shares: JSON output and bounded waits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


def emit(record: dict) -> None:
    """One JSON line per metric, flushed at once (benchmarks are read while they run)."""
    print(json.dumps(record), flush=True)


def rounded(value: float, digits: int = 4) -> float:
    return round(value, digits)


def until(condition, what: str, deadline_seconds: float, poll_seconds: float = 0.01):
    """``condition()``'s first truthy value, polled until ``deadline_seconds`` pass."""
    deadline = time.monotonic() + deadline_seconds
    pause = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench waited {deadline_seconds:.0f}s for {what}")
        pause.wait(poll_seconds)


def stamps(directory: Path, prefix: str) -> list[float]:
    """Timestamps the hosts wrote as files ``PREFIX-*`` (skipping ones still being written)."""
    return [float(p.read_text()) for p in directory.glob(f"{prefix}-*") if not p.name.endswith(".partial")]


def load_host_jobs(workspace: Path):
    """Copy ``bench/host_jobs.py`` into ``workspace`` and import it from there (see its docstring)."""
    import importlib
    import shutil
    import sys

    shutil.copy(Path(__file__).with_name("host_jobs.py"), workspace)
    sys.path.insert(0, str(workspace))
    return importlib.import_module("host_jobs")
