"""Actor handles: pickle to an endpoint name, resolve lazily through the process's controller link.

``handle.method.remote(...)`` returns a ``concurrent.futures.Future`` (its ``result(timeout)``
re-raises the method's own exception), ``.submit(...)`` is the same, ``handle.method(...)`` is
a synchronous call. A call that finds the actor unregistered, unreachable or shutting down
raises ``ActorUnavailableError``; the address is looked up again on the next call (a restarted
actor registers a new one).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from fray_tpu.actors import link as links
from fray_tpu.actors.rpc import RpcClient, RpcUnavailable
from fray_tpu.client_api import ActorUnavailableError

_clients: dict[tuple[str, str], RpcClient] = {}
_clients_lock = threading.Lock()


def _rpc_for(address: str, credentials) -> RpcClient:
    key = (address, credentials.secret)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RpcClient(address, credentials)
        return client


def _drop_rpc(address: str, credentials) -> None:
    """Forget a dead address's channel (a restarted actor listens elsewhere)."""
    with _clients_lock:
        client = _clients.pop((address, credentials.secret), None)
    if client is not None:
        client.close()


class TpuActorHandle:
    def __init__(self, endpoint: str):
        self._endpoint = endpoint
        self._address: str | None = None

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def __reduce__(self):
        return TpuActorHandle, (self._endpoint,)

    def __repr__(self) -> str:
        return f"TpuActorHandle({self._endpoint!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TpuActorHandle) and other._endpoint == self._endpoint

    def __hash__(self) -> int:
        return hash(self._endpoint)

    def __getattr__(self, method: str) -> TpuActorMethod:
        if method.startswith("_"):
            raise AttributeError(method)
        return TpuActorMethod(self, method)

    def _resolve(self) -> tuple[str, Any]:
        link = links.process_link()
        if self._address is None:
            address = link.call("lookup", self._endpoint, links.on_tpu_vm())
            if address is None:
                raise ActorUnavailableError(f"actor {self._endpoint} is not running (never started, restarting, "
                                            f"or shut down)")
            self._address = address
        return self._address, link.credentials

    def _invoke(self, method: str, args: tuple, kwargs: dict, timeout: float | None = None) -> Any:
        address, credentials = self._resolve()
        try:
            return _rpc_for(address, credentials).invoke(self._endpoint, (method, *args), kwargs, timeout)
        except RpcUnavailable as error:
            self._address = None
            _drop_rpc(address, credentials)
            raise ActorUnavailableError(f"actor {self._endpoint} at {address} is unavailable: {error}") from None
        except ActorUnavailableError:
            self._address = None  # it is going away: look up its successor next time
            raise


class TpuActorMethod:
    def __init__(self, handle: TpuActorHandle, name: str):
        self._handle = handle
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._handle._invoke(self._name, args, kwargs))
            except BaseException as error:  # noqa: BLE001 - delivered through the future
                future.set_exception(error)

        threading.Thread(target=run, daemon=True, name=f"actor-call-{self._name}").start()
        return future

    submit = remote

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._handle._invoke(self._name, args, kwargs)
