"""The host bundle: everything a TPU VM needs to run the agent, with no package index.

One ``.tar`` per (fray-tpu source, VM Python, VM platform): a ``site/`` tree with the
controller's own ``fray_tpu`` package (exactly the controller's version, published nowhere) and
its dependencies installed for the VM's Python and platform (wheels fetched by the controller,
which can reach an index, with ``pip download --only-binary=:all:``, then installed with ``uv pip
install --target --python-version --python-platform``), with their bytecode compiled by an
interpreter of the VM's Python version (what a VM never imports left out, the compiled modules'
symbol tables stripped; unchecked-hash ``.pyc``: a VM does not compile grpc,
protobuf and cryptography at every first boot; without such an interpreter on the controller the
bundle carries no bytecode and each VM compiles what it imports, about half a second more). The
VM only verifies and unpacks it. The tar is not compressed: inflating it costs a VM more CPU than
the bytes it saves take to download. Beside it, ``uv`` (a static binary from its wheel, for job
environments) is an object of its own: the agent serves without it and fetches it in the
background (``fray_tpu.worker.uvfetch``). Both are built once and cached under
``$XDG_CACHE_HOME/fray-tpu/host-bundles/``; their SHA-256s name them.

They travel through Cloud Storage: the controller uploads each once per version (skipped when
the content-addressed object exists) and pins their hashes in node metadata; every VM downloads
them over Private Google Access (no external IP, no route to the controller) and verifies each
hash before unpacking or running anything. 256 VMs mean 512 downloads served by Cloud Storage,
one upload of each by the controller.

The agent runs on the image's own ``python3``: 3.10 on every current TPU runtime image. The older
``tpu-vm-*`` images (3.8) are refused before anything is provisioned: grpcio and protobuf at the
versions fray-tpu needs publish no 3.8 wheels.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import mmap
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

log = logging.getLogger(__name__)
DEFAULT_PLATFORM = "manylinux_2_35_x86_64"  # Ubuntu 22.04's glibc 2.35 on the x86 TPU hosts
DEFAULT_PYTHON = "3.10"
UV_REQUIREMENT = "uv>=0.5,<1"
OBJECT_PREFIX = "fray-tpu/host-bundles"
PIP_DOWNLOAD_TIMEOUT_SECONDS = 600.0
COMPILE_TIMEOUT_SECONDS = 300.0
STORAGE_TIMEOUT_SECONDS = 120.0
STORAGE_ATTEMPTS = 4
MIN_HOST_PYTHON = (3, 10)
# A directory of wheels to build bundles from instead of the package index (`prefetch` fills it;
# the test suite, which may reach nothing but loopback, builds from it).
WHEELHOUSE_ENV = "FRAY_TPU_HOST_WHEELHOUSE"
# Runtime versions whose image ships Python 3.8 (Ubuntu 20.04); every other current one is 3.10.
_PY38_RUNTIME = re.compile(r"^tpu-vm-")
_PACKAGE_SKIP = re.compile(r"(__pycache__|\.pyc$|\.pyo$)")
_UV_NAME = re.compile(r"^uv\s*(?:[<>=!~;\[(]|$)")
# Run with the VM's Python version: unchecked-hash bytecode for every module of the site (the
# bundle is verified as a whole; its sources never change on the VM).
_COMPILE_PY = """
import compileall, py_compile, sys
if "%d.%d" % sys.version_info[:2] != sys.argv[1]:
    sys.exit("this interpreter is Python %d.%d, not %s" % (sys.version_info[:2] + (sys.argv[1],)))
