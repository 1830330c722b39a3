from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_UNSPECIFIED: _ClassVar[Health]
    HEALTHY: _ClassVar[Health]
    UNHEALTHY: _ClassVar[Health]

class AttemptState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_STATE_UNSPECIFIED: _ClassVar[AttemptState]
    PREPARING: _ClassVar[AttemptState]
    PREPARED: _ClassVar[AttemptState]
    RUNNING: _ClassVar[AttemptState]
    EXITED: _ClassVar[AttemptState]
    PREPARE_FAILED: _ClassVar[AttemptState]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    STDOUT: _ClassVar[LogStream]
    STDERR: _ClassVar[LogStream]

class Classification(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLASSIFICATION_UNSPECIFIED: _ClassVar[Classification]
    OK: _ClassVar[Classification]
    USER_FAILURE: _ClassVar[Classification]
    BAD_HOST: _ClassVar[Classification]
    PREEMPTED: _ClassVar[Classification]
    CANCELLED: _ClassVar[Classification]
HEALTH_UNSPECIFIED: Health
HEALTHY: Health
UNHEALTHY: Health
ATTEMPT_STATE_UNSPECIFIED: AttemptState
PREPARING: AttemptState
PREPARED: AttemptState
RUNNING: AttemptState
EXITED: AttemptState
PREPARE_FAILED: AttemptState
LOG_STREAM_UNSPECIFIED: LogStream
STDOUT: LogStream
STDERR: LogStream
CLASSIFICATION_UNSPECIFIED: Classification
OK: Classification
USER_FAILURE: Classification
BAD_HOST: Classification
PREEMPTED: Classification
CANCELLED: Classification

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerIdentity(_message.Message):
    __slots__ = ("worker_number", "node_name", "accelerator_type", "ip", "agent_version", "python_version", "job", "controller", "hostname")
    WORKER_NUMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_TYPE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    worker_number: int
    node_name: str
    accelerator_type: str
    ip: str
    agent_version: str
    python_version: str
    job: str
    controller: str
    hostname: str
    def __init__(self, worker_number: _Optional[int] = ..., node_name: _Optional[str] = ..., accelerator_type: _Optional[str] = ..., ip: _Optional[str] = ..., agent_version: _Optional[str] = ..., python_version: _Optional[str] = ..., job: _Optional[str] = ..., controller: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class AttemptStatus(_message.Message):
    __slots__ = ("attempt_id", "state", "pid", "last_seq", "classification")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    state: AttemptState
    pid: int
    last_seq: int
    classification: Classification
    def __init__(self, attempt_id: _Optional[str] = ..., state: _Optional[_Union[AttemptState, str]] = ..., pid: _Optional[int] = ..., last_seq: _Optional[int] = ..., classification: _Optional[_Union[Classification, str]] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("bundles_cached", "bundle_uploads", "bundle_upload_skips", "envs_created", "envs_reused", "spare_runners_started", "spare_runners_used", "spare_runners_discarded")
    BUNDLES_CACHED_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_UPLOAD_SKIPS_FIELD_NUMBER: _ClassVar[int]
    ENVS_CREATED_FIELD_NUMBER: _ClassVar[int]
    ENVS_REUSED_FIELD_NUMBER: _ClassVar[int]
    SPARE_RUNNERS_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPARE_RUNNERS_USED_FIELD_NUMBER: _ClassVar[int]
    SPARE_RUNNERS_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    bundles_cached: int
    bundle_uploads: int
    bundle_upload_skips: int
    envs_created: int
    envs_reused: int
    spare_runners_started: int
    spare_runners_used: int
    spare_runners_discarded: int
    def __init__(self, bundles_cached: _Optional[int] = ..., bundle_uploads: _Optional[int] = ..., bundle_upload_skips: _Optional[int] = ..., envs_created: _Optional[int] = ..., envs_reused: _Optional[int] = ..., spare_runners_started: _Optional[int] = ..., spare_runners_used: _Optional[int] = ..., spare_runners_discarded: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("identity", "health", "health_message", "preempted", "current_attempt", "cache", "lease_remaining_seconds", "uptime_seconds")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    identity: WorkerIdentity
    health: Health
    health_message: str
    preempted: bool
    current_attempt: AttemptStatus
    cache: CacheStats
    lease_remaining_seconds: float
    uptime_seconds: float
    def __init__(self, identity: _Optional[_Union[WorkerIdentity, _Mapping]] = ..., health: _Optional[_Union[Health, str]] = ..., health_message: _Optional[str] = ..., preempted: _Optional[bool] = ..., current_attempt: _Optional[_Union[AttemptStatus, _Mapping]] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., lease_remaining_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ...) -> None: ...

class CallablePayload(_message.Message):
    __slots__ = ("pickled",)
    PICKLED_FIELD_NUMBER: _ClassVar[int]
    pickled: bytes
    def __init__(self, pickled: _Optional[bytes] = ...) -> None: ...

class BinaryPayload(_message.Message):
    __slots__ = ("command", "args")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    command: str
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, command: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...

class AttemptSpec(_message.Message):
    __slots__ = ("attempt_id", "job_id", "task_id", "task_index", "callable", "binary", "env", "workspace_digest", "pip_packages", "extras", "python_version", "index_url", "env_cache", "hand_over", "start")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CALLABLE_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PIP_PACKAGES_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_URL_FIELD_NUMBER: _ClassVar[int]
    ENV_CACHE_FIELD_NUMBER: _ClassVar[int]
    HAND_OVER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    job_id: str
    task_id: str
    task_index: int
    callable: CallablePayload
    binary: BinaryPayload
    env: _containers.ScalarMap[str, str]
    workspace_digest: str
    pip_packages: _containers.RepeatedScalarFieldContainer[str]
    extras: _containers.RepeatedScalarFieldContainer[str]
    python_version: str
    index_url: str
    env_cache: EnvCache
    hand_over: HandOverRequest
    start: bool
    def __init__(self, attempt_id: _Optional[str] = ..., job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., task_index: _Optional[int] = ..., callable: _Optional[_Union[CallablePayload, _Mapping]] = ..., binary: _Optional[_Union[BinaryPayload, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., workspace_digest: _Optional[str] = ..., pip_packages: _Optional[_Iterable[str]] = ..., extras: _Optional[_Iterable[str]] = ..., python_version: _Optional[str] = ..., index_url: _Optional[str] = ..., env_cache: _Optional[_Union[EnvCache, _Mapping]] = ..., hand_over: _Optional[_Union[HandOverRequest, _Mapping]] = ..., start: _Optional[bool] = ...) -> None: ...

class EnvCache(_message.Message):
    __slots__ = ("storage_endpoint", "bucket", "builder", "wait_seconds")
    STORAGE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    BUILDER_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    storage_endpoint: str
    bucket: str
    builder: bool
    wait_seconds: float
    def __init__(self, storage_endpoint: _Optional[str] = ..., bucket: _Optional[str] = ..., builder: _Optional[bool] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("attempt_id", "prepare_seconds", "env_reused", "python", "cleanup_notes", "env_digest", "env_build_seconds", "env_source", "env_seconds", "env_note", "spare_runner_used")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_REUSED_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    CLEANUP_NOTES_FIELD_NUMBER: _ClassVar[int]
    ENV_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ENV_BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ENV_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_NOTE_FIELD_NUMBER: _ClassVar[int]
    SPARE_RUNNER_USED_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    prepare_seconds: float
    env_reused: bool
    python: str
    cleanup_notes: _containers.RepeatedScalarFieldContainer[str]
    env_digest: str
    env_build_seconds: float
    env_source: str
    env_seconds: float
    env_note: str
    spare_runner_used: bool
    def __init__(self, attempt_id: _Optional[str] = ..., prepare_seconds: _Optional[float] = ..., env_reused: _Optional[bool] = ..., python: _Optional[str] = ..., cleanup_notes: _Optional[_Iterable[str]] = ..., env_digest: _Optional[str] = ..., env_build_seconds: _Optional[float] = ..., env_source: _Optional[str] = ..., env_seconds: _Optional[float] = ..., env_note: _Optional[str] = ..., spare_runner_used: _Optional[bool] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("attempt_id",)
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    def __init__(self, attempt_id: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("attempt_id", "from_seq")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    from_seq: int
    def __init__(self, attempt_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("pid", "timestamp")
    PID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    pid: int
    timestamp: float
    def __init__(self, pid: _Optional[int] = ..., timestamp: _Optional[float] = ...) -> None: ...

class LogBatch(_message.Message):
    __slots__ = ("stream", "timestamp", "data", "line_count")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LINE_COUNT_FIELD_NUMBER: _ClassVar[int]
    stream: LogStream
    timestamp: float
    data: bytes
    line_count: int
    def __init__(self, stream: _Optional[_Union[LogStream, str]] = ..., timestamp: _Optional[float] = ..., data: _Optional[bytes] = ..., line_count: _Optional[int] = ...) -> None: ...

class Exit(_message.Message):
    __slots__ = ("code", "signal", "classification", "stderr_tail", "reason", "timestamp")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    code: int
    signal: int
    classification: Classification
    stderr_tail: str
    reason: str
    timestamp: float
    def __init__(self, code: _Optional[int] = ..., signal: _Optional[int] = ..., classification: _Optional[_Union[Classification, str]] = ..., stderr_tail: _Optional[str] = ..., reason: _Optional[str] = ..., timestamp: _Optional[float] = ...) -> None: ...

class PreemptionNotice(_message.Message):
    __slots__ = ("timestamp",)
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    timestamp: float
    def __init__(self, timestamp: _Optional[float] = ...) -> None: ...

class EventsLost(_message.Message):
    __slots__ = ("requested_from_seq", "first_available_seq")
    REQUESTED_FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    FIRST_AVAILABLE_SEQ_FIELD_NUMBER: _ClassVar[int]
    requested_from_seq: int
    first_available_seq: int
    def __init__(self, requested_from_seq: _Optional[int] = ..., first_available_seq: _Optional[int] = ...) -> None: ...

class AttemptEvent(_message.Message):
    __slots__ = ("seq", "started", "log", "exit", "preempted", "lost")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    seq: int
    started: Started
    log: LogBatch
    exit: Exit
    preempted: PreemptionNotice
    lost: EventsLost
    def __init__(self, seq: _Optional[int] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., log: _Optional[_Union[LogBatch, _Mapping]] = ..., exit: _Optional[_Union[Exit, _Mapping]] = ..., preempted: _Optional[_Union[PreemptionNotice, _Mapping]] = ..., lost: _Optional[_Union[EventsLost, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("attempt_id", "grace_seconds")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    attempt_id: str
    grace_seconds: float
    def __init__(self, attempt_id: _Optional[str] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("was_running",)
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    was_running: bool
    def __init__(self, was_running: _Optional[bool] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease_remaining_seconds",)
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_remaining_seconds: float
    def __init__(self, lease_remaining_seconds: _Optional[float] = ...) -> None: ...

class BundleChunk(_message.Message):
    __slots__ = ("digest", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadBundleResponse(_message.Message):
    __slots__ = ("digest", "size", "already_present")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    already_present: bool
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class HasBundleRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class HasBundleResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    def __init__(self, present: _Optional[bool] = ...) -> None: ...

class HandOverRequest(_message.Message):
    __slots__ = ("new_secret_sha256", "holder")
    NEW_SECRET_SHA256_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    new_secret_sha256: str
    holder: str
    def __init__(self, new_secret_sha256: _Optional[str] = ..., holder: _Optional[str] = ...) -> None: ...

class HandOverResponse(_message.Message):
    __slots__ = ("cleanup_notes",)
    CLEANUP_NOTES_FIELD_NUMBER: _ClassVar[int]
    cleanup_notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cleanup_notes: _Optional[_Iterable[str]] = ...) -> None: ...
