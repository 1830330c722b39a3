"""``fray-tpu`` CLI end to end: every subcommand runs as a real subprocess (``python -m
fray_tpu.ops.cli``) against the emulator process of the session, over a journal written by real
TpuCluster jobs of this module (each with its own state directory under tmp_path).

Listings are checked through ``--json``. The job callables are module-level functions shipped by
value; waits inside them are bounded.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
from fake_gcp import create_node, location, node_spec, wait_for

from fray_tpu import naming, topology
from fray_tpu.ops.cli import EXIT_API, EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN_JOB, EXIT_USAGE
from fray_tpu.cluster import TpuCluster
from fray_tpu.config import resolve_zones
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLI_TIMEOUT = 120.0
JOB_TIMEOUT = 120.0
HOST_DEADLINE = 90.0
TPU_TYPE = "v5litepod-16"


# -- callables that run on the emulated hosts --------------------------------------------------

def greet() -> None:
    print(f"hello from task {os.environ['FRAY_TASK_INDEX']}", flush=True)


def block_until_stopped() -> None:
    """Runs until the job is stopped (bounded: gives up after HOST_DEADLINE)."""
    print(f"task {os.environ['FRAY_TASK_INDEX']} waiting", flush=True)
    threading.Event().wait(HOST_DEADLINE)
    raise SystemExit("never stopped")


# -- helpers -------------------------------------------------------------------------------------

def cli(*args: str, check_json: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FRAY_CLUSTER_SPEC"}
    done = subprocess.run([sys.executable, "-m", "fray_tpu.ops.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env)
    if check_json:
        done.json = json.loads(done.stdout)
    return done


def spec_for(endpoint: str, state_dir: Path, **extra: str) -> str:
    values = {"emulate": "true", "emulator_endpoint": endpoint, "poll_interval": "0.2", "state_dir": str(state_dir),
              "project": "fray-tpu-test", **extra}
    return "tpu?" + "&".join(f"{k}={v}" for k, v in values.items())


def request(name: str, fn, workspace: Path) -> JobRequest:
    return JobRequest(
        name=name,
        entrypoint=Entrypoint.from_callable(fn),
        resources=ResourceConfig.with_tpu(TPU_TYPE),
        environment=EnvironmentConfig.create(workspace=str(workspace)),
    )


def make_workspace(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README").write_text("a small workspace for the CLI test jobs\n")
    return directory


def wait_running(cluster: TpuCluster, job_id: str) -> None:
    wait_for(lambda: cluster.poll(job_id).status == JobStatus.RUNNING, f"job {job_id} to run", JOB_TIMEOUT)


# -- a finished job, shared by the read-only tests -----------------------------------------------

@pytest.fixture(scope="module")
def finished_job(emulator_process, tmp_path_factory) -> dict:
    """One successful job, its controller shut down: (spec, state_dir, job_id)."""
    root = tmp_path_factory.mktemp("cli-finished")
    spec = spec_for(emulator_process.endpoint, root / "state")
    cluster = TpuCluster.from_spec(spec)
    try:
        job_id = cluster.launch(request("greet", greet, make_workspace(root / "workspace")))
        info = cluster.wait(job_id, timeout=JOB_TIMEOUT)
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
    finally:
        cluster.shutdown(timeout=JOB_TIMEOUT)
    assert info.status == JobStatus.SUCCEEDED
    return {"spec": spec, "state_dir": str(root / "state"), "job_id": job_id}


def test_jobs_lists_the_job_with_slices_attempts_and_cost(finished_job):
    done = cli("jobs", "--json", "--spec", finished_job["spec"], check_json=True)
    assert done.returncode == EXIT_OK, done.stderr
    [job] = done.json["jobs"]
    assert job["job_id"] == finished_job["job_id"]
    assert (job["status"], job["tpu_type"], job["slice_count"], job["attempts"]) == ("succeeded", TPU_TYPE, 1, 1)
    assert job["cost"]["chip_hours_provisioned"] > 0
    assert job["age_seconds"] >= 0 and job["live_slices"] == 0

    table = cli("--state-dir", finished_job["state_dir"], "jobs")
    assert table.returncode == EXIT_OK, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "STATUS", "SLICES", "ATTEMPTS"]
    assert row.startswith(finished_job["job_id"]) and f"1 x {TPU_TYPE}" in row


def test_status_shows_tasks_counters_and_cost(finished_job):
    done = cli("status", finished_job["job_id"], "--json", "--state-dir", finished_job["state_dir"], check_json=True)
    assert done.returncode == EXIT_OK, done.stderr
    status = done.json
    assert status["status"] == "succeeded"
    assert [t["status"] for t in status["tasks"]] == ["succeeded"] * 4
    assert status["tasks"][0]["name"] == "slice-0/worker-0"
    assert status["counters"]["attempts"] == 1 and status["counters"]["failures"] == 0
    cost = status["cost"]
    assert cost["chip_hours_running"] > 0 and cost["chip_hours_boot"] > 0
    assert cost["chip_hours_provisioned"] >= cost["chip_hours_running"] + cost["chip_hours_boot"] - 1e-3
    assert status["live_slices"] == []

    text = cli("status", finished_job["job_id"], "--state-dir", finished_job["state_dir"])
    assert text.returncode == EXIT_OK, text.stderr
    assert "slice-0/worker-3  succeeded" in text.stdout and "running user code" in text.stdout


def test_logs_show_task_output_and_progress_lines(finished_job):
    done = cli("logs", finished_job["job_id"], "--state-dir", finished_job["state_dir"])
    assert done.returncode == EXIT_OK, done.stderr
    lines = done.stdout.splitlines()
    assert {f"[slice-0/worker-{i}] hello from task {i}" for i in range(4)} <= set(lines)
    progress = [line for line in lines if line.startswith("[fray-tpu] ")]
    requested = next(i for i, line in enumerate(progress) if line.startswith("[fray-tpu] slice-0: requested v5litepod-16"))
    creating = next(i for i, line in enumerate(progress) if line.startswith("[fray-tpu] slice-0: creating in "))
    booted = progress.index("[fray-tpu] slice-0: booting, 4/4 agents up")
    started = progress.index("[fray-tpu] attempt 1: starting on 4 hosts of 1 slice(s)")
    running = progress.index("[fray-tpu] running on all 4 task(s)")
    assert requested < creating < booted < started < running

    only_progress = cli("logs", finished_job["job_id"], "--progress-only", "--state-dir", finished_job["state_dir"])
    assert only_progress.stdout.splitlines() == progress
    no_progress = cli("logs", finished_job["job_id"], "--no-progress", "--state-dir", finished_job["state_dir"])
    assert sorted(no_progress.stdout.splitlines()) == [f"[slice-0/worker-{i}] hello from task {i}" for i in range(4)]


def test_unknown_job_id_exits_3_naming_the_closest(finished_job):
    typo = "gret" + finished_job["job_id"][len("greet"):]
    for command in ("status", "logs", "stop"):
        done = cli(command, typo, "--state-dir", finished_job["state_dir"])
        assert done.returncode == EXIT_UNKNOWN_JOB, (command, done.stderr)
        assert finished_job["job_id"] in done.stderr and "fray-tpu jobs" in done.stderr
    prefix = cli("status", finished_job["job_id"][:12], "--json", "--state-dir", finished_job["state_dir"],
                 check_json=True)
    assert prefix.json["job_id"] == finished_job["job_id"]


# -- commands that must not create anything, or cannot reach the API ---------------------------

def test_plan_creates_nothing(fake_gcp, tmp_path):
    fake_gcp.control.reset_counters()
    spec = spec_for(fake_gcp.endpoint, tmp_path / "state")
    done = cli("plan", TPU_TYPE, "--slices", "2", "--regions", "us-west4,europe-west4", "--capacity", "on-demand",
               "--json", "--spec", spec, check_json=True)
    assert done.returncode == EXIT_OK, done.stderr
    plan = done.json
    assert (plan["total_vms"], plan["total_chips"], plan["capacity"]) == (8, 32, "on-demand")
    assert plan["zones"] == resolve_zones(TPU_TYPE, ["us-west4", "europe-west4"])  # in the order given
    assert plan["zones"][0].startswith("us-west4-") and plan["zones"][-1].startswith("europe-west4-")
    assert plan["hourly_usd"] > 0

    text = cli("plan", "v5p-8", "--spec", spec)
    assert text.returncode == EXIT_OK and "nothing was created" in text.stdout
    assert sum(fake_gcp.control.counters().values()) == 0, fake_gcp.control.counters()

    bad = cli("plan", "v5lite-16", "--spec", spec)
    assert bad.returncode == EXIT_USAGE and "v5litepod-16" in bad.stderr


def test_unreachable_api_exits_4(tmp_path):
    done = cli("slices", "--spec", spec_for("127.0.0.1:1", tmp_path / "state"))
    assert done.returncode == EXIT_API, done.stderr
    assert "could not be used" in done.stderr


def test_api_commands_on_the_emulator_need_its_endpoint(tmp_path):
    done = cli("gc", "--spec", f"tpu?emulate=true&state_dir={tmp_path}")
    assert done.returncode == EXIT_USAGE and "emulator_endpoint" in done.stderr


# -- slices and gc against a hand-made orphan ----------------------------------------------------

def test_slices_and_gc_find_and_delete_an_orphan(fake_gcp, finished_job):
    client = fake_gcp.client()
    zone = topology.get_tpu_topology("v5litepod-4").zones[0]
    labels = naming.resource_labels("lost-job-20260101-000000-deadbeef", 1, "gone-controller", 0)
    create_node(client, location(fake_gcp.project, zone), "fray-lost-orphan-1-0",
                node_spec("v5litepod-4", labels=labels, spot=True))
    client.transport.close()
    spec = finished_job["spec"]

    listed = cli("slices", "--json", "--spec", spec, check_json=True)
    assert listed.returncode == EXIT_OK, listed.stderr
    [orphan] = listed.json["slices"]
    assert (orphan["name"], orphan["zone"], orphan["tpu_type"]) == ("fray-lost-orphan-1-0", zone, "v5litepod-4")
    assert orphan["state"].startswith("READY") and orphan["capacity"] == "spot"
    assert orphan["job_in_journal"] is False and orphan["chips"] == 4
    assert orphan["age_seconds"] >= 0 and orphan["usd_so_far"] >= 0

    found = cli("gc", "--json", "--spec", spec, check_json=True)
    assert found.returncode == EXIT_FAILED, found.stderr
    assert [o["name"] for o in found.json["orphans"]] == ["fray-lost-orphan-1-0"]
    assert found.json["deleted"] is False
    assert fake_gcp.control.leaks()["nodes"], "gc without --yes deleted something"

    deleted = cli("gc", "--yes", "--spec", spec)
    assert deleted.returncode == EXIT_OK, deleted.stderr
    assert "deleted fray-lost-orphan-1-0" in deleted.stdout
    assert cli("slices", "--json", "--spec", spec, check_json=True).json["slices"] == []
    again = cli("gc", "--spec", spec)
    assert again.returncode == EXIT_OK and "no orphans" in again.stdout


# -- stop: through a live controller, and by reattaching when none runs --------------------------

def test_stop_through_the_live_controller_while_logs_follow(fake_gcp, tmp_path):
    spec = spec_for(fake_gcp.endpoint, tmp_path / "state")
    cluster = TpuCluster.from_spec(spec)
    try:
        job_id = cluster.launch(request("blocker", block_until_stopped, make_workspace(tmp_path / "workspace")))
        wait_running(cluster, job_id)
        follower = subprocess.Popen([sys.executable, "-m", "fray_tpu.ops.cli", "logs", job_id, "--follow", "--spec", spec],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            running = cli("status", job_id, "--json", "--spec", spec, check_json=True)
            assert running.returncode == EXIT_OK, running.stderr
            assert running.json["status"] == "running"
            [live] = running.json["live_slices"]
            assert (live["tpu_type"], live["endpoints"], live["state"]) == (TPU_TYPE, 4, "ready")
            assert cli("jobs", "--unfinished", "--json", "--spec", spec, check_json=True).json["jobs"][0]["job_id"] == job_id

            stopped = cli("stop", job_id, "--timeout", "60", "--spec", spec)
            assert stopped.returncode == EXIT_OK, stopped.stderr
            assert cluster.poll(job_id).status == JobStatus.STOPPED
            out, err = follower.communicate(timeout=CLI_TIMEOUT)
        finally:
            if follower.poll() is None:
                follower.kill()
        assert follower.returncode == EXIT_FAILED, err  # the followed job ended stopped
        assert "[fray-tpu] attempt 1: starting on 4 hosts of 1 slice(s)" in out and "task 0 waiting" in out
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
        status = cli("status", job_id, "--json", "--spec", spec, check_json=True)
        assert status.returncode == EXIT_FAILED and status.json["status"] == "stopped"
    finally:
        cluster.shutdown(timeout=JOB_TIMEOUT)


DRIVER = textwrap.dedent("""
    import os, sys, threading, time
    from fray_tpu.cluster import TpuCluster
    from fray_tpu.config import TpuClusterConfig
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig

    def block_until_stopped():
        threading.Event().wait({host_deadline})
        raise SystemExit("never stopped")

    cluster = TpuCluster(TpuClusterConfig.from_spec(sys.argv[1]), detach_on_exit=True)
    job_id = cluster.launch(JobRequest(
        name="orphaned", entrypoint=Entrypoint.from_callable(block_until_stopped),
        resources=ResourceConfig.with_tpu("{tpu_type}"), environment=EnvironmentConfig.create(workspace=sys.argv[2])))
    deadline = time.monotonic() + {job_timeout}
    while cluster.poll(job_id).status != JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    print(job_id, cluster.poll(job_id).status, flush=True)
    os._exit(0)  # the driver dies with its job running
