"""A driver process that dies or exits while its TPU jobs run (issue 5, item 2).

Each test runs the driver as a real subprocess on its own state directory, launching jobs on
the session's Cloud TPU emulator. The job callable ticks (one numbered line and a progress file
every ``TICK_SECONDS``) until a "go" file appears. Outcomes covered:

- SIGKILL, then a new controller on the state directory: it lists the jobs as running,
  ``monitor`` streams from the reattach point on, ``wait`` sees success, ``terminate`` stops,
  finished jobs keep their final ``JobInfo`` across another restart, and a second controller
  started while the driver lives runs beside it without taking its jobs (the driver's journal
  stays locked: opening it is refused with ``JournalLockedError`` naming the holder's pid);
- SIGKILL with no restart: the agents' lease lapses and the slice deletes itself;
- SIGKILL while the slice is being created: the controller that takes over deletes the
  half-created node or queued resource and runs the job on a new one;
- the exit policy: normal exit and SIGTERM terminate the jobs and delete their slices;
  ``detach_on_exit=True`` leaves the job running for a later controller to reattach.

The ``fake_gcp`` fixture fails any test that leaves a node or queued resource alive.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
from fake_gcp import wait_for

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import JobStatus
from fray_tpu.state.journal import Journal, JournalLockedError
from fray_tpu.state.journals import journal_dirs
from fray_tpu.naming import LABEL_JOB, label_value

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tick_until_go runs on the hosts

DRIVER_START_TIMEOUT = 120.0  # interpreter start, imports, provisioning and the gang start
JOB_TIMEOUT = 120.0
HOST_DEADLINE = 150.0  # how long a job ticks without its go file before giving up on its own
REATTACH_LEASE_SECONDS = 30.0  # long enough that nothing lapses between the kill and the restart
SHORT_LEASE_SECONDS = 3.0
# Lease lapse + a tick of the lease watcher + SIGTERM to the attempt + the delete call, with
# plenty of slack for a loaded 2-core machine.
SELF_DELETE_DEADLINE = 60.0
TICKS_BEFORE_KILL = 5
# Exit with a running job: cancel (SIGTERM, 5 s grace at most) + delete, on a loaded machine.
PROMPT_EXIT_SECONDS = 20.0

DRIVER_SOURCE = r'''
"""A driver program: launches ticking TPU jobs, reports them running, then exits or blocks."""
import json
import logging
import os
import sys
import threading
import time

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig



def tick_until(go_file, progress_file, tick_seconds, deadline_seconds):
    """Print numbered ticks (and the count to progress_file) until go_file exists."""
    pause = threading.Event()
    deadline = time.monotonic() + deadline_seconds
    tick = 0
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise SystemExit(f"{go_file} never appeared")
        print(f"tick {tick}", flush=True)
        partial = f"{progress_file}.{os.getpid()}.partial"
        with open(partial, "w") as f:
            f.write(str(tick))
        os.replace(partial, progress_file)
        tick += 1
        pause.wait(tick_seconds)
    print("done", flush=True)


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = json.loads(sys.argv[1])
    cluster = TpuCluster(
        TpuClusterConfig(emulate=True, emulator_endpoint=args["endpoint"], poll_interval=0.2,
                         lease_period=args["lease_period"], state_dir=args["state_dir"], queued=args["queued"],
                         connect=args["connect"], keep_warm=0),
        detach_on_exit=args["detach"],
    )
    job_ids = []
    for name in args["jobs"]:
        entrypoint = Entrypoint.from_callable(tick_until, args=[
            os.path.join(args["out_dir"], name + ".go"), os.path.join(args["out_dir"], name + ".ticks"),
            args["tick_seconds"], args["host_deadline"]])
        job_ids.append(cluster.launch(JobRequest(
            name=name, entrypoint=entrypoint, resources=ResourceConfig.with_tpu("v5litepod-4"),
            environment=EnvironmentConfig.create(workspace=args["workspace"]))))
    pause = threading.Event()
    if args["then"] == "launched":
        print("LAUNCHED " + json.dumps(job_ids), flush=True)
        pause.wait(args["start_timeout"])  # the test kills us while the slice is being created
        return
    deadline = time.monotonic() + args["start_timeout"]
    while not all(cluster.poll(j).status == JobStatus.RUNNING for j in job_ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs not running after {args['start_timeout']}s: "
                             f"{[cluster.poll(j) for j in job_ids]}")
        pause.wait(0.1)
    print("RUNNING " + json.dumps(job_ids), flush=True)
    if args["then"] == "block":
        pause.wait(args["start_timeout"])  # the test kills or signals us long before this


main()
'''

TICK_SECONDS = 0.2


class Driver:
    """The driver subprocess, its stdout lines on a queue, its stderr in a file."""

    def __init__(self, tmp_path: Path, endpoint: str, *, jobs: list[str], then: str, lease_period: float,
                 detach: bool = False, queued: bool = False, connect: str = "internal"):
        self.state_dir = tmp_path / "state"
        self.out_dir = tmp_path / "out"
        workspace = tmp_path / "workspace"
        for path in (self.state_dir, self.out_dir, workspace):
            path.mkdir(exist_ok=True)
        (workspace / "README").write_text("the driver's small workspace\n")
        script = tmp_path / "driver.py"
        script.write_text(DRIVER_SOURCE)
        self.stderr_path = tmp_path / "driver.stderr"
        args = dict(endpoint=endpoint, lease_period=lease_period, state_dir=str(self.state_dir), detach=detach, queued=queued,
                    connect=connect,
                    jobs=jobs, out_dir=str(self.out_dir), workspace=str(workspace), tick_seconds=TICK_SECONDS,
                    host_deadline=HOST_DEADLINE, start_timeout=DRIVER_START_TIMEOUT, then=then)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=tmp_path,
                                            stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.reported_running_at = 0.0
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="driver-stdout").start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def running_jobs(self) -> list[str]:
        """The job ids, once the driver reports every job running."""
        job_ids = self._reported("RUNNING ", "its jobs running")
        self.reported_running_at = time.monotonic()
        return job_ids

    def launched_jobs(self) -> list[str]:
        """The job ids, once the driver reports them launched (``then="launched"``)."""
        return self._reported("LAUNCHED ", "its jobs launched")

    def _reported(self, prefix: str, what: str) -> list[str]:
        deadline = time.monotonic() + DRIVER_START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return json.loads(line.removeprefix(prefix))
        raise AssertionError(f"the driver never reported {what} (exit code {self.process.poll()}); "
                             f"stderr:\n{self.stderr()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the driver did not exit within {timeout}s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-5000:]

    def ticks(self, job: str) -> int:
        path = self.out_dir / f"{job}.ticks"
        return int(path.read_text()) if path.exists() else -1

    def release(self, job: str) -> None:
        (self.out_dir / f"{job}.go").write_text("")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def drivers():
    """Every driver a test started is gone at its end, whatever happened."""
    started: list[Driver] = []
    yield started
    for driver in started:
        driver.kill()


def start_driver(drivers: list[Driver], *args, **kwargs) -> Driver:
    driver = Driver(*args, **kwargs)
    drivers.append(driver)
    return driver


def controller(endpoint: str, state_dir: Path, lease_period: float = REATTACH_LEASE_SECONDS,
               connect: str = "internal") -> TpuCluster:
    return TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=endpoint, poll_interval=0.2,
                                       lease_period=lease_period, state_dir=str(state_dir), connect=connect,
                                       keep_warm=0))  # reattaching is checked here; the warm pool elsewhere


def job_nodes(control, job_id: str) -> list[dict]:
    return [n for n in control.leaks()["nodes"] if n["labels"].get(LABEL_JOB) == label_value(job_id)]


def assert_succeeds_and_leaves_nothing(cluster: TpuCluster, fake_gcp, job_id: str) -> None:
    info = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
    assert job_nodes(fake_gcp.control, job_id) == []


def monitored_lines(caplog) -> list[str]:
    """The job output lines ``monitor`` logged (only one job is monitored per test)."""
    return [r.getMessage() for r in caplog.records if r.name == "fray_tpu.job" and r.getMessage().startswith("[slice-")]


# -- SIGKILL, then a restarted controller ----------------------------------------------------

def test_sigkilled_driver_is_reattached_by_a_new_controller(fake_gcp, tmp_path, drivers, caplog):
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["finisher", "stopper"], then="block",
                          lease_period=REATTACH_LEASE_SECONDS)
    finisher, stopper = driver.running_jobs()

    # While the driver lives, a second controller on its state directory runs beside it and
    # leaves the driver's jobs alone; the driver's journal is locked against everyone else.
    [driver_journal] = journal_dirs(driver.state_dir)
    rival = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        assert rival.list_jobs() == []
    finally:
        rival.shutdown()
    with pytest.raises(JournalLockedError) as refused:
        Journal(driver_journal, controller_id="intruder")
    assert f"pid {driver.process.pid}" in str(refused.value)
    assert str(driver_journal) in str(refused.value)

    wait_for(lambda: driver.ticks("finisher") >= TICKS_BEFORE_KILL, f"{TICKS_BEFORE_KILL} ticks of the job", JOB_TIMEOUT)
    driver.process.send_signal(signal.SIGKILL)
    driver.wait_exit(30)
    ticks_at_kill = driver.ticks("finisher")

    restarted = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        listed = {info.job_id: info.status for info in restarted.list_jobs()}
        assert listed == {finisher: JobStatus.RUNNING, stopper: JobStatus.RUNNING}

        outcome: dict = {}
        with caplog.at_level(logging.INFO, logger="fray_tpu.job"):
            monitor = threading.Thread(target=lambda: outcome.update(info=restarted.monitor(finisher)), daemon=True)
            monitor.start()
            wait_for(lambda: len([line for line in monitored_lines(caplog) if " tick " in line]) >= 3,
                     "3 ticks streamed by the reattached controller", JOB_TIMEOUT)
            driver.release("finisher")
            monitor.join(JOB_TIMEOUT)
        assert not monitor.is_alive(), "monitor() did not return after the job finished"
        info = outcome["info"]
        assert info.status == JobStatus.SUCCEEDED, info.error_message
        assert restarted.wait(finisher, timeout=JOB_TIMEOUT).status == JobStatus.SUCCEEDED

        lines = monitored_lines(caplog)
        assert "[slice-0/worker-0] done" in lines
        ticks = [int(m.group(1)) for line in lines if (m := re.search(r"\] tick (\d+)$", line))]
        # From the reattach point on: nothing from the job's start is replayed, every tick is new.
        assert ticks and min(ticks) >= ticks_at_kill - 1, (ticks_at_kill, ticks[:5])
        assert ticks == sorted(set(ticks)), "ticks repeated or out of order"

        restarted.terminate(stopper)
        assert restarted.poll(stopper).status == JobStatus.STOPPED
        for job_id in (finisher, stopper):
            restarted.wait_released(job_id, timeout=JOB_TIMEOUT)
            assert job_nodes(fake_gcp.control, job_id) == []
        final = {job_id: restarted.poll(job_id) for job_id in (finisher, stopper)}
        assert final[stopper].status == JobStatus.STOPPED
        assert all(t.status == JobStatus.STOPPED for t in final[stopper].tasks)
        assert restarted.job_counters(finisher).attempts == 1
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)

    # Finished jobs keep their final JobInfo across another restart.
    third = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        assert {info.job_id: info for info in third.list_jobs()} == final
    finally:
        third.shutdown(timeout=JOB_TIMEOUT)


def test_reattach_with_connect_external_dials_the_external_ips_again(fake_gcp, tmp_path, drivers):
    """connect=external across a restart: the journal keeps only the internal addresses, so the
    restarted controller asks the API for the external ones and dials the agents there again
    (the NAT of the VM's external address carries new connections); the job then finishes."""
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["outside"], then="block",
                          lease_period=REATTACH_LEASE_SECONDS, connect="external")
    [job_id] = driver.running_jobs()
    [node] = job_nodes(fake_gcp.control, job_id)
    node_id = node["name"].rsplit("/", 1)[-1]
    [[(external, before)]] = [list(c.items()) for c in fake_gcp.control.host_connections(node_id)]
    assert before >= 1
    driver.process.send_signal(signal.SIGKILL)
    driver.wait_exit(30)

    restarted = controller(fake_gcp.endpoint, driver.state_dir, connect="external")
    try:
        assert {info.job_id: info.status for info in restarted.list_jobs()} == {job_id: JobStatus.RUNNING}
        wait_for(lambda: fake_gcp.control.host_connections(node_id)[0][external] > before,
                 f"the restarted controller to dial {external}", JOB_TIMEOUT)
        driver.release("outside")
        assert_succeeds_and_leaves_nothing(restarted, fake_gcp, job_id)
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)


