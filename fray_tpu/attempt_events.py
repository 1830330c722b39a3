"""What a running attempt reports, as plain data: the controller's view of the agent's events
(``channel.to_event`` builds them from the wire). Pure, so the gang watch and its unit tests
need no gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Classification(enum.StrEnum):
    OK = "OK"
    USER_FAILURE = "USER_FAILURE"
    BAD_HOST = "BAD_HOST"
    PREEMPTED = "PREEMPTED"
    CANCELLED = "CANCELLED"
    UNSPECIFIED = "UNSPECIFIED"


@dataclass(frozen=True)
class AttemptStarted:
    pid: int
    timestamp: float
    seq: int = 0


@dataclass(frozen=True)
class LogBatch:
    stream: str  # "stdout" | "stderr"
    lines: list[str]
    timestamp: float  # when the agent read the first line (Unix time)
    seq: int = 0


@dataclass(frozen=True)
class AttemptExit:
    code: int | None  # None when a signal ended the process
    signal: int | None
    classification: Classification
    stderr_tail: str
    reason: str = ""
    seq: int = 0


@dataclass(frozen=True)
class PreemptionNotice:
    timestamp: float
    seq: int = 0


@dataclass(frozen=True)
class EventsLost:
    """The agent's ring no longer held events requested_from_seq .. first_available_seq - 1."""

    requested_from_seq: int
    first_available_seq: int


AttemptEvent = AttemptStarted | LogBatch | AttemptExit | PreemptionNotice | EventsLost
