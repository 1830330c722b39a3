"""The emulated VMs of READY nodes: a loopback IP, a working directory, a metadata server and the
node's startup-script running as its own process group, per VM.

Every process a host starts inherits ``FRAY_TPU_EMULATOR_HOST_TOKEN``; killing or freezing a host
signals its process group AND every process carrying its token, so processes that moved to
their own session (an agent's per-attempt process group) end with the host too.

Each VM also has its own ``/run``, a tmpfs as on a real VM: a directory in ``/dev/shm`` (when
this machine has one with room for the node; else on disk) that a reboot empties and the VM's
deletion removes. A run directory whose emulator process died is removed when the next emulator
starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from fray_tpu import contract
from fray_tpu.emulator.images import DEFAULT_PROFILE, INHERIT_CONTROLLER, ImageStore, check_profile, profile_for_runtime, script_environment
from fray_tpu.emulator.metadata import HostMetadata, MetadataServer
from fray_tpu.emulator.nat import NatForward
from fray_tpu.emulator.state import HostBoot
from fray_tpu.topology import get_tpu_topology

LOG = logging.getLogger(__name__)
TOKEN_ENV = "FRAY_TPU_EMULATOR_HOST_TOKEN"
STARTUP_SCRIPT_FILE = "startup-script.sh"
STARTUP_LOG_FILE = "startup-script.log"
PROCESS_EXIT_TIMEOUT = 10.0
_KILL_ROUNDS = 3
SHARED_MEMORY = Path("/dev/shm")
# What one VM's /run may hold (the unpacked host bundle is ~90 MB), and what shared memory keeps
# free for everything else: a node whose VMs would cross that boots with its /run on disk, so a
# 256-host emulation cannot fill this machine's memory.
RUN_DIR_BUDGET_BYTES = 128 << 20
SHARED_MEMORY_RESERVE_BYTES = 2 << 30
_RUN_ROOT = re.compile(r"^fray-tpu-emulator-(\d+)-[0-9a-f]+$")


@dataclass
class Host:
    node_name: str
    node_id: str
    uid: int
    worker: int
    ip: str
    workdir: Path
    run_dir: Path  # the VM's /run (a tmpfs)
    token: str
    metadata: HostMetadata
    image: str = "ubuntu-22.04"
    script: str | None = None
    server: MetadataServer | None = None
    external_ip: str = ""  # access_config.external_ip: NAT'd to ``ip``, on no interface of the VM
    nat: NatForward | None = None
    process: subprocess.Popen | None = None
    frozen: bool = False
    stopped: bool = False

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.stopped and self.process.poll() is None

    def describe(self) -> dict:
        return {
            "node": self.node_name,
            "worker": self.worker,
            "ip": self.ip,
            "external_ip": self.external_ip or None,
            "metadata_endpoint": self.server.address if self.server else None,
            "pid": self.process.pid if self.process else None,
            "workdir": str(self.workdir),
            "log": str(self.workdir / STARTUP_LOG_FILE),
            "alive": self.alive,
            "image": self.image,
            "frozen": self.frozen,
            "preempted": self.metadata.preempted,
            "exit_code": self.process.poll() if self.process else None,
        }


def _bounds(shape: str, chips_per_vm: int) -> tuple[str, str]:
    """(CHIPS_PER_HOST_BOUNDS, HOST_BOUNDS) as tpu-env writes them."""
    dims = [int(d) for d in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    per_host = {1: [1, 1, 1], 4: [2, 2, 1], 8: [2, 4, 1]}.get(chips_per_vm, [chips_per_vm, 1, 1])
    hosts = [max(1, d // p) for d, p in zip(dims, per_host)]
    return ",".join(map(str, per_host)), ",".join(map(str, hosts))


def _tpu_env(boot: HostBoot, worker: int) -> str:
    shape = get_tpu_topology(boot.accelerator_type)
    chips_per_host, host_bounds = _bounds(shape.topology, shape.chips_per_vm)
    values = {
        "ACCELERATOR_TYPE": boot.accelerator_type,
        "CHIPS_PER_HOST_BOUNDS": chips_per_host,
        "CONSUMER_PROJECT_ID": boot.project,
        "CONSUMER_PROJECT_NUMBER": str(boot.project_number),
        "HOST_BOUNDS": host_bounds,
        "NODE_ID": boot.node_id,
        "RUNTIME_VERSION": boot.runtime_version,
        "TOPOLOGY": shape.topology,
        "TYPE": shape.generation.upper(),
        "WORKER_ID": str(worker),
        "ZONE": boot.zone,
    }
    return "".join(f"{key}: '{value}'\n" for key, value in values.items())


def _hostname(boot: HostBoot, worker: int) -> str:
    return f"t1v-n-{boot.uid:08x}-w-{worker}"


def _host_metadata(boot: HostBoot, worker: int) -> HostMetadata:
    if boot.hostname_endpoints:
        endpoints = ",".join(_hostname(boot, i) for i in range(len(boot.ips)))
    else:
        endpoints = ",".join(f"{_hostname(boot, i)}:{boot.uid * 1000 + i}:{ip}" for i, ip in enumerate(boot.ips))
    attributes = {
        **boot.metadata,
        contract.ATTR_ACCELERATOR_TYPE: boot.accelerator_type,
        contract.ATTR_WORKER_NUMBER: str(worker),
        contract.ATTR_WORKER_ENDPOINTS: endpoints,
        contract.ATTR_TPU_ENV: _tpu_env(boot, worker),
    }
    hostname = _hostname(boot, worker)
    interface = {"ip": boot.ips[worker], "network": f"projects/{boot.project_number}/networks/default"}
    if boot.external_ips:
        interface["access-configs"] = {"0": {"external-ip": boot.external_ips[worker], "type": "ONE_TO_ONE_NAT"}}
    instance = {
        "name": hostname,
        "hostname": f"{hostname}.{boot.zone}.c.{boot.project}.internal",
        "id": str(boot.uid * 1000 + worker),
        "zone": f"projects/{boot.project_number}/zones/{boot.zone}",
        "machine-type": f"projects/{boot.project_number}/machineTypes/ct-emulated",
        "network-interfaces": {"0": interface},
        "service-account": boot.service_account,
    }
    project = {"project-id": boot.project, "numeric-project-id": str(boot.project_number)}
    return HostMetadata(attributes, instance, project)


def _processes_with_tokens(tokens: set[str]) -> list[int]:
    """Pids of live processes whose environment carries one of ``tokens``."""
    wanted = {f"{TOKEN_ENV}={token}".encode() for token in tokens}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(variables):
            found.append(int(entry.name))
    return found


def _signal_hosts(hosts: list[Host], signum: int) -> None:
    """Signal each host's process group and every process carrying a host's token."""
    for host in hosts:
        if host.process is not None and host.process.poll() is None:
            try:
                os.killpg(host.process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
    tokens = {host.token for host in hosts}
    for _ in range(_KILL_ROUNDS if signum == signal.SIGKILL else 1):
        pids = _processes_with_tokens(tokens)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def _shared_run_root(instance_id: str) -> Path | None:
    """Where this emulator's VMs keep their /run in shared memory, if this machine has it. Run
    roots of emulators that are gone are removed first."""
    if not (SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK)):
        return None
    for entry in SHARED_MEMORY.iterdir():
        match = _RUN_ROOT.match(entry.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(entry, ignore_errors=True)
    return SHARED_MEMORY / f"fray-tpu-emulator-{os.getpid()}-{instance_id}"


def _available_memory() -> int:
    """MemAvailable: shared memory is RAM that the hosts' own processes need too."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _kill_hosts(hosts: list[Host], stop_metadata: bool) -> None:
    if not hosts:
        return
    _signal_hosts(hosts, signal.SIGKILL)
    for host in hosts:
        if host.process is not None:
            try:
                host.process.wait(timeout=PROCESS_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                LOG.warning("host %s worker %d did not exit after SIGKILL", host.node_name, host.worker)
        host.frozen = False
        # The VM is off: its tmpfs is gone (a rebooted VM starts with an empty one).
        shutil.rmtree(host.run_dir, ignore_errors=True)
        if stop_metadata:
            host.stopped = True
            if host.server is not None:
                host.server.close()
            if host.nat is not None:
                host.nat.close()


class HostRuntime:
    """Boots, signals and reports the emulated VMs. Thread-safe."""

    def __init__(self, root: Path, instance_id: str):
        self.root = root
        self._instance_id = instance_id
        self._lock = threading.Lock()
        self._hosts: dict[int, list[Host]] = {}
        self._latest_uid: dict[str, int] = {}
        self.images = ImageStore(root / "images")
        self.images.prebuild(DEFAULT_PROFILE)
        self._image_override: str | None = None
        self._shared_run_root = _shared_run_root(instance_id)
        self._disk_run_root = root / "run"

    def _run_root_for(self, vms: int) -> Path:
        """Shared memory while it (and this machine's available memory) has room for ``vms`` more
        VMs beside the ones living there (counted at their budget, filled or not), else disk."""
        if self._shared_run_root is None:
            return self._disk_run_root
        with self._lock:
            living = sum(1 for node_hosts in self._hosts.values() for host in node_hosts
                         if not host.stopped and host.run_dir.is_relative_to(self._shared_run_root))
        free = min(shutil.disk_usage(SHARED_MEMORY).free, _available_memory())
        if free - (living + vms) * RUN_DIR_BUDGET_BYTES >= SHARED_MEMORY_RESERVE_BYTES:
            return self._shared_run_root
        return self._disk_run_root

    def set_image(self, profile: str | None) -> None:
        """Boot every later node from ``profile`` whatever its runtime version (None: by version)."""
        if profile is not None:
            check_profile(profile)
        self._image_override = profile

    def boot(self, boot: HostBoot) -> None:
        node_dir = self.root / boot.zone / f"{boot.node_id}-{boot.uid}"
        run_root = self._run_root_for(len(boot.ips))
        hosts = [
            Host(
                node_name=boot.name,
                node_id=boot.node_id,
                uid=boot.uid,
                worker=worker,
                ip=ip,
                workdir=node_dir / f"worker-{worker}",
                run_dir=run_root / f"{boot.node_id}-{boot.uid}" / f"worker-{worker}",
                token=f"{self._instance_id}-{boot.uid}-{worker}",
                metadata=_host_metadata(boot, worker),
                external_ip=boot.external_ips[worker] if boot.external_ips else "",
            )
            for worker, ip in enumerate(boot.ips)
        ]
        with self._lock:
            self._hosts[boot.uid] = hosts
            self._latest_uid[boot.name] = boot.uid
        image = self._image_override or profile_for_runtime(boot.runtime_version)
        script = boot.metadata.get(contract.ATTR_STARTUP_SCRIPT)
        for host in hosts:
            host.image = image
            host.script = script
            host.workdir.mkdir(parents=True, exist_ok=True)
            (host.workdir / "tmp").mkdir(exist_ok=True)
            host.run_dir.mkdir(parents=True, exist_ok=True)
            host.server = MetadataServer(host.ip, host.metadata)
            if host.external_ip:
                host.nat = NatForward(host.external_ip, host.ip, (boot.agent_port, *contract.ACTOR_PORTS))
            if script is not None:
                host.process = self._start_script(host, script)

    def reboot(self, uid: int, worker: int) -> None:
        """Reboot one VM: every process ends, the metadata server (and the guest attributes it
        holds) and the disk stay, and the startup-script runs again."""
        host = self._host(uid, worker)
        if host.stopped:
            raise ValueError(f"worker {worker} of node uid {uid} is gone; it cannot reboot")
        _kill_hosts([host], stop_metadata=False)
        host.run_dir.mkdir(parents=True, exist_ok=True)
        if host.script is not None:
            host.process = self._start_script(host, host.script)

    def _start_script(self, host: Host, script: str) -> subprocess.Popen:
        # Google's runner writes the script to a temporary file and runs it with /bin/bash.
        fd, script_path = tempfile.mkstemp(prefix="startup-script-", suffix=".sh", dir=host.workdir / "tmp")
        with os.fdopen(fd, "w") as f:
            f.write(script)
        (host.workdir / STARTUP_SCRIPT_FILE).write_text(script)
        bin_dir = None if host.image == INHERIT_CONTROLLER else self.images.bin_dir(host.image)
        env = script_environment(bin_dir, {
            "GCE_METADATA_HOST": host.server.address,
            "GCE_METADATA_IP": host.server.address,
            contract.EMULATED_HOST_ENV: "1",
            contract.HOST_IP_ENV: host.ip,
            contract.HOST_DIR_ENV: str(host.workdir),
            contract.HOST_RUN_DIR_ENV: str(host.run_dir),
            "TMPDIR": str(host.workdir / "tmp"),
            TOKEN_ENV: host.token,
        })
        with open(host.workdir / STARTUP_LOG_FILE, "ab") as log:
            return subprocess.Popen(
                ["/bin/bash", script_path],
                cwd=host.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _node_hosts(self, uid: int) -> list[Host]:
        with self._lock:
            return list(self._hosts.get(uid, []))

    def _host(self, uid: int, worker: int) -> Host:
        hosts = self._node_hosts(uid)
        if not 0 <= worker < len(hosts):
            raise ValueError(f"worker {worker} does not exist; the node has workers 0..{len(hosts) - 1}")
        return hosts[worker]

    def uid_of(self, node: str) -> int:
        """The latest incarnation of a node, by full name or node id."""
        with self._lock:
            if node in self._latest_uid:
                return self._latest_uid[node]
            matches = {uid for name, uid in self._latest_uid.items() if name.rsplit("/", 1)[-1] == node}
        if len(matches) != 1:
            raise ValueError(f"no booted node named {node!r}")
        return matches.pop()

    def set_preempted(self, uid: int, worker: int | None, value: bool) -> None:
        hosts = self._node_hosts(uid) if worker is None else [self._host(uid, worker)]
        for host in hosts:
            host.metadata.set_preempted(value)

    def kill(self, uid: int, worker: int | None = None, stop_metadata: bool = True) -> None:
        """SIGKILL the hosts' processes; ending the VM (``stop_metadata``) also stops its metadata server."""
        hosts = self._node_hosts(uid) if worker is None else [self._host(uid, worker)]
        _kill_hosts([host for host in hosts if not host.stopped], stop_metadata)

    def discard(self, uid: int) -> None:
        """A deleted node's disks go, as on Google (a JAX job environment is half a GB per host),
        but for the serial console's and the agent's logs, which stay readable for diagnosis."""
        for host in self._node_hosts(uid):
            for path in host.workdir.iterdir() if host.workdir.exists() else ():
                if path.name == STARTUP_LOG_FILE:
                    continue
                if path.name == contract.EMULATED_STATE_SUBDIR and path.is_dir():
                    for inner in path.iterdir():
                        if inner.name != contract.AGENT_LOG_NAME:
                            _remove(inner)
                    continue
                _remove(path)

    def freeze(self, uid: int, worker: int) -> None:
        host = self._host(uid, worker)
        _signal_hosts([host], signal.SIGSTOP)
        host.frozen = True

    def thaw(self, uid: int, worker: int) -> None:
        host = self._host(uid, worker)
        _signal_hosts([host], signal.SIGCONT)
        host.frozen = False

    def describe(self, uid: int) -> list[dict]:
        return [host.describe() for host in self._node_hosts(uid)]

    def log(self, uid: int, worker: int) -> str:
        path = self._host(uid, worker).workdir / STARTUP_LOG_FILE
        return path.read_text(errors="replace") if path.exists() else ""

    def agent_log(self, uid: int, worker: int) -> str:
        """The agent service's own log on the VM (not the serial console)."""
        path = self._host(uid, worker).workdir / contract.EMULATED_STATE_SUBDIR / contract.AGENT_LOG_NAME
        return path.read_text(errors="replace") if path.exists() else ""

    def connections(self, uid: int) -> list[dict[str, int]]:
        """Per VM, the connections its external address's NAT carried, by ``external_ip:port``
        (empty: no external IP, or nothing dialled it)."""
        return [host.nat.accepted if host.nat else {} for host in self._node_hosts(uid)]

    def guest_attributes(self, uid: int) -> list[dict[str, dict[str, str]]]:
        return [host.metadata.guest_attributes() for host in self._node_hosts(uid)]

    def stop_all(self) -> None:
        with self._lock:
            hosts = [host for node_hosts in self._hosts.values() for host in node_hosts if not host.stopped]
        _kill_hosts(hosts, stop_metadata=True)
        for run_root in (self._shared_run_root, self._disk_run_root):
            if run_root is not None:
                shutil.rmtree(run_root, ignore_errors=True)