# -- SIGKILL and nobody comes back --------------------------------------------------------------

def test_sigkilled_driver_without_restart_slices_delete_themselves(fake_gcp, tmp_path, drivers):
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["orphan"], then="block",
                          lease_period=SHORT_LEASE_SECONDS)
    (job_id,) = driver.running_jobs()
    (node,) = job_nodes(fake_gcp.control, job_id)
    driver.process.send_signal(signal.SIGKILL)
    driver.wait_exit(30)
    killed_at = time.monotonic()

    def gone() -> bool:
        return not job_nodes(fake_gcp.control, job_id)

    try:
        wait_for(gone, f"node {node['name']} to delete itself after the lease lapsed", SELF_DELETE_DEADLINE)
    except Exception as error:
        raise AssertionError(f"{error}\nhost log of worker 0:\n"
                             f"{fake_gcp.control.agent_log(node['name'], 0)[-3000:]}") from None
    assert time.monotonic() - killed_at < SELF_DELETE_DEADLINE
    assert driver.ticks("orphan") >= 0  # the job did run before its driver died


# -- SIGKILL while a slice is being created -----------------------------------------------------

def job_resources(control, job_id: str, kind: str) -> list[dict]:
    """``kind``: "nodes" or "queued_resources"."""
    return [r for r in control.leaks()[kind] if r["labels"].get(LABEL_JOB) == label_value(job_id)]


