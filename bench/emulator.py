"""Emulator benchmark: create a v5litepod-16 through the unmodified client against
``python -m fray_tpu.emulator --zero-delays`` and time create → READY → all 4 hosts booted
(each host's startup-script writes a marker; a second marker after a Python process on the host
read its worker number from its metadata server), plus the API calls that took.

Prints one JSON line per metric (median over repetitions). Run: ``python bench/emulator.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fake_gcp.process import EmulatorProcess  # noqa: E402

from fray_tpu.emulator import EmulatorTimings  # noqa: E402

ACCELERATOR_TYPE = "v5litepod-16"
HOSTS = 4
PARENT = "projects/bench/locations/us-west4-a"
POLL_SECONDS = 0.005
DEADLINE_SECONDS = 30.0
STARTUP_SCRIPT = r"""
touch booted
python3 -c '
import os, urllib.request
request = urllib.request.Request(
    "http://" + os.environ["GCE_METADATA_HOST"] + "/computeMetadata/v1/instance/attributes/agent-worker-number",
    headers={"Metadata-Flavor": "Google"})
open("python.tmp", "w").write(urllib.request.urlopen(request, timeout=10).read().decode())
os.rename("python.tmp", "python-booted")
'
"""


def _until(condition, what: str) -> float:
    deadline = time.monotonic() + DEADLINE_SECONDS
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench waited {DEADLINE_SECONDS}s for {what}")
        pause.wait(POLL_SECONDS)
    return time.perf_counter()


def one_run(client: tpu_v2.TpuClient, control, index: int) -> dict:
    node_id = f"bench-{index}"
    name = f"{PARENT}/nodes/{node_id}"
    node = tpu_v2.Node(
        accelerator_type=ACCELERATOR_TYPE, runtime_version="v2-alpha-tpuv5-lite", metadata={"startup-script": STARTUP_SCRIPT}
    )
    control.reset_counters()
    start = time.perf_counter()
    client.create_node(parent=PARENT, node_id=node_id, node=node, timeout=10)
    ready_at = _until(lambda: client.get_node(name=name, timeout=10).state == tpu_v2.Node.State.READY, "READY")
    calls_to_ready = control.counters()
    workdirs = [Path(h["workdir"]) for h in control.hosts(name)]
    booted_at = _until(lambda: all((w / "booted").exists() for w in workdirs), "every host's marker")
    python_at = _until(lambda: all((w / "python-booted").exists() for w in workdirs), "every host's python marker")
    workers = sorted((w / "python-booted").read_text() for w in workdirs)
    assert workers == [str(i) for i in range(HOSTS)], workers
    delete_start = time.perf_counter()
    client.delete_node(name=name, timeout=10)

    def gone() -> bool:
        try:
            client.get_node(name=name, timeout=10)
            return False
        except exceptions.NotFound:
            return True

    gone_at = _until(gone, "the node to be deleted")
    return {
        "create_to_ready_s": ready_at - start,
        "create_to_all_hosts_booted_s": booted_at - start,
        "create_to_all_hosts_python_read_metadata_s": python_at - start,
        "delete_to_gone_s": gone_at - delete_start,
        "api_calls_to_ready": calls_to_ready,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    with EmulatorProcess(timings=EmulatorTimings.zero()) as process:
        channel = grpc.insecure_channel(process.endpoint)
        transport = tpu_v2.services.tpu.transports.TpuGrpcTransport(channel=channel, credentials=AnonymousCredentials())
        client = tpu_v2.TpuClient(transport=transport)
        runs = [one_run(client, process.control, i) for i in range(args.repetitions)]
        channel.close()
    for metric in ("create_to_ready_s", "create_to_all_hosts_booted_s", "create_to_all_hosts_python_read_metadata_s", "delete_to_gone_s"):
        values = [run[metric] for run in runs]
        print(json.dumps({
            "bench": "emulator",
            "metric": metric,
            "accelerator_type": ACCELERATOR_TYPE,
            "hosts": HOSTS,
            "timings": "zero",
            "median": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values],
        }))
    totals = [sum(run["api_calls_to_ready"].values()) for run in runs]
    print(json.dumps({
        "bench": "emulator",
        "metric": "api_calls_create_to_ready",
        "poll_interval_s": POLL_SECONDS,
        "median": statistics.median(totals),
        "runs": totals,
        "by_method_first_run": runs[0]["api_calls_to_ready"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
