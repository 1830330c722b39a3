"""TpuCluster end to end on the Cloud TPU emulator (issue 4's acceptance list).

Hosts of emulated slices are local processes, so the job callables below report what they saw
by writing files under the test's tmp_path. Every test ends with its slices released; the
``fake_gcp`` fixture then fails the test if any node or queued resource is left alive.

The callables are module-level functions shipped by value (this module is not importable on the
hosts). Inside them, waits are bounded loops with a deadline, never open-ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cloudpickle
import pytest
from fake_gcp import process_alive, wait_for
from fake_gcp.host_jobs import wait_for_file, write_json
from package_fixtures import JAX_PACKAGES

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.costs import PriceTable
from fray_tpu.errors import ConfigError
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobInfo, JobRequest, JobStatus, ResourceConfig
from fray_tpu.naming import LABEL_JOB, LABEL_SLICE, label_value
from fray_tpu.ops.plan_report import plan_report


cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT = 120.0
HOST_DEADLINE = 90.0  # how long a job callable waits for a condition before giving up
RESTART_SECONDS_LIMIT = 15.0
TRACEBACK_MARKER = "Traceback (most recent call last)"


# -- callables that run on the hosts ---------------------------------------------------------------

def greet() -> None:
    print(f"hello from task {os.environ['FRAY_TASK_INDEX']}", flush=True)


def record_env_and_block(out_dir: str, preempting_marker: str) -> None:
    """Write this host's env; on the first attempt (no marker yet) block until stopped."""
    second_attempt = os.path.exists(preempting_marker)
    name = f"{'second' if second_attempt else 'first'}-{os.environ['FRAY_TASK_INDEX']}.json"
    write_json(Path(out_dir) / name, dict(os.environ))
    if not second_attempt:
        wait_for_file(os.path.join(out_dir, "never-written"), HOST_DEADLINE)
        raise SystemExit("the first attempt was never stopped")


def record_env_and_allgather(out_dir: str) -> None:
    write_json(Path(out_dir) / f"env-{os.environ['FRAY_TASK_INDEX']}.json", dict(os.environ))
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    jax.distributed.initialize()
    total = int(multihost_utils.process_allgather(jnp.array([jax.process_index() + 1])).sum())
    write_json(Path(out_dir) / f"jax-{os.environ['FRAY_TASK_INDEX']}.json",
                {"process_index": jax.process_index(), "process_count": jax.process_count(), "total": total})
    jax.distributed.shutdown()


def record_jax_cloud_tpu_detection(out_dir: str, resolve_coordinator: bool = True) -> None:
    """What JAX's own GCE TPU cluster detection (the metadata-server path real VMs use, not the
    emulator's plugin) says on this host, next to what fray-tpu set. ``resolve_coordinator``
    False skips the coordinator lookup (emulated hostnames do not resolve)."""
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster

    write_json(Path(out_dir) / f"detect-{os.environ['FRAY_TASK_INDEX']}.json", {
        "process_id": GceTpuCluster.get_process_id(),
        "process_count": GceTpuCluster.get_process_count(),
        "coordinator": GceTpuCluster.get_coordinator_address(timeout_secs=10, override_coordinator_port="1")
        if resolve_coordinator else None,
        "env": {k: os.environ.get(k) for k in ("FRAY_TASK_INDEX", "FRAY_TASK_COUNT", "FRAY_JAX_COORDINATOR_ADDRESS",
                                               "FRAY_TPU_WORKER_NUMBER", "FRAY_WORKER_ID")},
    })


