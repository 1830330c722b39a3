"""Soak: N TPU jobs through one TpuCluster on an emulator process, with random faults.

Jobs (mostly one-host ``v5litepod-4``/``v5litepod-8``, some four-host ``v5litepod-16``) run a few
at a time. Each job has a kind that decides its expected end: plain success, user failures
within the budget, failures over the budget, a bad-host signature on the first attempt (must not
consume the failure budget), a preemption of its node mid-run, or a terminate mid-run. Meanwhile
a fault thread stocks out zones for a while and injects 429/503 bursts on API methods.

Prints one JSON object: jobs by final status, jobs whose status differs from their kind's
expectation, retries by class (summed ``job_counters``), leaks (nodes and queued resources alive
at the end, after every ``wait_released``), hung jobs (not finished within the per-job deadline)
and wall time. Exits 1 if leaks or hung jobs are not 0.

Run: ``python bench/soak.py [--jobs 50] [--seed 0] [--concurrency 4] [--time-limit 480]``.
Bounded: no new job starts after ``--time-limit`` seconds; each running job then has at most its
per-job deadline left, and the final leak check has its own deadline.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fake_gcp.process import EmulatorProcess  # noqa: E402

from fray_tpu import topology  # noqa: E402
from fray_tpu.cluster import TpuCluster  # noqa: E402
from fray_tpu.config import TpuClusterConfig  # noqa: E402
from fray_tpu.emulator import EmulatorTimings  # noqa: E402
from fray_tpu.errors import DeadlineExceeded  # noqa: E402
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig  # noqa: E402
from fray_tpu.naming import LABEL_JOB, label_value  # noqa: E402

SOAK_TIMINGS = EmulatorTimings(create_delay=0.3, delete_delay=0.2, operation_lag=0.1, qr_wait_delay=0.2,
                               qr_provision_delay=0.3, stockout_delay=0.2, preempt_notice=0.2)
TPU_TYPES = (("v5litepod-4", 0.45), ("v5litepod-8", 0.40), ("v5litepod-16", 0.15))
KINDS = (("ok", 0.30), ("fail_within_budget", 0.15), ("fail_over_budget", 0.10), ("bad_host", 0.15),
         ("preempt", 0.15), ("terminate", 0.15))
EXPECTED_STATUS = {"ok": JobStatus.SUCCEEDED, "fail_within_budget": JobStatus.SUCCEEDED,
                   "fail_over_budget": JobStatus.FAILED, "bad_host": JobStatus.SUCCEEDED,
                   "preempt": JobStatus.SUCCEEDED, "terminate": JobStatus.STOPPED}
FAILURE_BUDGET = 2
PREEMPTION_BUDGET = 3
BLOCK_SECONDS = 120.0  # how long a blocking job waits to be preempted or terminated before giving up
RUNNING_DEADLINE = 180.0  # launch to every task running, for jobs the soak interrupts
POLL_SECONDS = 0.2
LEAK_SETTLE_SECONDS = 60.0
FAULTED_METHODS = ("CreateNode", "GetNode", "ListNodes", "DeleteNode", "GetOperation")
BAD_HOST_LINE = "TPU initialization failed: soak-injected bad host"

log = logging.getLogger("soak")


# -- what runs on every host (shipped by value: this module is __main__) -----------------------------


def soak_task(job_dir: str, kind: str, fail_attempts: int, run_seconds: float) -> None:
    """Count this task's attempt, then behave as ``kind`` says (task 0 carries failures)."""
    import os as host_os
    import threading as host_threading
    import time as host_time

    index = host_os.environ["FRAY_TASK_INDEX"]
    attempt = 1
    for attempt in range(1, 100):
        try:
            with open(host_os.path.join(job_dir, f"task{index}-attempt{attempt}"), "x"):
                break
        except FileExistsError:
            continue
    pause = host_threading.Event()
    if index == "0" and kind == "bad_host" and attempt == 1:
        print(BAD_HOST_LINE, file=sys.stderr, flush=True)
        raise SystemExit(1)
    if index == "0" and kind in ("fail_within_budget", "fail_over_budget") and attempt <= fail_attempts:
        raise RuntimeError(f"soak-injected user failure on attempt {attempt}")
    if kind in ("preempt", "terminate") and attempt == 1:
        print(f"task {index} blocking until interrupted", flush=True)
        deadline = host_time.monotonic() + BLOCK_SECONDS
        while host_time.monotonic() < deadline:
            pause.wait(0.2)
        raise SystemExit(f"task {index} was never interrupted within {BLOCK_SECONDS}s")
    pause.wait(run_seconds)
    print(f"task {index} done on attempt {attempt}", flush=True)


# -- the soak ------------------------------------------------------------------------------------------------


@dataclass
class JobOutcome:
    index: int
    kind: str
    tpu_type: str
    job_id: str = ""
    status: str = "not started"
    expected: str = ""
    hung: bool = False
    counters: dict = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0


def weighted(rng: random.Random, choices) -> str:
    values, weights = zip(*choices)
    return rng.choices(values, weights=weights)[0]


