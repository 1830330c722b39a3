"""A running attempt on the gang: one event reader per host, the hosts' signs of life (the
liveness deadline), cancelling everywhere, and the cloud's word on the gang's slices."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from fray_tpu import channel
from fray_tpu.errors import ProvisioningError
from fray_tpu.provisioner import ReadySlice, SliceProvisioner
from fray_tpu.supervisor.attempt import AttemptRun, in_parallel
from fray_tpu.supervisor.watch import CANCEL_GRACE_SECONDS, SliceSeen, StreamEnded, lost_slices

log = logging.getLogger(__name__)


class Liveness:
    """When each agent last answered (an event, a lease renewal), by address."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.monotonic):
        self.deadline = deadline
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def heard(self, address: str) -> None:
        with self._lock:
            self._last[address] = self._clock()

    def answered_within(self, address: str, seconds: float) -> bool:
        with self._lock:
            last = self._last.get(address)
        return last is not None and self._clock() - last <= seconds

    def silent(self, addresses: Sequence[str]) -> set[str]:
        now = self._clock()
        with self._lock:
            return {a for a in addresses if now - self._last.get(a, now) > self.deadline}


def observe_slices(provisioner: SliceProvisioner, slices: Mapping[int, ReadySlice]) -> dict[int, SliceSeen]:
    """One look at the cloud for each slice; a zone whose listing fails says UNKNOWN."""
    seen: dict[int, SliceSeen] = {}
    for slice_id, ready in slices.items():
        try:
            observed = provisioner.observe(ready.zone).get(ready.spec.name)
        except ProvisioningError as error:
            log.warning("could not observe %s in %s (%s); keeping it", ready.spec.name, ready.zone, error)
            seen[slice_id] = SliceSeen.UNKNOWN
            continue
        seen[slice_id] = SliceSeen.LOST if observed is None or observed.lost else SliceSeen.THERE
    return seen


def cancel_everywhere(attempt_id: str, clients: Sequence[channel.AgentClient]) -> None:
    """Stop the attempt on every one of these hosts, in parallel."""
    def cancel(client: channel.AgentClient) -> None:
        try:
            client.cancel(attempt_id, CANCEL_GRACE_SECONDS)
        except Exception as error:  # noqa: BLE001 - a host already gone (or its channel closed) is cancelled
            log.info("cancel on %s: %s", client.address, error)

    in_parallel(cancel, clients)


class TpuGangRun(AttemptRun):
    """One attempt on every host of every slice, over the task channel; one reader per host."""

    def __init__(self, attempt_id: str, clients: Sequence[channel.AgentClient], slices: Sequence[ReadySlice],
                 provisioner: SliceProvisioner, liveness: Liveness):
        super().__init__()
        self.attempt_id = attempt_id
        self._clients = clients
        self._slices = slices
        self._provisioner = provisioner
        self._liveness = liveness
        self._streams: list[channel.EventStream] = []
        for client in clients:
            liveness.heard(client.address)

    def start(self, from_seqs: Sequence[int] | None = None) -> None:
        """Start the attempt on every host, or with ``from_seqs`` follow one an earlier
        controller started, from each host's sequence number."""
        if from_seqs is None:
            self._follow_all(lambda c: c.start(self.attempt_id, read=False))
        else:
            seqs = dict(zip(self._clients, from_seqs))
            self._follow_all(lambda c: c.watch(self.attempt_id, seqs[c], read=False))

    def _follow_all(self, open_stream: Callable[[channel.AgentClient], channel.EventStream]) -> None:
        # Opening a stream sends its call: from this thread, one host after the other, the gang's
        # calls leave within a millisecond; the threads that read them are started after.
        self._streams = [open_stream(client) for client in self._clients]
        for stream in self._streams:
            stream.read()
        for index, stream in enumerate(self._streams):
            threading.Thread(target=self._follow, args=(index, stream), daemon=True,
                             name=f"events-{self.attempt_id}-{index}").start()

    def _follow(self, index: int, stream: channel.EventStream) -> None:
        address = self._clients[index].address
        try:
            for event in stream:
                self._liveness.heard(address)
                self.events.put(index, event)
        except Exception as error:  # noqa: BLE001 - a broken channel is this task's end
            self.events.put(index, error)
        self.events.put(index, StreamEnded())

    def cancel_all(self, reason: str) -> None:
        cancel_everywhere(self.attempt_id, self._clients)

    def lost_slices(self) -> set[int]:
        return lost_slices(observe_slices(self._provisioner, dict(enumerate(self._slices))))

    def unresponsive_tasks(self) -> set[int]:
        silent = self._liveness.silent([c.address for c in self._clients])
        return {i for i, client in enumerate(self._clients) if client.address in silent}

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
