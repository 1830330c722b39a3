"""Per-job Python environments on a host (agent side), built with uv.

A job runs on the Python it needs (by default the controller's major.minor, so that the pickled
callable loads). A job that asks for no packages, whose workspace has no lock and whose Python is
the agent's own, runs on the agent's interpreter. Otherwise it gets a virtual environment built by
uv and named by a hash of what it contains, built once per host and reused by every later attempt
and job asking for the same thing (uv's cache, one per host, makes even a new digest cheap).

What goes in:

- a workspace with ``pyproject.toml`` and ``uv.lock`` (Marin's convention, a uv workspace): the
  lock's packages, exactly and with their hashes, with the requested ``extras`` of the lock, and
  ``pip_packages`` installed on top; the workspace's own members are not installed (the
  workspace is on ``sys.path``). The controller checks first that the lock matches its
  pyproject (``fray_tpu.workspace.check_workspace_lock``);
- without a lock, ``pip_packages`` plus the workspace's ``extras`` resolved statically from its
  pyproject (the project itself is not installed: the workspace is on ``sys.path`` already);
- always what the attempt runner needs, the agent's own ``fray_tpu`` and ``cloudpickle`` (both
  pure Python), through a ``.pth`` file naming a directory that holds only those two: the
  environment does not see the agent's other packages, and a job asking for no packages needs
  no index (a VM reaches none unless the job configures one).

The interpreter is found (or downloaded, where downloads are allowed) by uv. Packages come from
``index_url`` when the job names one. uv's path and where it looks for interpreters are the
agent's settings (``UvSettings.from_environ``).

An environment directory counts only once its completion marker exists; builds run under a
per-digest file lock, and a directory without the marker (a crashed build) is rebuilt.

The digest names the content only (what is installed, on which Python), never where packages
came from (a loopback index on a random port, a mirror): hosts of later jobs, on fresh VMs, find
the environment an earlier host built in the staging bucket (``fray_tpu.worker.envarchive``),
keyed by that digest and the host's platform.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

import fray_tpu
from fray_tpu.contract import (
    BASE_ENV_DIGEST,
    ENV_SOURCE_BASE,
    ENV_SOURCE_BUCKET,
    ENV_SOURCE_BUILT,
    ENV_SOURCE_LOCAL,
    PYTHON_DIRS_ENV,
    PYTHON_DOWNLOADS_ENV,
)
from fray_tpu.errors import ConfigError, EnvironmentBuildError, FrayTpuError
from fray_tpu.uv_command import INDEX_VARS, REDIRECTING_VARS, find_uv, is_locked_workspace, run_streaming, uv_message
from fray_tpu.worker.envarchive import SHA256_METADATA, BucketObjects, EnvBucket, host_platform, pack, unpack
from fray_tpu.worker.keylocks import KeyLocks

try:
    import tomllib
except ModuleNotFoundError:  # the agent runs on the images' Python 3.10; the bundle brings tomli
    import tomli as tomllib

COMPLETE_MARKER = ".fray-tpu-complete"
RUNTIME_PTH_NAME = "_fray_tpu_runtime.pth"
DEFAULT_BUILD_TIMEOUT_SECONDS = 1800.0
UV_HTTP_TIMEOUT_SECONDS = 60
VENV_TIMEOUT_SECONDS = 300.0
# What `python -m fray_tpu.worker.runner` imports besides fray_tpu; the controller pickles with it.
# Environments borrow the agent's own copy (pure Python, so it loads on any job Python): a job
# that asks for no packages needs no index, which the VMs cannot reach without one configured.
RUNNER_REQUIREMENTS = ("cloudpickle>=3.0,<4",)
# The agent's packages every environment sees (through a .pth after its own site-packages).
RUNTIME_PACKAGES = (fray_tpu, cloudpickle)
# Bump when the environment layout changes, so old environments stop matching.
FORMAT_VERSION = 4
# How often a host waiting for its gang's builder looks for the archive: soon at first (an
# environment of a few packages is built in well under a second), then less and less often, so a
# long build's waiting hosts ask the bucket about once a second each.
ARCHIVE_FIRST_POLL_SECONDS = 0.05
ARCHIVE_POLL_GROWTH = 1.5
ARCHIVE_POLL_SECONDS = 1.0
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


@dataclass(frozen=True)
class PythonEnv:
    """The interpreter an attempt runs with, the variables that activate it, its identity, and
    how this host got it (``ENV_SOURCE_*``), in how long, with what else happened (``note``:
    the upload, an archive refused)."""

    python: str
    env_vars: dict[str, str]
    digest: str
    source: str
    seconds: float = 0.0
    note: str = ""

    @property
    def reused(self) -> bool:
        return self.source in (ENV_SOURCE_BASE, ENV_SOURCE_LOCAL)


@dataclass(frozen=True)
class EnvRequest:
    """What one job asks of its environment."""

    pip_packages: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    workspace_dir: Path | None = None
    python_version: str = ""  # "3.12" or "3.12.1"; "" means the agent's own
    index_url: str = ""  # "" means uv's default index

    @property
    def locked(self) -> bool:
        """The workspace is a uv project with a lockfile: the lock decides the versions."""
        return is_locked_workspace(self.workspace_dir)


@dataclass(frozen=True)
class UvSettings:
    """How the agent runs uv: the binary, extra directories searched for interpreters (the
    emulator's stand-ins for uv's downloads), and whether uv may download an interpreter."""

    uv: str
    python_dirs: tuple[str, ...] = ()
    python_downloads: bool = True

    @staticmethod
    def from_environ(environ: Mapping[str, str] | None = None) -> UvSettings:
        """``FRAY_TPU_UV`` (else a ``uv`` beside the agent's interpreter, else on PATH),
        ``FRAY_TPU_PYTHON_DIRS`` (os.pathsep list) and ``FRAY_TPU_PYTHON_DOWNLOADS`` (never to forbid)."""
        env = os.environ if environ is None else environ
        uv = find_uv(env)
        dirs = tuple(d for d in env.get(PYTHON_DIRS_ENV, "").split(os.pathsep) if d.strip())
        downloads = env.get(PYTHON_DOWNLOADS_ENV, "").strip().lower() not in ("never", "false", "0", "no")
        return UvSettings(uv=uv, python_dirs=dirs, python_downloads=downloads)


def archive_poll_pauses() -> Iterator[float]:
    """The pauses between a waiting host's looks for its builder's archive."""
    pause = ARCHIVE_FIRST_POLL_SECONDS
    while True:
        yield pause
        pause = min(pause * ARCHIVE_POLL_GROWTH, ARCHIVE_POLL_SECONDS)


def agent_python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def needs_own_env(request: EnvRequest) -> bool:
    """False when the agent's interpreter serves the job as it is."""
    if request.pip_packages or request.extras or request.locked:
        return True
    wanted = request.python_version
    return bool(wanted) and wanted != agent_python_version() and wanted != _full_version()


def _full_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _normalise_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_extras(workspace_dir: Path | None, extras: list[str]) -> list[str]:
    """The requirements ``pip install <workspace>[extras]`` would install, minus the project itself:
    its ``dependencies`` plus each named optional-dependency group (following self-references
    such as ``all = ["myproject[eval,tpu]"]``)."""
    if workspace_dir is None:
        raise ConfigError(
            f"extras {extras} need a workspace whose pyproject.toml defines them; set "
            f"EnvironmentConfig.workspace, or list the packages in pip_packages instead"
        )
    pyproject = Path(workspace_dir) / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"extras {extras} were requested but the workspace has no pyproject.toml ({pyproject}); "
            f"add [project.optional-dependencies] there, or list the packages in pip_packages instead"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{pyproject} is not valid TOML ({error}); fix it to use extras {extras}") from error
    project = data.get("project") or {}
    dynamic = set(project.get("dynamic") or ())
    if {"dependencies", "optional-dependencies"} & dynamic:
        raise ConfigError(
            f"{pyproject} declares its dependencies as dynamic, so extras {extras} cannot be resolved "
            f"without building the project; declare them statically in [project] or use pip_packages"
        )
    groups = {_normalise_name(name): list(reqs) for name, reqs in (project.get("optional-dependencies") or {}).items()}
    project_name = _normalise_name(project.get("name", ""))
    resolved: list[str] = list(project.get("dependencies") or ())
    pending = [_normalise_name(extra) for extra in extras]
    seen: set[str] = set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in groups:
            available = ", ".join(sorted(groups)) or "none"
            raise ConfigError(
                f"extra {extra!r} is not in [project.optional-dependencies] of {pyproject} "
                f"(available: {available}); fix EnvironmentConfig.extras"
            )
        for requirement in groups[extra]:
            match = _REQUIREMENT_NAME.match(requirement)
            if match and project_name and _normalise_name(match.group(1)) == project_name:
                pending.extend(_normalise_name(e) for e in (match.group(2) or "").split(",") if e.strip())
            else:
                resolved.append(requirement)
    return sorted(set(resolved))


class PythonEnvStore:
    """The host's environments, one directory per content digest under ``root``, and uv's cache."""

    def __init__(self, root: Path, uv: UvSettings, *, build_timeout: float = DEFAULT_BUILD_TIMEOUT_SECONDS,
                 storage_token: Callable[[], str] | None = None) -> None:
        """``storage_token`` gives the bearer token for the staging bucket (the VM's service
        account); environments are shared through a bucket only with one."""
        self.root = Path(root)
        self.uv = uv
        self.build_timeout = build_timeout
        self._storage_token = storage_token
        self._envs = self.root / "envs"
        self._locks = self.root / "locks"
        self._cache = self.root / "uv-cache"
        self._runtime = self.root / "runtime"
        self._scratch = self.root / "scratch"
        for directory in (self._envs, self._locks, self._cache, self._runtime, self._scratch):
            directory.mkdir(parents=True, exist_ok=True)
        self._digest_locks = KeyLocks(self._locks, "building Python environment")
        self._link_runtime()

    def _link_runtime(self) -> None:
        """``runtime/fray_tpu`` and ``runtime/cloudpickle`` -> the agent's packages: the one
        directory environments borrow."""
        for module in RUNTIME_PACKAGES:
            package = Path(module.__file__).resolve().parent
            link = self._runtime / module.__name__
            if link.is_symlink() and Path(os.readlink(link)) == package:
                continue
            temporary = self._runtime / f".{module.__name__}.{os.getpid()}.{threading.get_ident()}"
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(package, target_is_directory=True)
            os.replace(temporary, link)

    def requirements(self, request: EnvRequest) -> list[str]:
        """What ``uv pip install`` adds (on top of the lock, when there is one), in a stable order."""
        resolved = set(request.pip_packages)
        if request.extras and not request.locked:
            resolved.update(resolve_extras(request.workspace_dir, list(request.extras)))
        return sorted(resolved)

    def digest_for(self, request: EnvRequest) -> str:
        if not needs_own_env(request):
            return BASE_ENV_DIGEST
        identity: dict[str, object] = {
            "format": FORMAT_VERSION,
            "python": request.python_version or agent_python_version(),
            "requirements": self.requirements(request),
        }
        if request.locked:
            workspace = Path(request.workspace_dir)
            identity["lock"] = _sha256_file(workspace / "uv.lock")
            identity["pyproject"] = _sha256_file(workspace / "pyproject.toml")
            identity["extras"] = sorted(request.extras)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def env_dir(self, digest: str) -> Path:
        return self._envs / digest

    def ensure(self, request: EnvRequest, log: Callable[[str], None], bucket: EnvBucket | None = None) -> PythonEnv:
        """The environment for ``request``: on this host already, else from ``bucket`` (when
        given), else built here (and then uploaded to ``bucket``)."""
        digest = self.digest_for(request)
        if digest == BASE_ENV_DIGEST:
            return PythonEnv(python=sys.executable, env_vars={}, digest=digest, source=ENV_SOURCE_BASE)
        env_dir = self.env_dir(digest)
        if (env_dir / COMPLETE_MARKER).exists():
            return self._env(digest, ENV_SOURCE_LOCAL)
        wait = 0.0 if bucket is None or bucket.builder else bucket.wait_seconds
        with self._digest_locks.exclusive(digest, self.build_timeout + VENV_TIMEOUT_SECONDS + wait + 60):
            if (env_dir / COMPLETE_MARKER).exists():
                return self._env(digest, ENV_SOURCE_LOCAL)
            started = time.monotonic()
            if env_dir.exists():
                log(f"removing the unfinished environment {env_dir} left by an interrupted build")
                shutil.rmtree(env_dir)
            objects = None
            if bucket is not None and self._storage_token is not None and self._worth_sharing(request):
                objects = BucketObjects(bucket.endpoint, bucket.bucket, self._storage_token)
            replace_generation, notes = "0", []
            if objects is not None:
                fetched, replace_generation, note = self._fetch(digest, request, bucket, objects, log)
                notes.append(note)
                if fetched:
                    seconds = time.monotonic() - started
                    log(f"Python environment {digest[:12]} ready in {seconds:.1f}s: {note}")
                    return self._env(digest, ENV_SOURCE_BUCKET, seconds, note)
            source = "uv.lock" + (f" extras {list(request.extras)}" if request.extras else "") if request.locked else ""
            contents = " + ".join(filter(None, [source, ", ".join(self.requirements(request))])) or "no packages"
            log(f"building Python environment {digest[:12]} with uv: Python "
                f"{request.python_version or agent_python_version()}, {contents}")
            try:
                self._build(env_dir, request, log)
            except BaseException as error:
                shutil.rmtree(env_dir, ignore_errors=True)
                if objects is not None and bucket.builder and isinstance(error, (EnvironmentBuildError, ConfigError)):
                    self._report_failure(objects, bucket, digest, error, log)
                raise
            built = time.monotonic() - started
            notes.append(f"built in {built:.1f}s")
            if objects is not None:
                notes.append(self._upload(digest, request, bucket, objects, replace_generation, log))
            seconds = time.monotonic() - started
            note = "; ".join(filter(None, notes))
            log(f"Python environment {digest[:12]} ready in {seconds:.1f}s: {note}")
            return self._env(digest, ENV_SOURCE_BUILT, seconds, note)

    def _worth_sharing(self, request: EnvRequest) -> bool:
        """An environment without packages is only an interpreter's venv: making it (tens of
        milliseconds) is quicker than fetching, checking and unpacking an archive of it, and its
        gang's hosts need not wait for a builder."""
        return request.locked or bool(self.requirements(request))

    def _manifest(self, digest: str, request: EnvRequest) -> dict:
        return {"digest": digest, "format": FORMAT_VERSION, "platform": host_platform(),
                "python": request.python_version or agent_python_version(), "locked": request.locked,
                "requirements": self.requirements(request)}

    def _scratch_file(self, digest: str, suffix: str) -> Path:
        return self._scratch / f"{digest}.{os.getpid()}.{threading.get_ident()}{suffix}"

    def _await_archive(self, name: str, digest: str, bucket: EnvBucket, objects: BucketObjects,
                       log: Callable[[str], None], refused: str = "") -> dict | None:
        """The archive's resource (of another generation than ``refused``); a host that is not
        its gang's builder waits for it up to ``bucket.wait_seconds`` (and fails with the
        builder's failure, when it reports one)."""
        deadline = time.monotonic() + (0.0 if bucket.builder else bucket.wait_seconds)
        waiting = False
        pauses = archive_poll_pauses()
        while True:
            resource = objects.stat(name)
            if resource is not None and resource["generation"] != refused:
                return resource
            if not bucket.builder:
                failure = objects.read_text(bucket.failure_name(digest))
                if failure is not None:
                    raise EnvironmentBuildError(f"the host building it for the gang failed: {failure}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if waiting:
                    log(f"no {bucket.url(name)} after waiting {bucket.wait_seconds:.0f}s for the gang's builder: "
                        f"building it here")
                return None
            if not waiting:
                log(f"waiting up to {bucket.wait_seconds:.0f}s for the gang's builder to upload {bucket.url(name)}")
                waiting = True
            time.sleep(min(next(pauses), remaining))

    def _fetch(self, digest: str, request: EnvRequest, bucket: EnvBucket, objects: BucketObjects,
               log: Callable[[str], None]) -> tuple[bool, str, str]:
        """Try the bucket: (fetched, the generation a build should replace, what happened).
        A broken cache never fails the job: the host builds instead."""
        name = bucket.object_name(digest)
        env_dir = self.env_dir(digest)
        archive = self._scratch_file(digest, ".tar")
        refused_generation, refusal = "", ""
        try:
            while True:
                resource = self._await_archive(name, digest, bucket, objects, log, refused=refused_generation)
                if resource is None:
                    return False, refused_generation or "0", refusal or f"not in {bucket.url(name)} yet"
                generation = resource["generation"]
                recorded = (resource.get("metadata") or {}).get(SHA256_METADATA, "")
                started = time.monotonic()
                actual = objects.download(name, generation, archive)
                if actual == recorded:
                    break
                refusal = (f"refused {bucket.url(name)} (generation {generation}): its SHA-256 is {actual[:16]}, "
                           f"not the {recorded[:16] or '(none)'} its uploader recorded")
                log(refusal)
                if bucket.builder or refused_generation:
                    return False, generation, refusal
                # The gang's builder refuses it too and replaces it: wait for that, not build.
                refused_generation = generation
            downloaded = time.monotonic() - started
            manifest = unpack(archive, env_dir)
            if manifest.get("digest") != digest or manifest.get("platform") != host_platform():
                shutil.rmtree(env_dir, ignore_errors=True)
                note = (f"refused {bucket.url(name)} (generation {generation}): it holds environment "
                        f"{manifest.get('digest')} for {manifest.get('platform')}")
                log(note)
                return False, generation, note
            self._make_local(env_dir, request, log)
            return True, "", (f"{refusal}; " if refusal else "") + (f"downloaded {bucket.url(name)} ({int(resource.get('size', 0)) / 1e6:.1f} MB) in "
                              f"{downloaded:.1f}s, unpacked in {time.monotonic() - started - downloaded:.1f}s")
        except EnvironmentBuildError:
            raise
        except (FrayTpuError, OSError, ValueError, tarfile.TarError) as error:
            shutil.rmtree(env_dir, ignore_errors=True)
            note = f"could not use {bucket.url(name)}: {error}"
            log(note)
            return False, "0", note
        finally:
            archive.unlink(missing_ok=True)

    def _upload(self, digest: str, request: EnvRequest, bucket: EnvBucket, objects: BucketObjects,
                replace_generation: str, log: Callable[[str], None]) -> str:
        """Share what this host built; returns what happened. Never fails the job."""
        name = bucket.object_name(digest)
        archive = self._scratch_file(digest, ".tar")
        started = time.monotonic()
        try:
            sha256 = pack(self.env_dir(digest), archive, self._manifest(digest, request),
                          excluded_files=(RUNTIME_PTH_NAME, COMPLETE_MARKER))
            packed = time.monotonic() - started
            created = objects.upload(name, archive, {SHA256_METADATA: sha256}, replace_generation)
            if created is None:
                return f"not uploaded: another host put {bucket.url(name)} there first"
            return (f"uploaded {bucket.url(name)} ({archive.stat().st_size / 1e6:.1f} MB, packed in {packed:.1f}s) "
                    f"in {time.monotonic() - started:.1f}s")
        except (FrayTpuError, OSError) as error:
            note = f"could not upload {bucket.url(name)}: {error}"
            log(note)
            return note
        finally:
            archive.unlink(missing_ok=True)

    def _report_failure(self, objects: BucketObjects, bucket: EnvBucket, digest: str, error: BaseException,
                        log: Callable[[str], None]) -> None:
        """Tell the gang's waiting hosts the build failed (so they fail with it, at once)."""
        try:
            objects.put_text(bucket.failure_name(digest), str(error))
        except (FrayTpuError, OSError) as report_error:
            log(f"could not report the failed build to the gang's other hosts: {report_error}")

    def _env(self, digest: str, source: str, seconds: float = 0.0, note: str = "") -> PythonEnv:
        env_dir = self.env_dir(digest)
        bin_dir = env_dir / "bin"
        return PythonEnv(
            python=str(bin_dir / "python"),
            env_vars={
                "VIRTUAL_ENV": str(env_dir),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
                # Not the agent's import path (on a VM the host bundle's packages, built for the
                # agent's Python): the environment has what it needs through its .pth.
                "PYTHONPATH": "",
            },
            digest=digest,
            source=source,
            seconds=seconds,
            note=note,
        )

    def _uv_environ(self, env_dir: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in REDIRECTING_VARS}
        env.update({
            "UV_CACHE_DIR": str(self._cache),
            "UV_NO_PROGRESS": "1",
            "UV_HTTP_TIMEOUT": str(UV_HTTP_TIMEOUT_SECONDS),
            "UV_PYTHON_DOWNLOADS": "automatic" if self.uv.python_downloads else "never",
            "UV_PROJECT_ENVIRONMENT": str(env_dir),
            "PATH": os.pathsep.join([*self.uv.python_dirs, env.get("PATH", os.defpath)]),
        })
        return env

    def _uv(self, arguments: list[str], what: str, *, cwd: Path, env: Mapping[str, str], log) -> None:
        command = [self.uv.uv, *arguments]
        try:
            code, tail = run_streaming(command, cwd=cwd, env=env, timeout=self.build_timeout, log=log)
        except OSError as error:
            raise EnvironmentBuildError(f"cannot run uv ({self.uv.uv}): {error}") from error
        if code != 0:
            raise EnvironmentBuildError(f"uv could not {what} (exit code {code}):\n{uv_message(tail)}")

    def _install_lock(self, env_dir: Path, env_python: str, request: EnvRequest, index: list[str],
                      env: Mapping[str, str], log: Callable[[str], None]) -> None:
        """The lock's packages, exactly, from the job's index.

        Not ``uv sync --locked``: that takes a lock made against PyPI for a stale one as soon as
        the host installs from a mirror (the index is part of what it compares). The controller
        checked the lock against its pyproject (``fray_tpu.workspace.check_workspace_lock``); here
        it is exported with its hashes and installed without resolving, from whichever index the
        job names (a mirror must serve the very files the lock recorded)."""
        workspace = Path(request.workspace_dir)
        exported = env_dir / "fray-tpu-locked-requirements.txt"
        extras = [argument for extra in request.extras for argument in ("--extra", extra)]
        own_settings = {key: value for key, value in env.items() if key not in INDEX_VARS}
        self._uv(["export", "--frozen", "--no-dev", "--no-emit-workspace", "--format", "requirements.txt",
                  "--output-file", str(exported), *extras],
                 f"export the workspace's uv.lock{f' with extras {list(request.extras)}' if extras else ''}",
                 cwd=workspace, env=own_settings, log=log)
        self._uv(["pip", "install", "--python", env_python, "--no-deps", *index, "-r", str(exported)],
                 "install the packages of the workspace's uv.lock", cwd=workspace, env=env, log=log)

    def _venv(self, env_dir: Path, request: EnvRequest, log: Callable[[str], None]) -> None:
        """An empty relocatable environment on this host's interpreter of the job's Python."""
        python = request.python_version or agent_python_version()
        self._uv(["venv", "--relocatable", "--no-project", "--no-config", "--python", python, str(env_dir)],
                 f"create a Python {python} environment", cwd=self.root, env=self._uv_environ(env_dir), log=log)

    def _make_local(self, env_dir: Path, request: EnvRequest, log: Callable[[str], None]) -> None:
        """An unpacked environment made this host's: the interpreter links and ``pyvenv.cfg`` of
        an empty environment made here (the interpreter may live elsewhere than on the host
        that built it), then what every environment gets."""
        skeleton = self._scratch_file(env_dir.name, ".skeleton")
        shutil.rmtree(skeleton, ignore_errors=True)
        try:
            self._venv(skeleton, request, log)
            for link in (skeleton / "bin").iterdir():
                if link.name.startswith("python") and link.is_symlink():
                    target = env_dir / "bin" / link.name
                    target.unlink(missing_ok=True)
                    target.symlink_to(os.readlink(link))
            shutil.copyfile(skeleton / "pyvenv.cfg", env_dir / "pyvenv.cfg")
        finally:
            shutil.rmtree(skeleton, ignore_errors=True)
        self._finish(env_dir, request)

    def _build(self, env_dir: Path, request: EnvRequest, log: Callable[[str], None]) -> None:
        env = self._uv_environ(env_dir)
        index = ["--default-index", request.index_url] if request.index_url else []
        cwd = Path(request.workspace_dir) if request.workspace_dir is not None else self.root
        self._venv(env_dir, request, log)
        env_python = str(env_dir / "bin" / "python")
        if request.locked:
            self._install_lock(env_dir, env_python, request, index, env, log)
        requirements = self.requirements(request)
        if requirements:
            self._uv(["pip", "install", "--python", env_python, *index, *requirements],
                     f"install {', '.join(requirements)}", cwd=cwd, env=env, log=log)
        self._finish(env_dir, request)

    def _finish(self, env_dir: Path, request: EnvRequest) -> None:
        """What no archive carries (it names this host's paths), then the completion marker."""
        # A venv's site-packages on POSIX, found without starting its interpreter (tens of ms).
        purelibs = list(env_dir.glob("lib/python*/site-packages"))
        if len(purelibs) != 1:
            raise EnvironmentBuildError(f"the environment {env_dir} has {len(purelibs)} lib/python*/site-packages "
                                        f"directories, not one: it is not a virtual environment uv made")
        # After the environment's own site-packages: a fray-tpu the job installs itself wins.
        (purelibs[0] / RUNTIME_PTH_NAME).write_text(f"{self._runtime}\n")
        marker = env_dir / COMPLETE_MARKER
        marker.with_suffix(".tmp").write_text(json.dumps({"requirements": self.requirements(request),
                                                          "locked": request.locked}))
        os.replace(marker.with_suffix(".tmp"), marker)
