"""The journal: round trips, update semantics, the controller lock across processes, read-only
readers, output cursors and bound, secrets kept out of the database, concurrency and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fray_tpu.state.journal import (
    DB_FILENAME,
    Journal,
    JournalError,
    JournalLockedError,
    JobRow,
    ResourceRow,
    default_state_dir,
)

DEADLINE_SECONDS = 30.0


def make_job(job_id: str = "job-1", *, created: float = 1_700_000_000.25, **overrides) -> JobRow:
    values = dict(
        job_id=job_id,
        name="train ünïcode",
        status="running",
        error_message=None,
        phase="booting 2/4 agents",
        created=created,
        updated=created + 0.5,
        finished=None,
        controller_id="ctl-a",
        kind="tpu",
        tpu_type="v5litepod-16",
        slice_count=2,
        task_names=["train-0", "train-1"],
        task_statuses=[("running", None), ("failed", "exit 3: boom")],
        counters={"preemptions": 1, "failures": 0},
        attempt=2,
        attempt_id="att-7f",
        plan_blob=bytes(range(256)) * 3,
        extra={"chip_hours": 1.5, "nested": {"zones": ["us-central2-b"]}},
    )
    values.update(overrides)
    return JobRow(**values)


def make_resource(name: str = "fray-node-0", *, job_id: str = "job-1", state: str = "creating", **overrides) -> ResourceRow:
    values = dict(
        job_id=job_id,
        attempt=1,
        slice_id=0,
        name=name,
        zone="us-central2-b",
        kind="node",
        state=state,
        endpoints=["10.0.0.2", "10.0.0.3"],
        created=1_700_000_100.0,
        ready_at=None,
        deleted_at=None,
        tpu_type="v5litepod-16",
        chips=16,
    )
    values.update(overrides)
    return ResourceRow(**values)


@pytest.fixture
def journal(tmp_path: Path):
    with Journal(tmp_path / "state", controller_id="ctl-a") as j:
        yield j


def wait_until(predicate, what: str, deadline: float = DEADLINE_SECONDS):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)  # polling interval of a condition wait, not synchronisation
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen, what: str) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=DEADLINE_SECONDS)
        raise AssertionError(f"child exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
    return line.strip()


HOLD_LOCK = """
import sys
from fray_tpu.state.journal import Journal
journal = Journal(sys.argv[1], controller_id="holder")
print("locked", flush=True)
sys.stdin.readline()
"""


# ---- round trips and update semantics -------------------------------------------------------


def test_job_round_trips_exactly(journal: Journal):
    row = make_job()
    journal.add_job(row)
    assert journal.job("job-1") == row
    assert journal.jobs() == [row]
    finished = make_job("job-2", status="succeeded", finished=1_700_000_999.125, error_message="", tpu_type=None, kind="cpu", plan_blob=b"")
    journal.add_job(finished)
    assert journal.job("job-2") == finished


def test_job_round_trips_in_a_new_process_after_close(tmp_path: Path):
    state = tmp_path / "state"
    with Journal(state, controller_id="ctl-a") as first:
        first.add_job(make_job())
    with Journal(state, controller_id="ctl-b") as second:
        assert second.job("job-1") == make_job()


def test_update_job_changes_only_given_fields_and_stamps_updated(journal: Journal):
    journal.add_job(make_job())
    before = time.time()
    journal.update_job("job-1", status="failed", error_message="boom", task_statuses=[("failed", "x"), ("killed", None)])
    row = journal.job("job-1")
    assert row == make_job(status="failed", error_message="boom", task_statuses=[("failed", "x"), ("killed", None)], updated=row.updated)
    assert row.updated >= before

    journal.update_job("job-1", updated=5.0, counters={"preemptions": 3}, extra={"cost_usd": 2.5})
    row = journal.job("job-1")
    assert (row.updated, row.counters, row.extra) == (5.0, {"preemptions": 3}, {"cost_usd": 2.5})


def test_update_job_rejects_unknown_and_key_fields(journal: Journal):
    journal.add_job(make_job())
    with pytest.raises(TypeError, match="'colour'"):
        journal.update_job("job-1", colour="red")
    with pytest.raises(TypeError, match="'job_id'"):
        journal.update_job("job-1", job_id="other")
    with pytest.raises(ValueError, match="'gpu'"):
        journal.update_job("job-1", kind="gpu")
    assert journal.job("job-1") == make_job()


def test_unknown_job_id_names_the_id_and_the_count(journal: Journal):
    journal.add_job(make_job("a"))
    journal.add_job(make_job("b"))
    with pytest.raises(KeyError, match=r"'nope'.*2 jobs"):
        journal.job("nope")
    with pytest.raises(KeyError, match="'nope'"):
        journal.update_job("nope", status="x")


def test_duplicate_job_is_refused(journal: Journal):
    journal.add_job(make_job())
    with pytest.raises(ValueError, match="'job-1' is already"):
        journal.add_job(make_job())


def test_jobs_are_newest_first_and_filter_unfinished(journal: Journal):
    journal.add_job(make_job("old", created=100.0, finished=150.0, status="succeeded"))
    journal.add_job(make_job("new", created=300.0))
    journal.add_job(make_job("mid", created=200.0))
    journal.add_job(make_job("same-time-later", created=300.0))
    assert [j.job_id for j in journal.jobs()] == ["same-time-later", "new", "mid", "old"]
    assert [j.job_id for j in journal.jobs(unfinished_only=True)] == ["same-time-later", "new", "mid"]


def test_resources_round_trip_update_and_filters(journal: Journal):
    a = make_resource("node-a", job_id="job-1")
    b = make_resource("node-b", job_id="job-1", kind="queued", created=1_700_000_200.0)
    c = make_resource("node-c", job_id="job-2", created=1_700_000_300.0)
    for row in (a, b, c):
        journal.add_resource(row)
    assert journal.resources() == [a, b, c]

    journal.update_resource("node-a", "us-central2-b", state="ready", ready_at=1_700_000_150.5, endpoints=["10.1.1.1"])
    journal.update_resource("node-b", "us-central2-b", state="deleted", deleted_at=1_700_000_400.0)
    journal.update_resource("node-c", "us-central2-b", state="failed")
    ready_a = make_resource("node-a", job_id="job-1", state="ready", ready_at=1_700_000_150.5, endpoints=["10.1.1.1"])
    assert journal.resources(job_id="job-1", live_only=True) == [ready_a]
    assert journal.resources(live_only=True) == [ready_a]
    assert [r.name for r in journal.resources(job_id="job-1")] == ["node-a", "node-b"]

    with pytest.raises(KeyError, match="'node-z'"):
        journal.update_resource("node-z", "us-central2-b", state="ready")
    with pytest.raises(ValueError, match="'exploded'"):
        journal.update_resource("node-a", "us-central2-b", state="exploded")
    with pytest.raises(TypeError, match="'zone'"):
        journal.update_resource("node-a", "us-central2-b", zone="elsewhere")


def test_same_resource_name_in_two_zones_are_two_rows(journal: Journal):
    journal.add_resource(make_resource("n", zone="us-central2-b"))
    journal.add_resource(make_resource("n", zone="us-east5-a"))
    journal.update_resource("n", "us-east5-a", state="deleted")
    assert [(r.zone, r.state) for r in journal.resources()] == [("us-central2-b", "creating"), ("us-east5-a", "deleted")]


# ---- schema, readonly, defaults -------------------------------------------------------------


def test_newer_schema_is_refused_with_versions(tmp_path: Path):
    state = tmp_path / "state"
    Journal(state, controller_id="c").close()
    with sqlite3.connect(state / DB_FILENAME) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(JournalError, match=r"schema version 99.*upgrade fray-tpu"):
        Journal(state, controller_id="c")
    with pytest.raises(JournalError, match="schema version 99"):
        Journal(state, controller_id="c", readonly=True)


def test_readonly_on_missing_state_dir_is_empty_and_creates_nothing(tmp_path: Path):
    state = tmp_path / "never-used"
    with Journal(state, controller_id="cli", readonly=True) as reader:
        assert reader.jobs() == []
        assert reader.resources() == []
        assert reader.output("job-1") == ([], 0)
        with pytest.raises(KeyError, match="0 jobs"):
            reader.job("job-1")
    assert not state.exists()


def test_readonly_on_a_db_file_without_schema_yet_is_empty(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / DB_FILENAME).touch()  # a controller between creating the file and committing its schema
    with Journal(state, controller_id="cli", readonly=True) as reader:
        assert reader.jobs() == []


def test_readonly_refuses_writes(tmp_path: Path):
    state = tmp_path / "state"
    Journal(state, controller_id="c").close()
    with Journal(state, controller_id="cli", readonly=True) as reader:
        for write in (
            lambda: reader.add_job(make_job()),
            lambda: reader.append_output("j", ["x"]),
            lambda: reader.store_secret("j", "s", b"v"),
        ):
            with pytest.raises(JournalError, match="readonly"):
                write()


def test_state_dir_is_private(tmp_path: Path):
    state = tmp_path / "state"
    Journal(state, controller_id="c").close()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / DB_FILENAME).stat().st_mode) == 0o600


def test_default_state_dir_follows_the_documented_order(tmp_path: Path):
    assert default_state_dir({"FRAY_TPU_STATE_DIR": str(tmp_path / "x"), "XDG_STATE_HOME": "/y"}) == tmp_path / "x"
    assert default_state_dir({"XDG_STATE_HOME": "/y"}) == Path("/y/fray-tpu")
    assert default_state_dir({}) == Path("~/.local/state/fray-tpu").expanduser()
    assert default_state_dir({"FRAY_TPU_STATE_DIR": "/x"}, configured="~/mine") == Path("~/mine").expanduser()
    assert default_state_dir({"FRAY_TPU_STATE_DIR": "/x"}, configured=" ") == Path("/x")


def test_closed_journal_says_so(tmp_path: Path):
    j = Journal(tmp_path / "state", controller_id="c")
    j.close()
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.jobs()


# ---- the controller lock, across processes ----------------------------------------------------


def test_second_controller_is_refused_with_holder_pid_and_lock_dies_with_holder(tmp_path: Path):
    state = tmp_path / "state"
    holder = spawn(HOLD_LOCK, str(state))
    try:
        assert read_line(holder, "taking the lock") == "locked"
        with pytest.raises(JournalLockedError) as refused:
            Journal(state, controller_id="second")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message
        assert str(state) in message and "FRAY_TPU_STATE_DIR" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=DEADLINE_SECONDS)
    assert holder.returncode == -signal.SIGKILL
    with Journal(state, controller_id="successor") as successor:
        successor.add_job(make_job())
        assert successor.job("job-1").job_id == "job-1"


def test_second_controller_in_the_same_process_is_refused(tmp_path: Path):
    with Journal(tmp_path / "state", controller_id="first"):
        with pytest.raises(JournalLockedError, match=f"pid {os.getpid()}"):
            Journal(tmp_path / "state", controller_id="second")
    Journal(tmp_path / "state", controller_id="third").close()


READ_FOLLOW = """
import sys, time
from fray_tpu.state.journal import Journal
state, want = sys.argv[1], int(sys.argv[2])
reader = Journal(state, controller_id="cli", readonly=True)
print(len(reader.jobs()), flush=True)
seen, cursor = [], 0
deadline = time.monotonic() + 30
while len(seen) < want and time.monotonic() < deadline:
    lines, cursor = reader.output("job-1", after=cursor, limit=37)
    seen.extend(lines)
    if not lines:
        time.sleep(0.005)
