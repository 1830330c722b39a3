"""Controller side of the task channel: one `AgentClient` per host, plain dataclasses out.

Every call carries the job secret and goes over TLS pinned to the job's certificate. Unary
calls have a deadline and are retried on UNAVAILABLE when repeating them is harmless (all of
them are: Prepare and Start are idempotent per attempt id on the agent, and an upload restarts
from its first chunk).

Event streams (`start`, `watch`) are read by a background thread into a buffer bounded in
bytes and events. When the consumer is slower than the host, the buffer fills, the reader
stops pulling, gRPC flow control stops the agent's sender, and the agent's own ring (also
bounded) drops its oldest events; the consumer then receives an `EventsLost` naming the gap.
Memory stays bounded everywhere and nothing is lost silently. A broken stream is resumed with
`Watch(from_seq=last seen + 1)` for up to `reconnect_seconds`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fray_tpu import tls
from fray_tpu.attempt_events import (  # noqa: F401 - channel.LogBatch etc. are the events' usual names
    AttemptEvent,
    AttemptExit,
    AttemptStarted,
    Classification,
    EventsLost,
    LogBatch,
    PreemptionNotice,
)
from fray_tpu.contract import (
    AUTH_METADATA_KEY,
    BASE_ENV_DIGEST,
    ENV_SOURCE_BUCKET,
    ENV_SOURCE_BUILT,
    ENV_SOURCE_LOCAL,
    FAILURE_KIND_KEY,
    PrepareFailureKind,
)
from fray_tpu.errors import DeadlineExceeded, FrayTpuError
from fray_tpu.proto import worker_pb2, worker_pb2_grpc

DEFAULT_TIMEOUT = 10.0
PREPARE_TIMEOUT = 1800.0
UPLOAD_CHUNK_BYTES = 1 << 20
# The agent accepts messages up to this size (a pickled callable with its arguments included).
MAX_MESSAGE_BYTES = 64 << 20
RETRIES = 4
STREAM_BUFFER_BYTES = 64 << 20
STREAM_BUFFER_EVENTS = 4096
RECONNECT_SECONDS = 60.0
_KEEPALIVE_OPTIONS = [
    # Streams run for the whole attempt without a deadline: keepalive notices a dead host.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # An agent that is still booting refuses connections; gRPC's default reconnect backoff
    # (1 s, growing) would notice it up to seconds late. Agents are on the controller's network.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]


_CLASSIFICATIONS = {
    worker_pb2.OK: Classification.OK,
    worker_pb2.USER_FAILURE: Classification.USER_FAILURE,
    worker_pb2.BAD_HOST: Classification.BAD_HOST,
    worker_pb2.PREEMPTED: Classification.PREEMPTED,
    worker_pb2.CANCELLED: Classification.CANCELLED,
}
_STREAMS = {worker_pb2.STDOUT: "stdout", worker_pb2.STDERR: "stderr"}


# -- requests and answers ------------------------------------------------------------------

@dataclass(frozen=True)
class AttemptSpec:
    """One host's share of an attempt. Exactly one of `pickled_callable` and `command`."""

    attempt_id: str
    job_id: str = ""
    task_id: str = ""
    task_index: int = 0
    pickled_callable: bytes | None = None  # cloudpickle.dumps((fn, args, kwargs))
    command: str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workspace_digest: str = ""
    pip_packages: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    python_version: str = ""
    index_url: str = ""
    env_cache: EnvCache | None = None
    start: bool = False  # start as soon as prepared (the proto's `start`)

    @staticmethod
    def for_callable(attempt_id: str, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                     **fields: Any) -> AttemptSpec:
        import cloudpickle

        return AttemptSpec(attempt_id, pickled_callable=cloudpickle.dumps((fn, tuple(args), dict(kwargs or {}))),
                           **fields)

    def to_proto(self) -> worker_pb2.AttemptSpec:
        if (self.pickled_callable is None) == (self.command is None):
            raise ValueError(f"attempt {self.attempt_id}: set exactly one of pickled_callable and command")
        message = worker_pb2.AttemptSpec(
            attempt_id=self.attempt_id, job_id=self.job_id, task_id=self.task_id, task_index=self.task_index,
            env=self.env, workspace_digest=self.workspace_digest, pip_packages=self.pip_packages,
            extras=self.extras, python_version=self.python_version, index_url=self.index_url, start=self.start,
        )
        if self.env_cache is not None:
            message.env_cache.CopyFrom(worker_pb2.EnvCache(
                storage_endpoint=self.env_cache.storage_endpoint, bucket=self.env_cache.bucket,
                builder=self.env_cache.builder, wait_seconds=self.env_cache.wait_seconds))
        if self.pickled_callable is not None:
            message.callable.pickled = self.pickled_callable
        else:
            message.binary.command = self.command
            message.binary.args.extend(self.args)
        return message


