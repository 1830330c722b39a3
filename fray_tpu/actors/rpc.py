"""One authenticated, encrypted call shape for the controller service and every actor server.

Both sides hold the controller's ``ClusterCredentials``: a self-signed certificate and key
(``fray_tpu.tls``, as the task channel) and a secret. Servers present the certificate; clients
pin exactly that certificate and send the secret as call metadata. The server compares the
secret (constant time) **before** it unpickles anything, so an unauthenticated peer can never
make it load a pickle: there is no open pickle port.

A call is ``cloudpickle((method, args, kwargs))``; a reply is ``(True, value)`` or ``(False,
(pickled exception, traceback text))``. The caller re-raises the original exception with a
``RemoteTraceback`` naming the remote stack as its ``__cause__``.
"""

from __future__ import annotations

import base64
import hmac
import json
import socket
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cloudpickle
import grpc

from fray_tpu import tls

SECRET_METADATA_KEY = "fray-tpu-cluster-secret"
METHOD_PATH = "/fray_tpu.ClusterRpc/Call"
MAX_MESSAGE_BYTES = 256 << 20
CONNECT_TIMEOUT = 10.0
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class RemoteTraceback(Exception):
    """The stack of an exception raised in another process (attached as ``__cause__``)."""


class RpcUnavailable(ConnectionError):
    """The server could not be reached, or went away during the call."""


class RpcRejected(PermissionError):
    """The server refused the credentials."""


@dataclass(frozen=True)
class ClusterCredentials:
    cert_pem: bytes
    key_pem: bytes
    secret: str

    @classmethod
    def create(cls) -> ClusterCredentials:
        material = tls.make_job_tls()
        return cls(material.cert_pem, material.key_pem, tls.make_secret())

    def encode(self) -> str:
        """One opaque string for a task's environment."""
        raw = json.dumps({"cert": self.cert_pem.decode(), "key": self.key_pem.decode(), "secret": self.secret})
        return base64.urlsafe_b64encode(raw.encode()).decode()

    @classmethod
    def decode(cls, value: str) -> ClusterCredentials:
        raw = json.loads(base64.urlsafe_b64decode(value.encode()))
        return cls(raw["cert"].encode(), raw["key"].encode(), raw["secret"])


def pack_exception(error: BaseException) -> tuple[bytes, str]:
    text = "".join(traceback.format_exception(error))
    try:
        blob = cloudpickle.dumps(error)
        cloudpickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception that cannot travel becomes a RuntimeError naming it
        blob = cloudpickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
    return blob, text


def unpack_exception(blob: bytes, text: str) -> BaseException:
    error = cloudpickle.loads(blob)
    error.__cause__ = RemoteTraceback(text)
    return error


def _free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (a bind as gRPC's, with SO_REUSEADDR, succeeds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class RpcServer:
    """Serves ``handler(method, args, kwargs)`` to holders of the credentials."""

    def __init__(self, handler: Callable[[str, tuple, dict], Any], credentials: ClusterCredentials,
                 host: str = "127.0.0.1", *, ports: Sequence[int] = (0,), max_workers: int = 64, name: str = "rpc"):
        """Listens on ``host`` at the first of ``ports`` it can bind (0: any free port)."""
        self._handler = handler
        self._secret = credentials.secret.encode()
        # so_reuseport off: a port another server holds is busy, not silently shared with it.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name),
                                   options=[*_OPTIONS, ("grpc.so_reuseport", 0)])
        rpc = grpc.unary_unary_rpc_method_handler(self._call)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("fray_tpu.ClusterRpc", {"Call": rpc})])
        for wanted in ports:
            if wanted and not _free(host, wanted):
                continue  # gRPC would log the failed bind as an error
            try:
                port = self._server.add_secure_port(
                    f"{host}:{wanted}", tls.server_credentials(credentials.cert_pem, credentials.key_pem))
            except RuntimeError:  # taken since the check (grpcio raises where older versions returned 0)
                port = 0
            if port:
                break
        else:
            raise OSError(f"could not listen on {host} at any of the ports {', '.join(map(str, ports))}")
        self.address = f"{host}:{port}"
        self._server.start()

    def _call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        offered = dict(context.invocation_metadata()).get(SECRET_METADATA_KEY, "")
        if not hmac.compare_digest(offered.encode(), self._secret):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing cluster secret")
        method, args, kwargs = cloudpickle.loads(request)
        try:
            return cloudpickle.dumps((True, self._handler(method, args, kwargs)))
        except BaseException as error:  # noqa: BLE001 - every error goes back to the caller
            return cloudpickle.dumps((False, pack_exception(error)))

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait(grace + 1)


class RpcClient:
    """Calls one server; thread-safe (one gRPC channel)."""

    def __init__(self, address: str, credentials: ClusterCredentials):
        self.address = address
        self._channel = grpc.secure_channel(address, tls.channel_credentials(credentials.cert_pem),
                                            options=tls.channel_options() + _OPTIONS)
        self._call = self._channel.unary_unary(METHOD_PATH)
        self._metadata = [(SECRET_METADATA_KEY, credentials.secret)]

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.invoke(method, args, kwargs, timeout)

    def invoke(self, method: str, args: tuple, kwargs: dict, timeout: float | None = None) -> Any:
        """``call`` with the arguments as given (a ``timeout`` keyword goes to the method)."""
        request = cloudpickle.dumps((method, args, kwargs))
        try:
            reply = self._call(request, metadata=self._metadata, timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise RpcRejected(f"{self.address} refused this process's cluster credentials") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"call {method} to {self.address} took longer than {timeout}s") from None
            raise RpcUnavailable(f"{self.address} unreachable during {method}: {code.name} {error.details()}") from None
        ok, value = cloudpickle.loads(reply)
        if ok:
            return value
        raise unpack_exception(*value)

    def close(self) -> None:
        self._channel.close()