print(reader.job("job-1").phase, flush=True)
print(len(seen), cursor, seen == [f"line {i}" for i in range(1, want + 1)], flush=True)
"""


def test_readonly_reader_process_follows_a_live_writer(journal: Journal):
    journal.add_job(make_job())
    total = 600
    reader = spawn(READ_FOLLOW, str(journal.state_dir), str(total))
    try:
        assert read_line(reader, "listing jobs") == "1"
        for start in range(1, total + 1, 50):
            journal.append_output("job-1", [f"line {i}" for i in range(start, start + 50)])
        journal.update_job("job-1", phase="running")
        assert read_line(reader, "reading the phase") in ("running", "booting 2/4 agents")
        assert read_line(reader, "following the output") == f"{total} {total} True"
    finally:
        reader.kill()
        reader.wait(timeout=DEADLINE_SECONDS)


# ---- output -------------------------------------------------------------------------------


def test_output_cursor_semantics(journal: Journal):
    assert journal.output("job-1") == ([], 0)
    journal.append_output("job-1", ["a", "b", "c"])
    journal.append_output("job-1", [])
    journal.append_output("job-2", ["other"])
    journal.append_output("job-1", ["d"])
    assert journal.output("job-1") == (["a", "b", "c", "d"], 4)
    assert journal.output("job-1", after=1, limit=2) == (["b", "c"], 3)
    assert journal.output("job-1", after=3) == (["d"], 4)
    assert journal.output("job-1", after=4) == ([], 4)
    assert journal.output("job-2") == (["other"], 1)


def test_output_keeps_the_newest_lines_within_the_bound(tmp_path: Path):
    bound = 100
    with Journal(tmp_path / "state", controller_id="c", max_output_lines=bound) as j:
        total = 1000
        for start in range(0, total, 7):
            j.append_output("job-1", [f"l{i}" for i in range(start, min(start + 7, total))])
        lines, last = j.output("job-1", limit=10 * bound)
        assert last == total
        assert bound <= len(lines) < bound + bound // 10 + 7
        assert lines == [f"l{i}" for i in range(total - len(lines), total)]
        _, first_seq = j.output("job-1", limit=1)
        assert first_seq == total - len(lines) + 1
        j.append_output("job-1", ["after trim"])
        assert j.output("job-1", after=total) == (["after trim"], total + 1)


# ---- secrets --------------------------------------------------------------------------------


def test_secrets_stay_out_of_the_database_and_are_private(journal: Journal):
    secret = b"s3cr3t-" + os.urandom(16).hex().encode()
    journal.add_job(make_job())
    journal.append_output("job-1", ["hello"])
    journal.store_secret("job-1", "channel", secret)
    journal.store_secret("job-1", "channel", secret)  # overwrite is atomic and allowed
    assert journal.load_secret("job-1", "channel") == secret

    path = journal.state_dir / "secrets" / "job-1" / "channel"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["channel"]

    for db_file in journal.state_dir.glob(DB_FILENAME + "*"):
        assert secret not in db_file.read_bytes(), db_file
        assert secret.hex().encode() not in db_file.read_bytes(), db_file

    journal.delete_secrets("job-1")
    assert not path.parent.exists()
    with pytest.raises(KeyError, match="'channel'") as missing:
        journal.load_secret("job-1", "channel")
    assert secret.decode() not in str(missing.value)
    journal.delete_secrets("job-1")


@pytest.mark.parametrize("job_id, name", [("../x", "s"), ("job", "../s"), ("", "s"), ("job", ".hidden")])
def test_secret_paths_cannot_escape(journal: Journal, job_id: str, name: str):
    with pytest.raises(ValueError, match="cannot name a file"):
        journal.store_secret(job_id, name, b"v")


# ---- concurrency and crashes ----------------------------------------------------------------


def test_threads_writing_concurrently_lose_nothing(journal: Journal):
    thread_count, batches, batch_size = 6, 40, 5
    errors: list[BaseException] = []

    def work(index: int) -> None:
        job_id = f"job-{index}"
        try:
            journal.add_job(make_job(job_id, created=float(index)))
            journal.add_resource(make_resource(f"node-{index}", job_id=job_id))
            for b in range(batches):
                journal.append_output(job_id, [f"{index}:{b}:{k}" for k in range(batch_size)])
                journal.update_job(job_id, counters={"batches": b + 1})
                journal.append_output("shared", [f"{index}:{b}"])
            journal.update_resource(f"node-{index}", "us-central2-b", state="ready")
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(thread_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE_SECONDS)
    assert not errors
    assert not any(t.is_alive() for t in threads)

    for index in range(thread_count):
        lines, last = journal.output(f"job-{index}", limit=10_000)
        assert lines == [f"{index}:{b}:{k}" for b in range(batches) for k in range(batch_size)]
        assert last == batches * batch_size
        assert journal.job(f"job-{index}").counters == {"batches": batches}
    shared, last = journal.output("shared", limit=10_000)
    assert last == len(shared) == thread_count * batches
    for index in range(thread_count):
        assert [line for line in shared if line.startswith(f"{index}:")] == [f"{index}:{b}" for b in range(batches)]
    assert {r.state for r in journal.resources()} == {"ready"}
    assert [j.job_id for j in journal.jobs()] == [f"job-{i}" for i in reversed(range(thread_count))]


WRITE_FOREVER = """
import sys, time
from fray_tpu.state.journal import Journal
from tests.edges.test_journal import make_job, make_resource
journal = Journal(sys.argv[1], controller_id="doomed")
journal.add_job(make_job())
print("writing", flush=True)
deadline = time.monotonic() + 60
batch = 0
while time.monotonic() < deadline:
    journal.append_output("job-1", [f"{batch}:{k}" for k in range(20)])
    journal.update_job("job-1", counters={"batches": batch + 1})
    journal.add_resource(make_resource(f"node-{batch}"))
    batch += 1
