"""fray-tpu against Marin's own ``marin-fray`` (the second CI lane: ``./dev test-marin``, Python 3.12).

Checks that the Client API code uses Marin's types and protocols, and that ``FRAY_BACKEND=tpu``
makes Marin's ``fray.current_client.current_client()`` return a ``TpuClient`` in a fresh
interpreter (main thread and a user thread), with a nested submit from inside a job. The main
lane (no marin-fray) does not collect them (tests/marin/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


from fray_tpu import client_api

INTERPRETER_TIMEOUT = 180.0


def test_the_vocabulary_is_marins():
    """With marin-fray installed, fray_tpu's Client API names are Marin's own classes."""
    import fray.actor
    import fray.client
    import fray.types

    assert client_api.JobRequest is fray.types.JobRequest
    assert client_api.ResourceConfig is fray.types.ResourceConfig
    assert client_api.JobStatus is fray.types.JobStatus
    assert client_api.JobFailed is fray.client.JobFailed
    assert client_api.ActorUnavailableError is fray.actor.ActorUnavailableError
    assert client_api.current_actor is fray.actor.current_actor


def test_marins_request_shape_translates_to_slices():
    """Marin's with_tpu(slice_count=2) (replicas = 2 x 4 VMs) and a Duration timeout become two
    v5litepod-16 slices and a timeout in seconds."""
    from fray.types import Entrypoint, JobRequest, ResourceConfig
    from rigging.timing import Duration

    from fray_tpu.client_requests import translate

    request = JobRequest(name="marin-shape", entrypoint=Entrypoint.from_callable(print),
                         resources=ResourceConfig.with_tpu("v5litepod-16", slice_count=2, regions=["us-central2"]),
                         timeout=Duration.from_seconds(7))
    assert request.replicas == 8
    translated = translate(request, {})
    assert translated.request.resources.replicas == 2
    assert translated.tasks == 8 and translated.timeout == 7.0
    assert translated.request.resources.regions == ["us-central2"]


def test_an_explicit_client_wins_over_fray_backend(monkeypatch):
    """set_current_client(...) beats FRAY_BACKEND=tpu; without FRAY_BACKEND Marin's own fallback stays."""
    import fray.current_client as marin
    from fray.local_backend import LocalClient

    from fray_tpu import backend_hook

    backend_hook.install_client_hook()
    sentinel = object()
    monkeypatch.setenv("FRAY_BACKEND", "tpu")
    with marin.set_current_client(sentinel):
        assert marin.current_client() is sentinel
    monkeypatch.delenv("FRAY_BACKEND")
    assert isinstance(marin.current_client(), LocalClient)


DRIVER = textwrap.dedent('''
    import json, threading
    from fray.current_client import current_client
    from fray.types import Entrypoint, JobRequest

    def child_work():
        print("child ran", flush=True)

    def parent():
        from fray.current_client import current_client
        client = current_client()
        seen = []
        t = threading.Thread(target=lambda: seen.append(type(current_client()).__name__))
        t.start(); t.join(60)
        child = client.submit(JobRequest(name="nested-child", entrypoint=Entrypoint.from_callable(child_work)))
        print(f"in job: {type(client).__name__} thread={seen} child={child.wait(timeout=120)}", flush=True)

    client = current_client()
    from_thread = []
    t = threading.Thread(target=lambda: from_thread.append(current_client() is client))
    t.start(); t.join(60)
    handle = client.submit(JobRequest(name="nested-parent", entrypoint=Entrypoint.from_callable(parent)))
    status = handle.wait(timeout=120)
    print(json.dumps({"class": type(client).__module__ + "." + type(client).__qualname__,
                      "thread_same": from_thread, "status": str(status), "logs": list(handle.logs())}))
    client.shutdown()
''')


def test_fray_backend_tpu_selects_tpu_client_in_a_fresh_interpreter(tmp_path):
    """FRAY_BACKEND=tpu with the emulated spec: Marin's current_client() is a TpuClient in the main
    thread and in a user thread, and inside the job current_client().submit() makes a child that
    succeeds (the user code never imports fray_tpu)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FRAY_CLUSTER_SPEC",)}
    env.update({"FRAY_BACKEND": "tpu", "FRAY_CLUSTER_SPEC": "tpu?emulate=true"})
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=INTERPRETER_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["class"] == "fray_tpu.client.TpuClient"
    assert report["thread_same"] == [True]
    assert report["status"] == "succeeded"
    assert any("in job: TpuClient thread=['TpuClient'] child=succeeded" in line for line in report["logs"]), report


def test_marin_wait_all_accepts_tpu_handles():
    """Marin's own wait_all drives fray-tpu handles (status() is cheap and non-blocking)."""
    from fray.client import wait_all
    from fray.types import Entrypoint, JobRequest, JobStatus

    from fray_tpu.client import TpuClient
    from fray_tpu.config import TpuClusterConfig

    client = TpuClient(TpuClusterConfig(emulate=True))
    try:
        handles = [client.submit(JobRequest(name=f"marin-wait-{i}", entrypoint=Entrypoint.from_callable(print)))
                   for i in range(2)]
        assert wait_all(handles, timeout=INTERPRETER_TIMEOUT) == [JobStatus.SUCCEEDED] * 2
    finally:
        client.shutdown(wait=False)
