"""The agent through the real channel: 4 agent processes on distinct loopback IPs, no mocks."""

from __future__ import annotations

import sys
import time
import uuid

import pytest

from fray_tpu.channel import (
    AgentClient,
    AttemptExit,
    AttemptSpec,
    AttemptStarted,
    Classification,
    EventsLost,
    LogBatch,
    PrepareFailed,
)
from fake_gcp import process_alive
from worker_host import collect, make_slice, teardown_slice

EVENT_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def slice4(tmp_path_factory):
    test_slice = make_slice(tmp_path_factory.mktemp("slice4"), 4)
    clients = test_slice.wait_until_up()
    yield test_slice, clients
    teardown_slice(test_slice)


def new_attempt_id() -> str:
    return f"attempt-{uuid.uuid4().hex[:12]}"


def run(clients: list[AgentClient], spec_for_host) -> list[list]:
    """Prepare on every host, then start on every host (a gang), then collect all events."""
    specs = [spec_for_host(i) for i in range(len(clients))]
    for client, spec in zip(clients, specs):
        client.prepare(spec)
    streams = [client.start(spec.attempt_id) for client, spec in zip(clients, specs)]
    return [collect(stream, EVENT_TIMEOUT) for stream in streams]


def exit_of(events: list) -> AttemptExit:
    assert isinstance(events[-1], AttemptExit), f"the last event is not the exit: {events[-3:]}"
    return events[-1]


def lines(events: list, stream: str = "stdout") -> list[str]:
    return [line for e in events if isinstance(e, LogBatch) and e.stream == stream for line in e.lines]


def test_all_four_agents_answer_with_their_worker_numbers(slice4):
    test_slice, clients = slice4
    infos = [client.describe() for client in clients]
    assert [info.worker_number for info in infos] == [0, 1, 2, 3]
    assert [info.ip for info in infos] == [host.ip for host in test_slice.hosts]
    assert all(info.healthy and not info.preempted for info in infos)


def test_a_closure_with_args_runs_on_every_host_and_its_prints_come_back_per_host(slice4):
    _, clients = slice4
    greeting = "hello from a closure"

    def task(number, *, suffix):
        import os

        print(f"{greeting} {number}{suffix} on worker {os.environ['FRAY_TPU_WORKER_NUMBER']}")
        print("second line")

    attempt_id = new_attempt_id()
    results = run(clients, lambda i: AttemptSpec.for_callable(attempt_id, task, (i * 10,), {"suffix": "!"},
                                                               task_index=i))
    for worker, events in enumerate(results):
        assert isinstance(events[0], AttemptStarted) and events[0].pid > 0
        assert lines(events) == [f"{greeting} {worker * 10}! on worker {worker}", "second line"]
        assert exit_of(events).code == 0
        assert exit_of(events).classification == Classification.OK


def test_a_binary_runs_and_its_exit_code_and_stderr_come_back(slice4):
    _, clients = slice4
    attempt_id = new_attempt_id()
    results = run(clients[:2], lambda i: AttemptSpec(
        attempt_id, command="sh", args=["-c", f"echo out {i}; echo err {i} >&2; exit 3"]))
    for worker, events in enumerate(results):
        assert lines(events) == [f"out {worker}"]
        assert lines(events, "stderr") == [f"err {worker}"]
        finished = exit_of(events)
        assert (finished.code, finished.signal) == (3, None)
        assert finished.classification == Classification.USER_FAILURE
        assert f"err {worker}" in finished.stderr_tail


def test_a_signal_that_ends_the_process_comes_back(slice4):
    _, clients = slice4
    attempt_id = new_attempt_id()
    [events] = run(clients[:1], lambda i: AttemptSpec(attempt_id, command="sh", args=["-c", "kill -KILL $$"]))
    finished = exit_of(events)
    assert (finished.code, finished.signal) == (None, 9)
    assert finished.classification == Classification.USER_FAILURE


def test_an_exception_traceback_comes_back(slice4):
    _, clients = slice4

    def fails():
        raise ValueError("boom in user code")

    attempt_id = new_attempt_id()
    [events] = run(clients[1:2], lambda i: AttemptSpec.for_callable(attempt_id, fails))
    finished = exit_of(events)
    assert finished.code == 1
    assert "Traceback (most recent call last)" in finished.stderr_tail
    assert "ValueError: boom in user code" in finished.stderr_tail
    assert "ValueError: boom in user code" in lines(events, "stderr")


def test_a_missing_binary_is_a_user_failure_not_a_crash(slice4):
    _, clients = slice4
    attempt_id = new_attempt_id()
    [events] = run(clients[:1], lambda i: AttemptSpec(attempt_id, command="/nonexistent/fray-tpu-binary"))
    finished = exit_of(events)
    assert finished.code == 127
    assert finished.classification == Classification.USER_FAILURE
    assert "/nonexistent/fray-tpu-binary" in finished.stderr_tail


