"""Loaded by every Python child process of the test session (via PYTHONPATH)."""

import os

if os.environ.get("FRAY_TPU_NETGUARD") == "1":
    import loopback_guard

    loopback_guard.install()
