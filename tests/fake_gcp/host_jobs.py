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


# `python -c SCRUBBED_DAEMON PID_FILE [IP PORT]`, run with an empty environment: double-forks,
# calls setsid (leaving the attempt's group and session; the empty environment drops its token),
# optionally holds IP:PORT, writes its pid and waits: a daemon that left the attempt every way it can.
SCRUBBED_DAEMON = """
import os, socket, sys, threading
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
if len(sys.argv) > 2:
    listener = socket.socket()
    listener.bind((sys.argv[2], int(sys.argv[3])))
    listener.listen()
with open(sys.argv[1] + ".partial", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".partial", sys.argv[1])
threading.Event().wait(300)
"""


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
