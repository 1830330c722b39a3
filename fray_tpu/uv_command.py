"""Running uv, for both sides: the agent builds job environments with it, the controller checks a
workspace's lock with it. Standard library only, so it ships to every VM.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fray_tpu.contract import UV_ENV
from fray_tpu.errors import EnvironmentBuildError, FrayTpuError

OUTPUT_TAIL_LINES = 40
# uv settings that would send a command somewhere other than the environment or project it is for.
REDIRECTING_VARS = ("UV_PROJECT_ENVIRONMENT", "UV_SYSTEM_PYTHON", "UV_PYTHON", "VIRTUAL_ENV", "UV_TARGET",
                    "UV_PREFIX", "PYTHONPATH", "PYTHONHOME")
# Index settings of the caller's environment: a lock is read with the workspace's own instead.
INDEX_VARS = ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS")


class UvMissing(FrayTpuError):
    """This machine has no uv: the machine's fault, not the job's."""


def find_uv(environ: Mapping[str, str] | None = None) -> str:
    """``FRAY_TPU_UV``, else a ``uv`` beside this interpreter (uv is a dependency), else on PATH."""
    env = os.environ if environ is None else environ
    uv = env.get(UV_ENV, "").strip()
    if not uv:
        beside = Path(sys.executable).parent / "uv"
        uv = str(beside) if beside.is_file() else (shutil.which("uv") or "")
    if not uv:
        raise UvMissing(f"no uv on this machine: set {UV_ENV} to its path, or install uv beside {sys.executable} "
                        f"or on PATH")
    return uv


def is_locked_workspace(workspace: Path | None) -> bool:
    """A uv project with a lockfile (Marin's convention): the lock decides the versions."""
    return workspace is not None and all((Path(workspace) / name).is_file() for name in ("pyproject.toml", "uv.lock"))


def run_streaming(
    command: list[str], *, cwd: Path, env: Mapping[str, str], timeout: float, log: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run ``command``, passing each output line to ``log``; returns the exit code and the tail.
    Past ``timeout`` the command is killed and the error names it and its last output."""
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill_on_deadline() -> None:
        timed_out.set()
        process.kill()

    watchdog = threading.Timer(timeout, kill_on_deadline)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if timed_out.is_set():
        raise EnvironmentBuildError(
            f"{' '.join(command[:4])} ... did not finish within {timeout:.0f}s; last output:\n" + "\n".join(tail)
        )
    return code, list(tail)


def uv_message(tail: Sequence[str]) -> str:
    """uv's error and hints (from its first ``error:`` line on), else its last lines."""
    for index, line in enumerate(tail):
        if line.startswith("error:"):
            return "\n".join(tail[index:]).strip()
    return "\n".join(tail).strip()
