"""The startup-script, rendered and actually run with bash: install step, settings, restart loop."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fray_tpu.bootstrap import (
    AGENT_EXIT_STOP,
    LOG_PREFIX,
    BootstrapSpec,
    fray_tpu_version,
    render_startup_script,
)
from fray_tpu.errors import ConfigError

FAKE_AGENT = """
import json, os, signal, sys, time
from pathlib import Path

state = Path(os.environ["FRAY_TPU_AGENT_STATE_DIR"])
runs = state / "runs.jsonl"
previous = len(runs.read_text().splitlines()) if runs.exists() else 0
with runs.open("a") as out:
    out.write(json.dumps({
        "argv": sys.argv[1:],
        "run": os.environ.get("FRAY_TPU_AGENT_RUN"),
        "tricky": os.environ.get("TRICKY"),
        "version": os.environ.get("FRAY_TPU_VERSION"),
        "agent_state_dir": os.environ.get("FRAY_TPU_AGENT_STATE_DIR"),
    }) + "\\n")
print(f"fake agent run {previous + 1}", flush=True)
mode = os.environ["FAKE_AGENT_MODE"]
if mode == "stop":
    sys.exit(int(os.environ["STOP_CODE"]))
if mode == "crash-then-stop":
    sys.exit(3 if previous == 0 else int(os.environ["STOP_CODE"]))
if mode == "serve":
    (state / "agent.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        signal.pause()
sys.exit(9)
"""

TRICKY = "it's \"quoted\" $(touch /tmp/fray-tpu-pwned) `id` $HOME\nsecond line\nFRAY_TPU_ENV"


@pytest.fixture
def host(tmp_path: Path) -> dict:
    """A directory standing in for one VM: the fake agent module and a process environment."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "fake_agent.py").write_text(FAKE_AGENT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(modules), env.get("PYTHONPATH")]))
    env["FRAY_TPU_AGENT_STATE_DIR"] = str(tmp_path / "state")
    return {"dir": tmp_path, "env": env}


def _script(tmp_path: Path, spec: BootstrapSpec, name: str = "startup.sh") -> Path:
    path = tmp_path / name
    path.write_text(render_startup_script(spec))
    return path


def _spec(**overrides) -> BootstrapSpec:
    values = {
        "fray_tpu_version": fray_tpu_version(),
        "python": sys.executable,
        "agent_module": "fake_agent",
        "env": {"FAKE_AGENT_MODE": "crash-then-stop", "STOP_CODE": str(AGENT_EXIT_STOP), "TRICKY": TRICKY},
        "agent_args": ("--port", "8477", "a b", "$(id)"),
    }
    values.update(overrides)
    return BootstrapSpec(**values)


def _runs(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "runs.jsonl").read_text().splitlines()]


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    for spec in (_spec(), _spec(wheel_url="https://example.invalid/fray_tpu-0.1.0-py3-none-any.whl", agent_args=())):
        script = _script(tmp_path, spec)
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


