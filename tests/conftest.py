"""Session-wide safety: nothing leaves loopback, nothing probes the GCE metadata server."""

from __future__ import annotations

import http.server
import os
import sys
import tempfile
import threading
from pathlib import Path

import pytest

NETGUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(NETGUARD_DIR))

import loopback_guard  # noqa: E402

pytest.register_assert_rewrite("package_fixtures")
import package_fixtures  # noqa: E402

pytest_plugins = ["fake_gcp.fixtures", "package_fixtures"]

_netguard_log = Path(tempfile.mkdtemp(prefix="fray-tpu-netguard-")) / "violations.log"


class _NoMetadataHandler(http.server.BaseHTTPRequestHandler):
    """Stands where the GCE metadata server would be, so a stray probe stays on loopback."""

    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _start_fake_metadata() -> str:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoMetadataHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="fake-gce-metadata").start()
    return f"127.0.0.1:{server.server_address[1]}"


def _host_site() -> str:
    """The guard for emulated VMs: their images' interpreters load it (fray_tpu.emulator.images),
    since a host's clean environment inherits neither PYTHONPATH nor the log's variable."""
    site = Path(tempfile.mkdtemp(prefix="fray-tpu-host-site-"))
    (site / "loopback_guard.py").write_text((NETGUARD_DIR / "loopback_guard.py").read_text())
    (site / "sitecustomize.py").write_text(
        "import os\n"
        f"os.environ.setdefault({loopback_guard.LOG_ENV!r}, {str(_netguard_log)!r})\n"
        "import loopback_guard\n"
        "loopback_guard.install()\n"
    )
    return str(site)


def pytest_configure(config):
    # The downloads of a session, from the real registry, before the guard goes up (cached).
    package_fixtures.fill_test_wheelhouse()
    package_fixtures.fill_job_wheelhouse()
    loopback_guard.install()
    metadata = _start_fake_metadata()
    os.environ.update(
        {
            "FRAY_TPU_NETGUARD": "1",
            loopback_guard.LOG_ENV: str(_netguard_log),
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": metadata,
            "GCE_METADATA_IP": metadata,
            # Controllers journal into a directory of this session, never the user's own.
            "FRAY_TPU_STATE_DIR": tempfile.mkdtemp(prefix="fray-tpu-state-"),
            "XDG_STATE_HOME": tempfile.mkdtemp(prefix="fray-tpu-xdg-state-"),
            # No ambient credentials: code under test must inject its own.
            "GOOGLE_APPLICATION_CREDENTIALS": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(NETGUARD_DIR), os.environ.get("PYTHONPATH")])),
            "FRAY_TPU_EMULATOR_HOST_SITE": _host_site(),
            # Host bundles are built from the wheels ./dev setup fetched (no index in tests).
            "FRAY_TPU_HOST_WHEELHOUSE": str(Path(__file__).parent.parent / ".venv" / "host-wheels"),
            # Emulated hosts' uv finds the local stand-ins for its interpreter downloads, and downloads none.
            "FRAY_TPU_PYTHON_DIRS": os.pathsep.join(package_fixtures.stand_in_python_dirs()),
            "FRAY_TPU_PYTHON_DOWNLOADS": "never",
            # uv is no Python process the guard can watch: one not told an index fails on loopback.
            "UV_DEFAULT_INDEX": "http://127.0.0.1:9/no-index-configured/simple/",
        }
    )


def pytest_sessionfinish(session, exitstatus):
    if _netguard_log.exists() and _netguard_log.read_text().strip():
        violations = _netguard_log.read_text()
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"NETWORK GUARD VIOLATIONS:\n{violations}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def netguard_log() -> Path:
    return _netguard_log
