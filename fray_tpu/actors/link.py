"""How a process reaches its controller: in the controller process directly, elsewhere over RPC.

Every task the controller starts (CPU job replica, TPU host task, actor member) gets these in its
environment; a handle unpickled there resolves through them:

- ``FRAY_TPU_CONTROLLER``: ``host:port`` of the controller service;
- ``FRAY_TPU_CLUSTER_CREDENTIALS``: the certificate, key and secret of the controller's channels;
- ``FRAY_TPU_SUBMISSION``: the task's own submission token (owner of what it creates).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from fray_tpu.actors.rpc import ClusterCredentials, RpcClient
from fray_tpu.contract import ACTOR_PORTS, HOST_IP_ENV

CONTROLLER_ENV = "FRAY_TPU_CONTROLLER"
CREDENTIALS_ENV = "FRAY_TPU_CLUSTER_CREDENTIALS"
SUBMISSION_ENV = "FRAY_TPU_SUBMISSION"
CALL_TIMEOUT = 60.0


class NoController(RuntimeError):
    """This process has no fray-tpu controller to talk to."""


class LocalLink:
    """The controller service in this very process."""

    def __init__(self, service: Any):
        self.service = service
        self.credentials: ClusterCredentials = service.credentials
        self.address: str = service.address

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.service.dispatch(method, args, kwargs)


class RemoteLink:
    def __init__(self, address: str, credentials: ClusterCredentials):
        self.address = address
        self.credentials = credentials
        self._rpc = RpcClient(address, credentials)

    def call(self, method: str, *args: Any, timeout: float | None = CALL_TIMEOUT, **kwargs: Any) -> Any:
        return self._rpc.call(method, *args, timeout=timeout, **kwargs)


_lock = threading.Lock()
_link: LocalLink | RemoteLink | None = None


def set_local_service(service: Any) -> LocalLink:
    """The controller service of this process becomes its link (the first one wins)."""
    global _link
    with _lock:
        if not isinstance(_link, LocalLink) or _link.service.closed:
            _link = LocalLink(service)
        return _link


def clear_local_service(service: Any) -> None:
    global _link
    with _lock:
        if isinstance(_link, LocalLink) and _link.service is service:
            _link = None


def process_link() -> LocalLink | RemoteLink:
    global _link
    with _lock:
        if _link is None:
            address, credentials = os.environ.get(CONTROLLER_ENV), os.environ.get(CREDENTIALS_ENV)
            if not address or not credentials:
                raise NoController(
                    "this process has no fray-tpu controller: create a TpuClient here, or run inside a job "
                    f"or actor of one (which sets {CONTROLLER_ENV} and {CREDENTIALS_ENV})")
            _link = RemoteLink(address, ClusterCredentials.decode(credentials))
        return _link


def in_task() -> bool:
    """True inside a task or actor started by a controller (not in a driver)."""
    return bool(os.environ.get(CONTROLLER_ENV) and os.environ.get(CREDENTIALS_ENV))


def own_submission() -> str | None:
    return os.environ.get(SUBMISSION_ENV) or None


def on_tpu_vm() -> bool:
    """True on a TPU VM (inside the VPC: its peers are dialled at their internal addresses)."""
    return bool(os.environ.get(HOST_IP_ENV))


def listen_ports() -> tuple[int, ...]:
    """Where a server of this process listens: on a TPU VM the fixed actor ports first (a
    firewall can open them to a driver outside the VPC), then any; elsewhere any free port."""
    return (*ACTOR_PORTS, 0) if on_tpu_vm() else (0,)


def advertise_host() -> str:
    """The address other processes of the cluster dial to reach a server in this process: the
    host's IP on a TPU VM, else the controller machine's address (CPU jobs run there)."""
    if on_tpu_vm():
        return os.environ[HOST_IP_ENV]
    controller = os.environ.get(CONTROLLER_ENV, "")
    return controller.rsplit(":", 1)[0] if controller else "127.0.0.1"
