"""The examples run end to end on the emulator.

``examples/train_with_preemption.py``: its driver launches a JAX training loop, preempts the
slice once a checkpoint exists, and the job resumes from that checkpoint and finishes; the
``fake_gcp`` fixture then fails the test if any slice is left alive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Job callables here are pickled by value by the controller's Python (see inherit_controller_image).
pytestmark = pytest.mark.usefixtures("inherit_controller_image")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def train_with_preemption():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_with_preemption
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_with_preemption


@pytest.mark.timeout(120)
def test_training_survives_a_preemption_and_resumes_from_its_checkpoint(train_with_preemption, fake_gcp, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    result = train_with_preemption.run_example(str(checkpoints), emulator_endpoint=fake_gcp.endpoint,
                                               state_dir=str(tmp_path / "state"))

    assert result.status == "succeeded", result.error_message
    assert (result.attempts, result.preemptions) == (2, 1)
    assert result.resumed_from_step is not None and result.resumed_from_step > 0
    assert result.resumed_from_step % train_with_preemption.CHECKPOINT_EVERY == 0
    assert result.final_step == train_with_preemption.STEPS
    assert result.final_loss < 1e-3
    assert result.slices_left == 0
    # Only complete checkpoints are left behind: the temporary files were renamed into place.
    assert not list(checkpoints.glob(".*.partial"))
