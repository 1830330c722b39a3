"""The VM images emulated hosts boot: what the startup-script finds on a real TPU VM.

Google's script runner starts the startup-script with ``/bin/bash`` from a temporary file, in
systemd's environment: a minimal ``PATH``, no virtualenv, none of the caller's variables. On the
current TPU runtime images (``tpu-ubuntu2204-base``, ``v2-alpha-tpuv5-lite``, ``v2-alpha-tpuv6e``,
…) ``python3`` is Ubuntu 22.04's 3.10 with nothing of ours importable; the older ``tpu-vm-*``
images ship 3.8. No package index is reachable (no external IP by default).

Each profile is a directory that plays the image's ``/usr/bin``: links to this machine's system
tools (bash, curl, tar, coreutils, …) without any Python, pip or uv, plus ``python3`` from a bare
virtual environment of a pyenv interpreter of the profile's version (bare: it imports only the
standard library, whatever the base interpreter has installed). ``inherit-controller`` is the
old fast mode for edge tests: the host inherits the emulator's environment and interpreter.

The loopback-only guard of a test session reaches the hosts without inheritance: the emulator
copies the ``*.py`` files of ``FRAY_TPU_EMULATOR_HOST_SITE`` (a directory) into every image
interpreter's site-packages, as a machine image would carry a ``sitecustomize``. (A loopback-only
network namespace from ``unshare -n`` would cut the hosts off from the emulator's own loopback
servers, so it cannot be used here.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fray_tpu import contract

LOG = logging.getLogger(__name__)
DEFAULT_PROFILE = "ubuntu-22.04"
INHERIT_CONTROLLER = "inherit-controller"
HOST_SITE_ENV = "FRAY_TPU_EMULATOR_HOST_SITE"
# What systemd gives a service (and so Google's startup-script runner): the image's directory
# stands for all of these.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SYSTEM_BIN_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
# Not on a TPU image's PATH as this machine has them: interpreters, package managers, systemd.
_EXCLUDED_TOOL = re.compile(r"^(python|pip|pydoc|idle|2to3|pyenv|uv$|uvx$|systemctl$|systemd|conda|virtualenv)")
VENV_TIMEOUT_SECONDS = 120.0
# The hosts have no egress: a package index they were not told of is a closed loopback port
# (uv and pip fail at once, as they would after a timeout on a real VM).
NO_EGRESS_INDEX = "http://127.0.0.1:9/no-egress/simple/"
# The oldest interpreter that stands in for uv's Python downloads (what jobs run on).
OLDEST_STAND_IN = (3, 11)


@dataclass(frozen=True)
class ImageProfile:
    name: str
    python: str | None  # "3.10": python3 is a bare interpreter of that version; None: no python3
    description: str


PROFILES = {
    profile.name: profile
    for profile in (
        ImageProfile("ubuntu-22.04", "3.10", "current TPU runtime images (tpu-ubuntu2204-base, v2-alpha-*): Python 3.10"),
        ImageProfile("ubuntu-20.04", "3.8", "older tpu-vm-* runtime images: Python 3.8"),
        ImageProfile("ubuntu-24.04", "3.12", "a custom image with Ubuntu 24.04's Python 3.12"),
        ImageProfile("no-python3", None, "an image without python3"),
        ImageProfile(INHERIT_CONTROLLER, None, "edge tests only: the emulator's own environment and interpreter"),
    )
}


def profile_for_runtime(runtime_version: str) -> str:
    """The image a runtime version boots: ``tpu-vm-*`` are the 20.04 images, the rest 22.04."""
    return "ubuntu-20.04" if runtime_version.startswith("tpu-vm-") else DEFAULT_PROFILE


def check_profile(name: str) -> ImageProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown image profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def pyenv_interpreter(version: str) -> Path:
    """The newest pyenv interpreter of ``version`` (e.g. "3.10") on this machine."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates = sorted(
        (p for p in root.glob(f"{version}.*") if re.fullmatch(rf"{re.escape(version)}\.\d+", p.name)),
        key=lambda p: int(p.name.rsplit(".", 1)[1]),
    )
    for candidate in reversed(candidates):
        binary = candidate / "bin" / f"python{version}"
        if binary.exists():
            return binary
    raise FileNotFoundError(
        f"the emulated image needs a Python {version} interpreter and none is under {root}; "
        f"install one with `pyenv install {version}`"
    )


