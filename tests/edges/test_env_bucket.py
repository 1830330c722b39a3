"""Job environments shared through the staging bucket, host against host: real uv, real wheels
on a loopback index, the emulated Cloud Storage at the wire. Each store is one host (its own
directory, its own uv cache); what one builds and uploads, another downloads and runs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from package_fixtures import job_python_version

from fray_tpu.emulator.storage import EMULATED_BUCKET, StorageServer
from fray_tpu.errors import EnvironmentBuildError
from fray_tpu.package_index import LoopbackIndex
from fray_tpu.worker.envarchive import SHA256_METADATA, EnvBucket
from fray_tpu.worker.pyenv import EnvRequest, PythonEnv, PythonEnvStore, UvSettings, archive_poll_pauses

JOB_PYTHON = job_python_version()
TOKEN = "host-token"


def _host(tmp_path: Path, name: str) -> PythonEnvStore:
    return PythonEnvStore(tmp_path / name, UvSettings.from_environ(), storage_token=lambda: TOKEN)


def _bucket(storage: StorageServer, *, builder: bool = True, wait: float = 0.0) -> EnvBucket:
    return EnvBucket(storage.endpoint, EMULATED_BUCKET, builder=builder, wait_seconds=wait, attempt_id="a-1")


def _request(package_index: LoopbackIndex, *packages: str) -> EnvRequest:
    return EnvRequest(pip_packages=packages, python_version=JOB_PYTHON, index_url=package_index.url)


def _run(env: PythonEnv, code: str) -> str:
    result = subprocess.run([env.python, "-c", code], env={**os.environ, **env.env_vars},
                            cwd=env.env_vars["VIRTUAL_ENV"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _resource(storage: StorageServer, name: str) -> dict:
    url = f"{storage.endpoint}/storage/v1/b/{EMULATED_BUCKET}/o/{urllib.parse.quote(name, safe='')}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        return json.loads(r.read())


def test_an_environment_one_host_built_is_downloaded_and_made_its_own_by_another(
        tmp_path, storage, package_index) -> None:
    """Host A builds and uploads; host B asks the index nothing, downloads the archive (its
    SHA-256 the one A recorded), and runs it with its own runtime directory and interpreter."""
    request = _request(package_index, "six")
    built = _host(tmp_path, "a").ensure(request, lambda line: None, _bucket(storage))
    assert built.source == "built" and "uploaded gs://" in built.note
    name = _bucket(storage).object_name(built.digest)
    assert name.startswith(f"fray-tpu/envs/{built.digest}-") and name.endswith(".tar")
    assert len(_resource(storage, name)["metadata"][SHA256_METADATA]) == 64

    index_requests = package_index.requests
    lines: list[str] = []
    fetched = _host(tmp_path, "b").ensure(request, lines.append, _bucket(storage))
    assert fetched.source == "bucket" and fetched.digest == built.digest, lines
    assert "downloaded gs://" in fetched.note
    assert package_index.requests == index_requests
    seen = json.loads(_run(fetched, "import json, sys, six, fray_tpu.worker.runner; print(json.dumps("
                                    "{'six': six.__file__, 'prefix': sys.prefix, 'runtime': fray_tpu.__file__}))"))
    assert seen["six"].startswith(str(tmp_path / "b")) and seen["prefix"].startswith(str(tmp_path / "b"))
    assert str(tmp_path / "b" / "runtime") in seen["runtime"]  # B's own .pth, not A's
    config = (Path(fetched.env_vars["VIRTUAL_ENV"]) / "pyvenv.cfg").read_text()
    home = next(line.split("=", 1)[1].strip() for line in config.splitlines() if line.startswith("home"))
    assert Path(home).is_dir()
    again = _host(tmp_path, "b").ensure(request, lambda line: None, _bucket(storage))
    assert again.source == "local"


def _overwrite(storage: StorageServer, name: str, data: bytes, metadata: dict[str, str]) -> None:
    """An upload over the object without any precondition (what a careless or hostile writer
    does), keeping the hash the first uploader recorded."""
    query = urllib.parse.urlencode({"uploadType": "resumable", "name": name})
    start = urllib.request.Request(f"{storage.endpoint}/upload/storage/v1/b/{EMULATED_BUCKET}/o?{query}",
                                   method="POST", data=json.dumps({"metadata": metadata}).encode(),
                                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(start) as response:
        session = response.headers["Location"]
    with urllib.request.urlopen(urllib.request.Request(session, method="PUT", data=data)) as response:
        response.read()


def test_a_tampered_archive_is_refused_and_the_host_builds_and_replaces_it(tmp_path, storage, package_index) -> None:
    """The bytes no longer match the SHA-256 the uploader recorded: the host refuses them, builds
    with uv instead (the job does not fail for a bad cache entry) and replaces that generation,
    so the next host downloads a good archive."""
    request = _request(package_index, "tomli")
    built = _host(tmp_path, "a").ensure(request, lambda line: None, _bucket(storage))
    name = _bucket(storage).object_name(built.digest)
    recorded = _resource(storage, name)["metadata"]
    _overwrite(storage, name, b"not the environment that was uploaded", recorded)
    tampered = _resource(storage, name)["generation"]

    lines: list[str] = []
    rebuilt = _host(tmp_path, "b").ensure(request, lines.append, _bucket(storage))
    assert rebuilt.source == "built"
    assert f"refused gs://{EMULATED_BUCKET}/{name} (generation {tampered})" in rebuilt.note
    assert "its uploader recorded" in rebuilt.note and "uploaded gs://" in rebuilt.note
    assert _resource(storage, name)["generation"] != tampered
    fetched = _host(tmp_path, "c").ensure(request, lambda line: None, _bucket(storage))
    assert fetched.source == "bucket"
    assert _run(fetched, "import tomli; print(tomli.__name__)") == "tomli"


def test_hosts_racing_to_upload_keep_one_whole_archive(tmp_path, storage, package_index) -> None:
    """Two hosts build the same environment at once and both upload create-only: one creates
    the object, the other gets 412 and keeps its own build; the object is whole (a third host
    downloads and verifies it)."""
    request = _request(package_index, "iniconfig==1.1.1")
    results: dict[str, PythonEnv] = {}
    barrier = threading.Barrier(2)

    def host(name: str) -> None:
        store = _host(tmp_path, name)
        barrier.wait(timeout=30)
        results[name] = store.ensure(request, lambda line: None, _bucket(storage))

    threads = [threading.Thread(target=host, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {env.source for env in results.values()} <= {"built", "bucket"} and len(results) == 2
    uploaded = [env for env in results.values() if "uploaded gs://" in env.note]
    assert len(uploaded) == 1, [env.note for env in results.values()]
    other = next(env for env in results.values() if env is not uploaded[0])
    assert other.source == "bucket" or "another host put" in other.note
    assert storage.counters["uploads"] == 1
    fetched = _host(tmp_path, "c").ensure(request, lambda line: None, _bucket(storage))
    assert fetched.source == "bucket"
    assert _run(fetched, "import iniconfig, importlib.metadata as m; print(m.version('iniconfig'))") == "1.1.1"


def test_a_host_that_is_not_the_builder_waits_for_the_builders_archive(tmp_path, storage, package_index) -> None:
    """The gang's other hosts wait for the builder's upload instead of building themselves."""
    request = _request(package_index, "six", "tomli")
    waiting: dict[str, PythonEnv] = {}
    waiter = threading.Thread(target=lambda: waiting.update(
        env=_host(tmp_path, "w").ensure(request, lambda line: None, _bucket(storage, builder=False, wait=120))))
    waiter.start()
    built = _host(tmp_path, "a").ensure(request, lambda line: None, _bucket(storage))
    waiter.join(timeout=150)
    assert built.source == "built" and waiting["env"].source == "bucket"


def test_the_builders_failure_fails_the_waiting_hosts_at_once(tmp_path, storage, package_index) -> None:
    """A build that cannot succeed (nothing satisfies six==99.0) is reported to the waiting
    hosts, which fail with the resolver's message long before their wait is over."""
    request = _request(package_index, "six==99.0")
    with pytest.raises(EnvironmentBuildError, match="six==99.0"):
        _host(tmp_path, "a").ensure(request, lambda line: None, _bucket(storage))
    started = time.monotonic()
    with pytest.raises(EnvironmentBuildError, match=r"the host building it for the gang failed: (.|\n)*six==99.0"):
        _host(tmp_path, "w").ensure(request, lambda line: None, _bucket(storage, builder=False, wait=60))
    assert time.monotonic() - started < 30


