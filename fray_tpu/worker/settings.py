"""What the agent knows about itself: identity and the controller's settings from node metadata."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.contract import AGENT_STATE_DIR_ENV as STATE_DIR_ENV
from fray_tpu.contract import EMULATED_HOST_ENV as EMULATED_ENV
from fray_tpu.contract import EMULATED_STATE_SUBDIR, HOST_DIR_ENV, HOST_IP_ENV
from fray_tpu.worker import metadata as md
from fray_tpu.worker.identity import host_tls

DEFAULT_LEASE_SECONDS = 300.0
DEFAULT_TLS_LEAF_SECONDS = 30 * 86400.0
PRODUCTION_STATE_DIR = Path("/var/lib/fray-tpu")


@dataclass(frozen=True)
class AgentSettings:
    worker_number: int
    ip: str
    port: int
    accelerator_type: str
    node_name: str
    secret_sha256: str
    tls_cert_pem: bytes
    tls_key_pem: bytes
    lease_seconds: float
    first_lease_seconds: float  # from the agent's start to the controller's first renewal
    tls_leaf_seconds: float  # validity of each certificate the agent serves (renewed at a third left)
    self_delete: bool
    api_endpoint: str | None
    job: str
    controller: str
    state_dir: Path
    # The directory that plays the VM's "/" for per-host files (libtpu lockfile).
    host_dir: Path
    emulated: bool

    @property
    def libtpu_lockfile(self) -> Path:
        return self.host_dir / "tmp" / "libtpu_lockfile"


def _parse_bool(name: str, text: str | None, default: bool) -> bool:
    if text is None or not text.strip():
        return default
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise md.MetadataError(f"metadata attribute {name}={text!r} is not true/false")


def _parse_number(name: str, text: str | None, default: float) -> float:
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise md.MetadataError(f"metadata attribute {name}={text!r} is not a number") from None
    if value <= 0:
        raise md.MetadataError(f"metadata attribute {name}={text!r} must be positive")
    return value


def default_state_dir(emulated: bool) -> Path:
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    if emulated:
        return Path(os.environ.get(HOST_DIR_ENV) or os.getcwd()) / EMULATED_STATE_SUBDIR
    if os.access(PRODUCTION_STATE_DIR.parent, os.W_OK) or os.access(PRODUCTION_STATE_DIR, os.W_OK):
        return PRODUCTION_STATE_DIR
    return Path.home() / ".local" / "state" / "fray-tpu-agent"


def load_settings(client: md.MetadataClient, *, state_dir: Path | None = None,
                  boot_timeout: float = 120.0) -> AgentSettings:
    """Reads the settings, waiting up to `boot_timeout` for the metadata server to answer."""
    deadline = time.monotonic() + boot_timeout
    while True:
        try:
            return _read_settings(client, state_dir)
        except md.MetadataError as error:
            if time.monotonic() >= deadline:
                raise md.MetadataError(f"agent settings unreadable after {boot_timeout:.0f}s: {error}") from error
            time.sleep(1.0)


def _full_node_name(client: md.MetadataClient, node: str) -> str:
    """``projects/P/locations/Z/nodes/N`` for the node id the controller wrote.

    The controller cannot write the full name: it does not know in which zone the node lands
    until a zone has capacity. The VM knows its project and zone from the metadata server.
    """
    if not node:
        instance_name = client.get("instance/name")
        return instance_name.text.strip() if instance_name else ""
    if node.startswith("projects/"):
        return node
    project = client.get("project/project-id")
    zone = client.get(md.ZONE_PATH)
    if project is None or zone is None:
        return node
    return f"projects/{project.text.strip()}/locations/{zone.text.strip().rsplit('/', 1)[-1]}/nodes/{node}"


def _required(attributes: dict[str, str], name: str, client: md.MetadataClient) -> str:
    value = attributes.get(name, "")
    if not value.strip():
        raise md.MetadataError(f"node metadata has no {name!r} attribute on {client.host}; the controller must set "
                               "it when creating the node")
    return value


def _read_settings(client: md.MetadataClient, state_dir: Path | None) -> AgentSettings:
    emulated = os.environ.get(EMULATED_ENV) == "1"
    attributes = client.attributes()  # one request: every VM of a slice asks at once
    worker_text = _required(attributes, md.ATTR_WORKER_NUMBER, client)
    try:
        worker_number = int(worker_text)
    except ValueError:
        raise md.MetadataError(f"metadata attribute {md.ATTR_WORKER_NUMBER}={worker_text!r} is not an integer") from None
    endpoints = md.endpoint_ips(attributes.get(md.ATTR_WORKER_ENDPOINTS, ""))
    own = endpoints[worker_number] if worker_number < len(endpoints) else ""
    if own and not md.is_ip_address(own):
        # Hostname-only endpoints: this VM's address is its own network interface's.
        interface = client.get(md.INTERFACE_IP_PATH)
        own = interface.text.strip() if interface is not None else ""
    if own:
        ip = own
    elif os.environ.get(HOST_IP_ENV):
        ip = os.environ[HOST_IP_ENV]
    else:
        raise md.MetadataError(
            f"worker {worker_number} has no entry in {md.ATTR_WORKER_ENDPOINTS} ({endpoints}); cannot tell "
            f"which address to listen on"
        )
    node_name = _full_node_name(client, attributes.get(md.ATTR_NODE, "").strip())
    secret_sha256 = _required(attributes, md.ATTR_SECRET_SHA256, client).strip().lower()
    if len(secret_sha256) != 64 or any(c not in "0123456789abcdef" for c in secret_sha256):
        raise md.MetadataError(f"metadata attribute {md.ATTR_SECRET_SHA256} is not a hex SHA-256")
    host_dir = Path(os.environ.get(HOST_DIR_ENV) or os.getcwd()) if emulated else Path("/")
    state_dir = state_dir or default_state_dir(emulated)
    material = host_tls(state_dir)
    lease_seconds = _parse_number(md.ATTR_LEASE_SECONDS, attributes.get(md.ATTR_LEASE_SECONDS), DEFAULT_LEASE_SECONDS)
    return AgentSettings(
        worker_number=worker_number,
        ip=ip,
        port=int(_parse_number(md.ATTR_AGENT_PORT, attributes.get(md.ATTR_AGENT_PORT), md.DEFAULT_AGENT_PORT)),
        accelerator_type=attributes.get(md.ATTR_ACCELERATOR_TYPE, ""),
        node_name=node_name.strip(),
        secret_sha256=secret_sha256,
        tls_cert_pem=material.cert_pem,
        tls_key_pem=material.key_pem,
        lease_seconds=lease_seconds,
        first_lease_seconds=max(lease_seconds, _parse_number(
            md.ATTR_FIRST_LEASE_SECONDS, attributes.get(md.ATTR_FIRST_LEASE_SECONDS), lease_seconds)),
        tls_leaf_seconds=_parse_number(md.ATTR_TLS_LEAF_SECONDS, attributes.get(md.ATTR_TLS_LEAF_SECONDS),
                                       DEFAULT_TLS_LEAF_SECONDS),
        self_delete=_parse_bool(md.ATTR_SELF_DELETE, attributes.get(md.ATTR_SELF_DELETE), True),
        api_endpoint=attributes.get(md.ATTR_API_ENDPOINT, "").strip() or None,
        job=attributes.get(md.ATTR_JOB, "").strip(),
        controller=attributes.get(md.ATTR_CONTROLLER, "").strip(),
        state_dir=state_dir,
        host_dir=host_dir,
        emulated=emulated,
    )