"""


def test_writer_sigkilled_mid_stream_leaves_a_readable_consistent_db(tmp_path: Path):
    state = tmp_path / "state"
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITE_FOREVER), str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert read_line(writer, "starting to write") == "writing"
        reader = Journal(state, controller_id="cli", readonly=True)
        wait_until(lambda: reader.output("job-1", after=200)[0], "the writer to pass 200 lines")
        reader.close()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=DEADLINE_SECONDS)
    assert writer.returncode == -signal.SIGKILL

    with Journal(state, controller_id="cli", readonly=True) as after_crash:
        lines, last = after_crash.output("job-1", limit=10**6)
        batches = after_crash.job("job-1").counters["batches"]
        resource_count = len(after_crash.resources())
    assert last == len(lines) > 200
    assert lines == [f"{b}:{k}" for b in range(len(lines) // 20) for k in range(20)]
    # Each step is its own transaction: the counter and resources trail the output by at most one batch.
    assert len(lines) // 20 - 1 <= batches <= len(lines) // 20
    assert batches - 1 <= resource_count <= batches

    with Journal(state, controller_id="successor") as successor:
        successor.append_output("job-1", ["resumed"])
        assert successor.output("job-1", after=last) == (["resumed"], last + 1)
    with sqlite3.connect(state / DB_FILENAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_journal_file_is_plain_sqlite_with_versioned_schema(journal: Journal):
    journal.add_job(make_job())
    with sqlite3.connect(f"{(journal.state_dir / DB_FILENAME).as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
        assert json.loads(db.execute("SELECT task_names FROM jobs").fetchone()[0]) == ["train-0", "train-1"]
    db.close()
