"""One attempt on this host: a fresh process group, its output as line batches, its exit.

Output is read in large chunks (up to 1 MiB per read from 1 MiB pipes) and each read's complete
lines become one `LogBatch` event, so throughput does not depend on lines being short or many.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.contract import RUNNER_GO_BYTE as GO_BYTE
from fray_tpu.contract import RUNNER_HOLD_ENV as HOLD_ENV
from fray_tpu.proto import worker_pb2
from fray_tpu.worker import cleanup
from fray_tpu.worker.classify import classify_exit, find_bad_host_line
from fray_tpu.worker.events import EventLog
from fray_tpu.worker.spare import SpareRunner

READ_SIZE = 1 << 20
PIPE_SIZE = 1 << 20
# A line longer than this is cut, so one endless line cannot grow memory without bound.
MAX_LINE_BYTES = 1 << 20
STDERR_TAIL_BYTES = 8 << 10
# A longer stderr line is kept in the tail as its start and end, so one huge line (an exception
# with a 1 MB message) cannot push everything before it, or its own start, out of the tail.
TAIL_LINE_BYTES = 2 << 10
TAIL_LINE_HEAD_BYTES = 1 << 10
TAIL_LINE_END_BYTES = 256
# After the main process exits, how long its pipes may still deliver output before they are cut.
DRAIN_SECONDS = 5.0
KILL_WAIT_SECONDS = 10.0
_F_SETPIPE_SZ = 1031


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    # Start the runner at prepare time, loaded and waiting on stdin for the go byte, so that
    # starting the gang costs a write instead of a Python start-up (the runner honours HOLD_ENV).
    hold: bool = False
    # A held plan's runner already started (`spare.py`): it gets `env`, `cwd` and the payload
    # file (argv's last item) on its stdin instead of being spawned.
    spare: SpareRunner | None = None


def shortened_tail(data: bytes, limit: int) -> bytes:
    """The last lines of `data` (whole lines, newline-joined) within about `limit` bytes, each line
    longer than TAIL_LINE_BYTES cut to its start and end. Looks at no more lines than it keeps."""
    kept: list[bytes] = []
    size = 0
    end = len(data)
    while end >= 0 and size < limit:
        start = data.rfind(b"\n", 0, end) + 1
        line = data[start:end]
        if len(line) > TAIL_LINE_BYTES:
            cut = len(line) - TAIL_LINE_HEAD_BYTES - TAIL_LINE_END_BYTES
            line = b"%s ... [%d bytes cut] ... %s" % (line[:TAIL_LINE_HEAD_BYTES], cut, line[-TAIL_LINE_END_BYTES:])
        kept.append(line)
        size += len(line) + 1
        end = start - 1
    return b"\n".join(reversed(kept))


class LineSplitter:
    """Turns arbitrary chunks into runs of whole lines (newline-joined, no trailing newline)."""

    def __init__(self) -> None:
        self._partial = b""
        self._partial_since = 0.0

    def feed(self, chunk: bytes, now: float) -> tuple[bytes, int, float] | None:
        """(data, line_count, time of the first line) of the lines `chunk` completes, if any."""
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            if not self._partial:
                self._partial_since = now
            self._partial += chunk
            if len(self._partial) < MAX_LINE_BYTES:
                return None
            return self.flush()
        first_time = self._partial_since if self._partial else now
        data = self._partial + chunk[:last_newline] if self._partial else chunk[:last_newline]
        self._partial = chunk[last_newline + 1 :]
        self._partial_since = now
        return data, data.count(b"\n") + 1, first_time

    def flush(self) -> tuple[bytes, int, float] | None:
        if not self._partial:
            return None
        data, self._partial = self._partial, b""
        return data, 1, self._partial_since


class Attempt:
    def __init__(self, attempt_id: str, plan: LaunchPlan, *, is_preempted: Callable[[], bool],
                 host: cleanup.ProcessTracker | None = None, events: EventLog | None = None):
        self.attempt_id = attempt_id
        self.events = events or EventLog()
        self._plan = plan
        self._host = host or cleanup.ProcessTracker()
        self._is_preempted = is_preempted
        self._lock = threading.Lock()
        self._state = worker_pb2.PREPARED
        self._token = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        self._cancel_reason: str | None = None
        self._exited = threading.Event()
        self._stop_reading = threading.Event()
        self._stderr_tail = b""
        self._bad_host_line: str | None = None
        self.classification = worker_pb2.CLASSIFICATION_UNSPECIFIED

    @property
    def state(self) -> int:
        return self._state

    @property
    def pid(self) -> int:
        return self._process.pid if self._process else 0

    def prespawn(self) -> None:
        """For a held plan: start the process now; it waits for `start()` to run user code."""
        with self._lock:
            if self._plan.hold and self._state == worker_pb2.PREPARED and self._process is None:
                self._spawn()

    def start(self) -> bool:
        """Runs the attempt once (spawning it, or releasing a held one); later calls do nothing.
        Returns whether this call started it."""
        with self._lock:
            if self._state != worker_pb2.PREPARED:
                return False
            if self._process is None:
                self._spawn(go=True)
                if self._state == worker_pb2.EXITED:
                    return False
            elif self._plan.hold:
                self._release()
            self._state = worker_pb2.RUNNING
            self.events.append(worker_pb2.AttemptEvent(
                started=worker_pb2.Started(pid=self._process.pid, timestamp=time.time())))
            return True

    def _release(self) -> None:
        """The go byte to a held process (user code runs), and the end of its stdin."""
        try:
            self._process.stdin.write(GO_BYTE)
            self._process.stdin.close()
        except OSError:
            pass  # it died while held: its exit is on the way

    def _spawn(self, go: bool = False) -> None:
        """Start the process (a held one waits for the go byte; with ``go`` it gets it at once,
        before its output readers start: output waits in the pipes meanwhile)."""
        if self._plan.spare is not None and self._hand_to_spare(self._plan.spare):
            if go:
                self._release()
            self._follow_process()
            return
        self._host.record(self._token)
        env = dict(self._plan.env)
        env[cleanup.TOKEN_ENV] = self._token
        if self._plan.hold:
            env[HOLD_ENV] = "1"
        try:
            self._process = subprocess.Popen(
                self._host.tracked_argv(self._token, self._plan.argv),
                stdin=subprocess.PIPE if self._plan.hold else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self._plan.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except Exception as error:  # noqa: BLE001 - argv, env and cwd come from the job's request
            # What a shell reports for a command it cannot run: exit 127 with the reason, the
            # job's failure (a NUL byte in an env var is a ValueError, not a broken host).
            self._stderr_tail = (f"cannot start {self._plan.argv[0]!r}: "
                                 f"{type(error).__name__}: {error}").encode()
            self._finish(returncode=127, started=False)
            return
        if go and self._plan.hold:
            self._release()
        self._follow_process()

    def _hand_to_spare(self, spare: SpareRunner) -> bool:
        """Make the claimed spare runner this attempt's process; False (the spare killed) when
        it died meanwhile, and a process is spawned instead."""
        self._token = spare.token
        env = {**self._plan.env, cleanup.TOKEN_ENV: spare.token, HOLD_ENV: "1"}
        header = json.dumps({"env": env, "cwd": str(self._plan.cwd), "payload": self._plan.argv[-1]})
        try:
            spare.process.stdin.write(header.encode() + b"\n")
            spare.process.stdin.flush()
        except OSError:
            spare.process.kill()
            spare.process.wait()
            for pipe in (spare.process.stdin, spare.process.stdout, spare.process.stderr):
                pipe.close()
            self._host.exited(spare.process.pid)
            self._host.forget(spare.token)
            self._token = uuid.uuid4().hex
            return False
        self._process = spare.process
        return True

    def _follow_process(self) -> None:
        self._host.started(self._process.pid)
        for pipe in (self._process.stdout, self._process.stderr):
            try:
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # over the system's pipe-max-size: the default size still works
        reader = threading.Thread(target=self._read_output, name=f"output-{self.attempt_id}", daemon=True)
        reader.start()
        threading.Thread(target=self._wait_for_exit, args=(reader,), name=f"wait-{self.attempt_id}",
                         daemon=True).start()

    def _read_output(self) -> None:
        process = self._process
        assert process is not None
        selector = selectors.DefaultSelector()
        streams = {
            process.stdout.fileno(): (worker_pb2.STDOUT, LineSplitter()),
            process.stderr.fileno(): (worker_pb2.STDERR, LineSplitter()),
        }
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while streams and not self._stop_reading.is_set():
                for key, _ in selector.select(timeout=0.2):
                    fd = key.fd
                    stream, splitter = streams[fd]
                    chunk = os.read(fd, READ_SIZE)
                    if chunk:
                        self._emit(stream, splitter.feed(chunk, time.time()))
                    else:
                        self._emit(stream, splitter.flush())
                        selector.unregister(fd)
                        del streams[fd]
            for stream, splitter in streams.values():
                self._emit(stream, splitter.flush())
        finally:
            selector.close()
            process.stdout.close()
            process.stderr.close()

    def _emit(self, stream: int, lines: tuple[bytes, int, float] | None) -> None:
        if lines is None:
            return
        data, count, first_time = lines
        if stream == worker_pb2.STDERR:
            self._stderr_tail = (self._stderr_tail + b"\n" + shortened_tail(data, STDERR_TAIL_BYTES))[-STDERR_TAIL_BYTES:]
            if self._bad_host_line is None:
                self._bad_host_line = find_bad_host_line(data)
        self.events.append(worker_pb2.AttemptEvent(
            log=worker_pb2.LogBatch(stream=stream, timestamp=first_time, data=data, line_count=count)))

    def _wait_for_exit(self, reader: threading.Thread) -> None:
        process = self._process
        assert process is not None
        returncode = process.wait()
        self._host.exited(process.pid)
        # Whatever the main process left behind would hold the TPU: the attempt ends with it, and
        # its exit is reported only once they are gone (mostly nothing is left: one look).
        gone = not self._members()
        if not gone:
            self._signal_everything(signal.SIGKILL)
            gone = cleanup.wait_until(lambda: not self._members(), time.monotonic() + KILL_WAIT_SECONDS, 0.01)
        if gone:
            self._host.forget(self._token)
        reader.join(DRAIN_SECONDS)
        if reader.is_alive():
            # Something outside the group still holds the pipes open.
            self._stop_reading.set()
            reader.join(DRAIN_SECONDS)
        with self._lock:
            self._finish(returncode=returncode, started=self._state == worker_pb2.RUNNING)

    def _finish(self, *, returncode: int, started: bool) -> None:
        tail = self._stderr_tail.lstrip(b"\n").decode("utf-8", errors="replace")
        classification, reason = classify_exit(
            returncode=returncode,
            cancel_reason=self._cancel_reason,
            preempted=self._is_preempted(),
            bad_host_line=self._bad_host_line,
        )
        if not started and self._cancel_reason is not None:
            reason = f"{reason} before it started"
        exit_event = worker_pb2.Exit(classification=classification, stderr_tail=tail, reason=reason,
                                     timestamp=time.time())
        if returncode >= 0:
            exit_event.code = returncode
        else:
            exit_event.signal = -returncode
        self.classification = classification
        self._state = worker_pb2.EXITED
        self.events.append(worker_pb2.AttemptEvent(exit=exit_event), final=True)
        self._exited.set()

    def notify_preempted(self) -> None:
        with self._lock:
            if self._state != worker_pb2.EXITED:
                self.events.append(worker_pb2.AttemptEvent(preempted=worker_pb2.PreemptionNotice(timestamp=time.time())))

    def _members(self) -> list[int]:
        process = self._process
        if process is None:
            return []
        return self._host.members(self._token, process.pid)

    def _signal_everything(self, sig: int) -> None:
        process = self._process
        if process is None:
            return
        self._host.signal(self._token, process.pid, sig)

    def cancel(self, grace_seconds: float, reason: str = "cancelled") -> bool:
        """SIGTERM to everything of the attempt, SIGKILL after the grace; returns when all is gone.

        Returns whether the attempt was running.
        """
        with self._lock:
            if self._state == worker_pb2.EXITED:
                return False
            if self._cancel_reason is None:
                self._cancel_reason = reason
            if self._state == worker_pb2.PREPARED and self._process is None:
                self._finish(returncode=-signal.SIGTERM, started=False)
                return False
        self._signal_everything(signal.SIGTERM)
        if not cleanup.wait_until(lambda: not self._members(), time.monotonic() + max(grace_seconds, 0.0), 0.01):
            self._signal_everything(signal.SIGKILL)
            if not cleanup.wait_until(lambda: not self._members(), time.monotonic() + KILL_WAIT_SECONDS, 0.05):
                raise cleanup.HostNotClean(
                    f"attempt {self.attempt_id}: processes {self._members()} survived SIGKILL for "
                    f"{KILL_WAIT_SECONDS:.0f}s"
                )
        if not self._exited.wait(KILL_WAIT_SECONDS + 2 * DRAIN_SECONDS):
            raise cleanup.HostNotClean(f"attempt {self.attempt_id}: no exit status after its processes were killed")
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)
