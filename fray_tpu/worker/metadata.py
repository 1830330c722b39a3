"""Client of the GCE metadata server as seen from a TPU VM (or an emulated host).

The agent reads its identity and the controller's settings from node metadata. The server is
`GCE_METADATA_HOST` (emulated hosts and tests point it at loopback), else
`metadata.google.internal`; every request sends `Metadata-Flavor: Google`, has a timeout and is
retried on connection errors and 5xx answers.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from fray_tpu.contract import (  # noqa: F401 - md.ATTR_* is how the agent names them
    ATTR_ACCELERATOR_TYPE,
    ATTR_AGENT_PORT,
    ATTR_API_ENDPOINT,
    ATTR_CONTROLLER,
    ATTR_FIRST_LEASE_SECONDS,
    ATTR_JOB,
    ATTR_LEASE_SECONDS,
    ATTR_TLS_LEAF_SECONDS,
    ATTR_NODE,
    ATTR_SECRET_SHA256,
    ATTR_SELF_DELETE,
    ATTR_STARTUP_SCRIPT,
    ATTR_TPU_ENV,
    ATTR_WORKER_ENDPOINTS,
    ATTR_WORKER_NUMBER,
    DEFAULT_AGENT_PORT,
)

DEFAULT_METADATA_HOST = "metadata.google.internal"
PREEMPTED_PATH = "instance/preempted"
ZONE_PATH = "instance/zone"
INTERFACE_IP_PATH = "instance/network-interfaces/0/ip"
INTERFACE_NETWORK_PATH = "instance/network-interfaces/0/network"
ATTRIBUTES_DIR = "instance/attributes/"
_BASE = "/computeMetadata/v1/"


class MetadataError(RuntimeError):
    """The metadata server did not answer usably within the retries."""


@dataclass(frozen=True)
class MetadataValue:
    text: str
    etag: str | None


def metadata_host() -> str:
    return os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP") or DEFAULT_METADATA_HOST


class MetadataClient:
    def __init__(self, host: str | None = None, *, timeout: float = 3.0, attempts: int = 5, backoff: float = 0.2):
        self.host = host or metadata_host()
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff

    def get(self, path: str, *, wait_for_change: bool = False, last_etag: str | None = None,
            wait_seconds: int = 60, recursive: bool = False) -> MetadataValue | None:
        """The value at `path` (relative to computeMetadata/v1/), or None when it does not exist;
        ``recursive``: a directory's whole subtree as JSON."""
        query = {"recursive": "true", "alt": "json"} if recursive else {}
        timeout = self.timeout
        if wait_for_change:
            query.update({"wait_for_change": "true", "timeout_sec": str(wait_seconds)})
            if last_etag:
                query["last_etag"] = last_etag
            timeout = self.timeout + wait_seconds
        url = _BASE + quote(path) + (("?" + urlencode(query)) if query else "")
        last_problem = "no request made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, body, etag = self._request(url, timeout)
            except (OSError, http.client.HTTPException) as e:
                last_problem = f"{type(e).__name__}: {e}"
                continue
            if status == 200:
                return MetadataValue(body.decode("utf-8", errors="replace"), etag)
            if status == 404:
                return None
            last_problem = f"HTTP {status}: {body[:200]!r}"
            if status < 500 and status != 429:
                break
        raise MetadataError(
            f"metadata server {self.host} did not answer {path!r} after {self.attempts} tries "
            f"(last: {last_problem}); is GCE_METADATA_HOST right?"
        )

    def _request(self, url: str, timeout: float) -> tuple[int, bytes, str | None]:
        connection = http.client.HTTPConnection(self.host, timeout=timeout)
        try:
            connection.request("GET", url, headers={"Metadata-Flavor": "Google"})
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("ETag")
        finally:
            connection.close()

    def put_guest_attribute(self, namespace: str, key: str, value: str) -> None:
        """Publish ``namespace/key`` for the controller (the TPU API's GetGuestAttributes)."""
        url = f"{_BASE}instance/guest-attributes/{quote(namespace)}/{quote(key)}"
        last_problem = "no request made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            connection = http.client.HTTPConnection(self.host, timeout=self.timeout)
            try:
                connection.request("PUT", url, body=value.encode(), headers={"Metadata-Flavor": "Google"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                last_problem = f"{type(e).__name__}: {e}"
                continue
            finally:
                connection.close()
            if response.status == 200:
                return
            last_problem = f"HTTP {response.status}"
            if response.status < 500:
                break
        raise MetadataError(f"metadata server {self.host} did not store guest attribute {namespace}/{key} "
                            f"after {self.attempts} tries (last: {last_problem})")

    def attributes(self) -> dict[str, str]:
        """Every attribute of the node's metadata, in one request."""
        value = self.get(ATTRIBUTES_DIR, recursive=True)
        if value is None:
            return {}
        try:
            attributes = json.loads(value.text)
        except ValueError:
            attributes = None
        if not isinstance(attributes, dict):
            raise MetadataError(f"metadata server {self.host} answered {ATTRIBUTES_DIR}?recursive=true with "
                                f"{value.text[:200]!r}, not a JSON object of attributes")
        return {str(key): str(text) for key, text in attributes.items()}

    def attribute(self, name: str) -> str | None:
        value = self.get(f"instance/attributes/{name}")
        return None if value is None else value.text

    def required_attribute(self, name: str) -> str:
        value = self.attribute(name)
        if value is None or not value.strip():
            raise MetadataError(
                f"node metadata has no {name!r} attribute on {self.host}; the controller must set it "
                "when creating the node"
            )
        return value


def endpoint_ips(endpoints: str) -> list[str]:
    """Each worker's address, in worker order, from `worker-network-endpoints`: the IP of the older
    `host:uid:ip` entries, the hostname itself in the newer hostname-only format."""
    return [entry.rsplit(":", 1)[-1].strip() for entry in endpoints.split(",") if entry.strip()]


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_preempted(text: str) -> bool:
    # Latch only on exactly TRUE: the server answers FALSE (or nothing) otherwise.
    return text.strip() == "TRUE"


class PreemptionWatcher:
    """Watches `instance/preempted` and calls `on_preempted` once when it turns TRUE.

    Uses the server's wait_for_change when it answers with an ETag; otherwise polls.
    """

    def __init__(self, client: MetadataClient, on_preempted: Callable[[], None], *,
                 poll_interval: float = 1.0, wait_seconds: int = 30):
        self._client = client
        self._on_preempted = on_preempted
        self._poll_interval = poll_interval
        self._wait_seconds = wait_seconds
        self._stop = threading.Event()
        self.preempted = False
        self._thread = threading.Thread(target=self._run, name="preemption-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        etag: str | None = None
        while not self._stop.is_set():
            asked_at = time.monotonic()
            try:
                value = self._client.get(PREEMPTED_PATH, wait_for_change=etag is not None,
                                         last_etag=etag, wait_seconds=self._wait_seconds)
            except MetadataError:
                value = None
            if value is not None and is_preempted(value.text):
                self.preempted = True
                self._on_preempted()
                return
            new_etag = value.etag if value is not None else None
            # A server without ETags, or one that ignores wait_for_change, answers at once:
            # fall back to polling instead of spinning.
            answered_at_once = time.monotonic() - asked_at < self._poll_interval
            if new_etag is None or (new_etag == etag and answered_at_once):
                self._stop.wait(self._poll_interval)
            etag = new_etag
