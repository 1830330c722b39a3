"""Test hosts for the agent: one `python -m fray_tpu.worker` process per loopback IP, each with
its own small metadata server and working directory (what the emulator gives a VM, minus the
TPU API).
"""

from __future__ import annotations

import hashlib
import json
import http.server
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from fray_tpu import tls
from fray_tpu.channel import AgentClient
from fray_tpu.contract import RUNNER_SPARE_ARG
from fray_tpu.worker import metadata as md
from fray_tpu.worker import identity

HOST_MARKER_ENV = "FRAY_TPU_TEST_HOST"
AGENT_PORT = 8477
BOOT_SECONDS = 30.0


class FakeMetadata:
    """The GCE metadata tree of one VM over HTTP, with ETags and wait_for_change on `preempted`."""

    def __init__(self, ip: str, attributes: dict[str, str], instance_name: str):
        self.attributes = dict(attributes)
        self.instance_name = instance_name
        self._preempted = "FALSE"
        self._changed = threading.Condition()
        self.requests = 0
        self.guest_attributes: dict[str, str] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                path = urlsplit(self.path).path.removeprefix("/computeMetadata/v1/")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if self.headers.get("Metadata-Flavor") != "Google" or not path.startswith("instance/guest-attributes/"):
                    return self._send(403, "guest attributes only, with Metadata-Flavor: Google")
                owner.guest_attributes[path.removeprefix("instance/guest-attributes/")] = body
                self._send(200, "")

            def do_GET(self):
                owner.requests += 1
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "missing Metadata-Flavor: Google")
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                path = url.path.removeprefix("/computeMetadata/v1/")
                if path == md.PREEMPTED_PATH:
                    return self._send(200, *owner._preempted_value(query))
                if path == "instance/name":
                    return self._send(200, owner.instance_name)
                if path == md.ATTRIBUTES_DIR and query.get("recursive") == ["true"]:
                    return self._send(200, json.dumps(owner.attributes))
                if path.startswith("instance/attributes/"):
                    value = owner.attributes.get(path.removeprefix("instance/attributes/"))
                    if value is not None:
                        return self._send(200, value)
                self._send(404, "not found")

            def _send(self, status: int, body: str, etag: str | None = None):
                data = body.encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(data)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except ConnectionError:
                    pass  # an agent killed by the test while it long-polled

        self._server = http.server.ThreadingHTTPServer((ip, 0), Handler)
        self._server.daemon_threads = True
        self.address = f"{ip}:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True, name=f"metadata-{ip}").start()

    def _preempted_value(self, query) -> tuple[str, str]:
        def etag() -> str:
            return hashlib.sha1(self._preempted.encode()).hexdigest()[:12]

        if query.get("wait_for_change") == ["true"]:
            last = query.get("last_etag", [None])[0]
            wait = float(query.get("timeout_sec", ["60"])[0])
            with self._changed:
                self._changed.wait_for(lambda: etag() != last, timeout=wait)
        return self._preempted, etag()

    def set_preempted(self, value: str) -> None:
        with self._changed:
            self._preempted = value
            self._changed.notify_all()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def random_loopback_ips(count: int) -> list[str]:
    """Distinct 127.x.y.z addresses, unlikely to collide with other tests on this machine."""
    # The emulator allocates 127.A.0.x upwards: a high third octet keeps clear of it.
    base = f"127.{random.randint(16, 254)}.{random.randint(128, 255)}"
    fourth = random.sample(range(2, 250), count)
    return [f"{base}.{last}" for last in fourth]


