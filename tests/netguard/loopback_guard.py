"""Fail any connection that would leave this machine.

Installed in the pytest process by ``tests/conftest.py`` and in every Python child process
(emulator, hosts, agents, user code) through ``sitecustomize`` on ``PYTHONPATH``. Each
violation raises in the offending process and is appended to the file named by
``FRAY_TPU_NETGUARD_LOG``, which the test session checks at the end, so a stray connection in
a background process is a red test run, not silent traffic.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import ipaddress
import os
import socket
import sys

LOG_ENV = "FRAY_TPU_NETGUARD_LOG"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class NonLoopbackConnectionError(ConnectionRefusedError):
    """A test tried to reach an address outside 127.0.0.0/8 or ::1."""


def _is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> None:
    message = f"network guard: refused {what} (only loopback is allowed in tests)"
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()}: {message}\n")
    raise NonLoopbackConnectionError(message)


def _check_sockaddr(family: int, address) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        if not _is_loopback_host(str(address[0])):
            _refuse(f"connection to {address[0]}:{address[1]}")


def grpc_target_host(target: str) -> str | None:
    """The host of a gRPC target string, or None for unix sockets."""
    if target.startswith("unix:"):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):
        return target[1:].split("]", 1)[0]
    return target.rsplit(":", 1)[0] if ":" in target else target


def install() -> None:
    if getattr(socket, "_fray_tpu_guarded", False):
        return
    socket._fray_tpu_guarded = True

    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        _check_sockaddr(self.family, address)
        return original_connect(self, address)

    def connect_ex(self, address):
        _check_sockaddr(self.family, address)
        return original_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        # Name resolution is itself traffic (DNS): only literal or loopback names resolve.
        if host is not None and not _is_loopback_host(host if isinstance(host, str) else host.decode()):
            _refuse(f"name resolution of {host!r}")
        return original_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    _guard_grpc()


def _guard_grpc() -> None:
    """gRPC dials from C, below Python's socket module: check the target when a channel is made.

    Patched when grpc is first imported (not eagerly), so guarded children start as fast as
    unguarded ones.
    """
    if "grpc" in sys.modules:
        _patch_grpc_module(sys.modules["grpc"])
    if "grpc.aio" in sys.modules:
        _patch_grpc_module(sys.modules["grpc.aio"])
    sys.meta_path.insert(0, _GrpcPatchingFinder())


def _checked_channel_factory(factory):
    def make_channel(target, *args, **kwargs):
        host = grpc_target_host(target)
        if host is not None and not _is_loopback_host(host):
            _refuse(f"gRPC channel to {target}")
        return factory(target, *args, **kwargs)

    make_channel._fray_tpu_guarded = True
    return make_channel


def _patch_grpc_module(module) -> None:
    for name in ("insecure_channel", "secure_channel"):
        factory = getattr(module, name, None)
        if factory is not None and not getattr(factory, "_fray_tpu_guarded", False):
            setattr(module, name, _checked_channel_factory(factory))


class _GrpcPatchingFinder(importlib.abc.MetaPathFinder):
    _MODULES = ("grpc", "grpc.aio")

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._MODULES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch_grpc_module(module)

        spec.loader.exec_module = exec_module
        return spec
