"""fray-tpu against Ray: the same 4-process gang, cold and warm, plus the control round trip.

Every process of the gang runs ``gang_member``: record ``time.time()`` in a file, then a tiny
computation. "Running" is the last of the 4 recorded start times; every number is measured from
the moment the driver asks (wall clock, the same machine, one process run).

- Ray (local, ``ray.init(num_cpus=4)``, a placement group of 4 one-CPU bundles, 4 tasks):
  ``cold`` = ``ray.init`` -> all 4 running (GCS, raylet and worker start included; the ``import
  ray`` before it is reported apart); ``warm`` = a second placement group + 4 tasks on the
  already-initialised Ray (idle workers are reused; each gang starts once the previous group's CPUs are back).
- fray-tpu (``TpuCluster`` on the Cloud TPU emulator with zero delays, a ``v5litepod-16`` = 4
  hosts, each host a set of local processes: startup-script, agent, attempt runner):
  ``cold`` = ``TpuCluster(...)`` + ``launch()`` -> all 4 running (slice creation, 4 agents'
  boot, workspace upload, attempt start); ``warm_job`` = a second job of the same shape on the
  same controller, which takes the first job's slice from the warm pool (no create call: the
  emulator's ``CreateNode`` count is reported; hand-over, prepare, start), launched once the warm
  slice is ready (untimed: each host's pre-started runner waits on its stdin, as Ray's warm gang
  waits for the last group's CPUs; ``warm_job_back_to_back`` is the same job launched the moment
  the previous one released its slice, while those runners still start); ``warm_attempt`` = a retry on the SAME slices
  (agents up): in a job with ``max_retries_failure=1`` task 0 raises at once in attempt 1, and
  the sample is its raise -> all 4 hosts running attempt 2 (failure report, judgement, upload,
  prepare, start). This is the closest analogue of Ray's warm gang.
- Floor: ``bench/launch.py``'s bare-process floor (4 ``python -m fray_tpu.worker.runner``
  processes started in parallel, unpickling the same function), sampled in this run; the
  ``warm_job_over_floor`` line is the warm job against it (issue 14: at most 2x).
- Round trip: ``AgentClient.describe()`` on an up agent (pinned TLS, secret check) against
  ``ray.get(f.remote())`` of a no-op task, medians of >= 200 calls each.

Ratios are fray-tpu / Ray (below 1: fray-tpu faster). Ray is an optional extra (``pip install
'.[bench]'``); without it the Ray lines say ``unavailable (why)`` and fray-tpu's numbers still
print. Nothing may leave the machine: when possible the whole run re-executes itself in a
loopback-only network namespace (``unshare -n``; Ray's C++ servers listen on every interface and
its API server probes cloud metadata endpoints even with usage stats off), and every Python
process of the run gets a socket guard that refuses and logs any non-local connection or name
lookup (the refusals are reported). Bounded: the run stops itself after ``TOTAL_BUDGET_SECONDS``
and ends by printing the number of slices still alive (0 expected).

Run: ``.venv/bin/python bench/vs_ray.py [--calls 300] [--no-netns]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO / "tests"))

from benchlib import emit, load_host_jobs, rounded, stamps, until  # noqa: E402

TPU_TYPE = "v5litepod-16"
HOSTS = 4
POLL_INTERVAL = 0.05
WAIT_POLL_SECONDS = 0.005
STEP_DEADLINE_SECONDS = 45.0
TOTAL_BUDGET_SECONDS = 170.0
WARM_JOB_SAMPLES = 5
READY_DEADLINE_SECONDS = 30.0
# /proc/PID/syscall of a process blocked in read(0, ...) on x86_64: a spare runner waiting for its job.
READ_STDIN_SYSCALL = ["0", "0x0"]
FLOOR_RUNS = 3
ISOLATED_ENV = "FRAY_TPU_BENCH_NETNS"
GUARD_LOG_ENV = "FRAY_TPU_BENCH_GUARD_LOG"
GUARD_OWN_ENV = "FRAY_TPU_BENCH_OWN_ADDRESSES"

# Written as sitecustomize.py into a directory put first on PYTHONPATH, so every Python process
# of the run (Ray's GCS-side Python, raylet's workers, the emulator, agents, runners) has it.
SOCKET_GUARD = '''
import ipaddress, os, socket

_LOG = os.environ.get("{log_env}")
_OWN = {{a for a in os.environ.get("{own_env}", "").split(",") if a}}
_NAMES = {{"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()}}


def _local(host):
    host = str(host).strip("[]")
    if host in _OWN or host in _NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _refuse(what):
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(f"pid {{os.getpid()}}: {{what}}\\n")
    raise ConnectionRefusedError(f"benchmark socket guard: refused {{what}} (loopback only)")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(f"connect to {{address[0]}}:{{address[1]}}")


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _local(host if isinstance(host, str) else host.decode()):
        _refuse(f"name lookup of {{host!r}}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''.format(log_env=GUARD_LOG_ENV, own_env=GUARD_OWN_ENV)


# -- helpers --------------------------------------------------------------------------------------

def all_running(directory: Path, prefix: str, what: str) -> float:
    """When the last of the gang's 4 processes started running (``prefix-INDEX`` stamps)."""
    return max(until(lambda: len(found := stamps(directory, prefix)) >= HOSTS and found, what,
                     STEP_DEADLINE_SECONDS, WAIT_POLL_SECONDS))