""")


def test_stop_without_a_controller_reattaches_and_releases(fake_gcp, tmp_path):
    spec = spec_for(fake_gcp.endpoint, tmp_path / "state", lease_period="60")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(host_deadline=HOST_DEADLINE, tpu_type=TPU_TYPE, job_timeout=JOB_TIMEOUT))
    started = subprocess.run([sys.executable, str(driver), spec, str(make_workspace(tmp_path / "workspace"))],
                             capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert started.returncode == 0, started.stderr
    job_id, status = started.stdout.split()
    assert status == "running"
    assert len(fake_gcp.control.leaks()["nodes"]) == 1

    stopped = cli("stop", job_id, "--timeout", "90", "--spec", spec)
    assert stopped.returncode == EXIT_OK, stopped.stderr
    assert "reattached" in stopped.stderr
    assert fake_gcp.control.leaks()["nodes"] == []
    status = cli("status", job_id, "--json", "--spec", spec, check_json=True)
    assert status.json["status"] == "stopped" and status.json["live_slices"] == [], status.json.get("error_message")


def test_refused_self_delete_is_shown_by_slices_and_collected_by_gc(fake_gcp, tmp_path):
    """The driver dies with its job running; the lease lapses; the VM's service account lacks
    tpu.nodes.delete, so its self-delete is refused (403): the agent publishes that as a guest
    attribute, `fray-tpu slices` shows it for the slice with the account to grant, and
    `fray-tpu gc --yes` deletes the slice (the agents meant it gone), leaving nothing."""
    account = "trainer@fray-tpu-test.iam.gserviceaccount.com"
    fake_gcp.control.deny_permission(account, "tpu.nodes.delete")
    spec = spec_for(fake_gcp.endpoint, tmp_path / "state", lease_period="3", service_account=account)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(host_deadline=HOST_DEADLINE, tpu_type="v5litepod-4", job_timeout=JOB_TIMEOUT))
    started = subprocess.run([sys.executable, str(driver), spec, str(make_workspace(tmp_path / "workspace"))],
                             capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert started.returncode == 0, started.stderr
    [node] = fake_gcp.control.leaks()["nodes"]
    name = node["name"].rsplit("/", 1)[-1]

    def refusal_listed():
        listed = cli("slices", "--json", "--spec", spec, check_json=True)
        assert listed.returncode == EXIT_OK, listed.stderr
        rows = [r for r in listed.json["slices"] if r["name"] == name]
        return rows[0]["self_delete_refused"] if rows and rows[0]["self_delete_refused"] else None

    refusal = wait_for(refusal_listed, "the refused self-delete to be published", JOB_TIMEOUT)
    assert refusal.startswith("self-delete refused: PERMISSION_DENIED: Permission 'tpu.nodes.delete' denied")
    assert f"grant roles/tpu.admin (or a role with tpu.nodes.delete) to service account {account}" in refusal
    assert fake_gcp.control.counters().get("GetGuestAttributes", 0) >= 1
    assert [n["state"] for n in fake_gcp.control.leaks()["nodes"]] == ["READY"], "the refused delete deleted it"
    table = cli("slices", "--spec", spec)
    assert table.returncode == EXIT_OK, table.stderr
    assert "(self-delete refused)" in table.stdout and f"{name}: self-delete refused: PERMISSION_DENIED" in table.stdout
    assert "fray-tpu gc --yes" in table.stdout

    collected = cli("gc", "--yes", "--spec", spec)
    assert collected.returncode == EXIT_OK, collected.stderr
    assert f"deleted {name}" in collected.stdout and "could not delete it" in collected.stdout
    assert fake_gcp.control.leaks()["nodes"] == []


# -- emulator --------------------------------------------------------------------------------------

def test_emulator_subcommand_serves_and_announces_its_endpoint(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "fray_tpu.ops.cli", "emulator", "--zero-delays", "--exit-with-parent",
                                "--root", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the emulator printed nothing within 30s"
        announced = json.loads(process.stdout.readline())
        assert announced["endpoint"].startswith("127.0.0.1:") and announced["timings"]["create_delay"] == 0
    finally:
        process.terminate()
        assert process.wait(30) == 0