@dataclass
class AgentHost:
    worker: int
    ip: str
    workdir: Path
    metadata: FakeMetadata
    marker: str
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{AGENT_PORT}"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "fray-tpu-agent"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start_agent(self) -> None:
        env = dict(os.environ)
        env.update({
            "GCE_METADATA_HOST": self.metadata.address,
            "GCE_METADATA_IP": self.metadata.address,
            "FRAY_TPU_EMULATED_HOST": "1",
            "FRAY_TPU_HOST_IP": self.ip,
            "FRAY_TPU_HOST_DIR": str(self.workdir),
            "TMPDIR": str(self.workdir / "tmp"),
            HOST_MARKER_ENV: self.marker,
            **self.extra_env,
        })
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fray_tpu.worker"], cwd=self.workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def kill_agent(self) -> None:
        """SIGKILL the agent alone (its attempt processes live on, as after a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def waiting_spare_runners(self) -> list[int]:
        """The agent's pre-started runners no attempt has claimed (they work in their own
        directory; a claimed one works in its attempt's, and counts as the attempt's process)."""
        spare_dir = self.state_dir / "spare"
        found = []
        for pid in processes_marked(self.marker):
            try:
                if (RUNNER_SPARE_ARG.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        and Path(os.readlink(f"/proc/{pid}/cwd")) == spare_dir):
                    found.append(pid)
            except OSError:
                continue
        return found


@dataclass
class AgentSlice:
    hosts: list[AgentHost]
    secret: str
    material: tls.TlsMaterial
    clients: list[AgentClient] = field(default_factory=list)

    def client(self, host: AgentHost, *, secret: str | None = None, timeout: float = 10.0) -> AgentClient:
        client = AgentClient(host.address, secret=self.secret if secret is None else secret,
                             pinned_cert_pem=self.material.cert_pem, timeout=timeout)
        self.clients.append(client)
        return client

    def wait_until_up(self) -> list[AgentClient]:
        clients = [self.client(host) for host in self.hosts]
        deadline = time.monotonic() + BOOT_SECONDS
        for host, client in zip(self.hosts, clients):
            try:
                client.wait_until_up(deadline)
            except Exception as error:
                raise AssertionError(f"agent {host.address} did not boot: {error}\n{host.log()}") from error
        return clients


def collect(stream, timeout: float) -> list:
    """Every event of an attempt's stream up to its exit (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    events = []
    for _ in range(1_000_000):
        try:
            events.append(stream.next_event(timeout=max(deadline - time.monotonic(), 0.01)))
        except StopIteration:
            return events
    raise AssertionError("more than a million events")


def processes_marked(marker: str) -> list[int]:
    wanted = f"{HOST_MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def seed_agent_tls(state_dir: Path, material: tls.TlsMaterial) -> None:
    """Give an agent the key it would have made on an earlier boot, so tests can pin one cert."""
    directory = state_dir / "tls"
    directory.mkdir(parents=True)
    (directory / identity.CERT_FILE).write_bytes(material.cert_pem)
    (directory / identity.KEY_FILE).write_bytes(material.key_pem)


def make_slice(root: Path, count: int, *, lease_seconds: float = 600, self_delete: bool = False,
               extra_attributes: dict[str, str] | None = None, extra_env: dict[str, str] | None = None) -> AgentSlice:
    secret = tls.make_secret()
    material = tls.make_job_tls()
    ips = random_loopback_ips(count)
    hosts = []
    for worker, ip in enumerate(ips):
        attributes = {
            md.ATTR_WORKER_NUMBER: str(worker),
            md.ATTR_WORKER_ENDPOINTS: ",".join(f"host{i}:uid:{a}" for i, a in enumerate(ips)),
            md.ATTR_ACCELERATOR_TYPE: "v5litepod-16" if count == 4 else "v5litepod-1",
            md.ATTR_SECRET_SHA256: tls.secret_sha256(secret),
            md.ATTR_NODE: "projects/test/locations/us-test1-a/nodes/test-node",
            md.ATTR_AGENT_PORT: str(AGENT_PORT),
            md.ATTR_LEASE_SECONDS: str(lease_seconds),
            md.ATTR_SELF_DELETE: "true" if self_delete else "false",
            md.ATTR_JOB: "test-job",
            md.ATTR_CONTROLLER: "test-controller",
            **(extra_attributes or {}),
        }
        workdir = root / f"host-{worker}"
        (workdir / "tmp").mkdir(parents=True)
        seed_agent_tls(workdir / "fray-tpu-agent", material)
        hosts.append(AgentHost(worker, ip, workdir, FakeMetadata(ip, attributes, "test-node"), uuid.uuid4().hex,
                               dict(extra_env or {})))
    for host in hosts:
        host.start_agent()
    return AgentSlice(hosts, secret, material)


def teardown_slice(test_slice: AgentSlice) -> None:
    for client in test_slice.clients:
        client.close()
    for host in test_slice.hosts:
        host.kill_agent()
        for pid in processes_marked(host.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        host.metadata.close()


@pytest.fixture
def one_host(tmp_path):
    test_slice = make_slice(tmp_path, 1)
    test_slice.wait_until_up()
    yield test_slice
    teardown_slice(test_slice)