@pytest.mark.parametrize("queued", [False, True], ids=["node", "queued-resource"])
def test_driver_sigkilled_during_creation_leaves_nothing_behind(fake_gcp, tmp_path, drivers, queued):
    """The driver dies while its slice is being created (a node held CREATING, or a queued
    resource held WAITING_FOR_RESOURCES: no VM, so no lease that could lapse). The controller
    that takes over deletes that half-created resource, runs the job on a new one, and nothing
    is left at the end."""
    control = fake_gcp.control
    kind = "queued_resources" if queued else "nodes"
    control.hold_creating("fray-halfmade-")
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["halfmade"], then="launched",
                          lease_period=REATTACH_LEASE_SECONDS, queued=queued)
    (job_id,) = driver.launched_jobs()
    (half,) = wait_for(lambda: job_resources(control, job_id, kind), "the slice to be in creation", JOB_TIMEOUT)
    driver.process.send_signal(signal.SIGKILL)
    driver.wait_exit(30)
    control.hold_creating(half["name"])  # the half-created resource would stay in creation for good ...
    control.release("fray-halfmade-")  # ... while a new one may be made

    restarted = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        assert restarted.poll(job_id).status in (JobStatus.PENDING, JobStatus.RUNNING)
        wait_for(lambda: half["name"] not in [r["name"] for r in control.leaks()[kind]],
                 f"the half-created {half['name']} to be deleted by the controller that took over", JOB_TIMEOUT)
        wait_for(lambda: driver.ticks("halfmade") >= 1, "the job to run on a new slice", JOB_TIMEOUT)
        driver.release("halfmade")
        info = restarted.wait(job_id, timeout=JOB_TIMEOUT)
        assert info.status == JobStatus.SUCCEEDED, info.error_message
        restarted.wait_released(job_id, timeout=JOB_TIMEOUT)
        assert job_resources(control, job_id, "nodes") == job_resources(control, job_id, "queued_resources") == []
        assert restarted.job_counters(job_id).preemptions == 0
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)


