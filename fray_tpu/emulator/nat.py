"""The 1:1 NAT of an emulated VM's external IP: a listener on the external loopback address that
carries each TCP connection to the same port on the VM's internal address.

On GCE the external IP is on no interface of the VM: the network translates it to the internal
one, so a server listening on the internal interface is reachable at the external address too.
The emulator forwards the agent port, the one port anything dials at an external address (the
VMs of a job talk to each other on their internal addresses), and counts the connections it
carried, so a test can tell which address a controller dialled.
"""

from __future__ import annotations

import logging
import socket
import threading

LOG = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0
_CHUNK = 1 << 16


class NatForward:
    """Forwards ``external_ip:port`` to ``internal_ip:port`` until closed. Thread-safe."""

    def __init__(self, external_ip: str, internal_ip: str, port: int):
        self.external = f"{external_ip}:{port}"
        self._target = (internal_ip, port)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.accepted = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((external_ip, port))
        self._listener.listen(64)
        self._closed = False
        threading.Thread(target=self._accept_loop, name=f"nat-{self.external}", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                inbound, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    inbound.close()
                    return
                self.accepted += 1
            threading.Thread(target=self._carry, args=(inbound,), daemon=True, name=f"nat-{self.external}-conn").start()

    def _carry(self, inbound: socket.socket) -> None:
        try:
            outbound = socket.create_connection(self._target, timeout=CONNECT_TIMEOUT)
        except OSError as error:
            # Nothing listens on the VM's interface: the caller sees the connection refused.
            LOG.debug("nat %s: %s:%d refused (%s)", self.external, *self._target, error)
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
                         name=f"nat-{self.external}-back").start()
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
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        for sock in carried:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
