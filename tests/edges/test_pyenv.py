"""Job environments on a host: real venvs, real pip, wheels built here (no package index)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from fray_tpu.errors import ConfigError
from fray_tpu.worker.pyenv import EnvironmentBuildError, PythonEnv, PythonEnvStore, resolve_extras


def _make_wheel(wheelhouse: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    entries[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: fray-tpu-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, content in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(content.encode())}")
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(wheelhouse / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
        for path, content in entries.items():
            wheel.writestr(path, content)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    _make_wheel(wheelhouse, "fraytest-alpha", "1.0", {"fraytest_alpha/__init__.py": "NAME = 'alpha'\n"})
    _make_wheel(
        wheelhouse,
        "fraytest-beta",
        "2.0",
        {"fraytest_beta/__init__.py": "from fraytest_alpha import NAME as ALPHA\nNAME = 'beta'\n"},
        requires=("fraytest-alpha",),
    )
    # Ships a module the base interpreter also has (iniconfig, from pytest): the layer must win.
    _make_wheel(wheelhouse, "fraytest-shadow", "1.0", {"iniconfig/__init__.py": "SHADOWED_BY_JOB_ENV = True\n"})
    with pytest.MonkeyPatch.context() as patch:
        # The agent's own environment carries the package index settings; no registry here.
        patch.setenv("PIP_NO_INDEX", "1")
        patch.setenv("PIP_FIND_LINKS", str(wheelhouse))
        yield PythonEnvStore(tmp_path_factory.mktemp("envs"), base_python=sys.executable)


def _run_in(env: PythonEnv, code: str, cwd: Path | None = None) -> dict:
    result = subprocess.run(
        [env.python, "-c", code],
        env={**os.environ, **env.env_vars},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_nothing_requested_is_the_base_interpreter_at_once(store: PythonEnvStore) -> None:
    lines: list[str] = []
    env = store.ensure([], [], None, lines.append)
    assert env == PythonEnv(python=sys.executable, env_vars={}, digest="base", reused=True)
    assert lines == []


def test_packages_install_into_a_layered_env_that_is_reused(store: PythonEnvStore) -> None:
    lines: list[str] = []
    env = store.ensure(["fraytest-alpha", "fraytest-shadow"], [], None, lines.append)
    assert env.reused is False
    assert env.python != sys.executable
    assert any("Successfully installed" in line for line in lines), lines

    seen = _run_in(
        env,
        "import json, importlib.util, fraytest_alpha, iniconfig, fray_tpu, cloudpickle\n"
        "print(json.dumps({'alpha': fraytest_alpha.NAME, 'fray_tpu': fray_tpu.__version__,\n"
        " 'shadowed': getattr(iniconfig, 'SHADOWED_BY_JOB_ENV', False), 'iniconfig': iniconfig.__file__,\n"
        " 'cloudpickle': cloudpickle.__file__, 'jax': importlib.util.find_spec('jax') is not None}))",
    )
    assert seen["alpha"] == "alpha"
    assert seen["fray_tpu"]
    assert seen["jax"] is True
    assert seen["shadowed"] is True and seen["iniconfig"].startswith(env.env_vars["VIRTUAL_ENV"])
    assert not seen["cloudpickle"].startswith(env.env_vars["VIRTUAL_ENV"])  # from the base, not reinstalled
    # The base interpreter is untouched by the job's environment.
    base = subprocess.run(
        [sys.executable, "-c", "import iniconfig; print(hasattr(iniconfig, 'SHADOWED_BY_JOB_ENV'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert base.stdout.strip() == "False"

    started = time.monotonic()
    again_lines: list[str] = []
    again = store.ensure(["fraytest-shadow", "fraytest-alpha"], [], None, again_lines.append)
    assert again.reused is True
    assert (again.python, again.digest) == (env.python, env.digest)
    assert time.monotonic() - started < 1.0
    assert again_lines == []


def _workspace(tmp_path: Path, pyproject: str) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "pyproject.toml").write_text(pyproject)
    return workspace


PYPROJECT = """
[project]
name = "ws_project"
version = "0.1"
dependencies = []

[project.optional-dependencies]
eval = ["fraytest-beta"]
tpu = []
all = ["ws-project[eval,tpu]"]
"""


def test_extras_come_from_the_workspace_pyproject(store: PythonEnvStore, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, PYPROJECT)
    assert resolve_extras(workspace, ["all"]) == ["fraytest-beta"]
    env = store.ensure([], ["all"], workspace, lambda line: None)
    assert env.reused is False
    seen = _run_in(env, "import json, fraytest_beta; print(json.dumps([fraytest_beta.NAME, fraytest_beta.ALPHA]))")
    assert seen == ["beta", "alpha"]  # the dependency came along from the find-links directory


def test_unknown_extra_or_missing_pyproject_is_a_clear_error(store: PythonEnvStore, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, PYPROJECT)
    with pytest.raises(ConfigError, match=r"extra 'gpu' is not in .*available: all, eval, tpu"):
        store.ensure([], ["gpu"], workspace, lambda line: None)
    with pytest.raises(ConfigError, match="no pyproject.toml"):
        store.ensure([], ["eval"], tmp_path, lambda line: None)
    with pytest.raises(ConfigError, match="need a workspace"):
        store.ensure([], ["eval"], None, lambda line: None)


def test_a_package_pip_cannot_find_fails_with_its_name_and_pips_output(store: PythonEnvStore) -> None:
    with pytest.raises(EnvironmentBuildError) as caught:
        store.ensure(["fraytest-missing==9.9"], [], None, lambda line: None)
    message = str(caught.value)
    assert "fraytest-missing==9.9" in message
    assert "No matching distribution" in message or "Could not find a version" in message
    digest = store.digest_for(["fraytest-missing==9.9"], [], None)
    assert not store.env_dir(digest).exists()  # nothing half-built is left to be reused


def test_an_interrupted_build_is_rebuilt_not_reused(store: PythonEnvStore) -> None:
    digest = store.digest_for(["fraytest-beta==2.0"], [], None)
    leftover = store.env_dir(digest)
    (leftover / "bin").mkdir(parents=True)
    (leftover / "bin" / "python").write_text("not an interpreter")
    lines: list[str] = []
    env = store.ensure(["fraytest-beta==2.0"], [], None, lines.append)
    assert env.reused is False
    assert any("interrupted build" in line for line in lines)
    assert _run_in(env, "import json, fraytest_beta; print(json.dumps(fraytest_beta.NAME))") == "beta"


def test_concurrent_ensures_build_once(store: PythonEnvStore) -> None:
    results: list[PythonEnv] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.ensure(["fraytest-alpha==1.0"], [], None, lambda _: None)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 3
    assert sorted(env.reused for env in results) == [False, True, True]
    assert len({env.python for env in results}) == 1