def test_a_job_whose_controller_died_before_its_secret_was_written_fails_and_leaves_nothing(
        fake_gcp, tmp_path, drivers):
    """The job's secret is written beside its start (waited for before its first attempt): a
    driver killed in between leaves a job without one, whose slice answers no secret anyone
    holds. The controller that takes over starts (it does not trip over the job), fails the job
    saying no attempt ran, and deletes its half-created slice."""
    control = fake_gcp.control
    control.hold_creating("fray-unsecret-")
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["unsecret"], then="launched",
                          lease_period=REATTACH_LEASE_SECONDS)
    (job_id,) = driver.launched_jobs()
    (half,) = wait_for(lambda: job_resources(control, job_id, "nodes"), "the slice to be in creation", JOB_TIMEOUT)
    driver.process.send_signal(signal.SIGKILL)
    driver.wait_exit(30)
    secrets = list(driver.state_dir.rglob(f"secrets/{job_id}"))
    assert secrets, "the driver wrote no secret to remove"
    for directory in secrets:  # as if the kill had come before the write
        shutil.rmtree(directory)
    control.hold_creating(half["name"])  # no VM boots for it
    control.release("fray-unsecret-")

    restarted = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        info = restarted.poll(job_id)
        assert info.status == JobStatus.FAILED and "no attempt ran" in info.error_message
        wait_for(lambda: half["name"] not in [r["name"] for r in control.leaks()["nodes"]],
                 f"{half['name']} to be deleted by the controller that took over", JOB_TIMEOUT)
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)