class ImageStore:
    """Builds each profile's directory once per emulator root, on first use. Thread-safe."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._built: dict[str, Path] = {}

    def prebuild(self, name: str) -> None:
        """Build ``name`` now: Google's images exist before any VM boots, so no VM waits for one
        (a failure here, e.g. no such interpreter, is raised again by the first VM's boot)."""
        try:
            self.bin_dir(name)
        except (OSError, subprocess.SubprocessError) as error:
            LOG.warning("could not build the %s image: %s", name, error)

    def bin_dir(self, name: str) -> Path:
        profile = check_profile(name)
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(profile)
            return self._built[name]

    def _build(self, profile: ImageProfile) -> Path:
        image = self.root / profile.name
        if profile.python is not None:
            subprocess.run([str(pyenv_interpreter(profile.python)), "-m", "venv", "--without-pip", str(image)],
                           check=True, capture_output=True, timeout=VENV_TIMEOUT_SECONDS)
            self._install_host_site(image)
        bin_dir = image / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for entry in (bin_dir / name for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1")):
            entry.unlink(missing_ok=True)
        for directory in _SYSTEM_BIN_DIRS:
            if not os.path.isdir(directory):
                continue
            for tool in os.scandir(directory):
                link = bin_dir / tool.name
                if _EXCLUDED_TOOL.match(tool.name) or link.exists() or link.is_symlink():
                    continue
                if os.access(tool.path, os.X_OK) and not tool.is_dir():
                    link.symlink_to(tool.path)
        if profile.python is not None:
            for alias in (bin_dir / "python", bin_dir / "python3"):
                if not alias.exists():
                    alias.symlink_to(f"python{profile.python}")
        return bin_dir

    @staticmethod
    def _install_host_site(image: Path) -> None:
        source = os.environ.get(HOST_SITE_ENV)
        if not source:
            return
        (site,) = image.glob("lib/python*/site-packages")
        for module in Path(source).glob("*.py"):
            shutil.copy(module, site / module.name)


def python_stand_ins() -> list[str]:
    """The bin directories of this machine's pyenv interpreters (3.11 and newer) that stand in
    for the interpreters uv would download for a job's Python."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = []
    for version in sorted(root.glob("3.*")) if root.is_dir() else ():
        parts = version.name.split(".")
        if (len(parts) == 3 and all(p.isdigit() for p in parts) and (int(parts[0]), int(parts[1])) >= OLDEST_STAND_IN
                and (version / "bin").is_dir()):
            found.append(str(version / "bin"))
    return found


def script_environment(bin_dir: Path | None, host_env: dict[str, str]) -> dict[str, str]:
    """The startup-script's environment: systemd's (``bin_dir`` stands for its PATH) plus what
    the emulator needs to place the VM (``host_env``: metadata server, host directory, token).
    ``bin_dir`` None inherits the emulator's environment (the ``inherit-controller`` mode).

    A faithful host reaches no package index, and uv on it downloads no interpreter: it finds
    the stand-ins (the emulator's ``FRAY_TPU_PYTHON_DIRS`` when set, else ``python_stand_ins``)."""
    if bin_dir is None:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), env.get("PATH")]))
        env[contract.EMULATOR_INHERITED_ENV] = "1"
    else:
        env = {"PATH": str(bin_dir), "LANG": "C.UTF-8", "HOME": host_env[contract.HOST_DIR_ENV],
               contract.PYTHON_DIRS_ENV: os.environ.get(contract.PYTHON_DIRS_ENV) or os.pathsep.join(python_stand_ins()),
               contract.PYTHON_DOWNLOADS_ENV: "never",
               "UV_DEFAULT_INDEX": NO_EGRESS_INDEX, "PIP_INDEX_URL": NO_EGRESS_INDEX}
    env.update(host_env)
    return env
