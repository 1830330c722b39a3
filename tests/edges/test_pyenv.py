"""Job environments on a host: real uv, real wheels from the registry served on loopback as the index.

The job's Python is another version than the agent's; a local interpreter of that version stands
in for the one uv would download on a real VM (downloads are off: see tests/package_fixtures.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from package_fixtures import LOCKED_SIX, NEWEST_SIX, job_python_version, lock_workspace, uv_workspace

from fray_tpu.errors import ConfigError, EnvironmentBuildError
from fray_tpu.package_index import LoopbackIndex
from fray_tpu.worker.pyenv import EnvRequest, PythonEnv, PythonEnvStore, UvSettings, resolve_extras

JOB_PYTHON = job_python_version()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PythonEnvStore:
    return PythonEnvStore(tmp_path_factory.mktemp("envs"), UvSettings.from_environ())


def _request(package_index: LoopbackIndex, *packages: str, **fields) -> EnvRequest:
    return EnvRequest(pip_packages=packages, python_version=fields.pop("python_version", JOB_PYTHON),
                      index_url=package_index.url, **fields)


def _run_in(env: PythonEnv, code: str, cwd: Path | None = None) -> dict:
    """Run ``code`` in the environment, away from the checkout (whose fray_tpu would shadow the env's)."""
    result = subprocess.run([env.python, "-c", code], env={**os.environ, **env.env_vars}, cwd=cwd or env.env_vars["VIRTUAL_ENV"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


_INSPECT = (
    "import json, sys, importlib.util, importlib.metadata as m\n"
    "import fray_tpu.worker.runner, cloudpickle\n"
    "names = ['six', 'iniconfig', 'tomli', 'grpcio', 'pytest']\n"
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'fray_tpu': fray_tpu.__file__,\n"
    " 'versions': {n: (m.version(n) if importlib.util.find_spec(n.replace('grpcio', 'grpc')) else None)"
    " for n in names}}))"
)


def test_nothing_requested_on_the_agents_python_is_the_agents_interpreter(store, package_index) -> None:
    """No packages, no lock, the agent's own major.minor: the agent's interpreter, nothing built."""
    lines: list[str] = []
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = store.ensure(EnvRequest(python_version=own, index_url=package_index.url), lines.append)
    assert env == PythonEnv(python=sys.executable, env_vars={}, digest="base", source="base")
    assert lines == []


def test_packages_install_with_uv_on_the_jobs_python_and_the_env_is_reused(store, package_index) -> None:
    """The environment runs the job's Python (not the agent's), holds the requested packages,
    the runner's needs and fray-tpu, and none of the agent's other packages; a second request
    for the same content is reused without asking the index anything."""
    lines: list[str] = []
    env = store.ensure(_request(package_index, "six"), lines.append)
    assert env.reused is False and env.source == "built" and env.seconds > 0
    assert any("building Python environment" in line and f"Python {JOB_PYTHON}" in line for line in lines), lines
    seen = _run_in(env, _INSPECT)
    assert seen["python"] == JOB_PYTHON != f"{sys.version_info.major}.{sys.version_info.minor}"
    assert seen["versions"]["six"] == NEWEST_SIX
    assert seen["versions"]["grpcio"] is None and seen["versions"]["pytest"] is None  # the agent's stay out
    assert "runtime" in seen["fray_tpu"]

    requests_before = package_index.requests
    started = time.monotonic()
    again_lines: list[str] = []
    again = store.ensure(_request(package_index, "six"), again_lines.append)
    assert (again.reused, again.python, again.digest) == (True, env.python, env.digest)
    assert time.monotonic() - started < 1.0 and again_lines == []
    assert package_index.requests == requests_before


def test_the_digest_is_the_content(store, package_index, tmp_path) -> None:
    """Another Python or requirement is another environment; the order of packages is not, nor
    where the packages come from (the loopback index's random port, a mirror)."""
    base = store.digest_for(_request(package_index, "six", "tomli"))
    assert store.digest_for(_request(package_index, "tomli", "six")) == base
    assert store.digest_for(_request(package_index, "six")) != base
    assert store.digest_for(_request(package_index, "six", "tomli", python_version="3.13")) != base
    assert store.digest_for(EnvRequest(pip_packages=("six", "tomli"), python_version=JOB_PYTHON,
                                       index_url="http://127.0.0.1:1/simple/")) == base


def test_a_locked_workspace_gets_exactly_the_locked_versions_plus_extras_and_packages(
        store, package_index, tmp_path) -> None:
    """six is locked at 1.16.0 while the index's newest is 1.17.0: the environment has 1.16.0;
    the lock's extra brings iniconfig and pip_packages add tomli on top."""
    workspace = uv_workspace(tmp_path)
    lock_workspace(workspace, package_index.url, f"six=={LOCKED_SIX}")
    assert f'name = "six"\nversion = "{LOCKED_SIX}"' in (workspace / "uv.lock").read_text()
    assert (package_index.wheelhouse / f"six-{NEWEST_SIX}-py2.py3-none-any.whl").exists()
    lines: list[str] = []
    env = store.ensure(_request(package_index, "tomli", workspace_dir=workspace, extras=("eval",)), lines.append)
    assert any("uv.lock" in line for line in lines), lines
    versions = _run_in(env, _INSPECT, cwd=workspace)["versions"]
    assert versions["six"] == LOCKED_SIX
    assert versions["iniconfig"] == "2.0.0" and versions["tomli"] == "2.0.1"

    without_extra = store.ensure(_request(package_index, workspace_dir=workspace), lambda line: None)
    assert without_extra.digest != env.digest
    assert _run_in(without_extra, _INSPECT)["versions"]["iniconfig"] is None


def test_a_lock_made_against_one_index_installs_from_a_mirror(store, package_index, tmp_path) -> None:
    """A lock made against PyPI, a host that reaches only a mirror (an Artifact Registry remote):
    the mirror serves the same files, so the locked versions install, hashes checked."""
    workspace = uv_workspace(tmp_path)
    lock_workspace(workspace, package_index.url, f"six=={LOCKED_SIX}")
    # A host of its own: the module's store may hold this very environment (the digest is the
    # content, not the index), and then would ask no index at all.
    host = PythonEnvStore(tmp_path / "host", UvSettings.from_environ())
    with LoopbackIndex(package_index.wheelhouse) as mirror:
        env = host.ensure(EnvRequest(workspace_dir=workspace, python_version=JOB_PYTHON, index_url=mirror.url),
                          lambda line: None)
        assert mirror.requests > 0
    assert _run_in(env, _INSPECT)["versions"]["six"] == LOCKED_SIX


def test_extras_without_a_lock_come_from_the_workspace_pyproject(store, package_index, tmp_path) -> None:
    workspace = uv_workspace(tmp_path)
    assert resolve_extras(workspace, ["all"]) == ["iniconfig", "six"]
    env = store.ensure(_request(package_index, workspace_dir=workspace, extras=("all",)), lambda line: None)
    versions = _run_in(env, _INSPECT)["versions"]
    assert (versions["six"], versions["iniconfig"]) == (NEWEST_SIX, "2.0.0")


def test_unknown_extra_or_missing_pyproject_is_a_clear_error(store, package_index, tmp_path) -> None:
    workspace = uv_workspace(tmp_path)
    with pytest.raises(ConfigError, match=r"extra 'gpu' is not in .*available: all, eval, tpu"):
        store.ensure(_request(package_index, workspace_dir=workspace, extras=("gpu",)), lambda line: None)
    with pytest.raises(ConfigError, match="no pyproject.toml"):
        store.ensure(_request(package_index, workspace_dir=tmp_path, extras=("eval",)), lambda line: None)
    with pytest.raises(ConfigError, match="need a workspace"):
        store.ensure(_request(package_index, extras=("eval",)), lambda line: None)


def test_a_requirement_the_index_cannot_satisfy_fails_with_the_resolvers_message(store, package_index) -> None:
    request = _request(package_index, "six==99.0")
    with pytest.raises(EnvironmentBuildError) as caught:
        store.ensure(request, lambda line: None)
    assert "six==99.0" in str(caught.value) and "unsatisfiable" in str(caught.value)
    assert not store.env_dir(store.digest_for(request)).exists()  # nothing half-built is left to be reused


def test_a_python_uv_cannot_find_fails_with_uvs_message(store, package_index) -> None:
    request = _request(package_index, "six", python_version="3.15")
    with pytest.raises(EnvironmentBuildError, match=r"No interpreter found for Python 3.15"):
        store.ensure(request, lambda line: None)
    assert not store.env_dir(store.digest_for(request)).exists()


def test_an_interrupted_build_is_rebuilt_not_reused(store, package_index) -> None:
    request = _request(package_index, "tomli")
    leftover = store.env_dir(store.digest_for(request))
    (leftover / "bin").mkdir(parents=True)
    (leftover / "bin" / "python").write_text("not an interpreter")
    lines: list[str] = []
    env = store.ensure(request, lines.append)
    assert env.reused is False
    assert any("interrupted build" in line for line in lines)
    assert _run_in(env, _INSPECT)["versions"]["tomli"] == "2.0.1"


def test_concurrent_ensures_build_once(store, package_index) -> None:
    results: list[PythonEnv] = []
    request = _request(package_index, "iniconfig==1.1.1")
    threads = [threading.Thread(target=lambda: results.append(store.ensure(request, lambda _: None)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 3
    assert sorted(env.reused for env in results) == [False, True, True]
    assert len({env.python for env in results}) == 1
