"""The agent's gRPC service: one attempt at a time, prepared then started as a gang member."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import re
import shutil
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fray_tpu import contract, tls
from fray_tpu.contract import BASE_ENV_DIGEST, FAILURE_KIND_KEY, PrepareFailureKind
from fray_tpu.errors import ConfigError, EnvironmentBuildError
from fray_tpu.proto import worker_pb2, worker_pb2_grpc
from fray_tpu.worker import cleanup, uvfetch
from fray_tpu.worker.attempt import Attempt, LaunchPlan
from fray_tpu.worker.auth import SecretInterceptor, valid_sha256_hex
from fray_tpu.worker.lease import Lease
from fray_tpu.worker.settings import AgentSettings
from fray_tpu.worker.spare import SpareRunners

LOG = logging.getLogger("fray_tpu.worker")
# Bounds what even an unauthenticated peer can make the agent buffer (gRPC reads a message
# before the interceptor's verdict). Payloads above it belong in the workspace bundle.
MAX_RECEIVE_BYTES = 64 << 20
MAX_SEND_BYTES = 16 << 20
SERVER_THREADS = 32
KEEP_FINISHED_ATTEMPTS = 4
LEASE_CANCEL_GRACE_SECONDS = 10.0
SELF_DELETE_BACKUP_DELAY_SECONDS = 30.0
PREEMPTED_REFUSAL = "this VM is being preempted"
SPARE_AFTER_START_SECONDS = 2.0
SECRET_FILE = "secret.sha256"  # the secret handed over last (a warm slice), kept across agent restarts
_ATTEMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PrepareFailed(Exception):
    """A Prepare that cannot succeed; `kind` tells the controller whose fault it is."""

    def __init__(self, code: grpc.StatusCode, kind: PrepareFailureKind, message: str):
        super().__init__(message)
        self.code = code
        self.kind = kind


class HandOverRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Slot:
    """One attempt on this host, from Prepare on."""

    attempt_id: str
    ready: threading.Event = field(default_factory=threading.Event)
    attempt: Attempt | None = None
    response: worker_pb2.PrepareResponse | None = None
    failure: PrepareFailed | None = None
    # A Cancel that arrived while preparing: the attempt is cancelled as soon as it exists.
    cancel_reason: str | None = None

    @property
    def state(self) -> int:
        if not self.ready.is_set():
            return worker_pb2.PREPARING
        if self.failure is not None:
            return worker_pb2.PREPARE_FAILED
        return self.attempt.state


class Agent(worker_pb2_grpc.WorkerServicer):
    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self._preempted = threading.Event()
        self._started_at = time.monotonic()
        self._lock = threading.Lock()
        self._slots: dict[str, Slot] = {}
        self._current: Slot | None = None
        self._counters = {"upload_skips": 0, "envs_created": 0, "envs_reused": 0}
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._attempts_dir = settings.state_dir / "attempts"
        self._attempts_dir.mkdir(exist_ok=True)
        self._cleaner = cleanup.HostCleaner(
            settings.state_dir, settings.libtpu_lockfile, check_devices=not settings.emulated
        )
        LOG.info("attempt processes are tracked by token%s%s",
                 f", by cgroup under {self._cleaner.cgroups.root}" if self._cleaner.cgroups else "",
                 ", and as their subreaper" if cleanup.is_child_subreaper() else "")
        from fray_tpu.worker.bundles import BundleStore

        self._bundles = BundleStore(settings.state_dir / "bundles")
        self._pyenvs = None
        self.uv = uvfetch.for_process()
        self.lease = Lease(settings.lease_seconds, self._lease_expired, first_period_seconds=settings.first_lease_seconds)
        self.spares = SpareRunners(self._cleaner, settings.state_dir / "spare", allowed=self._spare_allowed)
        # The interpreter and starting environment of the last attempt that ran a callable: what
        # the spare runner is kept ready for.
        self._runner_env: tuple[str, dict[str, str]] | None = None
        self._payload_by_value = True  # whether the last attempt's payload needs cloudpickle
        self.auth = SecretInterceptor(settings.secret_sha256, persist_path=settings.state_dir / SECRET_FILE)
        self._identity = worker_pb2.WorkerIdentity(
            worker_number=settings.worker_number, node_name=settings.node_name,
            accelerator_type=settings.accelerator_type, ip=settings.ip, agent_version=contract.VERSION,
            python_version=platform.python_version(), job=settings.job, controller=settings.controller,
            hostname=socket.gethostname(),
        )

    # -- identity -------------------------------------------------------------------------

    def Describe(self, request, context):
        current = self._current
        status = worker_pb2.AttemptStatus()
        if current is not None:
            status.attempt_id = current.attempt_id
            status.state = current.state
            if current.attempt is not None:
                status.pid = current.attempt.pid
                status.last_seq = current.attempt.events.last_seq
                status.classification = current.attempt.classification
        bundle_stats = self._bundles.stats()
        return worker_pb2.DescribeResponse(
            identity=self._identity,
            health=worker_pb2.HEALTHY,
            preempted=self._preempted.is_set(),
            current_attempt=status,
            cache=worker_pb2.CacheStats(
                bundles_cached=len(os.listdir(self._bundles.root / "blobs")),
                bundle_uploads=bundle_stats.get("uploads", 0),
                bundle_upload_skips=self._counters["upload_skips"],
                envs_created=self._counters["envs_created"],
                envs_reused=self._counters["envs_reused"],
                spare_runners_started=self.spares.counts.started,
                spare_runners_used=self.spares.counts.used,
                spare_runners_discarded=self.spares.counts.discarded,
            ),
            lease_remaining_seconds=self.lease.remaining(),
            uptime_seconds=time.monotonic() - self._started_at,
        )

    # -- prepare ----------------------------------------------------------------------------

    def Prepare(self, spec, context):
        try:
            return self.prepare(spec)
        except PrepareFailed as failure:
            context.set_trailing_metadata(((FAILURE_KIND_KEY, str(failure.kind)),))
            context.abort(failure.code, str(failure))

    def prepare(self, spec: worker_pb2.AttemptSpec) -> worker_pb2.PrepareResponse:
        if not _ATTEMPT_ID.fullmatch(spec.attempt_id):
            raise PrepareFailed(grpc.StatusCode.INVALID_ARGUMENT, PrepareFailureKind.CONTROLLER,
                                f"attempt id {spec.attempt_id!r} must match {_ATTEMPT_ID.pattern}")
        if spec.WhichOneof("payload") is None:
            raise PrepareFailed(grpc.StatusCode.INVALID_ARGUMENT, PrepareFailureKind.CONTROLLER,
                                f"attempt {spec.attempt_id} has neither a callable nor a binary")
        with self._lock:
            slot = self._slots.get(spec.attempt_id)
            fresh = slot is None
            if fresh:
                if spec.HasField("hand_over") and not self.auth.accepts(spec.hand_over.new_secret_sha256):
                    # A host taken warm: handed to the job first, under the same lock, so the
                    # slot below exists once the new secret does (a repeat finds it).
                    try:
                        self._hand_over(spec.hand_over)
                    except HandOverRefused as refusal:
                        raise PrepareFailed(refusal.code, PrepareFailureKind.HAND_OVER, str(refusal)) from None
                if self.lease.expired:
                    raise PrepareFailed(grpc.StatusCode.FAILED_PRECONDITION, PrepareFailureKind.CONTROLLER,
                                        "the controller's lease expired; renew it before preparing an attempt")
                busy = self._current
                if busy is not None and busy.state in (worker_pb2.PREPARING, worker_pb2.RUNNING):
                    raise PrepareFailed(grpc.StatusCode.FAILED_PRECONDITION, PrepareFailureKind.CONTROLLER,
                                        f"attempt {busy.attempt_id} is still active on this host; cancel it first")
                slot = Slot(spec.attempt_id)
                self._slots[spec.attempt_id] = slot
                self._current = slot
                self._forget_old_slots()
        if fresh:
            try:
                slot.response = self._prepare(spec, slot)
            except PrepareFailed as failure:
                slot.failure = failure
            except Exception as error:  # noqa: BLE001 - any other failure is this host's problem
                LOG.exception("preparing attempt %s failed", spec.attempt_id)
                slot.failure = PrepareFailed(grpc.StatusCode.INTERNAL, PrepareFailureKind.BAD_HOST,
                                             f"preparing attempt {spec.attempt_id} failed on this host: {error}")
            finally:
                slot.ready.set()
            # Cancel sets the reason before it looks at `ready`; this looks after setting it.
            if slot.cancel_reason is not None and slot.attempt is not None:
                slot.attempt.cancel(0.0, reason=slot.cancel_reason)
        slot.ready.wait()
        if slot.failure is not None:
            raise slot.failure
        if spec.start:
            refusal = self._start(slot.attempt)
            if refusal is not None:
                raise PrepareFailed(grpc.StatusCode.FAILED_PRECONDITION, PrepareFailureKind.CONTROLLER, refusal)
        return slot.response

    def _prepare(self, spec: worker_pb2.AttemptSpec, slot: Slot) -> worker_pb2.PrepareResponse:
        began = time.monotonic()
        try:
            notes = self._cleaner.clean()
        except cleanup.HostNotClean as error:
            raise PrepareFailed(grpc.StatusCode.INTERNAL, PrepareFailureKind.BAD_HOST, f"host not clean: {error}") from error
        for note in notes:
            LOG.info("attempt %s: %s", spec.attempt_id, note)
        workspace = self._workspace(spec)
        python_env = self._python_env(spec, workspace)
        python, env_vars = python_env.python, dict(python_env.env_vars)
        attempt_dir = self._attempts_dir / spec.attempt_id
        shutil.rmtree(attempt_dir, ignore_errors=True)
        attempt_dir.mkdir(parents=True)
        callable_payload = spec.WhichOneof("payload") == "callable"
        env = self._attempt_env(spec, env_vars, workspace)
        spare = None
        if callable_payload:
            payload = attempt_dir / "payload.pkl"
            payload.write_bytes(spec.callable.pickled)
            argv = [python, "-m", contract.RUNNER_MODULE, str(payload)]
            spare = self.spares.take(python, env)
            self._runner_env = (python, self._runner_base_env(env_vars))
            # A payload pickled by value names cloudpickle (its loader); one by reference does not.
            self._payload_by_value = b"cloudpickle" in spec.callable.pickled
        else:
            argv = [spec.binary.command, *spec.binary.args]
        slot.attempt = Attempt(
            spec.attempt_id,
            LaunchPlan(argv=argv, env=env, cwd=workspace or attempt_dir, hold=callable_payload, spare=spare),
            host=self._cleaner,
            is_preempted=self._preempted.is_set,
        )
        if not spec.start:
            slot.attempt.prespawn()  # a start in this call spawns it and lets it go at once
        return worker_pb2.PrepareResponse(
            attempt_id=spec.attempt_id, prepare_seconds=time.monotonic() - began,
            env_reused=python_env.reused, python=python, cleanup_notes=notes, env_digest=python_env.digest,
            env_build_seconds=python_env.seconds if python_env.source == contract.ENV_SOURCE_BUILT else 0.0,
            env_source=python_env.source, env_seconds=python_env.seconds, env_note=python_env.note,
            spare_runner_used=spare is not None,
        )

    def _spare_allowed(self) -> bool:
        """No runner waits for a job after the controller's lease lapsed, nor on a host about to go."""
        return not self.lease.expired and not self._preempted.is_set()

    def _keep_spare_ready(self, *, when=lambda: None, for_retry: bool = False) -> None:
        """A spare runner for the next attempt, in the environment the last one used; for a
        retry (the same payload), with cloudpickle loaded ahead only if that payload needs it."""
        if self._runner_env is not None:
            self.spares.keep_ready(*self._runner_env, when=when,
                                   cloudpickle=self._payload_by_value or not for_retry)

    def _workspace(self, spec: worker_pb2.AttemptSpec) -> Path | None:
        if not spec.workspace_digest:
            return None
        from fray_tpu.worker.bundles import BundleError

        try:
            return self._bundles.extracted(spec.workspace_digest)
        except BundleError as error:
            raise PrepareFailed(grpc.StatusCode.FAILED_PRECONDITION, PrepareFailureKind.CONTROLLER, str(error)) from error

    def _python_env(self, spec: worker_pb2.AttemptSpec, workspace: Path | None):
        from fray_tpu.worker.envarchive import EnvBucket, MetadataToken
        from fray_tpu.worker.pyenv import EnvRequest, PythonEnv, PythonEnvStore, UvSettings, needs_own_env

        request = EnvRequest(pip_packages=tuple(spec.pip_packages), extras=tuple(spec.extras), workspace_dir=workspace,
                             python_version=spec.python_version, index_url=spec.index_url)
        cache = spec.env_cache if spec.HasField("env_cache") else None
        bucket = None if cache is None else EnvBucket(cache.storage_endpoint, cache.bucket, builder=cache.builder,
                                                      wait_seconds=cache.wait_seconds, attempt_id=spec.attempt_id)
        try:
            if not needs_own_env(request):
                return PythonEnv(sys.executable, {}, BASE_ENV_DIGEST, contract.ENV_SOURCE_BASE)
            if self._pyenvs is None:
                self._pyenvs = PythonEnvStore(self.settings.state_dir / "pyenvs",
                                              UvSettings.from_environ(self.uv.environ()),
                                              storage_token=MetadataToken())
            env = self._pyenvs.ensure(request, lambda line: LOG.info("attempt %s env: %s", spec.attempt_id, line),
                                      bucket)
        except (EnvironmentBuildError, ConfigError) as error:
            # The request's to fix (an unresolvable requirement, a stale lock, a Python uv cannot
            # find): building it again anywhere gives the same answer.
            raise PrepareFailed(grpc.StatusCode.FAILED_PRECONDITION, PrepareFailureKind.ENVIRONMENT,
                                f"the job's Python environment (Python {request.python_version or 'of the agent'}, "
                                f"pip_packages {list(spec.pip_packages)}, extras {list(spec.extras)}"
                                f"{', uv.lock of the workspace' if request.locked else ''}) could not be built: "
                                f"{error}") from error
        self._counters["envs_reused" if env.reused else "envs_created"] += 1
        return env

    @staticmethod
    def _runner_base_env(env_vars: dict[str, str]) -> dict[str, str]:
        """What every attempt's environment starts from: the agent's, the job environment's
        activation variables; nothing of any job."""
        env = dict(os.environ)
        env.update(env_vars)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _attempt_env(self, spec: worker_pb2.AttemptSpec, env_vars: dict[str, str],
                     workspace: Path | None) -> dict[str, str]:
        env = self._runner_base_env(env_vars)
        env.update(spec.env)
        env.update({
            contract.ATTEMPT_ID_ENV: spec.attempt_id,
            contract.JOB_ID_ENV: spec.job_id,
            contract.TASK_ID_ENV: spec.task_id,
            contract.AGENT_TASK_INDEX_ENV: str(spec.task_index),
            contract.WORKER_NUMBER_ENV: str(self.settings.worker_number),
        })
        if workspace is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(workspace), env.get("PYTHONPATH")]))
        return env

    def _forget_old_slots(self) -> None:
        finished = [s for s in self._slots.values() if s is not self._current and s.ready.is_set()
                    and s.state in (worker_pb2.EXITED, worker_pb2.PREPARE_FAILED)]
        for slot in finished[:-KEEP_FINISHED_ATTEMPTS]:
            del self._slots[slot.attempt_id]
            shutil.rmtree(self._attempts_dir / slot.attempt_id, ignore_errors=True)

    # -- run --------------------------------------------------------------------------------

    def _attempt(self, attempt_id: str, context) -> Attempt:
        slot = self._slots.get(attempt_id)
        if slot is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no attempt {attempt_id!r} on this host; prepare it first")
        if not slot.ready.is_set() or slot.failure is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"attempt {attempt_id} is not prepared ({worker_pb2.AttemptState.Name(slot.state)})")
        return slot.attempt

    def Start(self, request, context):
        attempt = self._attempt(request.attempt_id, context)
        refusal = self._start(attempt)
        if refusal is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        yield from attempt.events.follow(1, context.is_active)

    def _start(self, attempt: Attempt) -> str | None:
        """Start a prepared attempt (again: nothing); why not, when it may not start."""
        if self.lease.expired:
            return "the controller's lease expired; renew it before starting an attempt"
        if attempt.start():
            # For the job's next attempt (a retry): once this one is past its start, or has ended
            # (its retry's Prepare then finds the interpreter starting, or up).
            self._keep_spare_ready(when=lambda: attempt.wait(SPARE_AFTER_START_SECONDS), for_retry=True)
        return None

    def Watch(self, request, context):
        attempt = self._attempt(request.attempt_id, context)
        yield from attempt.events.follow(request.from_seq, context.is_active)

    def Cancel(self, request, context):
        slot = self._slots.get(request.attempt_id)
        if slot is None:
            return worker_pb2.CancelResponse(was_running=False)
        if not slot.ready.is_set():
            # Preparing (pip may take minutes): do not hold the call, cancel once it is prepared.
            slot.cancel_reason = "cancelled while preparing"
            if not slot.ready.is_set():
                return worker_pb2.CancelResponse(was_running=False)
        if slot.attempt is None:
            return worker_pb2.CancelResponse(was_running=False)
        try:
            was_running = slot.attempt.cancel(request.grace_seconds)
        except cleanup.HostNotClean as error:
            context.abort(grpc.StatusCode.INTERNAL, str(error))
        return worker_pb2.CancelResponse(was_running=was_running)

    # -- lease ------------------------------------------------------------------------------

    def RenewLease(self, request, context):
        self.lease.renew(request.lease_seconds)
        return worker_pb2.RenewLeaseResponse(lease_remaining_seconds=self.lease.remaining())

    def _lease_expired(self) -> None:
        LOG.warning("the controller's lease lapsed (%.0fs without renewal): stopping the attempt",
                    self.settings.lease_seconds)
        current = self._current
        if current is not None and current.ready.is_set() and current.attempt is not None:
            try:
                current.attempt.cancel(LEASE_CANCEL_GRACE_SECONDS, reason="lease expired: the controller stopped renewing")
            except cleanup.HostNotClean:
                LOG.exception("could not stop attempt %s after the lease lapsed", current.attempt_id)
        self.spares.discard("the controller's lease lapsed")
        if not self.settings.self_delete:
            return
        if self.settings.worker_number != 0:
            # Worker 0 deletes the node; the others only as a backup, in case it is gone too.
            deadline = time.monotonic() + SELF_DELETE_BACKUP_DELAY_SECONDS
            while time.monotonic() < deadline:
                if not self.lease.expired:
                    return  # the controller came back
                time.sleep(0.5)
        from fray_tpu.worker.selfdelete import delete_own_node

        delete_own_node(self.settings)

    # -- hand-over between jobs (warm slices) ---------------------------------------------------

    def HandOver(self, request, context):
        """Clean the host of every trace of the previous holder's attempts (processes, ports,
        lockfile, attempt files; bundles and environments stay cached), then accept only the
        new secret. Refused while an attempt is active: a job's processes never outlive its
        secret. (A job taking a warm slice hands it over in its first Prepare instead.)"""
        try:
            with self._lock:
                notes = self._hand_over(request)
        except HandOverRefused as refusal:
            context.abort(refusal.code, str(refusal))
        self._keep_spare_ready()
        return worker_pb2.HandOverResponse(cleanup_notes=notes)

    def _hand_over(self, request: worker_pb2.HandOverRequest) -> list[str]:
        """The hand-over, under ``self._lock``: the cleaning notes, or ``HandOverRefused``."""
        busy = self._current
        if busy is not None and busy.state in (worker_pb2.PREPARING, worker_pb2.RUNNING):
            raise HandOverRefused(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"attempt {busy.attempt_id} is still active on this host; cancel it before a hand-over")
        if self._preempted.is_set():
            # A host about to go away is handed to no one (its slice is deleted).
            raise HandOverRefused(grpc.StatusCode.FAILED_PRECONDITION, PREEMPTED_REFUSAL)
        if not valid_sha256_hex(request.new_secret_sha256):
            raise HandOverRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                  "the new secret must be given as 64 lower-case hex digits of its SHA-256")
        try:
            notes = self._cleaner.clean()
        except cleanup.HostNotClean as error:
            raise HandOverRefused(grpc.StatusCode.INTERNAL, f"host not clean: {error}") from error
        for attempt_id in list(self._slots):
            shutil.rmtree(self._attempts_dir / attempt_id, ignore_errors=True)
        self._slots.clear()
        self._current = None
        self.auth.replace(request.new_secret_sha256)
        self._identity.job = request.holder
        LOG.info("handed over to %s (%d cleanup notes)", request.holder, len(notes))
        return notes

    # -- bundles ----------------------------------------------------------------------------

    def HasBundle(self, request, context):
        from fray_tpu.worker.bundles import BundleError

        try:
            return worker_pb2.HasBundleResponse(present=self._bundles.has(request.digest))
        except BundleError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def UploadBundle(self, request_iterator, context):
        from fray_tpu.worker.bundles import BundleError

        first = next(request_iterator, None)
        if first is None or not first.digest:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a bundle upload must name its digest in the first chunk")
        digest = first.digest
        try:
            if self._bundles.has(digest):
                self._counters["upload_skips"] += 1
                return worker_pb2.UploadBundleResponse(digest=digest, already_present=True)
            upload = self._bundles.begin_upload(digest)
        except BundleError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            upload.write(first.data)
            for chunk in request_iterator:
                upload.write(chunk.data)
            upload.commit()
        except BundleError as error:
            upload.abort()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except BaseException:
            upload.abort()
            raise
        return worker_pb2.UploadBundleResponse(digest=digest, size=upload.bytes_written)

    # -- preemption and shutdown ---------------------------------------------------------------------------

    def mark_preempted(self) -> None:
        LOG.warning("the metadata server reports this VM as preempted")
        self._preempted.set()
        current = self._current
        if current is not None and current.attempt is not None:
            current.attempt.notify_preempted()

    def stop(self, grace_seconds: float, reason: str) -> None:
        """The agent stops: the current attempt, then the spare runner."""
        self.stop_current(grace_seconds, reason)
        self.spares.close(reason)

    def stop_current(self, grace_seconds: float, reason: str) -> None:
        current = self._current
        if current is not None and current.ready.is_set() and current.attempt is not None:
            current.attempt.cancel(grace_seconds, reason=reason)


def make_server(agent: Agent, settings: AgentSettings) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="rpc"),
        interceptors=[agent.auth],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            # Another process already on this address must be an error, not a shared port.
            ("grpc.so_reuseport", 0),
            # Controllers keep streams alive with pings every 20 s; allow them.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(agent, server)
    address = f"{settings.ip}:{settings.port}"
    try:
        server.add_secure_port(address, tls.server_credentials(
            settings.tls_cert_pem, settings.tls_key_pem, datetime.timedelta(seconds=settings.tls_leaf_seconds)))
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {address}: {error}; is another agent running there?") from error
    return server
