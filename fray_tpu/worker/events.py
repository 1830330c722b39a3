"""A bounded, sequence-numbered ring of one attempt's events, readable by many streams.

Writers never block: when the ring is over its byte or count budget the oldest events are
dropped, and a reader that asks for a dropped range gets an explicit `lost` event first, so a
slow or reconnecting controller learns exactly what it missed instead of losing it silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from fray_tpu.proto import worker_pb2

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_EVENTS = 100_000
# How often a blocked reader re-checks whether its stream is still wanted.
READER_POLL_SECONDS = 0.5


class EventLog:
    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, max_events: int = DEFAULT_MAX_EVENTS):
        self._max_bytes = max_bytes
        self._max_events = max_events
        self._cond = threading.Condition()
        self._events: list[worker_pb2.AttemptEvent] = []
        self._sizes: list[int] = []
        self._head = 0  # index in _events of the oldest retained event
        self._first_seq = 1  # seq of _events[_head]
        self._bytes = 0
        self._closed = False

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._first_seq + len(self._events) - self._head - 1

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, event: worker_pb2.AttemptEvent, *, final: bool = False) -> int:
        """Stores `event` under the next seq (set on the event) and wakes readers."""
        with self._cond:
            if self._closed:
                raise RuntimeError("event log already has its final event")
            event.seq = self._first_seq + len(self._events) - self._head
            size = event.ByteSize()
            self._events.append(event)
            self._sizes.append(size)
            self._bytes += size
            self._drop_over_budget()
            self._closed = final
            self._cond.notify_all()
            return event.seq

    def _drop_over_budget(self) -> None:
        # Keep at least the newest event so the final exit is always readable.
        while (len(self._events) - self._head > 1
               and (self._bytes > self._max_bytes or len(self._events) - self._head > self._max_events)):
            self._bytes -= self._sizes[self._head]
            self._events[self._head] = None  # type: ignore[call-overload]
            self._head += 1
            self._first_seq += 1
        if self._head > 1024 and self._head * 2 > len(self._events):
            del self._events[: self._head]
            del self._sizes[: self._head]
            self._head = 0

    def follow(self, from_seq: int, is_wanted: Callable[[], bool]) -> Iterator[worker_pb2.AttemptEvent]:
        """Events with seq >= from_seq, live, until the final event or until not `is_wanted()`."""
        cursor = max(from_seq, 1)
        while True:
            with self._cond:
                if cursor < self._first_seq:
                    lost = worker_pb2.AttemptEvent(
                        lost=worker_pb2.EventsLost(requested_from_seq=cursor, first_available_seq=self._first_seq)
                    )
                    cursor = self._first_seq
                else:
                    lost = None
                start = self._head + (cursor - self._first_seq)
                batch = self._events[start:]
                finished = self._closed
                if not batch and not finished:
                    self._cond.wait(READER_POLL_SECONDS)
            if lost is not None:
                yield lost
            for event in batch:
                yield event
            cursor += len(batch)
            if finished and not batch:
                return
            if not batch and not is_wanted():
                return
