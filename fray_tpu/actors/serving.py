"""Serving one actor instance: construct it under its ``ActorContext``, serve its methods over
the authenticated channel, register the endpoint with the controller.

``max_concurrency`` bounds the calls running at once (1: calls are serialised, in arrival
order as far as the transport delivers them). Names starting with ``_`` are never callable.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from fray_tpu.actors import link as links
from fray_tpu.actors.handles import TpuActorHandle
from fray_tpu.actors.rpc import RpcServer
from fray_tpu.client_api import ActorContext, ActorUnavailableError, reset_current_actor, set_current_actor
from fray_tpu.contract import ACTOR_PORTS

log = logging.getLogger(__name__)
UNREGISTER_TIMEOUT = 10.0


class ActorServer:
    def __init__(self, instance: Any, endpoint: str, credentials, host: str, max_concurrency: int,
                 closing: threading.Event | None = None, ports: tuple[int, ...] = (0,)):
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"ActorConfig.max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        self._instance = instance
        self.endpoint = endpoint
        # Once the actor asked to exit (shutdown event, ctx.fail), it takes no new calls.
        self._closing = closing or threading.Event()
        self._slots = threading.Semaphore(max_concurrency)
        self._rpc = RpcServer(self._handle, credentials, host, ports=ports, max_workers=max(8, max_concurrency + 4),
                              name="actor")
        self.address = self._rpc.address

    def _handle(self, endpoint: str, args: tuple, kwargs: dict) -> Any:
        """``endpoint`` names the actor the caller means: a stale address whose port another
        actor reuses must not reach that other actor."""
        if endpoint != self.endpoint:
            raise ActorUnavailableError(f"actor {endpoint} is not served here any more (this is {self.endpoint})")
        method, args = args[0], args[1:]
        if method.startswith("_"):
            raise AttributeError(f"{type(self._instance).__name__}.{method} is private: actors serve public methods")
        target = getattr(self._instance, method)
        with self._slots:
            if self._closing.is_set():
                raise ActorUnavailableError(f"{type(self._instance).__name__} is shutting down")
            return target(*args, **kwargs)

    def stop(self) -> None:
        self._rpc.stop(grace=0.5)


@dataclass(frozen=True)
class MemberSpec:
    """One member of an actor group, as shipped to the process that serves it."""

    group_id: str
    name: str
    index: int | None  # None: the task index of a TPU job (one member per VM)
    max_concurrency: int

    def endpoint(self, index: int) -> str:
        return f"{self.group_id}/{self.name}-{index}"


def start_actor(actor_class: type, args: tuple, kwargs: dict, *, endpoint: str, index: int, group_name: str,
                max_concurrency: int, owner: str | None) -> tuple[ActorContext, ActorServer]:
    """Construct and serve; returns once the endpoint is registered (callers can reach it)."""
    link = links.process_link()
    ctx = ActorContext(handle=TpuActorHandle(endpoint), index=index, group_name=group_name,
                       shutdown_event=threading.Event())
    token = set_current_actor(ctx)
    try:
        instance = actor_class(*args, **kwargs)
    finally:
        reset_current_actor(token)
    server = ActorServer(instance, endpoint, link.credentials, links.advertise_host(), max_concurrency,
                         ctx.shutdown_event, links.listen_ports())
    if links.on_tpu_vm() and int(server.address.rsplit(":", 1)[1]) not in ACTOR_PORTS:
        log.warning("actor %s listens on %s: the actor ports %d-%d of this VM are taken by other actor servers, so a "
                    "driver outside the VPC (connect=external) reaches it only if the firewall opens that port",
                    endpoint, server.address, ACTOR_PORTS[0], ACTOR_PORTS[-1])
    link.call("register", endpoint, server.address, owner)
    return ctx, server


def stop_actor(endpoint: str, server: ActorServer) -> None:
    try:
        links.process_link().call("unregister", endpoint, server.address, timeout=UNREGISTER_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - the controller drops it with its owner anyway
        log.info("unregistering %s: %s", endpoint, error)
    server.stop()


def serve_member(actor_class: type, args: tuple, kwargs: dict, spec: MemberSpec) -> None:
    """A job's entrypoint for one actor member: serve until the actor sets its shutdown event
    (success) or calls ``ctx.fail(exc)`` (the job fails; its retry budget restarts it fresh)."""
    index = spec.index if spec.index is not None else int(os.environ["FRAY_TASK_INDEX"])
    endpoint = spec.endpoint(index)
    ctx, server = start_actor(actor_class, args, kwargs, endpoint=endpoint, index=index, group_name=spec.name,
                              max_concurrency=spec.max_concurrency, owner=links.own_submission())
    try:
        ctx.shutdown_event.wait()
    finally:
        stop_actor(endpoint, server)
    if ctx._errors:
        raise ctx._errors[0]
