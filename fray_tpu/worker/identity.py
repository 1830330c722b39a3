"""The agent's own TLS identity and what it publishes for the controller.

The key is made on the VM, kept in the state directory (mode 0600, the same across restarts and
reboots) and never leaves it; the certificate is published as the guest attribute
``fray-tpu/tls-cert``, which only this VM can write and the controller reads through the TPU API
and pins. Node metadata (readable by anyone with ``tpu.nodes.list``) holds no key.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fray_tpu import tls
from fray_tpu.contract import (
    AGENT_SERVING_MARKER,
    GUEST_AGENT_ADDRESS,
    GUEST_AGENT_SERVING,
    GUEST_NAMESPACE,
    GUEST_SELF_DELETE_REFUSED,
    GUEST_TLS_CERT,
)
from fray_tpu.worker import metadata as md

KEY_FILE = "agent-key.pem"
CERT_FILE = "agent-cert.pem"


def host_tls(state_dir: Path) -> tls.TlsMaterial:
    """This VM's certificate and key, made on first use."""
    directory = state_dir / "tls"
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if key_path.exists() and cert_path.exists():
        return tls.TlsMaterial(cert_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    material = tls.make_job_tls(tls.MAX_VALIDITY)
    for path, data in ((cert_path, material.cert_pem), (key_path, material.key_pem)):
        partial = path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    return material


def publish_serving(client: md.MetadataClient, state_dir: Path, cert_pem: bytes, address: str) -> None:
    """Tell the controller (guest attributes) and the service's exit hook (a file) that we serve
    at ``address`` with ``cert_pem``."""
    client.put_guest_attribute(GUEST_NAMESPACE, GUEST_TLS_CERT, cert_pem.decode())
    client.put_guest_attribute(GUEST_NAMESPACE, GUEST_AGENT_ADDRESS, address)
    client.put_guest_attribute(GUEST_NAMESPACE, GUEST_AGENT_SERVING, str(int(time.time() * 1000)))
    (state_dir / AGENT_SERVING_MARKER).write_text(str(os.getpid()))


def publish_self_delete_refused(client: md.MetadataClient, reason: str) -> None:
    client.put_guest_attribute(GUEST_NAMESPACE, GUEST_SELF_DELETE_REFUSED, reason)