def job_nodes(control, job_id: str, state: str | None = None) -> list[dict]:
    return [n for n in control.leaks()["nodes"]
            if n["labels"].get(LABEL_JOB) == label_value(job_id) and (state is None or n["state"] == state)]


def wait_until(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        pause.wait(POLL_SECONDS)
    raise DeadlineExceeded(f"waited {timeout:.0f}s for {what}")


class Soak:
    def __init__(self, args: argparse.Namespace, emulator: EmulatorProcess, root: Path):
        self.args = args
        self.control = emulator.control
        self.root = root
        self.workspace = root / "workspace"
        self.workspace.mkdir()
        (self.workspace / "README").write_text("soak workspace\n")
        self.cluster = TpuCluster(TpuClusterConfig(
            emulate=True, emulator_endpoint=emulator.endpoint, poll_interval=POLL_SECONDS, lease_period=30.0,
            capacity_deadline=120.0, state_dir=str(root / "state"),
        ))
        self.emulator_pid = emulator.pid
        self.emulator_died_at: float | None = None
        self.faults = collections.Counter()
        self.stop_faults = threading.Event()

    # -- one job -----------------------------------------------------------------------------------------
    def run_job(self, outcome: JobOutcome, rng: random.Random) -> JobOutcome:
        began = time.monotonic()
        job_dir = self.root / f"job-{outcome.index}"
        job_dir.mkdir()
        fail_attempts = {"fail_within_budget": rng.randint(1, FAILURE_BUDGET),
                         "fail_over_budget": FAILURE_BUDGET + 1}.get(outcome.kind, 0)
        outcome.expected = str(EXPECTED_STATUS[outcome.kind])
        job_id = self.cluster.launch(JobRequest(
            name=f"soak-{outcome.index}",
            entrypoint=Entrypoint.from_callable(
                soak_task, args=[str(job_dir), outcome.kind, fail_attempts, round(rng.uniform(0.2, 2.0), 2)]),
            resources=ResourceConfig.with_tpu(outcome.tpu_type),
            environment=EnvironmentConfig.create(workspace=str(self.workspace)),
            max_retries_failure=FAILURE_BUDGET,
            max_retries_preemption=PREEMPTION_BUDGET,
        ))
        outcome.job_id = job_id
        try:
            if outcome.kind in ("preempt", "terminate"):
                self.interrupt(outcome, job_dir)
            info = wait_until(lambda: (i := self.cluster.poll(job_id)) and JobStatus.finished(i.status) and i,
                              f"job {job_id} to finish", self.args.job_deadline)
            outcome.status = str(info.status)
            if info.status != outcome.expected:
                outcome.error = (info.error_message or "")[-500:]
        except DeadlineExceeded as error:
            outcome.hung = True
            outcome.status = f"hung ({self.cluster.poll(job_id).status})"
            outcome.error = str(error)
            self.cluster.terminate(job_id)
        try:
            self.cluster.wait_released(job_id, timeout=self.args.job_deadline)
        except DeadlineExceeded as error:
            outcome.hung = True
            outcome.error += f"; {error}"
        outcome.counters = dict(vars(self.cluster.job_counters(job_id)))
        outcome.seconds = round(time.monotonic() - began, 1)
        log.info("job %d %s %s %s: %s in %.1fs %s", outcome.index, outcome.kind, outcome.tpu_type, job_id,
                 outcome.status, outcome.seconds, outcome.counters)
        return outcome

    def interrupt(self, outcome: JobOutcome, job_dir: Path) -> None:
        """Once every task of the first attempt is blocking, preempt its node or terminate the job."""
        hosts = topology.get_tpu_topology(outcome.tpu_type).vm_count

        def started_or_finished() -> str | None:
            if JobStatus.finished(self.cluster.poll(outcome.job_id).status):
                return "finished"
            return "started" if all((job_dir / f"task{i}-attempt1").exists() for i in range(hosts)) else None

        if wait_until(started_or_finished, f"every task of {outcome.job_id} to start", RUNNING_DEADLINE) == "finished":
            return  # ended before it could be interrupted (reported as unexpected)
        if outcome.kind == "terminate":
            self.cluster.terminate(outcome.job_id)
            self.faults["terminate"] += 1
            return
        [node] = wait_until(lambda: job_nodes(self.control, outcome.job_id, "READY"),
                            f"the READY node of {outcome.job_id}", RUNNING_DEADLINE)
        self.control.preempt_node(node["name"])
        self.faults["preempt_node"] += 1

    # -- faults on the whole cloud -----------------------------------------------------------------------
    def inject_faults(self, rng: random.Random) -> None:
        zones = topology.get_tpu_topology("v5litepod-4").zones
        while not self.stop_faults.wait(rng.uniform(2.0, 6.0)):
            if not self.emulator_alive():
                # Nothing the cloud does ends the cloud: whatever follows is not the product's doing.
                self.emulator_died_at = time.monotonic()
                log.error("the emulator process %d is gone; the rest of this soak is invalid", self.emulator_pid)
                return
            if rng.random() < 0.4:
                zone = rng.choice(zones)
                self.control.stockout(zone)
                self.faults[f"stockout {zone}"] += 1
                self.stop_faults.wait(rng.uniform(2.0, 8.0))
                self.control.clear_stockout(zone)
            else:
                method = rng.choice(FAULTED_METHODS)
                code = rng.choice((429, 503))
                self.control.fail_next(method, code, rng.randint(1, 3))
                self.faults[f"{code} burst"] += 1

    # -- everything ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        rng = random.Random(self.args.seed)
        outcomes = [JobOutcome(i, weighted(rng, KINDS), weighted(rng, TPU_TYPES)) for i in range(self.args.jobs)]
        job_seeds = [rng.randrange(2 ** 32) for _ in outcomes]
        began = time.monotonic()
        fault_thread = threading.Thread(target=self.inject_faults, args=(random.Random(rng.randrange(2 ** 32)),),
                                        daemon=True, name="soak-faults")
        fault_thread.start()
        with futures.ThreadPoolExecutor(self.args.concurrency, thread_name_prefix="soak-job") as pool:
            running: set[futures.Future] = set()
            for outcome, seed in zip(outcomes, job_seeds):
                if time.monotonic() - began > self.args.time_limit or self.emulator_died_at is not None:
                    break
                while len(running) >= self.args.concurrency:
                    _, running = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                running.add(pool.submit(self.run_job_safely, outcome, random.Random(seed)))
            futures.wait(running)
        self.stop_faults.set()
        fault_thread.join(30)
        self.cluster.shutdown(timeout=self.args.job_deadline)
        if not self.emulator_alive():
            result = self.report(outcomes, {"nodes": [], "queued_resources": []}, time.monotonic() - began)
            result["leaks"] = "unknown: the emulator process died during the soak"
            result["emulator_died_after_seconds"] = round((self.emulator_died_at or time.monotonic()) - began, 1)
            return result
        leaks = self.settled_leaks()
        return self.report(outcomes, leaks, time.monotonic() - began)

    def run_job_safely(self, outcome: JobOutcome, rng: random.Random) -> JobOutcome:
        try:
            return self.run_job(outcome, rng)
        except Exception as error:  # noqa: BLE001 - one broken job must not end the soak; it is reported
            log.exception("job %d (%s) raised", outcome.index, outcome.kind)
            outcome.status = "soak error"
            outcome.error = f"{type(error).__name__}: {error}"
            return outcome

    def emulator_alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.emulator_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")

    def settled_leaks(self) -> dict:
        """Nodes and queued resources alive once those already DELETING have had time to go."""
        def settled():
            leaks = self.control.leaks()
            return None if any(r["state"] == "DELETING" for kind in leaks.values() for r in kind) else leaks

        try:
            return wait_until(settled, "resources being deleted to be gone", LEAK_SETTLE_SECONDS)
        except DeadlineExceeded:
            return self.control.leaks()

    def report(self, outcomes: list[JobOutcome], leaks: dict, wall_seconds: float) -> dict:
        started = [o for o in outcomes if o.job_id]
        retries = collections.Counter()
        for outcome in started:
            retries.update({k: v for k, v in outcome.counters.items() if k != "attempts"})
        return {
            "jobs": len(outcomes),
            "jobs_started": len(started),
            "by_status": dict(collections.Counter(o.status for o in outcomes)),
            "by_kind": dict(collections.Counter(o.kind for o in started)),
            "by_tpu_type": dict(collections.Counter(o.tpu_type for o in started)),
            "unexpected": [{"job": o.job_id or o.index, "kind": o.kind, "tpu_type": o.tpu_type, "status": o.status,
                            "expected": o.expected, "counters": o.counters, "error": o.error}
                           for o in started if o.status != o.expected],
            "retries": {key: retries.get(key, 0) for key in ("failures", "preemptions", "bad_hosts", "capacity_waits")},
            "attempts": sum(o.counters.get("attempts", 0) for o in started),
            "faults_injected": dict(self.faults),
            "leaks": len(leaks["nodes"]) + len(leaks["queued_resources"]),
            "leaked": leaks if leaks["nodes"] or leaks["queued_resources"] else {},
            "hung": sum(o.hung for o in outcomes),
            "job_seconds_median": sorted(o.seconds for o in started)[len(started) // 2] if started else 0.0,
            "wall_seconds": round(wall_seconds, 1),
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds after which no new job starts")
    parser.add_argument("--job-deadline", type=float, default=300.0,
                        help="seconds a job may take to finish (else it is hung) and then to release its slices")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="fray-tpu-soak-"))
    (root / "emulator").mkdir()
    emulator = EmulatorProcess(timings=SOAK_TIMINGS, root=root / "emulator")
    emulator.start()
    try:
        result = Soak(args, emulator, root).run()
    finally:
        emulator.stop()
    print(json.dumps(result, sort_keys=True))
    return 1 if result["leaks"] or result["hung"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