def spare_runners_waiting(root: Path) -> int:
    """Spare runners (``runner --spare``) of this run's emulated hosts (their directory under
    ``root``) blocked reading their stdin: loaded, waiting for a job."""
    from fray_tpu.contract import RUNNER_SPARE_ARG

    waiting = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if RUNNER_SPARE_ARG.encode() not in (entry / "cmdline").read_bytes().split(b"\0"):
                continue
            if not Path(os.readlink(entry / "cwd")).is_relative_to(root):
                continue
            waiting += (entry / "syscall").read_text().split()[:2] == READ_STDIN_SYSCALL
        except OSError:
            continue
    return waiting


def median_seconds(call, calls: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def local_addresses() -> list[str]:
    """This machine's own IPv4 addresses (traffic to them stays on the machine)."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return []
    found = {lines[i - 1].split()[-1] for i, line in enumerate(lines) if "/32 host LOCAL" in line and i > 0}
    return sorted(found)


def install_guard(directory: Path) -> Path:
    """Put the socket guard on PYTHONPATH for every child and install it in this process."""
    guard_dir = directory / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(SOCKET_GUARD)
    log = directory / "guard.log"
    os.environ[GUARD_LOG_ENV] = str(log)
    os.environ[GUARD_OWN_ENV] = ",".join(local_addresses())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard_dir), os.environ.get("PYTHONPATH")]))
    exec(compile(SOCKET_GUARD, str(guard_dir / "sitecustomize.py"), "exec"), {"__name__": "bench_socket_guard"})
    return log


def reexec_in_netns(argv: list[str]) -> int | None:
    """Run this benchmark again in a new network namespace with only loopback up; None when
    namespaces are not available here (the socket guard alone then keeps traffic local)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    # The namespace reaches no package index: the host bundle (built once per fray-tpu version,
    # from the index, and cached) is built before, as a controller does it once, not per start.
    from fray_tpu.hostbundle import build_host_bundle

    build_host_bundle()
    script = 'ip link set lo up && exec "$@"'
    command = ["unshare", "-n", "sh", "-c", script, "sh", sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.run(command, env={**os.environ, ISOLATED_ENV: "1"}, timeout=TOTAL_BUDGET_SECONDS + 60).returncode


# -- Ray ------------------------------------------------------------------------------------------

def measure_ray(directory: Path, calls: int) -> dict:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import_began = time.perf_counter()
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        import_seconds = time.perf_counter() - import_began
    except ImportError as error:
        return {"available": False, "reason": f"ray is not installed ({error}); pip install '.[bench]'"}

    out = directory / "ray"
    out.mkdir()
    jobs = load_host_jobs(directory)
    # Ray's workers cannot import the module from here: Ray ships it by value (fray-tpu by reference).
    ray.cloudpickle.register_pickle_by_value(jobs)
    remote_member = ray.remote(num_cpus=1)(jobs.gang_member)

    def gang(tag: str) -> None:
        group = placement_group([{"CPU": 1}] * HOSTS, strategy="PACK")
        ray.get(group.ready(), timeout=STEP_DEADLINE_SECONDS)
        strategy = PlacementGroupSchedulingStrategy(placement_group=group)
        refs = [remote_member.options(scheduling_strategy=strategy).remote(str(out), tag, i) for i in range(HOSTS)]
        ray.get(refs, timeout=STEP_DEADLINE_SECONDS)
        remove_placement_group(group)
        # Untimed: a group created while the last one's CPUs are still being returned waits for
        # Ray's ~1 s placement retry; fray-tpu's warm numbers likewise start after a full release.
        until(lambda: ray.available_resources().get("CPU", 0) >= HOSTS, "Ray to return the group's CPUs",
              STEP_DEADLINE_SECONDS, WAIT_POLL_SECONDS)

    began = time.time()
    ray.init(num_cpus=HOSTS, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    try:
        gang("cold")
        cold = all_running(out, "cold", "Ray's cold gang") - began
        warm_samples = []
        for run in range(5):
            began = time.time()
            gang(f"warm{run}")
            warm_samples.append(all_running(out, f"warm{run}", "Ray's warm gang") - began)

        @ray.remote(num_cpus=0)
        def noop() -> None:
            return None

        roundtrip = median_seconds(lambda: ray.get(noop.remote(), timeout=STEP_DEADLINE_SECONDS), calls)
        version = ray.__version__
    finally:
        ray.shutdown()
    return {"available": True, "version": version, "import_s": import_seconds, "cold_s": cold,
            "warm_s": statistics.median(warm_samples), "warm_samples": warm_samples, "roundtrip_s": roundtrip}


# -- fray-tpu -------------------------------------------------------------------------------------

def measure_fray(directory: Path, calls: int) -> dict:
    from fake_gcp.process import EmulatorProcess

    from fray_tpu.cluster import TpuCluster
    from fray_tpu.config import TpuClusterConfig
    from fray_tpu.emulator import EmulatorTimings
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig
    from launch import ProgressClock

    out = directory / "fray"
    out.mkdir()
    workspace = directory / "workspace"
    workspace.mkdir()
    (workspace / "README").write_text("the vs_ray benchmark's workspace\n")
    jobs = load_host_jobs(workspace)

    def request(name: str, fn, args: list, **kwargs) -> JobRequest:
        return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=args),
                          resources=ResourceConfig.with_tpu(TPU_TYPE),
                          environment=EnvironmentConfig.create(workspace=str(workspace)), **kwargs)

    def finish(cluster: TpuCluster, job_id: str) -> None:
        info = cluster.wait(job_id, timeout=STEP_DEADLINE_SECONDS)
        cluster.wait_released(job_id, timeout=STEP_DEADLINE_SECONDS)
        if info.status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"bench job {job_id} ended {info.status}: {info.error_message}")

    (directory / "emulator").mkdir()
    emulator_began = time.perf_counter()
    emulator = EmulatorProcess(timings=EmulatorTimings.zero(), root=directory / "emulator").start()
    emulator_seconds = time.perf_counter() - emulator_began
    config = TpuClusterConfig(emulate=True, emulator_endpoint=emulator.endpoint, poll_interval=POLL_INTERVAL,
                              state_dir=str(directory / "state"))
    cluster = None
    leftovers: list = []
    try:
        began = time.time()
        cluster = TpuCluster(config)
        job = cluster.launch(request("cold", jobs.gang_member, [str(out), "cold"]))
        cold = all_running(out, "cold", "fray-tpu's cold gang") - began
        finish(cluster, job)

        creates_before = emulator.control.counters().get("CreateNode", 0)
        clock = ProgressClock()

        def warm_job_seconds(tag: str, phases: dict[str, list[float]]) -> float:
            began = time.time()
            job = cluster.launch(request(tag, jobs.gang_member, [str(out), tag]))
            running = all_running(out, tag, "fray-tpu's second job")
            marks = {"taken": clock.first(job, r"slice-0: took warm slice"),
                     "start_sent": clock.first(job, r"attempt 1: starting on ")}
            previous_name, previous = "launch", began
            for name, at in [*marks.items(), ("running", running)]:
                if at is not None:
                    phases.setdefault(f"{previous_name}->{name}", []).append(at - previous)
                    previous_name, previous = name, at
            finish(cluster, job)
            return running - began

        warm_samples, warm_phases = [], {}
        for run in range(WARM_JOB_SAMPLES):
            until(lambda: spare_runners_waiting(directory / "emulator") >= HOSTS,
                  "the warm slice's pre-started runners to wait for a job", READY_DEADLINE_SECONDS, WAIT_POLL_SECONDS)
            warm_samples.append(warm_job_seconds(f"warm{run}", warm_phases))
        back_to_back, back_to_back_phases = [], {}
        for run in range(WARM_JOB_SAMPLES):
            back_to_back.append(warm_job_seconds(f"b2b{run}", back_to_back_phases))
        warm_job = statistics.median(warm_samples)
        warm_creates = emulator.control.counters().get("CreateNode", 0) - creates_before

        retry_out = out / "retry"
        retry_out.mkdir()
        job = cluster.launch(request("retry", jobs.fail_once_then_run, [str(retry_out)], max_retries_failure=1))
        finish(cluster, job)
        attempts = cluster.job_counters(job).attempts
        if attempts != 2:
            raise RuntimeError(f"warm-attempt job {job} ran {attempts} attempts, expected 2")
        raised = float((retry_out / "raise").read_text())
        second = stamps(retry_out, f"start-{job}-a2")
        if len(second) != HOSTS:
            raise RuntimeError(f"attempt 2 of {job} started on {len(second)} hosts, expected {HOSTS}")
        warm_attempt = max(second) - raised

        roundtrip = measure_agent_roundtrip(directory, calls)
        leftovers = cluster.live_slices()
    finally:
        if cluster is not None:
            cluster.shutdown(timeout=STEP_DEADLINE_SECONDS)
        leaks = emulator.control.leaks()
        emulator.stop()
    return {"emulator_start_s": emulator_seconds, "cold_s": cold, "warm_job_s": warm_job,
            "warm_job_samples": warm_samples, "warm_job_creates": warm_creates,
            "warm_job_phases": {k: statistics.median(v) for k, v in warm_phases.items()},
            "warm_job_back_to_back_s": statistics.median(back_to_back), "warm_job_back_to_back_samples": back_to_back,
            "warm_job_back_to_back_phases": {k: statistics.median(v) for k, v in back_to_back_phases.items()},
            "warm_attempt_s": warm_attempt, "roundtrip_s": roundtrip, "live_slices_before_shutdown": len(leftovers),
            "emulator_resources_left": sum(len(v) for v in leaks.values())}