def test_an_environment_without_packages_is_made_on_every_host_not_shared(tmp_path, storage, package_index) -> None:
    """No packages: each host makes the venv itself (quicker than an archive of it), the builder
    uploads nothing and a host that is not the builder does not wait for one."""
    request = EnvRequest(python_version=JOB_PYTHON, index_url=package_index.url)
    built = _host(tmp_path, "a").ensure(request, lambda line: None, _bucket(storage))
    started = time.monotonic()
    other = _host(tmp_path, "b").ensure(request, lambda line: None, _bucket(storage, builder=False, wait=120))
    assert time.monotonic() - started < 60
    assert built.source == other.source == "built" and built.digest == other.digest
    assert storage.counters["uploads"] == storage.counters["downloads"] == 0
    assert _run(other, "import sys, cloudpickle, fray_tpu.worker.runner; print(sys.version_info[:2])") == \
        str(tuple(int(part) for part in JOB_PYTHON.split(".")))


def test_a_waiting_host_looks_for_the_archive_soon_then_about_once_a_second() -> None:
    """The first looks come within a fraction of a second (a small environment is built in
    less); later ones settle at once a second, so a long build's waiting hosts ask the bucket (archive and
    failure report) twice a second each."""
    pauses = list(itertools.islice(archive_poll_pauses(), 40))
    assert pauses[0] <= 0.05 and sum(pauses[:4]) < 0.5
    assert pauses == sorted(pauses) and max(pauses) == pauses[-1] == 1.0