@dataclass(frozen=True)
class EnvCache:
    """Where a gang's hosts share job environments (the staging bucket) and one host's part:
    the ``builder`` builds a missing environment at once, the others wait ``wait_seconds`` for
    its archive first."""

    storage_endpoint: str
    bucket: str
    builder: bool
    wait_seconds: float


@dataclass(frozen=True)
class PrepareResult:
    attempt_id: str
    prepare_seconds: float
    env_reused: bool
    python: str
    cleanup_notes: list[str]
    env_digest: str = ""
    env_build_seconds: float = 0.0
    env_source: str = ""  # ENV_SOURCE_* ("" from an agent that does not say)
    env_seconds: float = 0.0
    env_note: str = ""
    spare_runner_used: bool = False  # the attempt runs in the host's pre-started runner

    @property
    def source(self) -> str:
        if self.env_source:
            return self.env_source
        return ENV_SOURCE_LOCAL if self.env_reused else ENV_SOURCE_BUILT


def _spread(seconds: list[float]) -> str:
    if len(seconds) == 1:
        return f"in {seconds[0]:.1f}s"
    return f"in {max(seconds):.1f}s (slowest), {min(seconds):.1f}s (fastest)"


def describe_environments(results: Sequence[tuple[int, int, PrepareResult]]) -> list[str]:
    """Progress lines on the job environments a gang's Prepares found, fetched or built: one
    per slice, from ``(slice id, worker id, result)``; none for hosts on their agent's
    interpreter."""
    lines = []
    for slice_id in sorted({s for s, _, r in results if r.env_digest and r.env_digest != BASE_ENV_DIGEST}):
        hosts = sorted((w, r) for s, w, r in results
                       if s == slice_id and r.env_digest and r.env_digest != BASE_ENV_DIGEST)
        parts = []
        for source, what in ((ENV_SOURCE_BUILT, "built with uv"), (ENV_SOURCE_BUCKET, "downloaded from the bucket"),
                             (ENV_SOURCE_LOCAL, "reused from the host's own cache")):
            chosen = [(w, r) for w, r in hosts if r.source == source]
            if not chosen:
                continue
            where = f"worker {chosen[0][0]}" if len(chosen) == 1 else f"{len(chosen)} hosts"
            timing = "" if source == ENV_SOURCE_LOCAL else " " + _spread(
                [r.env_seconds or r.env_build_seconds for _, r in chosen])
            parts.append(f"{what} on {where}{timing}")
        # The builders' notes (their uploads), the slowest download's, and every refused archive.
        downloads = [(w, r) for w, r in hosts if r.source == ENV_SOURCE_BUCKET and r.env_note]
        slowest = max(downloads, key=lambda item: item[1].env_seconds)[0] if downloads else None
        notes = [f"worker {w}: {r.env_note}" for w, r in hosts if r.env_note and (
            r.source == ENV_SOURCE_BUILT or w == slowest)]
        digests = ", ".join(sorted({r.env_digest[:12] for _, r in hosts}))
        lines.append(f"slice-{slice_id}: Python environment {digests}: {'; '.join(parts)}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


@dataclass(frozen=True)
class CurrentAttempt:
    attempt_id: str
    state: str  # PREPARING | PREPARED | RUNNING | EXITED | PREPARE_FAILED | "" (none yet)
    pid: int
    last_seq: int
    classification: Classification


@dataclass(frozen=True)
class AgentInfo:
    worker_number: int
    node_name: str
    accelerator_type: str
    ip: str
    agent_version: str
    python_version: str
    job: str
    controller: str
    hostname: str
    healthy: bool
    health_message: str
    preempted: bool
    current_attempt: CurrentAttempt | None
    cache: dict[str, int]
    lease_remaining_seconds: float
    uptime_seconds: float


# -- errors --------------------------------------------------------------------------------

class ChannelError(FrayTpuError):
    """A task-channel call failed; the message names the agent's address."""

    def __init__(self, message: str, *, address: str, code: str = ""):
        super().__init__(message)
        self.address = address
        self.code = code


class AgentUnreachable(ChannelError):
    """The agent did not answer (not up yet, host gone, or a network problem)."""


class AgentAuthError(ChannelError):
    """The agent rejected the job secret: it belongs to another job, or metadata is stale."""


class PrepareFailed(ChannelError):
    """Prepare failed; `kind` (a ``PrepareFailureKind`` value) says whose fault it is."""

    def __init__(self, message: str, *, address: str, code: str, kind: str):
        super().__init__(message, address=address, code=code)
        self.kind = kind


def _describe_rpc_error(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


# -- the client ----------------------------------------------------------------------------

class AgentClient:
    def __init__(self, address: str, *, secret: str, pinned_cert_pem: bytes, timeout: float = DEFAULT_TIMEOUT,
                 reconnect_seconds: float = RECONNECT_SECONDS):
        self.address = address
        self.pinned_cert_pem = pinned_cert_pem  # the one certificate this client trusts
        self.timeout = timeout
        self.reconnect_seconds = reconnect_seconds
        self._metadata = ((AUTH_METADATA_KEY, f"Bearer {secret}"),)
        self._channel = grpc.secure_channel(
            address,
            tls.channel_credentials(pinned_cert_pem),
            options=[
                *tls.channel_options(),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *_KEEPALIVE_OPTIONS,
                (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
            ],
        )
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        # Bundle digests the agent is known to hold. Its store evicts only when a new bundle is
        # committed, and only its holder uploads, through this client (the warm pool passes the
        # client on with the slice): an upload through it resets what is known.
        self._bundles_held: set[str] = set()

    def close(self) -> None:
        self._channel.close()

    def use_secret(self, secret: str) -> None:
        """Present ``secret`` from now on, on the same connection (after a hand-over)."""
        self._metadata = ((AUTH_METADATA_KEY, f"Bearer {secret}"),)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AgentClient({self.address!r})"

    # -- unary calls ----------------------------------------------------------------------

    def _call(self, name: str, method, request, *, timeout: float | None = None, retries: int = RETRIES):
        timeout = timeout or self.timeout
        for attempt in range(retries + 1):
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt < retries:
                    time.sleep(min(0.1 * 2 ** attempt, 2.0))
                    continue
                raise self._error(name, error) from None
        raise AssertionError("unreachable")

    def _error(self, name: str, error: grpc.RpcError) -> ChannelError:
        code = error.code()
        message = f"{name} on agent {self.address} failed: {_describe_rpc_error(error)}"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return AgentAuthError(message + " (the agent belongs to another job, or its metadata is stale)",
                                  address=self.address, code=code.name)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return AgentUnreachable(message, address=self.address, code=code.name)
        if name == "Prepare":
            kind = dict(error.trailing_metadata() or ()).get(FAILURE_KIND_KEY, PrepareFailureKind.CONTROLLER)
            return PrepareFailed(message, address=self.address, code=code.name, kind=kind)
        return ChannelError(message, address=self.address, code=code.name)

    def describe(self, *, timeout: float | None = None, retries: int = RETRIES) -> AgentInfo:
        response = self._call("Describe", self._stub.Describe, worker_pb2.DescribeRequest(),
                              timeout=timeout, retries=retries)
        return _agent_info(response)

    def wait_until_up(self, deadline: float, give_up: threading.Event | None = None) -> AgentInfo:
        """Describe, retried until it answers, `deadline` (a `time.monotonic()` value) passes or
        `give_up` is set (the slice is gone, the job stopped)."""
        give_up = give_up or threading.Event()
        last_seen = "no answer yet"
        pause = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentUnreachable(
                    f"agent at {self.address} did not answer before the deadline; last seen: {last_seen}",
                    address=self.address,
                )
            try:
                return self.describe(timeout=min(self.timeout, max(remaining, 0.05)), retries=0)
            except AgentAuthError:
                raise
            except ChannelError as error:
                last_seen = str(error)
            if give_up.wait(min(pause, max(deadline - time.monotonic(), 0))):
                raise AgentUnreachable(f"gave up waiting for the agent at {self.address}; last seen: {last_seen}",
                                       address=self.address)
            pause = min(pause * 2, 0.25)

    def holds_bundle(self, digest: str) -> bool:
        """Whether the agent is known to hold this bundle (an upload or a check through this client)."""
        return digest in self._bundles_held

    def has_bundle(self, digest: str) -> bool:
        return self._call("HasBundle", self._stub.HasBundle, worker_pb2.HasBundleRequest(digest=digest)).present

    def upload_bundle(self, bundle) -> bool:
        """Uploads a packed workspace (`digest`, `path`, `size`) unless the host has it; True if sent."""
        if self.holds_bundle(bundle.digest) or self.has_bundle(bundle.digest):
            self._bundles_held.add(bundle.digest)
            return False
        path = Path(bundle.path)
        # Generous for big bundles: at least 10 MB/s.
        timeout = max(self.timeout, 30.0 + bundle.size / 10e6)

        def chunks() -> Iterator[worker_pb2.BundleChunk]:
            with path.open("rb") as f:
                first = True
                while True:
                    data = f.read(UPLOAD_CHUNK_BYTES)
                    if not data and not first:
                        return
                    yield worker_pb2.BundleChunk(digest=bundle.digest if first else "", data=data)
                    first = False

        for attempt in range(RETRIES + 1):
            try:
                self._stub.UploadBundle(chunks(), timeout=timeout, metadata=self._metadata)
                self._bundles_held = {bundle.digest}  # the commit may have evicted the others
                return True
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt < RETRIES:
                    time.sleep(min(0.1 * 2 ** attempt, 2.0))
                    continue
                raise self._error("UploadBundle", error) from None
        raise AssertionError("unreachable")

    def prepare(self, spec: AttemptSpec, *, timeout: float = PREPARE_TIMEOUT,
                hand_over: tuple[str, str] | None = None) -> PrepareResult:
        """Cleans the host and stages the attempt; returns when it can start (else PrepareFailed).
        With ``hand_over`` (new secret, holder), a host taken warm is first handed to that holder
        (refused as ``HandOver`` refuses, as a ``PrepareFailed`` of kind ``HAND_OVER``); this
        client presents the new secret from then on."""
        message = spec.to_proto()
        if hand_over is not None:
            new_secret, holder = hand_over
            message.hand_over.CopyFrom(worker_pb2.HandOverRequest(new_secret_sha256=tls.secret_sha256(new_secret),
                                                                  holder=holder))
        if message.ByteSize() > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"attempt {spec.attempt_id}: the request is {message.ByteSize() / 1e6:.0f} MB, over the "
                f"{MAX_MESSAGE_BYTES / 1e6:.0f} MB limit; pass large data through the workspace or storage "
                f"instead of the callable's closure or arguments"
            )
        try:
            response = self._call("Prepare", self._stub.Prepare, message, timeout=timeout)
        except AgentAuthError:
            if hand_over is None:
                raise
            # A call whose answer was lost may have handed the host over already: then only
            # the new secret works, and the repeat finds the attempt prepared (or preparing).
            self.use_secret(hand_over[0])
            response = self._call("Prepare", self._stub.Prepare, message, timeout=timeout)
        if hand_over is not None:
            self.use_secret(hand_over[0])
        return PrepareResult(
            attempt_id=response.attempt_id, prepare_seconds=response.prepare_seconds,
            env_reused=response.env_reused, python=response.python, cleanup_notes=list(response.cleanup_notes),
            env_digest=response.env_digest, env_build_seconds=response.env_build_seconds,
            env_source=response.env_source, env_seconds=response.env_seconds, env_note=response.env_note,
            spare_runner_used=response.spare_runner_used,
        )

    def cancel(self, attempt_id: str, grace: float) -> bool:
        """Stops the attempt (SIGTERM, SIGKILL after `grace`); True if it was running."""
        request = worker_pb2.CancelRequest(attempt_id=attempt_id, grace_seconds=grace)
        return self._call("Cancel", self._stub.Cancel, request, timeout=grace + 30.0).was_running

    def renew_lease(self, seconds: float = 0.0, *, timeout: float | None = None) -> float:
        """Renews the lease (for `seconds`, or the configured period); returns what remains."""
        request = worker_pb2.RenewLeaseRequest(lease_seconds=seconds)
        return self._call("RenewLease", self._stub.RenewLease, request, timeout=timeout).lease_remaining_seconds

    def hand_over(self, new_secret: str, holder: str, *, timeout: float | None = None) -> list[str]:
        """Clean the host and make the agent accept only ``new_secret`` (this client's secret
        stops working); returns the cleaning notes."""
        request = worker_pb2.HandOverRequest(new_secret_sha256=tls.secret_sha256(new_secret), holder=holder)
        return list(self._call("HandOver", self._stub.HandOver, request, timeout=timeout).cleanup_notes)

    # -- streams --------------------------------------------------------------------------

    def start(self, attempt_id: str, *, read: bool = True, **buffer: int) -> EventStream:
        """Starts a prepared attempt; iterate the result for its events, ending with AttemptExit
        (with ``read=False``, call its ``read()`` first)."""
        return EventStream(self, attempt_id, from_seq=0, read=read, **buffer)

    def watch(self, attempt_id: str, from_seq: int = 1, *, read: bool = True, **buffer: int) -> EventStream:
        """Events of an attempt from `from_seq` on (resume after a controller restart)."""
        return EventStream(self, attempt_id, from_seq=max(from_seq, 1), read=read, **buffer)

    def _open_stream(self, attempt_id: str, from_seq: int):
        if from_seq == 0:
            return self._stub.Start(worker_pb2.StartRequest(attempt_id=attempt_id), metadata=self._metadata)
        request = worker_pb2.WatchRequest(attempt_id=attempt_id, from_seq=from_seq)
        return self._stub.Watch(request, metadata=self._metadata)


def _agent_info(response: worker_pb2.DescribeResponse) -> AgentInfo:
    identity = response.identity
    current = response.current_attempt
    return AgentInfo(
        worker_number=identity.worker_number, node_name=identity.node_name,
        accelerator_type=identity.accelerator_type, ip=identity.ip, agent_version=identity.agent_version,
        python_version=identity.python_version, job=identity.job, controller=identity.controller,
        hostname=identity.hostname, healthy=response.health == worker_pb2.HEALTHY,
        health_message=response.health_message, preempted=response.preempted,
        current_attempt=CurrentAttempt(
            attempt_id=current.attempt_id,
            state=worker_pb2.AttemptState.Name(current.state) if current.state else "",
            pid=current.pid, last_seq=current.last_seq,
            classification=_CLASSIFICATIONS.get(current.classification, Classification.UNSPECIFIED),
        ) if current.attempt_id else None,
        cache={
            "bundles_cached": response.cache.bundles_cached,
            "bundle_uploads": response.cache.bundle_uploads,
            "bundle_upload_skips": response.cache.bundle_upload_skips,
            "envs_created": response.cache.envs_created,
            "envs_reused": response.cache.envs_reused,
            "spare_runners_started": response.cache.spare_runners_started,
            "spare_runners_used": response.cache.spare_runners_used,
            "spare_runners_discarded": response.cache.spare_runners_discarded,
        },
        lease_remaining_seconds=response.lease_remaining_seconds,
        uptime_seconds=response.uptime_seconds,
    )


def to_event(message: worker_pb2.AttemptEvent) -> AttemptEvent | None:
    kind = message.WhichOneof("event")
    if kind == "log":
        batch = message.log
        return LogBatch(stream=_STREAMS.get(batch.stream, "stdout"),
                        lines=batch.data.decode("utf-8", errors="replace").split("\n"),
                        timestamp=batch.timestamp, seq=message.seq)
    if kind == "started":
        return AttemptStarted(pid=message.started.pid, timestamp=message.started.timestamp, seq=message.seq)
    if kind == "exit":
        exit_ = message.exit
        return AttemptExit(
            code=exit_.code if exit_.HasField("code") else None,
            signal=exit_.signal if exit_.HasField("signal") else None,
            classification=_CLASSIFICATIONS.get(exit_.classification, Classification.UNSPECIFIED),
            stderr_tail=exit_.stderr_tail, reason=exit_.reason, seq=message.seq,
        )
    if kind == "preempted":
        return PreemptionNotice(timestamp=message.preempted.timestamp, seq=message.seq)
    if kind == "lost":
        return EventsLost(requested_from_seq=message.lost.requested_from_seq,
                          first_available_seq=message.lost.first_available_seq)
    return None  # a newer agent's event kind: skip it


class _BoundedBuffer:
    """A FIFO bounded by item count and bytes; `put` blocks while full."""

    def __init__(self, max_items: int, max_bytes: int):
        self._items: deque[tuple[object, int]] = deque()
        self._bytes = 0
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._cond = threading.Condition()

    def put(self, item: object, size: int, abandoned: threading.Event) -> bool:
        """False when the consumer went away while waiting for room."""
        with self._cond:
            while self._items and (len(self._items) >= self._max_items or self._bytes + size > self._max_bytes):
                if abandoned.is_set():
                    return False
                self._cond.wait(0.5)
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None) -> object:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                self._cond.wait(remaining)
            item, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return item


_END = object()


class EventStream:
    """The events of one attempt, read ahead by a thread into a bounded buffer.

    Iterate it (ends after `AttemptExit`), or call `next_event(timeout)`. `close()` cancels the
    stream; the attempt itself keeps running (use `AgentClient.cancel` to stop it).
    """

    def __init__(self, client: AgentClient, attempt_id: str, *, from_seq: int, read: bool = True,
                 buffer_events: int = STREAM_BUFFER_EVENTS, buffer_bytes: int = STREAM_BUFFER_BYTES):
        self.attempt_id = attempt_id
        self.last_seq = max(from_seq - 1, 0)
        self._client = client
        self._buffer = _BoundedBuffer(buffer_events, buffer_bytes)
        self._closed = threading.Event()
        self._call = None
        self._finished = False
        self._first_from_seq = from_seq
        # The first call leaves from the caller's thread, not the reader's: a gang's Start calls
        # go out back to back instead of each behind a thread's start (the call is sent when made).
        try:
            self._call = client._open_stream(attempt_id, from_seq)
        except ValueError:
            self._call = None  # the client is closed: the reader reports it
        self._reader = threading.Thread(target=self._read, args=(self._call,),
                                        name=f"events-{attempt_id}@{client.address}", daemon=True)
        if read:
            self.read()

    def read(self) -> None:
        """Start reading the events ahead (at construction unless ``read=False``: a gang's calls
        are all sent first, then each reader thread started)."""
        if self._reader.ident is None:
            self._reader.start()

    def _read(self, opened) -> None:
        from_seq = self._first_from_seq
        disconnected_at: float | None = None
        pause = 0.05
        while not self._closed.is_set():
            try:
                self._call = opened if opened is not None else self._client._open_stream(self.attempt_id, from_seq)
                opened = None
                if self._closed.is_set():
                    self._call.cancel()
                    return
                for message in self._call:
                    disconnected_at, pause = None, 0.05
                    if message.seq:
                        self.last_seq = message.seq
                    event = to_event(message)
                    if event is None:
                        continue
                    size = len(message.log.data) if isinstance(event, LogBatch) else 64
                    if not self._buffer.put(event, size, self._closed):
                        return
                    if isinstance(event, AttemptExit):
                        self._buffer.put(_END, 0, self._closed)
                        return
                # The agent ended the stream before the exit (it is shutting down): resume.
                problem = "the stream ended before the attempt's exit"
            except grpc.RpcError as error:
                if self._closed.is_set():
                    return
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                        grpc.StatusCode.CANCELLED):
                    self._buffer.put(self._client._error(f"stream of attempt {self.attempt_id}", error), 0,
                                     self._closed)
                    return
                problem = _describe_rpc_error(error)
            except ValueError as error:  # the client was closed under the stream
                self._buffer.put(ChannelError(f"stream of attempt {self.attempt_id}: {error}",
                                              address=self._client.address), 0, self._closed)
                return
            now = time.monotonic()
            disconnected_at = disconnected_at or now
            if now - disconnected_at > self._client.reconnect_seconds:
                self._buffer.put(AgentUnreachable(
                    f"lost the event stream of attempt {self.attempt_id} from agent {self._client.address} "
                    f"for {self._client.reconnect_seconds:.0f}s (last: {problem}); resume later with "
                    f"watch(from_seq={self.last_seq + 1})", address=self._client.address), 0, self._closed)
                return
            self._closed.wait(pause)
            pause = min(pause * 2, 2.0)
            # Start is idempotent; once anything arrived, resume after the last event seen.
            from_seq = self.last_seq + 1 if self.last_seq else self._first_from_seq

    def next_event(self, timeout: float | None = None) -> AttemptEvent:
        """The next event; raises StopIteration after the exit, DeadlineExceeded on timeout."""
        if self._finished:
            raise StopIteration
        try:
            item = self._buffer.get(timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no event of attempt {self.attempt_id} from agent {self._client.address} within {timeout}s"
            ) from None
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, Exception):
            self._finished = True
            raise item
        return item  # type: ignore[return-value]

    def __iter__(self) -> Iterator[AttemptEvent]:
        return self

    def __next__(self) -> AttemptEvent:
        return self.next_event()

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._reader.ident is not None:
            self._reader.join(5)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
