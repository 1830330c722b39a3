"""The package index the tests' hosts install from, and the interpreters uv finds on them.

The wheelhouse is filled with ``pip download`` from the real registry when the session starts
(before the network guard goes up), under ``.cache/wheelhouse`` of the checkout or
``$FRAY_TPU_WHEELHOUSE_CACHE``, once: later sessions find its stamp and download nothing. Each
test session then serves it on loopback as a PEP 503 simple index.

uv on a real VM downloads the job's Python (or takes it from a mirror). An emulated host must
not download anything, so the interpreters of this machine's pyenv stand in for uv's downloads:
their directories are the agent's ``FRAY_TPU_PYTHON_DIRS`` and downloads are off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fray_tpu.emulator.images import python_stand_ins as stand_in_python_dirs
from fray_tpu.package_index import LoopbackIndex, fill_wheelhouse, pinned_like_this_interpreter
from fray_tpu.uv_command import find_uv

CHECKOUT = Path(__file__).resolve().parent.parent
# Two versions of six and of iniconfig, so a lock can pin one that is not the newest.
TEST_WHEELS = ("six==1.16.0", "six==1.17.0", "iniconfig==1.1.1", "iniconfig==2.0.0", "tomli==2.0.1",
               "cloudpickle==3.1.1")
NEWEST_SIX = "1.17.0"
LOCKED_SIX = "1.16.0"
# A uv project with extras, one referring to the others through the project's own name.
PYPROJECT = """
[project]
name = "ws_project"
version = "0.1"
requires-python = ">=3.11"
dependencies = ["six"]

[project.optional-dependencies]
eval = ["iniconfig"]
tpu = []
all = ["ws-project[eval,tpu]"]
"""


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("FRAY_TPU_WHEELHOUSE_CACHE") or CHECKOUT / ".cache" / "wheelhouse") / "tests"


def fill_test_wheelhouse() -> Path:
    return fill_wheelhouse(wheelhouse_dir(), TEST_WHEELS)


# What end-to-end jobs that run JAX on the hosts install there, from their own index: jax and
# jaxlib at the controller's versions (what a test pickles here loads there), and requests, which
# JAX's Cloud TPU detection imports to read the metadata server (jax[tpu] brings it on real TPU
# VMs; plain jax does not). Faithful hosts have nothing else; the staging bucket's environment
# archives keep this cheap after the session's first build.
JAX_PACKAGES = tuple(pinned_like_this_interpreter("jax", "jaxlib", "requests"))
# What Client API tasks on the hosts need of the controller's packages: their actor links are gRPC,
# and an actor served on a host makes its TLS certificate with cryptography.
CLIENT_PACKAGES = tuple(pinned_like_this_interpreter("grpcio", "protobuf", "cryptography"))


def job_wheelhouse_dir() -> Path:
    """The wheels of the jobs' host-side packages, per controller Python (they hold binaries)."""
    return wheelhouse_dir().parent / f"jobs-{sys.version_info.major}.{sys.version_info.minor}"


def fill_job_wheelhouse() -> Path:
    return fill_wheelhouse(job_wheelhouse_dir(), [*JAX_PACKAGES, *CLIENT_PACKAGES])


def job_python_version() -> str:
    """A Python version other than the agent's, that a stand-in interpreter provides."""
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    for directory in stand_in_python_dirs():
        version = ".".join(Path(directory).parent.name.split(".")[:2])
        if version != own:
            return version
    raise RuntimeError(
        f"no local interpreter other than Python {own} under pyenv to stand in for uv's download; "
        f"install one (pyenv install 3.12) to run the job-environment tests"
    )


def uv_workspace(tmp_path: Path, pyproject: str = PYPROJECT) -> Path:
    """A workspace directory holding ``pyproject`` (no lock yet)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "pyproject.toml").write_text(pyproject)
    return workspace


def lock_workspace(workspace: Path, index_url: str, *pins: str, python: str | None = None) -> None:
    """``uv lock`` against the index for ``python`` (default ``job_python_version()``), holding
    back the packages named in ``pins`` (name==version)."""
    upgrade = [argument for pin in pins for argument in ("--upgrade-package", pin)]
    result = subprocess.run([find_uv(), "lock", "--default-index", index_url, "--python",
                             python or job_python_version(), *upgrade], cwd=workspace, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "UV_PYTHON_DOWNLOADS": "never",
                                 "PATH": os.pathsep.join([os.environ["FRAY_TPU_PYTHON_DIRS"], os.environ["PATH"]])})
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def package_index() -> Iterator[LoopbackIndex]:
    """The test wheelhouse as a simple index on 127.0.0.1."""
    with LoopbackIndex(wheelhouse_dir()) as index:
        yield index


@pytest.fixture(scope="session")
def job_package_index() -> Iterator[LoopbackIndex]:
    """The jobs' host-side packages (``JAX_PACKAGES``, ``CLIENT_PACKAGES`` and their dependencies)
    as an index on 127.0.0.1."""
    with LoopbackIndex(job_wheelhouse_dir()) as index:
        yield index


@pytest.fixture(scope="module")
def job_index_client(emulator_process, job_package_index):
    """A Client API controller on the emulator whose jobs' hosts install their packages (e.g.
    ``CLIENT_PACKAGES``: gRPC for actor links) from ``job_package_index``."""
    from fray_tpu.client import TpuClient
    from fray_tpu.config import TpuClusterConfig

    client = TpuClient(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                                        lease_period=30.0, capacity_deadline=60.0, keep_warm=0,
                                        index_url=job_package_index.url))
    yield client
    client.shutdown(wait=False)
