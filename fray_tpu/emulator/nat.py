"""The 1:1 NAT of an emulated VM's external IP: a listener on the external loopback address that
carries each TCP connection to the same port on the VM's internal address.

On GCE the external IP is on no interface of the VM: the network translates it to the internal
one, so a server listening on the internal interface is reachable at the external address too.
The emulator forwards the ports anything outside the VPC dials at an external address: the agent
port and the ports a TPU host's actor servers listen on (``contract.ACTOR_PORTS``); the VMs of a
job talk to each other on their internal addresses. It counts the connections it carried per
port, so a test can tell which address a controller or a driver dialled.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence

LOG = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0
_CHUNK = 1 << 16


class NatForward:
    """Forwards ``external_ip:port`` to ``internal_ip:port`` for each of ``ports`` until closed.
    Thread-safe."""

    def __init__(self, external_ip: str, internal_ip: str, ports: Sequence[int]):
        self.external_ip = external_ip
        self._internal_ip = internal_ip
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._accepted = {port: 0 for port in ports}
        self._closed = False
        self._listeners: list[socket.socket] = []
        try:
            for port in ports:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._listeners.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((external_ip, port))
                listener.listen(64)
        except OSError:
            self.close()
            raise
        for port, listener in zip(ports, self._listeners):
            threading.Thread(target=self._accept_loop, args=(listener, port), name=f"nat-{external_ip}:{port}",
                             daemon=True).start()

    @property
    def accepted(self) -> dict[str, int]:
        """``external_ip:port`` -> connections carried, for the ports that carried any."""
        with self._lock:
            return {f"{self.external_ip}:{port}": count for port, count in self._accepted.items() if count}

    def _accept_loop(self, listener: socket.socket, port: int) -> None:
        while True:
            try:
                inbound, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    inbound.close()
                    return
                self._accepted[port] += 1
            threading.Thread(target=self._carry, args=(inbound, port), daemon=True,
                             name=f"nat-{self.external_ip}:{port}-conn").start()

    def _carry(self, inbound: socket.socket, port: int) -> None:
        try:
            outbound = socket.create_connection((self._internal_ip, port), timeout=CONNECT_TIMEOUT)
        except OSError as error:
            # Nothing listens on the VM's interface: the caller sees the connection refused.
            LOG.debug("nat %s:%d: %s:%d refused (%s)", self.external_ip, port, self._internal_ip, port, error)
            inbound.close()
            return
        outbound.settimeout(None)
        with self._lock:
            if self._closed:
                inbound.close()
                outbound.close()
                return
            self._open.update((inbound, outbound))
        threading.Thread(target=self._pump, args=(outbound, inbound), daemon=True,
                         name=f"nat-{self.external_ip}:{port}-back").start()
        self._pump(inbound, outbound)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)

    def close(self) -> None:
        """The VM is gone: stop listening and cut every carried connection."""
        with self._lock:
            self._closed = True
            carried = list(self._open)
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            except OSError:
                pass
            listener.close()
        for sock in carried:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
