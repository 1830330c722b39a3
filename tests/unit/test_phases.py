"""The job phase machine: live phases follow each other freely, finished ones are final."""

from __future__ import annotations

import itertools

import pytest

from fray_tpu.fray_api import JobStatus
from fray_tpu.supervisor.phases import JobPhase, next_phase

LIVE = [p for p in JobPhase if not p.finished]
FINISHED = [p for p in JobPhase if p.finished]


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(LIVE, JobPhase)))
def test_a_live_phase_moves_to_any_phase(current, wanted):
    """A retry goes back from running to provisioning; any live phase may end."""
    assert next_phase(current, wanted) is wanted


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(FINISHED, JobPhase)))
def test_a_finished_phase_is_final(current, wanted):
    """A late report from an attempt's thread cannot revive a finished job."""
    assert next_phase(current, wanted) is current


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED])
def test_every_finished_status_has_its_phase(status):
    """The final phase has the same name as the final status (the CLI shows both only when they differ)."""
    assert JobPhase.ended(status).finished and str(JobPhase.ended(status)) == str(status)


@pytest.mark.parametrize("status", [JobStatus.PENDING, JobStatus.RUNNING])
def test_a_live_status_is_no_end(status):
    """Ending a job with a live status is a bug, refused loudly."""
    with pytest.raises(ValueError, match="not a finished status"):
        JobPhase.ended(status)


def test_phase_names_are_the_journaled_strings():
    """The journal and the CLI keep the strings they had before phases were an enum."""
    assert [str(p) for p in JobPhase] == ["pending", "provisioning", "booting", "preparing", "running",
                                          "succeeded", "failed", "stopped"]
