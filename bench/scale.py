"""API economy and controller scale: K concurrent single-slice jobs in one controller.

K jobs, each a ``v5litepod-16`` (4 hosts), are launched at once from one ``TpuCluster`` against
the Cloud TPU emulator (its own process, zero delays). Every host runs a function that records
its start and then idles until the driver drops a ``stop`` file (bounded). Once every host of
every job is running, a steady-state window of ``--window`` seconds measures:

- Cloud TPU API calls (``EmulatorControl.counters()`` delta, by method): per job-minute, and per
  zone per poll interval (target <= 2, independent of the number of slices and hosts). Calls are
  attributed to the zones that hold the jobs' slices (the emulator counts by method only).
- the controller process's CPU share: ``resource.getrusage(RUSAGE_SELF)`` user+system over the
  window / wall time (this process is the controller: every supervisor, lease and event-stream
  thread), and its thread count; the emulator process's share beside it (``/proc``).

Then the stop file ends the jobs; the run waits for every job and every slice's deletion and
prints the slices left (0 expected). Bounded: it stops itself after ``TOTAL_BUDGET_SECONDS``.

Default size: 16 jobs x 4 hosts = 64 emulated hosts. Each emulated host is a bash startup-script,
a Python agent and, while the job runs, a Python attempt runner that preloads JAX
(``fray_tpu.jax_emulated_cluster``): ~130 Python processes (the RSS line), booted on a shared
2-core machine. ``--jobs`` scales it down; the API-call and CPU figures are per zone and per job.

The jobs are launched at once and pack their (shared) workspace concurrently, as a burst of
launches from one controller does. The benchmark stops at the first job that ends before the window.

Run: ``.venv/bin/python bench/scale.py [--jobs 16] [--window 30] [--poll-interval 1.0]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fake_gcp.process import EmulatorProcess  # noqa: E402

from benchlib import emit, until  # noqa: E402
from fray_tpu.cluster import TpuCluster  # noqa: E402
from fray_tpu.config import TpuClusterConfig  # noqa: E402
from fray_tpu.contract import HOST_DIR_ENV  # noqa: E402
from fray_tpu.emulator import EmulatorTimings  # noqa: E402
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig  # noqa: E402

TPU_TYPE = "v5litepod-16"
HOSTS_PER_SLICE = 4
TARGET_CALLS_PER_ZONE_PER_INTERVAL = 2.0
HOST_IDLE_LIMIT_SECONDS = 240.0  # a host function gives up waiting for the stop file after this
WAIT_POLL_SECONDS = 0.1
TOTAL_BUDGET_SECONDS = 420.0


def idle_until_stopped(out_dir: str, stop_file: str, limit_seconds: float, stamp_by: str = "FRAY_TPU_JOB_ID") -> None:
    """Record this host's start as ``<$stamp_by>-TASK``, then idle until the driver writes
    ``stop_file`` (bounded)."""
    path = Path(out_dir) / f"{os.environ[stamp_by]}-{os.environ['FRAY_TASK_INDEX']}"
    path.write_text(repr(time.time()))
    deadline = time.monotonic() + limit_seconds
    pause = threading.Event()
    while not os.path.exists(stop_file):
        if time.monotonic() > deadline:
            raise SystemExit(f"no stop file {stop_file} after {limit_seconds:.0f}s")
        pause.wait(0.5)






def cpu_seconds_of_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb_of_tree(roots: list[int], host_root: Path | None = None, field: str = "Rss") -> float:
    """Memory of ``roots``, of the emulated hosts' processes under ``host_root`` (each has its
    host directory there in its environment: an agent runs as its own service, detached from the
    startup-script and so from the emulator's process tree) and of all their descendants, in MB:
    ``Rss`` (each process's resident pages, shared ones counted in every process) or ``Pss``
    (shared pages divided among the processes sharing them: what the machine really holds)."""
    parents: dict[int, int] = {}
    rss_kb: dict[int, int] = {}
    on_hosts: list[int] = []
    marker = f"{HOST_DIR_ENV}={host_root}/".encode() if host_root is not None else None
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            rss_kb[int(proc.name)] = next(int(line.split()[1]) for line in
                                          (proc / "smaps_rollup").read_text().splitlines()
                                          if line.startswith(f"{field}:"))
            if marker is not None and any(v.startswith(marker) for v in (proc / "environ").read_bytes().split(b"\0")):
                on_hosts.append(int(proc.name))
        except (OSError, StopIteration, ValueError):
            continue
    roots = [*roots, *on_hosts]
    tree, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return round(sum(rss_kb.get(pid, 0) for pid in tree) / 1024, 1)


def ended_early(cluster: TpuCluster, job_ids: list[str]):
    """The first job already finished (every job should idle until the stop file), else None."""
    return next((info for info in map(cluster.poll, job_ids) if JobStatus.finished(info.status)), None)


def over_budget() -> None:
    emit({"bench": "scale", "metric": "error", "error": f"the benchmark exceeded its {TOTAL_BUDGET_SECONDS:.0f}s budget"})
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16, help="concurrent v5litepod-16 jobs")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state window, seconds")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the controller's poll_interval, seconds")
    parser.add_argument("--start-deadline", type=float, default=240.0, help="launch -> every host running, seconds")
    parser.add_argument("--gang", metavar="COUNTxTYPE",
                        help="one multislice gang instead of K jobs, e.g. 4xv5litepod-256 (256 hosts): see run_gang")
    args = parser.parse_args(argv)
    if args.gang:
        return run_gang(args)
    watchdog = threading.Timer(TOTAL_BUDGET_SECONDS, over_budget)
    watchdog.daemon = True
    watchdog.start()
    bench_began = time.monotonic()

    directory = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-scale-"))
    out = directory / "out"
    out.mkdir()
    workspace = directory / "workspace"
    workspace.mkdir()
    (workspace / "README").write_text("the scale benchmark's workspace\n")
    stop_file = directory / "stop"
    (directory / "emulator").mkdir()
    emulator = EmulatorProcess(timings=EmulatorTimings.zero(), root=directory / "emulator").start()
    cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator.endpoint,
                                          poll_interval=args.poll_interval, state_dir=str(directory / "state"),
                                          keep_warm=0))  # K jobs' API economy; the gang mode measures the pool
    hosts = args.jobs * HOSTS_PER_SLICE
    result: dict = {"bench": "scale", "metric": "summary", "jobs": args.jobs, "tpu_type": TPU_TYPE, "hosts": hosts,
                    "poll_interval_s": args.poll_interval, "window_s": args.window}
    job_ids: list[str] = []
    try:
        launched = time.monotonic()
        for i in range(args.jobs):
            job_ids.append(cluster.launch(JobRequest(
                name=f"scale-{i}",
                entrypoint=Entrypoint.from_callable(idle_until_stopped,
                                                    args=[str(out), str(stop_file), HOST_IDLE_LIMIT_SECONDS]),
                resources=ResourceConfig.with_tpu(TPU_TYPE),
                environment=EnvironmentConfig.create(workspace=str(workspace)),
            )))
        try:
            until(lambda: len(list(out.glob("*-*"))) >= hosts or ended_early(cluster, job_ids),
                  f"all {hosts} hosts of {args.jobs} jobs running", args.start_deadline, WAIT_POLL_SECONDS)
            if ended := ended_early(cluster, job_ids):
                raise TimeoutError(f"job {ended.job_id} ended before every host ran: {ended.status}: "
                                   f"{(ended.error_message or '')[:300]}")
        except TimeoutError as error:
            result.update({"error": str(error), "hosts_running_at_deadline": len(list(out.glob("*-*")))})
            raise
        result["launch_to_all_running_s"] = round(time.monotonic() - launched, 2)
        zones = sorted({s.zone for s in cluster.live_slices()})
        # Let the start-up's last calls (operations, agent connects) drain out of the window.
        threading.Event().wait(2 * args.poll_interval)

        calls_before, cpu_before = emulator.control.counters(), cpu_seconds_of_self()
        emulator_cpu_before, wall_before = cpu_seconds_of(emulator.pid), time.monotonic()
        threading.Event().wait(args.window)
        calls_after, cpu_after = emulator.control.counters(), cpu_seconds_of_self()
        emulator_cpu_after, wall = cpu_seconds_of(emulator.pid), time.monotonic() - wall_before
        rss = memory_mb_of_tree([os.getpid(), emulator.pid], directory / "emulator")
        running = sum(1 for j in job_ids if cluster.poll(j).status == JobStatus.RUNNING)

        by_method = {m: calls_after.get(m, 0) - calls_before.get(m, 0) for m in sorted(calls_after)}
        by_method = {m: n for m, n in by_method.items() if n}
        total = sum(by_method.values())
        intervals = wall / args.poll_interval
        per_zone_interval = total / max(len(zones), 1) / intervals
        result.update({
            "jobs_running_through_window": running,
            "zones": zones,
            "api_calls_in_window": total,
            "api_calls_by_method": by_method,
            "api_calls_per_job_minute": round(total / (args.jobs * wall / 60.0), 3),
            "api_calls_per_zone_per_poll_interval": round(per_zone_interval, 3),
            "target_per_zone_per_poll_interval": TARGET_CALLS_PER_ZONE_PER_INTERVAL,
            "target_met": per_zone_interval <= TARGET_CALLS_PER_ZONE_PER_INTERVAL,
            "controller_cpu_share": round((cpu_after - cpu_before) / wall, 4),
            "controller_threads": threading.active_count(),
            "emulator_cpu_share": round((emulator_cpu_after - emulator_cpu_before) / wall, 4),
            "rss_controller_and_emulated_hosts_mb": rss,
            "window_measured_s": round(wall, 2),
        })
    except TimeoutError:
        pass  # reported in the summary; the jobs are stopped and their slices deleted below
    finally:
        stop_file.write_text("")
        infos = cluster.wait(job_ids, timeout=120) if job_ids else []
        for job_id in job_ids:
            cluster.wait_released(job_id, timeout=120)
        leftovers = cluster.live_slices()
        cluster.shutdown(timeout=120)
        leaks = emulator.control.leaks()
        emulator.stop()
        watchdog.cancel()
    result.update({
        "jobs_succeeded": sum(1 for info in infos if info.status == JobStatus.SUCCEEDED),
        "live_slices_at_end": len(leftovers),
        "emulator_resources_left": sum(len(v) for v in leaks.values()),
        "bench_seconds": round(time.monotonic() - bench_began, 1),
    })
    emit(result)
    return 0 if "error" not in result and not leftovers and result["emulator_resources_left"] == 0 else 1


# -- one large gang ------------------------------------------------------------------------------

def stamp_and_idle(out_dir: str, stop_file: str, limit_seconds: float) -> None:
    """A trivial host function (no JAX): record ``ATTEMPT-TASK`` with the start time, idle until stopped."""
    idle_until_stopped(out_dir, stop_file, limit_seconds, stamp_by="FRAY_TPU_ATTEMPT_ID")


class AgentsUp(logging.Handler):
    """When the supervisor's progress lines said the last agent of each slice was up."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.created, record.getMessage()))

    def all_up_at(self, job_id: str, slices: int, after: float) -> float | None:
        """The moment the last slice of the job reported every agent up, after ``after``."""
        last: dict[str, float] = {}
        for at, line in self.lines:
            if at >= after and job_id in line and (m := re.search(r"slice-(\d+): booting, (\d+)/(\d+) agents up", line)) \
                    and m.group(2) == m.group(3):
                last[m.group(1)] = at
        return max(last.values()) if len(last) == slices else None

    def first(self, job_id: str, pattern: str, after: float) -> float | None:
        return next((at for at, line in self.lines if at >= after and job_id in line and re.search(pattern, line)), None)

    def matching(self, pattern: str) -> list[str]:
        return [line for _, line in self.lines if re.search(pattern, line)]


def stamps_of(out: Path, attempt_prefix: str) -> list[float]:
    return [float(p.read_text()) for p in out.glob(f"{attempt_prefix}*") if p.read_text()]


def run_gang(args) -> int:
    """One job of COUNT slices of TYPE (hosts run ``stamp_and_idle``: no JAX imported). Measures
    launch -> every host running, agents up -> every host running (the gang's start), the steady
    state (controller CPU share, threads, RSS, Cloud TPU calls per zone per poll interval), a
    preemption of one slice -> every host running again, and a second job of the shape on the
    warm pool's slices -> every host running. Emits one summary line."""
    count, _, tpu_type = args.gang.partition("x")
    count = int(count)
    from fray_tpu.topology import get_tpu_topology

    hosts = count * get_tpu_topology(tpu_type).vm_count
    directory = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-gang-"))
    out, workspace, stop_file = directory / "out", directory / "workspace", directory / "stop"
    for path in (out, workspace, directory / "emulator"):
        path.mkdir()
    (workspace / "README").write_text("the gang benchmark's workspace\n")
    watchdog = threading.Timer(TOTAL_BUDGET_SECONDS * 3, over_budget)
    watchdog.daemon = True
    watchdog.start()
    agents_up = AgentsUp()
    logging.getLogger("fray_tpu.supervisor").addHandler(agents_up)
    logging.getLogger("fray_tpu.supervisor").setLevel(logging.INFO)
    emulator = EmulatorProcess(timings=EmulatorTimings.zero(), root=directory / "emulator").start()
    cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator.endpoint,
                                          poll_interval=args.poll_interval, state_dir=str(directory / "state")))
    result: dict = {"bench": "scale", "metric": "gang", "gang": args.gang, "hosts": hosts,
                    "poll_interval_s": args.poll_interval, "window_s": args.window,
                    "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GB"}

    def launch(name: str) -> tuple[str, float]:
        began = time.time()
        return cluster.launch(JobRequest(
            name=name, entrypoint=Entrypoint.from_callable(stamp_and_idle, args=[str(out), str(stop_file), 900.0]),
            resources=ResourceConfig.with_tpu(tpu_type, slice_count=count),
            environment=EnvironmentConfig.create(workspace=str(workspace)), max_retries_preemption=2)), began

    def all_running(attempt_id: str, what: str) -> float:
        until(lambda: len(stamps_of(out, attempt_id + "-")) >= hosts, what, args.start_deadline, 0.2)
        return max(stamps_of(out, attempt_id + "-"))

    job_ids = []
    try:
        job, began = launch("gang")
        job_ids.append(job)
        running_at = all_running(f"{job}-a1", f"all {hosts} hosts running")
        result["launch_to_all_running_s"] = round(running_at - began, 2)
        up = agents_up.all_up_at(job, count, began)
        start_sent = agents_up.first(job, r"attempt 1: starting on", began)
        result["agents_up_to_all_running_s"] = round(running_at - up, 2) if up else None
        if up and start_sent:  # upload + prepare on every host, then start -> user code everywhere
            result["gang_start_breakdown_s"] = {"upload_and_prepare": round(start_sent - up, 2),
                                                "start_to_all_running": round(running_at - start_sent, 2)}

        threading.Event().wait(2 * args.poll_interval)
        calls_before, cpu_before = emulator.control.counters(), cpu_seconds_of_self()
        wall_before = time.monotonic()
        threading.Event().wait(args.window)
        calls_after, cpu_after = emulator.control.counters(), cpu_seconds_of_self()
        wall = time.monotonic() - wall_before
        zones = sorted({s.zone for s in cluster.live_slices()})
        by_method = {m: calls_after.get(m, 0) - calls_before.get(m, 0) for m in sorted(calls_after)}
        by_method = {m: n for m, n in by_method.items() if n}
        result.update({
            "steady_controller_cpu_share": round((cpu_after - cpu_before) / wall, 4),
            "steady_controller_threads": threading.active_count(),
            "steady_controller_rss_mb": round(int(next(line.split()[1] for line in
                                                       Path("/proc/self/status").read_text().splitlines()
                                                       if line.startswith("VmRSS:"))) / 1024, 1),
            "rss_all_hosts_mb": memory_mb_of_tree([emulator.pid], directory / "emulator"),
            "pss_all_hosts_mb": memory_mb_of_tree([emulator.pid], directory / "emulator", "Pss"),
            "api_calls_by_method": by_method,
            "api_calls_per_zone_per_poll_interval": round(sum(by_method.values()) / max(len(zones), 1)
                                                          / (wall / args.poll_interval), 3),
        })

        victim = cluster.live_slices()[0]
        preempted_at = time.time()
        emulator.control.preempt_node(victim.resource_name)
        running_again = all_running(f"{job}-a2", "every host running again after the preemption")
        result["preemption_to_all_running_s"] = round(running_again - preempted_at, 2)

        stop_file.write_text("")
        cluster.wait(job, timeout=300)
        cluster.wait_released(job, timeout=300)
        stop_file.unlink()
        creates_before = emulator.control.counters().get("CreateNode", 0)
        second, began = launch("gang-warm")
        job_ids.append(second)
        running_at = all_running(f"{second}-a1", f"all {hosts} hosts of the second job running")
        result["warm_launch_to_all_running_s"] = round(running_at - began, 2)
        result["warm_creates"] = emulator.control.counters().get("CreateNode", 0) - creates_before
        result["not_kept_warm"] = agents_up.matching("not kept warm")[:4]
    except TimeoutError as error:
        result["error"] = str(error)
        result["last_progress_lines"] = [line for _, line in agents_up.lines[-12:]]
    finally:
        stop_file.write_text("")
        for job_id in job_ids:
            cluster.wait(job_id, timeout=300)
            cluster.wait_released(job_id, timeout=300)
        cluster.shutdown(timeout=300)
        leaks = emulator.control.leaks()
        emulator.stop()
        watchdog.cancel()
    result["emulator_resources_left"] = sum(len(v) for v in leaks.values())
    emit(result)
    return 0 if "error" not in result and result["emulator_resources_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
