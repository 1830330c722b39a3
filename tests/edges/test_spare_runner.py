"""The agent's spare runner (a runner pre-started for the next attempt) through the real channel:
real agent processes, one per loopback IP."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import cloudpickle

from fake_gcp import wait_for
from fray_tpu import tls
from fray_tpu.channel import AttemptExit, AttemptSpec
from worker_host import collect, make_slice, one_host, processes_marked, teardown_slice  # noqa: F401 (fixture)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

EVENT_TIMEOUT = 30.0
SPARE_TIMEOUT = 30.0


def report(path: str) -> None:
    """Write what this process is: its environment as the job sees it, the one it was started
    with (/proc/self/environ), its directory, its first import path entry, whether JAX is loaded."""
    started_with = dict(item.split("=", 1) for item in
                        Path("/proc/self/environ").read_bytes().decode().split("\0") if "=" in item)
    Path(path).write_text(json.dumps({
        "pid": os.getpid(), "env": dict(os.environ), "started_with": started_with, "cwd": os.getcwd(),
        "path0": sys.path[0], "jax_loaded": "jax" in sys.modules,
    }))


def run_report(client, tmp_path: Path, env: dict[str, str]):
    """One attempt of ``report`` on the host; its Prepare result and what the process wrote."""
    attempt_id = f"attempt-{uuid.uuid4().hex[:12]}"
    out = tmp_path / f"{attempt_id}.json"
    prepared = client.prepare(AttemptSpec.for_callable(attempt_id, report, (str(out),), env=env))
    events = collect(client.start(attempt_id), EVENT_TIMEOUT)
    assert isinstance(events[-1], AttemptExit) and events[-1].code == 0, events[-3:]
    return prepared, json.loads(out.read_text())


def hand_over(client) -> None:
    """What the warm pool does between jobs: the host cleaned and handed to a new secret."""
    secret = tls.make_secret()
    client.hand_over(secret, "next-holder")
    client.use_secret(secret)


def block_until(path: str) -> None:
    """Wait (bounded) for ``path`` to exist; runs on the host, where tests/ is not importable."""
    import threading
    import time

    deadline, pause = time.monotonic() + EVENT_TIMEOUT, threading.Event()
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        pause.wait(0.05)


def spare_started(client, count: int = 1) -> None:
    wait_for(lambda: client.describe().cache["spare_runners_started"] >= count, "a spare runner to be started",
             SPARE_TIMEOUT)


def live_processes_besides_the_agent(host) -> list[int]:
    return [pid for pid in processes_marked(host.marker) if pid != host.process.pid]


def test_the_next_attempt_runs_in_the_spare_runner_with_only_its_own_environment(one_host, tmp_path):
    """At a hand-over, the agent pre-starts a runner; the next attempt runs in it (Prepare and
    the counters say so; the process was started before the attempt, without its variables),
    sees exactly its own variables (none of the previous attempt's), runs in its own directory
    (first on its import path), and finds JAX not imported (JAX reads its variables when imported)."""
    client = one_host.clients[0]
    first, before = run_report(client, tmp_path, {"FRAY_FIRST_JOB_ONLY": "1", "MEGASCALE_SLICE_ID": "0"})
    assert not first.spare_runner_used
    hand_over(client)
    spare_started(client)

    second, seen = run_report(client, tmp_path, {"MEGASCALE_SLICE_ID": "1", "JAX_PLATFORMS": "cpu"})
    assert second.spare_runner_used
    assert client.describe().cache["spare_runners_used"] == 1
    assert seen["pid"] != before["pid"]
    assert "FRAY_TPU_ATTEMPT_ID" not in seen["started_with"]  # pre-started, before the attempt existed
    assert "FRAY_TPU_ATTEMPT_ID" in before["started_with"]
    assert seen["env"]["FRAY_TPU_ATTEMPT_ID"] == second.attempt_id
    assert (seen["env"]["MEGASCALE_SLICE_ID"], seen["env"]["JAX_PLATFORMS"]) == ("1", "cpu")
    assert "FRAY_FIRST_JOB_ONLY" not in seen["env"]
    assert set(seen["env"]) - set(before["env"]) == {"JAX_PLATFORMS"}
    assert Path(seen["cwd"]).name == second.attempt_id and seen["path0"] == seen["cwd"]  # as `-m` makes it
    assert not seen["jax_loaded"]


def test_an_attempt_that_needs_other_startup_variables_starts_its_own_runner(one_host, tmp_path):
    """A variable the interpreter reads while starting (PYTHONHASHSEED) that differs from the
    spare's: the attempt starts its own process, which has it from the start; the spare stays
    for the next attempt of the usual environment."""
    client = one_host.clients[0]
    run_report(client, tmp_path, {})
    hand_over(client)
    spare_started(client)
    own, seen = run_report(client, tmp_path, {"PYTHONHASHSEED": "7"})
    assert not own.spare_runner_used
    assert seen["started_with"]["PYTHONHASHSEED"] == "7"
    usual, _ = run_report(client, tmp_path, {})
    assert usual.spare_runner_used


def test_an_attempt_past_its_start_has_a_spare_ready_for_its_retry(one_host, tmp_path):
    """A while after an attempt started (never during a gang's start), the agent pre-starts the
    runner its retry will use; the running attempt is unaffected."""
    client = one_host.clients[0]
    go = tmp_path / "go"
    attempt_id = f"attempt-{uuid.uuid4().hex[:12]}"
    client.prepare(AttemptSpec.for_callable(attempt_id, block_until, (str(go),)))
    stream = client.start(attempt_id)
    assert client.describe().cache["spare_runners_started"] == 0  # not while it starts (2 s)
    spare_started(client)
    assert client.describe().current_attempt.state == "RUNNING"
    go.write_text("")
    assert collect(stream, EVENT_TIMEOUT)[-1].code == 0
    retry, _ = run_report(client, tmp_path, {})
    assert retry.spare_runner_used


def test_an_attempt_that_ends_at_once_leaves_a_spare_for_its_retry(one_host, tmp_path):
    """An attempt that ends before it has run for a while (a task that raises at once): the
    agent starts the spare at its exit, and the retry runs in it, with its own variables."""
    client = one_host.clients[0]
    first, _ = run_report(client, tmp_path, {"FRAY_FIRST_ATTEMPT_ONLY": "1"})
    assert not first.spare_runner_used
    spare_started(client)
    retry, seen = run_report(client, tmp_path, {})
    assert retry.spare_runner_used
    assert "FRAY_FIRST_ATTEMPT_ONLY" not in seen["env"] and seen["env"]["FRAY_TPU_ATTEMPT_ID"] == retry.attempt_id


def test_a_host_being_preempted_starts_no_spare(one_host, tmp_path):
    """Once the VM's `preempted` flag is up, an attempt's exit starts no spare runner (the
    host is about to go, and nothing may wait on it for a job)."""
    host, client = one_host.hosts[0], one_host.clients[0]
    host.metadata.set_preempted("TRUE")
    wait_for(lambda: client.describe().preempted, "the agent to see the preempted flag", SPARE_TIMEOUT)
    run_report(client, tmp_path, {})
    retry, _ = run_report(client, tmp_path, {})
    assert not retry.spare_runner_used
    assert client.describe().cache["spare_runners_started"] == 0


def test_the_spare_runner_does_not_outlive_the_agent(one_host, tmp_path):
    """Stopping the agent (SIGTERM, as the service manager does) kills its spare runner too."""
    host, client = one_host.hosts[0], one_host.clients[0]
    run_report(client, tmp_path, {})
    hand_over(client)
    spare_started(client)
    spares = wait_for(lambda: live_processes_besides_the_agent(host), "the spare runner's process", SPARE_TIMEOUT)
    host.process.terminate()
    host.process.wait(EVENT_TIMEOUT)
    wait_for(lambda: not live_processes_besides_the_agent(host), f"the spare runner {spares} to be gone",
             SPARE_TIMEOUT)


def test_the_spare_runner_ends_when_the_agent_is_killed(one_host, tmp_path):
    """An agent that dies without stopping anything (SIGKILL): its spare runner reads the end
    of its stdin (the agent held the only writer) and exits; no runner waits for a job."""
    host, client = one_host.hosts[0], one_host.clients[0]
    run_report(client, tmp_path, {})
    hand_over(client)
    spare_started(client)
    spares = wait_for(lambda: live_processes_besides_the_agent(host), "the spare runner's process", SPARE_TIMEOUT)
    host.kill_agent()
    wait_for(lambda: not live_processes_besides_the_agent(host), f"the spare runner {spares} to be gone",
             SPARE_TIMEOUT)


def test_a_lapsed_lease_discards_the_spare_runner(tmp_path):
    """When the controller's lease lapses, no runner is left waiting for a job."""
    test_slice = make_slice(tmp_path, 1)
    try:
        (client,) = test_slice.wait_until_up()
        host = test_slice.hosts[0]
        run_report(client, tmp_path, {})
        hand_over(client)
        spare_started(client)
        client.renew_lease(1.0)
        wait_for(lambda: client.describe().cache["spare_runners_discarded"] >= 1, "the spare to be discarded",
                 SPARE_TIMEOUT)
        wait_for(lambda: not live_processes_besides_the_agent(host), "no process but the agent", SPARE_TIMEOUT)
    finally:
        teardown_slice(test_slice)
