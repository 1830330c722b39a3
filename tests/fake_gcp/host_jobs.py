"""Helpers that job callables use on emulated hosts (local processes sharing this filesystem).

Registered to be pickled by value, like the test modules whose callables use them: the hosts
cannot import ``tests/``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_for_file(path: str, deadline_seconds: float) -> bool:
    """True once ``path`` exists; False at the deadline (bounded polling inside the job)."""
    deadline = time.monotonic() + deadline_seconds
    pause = threading.Event()
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        pause.wait(0.05)
    return False


def write_json(path: Path, value) -> None:
    """Atomically, so a reader never sees half a file."""
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)
