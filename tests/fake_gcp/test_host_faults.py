"""Faults found from outside (issue 15, points 6-9), each through the cluster API on the emulator
and ending with zero resources left (the ``fake_gcp`` fixture checks).

The job callables are module-level functions shipped by value; they talk to the test through
files under the test's tmp_path and wait with bounded loops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cloudpickle

from fray_tpu.fray_api import JobStatus

from .host_jobs import SCRUBBED_DAEMON, wait_for_file
from .scenarios import wait_for
from .test_chaos import HOST_DEADLINE, JOB_TIMEOUT, cluster, counters_of, finish, process_state, request  # noqa: F401

cloudpickle.register_pickle_by_value(sys.modules[__name__])

JAX_PORT = 8476

def daemon_then_bind(out_dir: str) -> None:
    """Attempt 1 leaves the daemon holding port 8476 and fails; attempt 2 binds the port."""
    ip = os.environ["FRAY_TPU_HOST_IP"]
    pid_file = os.path.join(out_dir, "daemon.pid")
    if not os.path.exists(pid_file):
        subprocess.run([sys.executable, "-c", SCRUBBED_DAEMON, pid_file, ip, str(JAX_PORT)], env={}, check=True, timeout=60)
        if not wait_for_file(pid_file, HOST_DEADLINE):
            raise SystemExit("the daemon never wrote its pid")
        raise SystemExit("attempt 1 fails, leaving its daemon behind")
    with socket.socket() as listener:
        listener.bind((ip, JAX_PORT))
    Path(out_dir, "bound").write_text("")


def test_daemon_that_left_the_attempts_environment_is_killed_before_the_next_attempt(cluster, fake_gcp, workspace,
                                                                                       out_dir):
    """Point 6: a daemon that scrubbed its environment and called setsid does not survive into the
    retry on the same slice: the retry binds the JAX port, the job succeeds with one failure, and
    the daemon is gone."""
    job_id = cluster.launch(request("daemon", daemon_then_bind, out_dir, workspace, max_retries_failure=1))
    info = finish(cluster, job_id)
    daemon = int((out_dir / "daemon.pid").read_text())

    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert counters_of(cluster, job_id) == (2, 1, 0, 0)
    assert fake_gcp.control.counters()["CreateNode"] == 1  # the retry reused the slice
    assert (out_dir / "bound").exists()
    assert process_state(daemon) in ("gone", "Z", "X"), f"the daemon {daemon} still runs"
