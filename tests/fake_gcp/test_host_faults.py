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

from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig

from .host_jobs import SCRUBBED_DAEMON, wait_for_file
from .scenarios import wait_for
from .test_chaos import HOST_DEADLINE, SMALL, cluster, counters_of, finish, process_state, request  # noqa: F401

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


HUGE = 1 << 20


def raise_with_a_huge_message(out_dir: str) -> None:
    """1 MB in 10,000 lines: no cut of long lines keeps the type in the last 8 KB of stderr."""
    raise ValueError("the start of a huge message\n" + ("x" * 99 + "\n") * (HUGE // 100))


def test_an_exception_with_a_1mb_message_is_named_in_the_error_message(cluster, fake_gcp, workspace, out_dir):
    """Point 8: with a 1 MB message of many lines, error_message still names the exception's type,
    the start of its message and the frame that raised it, in a few KB."""
    job_id = cluster.launch(request("huge-error", raise_with_a_huge_message, out_dir, workspace))
    info = finish(cluster, job_id)

    assert info.status == JobStatus.FAILED
    message = info.error_message
    assert "ValueError: the start of a huge message" in message, message[-3000:]
    assert "in raise_with_a_huge_message" in message, message[-3000:]
    assert len(message) < 16 << 10, f"error_message has {len(message)} characters"


def test_a_binary_dying_with_a_1mb_exception_line_is_named_in_the_error_message(cluster, fake_gcp, workspace,
                                                                                 out_dir):
    """Point 8 for a binary entrypoint (the interpreter prints the traceback, not the runner): the
    one huge line is kept as its start and end, so the frames and the type stay in error_message."""
    code = f"def fails():\n    raise KeyError('the start of a huge key ' + 'k' * {HUGE})\nfails()\n"
    job_id = cluster.launch(JobRequest(name="huge-binary-error",
                                       entrypoint=Entrypoint.from_binary("python3", ["-c", code]),
                                       resources=ResourceConfig.with_tpu(SMALL),
                                       environment=EnvironmentConfig.create(workspace=workspace)))
    info = finish(cluster, job_id)

    assert info.status == JobStatus.FAILED
    message = info.error_message
    assert "KeyError: 'the start of a huge key" in message, message[-3000:]
    assert "in fails" in message and "bytes cut" in message, message[-3000:]
    assert len(message) < 16 << 10, f"error_message has {len(message)} characters"
