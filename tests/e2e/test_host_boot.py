"""Booting real-looking TPU VMs end to end: the faithful default image (a clean environment,
Python 3.10 without fray-tpu, no index), the host bundle through emulated Cloud Storage, the
bootstrap's phases read back through GetGuestAttributes, and every bootstrap failure failing the
job fast with the host, the phase and the reason, leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fake_gcp import run_to_end, wait_for

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.emulator.storage import EMULATED_BUCKET
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig
from fray_tpu.hostboot import bootstrapper_for
from fray_tpu.hostbundle import OBJECT_PREFIX
from fray_tpu.supervisor.watch import PROGRESS_PREFIX

POLL = 0.5
JOB_TIMEOUT = 240.0
# What a job on a host writes: which interpreter ran it, from where, with which environment.
STDLIB_JOB = '''
import json, os, sys

def main(out_dir):
    path = os.path.join(out_dir, "task-%s.json" % os.environ["FRAY_TASK_INDEX"])
    with open(path, "w") as f:
        json.dump({"version": list(sys.version_info[:2]), "executable": sys.executable,
                   "virtual_env": os.environ.get("VIRTUAL_ENV"), "path": os.environ.get("PATH"),
                   "slice": os.environ["FRAY_SLICE_ID"], "worker": os.environ["FRAY_WORKER_ID"],
                   "controller_state_dir": os.environ.get("FRAY_TPU_STATE_DIR")}, f)


def wait_for_go(out_dir):
    """Runs until the test writes out_dir/go (at most a minute), then reports like main."""
    import time
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out_dir, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)
    main(out_dir)
'''


@pytest.fixture
def cluster(emulator_process):
    c = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=POLL,
                                    lease_period=30.0, capacity_deadline=60.0, keep_warm=0))
    yield c
    c.shutdown(timeout=120)


@pytest.fixture
def image(fake_gcp):
    """Set the image later nodes boot; back to the runtime version's image afterwards."""
    yield fake_gcp.control.set_image
    fake_gcp.control.set_image(None)


@pytest.fixture
def stdlib_job(workspace, monkeypatch):
    """A standard-library-only job function in a module of the workspace (pickled by reference)."""
    (Path(workspace) / "stdlib_job.py").write_text(STDLIB_JOB)
    monkeypatch.syspath_prepend(workspace)
    sys.modules.pop("stdlib_job", None)
    import stdlib_job

    yield stdlib_job
    sys.modules.pop("stdlib_job", None)


def request(name: str, fn, args, workspace: str, slices: int = 1) -> JobRequest:
    return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=list(args)),
                      resources=ResourceConfig.with_tpu("v5litepod-16", slice_count=slices),
                      environment=EnvironmentConfig.create(workspace=workspace))


def progress_lines(cluster: TpuCluster, job_id: str) -> list[str]:
    lines, _ = cluster.journal().output(job_id)
    return [line[len(PROGRESS_PREFIX):] for line in lines if line.startswith(PROGRESS_PREFIX)]


def environment_downloads(cluster: TpuCluster, job_id: str) -> int:
    """How many hosts downloaded the job's environment from the bucket (it travels there too,
    besides the bundle), as the progress lines count them."""
    found = (count for line in progress_lines(cluster, job_id)
             for count in re.findall(r"downloaded from the bucket on (?:(\d+) hosts|worker \d+)", line))
    return sum(int(count or 1) for count in found)


def test_two_slices_boot_the_faithful_image_from_the_bundle_and_run_a_stdlib_job(
        cluster, fake_gcp, workspace, out_dir, stdlib_job):
    """Every host of 2 × v5litepod-16 starts from a clean environment with the image's Python
    3.10, installs the agent from the bundle (the bundle and uv uploaded once, each downloaded
    once per VM, no index), runs a
    standard-library callable on the controller's Python (an environment uv builds on each host
    with no index), and the job's output shows the bootstrap phases per slice."""
    before = fake_gcp.control.storage_counters()
    job_id = cluster.launch(request("faithful", stdlib_job.main, [str(out_dir)], workspace, slices=2))
    info = run_to_end(cluster, job_id, JOB_TIMEOUT)
    assert info.status == JobStatus.SUCCEEDED, info.error_message

    tasks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("task-*.json"))]
    assert len(tasks) == 8
    for task in tasks:
        # The job runs on the controller's Python, in an environment uv built on the host.
        assert task["version"] == list(sys.version_info[:2])
        assert "/fray-tpu-agent/" in task["executable"] and "/envs/" in task["executable"]
        assert task["controller_state_dir"] is None
        assert ".venv" not in (task["path"] or "")
    phases = [line for line in progress_lines(cluster, job_id) if "bootstrap phases" in line]
    for slice_id in (0, 1):
        (line,) = [p for p in phases if p.startswith(f"slice-{slice_id}:")]
        for phase in ("started", "interpreter", "bundle", "deps", "service", "serving"):
            assert f"{phase} +" in line, line
    after = fake_gcp.control.storage_counters()
    assert after["uploads"] - before["uploads"] <= 3, (before, after)  # the bundle, uv, the job's environment
    assert after["downloads"] - before["downloads"] == 2 * 8 + environment_downloads(cluster, job_id), (before, after)


