"""The host bundle: everything a TPU VM needs to run the agent, with no package index.

One deterministic ``.tar.gz`` per (fray-tpu source, VM Python, VM platform): a ``site/`` tree
with the controller's own ``fray_tpu`` package (exactly the controller's version, published
nowhere) and its dependencies installed for the VM's Python and platform (wheels fetched by the
controller, which can reach an index, with ``pip download --only-binary=:all:``, then installed
with ``uv pip install --target --python-version --python-platform``), and ``bin/uv`` (a static
binary, for the agent's job environments). The VM only verifies and unpacks it. The bundle is
built once and cached under ``$XDG_CACHE_HOME/fray-tpu/host-bundles/``; its SHA-256 names it.

It travels through Cloud Storage: the controller uploads it once per version (skipped when the
content-addressed object exists) and pins its hash in node metadata; every VM downloads it over
Private Google Access (no external IP, no route to the controller) and verifies the hash before
unpacking. 256 VMs mean 256 downloads served by Cloud Storage, one upload by the controller.

The agent runs on the image's own ``python3``: 3.10 on every current TPU runtime image. The older
``tpu-vm-*`` images (3.8) are refused before anything is provisioned: grpcio and protobuf at the
versions fray-tpu needs publish no 3.8 wheels.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.contract import VERSION
from fray_tpu.errors import ConfigError, FrayTpuError

DEFAULT_PLATFORM = "manylinux_2_35_x86_64"  # Ubuntu 22.04's glibc 2.35 on the x86 TPU hosts
DEFAULT_PYTHON = "3.10"
UV_REQUIREMENT = "uv>=0.5,<1"
OBJECT_PREFIX = "fray-tpu/host-bundles"
PIP_DOWNLOAD_TIMEOUT_SECONDS = 600.0
STORAGE_TIMEOUT_SECONDS = 120.0
STORAGE_ATTEMPTS = 4
MIN_HOST_PYTHON = (3, 10)
# A directory of wheels to build bundles from instead of the package index (`prefetch` fills it;
# the test suite, which may reach nothing but loopback, builds from it).
WHEELHOUSE_ENV = "FRAY_TPU_HOST_WHEELHOUSE"
# Runtime versions whose image ships Python 3.8 (Ubuntu 20.04); every other current one is 3.10.
_PY38_RUNTIME = re.compile(r"^tpu-vm-")
_PACKAGE_SKIP = re.compile(r"(__pycache__|\.pyc$|\.pyo$)")
# The fray_tpu package the bundle carries: the controller's own source.
PACKAGE_DIR = Path(__file__).resolve().parent


def runtime_python(runtime_version: str) -> str:
    """The ``python3`` version of a runtime version's image."""
    return "3.8" if _PY38_RUNTIME.match(runtime_version) else DEFAULT_PYTHON


def check_host_python(runtime_version: str, python: str) -> None:
    """Refuse an image whose Python the agent cannot run on, naming the runtime to use instead."""
    version = tuple(int(part) for part in python.split(".")[:2])
    if version < MIN_HOST_PYTHON:
        raise ConfigError(
            f"runtime_version={runtime_version!r} boots an image with Python {python}; the fray-tpu agent needs "
            f"Python {'.'.join(map(str, MIN_HOST_PYTHON))}+ on the VM (grpcio>=1.85 has no {python} wheels): use "
            f"runtime_version=tpu-ubuntu2204-base (or v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e), "
            f"whose images ship Python 3.10"
        )


@dataclass(frozen=True)
class HostTarget:
    python: str = DEFAULT_PYTHON
    platform: str = DEFAULT_PLATFORM

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


@dataclass(frozen=True)
class HostBundle:
    path: Path
    sha256: str
    target: HostTarget

    @property
    def object_name(self) -> str:
        return f"{OBJECT_PREFIX}/{self.sha256}.tar.gz"


def agent_requirements() -> list[str]:
    """fray-tpu's own runtime dependencies (no extras) and uv."""
    requires = importlib.metadata.requires("fray-tpu") or []
    return sorted(r.split(";")[0].strip() for r in requires if "extra ==" not in r) + [UV_REQUIREMENT]


def _package_files() -> list[Path]:
    root = PACKAGE_DIR
    return sorted(p for p in root.rglob("*") if p.is_file() and not _PACKAGE_SKIP.search(str(p)))


def _build_key(target: HostTarget, requirements: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([target.python, target.platform, requirements]).encode())
    root = PACKAGE_DIR
    for path in _package_files():
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fray-tpu" / "host-bundles"


