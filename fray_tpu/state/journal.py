"""The controller's durable record of jobs, attempts, cloud resources and job output.

One SQLite file (``journal.sqlite3``, WAL mode) in the state directory, written by one controller
process at a time. The writer holds ``fcntl.flock`` on ``controller.lock``; the kernel drops that
lock when the process dies, so a SIGKILLed controller never blocks its successor. Read-only
journals (the CLI, while a controller runs) take no lock and never write.

Durability: every write is one transaction; with WAL and ``synchronous=NORMAL`` a committed
write survives the death of the process (SIGKILL included). An OS crash or power loss may drop
the last few transactions but never corrupts the file.

Secrets are kept out of the database: one file per secret under ``secrets/<job_id>/<name>``
(directories 0700, files 0600, written atomically).

The state directory (``default_state_dir``, the one place this rule is written): the configured
one (``state_dir`` of the spec or config), else ``$FRAY_TPU_STATE_DIR``, else
``$XDG_STATE_HOME/fray-tpu``, else ``~/.local/state/fray-tpu``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fray_tpu.errors import FrayTpuError
from fray_tpu.state import DEAD_RESOURCE_STATES, RESOURCE_STATES, ResourceState  # noqa: F401 - re-exported

SCHEMA_VERSION = 1
DB_FILENAME = "journal.sqlite3"
LOCK_FILENAME = "controller.lock"
SECRETS_DIRNAME = "secrets"
DEFAULT_OUTPUT_LINES_PER_JOB = 1_000_000
BUSY_TIMEOUT_MS = 10_000

JOB_KINDS = ("tpu", "cpu")
RESOURCE_KINDS = ("node", "queued")
STATE_DIR_ENV = "FRAY_TPU_STATE_DIR"


def default_state_dir(environ: Mapping[str, str] | None = None, *, configured: str | None = None) -> Path:
    """The state directory: ``configured``, else ``$FRAY_TPU_STATE_DIR``, else
    ``$XDG_STATE_HOME/fray-tpu``, else ``~/.local/state/fray-tpu``."""
    env = os.environ if environ is None else environ
    chosen = (configured or "").strip() or env.get(STATE_DIR_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "fray-tpu"


class JournalError(FrayTpuError):
    """The journal cannot be used as asked (newer schema, closed, read-only, bad name)."""


class JournalLockedError(JournalError):
    """Another live controller holds the state directory."""


@dataclass(frozen=True)
class JobRow:
    job_id: str
    name: str
    status: str
    error_message: str | None
    phase: str
    created: float
    updated: float
    finished: float | None
    controller_id: str
    kind: str  # "tpu" | "cpu"
    tpu_type: str | None
    slice_count: int
    task_names: list[str]
    task_statuses: list[tuple[str, str | None]]
    counters: dict[str, int]
    attempt: int
    attempt_id: str | None
    plan_blob: bytes  # opaque pickled plan; never holds secrets
    extra: dict = field(default_factory=dict)  # JSON-able, e.g. cost figures


@dataclass(frozen=True)
class WarmPeriod:
    """A slice idle in the controller's warm pool: from its job's end to its next job or its deletion."""

    name: str
    zone: str
    since: float
    until: float | None
    tpu_type: str
    chips: int
    capacity: str
    released_by: str  # the job that finished on it


@dataclass(frozen=True)
class ResourceRow:
    job_id: str
    attempt: int
    slice_id: int
    name: str
    zone: str
    kind: str  # "node" | "queued"
    state: str  # one of RESOURCE_STATES
    endpoints: list[str]
    created: float
    ready_at: float | None
    deleted_at: float | None
    tpu_type: str
    chips: int


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobRow))
_RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(ResourceRow))
_JOB_JSON_FIELDS = frozenset({"task_names", "task_statuses", "counters", "extra"})
_RESOURCE_JSON_FIELDS = frozenset({"endpoints"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    error_message TEXT,
    phase TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    controller_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    tpu_type TEXT,
    slice_count INTEGER NOT NULL,
    task_names TEXT NOT NULL,
    task_statuses TEXT NOT NULL,
    counters TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempt_id TEXT,
    plan_blob BLOB NOT NULL,
    extra TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
CREATE TABLE IF NOT EXISTS resources (
    name TEXT NOT NULL,
    zone TEXT NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    slice_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    created REAL NOT NULL,
    ready_at REAL,
    deleted_at REAL,
    tpu_type TEXT NOT NULL,
    chips INTEGER NOT NULL,
    PRIMARY KEY (name, zone)
);
CREATE INDEX IF NOT EXISTS resources_by_job ON resources (job_id);
CREATE TABLE IF NOT EXISTS warm_periods (
    name TEXT NOT NULL,
    zone TEXT NOT NULL,
    since REAL NOT NULL,
    until REAL,
    tpu_type TEXT NOT NULL,
    chips INTEGER NOT NULL,
    capacity TEXT NOT NULL,
    released_by TEXT NOT NULL,
    PRIMARY KEY (name, zone, since)
);
CREATE TABLE IF NOT EXISTS output (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""


class Journal:
    """Jobs, resources, output and secrets of the controllers that used ``state_dir``.

    Safe to share between threads of one process (one connection, guarded by a lock); safe to
    read from another process while the controller writes (``readonly=True``).
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        controller_id: str,
        readonly: bool = False,
        max_output_lines: int = DEFAULT_OUTPUT_LINES_PER_JOB,
    ) -> None:
        if max_output_lines < 1:
            raise ValueError(f"max_output_lines={max_output_lines} must be at least 1")
        self.state_dir = Path(state_dir).expanduser()
        self.controller_id = controller_id
        self.readonly = readonly
        self.max_output_lines = max_output_lines
        # Trim in chunks so a busy log does not pay a DELETE on every append.
        self._trim_chunk = max(1, min(10_000, max_output_lines // 10))
        self.db_path = self.state_dir / DB_FILENAME
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        if readonly:
            self._conn = self._open_readonly()
        else:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _take_controller_lock(self.state_dir)
            try:
                self._conn = self._open_writer()
            except BaseException:
                self._release_lock()
                raise

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._release_lock()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- jobs ------------------------------------------------------------------------------

    def add_job(self, row: JobRow) -> None:
        _check_choice("JobRow.kind", row.kind, JOB_KINDS)
        values = _to_columns(dataclasses.asdict(row), _JOB_JSON_FIELDS)
        columns = ", ".join(_JOB_FIELDS)
        marks = ", ".join("?" for _ in _JOB_FIELDS)
        with self._write() as conn:
            try:
                conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", [values[f] for f in _JOB_FIELDS])
            except sqlite3.IntegrityError as e:
                raise ValueError(f"Job {row.job_id!r} is already in the journal at {self.state_dir}; use update_job to change it") from e

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Change the given JobRow fields; ``updated`` is set to now unless given."""
        _check_field_names("update_job", fields, _JOB_FIELDS, key_fields=("job_id",))
        if "kind" in fields:
            _check_choice("JobRow.kind", fields["kind"], JOB_KINDS)
        fields.setdefault("updated", time.time())
        values = _to_columns(fields, _JOB_JSON_FIELDS)
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._write() as conn:
            cursor = conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", [*values.values(), job_id])
            if cursor.rowcount == 0:
                raise self._unknown_job(conn, job_id)

    def job(self, job_id: str) -> JobRow:
        with self._read() as conn:
            found = conn.execute(f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if found is None:
                raise self._unknown_job(conn, job_id)
        return _job_from_row(found)

    def jobs(self, *, unfinished_only: bool = False) -> list[JobRow]:
        """Newest first. Unfinished means ``finished`` is None."""
        where = "WHERE finished IS NULL" if unfinished_only else ""
        with self._read() as conn:
            found = conn.execute(f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs {where} ORDER BY created DESC, rowid DESC").fetchall()
        return [_job_from_row(r) for r in found]

    # ---- resources -------------------------------------------------------------------------

    def add_resource(self, row: ResourceRow) -> None:
        """Record a resource; call this BEFORE asking the cloud to create it."""
        _check_choice("ResourceRow.kind", row.kind, RESOURCE_KINDS)
        _check_choice("ResourceRow.state", row.state, RESOURCE_STATES)
        values = _to_columns(dataclasses.asdict(row), _RESOURCE_JSON_FIELDS)
        columns = ", ".join(_RESOURCE_FIELDS)
        marks = ", ".join("?" for _ in _RESOURCE_FIELDS)
        with self._write() as conn:
            try:
                conn.execute(f"INSERT INTO resources ({columns}) VALUES ({marks})", [values[f] for f in _RESOURCE_FIELDS])
            except sqlite3.IntegrityError as e:
                raise ValueError(
                    f"Resource {row.name!r} in zone {row.zone!r} is already in the journal at {self.state_dir}; "
                    "use update_resource to change it"
                ) from e

    def update_resource(self, name: str, zone: str, **fields: Any) -> None:
        _check_field_names("update_resource", fields, _RESOURCE_FIELDS, key_fields=("name", "zone"))
        if "kind" in fields:
            _check_choice("ResourceRow.kind", fields["kind"], RESOURCE_KINDS)
        if "state" in fields:
            _check_choice("ResourceRow.state", fields["state"], RESOURCE_STATES)
        if not fields:
            return
        values = _to_columns(fields, _RESOURCE_JSON_FIELDS)
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._write() as conn:
            cursor = conn.execute(f"UPDATE resources SET {assignments} WHERE name = ? AND zone = ?", [*values.values(), name, zone])
            if cursor.rowcount == 0:
                count = conn.execute("SELECT COUNT(*) FROM resources").fetchone()[0]
                raise KeyError(f"No resource {name!r} in zone {zone!r} in the journal at {self.state_dir} ({count} resources recorded)")

    def resources(self, *, job_id: str | None = None, live_only: bool = False) -> list[ResourceRow]:
        """Oldest first. Live means state is not ``deleted`` or ``failed``."""
        clauses, params = [], []
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(job_id)
        if live_only:
            clauses.append(f"state NOT IN ({', '.join('?' for _ in DEAD_RESOURCE_STATES)})")
            params.extend(DEAD_RESOURCE_STATES)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            found = conn.execute(f"SELECT {', '.join(_RESOURCE_FIELDS)} FROM resources {where} ORDER BY created, rowid", params).fetchall()
        return [_resource_from_row(r) for r in found]

    # ---- the warm pool's idle time --------------------------------------------------------

    def open_warm_period(self, period: WarmPeriod) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO warm_periods (name, zone, since, until, tpu_type, chips, capacity, released_by) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(period))

    def close_warm_period(self, name: str, zone: str, until: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE warm_periods SET until = ? WHERE name = ? AND zone = ? AND until IS NULL",
                         (until, name, zone))

    def warm_periods(self) -> list[WarmPeriod]:
        with self._read() as conn:
            try:
                found = conn.execute("SELECT name, zone, since, until, tpu_type, chips, capacity, released_by "
                                     "FROM warm_periods ORDER BY since").fetchall()
            except sqlite3.OperationalError:
                return []  # a journal written before the warm pool existed
        return [WarmPeriod(*row) for row in found]

    # ---- output ----------------------------------------------------------------------------

    def append_output(self, job_id: str, lines: Sequence[str]) -> None:
        """Append lines (one transaction). Each job keeps at least its newest
        ``max_output_lines`` lines; older ones are deleted in chunks of
        ``min(max_output_lines // 10, 10_000)``, so briefly up to a chunk plus one batch more stay."""
        if not lines:
            return
        with self._write() as conn:
            last = conn.execute("SELECT MAX(seq) FROM output WHERE job_id = ?", (job_id,)).fetchone()[0] or 0
            conn.executemany(
                "INSERT INTO output (job_id, seq, line) VALUES (?, ?, ?)",
                ((job_id, last + i, line) for i, line in enumerate(lines, start=1)),
            )
            newest = last + len(lines)
            oldest = conn.execute("SELECT MIN(seq) FROM output WHERE job_id = ?", (job_id,)).fetchone()[0]
            if newest - oldest + 1 >= self.max_output_lines + self._trim_chunk:
                conn.execute("DELETE FROM output WHERE job_id = ? AND seq <= ?", (job_id, newest - self.max_output_lines))

    def output(self, job_id: str, *, after: int = 0, limit: int = 10_000) -> tuple[list[str], int]:
        """Lines with sequence number > ``after`` (at most ``limit``), and the sequence number
        of the last line returned (``after`` when none): pass it back as the next ``after``.
        Sequence numbers start at 1 per job; lines trimmed by the bound are skipped."""
        with self._read() as conn:
            found = conn.execute(
                "SELECT seq, line FROM output WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, after, limit)
            ).fetchall()
        if not found:
            return [], after
        return [line for _, line in found], found[-1][0]

    # ---- secrets ---------------------------------------------------------------------------

    def store_secret(self, job_id: str, name: str, value: bytes) -> None:
        """Write ``secrets/<job_id>/<name>`` (0600, atomically); never into the database."""
        self._require_writer("store a secret")
        job_dir = self._secret_dir(job_id)
        _check_path_part("secret name", name)
        for directory in (job_dir.parent, job_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        target = job_dir / name
        temporary = job_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
        _fsync_dir(job_dir)

    def load_secret(self, job_id: str, name: str) -> bytes:
        _check_path_part("secret name", name)
        path = self._secret_dir(job_id) / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyError(f"No secret {name!r} stored for job {job_id!r} under {path.parent}") from None

    def delete_secrets(self, job_id: str) -> None:
        self._require_writer("delete secrets")
        job_dir = self._secret_dir(job_id)
        if not job_dir.is_dir():
            return
        for entry in job_dir.iterdir():
            entry.unlink(missing_ok=True)
        job_dir.rmdir()
        _fsync_dir(job_dir.parent)

    # ---- internals -------------------------------------------------------------------------

    def _secret_dir(self, job_id: str) -> Path:
        _check_path_part("job id", job_id)
        return self.state_dir / SECRETS_DIRNAME / job_id

    def _open_writer(self) -> sqlite3.Connection:
        is_new = not self.db_path.exists()
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            if is_new:
                os.chmod(self.db_path, 0o600)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            self._create_or_check_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_or_check_schema(self, conn: sqlite3.Connection) -> None:
        """Runs inside the BEGIN IMMEDIATE of _open_writer."""
        try:
            has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
            if has_meta:
                self._check_schema_version(conn)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.db_path.exists():
            return _empty_journal_connection()
        uri = f"{self.db_path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")
            if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                # A controller has created the file but not yet committed its schema.
                conn.close()
                return _empty_journal_connection()
            self._check_schema_version(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_schema_version(self, conn: sqlite3.Connection) -> None:
        try:
            found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as e:
            raise JournalError(f"{self.db_path} is not a fray-tpu journal ({e}); point FRAY_TPU_STATE_DIR / state_dir= elsewhere") from e
        version = int(found[0]) if found else None
        if version is None or version > SCHEMA_VERSION:
            raise JournalError(
                f"The journal at {self.db_path} has schema version {version}, newer than this fray-tpu understands "
                f"({SCHEMA_VERSION}); upgrade fray-tpu, or use another FRAY_TPU_STATE_DIR / state_dir="
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._require_writer("write")
        with self._mutex:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            yield self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"The journal at {self.state_dir} is closed; open a new Journal")
        return self._conn

    def _require_writer(self, action: str) -> None:
        if self.readonly:
            raise JournalError(f"Cannot {action}: the journal at {self.state_dir} was opened readonly=True")

    def _unknown_job(self, conn: sqlite3.Connection, job_id: str) -> KeyError:
        count = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return KeyError(f"No job {job_id!r} in the journal at {self.state_dir} ({count} jobs recorded; `fray-tpu jobs` lists them)")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


def _empty_journal_connection() -> sqlite3.Connection:
    """What a reader sees where nothing is journaled yet; creates no files."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.executescript(_SCHEMA)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _take_controller_lock(state_dir: Path) -> int:
    path = state_dir / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise JournalLockedError(
            f"The state directory {state_dir} is in use by another fray-tpu controller ({holder}). "
            "Stop that controller, or use another FRAY_TPU_STATE_DIR / state_dir= for this one"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if "pid" not in record:
        return "pid unknown: it is still starting"
    return f"pid {record['pid']} on host {record.get('host', '?')}"


def _to_columns(fields: Mapping[str, Any], json_fields: frozenset[str]) -> dict[str, Any]:
    return {name: json.dumps(value) if name in json_fields else value for name, value in fields.items()}


def _job_from_row(row: Sequence[Any]) -> JobRow:
    values = dict(zip(_JOB_FIELDS, row))
    for name in _JOB_JSON_FIELDS:
        values[name] = json.loads(values[name])
    values["task_statuses"] = [tuple(pair) for pair in values["task_statuses"]]
    values["plan_blob"] = bytes(values["plan_blob"])
    return JobRow(**values)


def _resource_from_row(row: Sequence[Any]) -> ResourceRow:
    values = dict(zip(_RESOURCE_FIELDS, row))
    values["endpoints"] = json.loads(values["endpoints"])
    return ResourceRow(**values)


def _check_field_names(method: str, fields: Mapping[str, Any], allowed: Sequence[str], key_fields: Sequence[str]) -> None:
    for name in fields:
        if name in key_fields:
            raise TypeError(f"{method}() cannot change {name!r}: it identifies the row")
        if name not in allowed:
            settable = ", ".join(f for f in allowed if f not in key_fields)
            raise TypeError(f"{method}() got unknown field {name!r}; settable fields: {settable}")


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(choices)}")


def _check_path_part(what: str, value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value or value.startswith("."):
        raise ValueError(f"The {what} {value!r} cannot name a file: use a non-empty name without '/' that does not start with '.'")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
