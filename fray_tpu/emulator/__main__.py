"""``python -m fray_tpu.emulator``: serve the Cloud TPU emulator until SIGTERM or SIGINT.

Prints one JSON line ``{"endpoint": "127.0.0.1:PORT", "root": DIR, ...}`` once serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from fray_tpu.emulator import catalog
from fray_tpu.emulator.emulator import Emulator
from fray_tpu.emulator.timings import EmulatorTimings

PARENT_CHECK_SECONDS = 1.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fray_tpu.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--root", help="directory for the hosts' working directories (default: a temp dir)")
    parser.add_argument("--storage-root", help="directory of the emulated Cloud Storage, kept after exit "
                        "(default: under --root, removed with it)")
    parser.add_argument("--agent-port", type=int, default=catalog.DEFAULT_AGENT_PORT, help="port in network_endpoints")
    parser.add_argument("--zero-delays", action="store_true", help="every timing 0 (benchmarks)")
    parser.add_argument("--timings", help='JSON object of timings to override, e.g. \'{"create_delay": 2}\'')
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


def _watch_parent(stop: threading.Event) -> None:
    parent = os.getppid()
    while not stop.wait(PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            stop.set()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    timings = EmulatorTimings.zero() if args.zero_delays else EmulatorTimings()
    if args.timings:
        try:
            timings = EmulatorTimings.from_json(args.timings, base=timings)
        except ValueError as error:
            print(f"--timings: {error}", file=sys.stderr)
            return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    emulator = Emulator(timings=timings, root=args.root, host=args.host, port=args.port, agent_port=args.agent_port,
                        storage_root=args.storage_root)
    endpoint = emulator.start()
    try:
        print(
            json.dumps({"endpoint": endpoint, "storage_endpoint": emulator.storage.endpoint, "root": str(emulator.root), "pid": os.getpid(), "timings": timings.to_dict()}),
            flush=True,
        )
        if args.exit_with_parent:
            threading.Thread(target=_watch_parent, args=(stop,), daemon=True).start()
        stop.wait()
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