def _download_wheels(target: HostTarget, requirements: list[str], dest: Path,
                     wheelhouse: str | None = None) -> None:
    platforms = [target.platform]
    if target.platform.startswith("manylinux_2_") and target.platform.endswith("_x86_64"):
        glibc = int(target.platform.split("_")[2])
        platforms += [f"manylinux_2_{minor}_x86_64" for minor in range(glibc - 1, 16, -1)]
        platforms += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", target.python, "--implementation", "cp",
               "--abi", target.abi, "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
    for platform in platforms:
        command += ["--platform", platform]
    wheelhouse = wheelhouse if wheelhouse is not None else os.environ.get(WHEELHOUSE_ENV)
    if wheelhouse:
        command += ["--no-index", "--find-links", wheelhouse]
    try:
        result = subprocess.run(command + requirements, capture_output=True, text=True,
                                timeout=PIP_DOWNLOAD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise FrayTpuError(f"downloading the host bundle's wheels took over {PIP_DOWNLOAD_TIMEOUT_SECONDS:.0f}s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        source = f"the wheelhouse {wheelhouse} ({WHEELHOUSE_ENV})" if wheelhouse else "the package index"
        raise ConfigError(f"cannot build the host bundle for Python {target.python} on {target.platform} from "
                          f"{source}: pip download failed: {tail}")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _uv_binary(wheels: Path, dest: Path) -> Path:
    """uv's static binary, from its wheel."""
    (wheel,) = wheels.glob("uv-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [m for m in archive.namelist() if m.endswith(".data/scripts/uv")]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(archive.read(member))
    dest.chmod(0o755)
    return dest


def _install_site(target: HostTarget, requirements: list[str], wheels: Path, uv: Path, site: Path) -> None:
    """Install the wheels into ``site`` for the VM's Python and platform (uv installs for another
    interpreter version and platform than the one it runs with): the VM only unpacks it."""
    tag = target.platform  # manylinux_2_35_x86_64 -> x86_64-manylinux_2_35
    machine = "x86_64" if tag.endswith("x86_64") else tag.rsplit("_", 1)[-1]
    uv_platform = f"{machine}-{tag[: -len(machine) - 1]}"
    command = [str(uv), "pip", "install", "--quiet", "--offline", "--no-index", "--find-links", str(wheels),
               "--target", str(site), "--python-version", target.python, "--python-platform", uv_platform,
               "--python", sys.executable, "-r", "-"]
    result = subprocess.run(command, input="\n".join(requirements), capture_output=True, text=True,
                            timeout=PIP_DOWNLOAD_TIMEOUT_SECONDS, env={**os.environ, "UV_NO_CACHE": "1"})
    if result.returncode != 0:
        raise ConfigError(f"cannot install the host bundle's wheels for Python {target.python} on {target.platform}: "
                          f"{result.stderr.strip()[-600:]}")
    shutil.copytree(PACKAGE_DIR, site / "fray_tpu",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))


def _write_bundle(path: Path, target: HostTarget, requirements: list[str], root: Path) -> None:
    manifest = {"fray_tpu_version": VERSION, "python": target.python, "platform": target.platform,
                "requirements": requirements}
    # Sorted members without times or owners; the hash names whatever this build produced (uv's
    # install records vary between builds, so two builds of one source may differ).
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tar:
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
            for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
                mode = 0o755 if os.access(file, os.X_OK) else 0o644
                _add_bytes(tar, str(file.relative_to(root)), file.read_bytes(), mode)


def build_host_bundle(target: HostTarget | None = None, cache_dir: Path | None = None) -> HostBundle:
    """The cached bundle for ``target``, built on first use (safe across threads and processes)."""
    target = target or HostTarget()
    requirements = agent_requirements()
    cache = (cache_dir or default_cache_dir()) / _build_key(target, requirements)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bundle, digest_file = cache / "bundle.tar.gz", cache / "bundle.sha256"
        if not (bundle.exists() and digest_file.exists()):
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                wheels, contents = Path(scratch) / "wheels", Path(scratch) / "contents"
                _download_wheels(target, requirements, wheels)
                uv = _uv_binary(wheels, contents / "bin" / "uv")
                _install_site(target, requirements, wheels, uv, contents / "site")
                partial = Path(scratch) / "bundle.tar.gz"
                _write_bundle(partial, target, requirements, contents)
                digest = hashlib.sha256(partial.read_bytes()).hexdigest()
                shutil.move(partial, bundle)
                digest_file.write_text(digest)
        return HostBundle(bundle, digest_file.read_text().strip(), target)


class BundleStorage:
    """The Cloud Storage JSON API for staging bundles (``endpoint`` the API root)."""

    def __init__(self, bucket: str, *, endpoint: str = "https://storage.googleapis.com", token: callable):
        self.bucket = bucket
        self.endpoint = endpoint.rstrip("/")
        self._token = token

    def _request(self, method: str, url: str, data: bytes | None = None) -> dict | None:
        last: Exception | None = None
        for _ in range(STORAGE_ATTEMPTS):
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Authorization": f"Bearer {self._token()}",
                                                      "Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(request, timeout=STORAGE_TIMEOUT_SECONDS) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code < 500 and error.code != 429:
                    raise FrayTpuError(f"Cloud Storage refused {method} {url}: HTTP {error.code} "
                                       f"{error.read()[:300].decode(errors='replace')}") from None
                last = error
            except OSError as error:
                last = error
        raise FrayTpuError(f"Cloud Storage {method} {url} failed {STORAGE_ATTEMPTS} times: {last}")

    def object_url(self, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}"

    def stage(self, bundle: HostBundle) -> str:
        """Upload ``bundle`` unless its content-addressed object exists; returns its gs:// URL."""
        existing = self._request("GET", self.object_url(bundle.object_name))
        if existing is None or int(existing.get("size", -1)) != bundle.path.stat().st_size:
            if self._request("GET", f"{self.endpoint}/storage/v1/b/{self.bucket}") is None:
                raise ConfigError(f"the staging bucket gs://{self.bucket} does not exist: create it, or set "
                                  f"staging_bucket to one the controller can write and the VMs' service account read")
            query = urllib.parse.urlencode({"uploadType": "media", "name": bundle.object_name})
            self._request("POST", f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?{query}",
                          bundle.path.read_bytes())
        return f"gs://{self.bucket}/{bundle.object_name}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fray_tpu.hostbundle prefetch DIR [--python 3.10]``: fill a wheelhouse."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fray_tpu.hostbundle")
    parser.add_argument("command", choices=["prefetch"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--python", action="append", help=f"VM Python versions (default {DEFAULT_PYTHON})")
    args = parser.parse_args(argv)
    for python in args.python or [DEFAULT_PYTHON]:
        _download_wheels(HostTarget(python), agent_requirements(), args.directory, wheelhouse="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
