"""The host bundle and the emulated Cloud Storage it travels through: what the bundle holds,
that it is built once, staged once (in the background), that VMs wait for an object still being
staged and verify what they fetch, and that storage refuses what Google's would."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fray_tpu import gcsfetch, hostboot
from fray_tpu.config import TpuClusterConfig
from fray_tpu.contract import STORAGE_ENDPOINT_ENV, UV_ENV, UV_SHA256_ENV, UV_URL_ENV, VERSION
from fray_tpu.emulator.metadata import HostMetadata, MetadataServer
from fray_tpu.emulator.storage import EMULATED_BUCKET
from fray_tpu.errors import ConfigError, FrayTpuError
from fray_tpu.hostboot import BootstrapFailed, HostBootstrapper, staging_failure, watch_boot
from fray_tpu.hostbundle import BundleStorage, HostTarget, build_host_bundle, check_host_python, runtime_python
from fray_tpu.uv_command import UvMissing
from fray_tpu.worker.uvfetch import UvFetch


@pytest.fixture(scope="module")
def bundle():
    return build_host_bundle(HostTarget("3.10"))


def test_the_bundle_carries_the_agent_and_its_dependencies_compiled_for_the_vm_and_uv_apart(bundle):
    """One uncompressed archive: this fray_tpu, grpcio built for CPython 3.10 (nothing a VM never
    imports, symbol tables stripped), their bytecode
    compiled for 3.10 (unchecked-hash: valid whatever the unpacked files' times), a manifest; uv
    is a file of its own, named by its hash, not in the archive."""
    with tarfile.open(bundle.path, mode="r:") as archive:
        names = set(archive.getnames())
        manifest = json.load(archive.extractfile("manifest.json"))
        pyc = archive.extractfile("site/fray_tpu/worker/__pycache__/main.cpython-310.pyc").read(16)
        rust = archive.extractfile("site/cryptography/hazmat/bindings/_rust.abi3.so").read()
    assert {"site/fray_tpu/contract.py", "site/fray_tpu/worker/main.py"} <= names
    assert any(n.startswith("site/grpc/_cython/cygrpc.cpython-310-") for n in names), sorted(names)[:20]
    assert "site/grpc/__pycache__/__init__.cpython-310.pyc" in names
    assert not any(n.endswith("/uv") or n.startswith(("site/uv/", "bin/")) for n in names), sorted(names)[:20]
    never_imported = [n for n in names if n.startswith(("site/fray_tpu/emulator/", "site/fray_tpu/ops/", "site/cffi/",
                                                         "site/google/cloud/tpu_v1/", "site/bin/"))
                      or n.endswith((".pyi", ".proto"))]
    assert not never_imported, never_imported[:10]
    assert "site/google/cloud/tpu_v2/__init__.py" in names  # the agent's self-delete calls it
    if shutil.which("strip"):
        assert b".symtab" not in rust, "cryptography's compiled module still carries its symbol table"
    flags = int.from_bytes(pyc[4:8], "little")
    assert flags == 0b01, flags  # hash-based, not checked against the source
    assert (manifest["fray_tpu_version"], manifest["python"], manifest["bytecode"]) == (VERSION, "3.10", True)
    assert bundle.uv.path.read_bytes()[:4] == b"\x7fELF"
    assert hashlib.sha256(bundle.uv.path.read_bytes()).hexdigest() == bundle.uv.sha256
    assert bundle.uv.sha256 in bundle.uv.object_name and bundle.sha256 in bundle.object_name
    assert build_host_bundle(HostTarget("3.10")) == bundle  # cached: the same archive, the same hash


def test_staging_uploads_once_and_names_the_object_by_its_hash(bundle, storage):
    """A second stage of the same bundle finds the object and uploads nothing."""
    staging = BundleStorage(EMULATED_BUCKET, endpoint=storage.endpoint, token=lambda: "token")
    url = staging.stage(bundle)
    assert url == f"gs://{EMULATED_BUCKET}/{bundle.object_name}" and bundle.sha256 in url
    assert staging.stage(bundle) == url
    assert storage.counters["uploads"] == 1


def test_a_missing_bucket_and_an_anonymous_caller_are_refused(bundle, storage):
    """No such bucket: a configuration error naming it; no bearer token: HTTP 401, at once."""
    with pytest.raises(ConfigError, match="gs://no-such-bucket does not exist"):
        BundleStorage("no-such-bucket", endpoint=storage.endpoint, token=lambda: "token").stage(bundle)
    request = urllib.request.Request(f"{storage.endpoint}/storage/v1/b/{EMULATED_BUCKET}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(FrayTpuError, match="HTTP 401"):
        BundleStorage(EMULATED_BUCKET, endpoint=storage.endpoint, token=lambda: "").stage(bundle)


def test_runtime_versions_map_to_their_images_python_and_38_is_refused_with_the_fix():
    """tpu-vm-* images ship 3.8, which the agent cannot run on: the error names the runtime to use."""
    assert runtime_python("v2-alpha-tpuv5-lite") == "3.10" and runtime_python("tpu-vm-base") == "3.8"
    check_host_python("v2-alpha-tpuv6e", "3.10")
    with pytest.raises(ConfigError, match="runtime_version=tpu-ubuntu2204-base"):
        check_host_python("tpu-vm-base", "3.8")


@pytest.fixture
def metadata(monkeypatch):
    server = MetadataServer("127.0.0.1", HostMetadata({}, {}, {}))
    monkeypatch.setenv("GCE_METADATA_HOST", server.address)
    yield server
    server.close()


def put_object(storage, tmp_path, name: str, data: bytes) -> None:
    staged = tmp_path / f"staged-{name}"
    staged.write_bytes(data)
    storage.put_file(EMULATED_BUCKET, name, staged)


def test_a_vm_waits_for_an_object_still_being_staged_and_then_gives_up(storage, metadata, tmp_path):
    """An object that appears while the VM asks (the controller uploads while the slice is
    created) is fetched; one that never appears fails after the wait, saying so."""
    url = f"gs://{EMULATED_BUCKET}/late"
    threading.Timer(0.3, put_object, args=(storage, tmp_path, "late", b"staged late")).start()
    got = gcsfetch.fetch(storage.endpoint, url, str(tmp_path / "late"), attempts=2, missing_wait=30)
    assert got == hashlib.sha256(b"staged late").hexdigest() and (tmp_path / "late").read_bytes() == b"staged late"
    began = time.monotonic()
    with pytest.raises(gcsfetch.FetchError, match=r"HTTP 404 .*\(still missing after 1s\)"):
        gcsfetch.fetch(storage.endpoint, f"gs://{EMULATED_BUCKET}/never", str(tmp_path / "never"), attempts=2,
                       missing_wait=1)
    assert time.monotonic() - began < 10


def test_uv_is_fetched_verified_and_a_tampered_one_refused(storage, metadata, tmp_path):
    """The agent's fetch of uv puts the binary in place only when its hash is the pinned one."""
    put_object(storage, tmp_path, "uv", b"\x7fELF uv")
    env = {UV_URL_ENV: f"gs://{EMULATED_BUCKET}/uv", STORAGE_ENDPOINT_ENV: storage.endpoint}
    good = UvFetch({**env, UV_SHA256_ENV: hashlib.sha256(b"\x7fELF uv").hexdigest(), UV_ENV: str(tmp_path / "a/uv")})
    assert good.environ()[UV_ENV] == str(tmp_path / "a/uv") and (tmp_path / "a/uv").read_bytes() == b"\x7fELF uv"
    bad = UvFetch({**env, UV_SHA256_ENV: "0" * 64, UV_ENV: str(tmp_path / "b/uv")})
    with pytest.raises(UvMissing, match="SHA-256 mismatch"):
        bad.environ()
    assert not any((tmp_path / "b").iterdir())


def test_a_failed_background_upload_fails_the_booting_jobs_with_its_reason(bundle, storage, monkeypatch):
    """Staging runs while the slice is created; when it fails, the boot watch raises at once
    (the VMs would wait for the object in vain), and the next launch stages again."""
    config = TpuClusterConfig(emulate=True, emulator_endpoint="unused:1")
    bootstrapper = HostBootstrapper(config, "unused:1")
    staging = BundleStorage(EMULATED_BUCKET, endpoint=storage.endpoint, token=lambda: "token")
    monkeypatch.setattr(bootstrapper, "_storage", lambda: staging)

    def refuse(staged):
        raise FrayTpuError("HTTP 403 Forbidden")

    monkeypatch.setattr(staging, "upload", refuse)
    bootstrapper.startup_script("v2-alpha-tpuv5-lite")
    with pytest.raises(FrayTpuError, match="403"):
        bootstrapper.wait_staged(60)
    with pytest.raises(BootstrapFailed, match="staging the host bundle for Python 3.10 .* failed: HTTP 403"):
        watch_boot(lambda slice_id: [{}] * 4, {0: 4}, deadline=time.monotonic() + 60, poll_interval=0.05,
                   stop=threading.Event(), progress=lambda line: None)
    monkeypatch.setattr(staging, "upload", BundleStorage.upload.__get__(staging))
    bootstrapper.startup_script("v2-alpha-tpuv5-lite")
    bootstrapper.wait_staged(60)
    assert staging_failure() is None and not staging.missing(bundle) and not staging.missing(bundle.uv)


def _tar_with(tmp_path, members: dict[str, bytes]) -> bytes:
    path = tmp_path / "bundle.tar"
    with tarfile.open(path, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def _install(storage, tmp_path, sha256: str, python: str | None = None) -> subprocess.CompletedProcess:
    """The startup-script's install step, as the script runs it: gcsfetch's source with ``-c``."""
    return subprocess.run(
        [sys.executable, "-c", Path(gcsfetch.__file__).read_text(), "install", storage.endpoint,
         f"gs://{EMULATED_BUCKET}/bundle.tar", sha256, str(tmp_path / "state" / "bundle.tar"),
         str(tmp_path / "run" / "bundle"), python or "%d.%d" % sys.version_info[:2], "manylinux_2_35_x86_64", "2",
         "fray-tpu/boot-phases", "started=1"],
        capture_output=True, text=True, timeout=60)


def test_the_installer_fetches_verifies_unpacks_and_reuses_what_it_installed(storage, metadata, tmp_path):
    """One interpreter runs the interpreter, bundle and deps phases: it publishes each, keeps the
    verified archive on disk, unpacks it; run again it reuses the installed bundle, and after a
    reboot (the run directory emptied) unpacks the kept archive, without a second download."""
    data = _tar_with(tmp_path, {"site/hello.py": b"print('hi')\n"})
    put_object(storage, tmp_path, "bundle.tar", data)
    (tmp_path / "state").mkdir()
    sha256 = hashlib.sha256(data).hexdigest()
    before = storage.counters["downloads"]

    first = _install(storage, tmp_path, sha256)
    assert first.returncode == 0, first.stderr
    assert [part.split("=")[0] for part in first.stdout.split()] == ["started", "interpreter", "bundle", "deps"]
    assert metadata.metadata.guest_attributes()["fray-tpu"]["boot-phases"] == first.stdout.strip()
    assert "phase bundle: fetched" in first.stderr
    assert (tmp_path / "run/bundle/site/hello.py").read_bytes() == b"print('hi')\n"
    assert (tmp_path / "state/bundle.tar").read_bytes() == data

    again = _install(storage, tmp_path, sha256)
    assert again.returncode == 0 and "phase bundle: installed already" in again.stderr, again.stderr
    shutil.rmtree(tmp_path / "run")
    (tmp_path / "run").mkdir()
    rebooted = _install(storage, tmp_path, sha256)
    assert rebooted.returncode == 0 and "phase bundle: kept from an earlier boot" in rebooted.stderr, rebooted.stderr
    assert (tmp_path / "run/bundle/site/hello.py").exists()
    assert storage.counters["downloads"] - before == 1


def test_the_installer_refuses_a_changed_bundle_and_another_python_naming_the_phase(storage, metadata, tmp_path):
    """A hash that is not the pinned one: the bundle phase fails and nothing is kept or unpacked.
    A bundle for another Python: the deps phase fails naming the setting that fixes it."""
    data = _tar_with(tmp_path, {"site/hello.py": b"print('hi')\n"})
    put_object(storage, tmp_path, "bundle.tar", data)
    (tmp_path / "state").mkdir()

    tampered = _install(storage, tmp_path, "0" * 64)
    assert tampered.returncode == gcsfetch.EXIT_REPORTED, tampered.stderr
    phase, reason = tampered.stdout.strip().split("\t", 1)
    assert phase == "bundle" and reason.startswith("SHA-256 mismatch") and "refusing to run it" in reason
    assert not any((tmp_path / "state").iterdir()) and not (tmp_path / "run").exists()

    other = _install(storage, tmp_path, hashlib.sha256(data).hexdigest(), python="3.9")
    assert other.returncode == gcsfetch.EXIT_REPORTED, other.stderr
    phase, reason = other.stdout.strip().split("\t", 1)
    assert phase == "deps" and "are for Python 3.9" in reason and "set host_python=" in reason
    assert not (tmp_path / "run" / "bundle").exists()


def test_a_staged_object_deleted_later_is_staged_again_when_a_slice_is_created(bundle, storage, monkeypatch):
    """A controller runs for weeks; its staged bundle and uv may be deleted meanwhile (a lifecycle
    rule): a later slice's creation finds that out in the background and uploads them again,
    while that slice's VMs wait for them."""
    monkeypatch.setattr(hostboot, "STAGED_RECHECK_SECONDS", 0.0)
    bootstrapper = HostBootstrapper(TpuClusterConfig(emulate=True, emulator_endpoint="unused:1"), "unused:1")
    staging = BundleStorage(EMULATED_BUCKET, endpoint=storage.endpoint, token=lambda: "token")
    monkeypatch.setattr(bootstrapper, "_storage", lambda: staging)
    script = bootstrapper.startup_script("v2-alpha-tpuv5-lite")
    bootstrapper.wait_staged(60)
    uploads = storage.counters["uploads"]
    assert storage.delete_object(EMULATED_BUCKET, bundle.object_name)
    assert bootstrapper.startup_script("v2-alpha-tpuv5-lite") == script
    bootstrapper.wait_staged(60)
    assert not staging.missing(bundle) and not staging.missing(bundle.uv)
    assert storage.counters["uploads"] == uploads + 1  # the bundle only: uv was still there
