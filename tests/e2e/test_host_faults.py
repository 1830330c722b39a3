"""Faults found from outside (issue 15, points 6-9), each through the cluster API on the emulator
and ending with zero resources left (the ``fake_gcp`` fixture checks).

The job callables are module-level functions shipped by value; they talk to the test through
files under the test's tmp_path and wait with bounded loops.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from fray_tpu.errors import ConfigError
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, JobStatus, ResourceConfig

from fake_gcp.host_jobs import SCRUBBED_DAEMON, wait_for_file
from test_chaos import HOST_DEADLINE, SMALL, cluster, counters_of, finish, process_state, request  # noqa: F401

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


HELPER_MODULE = '''
import threading
from pathlib import Path

HELD = threading.Lock()


def record(out_dir):
    Path(out_dir, "helper-ran").write_text(__name__)


def uses_a_lock(out_dir):
    with HELD:
        pass
'''


def import_helper(directory: Path, name: str):
    """A module imported from a helper directory put on sys.path: outside the job's workspace."""
    directory.mkdir()
    (directory / f"{name}.py").write_text(HELPER_MODULE)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))


def test_a_callable_from_a_module_the_hosts_cannot_import_is_shipped_by_value(cluster, fake_gcp, workspace, out_dir,
                                                                              tmp_path):
    """Point 9: the hosts cannot import a helper directory of the driver's: the callable is shipped
    by value and runs, instead of failing on every host with ModuleNotFoundError."""
    helper = import_helper(tmp_path / "helpers", "fray_issue15_helper")
    job_id = cluster.launch(request("by-value", helper.record, out_dir, workspace))
    info = finish(cluster, job_id)

    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert (out_dir / "helper-ran").read_text() == "fray_issue15_helper"
    assert "fray_issue15_helper" not in cloudpickle.list_registry_pickle_by_value()


def test_a_module_that_cannot_be_shipped_by_value_is_refused_at_launch_with_its_path(cluster, fake_gcp, workspace,
                                                                                     out_dir, tmp_path):
    """Point 9: shipping by value fails (a module-level lock): refused at launch, naming the module,
    its path and the fix, before anything is provisioned."""
    helper = import_helper(tmp_path / "locked", "fray_issue15_locked")
    with pytest.raises(ConfigError) as refused:
        cluster.launch(request("by-value-lock", helper.uses_a_lock, out_dir, workspace))
    message = str(refused.value)
    for fragment in ("fray_issue15_locked", str(tmp_path / "locked" / "fray_issue15_locked.py"),
                     "move it into the workspace", "pip_packages", "lock"):
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0
