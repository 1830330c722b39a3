"""The examples run end to end on the emulator.

``./dev demo`` (the README's main command, run exactly so): it shows the slices being created,
the hosts booting, every one of the 8 hosts' output, the result, the cost and that no slice is left.

``examples/train_with_preemption.py``: its driver launches a JAX training loop, preempts the
slice once a checkpoint exists, and the job resumes from that checkpoint and finishes; the
``fake_gcp`` fixture then fails the test if any slice is left alive.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLES = REPOSITORY / "examples"
DEMO_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def train_with_preemption():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_with_preemption
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_with_preemption


@pytest.mark.timeout(180)
def test_training_survives_a_preemption_and_resumes_from_its_checkpoint(train_with_preemption, fake_gcp,
                                                                        job_package_index, tmp_path):
    """On the faithful image, JAX from the job's environment (the loopback index, then the bucket)."""
    checkpoints = tmp_path / "checkpoints"
    result = train_with_preemption.run_example(str(checkpoints), emulator_endpoint=fake_gcp.endpoint,
                                               state_dir=str(tmp_path / "state"), index_url=job_package_index.url)

    assert result.status == "succeeded", result.error_message
    assert (result.attempts, result.preemptions) == (2, 1)
    assert result.resumed_from_step is not None and result.resumed_from_step > 0
    assert result.resumed_from_step % train_with_preemption.CHECKPOINT_EVERY == 0
    assert result.final_step == train_with_preemption.STEPS
    assert result.final_loss < 1e-3
    assert result.slices_left == 0
    # Only complete checkpoints are left behind: the temporary files were renamed into place.
    assert not list(checkpoints.glob(".*.partial"))


def test_dev_demo_shows_slices_hosts_every_hosts_output_the_result_the_cost_and_no_leftovers(tmp_path):
    """Issue 15 point 10: what the README's `./dev demo` prints, from its own emulator."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FRAY_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    done = subprocess.run(["./dev", "demo"], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                          timeout=DEMO_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    for slice_id in (0, 1):
        assert re.search(rf"slice-{slice_id}: creating in ", output), output
        assert re.search(rf"slice-{slice_id}: booting, 4/4 agents up", output), output
    for process in range(8):
        slice_id, worker = divmod(process, 4)
        host = re.escape(f"[slice-{slice_id}/worker-{worker}]")
        assert re.search(rf"{host} process {process}/8 slice {slice_id} worker {worker} "
                         rf"\{{'MEGASCALE_COORDINATOR_ADDRESS': '[0-9.]+:\d+', 'MEGASCALE_NUM_SLICES': '2'", output), \
            f"no Megascale line from host {process}:\n{output}"
        assert re.search(rf"{host} process {process}: global sum over 8 processes = 36 \(expected 36\)", output), \
            f"no collective result from host {process}:\n{output}"
    assert re.search(r"job multislice-demo-\S+: succeeded in [0-9.]+s, 8 tasks", output), output
    assert re.search(r"cost: [0-9.]+ chip-hours provisioned .* estimated \$[0-9.]+", output), output
    assert done.stdout.rstrip().endswith("slices still alive after the job: 0"), output