def worker_two_raises(out_dir: str) -> None:
    """Worker 2 fails; the rest of the gang would run until stopped (and record that they ran)."""
    index = os.environ["FRAY_TASK_INDEX"]
    write_json(Path(out_dir) / f"pid-{index}.json", os.getpid())
    if index == "2":
        # Fail only once the whole gang runs, so the test can check every host was stopped.
        deadline = time.monotonic() + HOST_DEADLINE
        while len(list(Path(out_dir).glob("pid-*.json"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        raise ValueError("boom on purpose in task 2")
    wait_for_file(os.path.join(out_dir, "never-written"), HOST_DEADLINE)


def fail_first_two_attempts(counter_dir: str) -> None:
    """Task 0 counts attempts with one exclusively-created file per attempt; the first two fail."""
    if os.environ["FRAY_TASK_INDEX"] != "0":
        return
    directory = Path(counter_dir)
    for attempt in range(1, 10):
        try:
            with open(directory / f"attempt-{attempt}", "x"):
                break
        except FileExistsError:
            continue
    if attempt <= 2:
        raise RuntimeError(f"failing attempt {attempt} on purpose")
    print(f"succeeded on attempt {attempt}", flush=True)


def record_pid_and_block(out_dir: str) -> None:
    write_json(Path(out_dir) / f"pid-{os.environ['FRAY_TASK_INDEX']}.json", os.getpid())
    wait_for_file(os.path.join(out_dir, "never-written"), HOST_DEADLINE)


def block_until(go_file: str) -> None:
    if not wait_for_file(go_file, HOST_DEADLINE):
        raise SystemExit(f"{go_file} never appeared")


def meet_peer(out_dir: str, me: str, peer: str, fail: bool) -> None:
    """RL shape: record my start, wait for my peer's; then succeed or fail."""
    write_json(Path(out_dir) / f"{me}.started", time.time())
    if not wait_for_file(os.path.join(out_dir, f"{peer}.started"), HOST_DEADLINE):
        raise SystemExit(f"{me}: {peer} never started while I was running")
    if fail:
        raise RuntimeError(f"{me} fails on purpose")


# -- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(emulator_process, job_package_index):
    c = TpuCluster(TpuClusterConfig(
        emulate=True,
        emulator_endpoint=emulator_process.endpoint,
        index_url=job_package_index.url,  # for the jobs that install JAX_PACKAGES
        poll_interval=0.2,
        lease_period=30.0,
        capacity_deadline=60.0,
        keep_warm=0,  # the emulator is reset between tests; the warm pool has tests of its own
    ))
    yield c
    c.shutdown(timeout=120)


@contextlib.contextmanager
def fresh_cluster(emulator_process, **config) -> Iterator[TpuCluster]:
    """A cluster of its own (the module's shares caches and settings across tests)."""
    values = dict(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2, capacity_deadline=60.0)
    c = TpuCluster(TpuClusterConfig(**{**values, **config}))
    try:
        yield c
    finally:
        c.shutdown(timeout=120)


def tpu_request(name: str, fn, args, workspace: str, tpu_type: str = "v5litepod-16", slices: int = 1,
                pip_packages: Sequence[str] = (), **kwargs) -> JobRequest:
    regions = kwargs.pop("regions", None)
    return JobRequest(
        name=name,
        entrypoint=Entrypoint.from_callable(fn, args=list(args)),
        resources=ResourceConfig.with_tpu(tpu_type, slice_count=slices, regions=regions),
        environment=EnvironmentConfig.create(workspace=workspace, pip_packages=list(pip_packages)),
        **kwargs,
    )


def wait_finished(cluster: TpuCluster, job_id: str):
    """Like ``cluster.wait`` but polling often, for tests that time how soon a job ends."""
    return wait_for(lambda: (info := cluster.poll(job_id)) and JobStatus.finished(info.status) and info,
                    f"job {job_id} to finish", JOB_TIMEOUT)


def finish(cluster: TpuCluster, job_id: str):
    """The job's final info, after its slices are released (so the leak check is meaningful).

    Polls often rather than through ``cluster.wait``, whose backoff (Marin's: 0.1 s doubling to
    10 s) would add up to several seconds to every test."""
    info = wait_finished(cluster, job_id)
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
    return info


def read_json_files(directory: Path, pattern: str) -> dict[str, object]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob(pattern))}


def wait_files(directory: Path, pattern: str, count: int, what: str) -> dict[str, object]:
    return wait_for(lambda: len(list(directory.glob(pattern))) >= count and read_json_files(directory, pattern),
                    what, JOB_TIMEOUT)


def job_nodes(control, job_id: str) -> list[dict]:
    return [n for n in control.leaks()["nodes"] if n["labels"].get(LABEL_JOB) == label_value(job_id)]


def run_noting_zones(cluster, fake_gcp, go: Path, request_for) -> tuple[str, set[str], JobInfo]:
    """Launch ``request_for(go)`` (a job that blocks until ``go`` exists), note the zones of its
    READY nodes once every task runs, then let it finish: the job id, those zones, its end."""
    job_id = cluster.launch(request_for(go))
    wait_all_tasks_running(cluster, job_id)
    zones = {n["name"].split("/locations/")[1].split("/")[0] for n in job_nodes(fake_gcp.control, job_id)
             if n["state"] == "READY"}
    go.write_text("")
    return job_id, zones, finish(cluster, job_id)




def wait_all_tasks_running(cluster: TpuCluster, job_id: str) -> None:
    wait_for(lambda: all(t.status == JobStatus.RUNNING for t in cluster.poll(job_id).tasks),
             f"every task of {job_id} to be running", JOB_TIMEOUT)


# -- single slice -------------------------------------------------------------------------------------

def test_single_slice_succeeds_with_tagged_output(cluster, fake_gcp, workspace, caplog):
    job_id = cluster.launch(tpu_request("single", greet, [], workspace))
    with caplog.at_level(logging.INFO, logger="fray_tpu.job"):
        info = cluster.monitor(job_id)
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)

    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert [t.status for t in info.tasks] == [JobStatus.SUCCEEDED] * 4
    lines = [r.getMessage() for r in caplog.records if r.name == "fray_tpu.job"]
    for worker in range(4):
        assert f"[slice-0/worker-{worker}] hello from task {worker}" in lines
    counters = cluster.job_counters(job_id)
    assert (counters.attempts, counters.failures, counters.preemptions) == (1, 0, 0)