# -- certificates expire while the job runs -------------------------------------------------------

TLS_LEAF_SECONDS = 2.0  # agents serve certificates this short-lived; renewed with a third left


def tick_until_go(out_dir: str) -> None:
    """Print numbered ticks until ``go`` appears in ``out_dir`` (bounded by HOST_DEADLINE)."""
    import os

    pause = threading.Event()
    deadline = time.monotonic() + HOST_DEADLINE
    tick = 0
    while not os.path.exists(os.path.join(out_dir, "go")):
        if time.monotonic() > deadline:
            raise SystemExit("go never appeared")
        print(f"tick {tick}", flush=True)
        tick += 1
        pause.wait(TICK_SECONDS)


def ticks_in(lines) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(r"\] tick (\d+)$", line))]


def test_connections_after_the_first_certificates_expired_succeed(fake_gcp, tmp_path, workspace):
    """The agent serves certificates valid 2 s. The controller's open stream keeps delivering
    output long past their expiry; then a controller that reattaches (new connections to the
    agent, pinned to the job's authority as before) follows the job to success: the agent
    renewed its certificate for new connections, and nothing had to be re-pinned."""
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig

    state_dir, out_dir = tmp_path / "state", tmp_path / "out"
    out_dir.mkdir()
    config = TpuClusterConfig(emulate=True, emulator_endpoint=fake_gcp.endpoint, poll_interval=0.2,
                              lease_period=REATTACH_LEASE_SECONDS, state_dir=str(state_dir),
                              tls_leaf_validity=TLS_LEAF_SECONDS)
    first = TpuCluster(config, detach_on_exit=True)
    try:
        job_id = first.launch(JobRequest(
            name="rotating", entrypoint=Entrypoint.from_callable(tick_until_go, args=[str(out_dir)]),
            resources=ResourceConfig.with_tpu("v5litepod-4"), environment=EnvironmentConfig.create(workspace=workspace)))
        wait_for(lambda: ticks_in(first.job_output(job_id)), "the first tick", JOB_TIMEOUT)
        expired_at = time.time() + 3 * TLS_LEAF_SECONDS
        wait_for(lambda: time.time() > expired_at and len(ticks_in(first.job_output(job_id))) > 3 * TLS_LEAF_SECONDS / TICK_SECONDS,
                 "output streamed past three certificate validities", JOB_TIMEOUT)
        assert first.poll(job_id).status == JobStatus.RUNNING
    finally:
        first.shutdown(timeout=JOB_TIMEOUT)  # detaches: the job runs on
    # Detached means let go: the first controller's supervisor no longer acts on (or journals) the job.
    assert [t.name for t in threading.enumerate() if t.name == f"supervisor-{job_id}"] == []
    restarted = controller(fake_gcp.endpoint, state_dir)
    try:
        assert restarted.poll(job_id).status == JobStatus.RUNNING
        seen = len(ticks_in(restarted.job_output(job_id)))
        wait_for(lambda: len(ticks_in(restarted.job_output(job_id))) > seen + 3, "ticks through the reattached controller",
                 JOB_TIMEOUT)
        (out_dir / "go").write_text("")
        info = restarted.wait(job_id, timeout=JOB_TIMEOUT)
        assert info.status == JobStatus.SUCCEEDED, info.error_message
        assert restarted.job_counters(job_id).attempts == 1
        restarted.wait_released(job_id, timeout=JOB_TIMEOUT)
        assert job_nodes(fake_gcp.control, job_id) == []
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)