def measure_agent_roundtrip(directory: Path, calls: int) -> float:
    """Describe on one up agent: the agent program of every host, on its own loopback IP."""
    sys.path.insert(0, str(BENCH_DIR))
    from channel import start_agent  # bench/channel.py: one agent process with pinned TLS

    workdir = directory / "agent"
    workdir.mkdir()
    agent, client, server = start_agent(workdir)
    try:
        return median_seconds(client.describe, calls)
    finally:
        client.close()
        agent.terminate()
        agent.wait(15)
        server.metadata.close()


# -- the run --------------------------------------------------------------------------------------

def over_budget() -> None:
    emit({"bench": "vs_ray", "metric": "error", "error": f"the benchmark exceeded its {TOTAL_BUDGET_SECONDS:.0f}s budget"})
    os._exit(3)


def ratio(fray: float, ray: dict, key: str) -> float | None:
    return rounded(fray / ray[key]) if ray.get("available") else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="round trips per system (at least 200)")
    parser.add_argument("--no-netns", action="store_true", help="do not re-run in a loopback-only network namespace")
    args = parser.parse_args(argv)
    isolation = "netns (loopback only) + socket guard" if os.environ.get(ISOLATED_ENV) else "socket guard"
    if not args.no_netns and not os.environ.get(ISOLATED_ENV):
        code = reexec_in_netns(argv)
        if code is not None:
            return code

    watchdog = threading.Timer(TOTAL_BUDGET_SECONDS, over_budget)
    watchdog.daemon = True
    watchdog.start()
    bench_began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-vs-ray-"))
    guard_log = install_guard(directory)
    calls = max(args.calls, 200)

    sys.path.insert(0, str(BENCH_DIR))
    import cloudpickle
    import launch  # bench/launch.py's bare-process floor

    cloudpickle.register_pickle_by_value(launch)  # its host function reaches the runners by value
    measure_floor = launch.measure_floor

    floor_dir = directory / "floor"
    floor_dir.mkdir()
    launch.jobs = load_host_jobs(floor_dir)  # the floor's host function, as launch.main() loads it
    floor = statistics.median(measure_floor(floor_dir, FLOOR_RUNS, preload=False))
    fray = measure_fray(directory, calls)
    try:
        ray = measure_ray(directory, calls)
    except Exception as error:  # a broken Ray install must not hide fray-tpu's numbers
        ray = {"available": False, "reason": f"{type(error).__name__}: {error}"}
    refused = guard_log.read_text().splitlines() if guard_log.exists() else []

    unit = {"gang": f"{HOSTS} processes", "fray_tpu_shape": f"{TPU_TYPE} ({HOSTS} hosts), emulator zero delays"}
    ray_label = f"ray {ray['version']}" if ray.get("available") else f"unavailable ({ray['reason']})"
    rows = [
        ("cold_start", "cold_s", "cold_s",
         "Ray: ray.init -> 4 tasks of a 4-bundle placement group running; fray-tpu: TpuCluster() + launch() -> "
         "4 hosts running (slice created, agents booted)"),
        ("warm_gang", "warm_job_s", "warm_s",
         "Ray: new placement group + 4 tasks on the running Ray; fray-tpu: a second job of the shape, on the "
         "first job's slice from the warm pool, its pre-started runners waiting"),
        ("warm_gang_back_to_back", "warm_job_back_to_back_s", "warm_s",
         "fray-tpu: the same, launched as soon as the previous job released the slice (its runners still "
         "starting) vs Ray's warm gang"),
        ("warm_attempt", "warm_attempt_s", "warm_s",
         "fray-tpu: retry on the same slices (task 0 raises -> 4 hosts running attempt 2) vs Ray's warm gang"),
        ("control_roundtrip", "roundtrip_s", "roundtrip_s",
         f"fray-tpu: AgentClient.describe() median of {calls}; Ray: ray.get(noop.remote()) median of {calls}"),
    ]
    for metric, fray_key, ray_key, what in rows:
        emit({"bench": "vs_ray", "metric": metric, "fray_tpu_s": rounded(fray[fray_key]),
              "ray_s": rounded(ray[ray_key]) if ray.get("available") else ray_label,
              "ratio_fray_over_ray": ratio(fray[fray_key], ray, ray_key), "what": what})
    emit({"bench": "vs_ray", "metric": "warm_job_over_floor", "fray_tpu_s": rounded(fray["warm_job_s"]),
          "floor_s": rounded(floor), "ratio": rounded(fray["warm_job_s"] / floor), "target": 2.0,
          "creates_for_warm_jobs": fray["warm_job_creates"],
          "back_to_back_s": rounded(fray["warm_job_back_to_back_s"]),
          "back_to_back_ratio": rounded(fray["warm_job_back_to_back_s"] / floor),
          "phases_median": {k: rounded(v) for k, v in fray["warm_job_phases"].items()},
          "back_to_back_phases_median": {k: rounded(v) for k, v in fray["warm_job_back_to_back_phases"].items()},
          "what": "a second job on a warm slice, launch -> 4 hosts running, against 4 bare runner processes"})
    summary = {
        "bench": "vs_ray", "metric": "summary", **unit, "ray": ray_label, "network_isolation": isolation,
        "fray_tpu": {k: ([rounded(x) for x in v] if isinstance(v, list) else rounded(v)) for k, v in fray.items()
                     if not isinstance(v, dict)},
        "ray_detail": {k: ([rounded(x) for x in v] if isinstance(v, list) else rounded(v) if isinstance(v, float) else v)
                       for k, v in ray.items()},
        "guard_refusals": refused[:10], "guard_refusal_count": len(refused),
        "live_slices_before_shutdown": fray["live_slices_before_shutdown"],  # the warm pool's slice
        "emulator_resources_left": fray["emulator_resources_left"],
        "bench_seconds": rounded(time.monotonic() - bench_began),
    }
    emit(summary)
    watchdog.cancel()
    shutil.rmtree(directory, ignore_errors=True)  # the hosts' environments: about 1.5 GB per run
    return 0 if fray["emulator_resources_left"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
