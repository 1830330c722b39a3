"""Per-job Python environments on a host (agent side): ``pip_packages`` and ``extras``.

A job that asks for nothing runs on the agent's own interpreter. Otherwise it gets a virtual
environment named by a hash of what it contains, built once and reused by every later attempt
asking for the same thing. The environment is LAYERED over the agent's interpreter: a `.pth`
file in its site-packages appends the base interpreter's site directories, so fray-tpu,
cloudpickle and JAX stay importable while packages installed into the environment take
precedence (its own site-packages comes first on ``sys.path``) and pip treats what the base
already has as satisfied instead of downloading it again.

``extras`` name optional-dependency groups of the workspace's ``pyproject.toml`` (as in
``pip install <workspace>[eval,tpu]``). They are resolved here, statically, into the project's
dependencies plus those groups; the project itself is not installed because the workspace is on
``sys.path`` already, which also spares the host a build backend.

An environment directory counts only once its completion marker exists; builds run under a
per-digest file lock, and a directory without the marker (a crashed build) is rebuilt. The
environment is built in place rather than renamed into place because pip writes absolute
interpreter paths into the scripts it installs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.errors import ConfigError, FrayTpuError
from fray_tpu.worker.keylocks import KeyLocks

BASE_ENV_DIGEST = "base"
COMPLETE_MARKER = ".fray-tpu-complete"
LAYER_PTH_NAME = "_fray_tpu_base_layer.pth"
DEFAULT_PIP_TIMEOUT_SECONDS = 1800.0
PIP_SOCKET_TIMEOUT_SECONDS = 60
PIP_RETRIES = 5
VENV_TIMEOUT_SECONDS = 120.0
OUTPUT_TAIL_LINES = 40
# Bump when the environment layout changes, so old environments stop matching.
FORMAT_VERSION = 1
# pip settings that would send the install somewhere other than the environment.
_REDIRECTING_PIP_VARS = ("PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


class EnvironmentBuildError(FrayTpuError):
    """pip (or venv) could not build the job's environment; the message carries pip's output tail."""


@dataclass(frozen=True)
class PythonEnv:
    """The interpreter an attempt runs with, the variables that activate it, and its identity."""

    python: str
    env_vars: dict[str, str]
    digest: str
    reused: bool


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


def _run_streaming(
    command: list[str], *, cwd: Path, env: Mapping[str, str], timeout: float, log: Callable[[str], None]
) -> tuple[int, list[str]]:
    """Run ``command``, passing each output line to ``log``; returns the exit code and the tail."""
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill_on_deadline() -> None:
        timed_out.set()
        process.kill()

    watchdog = threading.Timer(timeout, kill_on_deadline)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if timed_out.is_set():
        raise EnvironmentBuildError(
            f"{' '.join(command[:4])} ... did not finish within {timeout:.0f}s; last output:\n" + "\n".join(tail)
        )
    return code, list(tail)


class PythonEnvStore:
    """The host's environments, one directory per content digest under ``root``."""

    def __init__(
        self, root: Path, base_python: str = sys.executable, *, pip_timeout: float = DEFAULT_PIP_TIMEOUT_SECONDS
    ) -> None:
        self.root = Path(root)
        self.base_python = base_python
        self.pip_timeout = pip_timeout
        self._envs = self.root / "envs"
        self._locks = self.root / "locks"
        self._envs.mkdir(parents=True, exist_ok=True)
        self._locks.mkdir(parents=True, exist_ok=True)
        self._base_info: dict | None = None
        self._base_info_lock = threading.Lock()
        self._digest_locks = KeyLocks(self._locks, "building Python environment")

    def base_info(self) -> dict:
        """The base interpreter's identity and site directories (asked once)."""
        with self._base_info_lock:
            if self._base_info is None:
                probe = (
                    "import json, site, sys, os\n"
                    "dirs = list(site.getsitepackages())\n"
                    "if site.ENABLE_USER_SITE: dirs.append(site.getusersitepackages())\n"
                    "print(json.dumps({'executable': os.path.realpath(sys.executable),"
                    " 'version': sys.version, 'site_dirs': [d for d in dirs if os.path.isdir(d)]}))\n"
                )
                try:
                    output = subprocess.run(
                        [self.base_python, "-c", probe], capture_output=True, text=True, check=True, timeout=60
                    ).stdout
                except (OSError, subprocess.SubprocessError) as error:
                    raise EnvironmentBuildError(
                        f"cannot run the base interpreter {self.base_python!r}: {error}"
                    ) from error
                self._base_info = json.loads(output)
            return self._base_info

    def requirements(self, pip_packages: list[str], extras: list[str], workspace_dir: Path | None) -> list[str]:
        """Everything the environment installs, in a stable order."""
        resolved = set(pip_packages)
        if extras:
            resolved.update(resolve_extras(workspace_dir, extras))
        return sorted(resolved)

    def digest_for(self, pip_packages: list[str], extras: list[str], workspace_dir: Path | None) -> str:
        if not pip_packages and not extras:
            return BASE_ENV_DIGEST
        identity = {
            "format": FORMAT_VERSION,
            "base": self.base_info(),
            "requirements": self.requirements(pip_packages, extras, workspace_dir),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def env_dir(self, digest: str) -> Path:
        return self._envs / digest

    def ensure(
        self,
        pip_packages: list[str],
        extras: list[str],
        workspace_dir: Path | None,
        log: Callable[[str], None],
    ) -> PythonEnv:
        """The environment for these packages and extras, building it on first use."""
        digest = self.digest_for(pip_packages, extras, workspace_dir)
        if digest == BASE_ENV_DIGEST:
            return PythonEnv(python=self.base_python, env_vars={}, digest=digest, reused=True)
        env_dir = self.env_dir(digest)
        if (env_dir / COMPLETE_MARKER).exists():
            return self._env(digest, reused=True)
        with self._digest_locks.exclusive(digest, self.pip_timeout + VENV_TIMEOUT_SECONDS + 60):
            if (env_dir / COMPLETE_MARKER).exists():
                return self._env(digest, reused=True)
            requirements = self.requirements(pip_packages, extras, workspace_dir)
            started = time.monotonic()
            log(f"building Python environment {digest} for: {', '.join(requirements)}")
            try:
                self._build(env_dir, requirements, workspace_dir, log)
            except BaseException:
                shutil.rmtree(env_dir, ignore_errors=True)
                raise
            log(f"Python environment {digest} ready in {time.monotonic() - started:.1f}s")
            return self._env(digest, reused=False)

    def _env(self, digest: str, *, reused: bool) -> PythonEnv:
        env_dir = self.env_dir(digest)
        bin_dir = env_dir / "bin"
        return PythonEnv(
            python=str(bin_dir / "python"),
            env_vars={
                "VIRTUAL_ENV": str(env_dir),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            },
            digest=digest,
            reused=reused,
        )

    def _build(self, env_dir: Path, requirements: list[str], workspace_dir: Path | None, log) -> None:
        if env_dir.exists():
            log(f"removing the unfinished environment {env_dir} left by an interrupted build")
            shutil.rmtree(env_dir)
        try:
            subprocess.run(
                [self.base_python, "-m", "venv", "--without-pip", str(env_dir)],
                capture_output=True,
                text=True,
                check=True,
                timeout=VENV_TIMEOUT_SECONDS,
            )
        except subprocess.CalledProcessError as error:
            raise EnvironmentBuildError(
                f"{self.base_python} -m venv {env_dir} failed (exit {error.returncode}): {error.stderr.strip()}"
            ) from error
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EnvironmentBuildError(f"{self.base_python} -m venv {env_dir} failed: {error}") from error
        env_python = env_dir / "bin" / "python"
        purelib = subprocess.run(
            [str(env_python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        # Appended after the environment's own site-packages, so its packages win.
        layer_lines = [f"import site; site.addsitedir({directory!r})" for directory in self.base_info()["site_dirs"]]
        Path(purelib).mkdir(parents=True, exist_ok=True)
        (Path(purelib) / LAYER_PTH_NAME).write_text("\n".join(layer_lines) + "\n")

        requirements_file = env_dir / "fray-tpu-requirements.txt"
        requirements_file.write_text("\n".join(requirements) + "\n")
        pip_env = {key: value for key, value in os.environ.items() if key not in _REDIRECTING_PIP_VARS}
        pip_env.update(
            {
                "PIP_NO_INPUT": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_ROOT_USER_ACTION": "ignore",
                "VIRTUAL_ENV": str(env_dir),
            }
        )
        command = [
            str(env_python),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--progress-bar",
            "off",
            "--timeout",
            str(PIP_SOCKET_TIMEOUT_SECONDS),
            "--retries",
            str(PIP_RETRIES),
            "-r",
            str(requirements_file),
        ]
        cwd = Path(workspace_dir) if workspace_dir is not None else env_dir
        code, tail = _run_streaming(command, cwd=cwd, env=pip_env, timeout=self.pip_timeout, log=log)
        if code != 0:
            raise EnvironmentBuildError(
                f"pip could not install {', '.join(requirements)} into the job environment (exit code {code}); "
                f"check the names and versions in pip_packages/extras and the package index settings "
                f"(PIP_INDEX_URL, PIP_FIND_LINKS). Last lines of pip's output:\n" + "\n".join(tail)
            )
        marker = env_dir / COMPLETE_MARKER
        marker.with_suffix(".tmp").write_text(json.dumps({"requirements": requirements}))
        os.replace(marker.with_suffix(".tmp"), marker)
