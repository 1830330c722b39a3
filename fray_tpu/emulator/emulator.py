"""The emulator: the world's state machines, a ticker that applies due transitions, the hosts
they boot and kill, and the gRPC server in front."""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from fray_tpu.emulator import catalog
from fray_tpu.emulator.control import Control
from fray_tpu.emulator.hosts import HostRuntime
from fray_tpu.emulator.server import build_server
from fray_tpu.emulator.state import Effect, IpAllocator, World
from fray_tpu.emulator.storage import StorageServer
from fray_tpu.emulator.timings import EmulatorTimings

LOG = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 1.0


class Emulator:
    """A Cloud TPU API v2 emulator on ``host:port`` (port 0 picks a free one).

    ``with Emulator() as emulator: client = ...(emulator.endpoint)``; ``emulator.control`` injects
    faults and reports counters, leaks and hosts.
    """

    def __init__(
        self,
        timings: EmulatorTimings | None = None,
        root: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        agent_port: int = catalog.DEFAULT_AGENT_PORT,
        first_octet: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        storage_root: str | Path | None = None,
    ):
        self.initial_timings = timings or EmulatorTimings()
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fray-tpu-emulator-"))
        self.root.mkdir(parents=True, exist_ok=True)
        # Cloud Storage outlives the emulator when given a root of its own, as a bucket outlives VMs.
        self.storage_root = Path(storage_root) if storage_root is not None else self.root / "storage"
        self._host = host
        self._port = port
        self._clock = clock
        addresses = IpAllocator(
            first_octet or random.randint(16, 254), start=random.randrange(IpAllocator.ADDRESSES_PER_OCTET // 2)
        )
        self.world = World(self.initial_timings, addresses, agent_port, clock=clock)
        self.hosts = HostRuntime(self.root, uuid.uuid4().hex[:12])
        self.control = Control(self)
        self._pump_lock = threading.Lock()
        self._stopping = False
        self._ticker: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self.endpoint: str | None = None
        self.storage: StorageServer | None = None

    def start(self) -> str:
        """Serve; returns the endpoint ``host:port`` for ``grpc.insecure_channel``."""
        if self._server is not None:
            raise RuntimeError(f"emulator already serving on {self.endpoint}")
        self._server = build_server(self)
        bound = self._server.add_insecure_port(f"{self._host}:{self._port}")
        if bound == 0:
            raise OSError(f"could not bind the emulator to {self._host}:{self._port}; pick another port or 0")
        self._server.start()
        self.endpoint = f"{self._host}:{bound}"
        self.storage = StorageServer(self._host, self.storage_root)
        self.storage.start()
        self._ticker = threading.Thread(target=self._tick_forever, name="emulator-ticker", daemon=True)
        self._ticker.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and end every host."""
        self.world.close()
        if self._server is not None:
            self._server.stop(STOP_GRACE_SECONDS).wait()
        with self.world.cond:
            self._stopping = True
            self.world.changed()
        if self._ticker is not None:
            self._ticker.join(timeout=10)
        with self._pump_lock:
            self.hosts.stop_all()
        if self.storage is not None:
            self.storage.close()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def pump(self) -> None:
        """Apply every due transition now and carry out its effects (boot, preempt, kill) in order."""
        with self._pump_lock:
            if self._stopping:
                return
            for effect in self.world.advance():
                self._apply(effect)

    def _apply(self, effect: Effect) -> None:
        try:
            if effect.kind == "boot":
                self.hosts.boot(effect.boot)
            elif effect.kind == "preempt_flag":
                self.hosts.set_preempted(effect.uid, None, True)
            elif effect.kind == "kill":
                self.hosts.kill(effect.uid)
            elif effect.kind == "discard":
                self.hosts.discard(effect.uid)
        except Exception:
            LOG.exception("emulator could not %s the hosts of node uid %s", effect.kind, effect.uid)

    def _tick_forever(self) -> None:
        while True:
            self.pump()
            with self.world.cond:
                if self._stopping:
                    return
                if self.world.dirty:
                    continue
                due = self.world.next_due()
                timeout = None if due is None else max(0.0, due - self._clock())
                if timeout != 0.0:
                    self.world.cond.wait(timeout)