def test_no_node_metadata_holds_a_private_key_or_the_job_secret(cluster, fake_gcp, tpu_client, workspace, out_dir,
                                                                 stdlib_job):
    """Node metadata, read through the API while the job runs, has no private key and no secret
    (the agents' certificates come from guest attributes); nodes carry the network tag."""
    job_id = cluster.launch(request("nosecret", stdlib_job.wait_for_go, [str(out_dir)], workspace))
    names = wait_for(lambda: [n["name"] for n in fake_gcp.control.leaks()["nodes"] if n["state"] == "READY"],
                     "the job's node to be READY", JOB_TIMEOUT)
    nodes = [tpu_client.get_node(name=name) for name in names]
    assert nodes[0].metadata["startup-script"]
    assert all(list(node.tags) == ["fray-tpu"] for node in nodes)  # what firewall rules target
    secret = cluster.journal().load_secret(job_id, "channel-secret").decode()
    for node in nodes:
        for key, value in node.metadata.items():
            assert "PRIVATE KEY" not in value and secret not in value, key
    (out_dir / "go").write_text("")
    assert run_to_end(cluster, job_id, JOB_TIMEOUT).status == JobStatus.SUCCEEDED


def _assert_fast_config_failure(cluster, fake_gcp, job_id: str, *expected: str) -> None:
    started = time.monotonic()
    info = run_to_end(cluster, job_id, JOB_TIMEOUT)
    elapsed = time.monotonic() - started
    assert info.status == JobStatus.FAILED
    for text in expected:
        assert text in info.error_message, info.error_message
    assert "bootstrap failed on every host: slice-0/worker-0" in info.error_message
    counters = cluster.job_counters(job_id)
    assert counters.bad_hosts == 0 and counters.attempts == 1, counters
    # boot_deadline is 15 minutes: the failure came from the guest attributes, not a timeout.
    assert elapsed < 60, elapsed
    assert not fake_gcp.control.leaks()["nodes"]


def test_an_image_without_python3_fails_the_job_naming_the_image_to_use(cluster, fake_gcp, workspace, out_dir,
                                                                         stdlib_job, image):
    """No python3 on the image: a configuration error naming the phase and the runtime to use."""
    image("no-python3")
    job_id = cluster.launch(request("nopython", stdlib_job.main, [str(out_dir)], workspace))
    _assert_fast_config_failure(cluster, fake_gcp, job_id, "phase interpreter", "no python3",
                                "runtime_version=tpu-ubuntu2204-base")


def test_a_tampered_bundle_is_refused_on_every_host(cluster, fake_gcp, workspace, out_dir, stdlib_job):
    """The staged object changed after staging (same size): every VM refuses its hash."""
    bootstrapper = bootstrapper_for(cluster.config, fake_gcp.endpoint)
    script = bootstrapper.startup_script("v2-alpha-tpuv5-lite")
    bootstrapper.wait_staged(JOB_TIMEOUT)
    (url,) = [line.split("=", 1)[1].strip("'") for line in script.splitlines() if line.startswith("BUNDLE_URL=")]
    name = url.split("/", 3)[3]
    assert name.startswith(OBJECT_PREFIX)
    endpoint = fake_gcp.control.storage_endpoint()
    headers = {"Authorization": "Bearer test"}
    media = f"{endpoint}/storage/v1/b/{EMULATED_BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(urllib.request.Request(media, headers=headers), timeout=30) as response:
        data = bytearray(response.read())
    data[len(data) // 2] ^= 0xFF
    upload = f"{endpoint}/upload/storage/v1/b/{EMULATED_BUCKET}/o?" + urllib.parse.urlencode(
        {"uploadType": "media", "name": name})
    urllib.request.urlopen(urllib.request.Request(upload, data=bytes(data), headers=headers, method="POST"),
                           timeout=30).read()
    try:
        job_id = cluster.launch(request("tampered", stdlib_job.main, [str(out_dir)], workspace))
        _assert_fast_config_failure(cluster, fake_gcp, job_id, "phase bundle", "SHA-256 mismatch")
    finally:
        data[len(data) // 2] ^= 0xFF
        urllib.request.urlopen(urllib.request.Request(upload, data=bytes(data), headers=headers, method="POST"),
                               timeout=30).read()


def test_a_dependency_missing_for_the_vms_python_fails_in_the_deps_phase(cluster, fake_gcp, workspace, out_dir,
                                                                          stdlib_job, image):
    """The image's Python (3.12) is not the bundle's (3.10): compiled wheels do not install, the
    error says so and names the setting that fixes it."""
    image("ubuntu-24.04")
    job_id = cluster.launch(request("wrongpython", stdlib_job.main, [str(out_dir)], workspace))
    _assert_fast_config_failure(cluster, fake_gcp, job_id, "phase deps", "Python 3.10", "set host_python=3.12")


def test_an_agent_crashing_at_start_fails_the_job_with_its_log(emulator_process, fake_gcp, workspace, out_dir,
                                                               stdlib_job):
    """The agent cannot bind its port on any host (something else holds it): the job fails with
    the agent's own last words, not after boot_deadline."""
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint,
                                          poll_interval=POLL, agent_port=port, capacity_deadline=60.0))
    try:
        job_id = cluster.launch(request("crash", stdlib_job.main, [str(out_dir)], workspace))
        _assert_fast_config_failure(cluster, fake_gcp, job_id, "phase agent", "before serving", "cannot start")
    finally:
        cluster.shutdown(timeout=120)
        blocker.close()


