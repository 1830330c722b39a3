"""The host's spare runner: `python -m fray_tpu.worker.runner --spare`, started ahead of the next
attempt, so that starting a job on a warm host costs a write to a pipe instead of an interpreter
start. It is started when the host is handed over (a slice entering the warm pool, or taken from
it) and, for the next attempt of the same job (a retry), when an attempt exits or has run for a
while (`agent.SPARE_AFTER_START_SECONDS`), whichever comes first: never while a gang is starting,
when every core of the host is the job's; and not on a host being preempted.

A spare is started with the agent's environment and the job environment's activation variables
only (nothing of any job), imports nothing of any job, and serves one attempt: the one that
claims it receives the attempt's whole environment with its payload (`runner.receive_attempt`).
It is kept for the environment (interpreter) the last attempt used; an attempt that needs
another interpreter, or other values of the variables an interpreter reads while it starts
(`contract.RUNNER_STARTUP_ENV_*`), starts its own process as before. A spare is discarded when
another environment is wanted, when the lease lapses, and when the agent stops; it exits by
itself when the agent dies (its stdin, whose only writer the agent held, ends), and goes with
its VM when the slice is deleted (leaving the warm pool).
"""

from __future__ import annotations

import logging
import subprocess
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fray_tpu.contract import ATTEMPT_TOKEN_ENV as TOKEN_ENV
from fray_tpu.contract import RUNNER_MODULE, RUNNER_SPARE_ARG, RUNNER_STARTUP_ENV_NAMES, RUNNER_STARTUP_ENV_PREFIXES
from fray_tpu.contract import RUNNER_SPARE_CLOUDPICKLE_ENV as SPARE_CLOUDPICKLE_ENV
from fray_tpu.worker.cleanup import HostCleaner

LOG = logging.getLogger("fray_tpu.worker")
DISCARD_WAIT_SECONDS = 10.0


def startup_view(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that the interpreter reads while it starts."""
    return {name: value for name, value in env.items()
            if name != "PYTHONPATH" and (name.startswith(RUNNER_STARTUP_ENV_PREFIXES) or name in RUNNER_STARTUP_ENV_NAMES)}


@dataclass
class SpareRunner:
    python: str
    startup_env: dict[str, str]
    token: str
    process: subprocess.Popen

    def serves(self, python: str, env: Mapping[str, str]) -> bool:
        """Whether an attempt running ``python`` with ``env`` can run in this process."""
        return (python == self.python and startup_view(env) == startup_view(self.startup_env)
                and self.process.poll() is None)


@dataclass
class SpareCounts:
    started: int = 0
    used: int = 0
    discarded: int = 0


@dataclass
class SpareRunners:
    """At most one spare runner on this host, for the environment the last attempt used."""

    cleaner: HostCleaner
    directory: Path
    # Whether a spare may be started now (not after the controller's lease lapsed, nor on a preempted host).
    allowed: Callable[[], bool] = lambda: True
    counts: SpareCounts = field(default_factory=SpareCounts)
    _spare: SpareRunner | None = None
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keep_ready(self, python: str, env: Mapping[str, str], *, when: Callable[[], object] = lambda: None,
                   cloudpickle: bool = True) -> None:
        """Have a spare for ``python`` with ``env`` (the environment an attempt would start
        from, before its job's variables) ready, starting it in the background once ``when()``
        returns; without ``cloudpickle`` it does not import cloudpickle ahead (it starts sooner)."""
        threading.Thread(target=self._fill, args=(python, dict(env), when, cloudpickle), daemon=True,
                         name="spare-runner").start()

    def _fill(self, python: str, env: dict[str, str], when: Callable[[], object], cloudpickle: bool) -> None:
        when()
        with self._lock:
            if self._closed or not self.allowed():
                return
            spare = self._spare
            if spare is not None and spare.serves(python, env):
                return
            self._spare = None
            if spare is not None:
                self._discard(spare, "another environment is wanted")
            self.directory.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            try:
                process = self.cleaner.start_spare(
                    token, [python, "-m", RUNNER_MODULE, RUNNER_SPARE_ARG], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env={**env, TOKEN_ENV: token, SPARE_CLOUDPICKLE_ENV: "1" if cloudpickle else "0"},
                    cwd=self.directory, start_new_session=True, close_fds=True)
            except OSError as error:
                LOG.warning("cannot start a spare runner with %s: %s", python, error)
                self.cleaner.spare_gone(token)
                return
            self._spare = SpareRunner(python, env, token, process)
            self.counts.started += 1

    def take(self, python: str, env: Mapping[str, str]) -> SpareRunner | None:
        """The spare, claimed for an attempt running ``python`` with ``env``; None when there is
        none that serves it (the attempt starts its own process)."""
        with self._lock:
            spare = self._spare
            if spare is None or not spare.serves(python, env):
                return None
            self._spare = None
            self.cleaner.claim_spare(spare.token)
            self.counts.used += 1
            return spare

    def close(self, reason: str) -> None:
        """Kill the spare and start no more (the agent stops)."""
        with self._lock:
            self._closed = True
        self.discard(reason)

    def discard(self, reason: str) -> None:
        """Kill the spare, if there is one (the lease lapsed: nothing may wait for a job)."""
        with self._lock:
            spare, self._spare = self._spare, None
            if spare is not None:
                self._discard(spare, reason)

    def _discard(self, spare: SpareRunner, reason: str) -> None:
        LOG.info("discarding the spare runner %d: %s", spare.process.pid, reason)
        spare.process.kill()
        try:
            spare.process.wait(DISCARD_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            LOG.warning("the spare runner %d did not exit after SIGKILL", spare.process.pid)
        for pipe in (spare.process.stdin, spare.process.stdout, spare.process.stderr):
            pipe.close()
        self.cleaner.spare_gone(spare.token)
        self.counts.discarded += 1
