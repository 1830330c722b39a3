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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

import fray_tpu
from fray_tpu.contract import BASE_ENV_DIGEST, PYTHON_DIRS_ENV, PYTHON_DOWNLOADS_ENV
from fray_tpu.errors import ConfigError, EnvironmentBuildError
from fray_tpu.uv_command import INDEX_VARS, REDIRECTING_VARS, find_uv, is_locked_workspace, run_streaming, uv_message
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
FORMAT_VERSION = 3
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


@dataclass(frozen=True)
class PythonEnv:
    """The interpreter an attempt runs with, the variables that activate it, and its identity."""

    python: str
    env_vars: dict[str, str]
    digest: str
    reused: bool
    build_seconds: float = 0.0


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

    def __init__(self, root: Path, uv: UvSettings, *, build_timeout: float = DEFAULT_BUILD_TIMEOUT_SECONDS) -> None:
        self.root = Path(root)
        self.uv = uv
        self.build_timeout = build_timeout
        self._envs = self.root / "envs"
        self._locks = self.root / "locks"
        self._cache = self.root / "uv-cache"
        self._runtime = self.root / "runtime"
        for directory in (self._envs, self._locks, self._cache, self._runtime):
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
            "index_url": request.index_url,
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

    def ensure(self, request: EnvRequest, log: Callable[[str], None]) -> PythonEnv:
        """The environment for ``request``, building it on first use."""
        digest = self.digest_for(request)
        if digest == BASE_ENV_DIGEST:
            return PythonEnv(python=sys.executable, env_vars={}, digest=digest, reused=True)
        env_dir = self.env_dir(digest)
        if (env_dir / COMPLETE_MARKER).exists():
            return self._env(digest, reused=True)
        with self._digest_locks.exclusive(digest, self.build_timeout + VENV_TIMEOUT_SECONDS + 60):
            if (env_dir / COMPLETE_MARKER).exists():
                return self._env(digest, reused=True)
            started = time.monotonic()
            source = "uv.lock" + (f" extras {list(request.extras)}" if request.extras else "") if request.locked else ""
            contents = " + ".join(filter(None, [source, ", ".join(self.requirements(request))])) or "no packages"
            log(f"building Python environment {digest[:12]} with uv: Python "
                f"{request.python_version or agent_python_version()}, {contents}")
            try:
                self._build(env_dir, request, log)
            except BaseException:
                shutil.rmtree(env_dir, ignore_errors=True)
                raise
            seconds = time.monotonic() - started
            log(f"Python environment {digest[:12]} ready in {seconds:.1f}s")
            return self._env(digest, reused=False, build_seconds=seconds)

    def _env(self, digest: str, *, reused: bool, build_seconds: float = 0.0) -> PythonEnv:
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
            reused=reused,
            build_seconds=build_seconds,
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

    def _build(self, env_dir: Path, request: EnvRequest, log: Callable[[str], None]) -> None:
        if env_dir.exists():
            log(f"removing the unfinished environment {env_dir} left by an interrupted build")
            shutil.rmtree(env_dir)
        env = self._uv_environ(env_dir)
        python = request.python_version or agent_python_version()
        index = ["--default-index", request.index_url] if request.index_url else []
        cwd = Path(request.workspace_dir) if request.workspace_dir is not None else self.root
        self._uv(["venv", "--no-project", "--no-config", "--python", python, str(env_dir)],
                 f"create a Python {python} environment", cwd=self.root, env=env, log=log)
        env_python = str(env_dir / "bin" / "python")
        if request.locked:
            self._install_lock(env_dir, env_python, request, index, env, log)
        requirements = self.requirements(request)
        if requirements:
            self._uv(["pip", "install", "--python", env_python, *index, *requirements],
                     f"install {', '.join(requirements)}", cwd=cwd, env=env, log=log)
        purelib = subprocess.run(
            [env_python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        # After the environment's own site-packages: a fray-tpu the job installs itself wins.
        (Path(purelib) / RUNTIME_PTH_NAME).write_text(f"{self._runtime}\n")
        marker = env_dir / COMPLETE_MARKER
        marker.with_suffix(".tmp").write_text(json.dumps({"requirements": requirements, "locked": request.locked}))
        os.replace(marker.with_suffix(".tmp"), marker)