def test_emulator_host_skips_install_restarts_a_crash_and_stops_for_good(host: dict) -> None:
    script = _script(host["dir"], _spec())
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(script)], cwd=host["dir"], env=host["env"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    ours = [line for line in lines if not line.startswith("fake agent run")]
    assert ours and all(line.startswith(LOG_PREFIX + " ") for line in ours), lines
    assert [line for line in lines if line.startswith("fake agent run")] == ["fake agent run 1", "fake agent run 2"]
    text = result.stdout
    assert "already importable" in text and "skipping installation" in text
    assert "installing" not in text
    assert "agent exited with code 3 after" in text and "restarting in 1s" in text
    assert f"agent exited with code {AGENT_EXIT_STOP} (stop for good)" in text
    assert text.count("starting the agent") == 2
    assert time.monotonic() - started >= 1.0  # the backoff was honoured

    state = Path(host["env"]["FRAY_TPU_AGENT_STATE_DIR"])
    runs = _runs(state)
    assert [run["run"] for run in runs] == ["1", "2"]
    assert runs[0]["argv"] == ["--port", "8477", "a b", "$(id)"]
    assert runs[0]["tricky"] == TRICKY  # survived the env file verbatim
    assert runs[0]["version"] == fray_tpu_version()
    env_file = state / "agent.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "FAKE_AGENT_MODE=crash-then-stop" in env_file.read_text()
    assert not Path("/tmp/fray-tpu-pwned").exists()


def test_emulated_hosts_keep_state_in_their_own_host_directory(host: dict) -> None:
    env = dict(host["env"])
    del env["FRAY_TPU_AGENT_STATE_DIR"]
    spec = _spec(env={"FAKE_AGENT_MODE": "stop", "STOP_CODE": str(AGENT_EXIT_STOP)})
    script = _script(host["dir"], spec)
    for worker in (0, 1):  # two hosts of one slice, same filesystem, both must run their agent
        host_dir = host["dir"] / f"worker-{worker}"
        host_dir.mkdir()
        env.update({"FRAY_TPU_EMULATED_HOST": "1", "FRAY_TPU_HOST_DIR": str(host_dir)})
        result = subprocess.run(["bash", str(script)], cwd=host_dir, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        state = host_dir / "fray-tpu-agent"
        assert _runs(state)[0]["agent_state_dir"] == str(state)


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for a fresh VM's python3: fray_tpu is missing until pip "installs" it.
record="$STUB_DIR/calls.log"
if [ "$1" = "--version" ]; then echo "Python ${STUB_VERSION:-3.11.9}"; exit 0; fi
if [ "$1" = "-c" ]; then
  case "$2" in *version_info*) [ "${STUB_VERSION:-3.11.9}" != "3.10.12" ]; exit $?;; esac
  [ -e "$STUB_DIR/installed" ] && exit 0
  exit 1
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  if [ "$3" = "--version" ]; then echo "pip 24.0 (stub)"; exit 0; fi
  echo "pip $*" >>"$record"
  if [ "$(grep -c '^pip' "$record")" -le "${STUB_FAILURES:-0}" ]; then
    echo "ERROR: simulated index outage"
    exit 1
  fi
  touch "$STUB_DIR/installed"
  echo "Successfully installed fray-tpu"
  exit 0
fi
echo "agent $*" >>"$record"
echo "stub agent running"
exit 75
"""


def _stub_host(host: dict, failures: int) -> Path:
    stub_dir = host["dir"] / "stub"
    (stub_dir / "bin").mkdir(parents=True)
    python = stub_dir / "bin" / "python3"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    host["env"]["PATH"] = f"{stub_dir / 'bin'}{os.pathsep}{host['env']['PATH']}"
    host["env"]["STUB_DIR"] = str(stub_dir)
    host["env"]["STUB_FAILURES"] = str(failures)
    return stub_dir


def test_fresh_vm_installs_the_exact_version_with_retries(host: dict) -> None:
    stub_dir = _stub_host(host, failures=1)
    spec = _spec(fray_tpu_version="9.9.9", python="python3", install_backoff_seconds=1, agent_args=("--x",))
    result = subprocess.run(
        ["bash", str(_script(host["dir"], spec))], cwd=host["dir"], env=host["env"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (stub_dir / "calls.log").read_text().splitlines()
    pip_calls = [call for call in calls if call.startswith("pip")]
    assert len(pip_calls) == 2 and all(call.endswith(" fray-tpu==9.9.9") for call in pip_calls)
    assert "--no-input" in pip_calls[0]
    assert calls[-1] == "agent -m fake_agent --x"
    assert f"{LOG_PREFIX} ERROR: simulated index outage" in result.stdout
    assert f"{LOG_PREFIX} retrying the install in 1s" in result.stdout
    assert f"{LOG_PREFIX} installed fray-tpu 9.9.9" in result.stdout
    assert all(line.startswith(LOG_PREFIX) for line in result.stdout.splitlines() if line != "stub agent running")


def test_wheel_url_is_installed_and_a_hopeless_install_gives_up(host: dict) -> None:
    stub_dir = _stub_host(host, failures=99)
    wheel = "file:///opt/wheels/fray_tpu-9.9.9-py3-none-any.whl"
    spec = _spec(fray_tpu_version="9.9.9", python="python3", wheel_url=wheel, install_attempts=1)
    result = subprocess.run(
        ["bash", str(_script(host["dir"], spec))], cwd=host["dir"], env=host["env"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    calls = (stub_dir / "calls.log").read_text().splitlines()
    assert len(calls) == 1 and calls[0].endswith(f" {wheel}")  # the wheel, not the index; no agent started
    assert f"{LOG_PREFIX} giving up installing {wheel} after 1 attempts" in result.stdout


def test_a_too_old_interpreter_is_named_instead_of_failing_in_pip(host: dict) -> None:
    stub_dir = _stub_host(host, failures=0)
    host["env"]["STUB_VERSION"] = "3.10.12"
    spec = _spec(fray_tpu_version="9.9.9", python="python3")
    result = subprocess.run(
        ["bash", str(_script(host["dir"], spec))], cwd=host["dir"], env=host["env"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "python3 is missing or older than Python 3.11 (Python 3.10.12)" in result.stdout
    assert "BootstrapSpec.python" in result.stdout
    assert not (stub_dir / "calls.log").exists()  # pip was never run


def _wait_for(path: Path, what: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({path})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_agent_without_restart_and_a_second_bootstrap_backs_off(host: dict) -> None:
    spec = _spec(env={"FAKE_AGENT_MODE": "serve", "STOP_CODE": "75", "TRICKY": "x"})
    script = _script(host["dir"], spec)
    first = subprocess.Popen(
        ["bash", str(script)], cwd=host["dir"], env=host["env"], stdout=subprocess.PIPE, text=True
    )
    try:
        state = Path(host["env"]["FRAY_TPU_AGENT_STATE_DIR"])
        agent_pid = int(_wait_for(state / "agent.pid", "the fake agent to start"))

        second = subprocess.run(
            ["bash", str(script)], cwd=host["dir"], env=host["env"], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 0
        assert "another fray-tpu bootstrap is already running" in second.stdout
        assert len(_runs(state)) == 1  # the second bootstrap started no agent

        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == 0
    assert "received SIGTERM" in out
    assert "agent exited with code 143 (signal 15)" in out and "not restarting" in out
    assert "restarting in" not in out
    assert not _alive(agent_pid)


def test_spec_rejects_values_that_cannot_be_rendered_safely() -> None:
    with pytest.raises(ConfigError, match="invalid variable names"):
        BootstrapSpec(fray_tpu_version="0.1.0", env={"BAD-NAME": "x"})
    with pytest.raises(ConfigError, match="dotted module name"):
        BootstrapSpec(fray_tpu_version="0.1.0", agent_module="fray_tpu.worker; rm -rf /")
    with pytest.raises(ConfigError, match="restart_backoff_max"):
        BootstrapSpec(fray_tpu_version="0.1.0", restart_backoff_max=0)
