"""The warm pool end to end on the emulator (issue 14): a finished job's healthy slice is
cleaned and kept for the next job of its shape, handed over to that job's secret, and deleted
on expiry, on preemption, at shutdown, and by itself when its controller is SIGKILLed.

Every test builds its own controller and shuts it down before the ``fake_gcp`` leak check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from fake_gcp import process_alive, run_to_end, wait_for
from fake_gcp.host_jobs import wait_for_file, write_json

from fray_tpu import channel
from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.contract import GUEST_AGENT_ADDRESS, GUEST_NAMESPACE, GUEST_TLS_CERT, RUNNER_SPARE_ARG
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig
from fray_tpu.naming import LABEL_CONTROLLER, LABEL_JOB, label_value
from fray_tpu.supervisor.credentials import JobCredentials

cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT = 120.0
HOST_DEADLINE = 90.0
SHORT_LEASE_SECONDS = 8.0  # long enough for two CLI calls between the kill and the lapse
CLI_TIMEOUT = 60.0
SELF_DELETE_DEADLINE = 60.0
ONE_ROUND = "prepared and started in one call"


# -- callables that run on the hosts ---------------------------------------------------------------

def leave_a_daemon_and_block(out_dir: str, go_file: str) -> None:
    """Start a process in a session of its own (it tries to outlive the job), then wait for go."""
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    write_json(Path(out_dir) / f"daemon-{os.environ['FRAY_TASK_INDEX']}.json", daemon.pid)
    if not wait_for_file(go_file, HOST_DEADLINE):
        raise SystemExit(f"{go_file} never appeared")


def block_until(go_file: str) -> None:
    if not wait_for_file(go_file, HOST_DEADLINE):
        raise SystemExit(f"{go_file} never appeared")


def fail_first_attempt(marker: str) -> None:
    """Fail the first attempt (the marker does not exist yet), succeed the next."""
    if not os.path.exists(marker):
        Path(marker).write_text("")
        raise RuntimeError("failing the first attempt on purpose")


def succeed() -> None:
    print(f"task {os.environ['FRAY_TASK_INDEX']} ran", flush=True)


# -- helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def clusters(fake_gcp, emulator_process):
    """Controllers on the test's emulator, shut down before the leak check."""
    made: list[TpuCluster] = []

    def make(**overrides) -> TpuCluster:
        values = dict(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                      lease_period=30.0, keep_warm=60.0)
        values.update(overrides)
        cluster = TpuCluster(TpuClusterConfig(**values))
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.shutdown(timeout=120)


def request(name: str, fn, args, workspace: str, tpu_type: str = "v5litepod-4") -> JobRequest:
    return JobRequest(name=name, entrypoint=Entrypoint.from_callable(fn, args=list(args)),
                      resources=ResourceConfig.with_tpu(tpu_type),
                      environment=EnvironmentConfig.create(workspace=workspace))


def nodes(control, **labels: str) -> list[dict]:
    return [n for n in control.leaks()["nodes"]
            if all(n["labels"].get(k) == label_value(v) for k, v in labels.items())]




