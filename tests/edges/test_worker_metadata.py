"""The agent's metadata client and preemption watcher against the worker-host harness's metadata server."""

from __future__ import annotations

import threading

import pytest

from fray_tpu.worker import metadata as md
from worker_host import FakeMetadata


@pytest.fixture
def metadata_server():
    server = FakeMetadata("127.0.0.1", {"answer": "42"}, "vm-0")
    yield server
    server.close()


def test_metadata_client_reads_attributes_and_misses(metadata_server):
    client = md.MetadataClient(metadata_server.address)
    assert client.attribute("answer") == "42"
    assert client.attribute("absent") is None
    with pytest.raises(md.MetadataError, match="absent"):
        client.required_attribute("absent")


def test_metadata_client_names_an_unreachable_server():
    client = md.MetadataClient("127.0.0.1:9", timeout=0.5, attempts=2, backoff=0.01)
    with pytest.raises(md.MetadataError, match="127.0.0.1:9"):
        client.attribute("answer")


def test_preemption_watcher_latches_only_on_exactly_true(metadata_server):
    seen = threading.Event()
    watcher = md.PreemptionWatcher(md.MetadataClient(metadata_server.address), seen.set, poll_interval=0.05,
                                   wait_seconds=5)
    watcher.start()
    try:
        metadata_server.set_preempted("true")
        assert not seen.wait(0.3), "a lowercase 'true' must not count as preempted"
        metadata_server.set_preempted("TRUE")
        assert seen.wait(5), "the watcher did not report TRUE within 5 s"
        assert watcher.preempted
    finally:
        watcher.stop()


def test_metadata_client_reads_every_attribute_in_one_request():
    """attributes() asks the emulated VM metadata server for instance/attributes/ recursively: one
    request returns every attribute verbatim (keys as written, values as strings), as the GCE server does."""
    from fray_tpu.emulator.metadata import HostMetadata, MetadataServer

    metadata = HostMetadata({"worker-number": "3", "fray-tpu-job": "j", "empty": ""}, {"name": "vm-3"}, {})
    server = MetadataServer("127.0.0.1", metadata)
    try:
        client = md.MetadataClient(server.address)
        assert client.attributes() == {"worker-number": "3", "fray-tpu-job": "j", "empty": ""}
    finally:
        server.close()
