"""uv on the VM: the static binary the controller staged beside the host bundle, as its own
content-addressed object.

The agent serves without it (only job environments need uv), so it is not on the boot's critical
path: ``python -m fray_tpu.worker`` starts fetching it in the background before it even imports
the agent (:func:`start`): a TPU VM has tens of cores, so the download and hash run beside the
agent's start instead of after it (on the emulator, where four VMs share two cores, that costs
the agent's start about what it saves the first environment). The first environment build waits
for that fetch. The bootstrap names the object, its pinned SHA-256 and where it goes
(``contract.UV_URL_ENV``, ``UV_SHA256_ENV``, ``STORAGE_ENDPOINT_ENV``, ``UV_ENV``); the file
appears under that path only once its hash matched, so a restarted agent or a rebooted VM finds
it and fetches nothing. Without a staged object (an inherit-controller host, a developer's
machine) ``UV_ENV`` or the usual search names uv as before.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from fray_tpu.contract import STORAGE_ENDPOINT_ENV, UV_ENV, UV_SHA256_ENV, UV_URL_ENV
from fray_tpu.uv_command import UvMissing

LOG = logging.getLogger(__name__)
FETCH_ATTEMPTS = 4


class UvFetch:
    def __init__(self, environ: Mapping[str, str]):
        self.url = environ.get(UV_URL_ENV, "").strip()
        self._sha256 = environ.get(UV_SHA256_ENV, "").strip()
        self._endpoint = environ.get(STORAGE_ENDPOINT_ENV, "").strip()
        self.path = Path(environ[UV_ENV]) if self.url else None
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Fetch in the background unless there is nothing to fetch (once)."""
        with self._lock:
            if self._started or self.path is None or self.path.exists():
                return
            self._started = True
        threading.Thread(target=self._prefetch, daemon=True, name="fetch-uv").start()

    def _prefetch(self) -> None:
        try:
            self.ensure()
        except UvMissing as error:
            LOG.warning("%s (the first job environment tries again)", error)

    def environ(self) -> dict[str, str]:
        """This process's environment, naming the fetched uv once it is here (fetching it if the
        background fetch has not)."""
        self.ensure()
        env = dict(os.environ)
        if self.path is not None:
            env[UV_ENV] = str(self.path)
        return env

    def ensure(self) -> None:
        if self.path is None:
            return
        with self._lock:
            if self.path.exists():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f"{self.path.name}.partial")
            from fray_tpu import gcsfetch  # on this thread: urllib is not imported on the way to serving

            try:
                got = gcsfetch.fetch(self._endpoint, self.url, str(partial), FETCH_ATTEMPTS)
            except (gcsfetch.FetchError, OSError) as error:
                partial.unlink(missing_ok=True)
                raise UvMissing(f"cannot fetch uv from {self.url}: {error}") from error
            if got != self._sha256:
                partial.unlink(missing_ok=True)
                raise UvMissing(f"SHA-256 mismatch for uv at {self.url}: expected {self._sha256} (pinned by the "
                                f"controller), got {got}; refusing to run it")
            partial.chmod(0o755)
            os.replace(partial, self.path)
            LOG.info("uv fetched from %s, SHA-256 verified", self.url)


_PROCESS: UvFetch | None = None
_PROCESS_LOCK = threading.Lock()


def for_process() -> UvFetch:
    """This process's fetch of uv (from its environment), started or not."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = UvFetch(os.environ)
        return _PROCESS


def start() -> None:
    for_process().start()
