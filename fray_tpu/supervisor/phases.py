"""The job's phase machine (pure): what the job is doing now, as the CLI and ``poll`` show it.

A phase is finer than a status (``provisioning``, ``booting`` and ``preparing`` are all
``pending`` to Fray). Any live phase may follow any other (a retry goes back from ``running`` to
``provisioning``); a finished phase is final.
"""

from __future__ import annotations

import enum

from fray_tpu.fray_api import JobStatus


class JobPhase(enum.StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    BOOTING = "booting"
    PREPARING = "preparing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.STOPPED)

    @classmethod
    def ended(cls, status: JobStatus) -> JobPhase:
        """The final phase of a job that finished with ``status``."""
        phase = cls(str(status))
        if not phase.finished:
            raise ValueError(f"{status!r} is not a finished status")
        return phase


def next_phase(current: JobPhase, wanted: JobPhase) -> JobPhase:
    """The phase after ``current`` when the supervisor enters ``wanted``: a finished job stays
    finished (a late report from a thread of the attempt cannot revive it)."""
    return current if current.finished else wanted