def test_a_38_image_is_refused_before_provisioning_naming_the_runtime_to_use(cluster, fake_gcp, workspace, out_dir,
                                                                              stdlib_job):
    """tpu-vm-* runtimes boot Python 3.8 images: refused before anything is created."""
    cluster.config.runtime_versions["v5e"] = "tpu-vm-base"
    job_id = cluster.launch(request("py38", stdlib_job.main, [str(out_dir)], workspace))
    info = run_to_end(cluster, job_id, JOB_TIMEOUT)
    assert info.status == JobStatus.FAILED
    assert "Python 3.8" in info.error_message and "runtime_version=tpu-ubuntu2204-base" in info.error_message
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0


def _serving_pid(host: dict) -> int | None:
    marker = Path(host["workdir"]) / "fray-tpu-agent" / "agent.serving"
    try:
        return int(marker.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_a_rebooted_host_and_a_crashed_agent_come_back_and_the_job_finishes(cluster, fake_gcp, workspace, out_dir,
                                                                             stdlib_job):
    """The startup-script exited 0 and the agent runs on as its own service; a reboot runs the
    script again and reuses the fetched bundle (no second download); a killed agent is
    restarted; the job then succeeds on the same slice."""
    before = fake_gcp.control.storage_counters()
    job_id = cluster.launch(request("reboot", stdlib_job.wait_for_go, [str(out_dir)], workspace))
    wait_for(lambda: all(t.status == JobStatus.RUNNING for t in cluster.poll(job_id).tasks),
             "every task to run", JOB_TIMEOUT)
    (node,) = [n["name"] for n in fake_gcp.control.leaks()["nodes"]]
    hosts = fake_gcp.control.hosts(node)
    assert all(h["exit_code"] == 0 for h in hosts), hosts  # the startup-script is done

    first = _serving_pid(hosts[1])
    fake_gcp.control.reboot_host(node, 1)
    wait_for(lambda: (pid := _serving_pid(hosts[1])) and pid != first, "the rebooted host's agent to serve", 60)
    rebooted_log = fake_gcp.control.host_log(node, 1)
    # The reboot emptied the VM's /run (the unpacked bundle): the kept archive is unpacked again.
    assert rebooted_log.count("phase bundle: fetched") == 1 and "phase bundle: kept from an earlier boot" in rebooted_log
    assert rebooted_log.count("phase deps: unpacked") == 2

    crashed = _serving_pid(hosts[2])
    os.kill(crashed, signal.SIGKILL)
    wait_for(lambda: (pid := _serving_pid(hosts[2])) and pid != crashed, "the crashed agent to serve again", 60)

    (out_dir / "go").write_text("")
    info = run_to_end(cluster, job_id, JOB_TIMEOUT)
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    after = fake_gcp.control.storage_counters()
    # The supervisor treats the rebooted host's lost attempt as a preemption and replaces the
    # slice: two downloads (the bundle, uv) per VM of each incarnation, none for the reboot itself
    # or the restarted agent.
    incarnations = sum("READY 4/4 endpoints" in line for line in progress_lines(cluster, job_id))
    assert after["downloads"] - before["downloads"] == 2 * 4 * incarnations + environment_downloads(cluster, job_id), (
        before, after, incarnations)