# -- multislice: env on every host and one JAX group of all 8 processes ------------------------------

def test_a_slice_ready_long_before_the_others_keeps_its_agents_until_the_gang_connects(
        emulator_process, fake_gcp, workspace):
    """Slices of a gang become READY minutes apart on Cloud TPU; the controller renews leases
    once the whole gang serves. Slice 1 is held in CREATING for three lease periods after slice
    0's agents serve: slice 0 does not delete itself (the agents' first lease term is the boot
    deadline), and the job runs on both slices with no preemption counted."""
    lease = 2.0
    before = fake_gcp.control.timings()
    fake_gcp.control.set_timings(create_delay=3.0)  # time to hold slice 1 while CREATING
    try:
        with fresh_cluster(emulator_process, lease_period=lease, keep_warm=0) as skewed:
            job_id = skewed.launch(tpu_request("skew", greet, [], workspace, slices=2))
            ids = wait_for(lambda: len(nodes := job_nodes(fake_gcp.control, job_id)) == 2 and
                           sorted(n["name"].rsplit("/", 1)[-1] for n in nodes), "both slices' nodes", JOB_TIMEOUT)
            early, held = ids
            fake_gcp.control.hold_creating(held)
            def serving() -> bool:
                try:
                    return all("serving on" in fake_gcp.control.agent_log(early, w) for w in range(4))
                except ValueError:  # not booted yet
                    return False

            wait_for(serving, "slice 0's agents serving", JOB_TIMEOUT)
            time.sleep(3 * lease)  # the skew under test: slice 1 still CREATING meanwhile
            assert [n["state"] for n in job_nodes(fake_gcp.control, job_id) if n["name"].endswith(early)] == ["READY"]
            fake_gcp.control.release(held)
            info = finish(skewed, job_id)
        assert info.status == JobStatus.SUCCEEDED, info.error_message
        assert skewed.job_counters(job_id).preemptions == 0
    finally:
        fake_gcp.control.set_timings(**before)


