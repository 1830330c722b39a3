"""Security of the task channel and of the controller's records (issue 5, item 6).

Agent-level cases use real agent processes on loopback IPs (tests/worker_host/): a
missing, wrong or other job's secret, plain text instead of TLS, an oversized message and a
malformed pickle are each rejected cleanly, and the agent's log never holds a secret. The
end-to-end case runs a TPU job on the emulator and scans everything captured (controller logs,
JobInfo, job output, the journal's database files, the hosts' logs, the job's own environment)
for the job's secret, which lives only under its controller's ``secrets/`` (mode 0600).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import grpc
import pytest
from fake_gcp import wait_for

from fray_tpu import tls
from fray_tpu.channel import MAX_MESSAGE_BYTES, AgentAuthError, AgentClient, AttemptExit, AttemptSpec, Classification
from fray_tpu.cluster import TpuCluster
from fray_tpu.state.journals import controller_dir
from fray_tpu.config import TpuClusterConfig
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig
from fray_tpu.proto import worker_pb2, worker_pb2_grpc
from fray_tpu.worker import metadata as md
from fray_tpu.worker.auth import bearer_metadata
from worker_host import AGENT_PORT, collect, make_slice, teardown_slice

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EVENT_TIMEOUT = 30.0
JOB_TIMEOUT = 120.0
HOST_DEADLINE = 90.0
SECRETS_DIRNAME = "secrets"
SECRET_FILE = "channel-secret"
LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp


# -- helpers -----------------------------------------------------------------------------------


def run_one(client: AgentClient, spec: AttemptSpec) -> AttemptExit:
    client.prepare(spec)
    events = collect(client.start(spec.attempt_id), EVENT_TIMEOUT)
    assert isinstance(events[-1], AttemptExit), f"the last event is not the exit: {events[-3:]}"
    return events[-1]


def raw_stub(address: str, cert_pem: bytes, max_send: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Channel, worker_pb2_grpc.WorkerStub]:
    """A pinned TLS stub without AgentClient's own checks, to send what a hostile peer would."""
    channel = grpc.secure_channel(address, tls.channel_credentials(cert_pem),
                                  options=[*tls.channel_options(), ("grpc.max_send_message_length", max_send)])
    return channel, worker_pb2_grpc.WorkerStub(channel)


