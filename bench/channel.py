"""Task-channel benchmark: one real agent process on a loopback IP, driven by AgentClient.

Prints one JSON line per metric:
- noop_roundtrip: median and p99 of Describe (pinned TLS + secret check + answer), >= 200 calls;
- attempt_start: Start call -> first statement of the user's callable running, median of runs;
- log_throughput: lines/s from the Start call until the controller holds the last line, with the
  producer's own rate into /dev/null beside it as the baseline;
- bundle_upload: MB/s of a fresh (never seen) bundle, streamed in 1 MiB chunks and verified.

    .venv/bin/python bench/channel.py [--calls 500] [--starts 9] [--lines 2000000] [--bundle-mb 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fray_tpu import tls
from fray_tpu.channel import AgentClient, AttemptExit, AttemptSpec, LogBatch
from fray_tpu.emulator.metadata import HostMetadata, MetadataServer
from fray_tpu.worker import metadata as md
from fray_tpu.worker.identity import host_tls

AGENT_PORT = 8477
LINE = "x" * 50
PRODUCER = (
    "import sys\n"
    "n = int(sys.argv[1]); block = 10000\n"
    "chunk = ''.join(f'{i:09d} ' + '%s\\n' for i in range(block))\n"
    "out = sys.stdout\n"
    "for _ in range(n // block): out.write(chunk)\n"
    "out.flush()\n"
) % LINE


@dataclass
class Bundle:
    digest: str
    path: Path
    size: int


def emit(metric: str, **values) -> None:
    print(json.dumps({"metric": metric, **values}), flush=True)


def start_agent(workdir: Path) -> tuple[subprocess.Popen, AgentClient, MetadataServer]:
    ip = f"127.{random.randint(16, 254)}.{random.randint(128, 255)}.{random.randint(2, 250)}"
    secret = tls.make_secret()
    attributes = {
        md.ATTR_WORKER_NUMBER: "0",
        md.ATTR_WORKER_ENDPOINTS: f"bench:0:{ip}",
        md.ATTR_ACCELERATOR_TYPE: "v5litepod-1",
        md.ATTR_SECRET_SHA256: tls.secret_sha256(secret),
        md.ATTR_AGENT_PORT: str(AGENT_PORT),
        md.ATTR_SELF_DELETE: "false",
    }
    server = MetadataServer(ip, HostMetadata(attributes, {"name": "bench"}, {"project-id": "bench"}))
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    # The agent makes its own key on the "VM" (its state directory); the bench pins that cert.
    material = host_tls(workdir / "fray-tpu-agent")
    env = dict(os.environ, GCE_METADATA_HOST=server.address, GCE_METADATA_IP=server.address,
               FRAY_TPU_EMULATED_HOST="1", FRAY_TPU_HOST_DIR=str(workdir), FRAY_TPU_HOST_IP=ip)
    log = open(workdir / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "fray_tpu.worker"], cwd=workdir, env=env,
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = AgentClient(f"{ip}:{AGENT_PORT}", secret=secret, pinned_cert_pem=material.cert_pem, timeout=30)
    client.wait_until_up(time.monotonic() + 60)
    return agent, client, server


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def bench_noop(client: AgentClient, calls: int) -> None:
    for _ in range(20):
        client.describe()
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        client.describe()
        samples.append((time.perf_counter() - began) * 1e3)
    emit("noop_roundtrip", call="Describe", calls=calls, median_ms=round(statistics.median(samples), 3),
         p99_ms=round(percentile(samples, 0.99), 3), target_median_ms=1.0)


def bench_start(client: AgentClient, runs: int) -> None:
    def report_start_time():
        import time

        print(repr(time.time()), flush=True)

    latencies = []
    for run in range(runs):
        attempt_id = f"start-{run}"
        client.prepare(AttemptSpec.for_callable(attempt_id, report_start_time))
        called = time.time()
        events = list(client.start(attempt_id))
        line = next(line for e in events if isinstance(e, LogBatch) for line in e.lines)
        assert isinstance(events[-1], AttemptExit) and events[-1].code == 0, events[-1]
        latencies.append((float(line) - called) * 1e3)
    emit("attempt_start", runs=runs, median_ms=round(statistics.median(latencies), 1),
         max_ms=round(max(latencies), 1), target_median_ms=200.0)


def bench_logs(client: AgentClient, lines: int) -> None:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", PRODUCER, str(lines)], stdout=subprocess.DEVNULL, check=True)
    baseline = lines / (time.perf_counter() - began)
    client.prepare(AttemptSpec("logs", command=sys.executable, args=["-c", PRODUCER, str(lines)]))
    received = 0
    began = time.perf_counter()
    for event in client.start("logs"):
        if isinstance(event, LogBatch):
            received += len(event.lines)
        elif isinstance(event, AttemptExit):
            assert event.code == 0, event
    elapsed = time.perf_counter() - began
    assert received == lines, f"received {received} of {lines} lines"
    emit("log_throughput", lines=lines, line_bytes=len(LINE) + 10, lines_per_s=round(lines / elapsed),
         baseline_producer_to_devnull_lines_per_s=round(baseline), target_lines_per_s=300_000)


def bench_upload(client: AgentClient, workdir: Path, megabytes: int, runs: int = 3) -> None:
    rates = []
    for run in range(runs):
        data = os.urandom(megabytes << 20)
        path = workdir / f"bundle-{run}.tar.gz"
        path.write_bytes(data)
        bundle = Bundle(hashlib.sha256(data).hexdigest(), path, len(data))
        began = time.perf_counter()
        assert client.upload_bundle(bundle) is True
        rates.append(megabytes / (time.perf_counter() - began))
        path.unlink()
    emit("bundle_upload", megabytes=megabytes, runs=runs, median_mb_per_s=round(statistics.median(rates), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--starts", type=int, default=9)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--bundle-mb", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-channel-"))
    agent, client, server = start_agent(workdir)
    try:
        bench_noop(client, max(args.calls, 200))
        bench_start(client, args.starts)
        bench_logs(client, args.lines)
        bench_upload(client, workdir, args.bundle_mb)
    finally:
        client.close()
        agent.terminate()
        agent.wait(15)
        server.metadata.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
