"""Fixtures the edge tests share."""

from __future__ import annotations

import pytest

from fray_tpu.emulator.storage import StorageServer


@pytest.fixture
def storage(tmp_path):
    """The emulated Cloud Storage JSON API on 127.0.0.1, its objects under ``tmp_path``."""
    server = StorageServer("127.0.0.1", tmp_path / "storage")
    server.start()
    yield server
    server.close()