def wait_log_contains(host, text: str) -> str:
    return wait_for(lambda: text in host.log() and host.log(), f"{text!r} in the agent log of {host.ip}", EVENT_TIMEOUT)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """The (ip, port) of every TCP socket ``pid`` listens on, from /proc (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN_STATE and inode in inodes:
                hex_ip, hex_port = local.split(":")
                found.append((_proc_ip(hex_ip), int(hex_port, 16)))
    return found


def _proc_ip(hex_ip: str) -> str:
    if len(hex_ip) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_ip)[::-1])
    words = bytes.fromhex(hex_ip)
    ip = socket.inet_ntop(socket.AF_INET6, b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4)))
    # gRPC binds an IPv4 address as its IPv4-mapped IPv6 form: still that one address.
    return ip.removeprefix("::ffff:")


def connect_refused(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect((ip, port))
        except ConnectionRefusedError:
            return True
    return False


# -- agent-level rejections --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """Two one-host "jobs", each with its own secret and certificate."""
    root = tmp_path_factory.mktemp("two-jobs")
    first, second = make_slice(root / "a", 1), make_slice(root / "b", 1)
    first.wait_until_up()
    second.wait_until_up()
    yield first, second
    teardown_slice(first)
    teardown_slice(second)


def test_a_wrong_or_missing_secret_is_unauthenticated_and_neither_secret_is_logged(two_jobs):
    job, _ = two_jobs
    host = job.hosts[0]
    wrong_secret = "wrong-secret-" + tls.make_secret()
    spec = AttemptSpec.for_callable("attempt-wrong-secret", print, ("must not run",))

    with pytest.raises(AgentAuthError) as wrong:
        job.client(host, secret=wrong_secret).prepare(spec)
    assert wrong.value.code == "UNAUTHENTICATED"
    assert wrong_secret not in str(wrong.value) and job.secret not in str(wrong.value)

    channel, stub = raw_stub(host.address, job.material.cert_pem)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Describe(worker_pb2.DescribeRequest(), timeout=10)
    channel.close()
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert job.secret not in (missing.value.details() or "")

    log = wait_log_contains(host, "rejected")
    assert wrong_secret not in log and job.secret not in log
    assert job.client(host).describe().current_attempt is None, "the agent stops serving after a rejection"


def test_the_secret_of_another_job_is_unauthenticated(two_jobs):
    job, other_job = two_jobs
    host = job.hosts[0]
    # Pinned to this job's certificate (so TLS succeeds), presenting the other job's secret.
    intruder = AgentClient(host.address, secret=other_job.secret, pinned_cert_pem=job.material.cert_pem, timeout=10)
    try:
        with pytest.raises(AgentAuthError) as raised:
            intruder.prepare(AttemptSpec.for_callable("attempt-other-job", print, ("must not run",)))
        assert raised.value.code == "UNAUTHENTICATED"
        assert other_job.secret not in str(raised.value)
    finally:
        intruder.close()
    log = wait_log_contains(host, "rejected")
    assert other_job.secret not in log and job.secret not in log
    assert job.client(host).describe().current_attempt is None


def test_plain_text_is_refused_by_the_tls_port(two_jobs):
    job, _ = two_jobs
    host = job.hosts[0]
    plain = grpc.insecure_channel(host.address)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            worker_pb2_grpc.WorkerStub(plain).Describe(worker_pb2.DescribeRequest(), timeout=10,
                                                       metadata=bearer_metadata(job.secret))
    finally:
        plain.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert job.secret not in host.log()
    assert job.client(host).describe().healthy


def test_an_oversized_message_is_refused_before_it_is_read_and_the_agent_stays_up(two_jobs):
    job, _ = two_jobs
    host = job.hosts[0]
    oversized = AttemptSpec("attempt-oversized", pickled_callable=b"\0" * (MAX_MESSAGE_BYTES + 1024))

    # The controller's own client says what is wrong and how to fix it, without sending.
    with pytest.raises(ValueError, match="over the 67 MB limit; pass large data through the workspace"):
        job.client(host).prepare(oversized)

    # A peer that sends it anyway (with or without the secret) gets RESOURCE_EXHAUSTED.
    channel, stub = raw_stub(host.address, job.material.cert_pem, max_send=2 * MAX_MESSAGE_BYTES)
    try:
        for metadata in (bearer_metadata(job.secret), ()):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Prepare(oversized.to_proto(), timeout=60, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert job.secret not in (raised.value.details() or "")
    finally:
        channel.close()
    assert job.client(host).describe().current_attempt is None
    assert job.secret not in host.log()


def test_a_malformed_pickle_fails_its_attempt_with_a_clear_error_and_the_agent_serves_the_next(two_jobs):
    job, _ = two_jobs
    host = job.hosts[0]
    client = job.client(host)
    malformed = {
        "garbage": b"\x80\x05this is not a pickle",
        "truncated": cloudpickle.dumps((print, ("x",), {}))[:-7],
    }
    for case, payload in malformed.items():
        finished = run_one(client, AttemptSpec(f"attempt-malformed-{case}", pickled_callable=payload))
        assert finished.classification == Classification.USER_FAILURE, case
        assert "Error" in finished.stderr_tail and "pickle" in finished.stderr_tail.lower(), finished.stderr_tail
        assert job.secret not in finished.stderr_tail

    def answer() -> None:
        print("served after malformed pickles", flush=True)

    assert run_one(client, AttemptSpec.for_callable("attempt-after-malformed", answer)).code == 0
    assert job.secret not in host.log()


def test_the_agent_listens_only_on_the_address_its_vm_was_given(two_jobs):
    job, other_job = two_jobs
    host = job.hosts[0]
    assert listening_addresses(host.process.pid) == [(host.ip, AGENT_PORT)]
    unused_ip = host.ip.rsplit(".", 1)[0] + (".1" if not host.ip.endswith(".1") else ".250")
    assert unused_ip not in (host.ip, other_job.hosts[0].ip)
    for ip in ("127.0.0.1", unused_ip):
        assert connect_refused(ip, AGENT_PORT), f"something answers on {ip}:{AGENT_PORT}"


# -- end to end on the emulator: the secret never leaks --------------------------------------------


def fail_once_then_block(out_dir: str, go_file: str) -> None:
    """First attempt fails (an exception message travels back); the second records its
    environment and waits for the test to let it finish."""
    out = Path(out_dir)
    first = not (out / "failed-once").exists()
    if first:
        (out / "failed-once").write_text("1")
        raise RuntimeError("failing the first attempt on purpose")
    (out / "environ.json").write_text(json.dumps(dict(os.environ)))
    print("second attempt running", flush=True)
    deadline = time.monotonic() + HOST_DEADLINE
    pause = threading.Event()
    while not os.path.exists(go_file) and time.monotonic() < deadline:
        pause.wait(0.05)
    print("second attempt done", flush=True)


def files_outside_secrets(state_dir: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in state_dir.rglob("*")
            if p.is_file() and SECRETS_DIRNAME not in p.relative_to(state_dir).parts}


def test_a_tpu_job_end_to_end_never_exposes_its_secret(emulator_process, fake_gcp, tpu_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    state_dir = tmp_path / "state"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    go_file = tmp_path / "go"
    cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint,
                                          poll_interval=0.2, lease_period=30.0, state_dir=str(state_dir)))
    captured: list[str] = []
    try:
        job_id = cluster.launch(JobRequest(
            name="secret-scan",
            entrypoint=Entrypoint.from_callable(fail_once_then_block, args=[str(out_dir), str(go_file)]),
            resources=ResourceConfig.with_tpu("v5litepod-4"),
            environment=EnvironmentConfig.create(workspace=str(workspace)),
            max_retries_failure=1,
        ))
        secret_path = controller_dir(state_dir, cluster.controller_id) / SECRETS_DIRNAME / job_id / SECRET_FILE
        secret = wait_for(lambda: secret_path.exists() and secret_path.read_text(), f"{secret_path} to exist",
                          JOB_TIMEOUT)
        assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret_path.parent.stat().st_mode) == 0o700

        wait_for(lambda: (out_dir / "environ.json").exists(), "the second attempt to record its environment",
                 JOB_TIMEOUT)
        [node] = wait_for(lambda: [n for n in fake_gcp.control.leaks()["nodes"] if n["state"] == "READY"],
                          "the job's node to be READY", JOB_TIMEOUT)
        attributes = dict(tpu_client.get_node(name=node["name"], timeout=10).metadata)
        assert attributes[md.ATTR_SECRET_SHA256] == hashlib.sha256(secret.encode()).hexdigest()
        assert all(secret not in value for value in attributes.values()), "the secret is in the node metadata"
        # A probe with a wrong secret is rejected by the job's real agent and logged without it.
        [host] = fake_gcp.control.hosts(node["name"])
        probe_secret = "probe-" + tls.make_secret()
        guest = tpu_client.get_guest_attributes(request={"name": node["name"], "query_path": "fray-tpu/tls-cert"})
        cert = guest.guest_attributes[0].query_value.items[0].value.encode()
        probe = AgentClient(f"{host['ip']}:{attributes[md.ATTR_AGENT_PORT]}", secret=probe_secret,
                            pinned_cert_pem=cert, timeout=10)
        try:
            with pytest.raises(AgentAuthError) as rejected:
                probe.describe(retries=0)
        finally:
            probe.close()
        captured.append(str(rejected.value))
        host_log = wait_for(lambda: "rejected" in (text := fake_gcp.control.agent_log(node["name"], 0)) and text,
                            "the rejected probe in the host log", EVENT_TIMEOUT)
        assert probe_secret not in host_log

        captured.append(json.dumps(json.loads((out_dir / "environ.json").read_text())))
        # The journal mid-run: its WAL holds the latest writes before a checkpoint folds them in.
        journal_while_running = files_outside_secrets(state_dir)
        captured.append(repr(cluster.poll(job_id)))
        go_file.write_text("go")
        info = cluster.wait(job_id, timeout=JOB_TIMEOUT)
        captured.append(fake_gcp.control.agent_log(node["name"], 0))
        cluster.wait_released(job_id, timeout=JOB_TIMEOUT)
        assert info.status == JobStatus.SUCCEEDED, info
        assert cluster.job_counters(job_id).failures == 1
        captured.append(repr(info))
        captured.append(repr(cluster.list_jobs()))
        captured.append(repr(cluster.job_counters(job_id)))
        cluster.monitor(job_id)
    finally:
        cluster.shutdown(timeout=JOB_TIMEOUT)
    captured.append(caplog.text)
    captured.extend(record.getMessage() for record in caplog.records)

    assert "failing the first attempt on purpose" in caplog.text, "the scan did not see the job's output"
    assert any("second attempt done" in text for text in captured)
    for index, text in enumerate(captured):
        assert secret not in text, f"the secret appears in captured text #{index}"
    assert any(path.endswith("-wal") for path in journal_while_running), journal_while_running.keys()
    for when, files in (("while running", journal_while_running), ("at the end", files_outside_secrets(state_dir))):
        assert any(".sqlite" in Path(path).name for path in files), files.keys()
        for path, data in files.items():
            assert secret.encode() not in data, f"the secret appears in {path} {when}"
    assert not secret_path.exists(), "the job's secret outlived the job"
