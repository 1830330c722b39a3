"""The agent guards and cleans its host: authentication before anything runs, leftovers of
earlier attempts, the libtpu lockfile, and the controller's lease. Real agent processes."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from fray_tpu import tls
from fray_tpu.channel import AgentAuthError, AgentClient, AttemptExit, AttemptSpec, ChannelError, Classification
from fray_tpu.proto import worker_pb2, worker_pb2_grpc
from fray_tpu.worker.cleanup import CGROUPS_ENV, AttemptCgroups
from fake_gcp import process_alive
from fake_gcp.host_jobs import SCRUBBED_DAEMON
from worker_host import collect, make_slice, one_host, processes_marked, teardown_slice  # noqa: F401 (fixture)

EVENT_TIMEOUT = 30.0


def wait_for(condition, what: str, timeout: float = EVENT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)




def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# -- authentication ------------------------------------------------------------------------------


def test_no_secret_a_wrong_secret_or_plain_text_is_rejected_and_nothing_runs(one_host, tmp_path):
    host = one_host.hosts[0]
    touched = tmp_path / "user-code-ran"

    def touch(path):
        open(path, "w").close()

    spec = AttemptSpec.for_callable("attempt-rejected", touch, (str(touched),))
    state_files_before = files_under(host.state_dir)

    wrong = one_host.client(host, secret="not-the-job-secret")
    with pytest.raises(AgentAuthError, match="UNAUTHENTICATED"):
        wrong.prepare(spec)
    with pytest.raises(AgentAuthError):
        collect(wrong.start(spec.attempt_id), EVENT_TIMEOUT)
    with pytest.raises(AgentAuthError):
        wrong.describe()

    empty = one_host.client(host, secret="")
    with pytest.raises(AgentAuthError):
        empty.prepare(spec)

    # No authorization metadata at all, on a correctly pinned TLS channel.
    channel = grpc.secure_channel(host.address, tls.channel_credentials(one_host.material.cert_pem),
                                  options=tls.channel_options())
    stub = worker_pb2_grpc.WorkerStub(channel)
    with pytest.raises(grpc.RpcError) as no_secret:
        stub.Prepare(spec.to_proto(), timeout=5)
    assert no_secret.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as no_secret_upload:
        stub.UploadBundle(iter([worker_pb2.BundleChunk(digest="0" * 64, data=b"x" * 1000)]), timeout=5)
    assert no_secret_upload.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()

    # Plain text, with the right secret: the TLS-only port does not answer.
    plain = grpc.insecure_channel(host.address)
    with pytest.raises(grpc.RpcError) as plain_text:
        worker_pb2_grpc.WorkerStub(plain).Prepare(
            spec.to_proto(), timeout=5, metadata=(("authorization", f"Bearer {one_host.secret}"),))
    assert plain_text.value.code() == grpc.StatusCode.UNAVAILABLE
    plain.close()

    # TLS pinned to another job's certificate: the agent is not trusted, nothing is sent.
    other = AgentClient(host.address, secret=one_host.secret, pinned_cert_pem=tls.make_job_tls().cert_pem,
                        timeout=2)
    with pytest.raises(ChannelError):
        other.describe(retries=0)
    other.close()

    assert not touched.exists(), "user code ran for a rejected call"
    assert files_under(host.state_dir) == state_files_before, "a rejected call wrote files on the host"
    assert processes_marked(host.marker) == [host.process.pid], "a rejected call started a process"
    good = one_host.client(host)
    assert good.describe().current_attempt is None
    with pytest.raises(ChannelError, match="NOT_FOUND"):
        collect(good.start(spec.attempt_id), EVENT_TIMEOUT)


# -- host cleaning ---------------------------------------------------------------------------------


def test_a_stale_lockfile_and_leftovers_of_an_earlier_attempt_are_removed_before_the_next(one_host, tmp_path):
    host = one_host.hosts[0]
    client = one_host.client(host)
    escaped_pid_file = tmp_path / "escaped.pid"

    def leaves_processes_behind(pid_file):
        import subprocess
        import sys
        import time

        # A child in its own session escapes the attempt's process group.
        code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", code, pid_file], start_new_session=True)
        time.sleep(600)

    first = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec.for_callable(first, leaves_processes_behind, (str(escaped_pid_file),)))
    stream = client.start(first)
    started = stream.next_event(timeout=EVENT_TIMEOUT)
    escaped_pid = int(wait_for(lambda: escaped_pid_file.exists() and escaped_pid_file.read_text(),
                               "the escaped child's pid"))
    stream.close()

    # The agent crashes and comes back: its attempt's processes are still running.
    host.kill_agent()
    assert process_alive(started.pid) and process_alive(escaped_pid)
    host.start_agent()
    client = one_host.client(host)
    client.wait_until_up(time.monotonic() + EVENT_TIMEOUT)

    lockfile = host.workdir / "tmp" / "libtpu_lockfile"
    lockfile.write_text("held by a dead process")
    second = f"attempt-{uuid.uuid4().hex[:8]}"
    result = client.prepare(AttemptSpec(second, command="true"))
    assert not lockfile.exists()
    assert not process_alive(started.pid) and not process_alive(escaped_pid)
    notes = "\n".join(result.cleanup_notes)
    assert "leftover" in notes and "libtpu_lockfile" in notes
    assert collect(client.start(second), EVENT_TIMEOUT)[-1].code == 0


def test_processes_an_attempt_leaves_behind_end_with_it(one_host, tmp_path):
    host = one_host.hosts[0]
    client = one_host.client(host)
    daemon_pid_file = tmp_path / "daemon.pid"

    def starts_a_daemon(pid_file):
        import subprocess
        import sys

        code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", code, pid_file], start_new_session=True)
        print("started a daemon")

    attempt_id = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec.for_callable(attempt_id, starts_a_daemon, (str(daemon_pid_file),)))
    events = collect(client.start(attempt_id), EVENT_TIMEOUT)
    assert events[-1].code == 0
    if daemon_pid_file.exists() and daemon_pid_file.read_text():
        assert not process_alive(int(daemon_pid_file.read_text()))
    # The agent's pre-started runner for a next attempt (started at this one's exit) is no leftover
    # (waited for: between its fork and its exec it is not yet recognisable as the spare).
    wait_for(lambda: set(processes_marked(host.marker)) - set(host.waiting_spare_runners()) == {host.process.pid},
             "nothing but the agent and its spare runner left on the host")


@pytest.mark.parametrize("cgroups", ["on", "off"])
def test_a_daemon_that_scrubbed_its_environment_and_called_setsid_ends_with_its_attempt(tmp_path, cgroups):
    """The daemon carries no token and is in no group of the attempt: it is found by the attempt's
    cgroup, or (cgroups off) because the agent is its subreaper; either way it is gone once the
    attempt has reported its exit."""
    if cgroups == "on" and AttemptCgroups.create(tmp_path / "probe") is None:
        pytest.skip("this host does not let us create a cgroup v2")
    pid_file = tmp_path / "daemon.pid"

    def starts_a_scrubbed_daemon(daemon, pid_file):
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", daemon, pid_file], env={}, check=True, timeout=60)
        print("started a daemon")

    test_slice = make_slice(tmp_path, 1, extra_env={CGROUPS_ENV: cgroups})
    try:
        [client] = test_slice.wait_until_up()
        attempt_id = f"attempt-{uuid.uuid4().hex[:8]}"
        client.prepare(AttemptSpec.for_callable(attempt_id, starts_a_scrubbed_daemon,
                                                (SCRUBBED_DAEMON, str(pid_file))))
        started = client.start(attempt_id)
        daemon = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the daemon's pid"))
        assert collect(started, EVENT_TIMEOUT)[-1].code == 0
        assert not process_alive(daemon), f"the daemon {daemon} outlived its attempt"
    finally:
        teardown_slice(test_slice)


@pytest.mark.parametrize("spec_fields", [
    {"command": "echo", "env": {"SETTING": "a\0b"}},
    {"command": "echo", "args": ["a\0b"]},
])
def test_a_process_that_cannot_be_started_for_its_specs_sake_is_the_jobs_failure(one_host, spec_fields):
    """Issue 15 point 7: what the spec makes unstartable (Popen's ValueError on a NUL byte, past
    the controller's own check) ends the attempt as a user failure naming the error; the host
    stays usable, and is not reported as bad."""
    client = one_host.client(one_host.hosts[0])
    attempt_id = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec(attempt_id, **spec_fields))
    finished = collect(client.start(attempt_id), EVENT_TIMEOUT)[-1]
    assert finished.classification == Classification.USER_FAILURE
    assert "cannot start 'echo'" in finished.stderr_tail and "ValueError" in finished.stderr_tail
    after = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec(after, command="true"))
    assert collect(client.start(after), EVENT_TIMEOUT)[-1].code == 0


# -- lease ----------------------------------------------------------------------------------------


def test_when_the_lease_lapses_the_attempt_stops(tmp_path):
    test_slice = make_slice(tmp_path, 1)
    try:
        [client] = test_slice.wait_until_up()
        assert client.renew_lease(60) == pytest.approx(60, abs=1)
        attempt_id = f"attempt-{uuid.uuid4().hex[:8]}"
        client.prepare(AttemptSpec(attempt_id, command="sleep", args=["600"]))
        stream = client.start(attempt_id)
        # The controller shortens the lease, then goes silent.
        client.renew_lease(1.0)
        events = collect(stream, EVENT_TIMEOUT)
        finished = events[-1]
        assert isinstance(finished, AttemptExit)
        assert finished.classification == Classification.CANCELLED
        assert "lease expired" in finished.reason
        assert "lease" in test_slice.hosts[0].log()
    finally:
        teardown_slice(test_slice)


# -- preemption -----------------------------------------------------------------------------------


def test_a_preempted_vm_is_reported_and_its_failure_classified_as_preemption(one_host):
    from fray_tpu.channel import PreemptionNotice

    host = one_host.hosts[0]
    client = one_host.client(host)
    attempt_id = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec(attempt_id, command="sleep", args=["600"]))
    stream = client.start(attempt_id)
    started = stream.next_event(timeout=EVENT_TIMEOUT)
    host.metadata.set_preempted("TRUE")
    assert isinstance(stream.next_event(timeout=EVENT_TIMEOUT), PreemptionNotice)
    assert client.describe().preempted
    # The VM going down takes the user's process with it.
    os.kill(started.pid, 9)
    finished = collect(stream, EVENT_TIMEOUT)[-1]
    assert (finished.signal, finished.classification) == (9, Classification.PREEMPTED)


# -- job environments through the channel ---------------------------------------------------------


def build_wheel(directory: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel of a tiny local package, zipped by hand (no build backend, no index)."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    entries[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: fray-tpu-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}"
        for path, text in entries.items()
    ]
    entries[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in entries.items():
            archive.writestr(path, text)
    return wheel


def test_pip_packages_are_installed_for_the_attempt_and_the_environment_is_reused(tmp_path, package_index):
    marker = uuid.uuid4().hex
    wheel = build_wheel(tmp_path, "fraytest_channel_pkg", "1.0",
                        {"fraytest_channel_pkg/__init__.py": f"MARKER = {marker!r}\n"})
    test_slice = make_slice(tmp_path / "hosts", 1)
    try:
        [client] = test_slice.wait_until_up()

        def imports_the_package():
            import fraytest_channel_pkg

            print(fraytest_channel_pkg.MARKER)

        results = []
        for run in range(2):
            attempt_id = f"attempt-pip-{run}"
            prepared = client.prepare(AttemptSpec.for_callable(attempt_id, imports_the_package,
                                                                pip_packages=[str(wheel)],
                                                                index_url=package_index.url))
            events = collect(client.start(attempt_id), EVENT_TIMEOUT)
            assert events[-1].code == 0, events[-1].stderr_tail
            results.append((prepared.env_reused, [line for e in events if hasattr(e, "lines") for line in e.lines]))
        assert results == [(False, [marker]), (True, [marker])]
        cache = client.describe().cache
        assert (cache["envs_created"], cache["envs_reused"]) == (1, 1)

        # A cancel that arrives while the environment is still being built does not wait for
        # it; the attempt is cancelled as soon as it is prepared and never runs.
        other = build_wheel(tmp_path, "fraytest_channel_other", "1.0", {"fraytest_channel_other/__init__.py": ""})
        spec = AttemptSpec.for_callable("attempt-pip-cancelled", imports_the_package,
                                        pip_packages=[str(wheel), str(other)], index_url=package_index.url)
        preparing = threading.Thread(target=client.prepare, args=(spec,))
        preparing.start()

        def preparing_now() -> bool:
            current = client.describe().current_attempt
            return current is not None and current.state == "PREPARING"

        wait_for(preparing_now, "the attempt to be preparing")
        assert client.cancel(spec.attempt_id, grace=1.0) is False
        preparing.join(EVENT_TIMEOUT)
        finished = collect(client.start(spec.attempt_id), EVENT_TIMEOUT)
        assert [type(e) for e in finished] == [AttemptExit]
        assert finished[0].classification == Classification.CANCELLED
    finally:
        teardown_slice(test_slice)


# -- hand-over between jobs (warm slices) ------------------------------------------------------------


def test_a_hand_over_cleans_the_host_and_only_the_new_secret_works_even_after_an_agent_restart(one_host, tmp_path):
    """Refused while an attempt runs; once the attempt is cancelled it removes the lockfile and
    the attempt's files, then the previous secret is UNAUTHENTICATED and the new one works; an
    agent restarted on the host keeps the new secret (not the one in the node's metadata)."""
    host = one_host.hosts[0]
    client = one_host.client(host)
    attempt = f"attempt-{uuid.uuid4().hex[:8]}"
    client.prepare(AttemptSpec(attempt, command="sleep", args=["600"]))
    stream = client.start(attempt)
    stream.next_event(timeout=EVENT_TIMEOUT)
    new_secret = tls.make_secret()
    with pytest.raises(ChannelError, match="FAILED_PRECONDITION"):
        client.hand_over(new_secret, "next-job")
    client.cancel(attempt, 1.0)
    stream.close()

    lockfile = host.workdir / "tmp" / "libtpu_lockfile"
    lockfile.write_text("held by the previous job")
    assert (host.state_dir / "attempts" / attempt).exists()
    client.hand_over(new_secret, "next-job")
    assert not lockfile.exists()
    assert not (host.state_dir / "attempts" / attempt).exists()
    with pytest.raises(AgentAuthError):
        client.describe(retries=0)
    fresh = one_host.client(host, secret=new_secret)
    assert fresh.describe().job == "next-job"
    persisted = host.state_dir / "secret.sha256"
    assert persisted.read_text() == tls.secret_sha256(new_secret)
    assert persisted.stat().st_mode & 0o777 == 0o600

    host.kill_agent()
    host.start_agent()
    restarted = one_host.client(host, secret=new_secret)
    restarted.wait_until_up(time.monotonic() + EVENT_TIMEOUT)
    with pytest.raises(AgentAuthError):
        one_host.client(host).describe(retries=0)


def test_a_prepare_that_hands_the_host_over_prepares_for_the_new_holder_and_a_repeat_finds_it(one_host):
    """A warm slice's first Prepare, sent with the previous holder's secret, hands the host over
    and prepares: the old secret is then refused, the new one starts the attempt, Describe names
    the holder. The same Prepare sent again through a client still on the old secret (its first
    answer lost) finds the attempt prepared instead of failing."""
    from fray_tpu.contract import PrepareFailureKind

    host = one_host.hosts[0]
    client = one_host.client(host)
    new_secret = tls.make_secret()
    attempt = f"attempt-{uuid.uuid4().hex[:8]}"
    spec = AttemptSpec(attempt, command="true")
    client.prepare(spec, hand_over=(new_secret, "next-job"))
    with pytest.raises(AgentAuthError):
        one_host.client(host).describe(retries=0)
    assert client.describe().job == "next-job"  # the client presents the new secret now

    repeat = one_host.client(host)
    assert repeat.prepare(spec, hand_over=(new_secret, "next-job")).attempt_id == attempt
    finished = collect(repeat.start(attempt), EVENT_TIMEOUT)[-1]
    assert (finished.code, finished.classification) == (0, Classification.OK)

    host.metadata.set_preempted("TRUE")
    wait_for(lambda: repeat.describe().preempted, "the agent to see the preemption")
    refused_secret = tls.make_secret()
    with pytest.raises(ChannelError) as refused:
        repeat.prepare(AttemptSpec(f"{attempt}-next", command="true"), hand_over=(refused_secret, "third-job"))
    assert refused.value.kind == PrepareFailureKind.HAND_OVER
    assert "preempted" in str(refused.value)
    # Refused: the host stays with its holder.
    assert one_host.client(host, secret=new_secret).describe().job == "next-job"
    with pytest.raises(AgentAuthError):
        one_host.client(host, secret=refused_secret).describe(retries=0)