compileall.compile_dir(sys.argv[2], quiet=2, workers=0,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""
# What a VM never imports, left out of the site (every byte is fetched, hashed and unpacked by
# every VM at every first boot): the controller's emulator and operator tools, the TPU API
# versions fray-tpu does not call (v2 only), cffi's Python side and its parser (cryptography's
# compiled bindings load only the compiled ``_cffi_backend``), console scripts naming the
# controller's interpreter, type stubs and .proto sources (the generated modules carry their
# descriptors).
_VM_UNUSED = ("fray_tpu/emulator", "fray_tpu/ops", "google/cloud/tpu_v1", "google/cloud/tpu_v2alpha1", "cffi",
              "pycparser", "bin", "**/*.pyi", "**/*.proto")
STRIP_TIMEOUT_SECONDS = 120.0
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
class StagedFile:
    """One file the VMs fetch from Cloud Storage, named by its SHA-256 (``uv``'s binary)."""

    path: Path
    sha256: str

    @property
    def object_name(self) -> str:
        return f"{OBJECT_PREFIX}/{self.sha256}.{self.path.name}"


@dataclass(frozen=True)
class HostBundle:
    path: Path
    sha256: str
    target: HostTarget
    uv: StagedFile

    @property
    def object_name(self) -> str:
        return f"{OBJECT_PREFIX}/{self.sha256}.tar"


def agent_requirements() -> list[str]:
    """fray-tpu's own runtime dependencies (no extras) and uv."""
    requires = importlib.metadata.requires("fray-tpu") or []
    return sorted(r.split(";")[0].strip() for r in requires if "extra ==" not in r) + [UV_REQUIREMENT]


def _site_requirements(requirements: list[str]) -> list[str]:
    """What the agent imports: everything but uv, which travels as its own object."""
    return [r for r in requirements if not _UV_NAME.match(r)]


def bytecode_compiler(python: str) -> str | None:
    """An interpreter of the VM's Python version on this machine, to compile the bundle's
    bytecode with (the magic number is per minor version): this one, the newest of pyenv's or
    uv's installs, else ``pythonX.Y`` on PATH if it runs; None without any. (The compile itself
    checks the version again.)"""
    if "%d.%d" % sys.version_info[:2] == python:
        return sys.executable
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    uv_managed = Path(os.environ.get("UV_PYTHON_INSTALL_DIR")
                      or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "uv" / "python")
    patch = re.compile(rf"(?:cpython-)?{re.escape(python)}\.(\d+)(?:-|$)")
    installed = [(int(m.group(1)), str(c))
                 for c in [*pyenv.glob(f"{python}.*/bin/python{python}"),
                           *uv_managed.glob(f"cpython-{python}.*/bin/python{python}")]
                 if (m := patch.match(c.parent.parent.name)) and os.access(c, os.X_OK)]
    if installed:
        return max(installed)[1]
    on_path = shutil.which(f"python{python}")
    if on_path is None:
        return None
    try:
        answer = subprocess.run([on_path, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return on_path if answer.returncode == 0 and answer.stdout.strip() == python else None


def _package_files() -> list[Path]:
    root = PACKAGE_DIR
    return sorted(p for p in root.rglob("*") if p.is_file() and not _PACKAGE_SKIP.search(str(p)))


def _build_key(target: HostTarget, requirements: list[str], compiler: str | None, strip: str | None) -> str:
    digest = hashlib.sha256(json.dumps([target.python, target.platform, requirements, compiler is not None,
                                        strip is not None]).encode())
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


def _slim_site(site: Path, strip: str | None) -> None:
    """Remove what a VM never imports, and the symbol tables of the compiled modules that carry
    one (``strip --strip-unneeded`` keeps what the dynamic loader needs; cryptography's is 3 MB)."""
    for pattern in _VM_UNUSED:
        for path in site.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    if strip is None:
        return
    for library in sorted(site.rglob("*.so")):
        result = subprocess.run([strip, "--strip-unneeded", str(library)], capture_output=True, text=True,
                                timeout=STRIP_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise FrayTpuError(f"cannot strip {library} with {strip}: {result.stderr.strip()[-300:]}")


def _compile_site(target: HostTarget, compiler: str, site: Path) -> None:
    try:
        result = subprocess.run([compiler, "-I", "-c", _COMPILE_PY, target.python, str(site)], capture_output=True,
                                text=True, timeout=COMPILE_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise FrayTpuError(f"cannot compile the host bundle's bytecode with {compiler}: {error}") from None
    if result.returncode != 0:
        raise FrayTpuError(f"cannot compile the host bundle's bytecode with {compiler}: "
                           f"{(result.stderr or result.stdout).strip()[-600:]}")


def _write_bundle(path: Path, target: HostTarget, requirements: list[str], root: Path, bytecode: bool) -> None:
    manifest = {"fray_tpu_version": VERSION, "python": target.python, "platform": target.platform,
                "requirements": requirements, "bytecode": bytecode}
    # Sorted members without times or owners; the hash names whatever this build produced (uv's
    # install records vary between builds, so two builds of one source may differ).
    with tarfile.open(path, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            mode = 0o755 if os.access(file, os.X_OK) else 0o644
            _add_bytes(tar, str(file.relative_to(root)), file.read_bytes(), mode)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_host_bundle(target: HostTarget | None = None, cache_dir: Path | None = None) -> HostBundle:
    """The cached bundle for ``target``, built on first use (safe across threads and processes)."""
    target = target or HostTarget()
    requirements = agent_requirements()
    compiler = bytecode_compiler(target.python)
    strip = shutil.which("strip")  # binutils: without it the bundle is 3 MB larger, no worse
    cache = (cache_dir or default_cache_dir()) / _build_key(target, requirements, compiler, strip)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bundle, digest_file = cache / "bundle.tar", cache / "bundle.sha256"
        uv, uv_digest_file = cache / "uv", cache / "uv.sha256"
        if not all(path.exists() for path in (bundle, digest_file, uv, uv_digest_file)):
            if compiler is None:
                log.warning("no Python %s on this machine (PATH, pyenv, uv's): the host bundle carries no bytecode, "
                            "so every VM compiles what the agent imports at its first boot (about 0.5 s more); "
                            "install python%s here (e.g. `uv python install %s`) to ship it", target.python,
                            target.python, target.python)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                wheels, site = Path(scratch) / "wheels", Path(scratch) / "contents" / "site"
                _download_wheels(target, requirements, wheels)
                uv_partial = _uv_binary(wheels, Path(scratch) / "uv")
                _install_site(target, _site_requirements(requirements), wheels, uv_partial, site)
                _slim_site(site, strip)
                if compiler is not None:
                    _compile_site(target, compiler, site)
                partial = Path(scratch) / "bundle.tar"
                _write_bundle(partial, target, _site_requirements(requirements), site.parent, compiler is not None)
                digest, uv_digest = _sha256_of(partial), _sha256_of(uv_partial)
                shutil.move(uv_partial, uv)
                shutil.move(partial, bundle)
                uv_digest_file.write_text(uv_digest)
                digest_file.write_text(digest)
        return HostBundle(bundle, digest_file.read_text().strip(), target,
                          StagedFile(uv, uv_digest_file.read_text().strip()))


class BundleStorage:
    """The Cloud Storage JSON API for staging bundles (``endpoint`` the API root)."""

    def __init__(self, bucket: str, *, endpoint: str = "https://storage.googleapis.com", token: callable):
        self.bucket = bucket
        self.endpoint = endpoint.rstrip("/")
        self._token = token

    def _request(self, method: str, url: str, data: bytes | memoryview | None = None) -> dict | None:
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

    def url(self, staged: HostBundle | StagedFile) -> str:
        return f"gs://{self.bucket}/{staged.object_name}"

    def missing(self, staged: HostBundle | StagedFile) -> bool:
        """Whether ``staged`` must be uploaded (its content-addressed object is not there);
        a configuration error when the bucket does not exist."""
        existing = self._request("GET", self.object_url(staged.object_name))
        if existing is not None and int(existing.get("size", -1)) == staged.path.stat().st_size:
            return False
        if self._request("GET", f"{self.endpoint}/storage/v1/b/{self.bucket}") is None:
            raise ConfigError(f"the staging bucket gs://{self.bucket} does not exist: create it, or set "
                              f"staging_bucket to one the controller can write and the VMs' service account read")
        return True

    def upload(self, staged: HostBundle | StagedFile) -> str:
        query = urllib.parse.urlencode({"uploadType": "media", "name": staged.object_name})
        url = f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?{query}"
        # Sent from the page cache (a memory map): no copy of the 50 MB in this process.
        with open(staged.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                memoryview(mapped) as body:
            self._request("POST", url, body)
        return self.url(staged)

    def stage(self, staged: HostBundle | StagedFile) -> str:
        """Upload ``staged`` unless its content-addressed object exists; returns its gs:// URL."""
        if self.missing(staged):
            self.upload(staged)
        return self.url(staged)


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