def test_multislice_env_and_global_jax_collective(cluster, fake_gcp, workspace, out_dir):
    """On faithful hosts, with JAX from the job's own environment (built by uv from the loopback
    index once per session, then downloaded from the staging bucket)."""
    job_id = cluster.launch(tpu_request("multi-jax", record_env_and_allgather, [str(out_dir)], workspace, slices=2,
                                        pip_packages=JAX_PACKAGES))
    info = finish(cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert len(info.tasks) == 8 and all(t.status == JobStatus.SUCCEEDED for t in info.tasks)

    envs = {int(env["FRAY_TASK_INDEX"]): env for env in read_json_files(out_dir, "env-*.json").values()}
    assert sorted(envs) == list(range(8))
    coordinator_ip = envs[0]["FRAY_TPU_HOST_IP"]
    assert len({env["FRAY_TPU_HOST_IP"] for env in envs.values()}) == 8
    for index, env in envs.items():
        slice_id, worker = divmod(index, 4)
        assert env["FRAY_SLICE_ID"] == str(slice_id) and env["FRAY_WORKER_ID"] == str(worker)
        assert env["FRAY_TASK_COUNT"] == "8" and env["FRAY_SLICE_COUNT"] == "2"
        assert env["MEGASCALE_SLICE_ID"] == str(slice_id)
        assert env["MEGASCALE_NUM_SLICES"] == "2"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"{coordinator_ip}:8081"
        assert env["JAX_COORDINATOR_PORT"] == "8476"
        assert env["PYTHONUNBUFFERED"] == "1"
        spec = TpuClusterConfig.from_spec(env["FRAY_CLUSTER_SPEC"])
        assert spec.emulate and spec.emulator_endpoint == fake_gcp.endpoint

    results = read_json_files(out_dir, "jax-*.json")
    assert sorted(r["process_index"] for r in results.values()) == list(range(8))
    # The collective saw every process: 1 + 2 + ... + 8.
    assert {(r["process_count"], r["total"]) for r in results.values()} == {(8, 36)}


# -- user failures and the failure budget ------------------------------------------------------------

def test_failing_callable_names_host_and_traceback(cluster, fake_gcp, workspace, out_dir):
    job_id = cluster.launch(tpu_request("fails", worker_two_raises, [str(out_dir)], workspace, max_retries_failure=0))
    info = finish(cluster, job_id)

    assert info.status == JobStatus.FAILED
    assert "slice-0/worker-2" in info.error_message
    assert TRACEBACK_MARKER in info.error_message
    assert "ValueError: boom on purpose in task 2" in info.error_message
    counters = cluster.job_counters(job_id)
    assert (counters.attempts, counters.failures) == (1, 1)
    # The gang was stopped: no host of the failed attempt is still running the user's code.
    pids = read_json_files(out_dir, "pid-*.json").values()
    assert len(pids) == 4
    assert not [pid for pid in pids if process_alive(pid)]


def test_job_failing_twice_succeeds_on_third_attempt(cluster, fake_gcp, workspace, out_dir):
    job_id = cluster.launch(tpu_request("flaky", fail_first_two_attempts, [str(out_dir)], workspace,
                                        max_retries_failure=2))
    info = finish(cluster, job_id)

    assert info.status == JobStatus.SUCCEEDED, info.error_message
    counters = cluster.job_counters(job_id)
    assert (counters.attempts, counters.failures, counters.preemptions) == (3, 2, 0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["attempt-1", "attempt-2", "attempt-3"]
    # Documented policy (decisions.py): a user failure reuses the healthy slice.
    assert fake_gcp.control.counters().get("CreateNode") == 1


# -- preemption ---------------------------------------------------------------------------------------

def test_preempting_one_slice_restarts_the_whole_gang(cluster, fake_gcp, workspace, out_dir):
    marker = out_dir / "preempting"
    job_id = cluster.launch(tpu_request("preempt", record_env_and_block, [str(out_dir), str(marker)], workspace,
                                        slices=2, max_retries_preemption=1))
    first = wait_files(out_dir, "first-*.json", 8, "all 8 hosts of the first attempt to start")
    slice0 = [n for n in job_nodes(fake_gcp.control, job_id) if n["labels"][LABEL_SLICE] == "0"]
    assert len(slice0) == 1
    marker.write_text("")
    preempted_at = time.monotonic()
    fake_gcp.control.preempt_node(slice0[0]["name"])
    wait_files(out_dir, "second-*.json", 8, "all 8 hosts of the second attempt to start")
    restart_seconds = time.monotonic() - preempted_at

    info = finish(cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    counters = cluster.job_counters(job_id)
    assert (counters.attempts, counters.preemptions, counters.failures) == (2, 1, 0)

    second = read_json_files(out_dir, "second-*.json")
    assert len(second) == 8
    first_by_index = {int(e["FRAY_TASK_INDEX"]): e for e in first.values()}
    second_by_index = {int(e["FRAY_TASK_INDEX"]): e for e in second.values()}
    old_coordinator = first_by_index[0]["MEGASCALE_COORDINATOR_ADDRESS"]
    new_coordinator = second_by_index[0]["MEGASCALE_COORDINATOR_ADDRESS"]
    assert new_coordinator != old_coordinator
    assert new_coordinator == f"{second_by_index[0]['FRAY_TPU_HOST_IP']}:8081"
    for index, env in second_by_index.items():
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == new_coordinator
        assert env["MEGASCALE_SLICE_ID"] == str(index // 4)
        assert env["MEGASCALE_NUM_SLICES"] == "2"
    # Documented policy (decisions.py): slice 0 was replaced (new hosts), slice 1 survived and
    # was reused; the whole gang ran again either way.
    ips = {attempt: [envs[i]["FRAY_TPU_HOST_IP"] for i in range(8)]
           for attempt, envs in (("first", first_by_index), ("second", second_by_index))}
    assert set(ips["second"][:4]).isdisjoint(ips["first"][:4])
    assert ips["second"][4:] == ips["first"][4:]
    # The hosts of a slice known to be preempted cannot report an exit: waiting for them only
    # delays the restart (issue 4 targets <= 3 s with zero provisioning delay; generous here).
    assert restart_seconds < RESTART_SECONDS_LIMIT, f"gang restarted {restart_seconds:.1f}s after the preemption"


def test_exhausted_preemption_budget_fails_and_says_so(cluster, fake_gcp, workspace, out_dir):
    marker = out_dir / "never-created"
    job_id = cluster.launch(tpu_request("no-budget", record_env_and_block, [str(out_dir), str(marker)], workspace,
                                        max_retries_preemption=0))
    wait_files(out_dir, "first-*.json", 4, "all 4 hosts to start")
    (node,) = job_nodes(fake_gcp.control, job_id)
    preempted_at = time.monotonic()
    fake_gcp.control.preempt_node(node["name"])
    info = wait_finished(cluster, job_id)
    failed_seconds = time.monotonic() - preempted_at
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)

    assert info.status == JobStatus.FAILED
    assert "preempted" in info.error_message and "max_retries_preemption=0" in info.error_message
    assert cluster.job_counters(job_id).preemptions == 1
    assert cluster.job_counters(job_id).attempts == 1
    assert failed_seconds < RESTART_SECONDS_LIMIT, f"the job ended {failed_seconds:.1f}s after the preemption"


# -- terminate ----------------------------------------------------------------------------------------

def terminate_and_check_stopped(cluster, fake_gcp, job_id) -> None:
    """terminate() is STOPPED at once; once released, every task is STOPPED and no node is left."""
    cluster.terminate(job_id)
    assert cluster.poll(job_id).status == JobStatus.STOPPED
    cluster.wait_released(job_id, timeout=JOB_TIMEOUT)

    info = cluster.poll(job_id)
    assert info.status == JobStatus.STOPPED
    assert all(t.status == JobStatus.STOPPED for t in info.tasks)
    assert job_nodes(fake_gcp.control, job_id) == []


def test_terminate_while_provisioning_ends_stopped(cluster, fake_gcp, workspace, out_dir):
    fake_gcp.control.hold_creating("fray-held-")
    job_id = cluster.launch(tpu_request("held", record_pid_and_block, [str(out_dir)], workspace))
    wait_for(lambda: [n for n in job_nodes(fake_gcp.control, job_id) if n["state"] == "CREATING"],
             "the slice to be CREATING (held)", JOB_TIMEOUT)
    terminate_and_check_stopped(cluster, fake_gcp, job_id)
    assert list(out_dir.iterdir()) == []  # the user's code never ran


def test_terminate_while_running_ends_stopped_with_nothing_alive(cluster, fake_gcp, workspace, out_dir):
    job_id = cluster.launch(tpu_request("running", record_pid_and_block, [str(out_dir)], workspace))
    pids = wait_files(out_dir, "pid-*.json", 4, "all 4 hosts to run the callable").values()
    wait_all_tasks_running(cluster, job_id)
    terminate_and_check_stopped(cluster, fake_gcp, job_id)
    assert not [pid for pid in pids if process_alive(pid)]


# -- capacity ------------------------------------------------------------------------------------------

def test_stockout_in_first_zone_runs_in_the_second(cluster, fake_gcp, workspace, out_dir):
    fake_gcp.control.stockout("europe-west4-b")
    job_id, zones, info = run_noting_zones(cluster, fake_gcp, out_dir / "go", lambda go: tpu_request(
        "stockout", block_until, [str(go)], workspace, regions=["europe-west4", "us-west4"]))

    assert zones == {"us-west4-a"}
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    counters = cluster.job_counters(job_id)
    assert (counters.attempts, counters.failures, counters.preemptions) == (1, 0, 0)
    assert fake_gcp.control.counters().get("CreateNode") == 2  # europe-west4-b stocked out, then us-west4-a


def test_two_slices_fail_over_as_a_group_into_one_zone(cluster, fake_gcp, workspace, out_dir):
    """us-east5-b stocks out for one create while both slices are placed there: the slice it did
    get is given back and both slices end up in us-east5-a; the plan says the slices share a zone."""
    plan = plan_report("v6e-4", 2, ["us-east5"], None, cluster.config, PriceTable.default())
    assert plan.zones == ("us-east5-b", "us-east5-a")
    assert "all 2 slices in one zone" in plan.render_text()
    fake_gcp.control.stockout("us-east5-b", count=1)
    _, zones, info = run_noting_zones(cluster, fake_gcp, out_dir / "go", lambda go: tpu_request(
        "group", block_until, [str(go)], workspace, tpu_type="v6e-4", slices=2, regions=["us-east5"]))

    assert zones == {"us-east5-a"}
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert fake_gcp.control.counters().get("CreateNode") == 4  # two in us-east5-b (one stocked out), two in us-east5-a


@pytest.mark.parametrize("slices", [1, 2])
def test_jax_cloud_tpu_detection_agrees_with_fray_when_endpoints_are_listed_out_of_order(
        cluster, fake_gcp, workspace, out_dir, slices):
    """The API lists every node's endpoints in reverse worker order (fault control); fray-tpu
    orders the hosts by each agent's worker number, so JAX's own metadata-based detection gives
    every host the process id, process count and coordinator fray-tpu set."""
    fake_gcp.control.reverse_endpoints(True)
    job_id = cluster.launch(tpu_request("detect", record_jax_cloud_tpu_detection, [str(out_dir)], workspace,
                                        slices=slices, pip_packages=JAX_PACKAGES))
    info = finish(cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    found = read_json_files(out_dir, "detect-*.json")
    assert len(found) == 4 * slices
    for result in found.values():
        env = result["env"]
        assert result["process_id"] == int(env["FRAY_TASK_INDEX"])
        assert result["process_count"] == int(env["FRAY_TASK_COUNT"]) == 4 * slices
        assert env["FRAY_WORKER_ID"] == env["FRAY_TPU_WORKER_NUMBER"]
        assert result["coordinator"].split(":")[0] == env["FRAY_JAX_COORDINATOR_ADDRESS"].split(":")[0]


def test_hostname_only_worker_endpoints_are_handled(cluster, fake_gcp, workspace, out_dir):
    """Hosts serve the newer hostname-only worker-network-endpoints: agents still find their own
    address and JAX's detection still gives each host fray-tpu's process id and count."""
    fake_gcp.control.hostname_endpoints(True)
    job_id = cluster.launch(tpu_request("hostnames", record_jax_cloud_tpu_detection, [str(out_dir), False], workspace,
                                        pip_packages=JAX_PACKAGES))
    info = finish(cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    found = read_json_files(out_dir, "detect-*.json")
    assert sorted(r["process_id"] for r in found.values()) == [0, 1, 2, 3]
    for result in found.values():
        assert result["process_id"] == int(result["env"]["FRAY_TASK_INDEX"])
        assert result["process_count"] == 4


def test_list_storm_longer_than_a_retry_round_neither_deletes_nor_fails_the_job(emulator_process, fake_gcp,
                                                                               workspace, out_dir):
    """Every ListNodes answers 503 for 4 s from launch, eight retry rounds of this cluster's 0.5 s
    (api_retry_seconds): the slice is created once, becomes READY, the job runs and succeeds; the
    only delete is the one at the end."""
    with fresh_cluster(emulator_process, api_retry_seconds=0.5) as storm_cluster:
        go = out_dir / "go"
        fake_gcp.control.fail_for("ListNodes", 4.0, 503)
        job_id = storm_cluster.launch(tpu_request("storm", block_until, [str(go)], workspace))
        wait_all_tasks_running(storm_cluster, job_id)
        assert fake_gcp.control.counters().get("DeleteNode", 0) == 0
        go.write_text("")
        info = finish(storm_cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    counters = fake_gcp.control.counters()
    assert (counters["CreateNode"], counters["DeleteNode"]) == (1, 1)
    assert counters["ListNodes"] > 8


def test_zone_the_api_no_longer_offers_the_type_in_is_not_tried(emulator_process, fake_gcp, workspace, out_dir):
    """europe-west4-b stops offering v5litepod-16 (ListAcceleratorTypes): the plan drops it, the
    job runs in us-west4-a with a single create call."""
    fake_gcp.control.withdraw_type("europe-west4-b", "v5litepod-16")
    go = out_dir / "go"
    go.write_text("")
    with fresh_cluster(emulator_process) as cluster:  # a new controller: nothing cached yet
        job_id = cluster.launch(tpu_request("offers", block_until, [str(go)], workspace,
                                            regions=["europe-west4", "us-west4"]))
        info = finish(cluster, job_id)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    counters = fake_gcp.control.counters()
    assert counters["CreateNode"] == 1
    assert counters["ListAcceleratorTypes"] == 2  # each candidate zone asked once


def test_no_usable_zone_fails_the_launch_at_once_naming_each_zone(emulator_process, fake_gcp, workspace, out_dir):
    """One zone forbidden by org policy, the other no longer offering the type: launch raises
    before anything is created, naming each zone with its reason."""
    fake_gcp.control.refuse("forbidden_zone", zone="europe-west4-b")
    fake_gcp.control.withdraw_type("us-west4-a", "v5litepod-16")
    with fresh_cluster(emulator_process) as cluster, pytest.raises(ConfigError) as raised:
        cluster.launch(tpu_request("nozone", block_until, [str(out_dir / "go")], workspace,
                                   regions=["europe-west4", "us-west4"]))
    message = str(raised.value)
    assert "europe-west4-b: forbidden by the organization's location policy" in message
    assert "us-west4-a: does not offer v5litepod-16" in message
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0


def test_fatal_create_refusal_fails_the_job_at_once_with_the_api_message(cluster, fake_gcp, workspace, out_dir):
    """403 IAM_PERMISSION_DENIED on create: the job fails in its first round (not after the 60 s
    capacity deadline) with Google's message and the fix; one create call, nothing left."""
    fake_gcp.control.refuse("permission_denied")
    started = time.monotonic()
    job_id = cluster.launch(tpu_request("denied", block_until, [str(out_dir / "go")], workspace))
    info = finish(cluster, job_id)
    assert time.monotonic() - started < 30
    assert info.status == JobStatus.FAILED
    assert "Permission 'tpu.nodes.create' denied" in info.error_message and "roles/tpu.admin" in info.error_message
    assert fake_gcp.control.counters()["CreateNode"] == 1


# -- RL shape: two jobs at once -------------------------------------------------------------------------

def test_trainer_and_rollout_run_together_and_wait_names_the_failed_one(cluster, fake_gcp, workspace, out_dir):
    trainer = cluster.launch(tpu_request("trainer", meet_peer, [str(out_dir), "trainer", "rollout", False], workspace,
                                         tpu_type="v5litepod-8"))
    rollout = cluster.launch(tpu_request("rollout", meet_peer, [str(out_dir), "rollout", "trainer", True], workspace,
                                         tpu_type="v5litepod-4"))
    with pytest.raises(RuntimeError) as raised:
        cluster.wait([trainer, rollout], raise_on_failure=True, timeout=JOB_TIMEOUT)
    for job_id in (trainer, rollout):
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT)

    message = str(raised.value)
    assert rollout in message and "rollout fails on purpose" in message
    assert trainer not in message
    # Each job saw the other one running: both started before either could finish.
    assert cluster.poll(trainer).status == JobStatus.SUCCEEDED
    assert sorted(p.name for p in out_dir.iterdir()) == ["rollout.started", "trainer.started"]


# -- bad input is rejected at launch, before anything is provisioned ------------------------------------

def _holds_a_lock():
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    return uses_lock


def _request(**overrides) -> JobRequest:
    fields = dict(
        name="bad-input",
        entrypoint=Entrypoint.from_callable(greet),
        resources=ResourceConfig.with_tpu("v5litepod-16"),
        environment=EnvironmentConfig.create(workspace=os.path.dirname(__file__)),
    )
    fields.update(overrides)
    return JobRequest(**fields)


BAD_REQUESTS = {
    "unknown type": (lambda: _request(resources=ResourceConfig.with_tpu("v5e-16")), ["v5e-16", "Did you mean 'v5litepod-16'"]),
    "zero replicas": (lambda: _request(resources=ResourceConfig.with_tpu("v5litepod-16", slice_count=0)),
                      ["replicas", "0"]),
    "misspelt region": (lambda: _request(resources=ResourceConfig.with_tpu("v5litepod-16", regions=["eu-west4"])),
                        ["eu-west4", "Did you mean 'europe-west4'"]),
    "name with spaces": (lambda: _request(name="my job"), ["my job"]),
    "unpicklable callable": (lambda: _request(entrypoint=Entrypoint.from_callable(_holds_a_lock())),
                             ["variable 'lock'", "cannot be pickled"]),
    "non-string env value": (lambda: _request(environment=EnvironmentConfig.create(
        workspace=os.path.dirname(__file__), env_vars={"NUM_STEPS": 100})), ["NUM_STEPS", "str(100)"]),
    "docker image": (lambda: _request(environment=EnvironmentConfig.create(docker_image="gcr.io/me/trainer:1")),
                     ["docker_image", "gcr.io/me/trainer:1"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_raises_before_provisioning(cluster, fake_gcp, case):
    build, expected = BAD_REQUESTS[case]
    jobs_before = len(cluster.list_jobs())
    with pytest.raises((ConfigError, ValueError)) as raised:
        cluster.launch(build())
    for fragment in expected:
        assert fragment in str(raised.value)
    assert len(cluster.list_jobs()) == jobs_before
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0