def test_a_bad_host_signature_in_stderr_is_reported_as_bad_host(slice4):
    _, clients = slice4

    def dirty_tpu():
        import sys

        print("starting", flush=True)
        print("RuntimeError: Failed to initialize TPU system: open(/dev/vfio/0): Device or resource busy",
              file=sys.stderr)
        sys.exit(1)

    attempt_id = new_attempt_id()
    [events] = run(clients[2:3], lambda i: AttemptSpec.for_callable(attempt_id, dirty_tpu))
    finished = exit_of(events)
    assert finished.classification == Classification.BAD_HOST
    assert "Failed to initialize TPU system" in finished.reason


def test_cancel_kills_the_whole_tree_including_a_child_that_ignores_sigterm(slice4, tmp_path):
    _, clients = slice4
    client = clients[3]
    child_pid_file = tmp_path / "child.pid"

    def stubborn_tree(pid_file):
        import subprocess
        import sys
        import time

        code = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)")
        subprocess.Popen([sys.executable, "-c", code, pid_file])
        time.sleep(600)

    attempt_id = new_attempt_id()
    client.prepare(AttemptSpec.for_callable(attempt_id, stubborn_tree, (str(child_pid_file),)))
    stream = client.start(attempt_id)
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not (child_pid_file.exists() and child_pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never wrote its pid"
        time.sleep(0.02)
    child_pid = int(child_pid_file.read_text())
    started = time.monotonic()
    assert client.cancel(attempt_id, grace=0.5) is True
    assert time.monotonic() - started < 10
    assert not process_alive(child_pid), "the child that ignores SIGTERM survived the cancel"
    finished = exit_of(collect(stream, EVENT_TIMEOUT))
    assert finished.classification == Classification.CANCELLED
    assert client.cancel(attempt_id, grace=0.5) is False




def test_watch_resumes_from_a_sequence_number(slice4):
    _, clients = slice4
    client = clients[0]
    attempt_id = new_attempt_id()
    [events] = run([client], lambda i: AttemptSpec(
        attempt_id, command="sh", args=["-c", "echo one; sleep 0.05; echo two; sleep 0.05; echo three"]))
    assert lines(events) == ["one", "two", "three"]
    resumed = collect(client.watch(attempt_id, from_seq=3), EVENT_TIMEOUT)
    assert [e.seq for e in resumed] == [e.seq for e in events if e.seq >= 3]
    assert exit_of(resumed).code == 0


def test_a_slow_consumer_with_a_tiny_buffer_still_gets_every_line_in_order(slice4):
    _, clients = slice4
    client = clients[1]
    count = 100_000
    attempt_id = new_attempt_id()
    client.prepare(AttemptSpec(attempt_id, command=sys.executable,
                               args=["-c", f"import sys\nfor i in range({count}): sys.stdout.write(f'line {{i}}\\n')"]))
    stream = client.start(attempt_id, buffer_events=2, buffer_bytes=4096)
    events = collect(stream, EVENT_TIMEOUT)
    assert not [e for e in events if isinstance(e, EventsLost)]
    received = lines(events)
    assert len(received) == count
    assert received[0] == "line 0" and received[-1] == f"line {count - 1}"
    assert received == [f"line {i}" for i in range(count)]


def test_prepare_is_idempotent_and_a_second_attempt_waits_for_the_first(slice4):
    _, clients = slice4
    client = clients[2]
    first, second = new_attempt_id(), new_attempt_id()
    spec = AttemptSpec(first, command="sleep", args=["60"])
    client.prepare(spec)
    client.prepare(spec)
    stream = client.start(first)
    assert isinstance(stream.next_event(timeout=EVENT_TIMEOUT), AttemptStarted)
    with pytest.raises(PrepareFailed, match=f"{first} is still active") as refused:
        client.prepare(AttemptSpec(second, command="true"))
    assert refused.value.kind == "controller"
    assert client.cancel(first, grace=1.0)
    assert exit_of(collect(stream, EVENT_TIMEOUT)).classification == Classification.CANCELLED
    [events] = run([client], lambda i: AttemptSpec(second, command="true"))
    assert exit_of(events).code == 0


def test_a_workspace_bundle_is_uploaded_once_and_importable_on_every_host(slice4, tmp_path):
    from fray_tpu.workspace import pack_workspace

    _, clients = slice4
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    marker = uuid.uuid4().hex
    (workspace / "only_in_workspace.py").write_text(f"MARKER = {marker!r}\n")
    bundle = pack_workspace(workspace, cache_dir=tmp_path / "cache")
    assert [client.upload_bundle(bundle) for client in clients] == [True] * 4
    assert [client.upload_bundle(bundle) for client in clients] == [False] * 4

    def uses_workspace():
        import only_in_workspace

        print(only_in_workspace.MARKER)

    attempt_id = new_attempt_id()
    results = run(clients, lambda i: AttemptSpec.for_callable(attempt_id, uses_workspace,
                                                               workspace_digest=bundle.digest))
    for events in results:
        assert exit_of(events).code == 0, exit_of(events).stderr_tail
        assert lines(events) == [marker]
    assert all(client.describe().cache["bundle_uploads"] >= 1 for client in clients)
