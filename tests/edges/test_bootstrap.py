"""The startup-script as rendered: valid bash, every value quoted, bad specs refused.

What it does on a VM (phases, failures, the service, reboots) is checked end to end on the
emulator's images in tests/e2e/test_host_boot.py.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from fray_tpu.bootstrap import BootstrapSpec, fray_tpu_version, render_startup_script
from fray_tpu.errors import ConfigError

SHA = "0" * 64
TRICKY = "it's \"quoted\" $(touch /tmp/fray-tpu-pwned) `id` $HOME\nsecond line"


def _spec(**overrides) -> BootstrapSpec:
    values = {"fray_tpu_version": fray_tpu_version(), "bundle_url": "gs://bucket/fray-tpu/x.tar",
              "bundle_sha256": SHA, "uv_url": "gs://bucket/fray-tpu/x.uv", "uv_sha256": SHA,
              "env": {"TRICKY": TRICKY}}
    values.update(overrides)
    return BootstrapSpec(**values)


def test_rendered_script_is_valid_bash_and_quotes_every_value(tmp_path: Path) -> None:
    """bash -n accepts the script; a hostile env value appears only shell-quoted."""
    script = tmp_path / "startup.sh"
    script.write_text(render_startup_script(_spec(agent_args=("--boot-timeout", "5"))))
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert f"BUNDLE_SHA256={SHA}" in text
    env_line = f"TRICKY={shlex.quote(TRICKY)}"
    assert shlex.quote(env_line) in text
    marker = Path("/tmp/fray-tpu-pwned")
    marker.unlink(missing_ok=True)
    sourced = subprocess.run(["bash", "-c", 'eval "$1"; printf %s "$TRICKY"', "_", env_line],
                             capture_output=True, text=True, timeout=30)
    assert sourced.stdout == TRICKY and not marker.exists()


def test_spec_rejects_values_that_cannot_be_rendered_safely() -> None:
    """Bad names, modules, URLs and hashes fail at once, naming the field."""
    with pytest.raises(ConfigError, match="invalid variable names"):
        _spec(env={"BAD-NAME": "x"})
    with pytest.raises(ConfigError, match="dotted module name"):
        _spec(agent_module="fray_tpu.worker; rm -rf /")
    with pytest.raises(ConfigError, match="restart_backoff_max"):
        _spec(restart_backoff_max=0)
    with pytest.raises(ConfigError, match="gs://bucket/object"):
        _spec(bundle_url="https://example.invalid/bundle")
    with pytest.raises(ConfigError, match="SHA-256"):
        _spec(bundle_sha256="abc")
    with pytest.raises(ConfigError, match="uv_url"):
        _spec(uv_url="uv")
