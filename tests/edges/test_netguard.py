"""The guard itself: a connection outside loopback fails, in this process and in children."""

import socket
import subprocess
import sys

import grpc
import pytest

import loopback_guard


@pytest.fixture
def clean_log(netguard_log):
    before = netguard_log.read_text() if netguard_log.exists() else ""
    yield
    # The violations provoked on purpose here must not fail the session.
    netguard_log.write_text(before)


def test_tcp_connect_outside_loopback_is_refused(clean_log):
    with socket.socket() as s:
        with pytest.raises(loopback_guard.NonLoopbackConnectionError, match="10.1.2.3"):
            s.connect(("10.1.2.3", 80))


def test_metadata_address_is_refused(clean_log):
    with pytest.raises(loopback_guard.NonLoopbackConnectionError):
        socket.create_connection(("169.254.169.254", 80), timeout=1)


def test_name_resolution_outside_loopback_is_refused(clean_log):
    with pytest.raises(loopback_guard.NonLoopbackConnectionError, match="metadata.google.internal"):
        socket.getaddrinfo("metadata.google.internal", 80)


def test_loopback_is_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


def test_grpc_channel_outside_loopback_is_refused(clean_log):
    with pytest.raises(loopback_guard.NonLoopbackConnectionError, match="tpu.googleapis.com"):
        grpc.insecure_channel("tpu.googleapis.com:443")
    grpc.insecure_channel("127.0.0.1:1").close()


def test_child_processes_are_guarded(clean_log, netguard_log):
    code = "import socket; socket.create_connection(('8.8.8.8', 53), timeout=1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "network guard: refused" in result.stderr and "8.8.8.8" in result.stderr
    assert "8.8.8.8" in netguard_log.read_text()


@pytest.mark.parametrize(
    "target, host",
    [("127.0.0.1:5", "127.0.0.1"), ("ipv4:127.0.0.9:5", "127.0.0.9"), ("[::1]:5", "::1"),
     ("dns:///tpu.googleapis.com:443", "tpu.googleapis.com"), ("unix:/tmp/x", None)],
)
def test_grpc_target_host(target, host):
    assert loopback_guard.grpc_target_host(target) == host