# -- the exit policy -------------------------------------------------------------------------

def assert_exit_was_prompt(driver: Driver) -> None:
    """Terminating is prompt (the user's processes are cancelled, then the slice is deleted): the
    exit must not sit out the supervisor's wait for hosts that were never told to stop."""
    seconds = time.monotonic() - driver.reported_running_at
    assert seconds < PROMPT_EXIT_SECONDS, (
        f"the driver took {seconds:.0f}s to exit after its jobs ran; stderr:\n{driver.stderr()}")


def assert_stopped_and_released(fake_gcp, driver: Driver, job_id: str) -> None:
    """Right after the driver exited: nothing of the job is alive, and the journal says stopped."""
    assert job_nodes(fake_gcp.control, job_id) == []
    reader = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        info = reader.poll(job_id)
    finally:
        reader.shutdown(timeout=JOB_TIMEOUT)
    assert info.status == JobStatus.STOPPED, info


def test_driver_exiting_normally_terminates_its_jobs_and_deletes_slices(fake_gcp, tmp_path, drivers):
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["ends"], then="exit",
                          lease_period=REATTACH_LEASE_SECONDS)
    (job_id,) = driver.running_jobs()
    assert driver.wait_exit(JOB_TIMEOUT) == 0, driver.stderr()
    assert_exit_was_prompt(driver)
    assert_stopped_and_released(fake_gcp, driver, job_id)


def test_sigterm_to_the_driver_terminates_its_jobs_and_deletes_slices(fake_gcp, tmp_path, drivers):
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["termed"], then="block",
                          lease_period=REATTACH_LEASE_SECONDS)
    (job_id,) = driver.running_jobs()
    driver.process.send_signal(signal.SIGTERM)
    assert driver.wait_exit(JOB_TIMEOUT) == 128 + signal.SIGTERM, driver.stderr()
    assert_exit_was_prompt(driver)
    assert_stopped_and_released(fake_gcp, driver, job_id)


def test_detached_driver_leaves_the_job_running_for_a_new_controller(fake_gcp, tmp_path, drivers):
    driver = start_driver(drivers, tmp_path, fake_gcp.endpoint, jobs=["detached"], then="exit",
                          lease_period=REATTACH_LEASE_SECONDS, detach=True)
    (job_id,) = driver.running_jobs()
    assert driver.wait_exit(JOB_TIMEOUT) == 0, driver.stderr()
    (node,) = job_nodes(fake_gcp.control, job_id)
    assert node["state"] == "READY"
    ticks_after_exit = driver.ticks("detached")
    wait_for(lambda: driver.ticks("detached") >= ticks_after_exit + 3, "the job to keep ticking without its driver",
             JOB_TIMEOUT)

    restarted = controller(fake_gcp.endpoint, driver.state_dir)
    try:
        assert restarted.poll(job_id).status == JobStatus.RUNNING
        driver.release("detached")
        assert_succeeds_and_leaves_nothing(restarted, fake_gcp, job_id)
    finally:
        restarted.shutdown(timeout=JOB_TIMEOUT)