def cli(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FRAY_CLUSTER_SPEC"}
    done = subprocess.run([sys.executable, "-m", "fray_tpu.ops.cli", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, env=env)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def spare_runners(root: Path) -> list[int]:
    """Pids of the emulated hosts' pre-started runners (``runner --spare``, working under ``root``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and RUNNER_SPARE_ARG.encode() in (entry / "cmdline").read_bytes().split(b"\0")
                    and Path(os.readlink(entry / "cwd")).is_relative_to(root) and process_alive(int(entry.name))):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def warm_names(cluster: TpuCluster) -> list[str]:
    return [w["name"] for w in cluster.warm_slices()]


# -- reuse -----------------------------------------------------------------------------------------

def published_certs(tpu_client, name: str) -> dict[str, bytes]:
    """Each worker's agent address -> the certificate it published in its guest attributes."""
    def values(key: str) -> list[str]:
        response = tpu_client.get_guest_attributes(request={"name": name, "query_path": f"{GUEST_NAMESPACE}/{key}"})
        return [entry.query_value.items[0].value for entry in response.guest_attributes]

    return {address: cert.encode() for address, cert in zip(values(GUEST_AGENT_ADDRESS), values(GUEST_TLS_CERT))}


def test_second_job_takes_the_warm_slices_and_only_its_own_secret_works(clusters, fake_gcp, tpu_client, workspace,
                                                                       tmp_path):
    """A 4-host job's slice goes warm (cleaned: the daemon its job left is gone); the next job of
    the shape runs on it with no create call, pinning each host to the certificate that host
    published when the slice booted; the agents refuse the first job's secret and accept the
    second's; its cost says it started warm; no certificate or key is in the node's metadata."""
    cluster = clusters()
    go = tmp_path / "go"
    first = cluster.launch(request("first", leave_a_daemon_and_block, [str(tmp_path), str(go)], workspace,
                                   tpu_type="v5litepod-16"))
    daemons = wait_for(lambda: len(list(tmp_path.glob("daemon-*.json"))) == 4
                       and [json.loads(p.read_text()) for p in tmp_path.glob("daemon-*.json")],
                       "the first job's 4 daemons", JOB_TIMEOUT)
    first_secret = JobCredentials.stored(cluster.journal(), first).secret
    go.write_text("")
    assert run_to_end(cluster, first, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert len(warm_names(cluster)) == 1
    wait_for(lambda: not any(process_alive(pid) for pid in daemons), "the first job's daemons to be cleaned away", 30)
    (warm_node,) = nodes(fake_gcp.control, **{LABEL_JOB: first})

    fake_gcp.control.reset_counters()
    go.unlink()
    second = cluster.launch(request("second", block_until, [str(go)], workspace, tpu_type="v5litepod-16"))
    wait_for(lambda: all(t.status == JobStatus.RUNNING for t in cluster.poll(second).tasks),
             "every task of the second job running", JOB_TIMEOUT)
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0
    assert warm_names(cluster) == []
    (row,) = cluster.journal().resources(job_id=second)
    assert warm_node["name"].rsplit("/", 1)[-1] == row.name

    second_credentials = JobCredentials.stored(cluster.journal(), second)
    pinned = second_credentials.load_slice_certs(cluster.journal(), second, row.name)
    assert pinned == published_certs(tpu_client, warm_node["name"])
    assert sorted(pinned) == sorted(row.endpoints)
    metadata = dict(tpu_client.get_node(name=warm_node["name"], timeout=10).metadata)
    assert not any("PRIVATE KEY" in v or "CERTIFICATE" in v for v in metadata.values())
    cert = pinned[row.endpoints[0]]
    address = f"{row.endpoints[0]}:{cluster.config.agent_port}"
    with channel.AgentClient(address, secret=first_secret, pinned_cert_pem=cert) as stale:
        with pytest.raises(channel.AgentAuthError):
            stale.describe(retries=0)
    with channel.AgentClient(address, secret=second_credentials.secret, pinned_cert_pem=cert) as current:
        assert current.describe().current_attempt.attempt_id.startswith(second)

    go.write_text("")
    assert run_to_end(cluster, second, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert cluster.job_cost(second).started_warm == 1
    assert cluster.job_cost(first).started_warm == 0
    # The same environment on every warm host: the second job's Prepare started it (one round);
    # the first job, on a new slice, started once every host was prepared.
    starts = {job: [line for line in cluster.journal().output(job)[0] if "attempt 1: starting on" in line]
              for job in (first, second)}
    assert [ONE_ROUND in line for line in starts[first] + starts[second]] == [False, True], starts


def record_process(out_file: str) -> None:
    """Write the job's variables as it sees them and the ones its process was started with."""
    started_with = dict(item.split("=", 1) for item in
                        Path("/proc/self/environ").read_bytes().decode().split("\0") if "=" in item)
    write_json(Path(out_file), {"env": dict(os.environ), "started_with": started_with,
                                "jax_loaded": "jax" in sys.modules})


def test_a_job_on_a_warm_slice_runs_in_the_pre_started_runner_with_its_own_environment(clusters, workspace,
                                                                                        tmp_path):
    """The second job of the shape runs in the runner its warm host started ahead (started
    before the job existed: none of its variables at exec), with the second job's variables and
    none of the first's, JAX not imported; a job that needs other startup variables
    (PYTHONHASHSEED) starts a runner of its own."""
    cluster = clusters()

    def run(name: str, env: dict[str, str]) -> dict:
        out = tmp_path / f"{name}.json"
        job = cluster.launch(JobRequest(name=name, entrypoint=Entrypoint.from_callable(record_process, args=[str(out)]),
                                        resources=ResourceConfig.with_tpu("v5litepod-4"),
                                        environment=EnvironmentConfig.create(workspace=workspace, env_vars=env)))
        assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
        seen = json.loads(out.read_text())
        assert seen["env"]["FRAY_TPU_JOB_ID"] == job
        return seen

    first = run("first", {"FIRST_JOB_ONLY": "1"})
    assert "FRAY_TPU_JOB_ID" in first["started_with"]  # a cold slice: the runner started with the job
    second = run("second", {"SECOND_JOB_ONLY": "2"})
    assert "FRAY_TPU_JOB_ID" not in second["started_with"]
    assert second["env"]["SECOND_JOB_ONLY"] == "2" and "FIRST_JOB_ONLY" not in second["env"]
    assert not second["jax_loaded"]
    hashed = run("hashed", {"PYTHONHASHSEED": "5"})
    assert hashed["started_with"]["PYTHONHASHSEED"] == "5"
    assert "FRAY_TPU_JOB_ID" in hashed["started_with"]


def test_a_warm_job_starts_in_its_prepare_only_where_its_environment_is_known_to_be_there(clusters, fake_gcp,
                                                                                         workspace):
    """A job whose environment (packages, Python, index, workspace) equals the one the warm
    slice's last job prepared is started by its Prepare; after the workspace changed, the next
    job on the same warm slice prepares first and starts after (no create call either way); a
    retry on the slice of the last attempt starts in its Prepare again."""
    cluster = clusters()

    def start_line(name: str) -> str:
        job = cluster.launch(request(name, succeed, [], workspace))
        assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
        (line,) = [line for line in cluster.journal().output(job)[0] if "attempt 1: starting on" in line]
        return line

    assert ONE_ROUND not in start_line("created")
    fake_gcp.control.reset_counters()
    assert ONE_ROUND in start_line("same-environment")
    (Path(workspace) / "README").write_text("changed: another workspace digest\n")
    assert ONE_ROUND not in start_line("changed-workspace")
    assert ONE_ROUND in start_line("same-again")
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0

    retried = JobRequest(name="retried", entrypoint=Entrypoint.from_callable(fail_first_attempt, args=[str(
        Path(workspace).parent / "retried-marker")]), resources=ResourceConfig.with_tpu("v5litepod-4"),
                         environment=EnvironmentConfig.create(workspace=workspace), max_retries_failure=1)
    job = cluster.launch(retried)
    assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    lines = cluster.journal().output(job)[0]
    assert [ONE_ROUND in line for line in lines if "starting on" in line] == [True, True], lines


def test_a_job_of_another_shape_creates_its_own_slice(clusters, fake_gcp, workspace):
    """A warm v5litepod-4 is not given to a v5litepod-8 job, nor to an on-demand v5litepod-4 job."""
    cluster = clusters()
    first = cluster.launch(request("small", succeed, [], workspace))
    assert run_to_end(cluster, first, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    [warm] = warm_names(cluster)

    fake_gcp.control.reset_counters()
    bigger = cluster.launch(request("bigger", succeed, [], workspace, tpu_type="v5litepod-8"))
    on_demand_request = request("on-demand", succeed, [], workspace)
    on_demand_request.resources.preemptible = False
    on_demand = cluster.launch(on_demand_request)
    assert run_to_end(cluster, bigger, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert run_to_end(cluster, on_demand, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert fake_gcp.control.counters()["CreateNode"] == 2
    assert warm in warm_names(cluster)
    assert warm not in {r.name for job in (bigger, on_demand) for r in cluster.journal().resources(job_id=job)}


# -- leaving the pool ----------------------------------------------------------------------------

def test_keep_warm_expiry_deletes_the_slice(clusters, fake_gcp, workspace):
    """An idle warm slice is deleted (one delete call) once keep_warm has passed, and its host's
    pre-started runner with it; its idle time is the pool's waste, not the job's cost."""
    cluster = clusters(keep_warm=2.0)
    launched = time.time()
    job = cluster.launch(request("brief", succeed, [], workspace))
    assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    released = time.time()
    assert len(warm_names(cluster)) == 1
    hosts_root = fake_gcp.process.root / "hosts"
    wait_for(lambda: spare_runners(hosts_root), "the warm host's pre-started runner", 30)
    wait_for(lambda: not nodes(fake_gcp.control, **{LABEL_JOB: job}), "the warm slice to be deleted on expiry", 30)
    wait_for(lambda: not spare_runners(hosts_root), "the deleted slice's pre-started runner to be gone", 30)
    assert warm_names(cluster) == []
    assert fake_gcp.control.counters()["DeleteNode"] == 1
    wait_for(lambda: cluster.pool_waste().slices_warm_now == 0, "the warm period to be closed", 30)
    waste = cluster.pool_waste()
    assert 4 * 2.0 / 3600 <= waste.chip_hours_idle < 4 * 30.0 / 3600  # 4 chips idle for keep_warm (2 s) and a bit
    # The job pays until it handed the slice over, not for the pool's idle time after.
    assert cluster.job_cost(job).chip_hours_provisioned <= 4 * (released - launched) / 3600


def test_keep_warm_zero_deletes_at_the_end_of_the_job(clusters, fake_gcp, workspace):
    """keep_warm=0 turns the pool off: the slice is gone when the job is released."""
    cluster = clusters(keep_warm=0)
    job = cluster.launch(request("cold", succeed, [], workspace))
    assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert warm_names(cluster) == []
    assert not nodes(fake_gcp.control, **{LABEL_JOB: job})


def test_a_warm_slice_preempted_while_idle_leaves_the_pool(clusters, fake_gcp, workspace):
    """The pool notices the preemption (the node's state), deletes the slice (preempted nodes
    hold quota), and the next job of the shape creates a new slice."""
    cluster = clusters()
    first = cluster.launch(request("first", succeed, [], workspace))
    assert run_to_end(cluster, first, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    [warm] = warm_names(cluster)
    fake_gcp.control.preempt_node(warm)
    wait_for(lambda: warm_names(cluster) == [] and not nodes(fake_gcp.control, **{LABEL_JOB: first}),
             "the preempted warm slice to leave the pool and be deleted", 30)

    fake_gcp.control.reset_counters()
    second = cluster.launch(request("second", succeed, [], workspace))
    assert run_to_end(cluster, second, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert fake_gcp.control.counters()["CreateNode"] == 1


def test_a_warm_slice_preempted_just_before_a_job_takes_it_is_replaced_in_the_same_attempt(clusters, fake_gcp,
                                                                                           workspace):
    """Preempted after the pool's last look (its watcher sleeps for most of a long lease): the
    job that takes it finds out in the Prepare that would hand it over (the hosts are gone, and
    the cloud reports the node preempted), deletes it and creates a new slice within its first
    attempt: no preemption is counted (the budget is 0) and the job succeeds."""
    cluster = clusters(lease_period=600.0, liveness_deadline=600.0)
    first = cluster.launch(request("first", succeed, [], workspace))
    assert run_to_end(cluster, first, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    [warm] = warm_names(cluster)
    fake_gcp.control.preempt_node(warm)
    fake_gcp.control.reset_counters()
    second_request = request("second", succeed, [], workspace)
    second_request.max_retries_preemption = 0
    second = cluster.launch(second_request)
    assert run_to_end(cluster, second, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    counters = cluster.job_counters(second)
    assert (counters.attempts, counters.preemptions) == (1, 0)
    assert fake_gcp.control.counters()["CreateNode"] == 1
    progress, _ = cluster.journal().output(second)
    assert any(f"warm slice {warm} not taken" in line for line in progress), progress
    assert cluster.job_output(second) == ("[slice-0/worker-0] task 0 ran",)  # once, on the new slice
    wait_for(lambda: not nodes(fake_gcp.control, **{LABEL_JOB: first}), "the preempted slice to be deleted", 30)


def test_shutdown_deletes_the_pool(clusters, fake_gcp, workspace):
    """shutdown() (the exit policy) deletes warm slices before it returns."""
    cluster = clusters()
    job = cluster.launch(request("brief", succeed, [], workspace))
    assert run_to_end(cluster, job, JOB_TIMEOUT).status == JobStatus.SUCCEEDED
    assert len(warm_names(cluster)) == 1
    cluster.shutdown(timeout=120)
    assert not nodes(fake_gcp.control, **{LABEL_CONTROLLER: cluster.controller_id})


DRIVER_SOURCE = '''
import json, sys, time
from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig

args = json.loads(sys.argv[1])
cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=args["endpoint"], poll_interval=0.2,
                                      lease_period=args["lease_period"], keep_warm=3600, state_dir=args["state_dir"]))
job = cluster.launch(JobRequest(name="brief", entrypoint=Entrypoint.from_callable(print, args=["ran"]),
                                resources=ResourceConfig.with_tpu("v5litepod-4"),
                                environment=EnvironmentConfig.create(workspace=args["workspace"])))
deadline = time.monotonic() + 120
while not cluster.warm_slices():
    if time.monotonic() > deadline:
        raise SystemExit(f"no warm slice after 120s: {cluster.poll(job)}")
    time.sleep(0.1)
name = cluster.warm_slices()[0]["name"]
# Idle for 1.5 lease periods: only the pool's renewals keep the slice alive that long.
held_until = time.monotonic() + 1.5 * args["lease_period"]
while time.monotonic() < held_until:
    if [w["name"] for w in cluster.warm_slices()] != [name]:
        raise SystemExit(f"warm slice {name} left the pool while its controller lived")
    time.sleep(0.1)
print("HELD " + name, flush=True)
time.sleep(600)  # the test SIGKILLs us long before this
'''


def test_a_sigkilled_controllers_warm_slice_deletes_itself(fake_gcp, workspace, tmp_path):
    """A warm slice outlives three lease periods while its controller renews it, and deletes
    itself once the controller is SIGKILLed and the lease lapses."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SOURCE)
    args = dict(endpoint=fake_gcp.endpoint, lease_period=SHORT_LEASE_SECONDS, state_dir=str(tmp_path / "state"),
                workspace=workspace)
    with open(tmp_path / "driver.stderr", "wb") as stderr:
        driver = subprocess.Popen([sys.executable, str(script), json.dumps(args)], stdout=subprocess.PIPE,
                                  stderr=stderr, text=True)
    try:
        line = driver.stdout.readline()
        assert line.startswith("HELD "), (tmp_path / "driver.stderr").read_text()[-3000:]
        name = line.split()[1]
        assert any(n["name"].endswith("/" + name) for n in fake_gcp.control.leaks()["nodes"])
        spec = f"tpu?emulate=true&emulator_endpoint={fake_gcp.endpoint}&state_dir={tmp_path / 'state'}"
        [shown] = [s for s in cli("slices", "--json", "--spec", spec)["slices"] if s["name"] == name]
        assert shown["job"] == "(warm pool)" and shown["warm_idle_seconds"] > 0 and shown["warm_idle_usd"] > 0
        assert cli("gc", "--json", "--spec", spec)["orphans"] == []  # its controller lives: owned
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        killed_at = time.monotonic()
        orphans = cli("gc", "--json", "--spec", spec)["orphans"]
        assert [o["name"] for o in orphans] == [name]  # no one can reach it now
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    wait_for(lambda: not any(n["name"].endswith("/" + name) for n in fake_gcp.control.leaks()["nodes"]),
             f"warm slice {name} to delete itself after the lease lapsed", SELF_DELETE_DEADLINE)
    # The pool renewed the lease at most a third of a period before the kill.
    assert time.monotonic() - killed_at >= SHORT_LEASE_SECONDS * 2 / 3
