"""One emulated VM's metadata server: the GCE `computeMetadata/v1` tree over HTTP on its own IP.

Answers like the real server: requires ``Metadata-Flavor: Google`` (403 without it), replies
carry it, directories list their entries (JSON with ``?recursive=true``), ``?wait_for_change=true``
long-polls a value until it changes or ``timeout_sec`` passes, and guest attributes are written
with PUT under ``instance/guest-attributes/<namespace>/<key>``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

LOG = logging.getLogger(__name__)
PREFIX = "/computeMetadata/v1/"
DEFAULT_WAIT_SECONDS = 300.0
MAX_WAIT_SECONDS = 3600.0
REQUEST_READ_TIMEOUT = 30.0

Tree = dict[str, "Tree | str | Callable[[], Tree | str]"]


# A VM's access token names its service account, so that the emulated APIs know the caller
# (Google's tokens are opaque, but Google knows whose they are).
TOKEN_PREFIX = "emulated-token"


def access_token_for(service_account: str) -> str:
    return f"{TOKEN_PREFIX}.{service_account}"


def principal_of(token: str) -> str | None:
    """The service account a VM's access token was issued for; None for any other token."""
    prefix = f"{TOKEN_PREFIX}."
    return token[len(prefix):] if token.startswith(prefix) else None


def _etag(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class HostMetadata:
    """The metadata values of one VM; ``preempted`` and guest attributes change over time."""

    def __init__(self, attributes: dict[str, str], instance: dict[str, str], project: dict[str, str]):
        self._changed = threading.Condition()
        self._preempted = False
        self._guest: dict[str, dict[str, str]] = {}
        self._closed = False
        instance = dict(instance)
        service_account = instance.pop("service-account", "default")
        self._tree: Tree = {
            "instance": {
                **instance,
                "attributes": dict(attributes),
                "preempted": lambda: "TRUE" if self._preempted else "FALSE",
                "maintenance-event": "NONE",
                "guest-attributes": lambda: {ns: dict(keys) for ns, keys in self._guest.items()},
                "service-accounts": {
                    "default": {
                        "aliases": "default",
                        "email": service_account,
                        "scopes": "https://www.googleapis.com/auth/cloud-platform",
                        "token": lambda: json.dumps(
                            {"access_token": access_token_for(service_account),
                             "expires_in": 3599, "token_type": "Bearer"}
                        ),
                    }
                },
            },
            "project": {**project, "attributes": {}},
        }

    @property
    def preempted(self) -> bool:
        return self._preempted

    def set_preempted(self, value: bool) -> None:
        with self._changed:
            self._preempted = value
            self._changed.notify_all()

    def put_guest_attribute(self, namespace: str, key: str, value: str) -> None:
        with self._changed:
            self._guest.setdefault(namespace, {})[key] = value
            self._changed.notify_all()

    def guest_attributes(self) -> dict[str, dict[str, str]]:
        with self._changed:
            return {ns: dict(keys) for ns, keys in self._guest.items()}

    def close(self) -> None:
        """Wake every long-poll so its connection ends with the VM."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def lookup(self, path: str) -> "Tree | str | None":
        """The subtree or value at ``path`` (relative to computeMetadata/v1/), None if absent."""
        node: Tree | str = self._tree
        for part in [p for p in path.split("/") if p]:
            if callable(node):
                node = node()
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node() if callable(node) else node

    def wait_for_change(self, path: str, render: Callable[[object], str], last_etag: str | None, timeout: float):
        """The value at ``path`` once its etag differs from ``last_etag`` (or the current one), or
        the unchanged value after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            value = self.lookup(path)
            baseline = last_etag or _etag(render(value))
            while value is not None and _etag(render(value)) == baseline and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
                value = self.lookup(path)
            return value


def _render(value, recursive: bool) -> tuple[str, str]:
    """(body, content type) of a value or directory."""
    if isinstance(value, dict):
        if recursive:
            return json.dumps(_resolved(value)), "application/json"
        return "".join(f"{k}/\n" if isinstance(v, dict) else f"{k}\n" for k, v in _resolved(value).items()), "application/text"
    return str(value), "application/text"


def _resolved(tree: Tree) -> dict:
    out = {}
    for key, value in tree.items():
        value = value() if callable(value) else value
        out[key] = _resolved(value) if isinstance(value, dict) else value
    return out


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "Metadata Server for VM"
    sys_version = ""
    timeout = REQUEST_READ_TIMEOUT
    server: HostMetadata  # the VM's metadata stands where socketserver puts its server

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        LOG.debug("metadata %s: " + format, self.client_address, *args)

    def _reply(self, status: int, body: str, content_type: str = "application/text", etag: str | None = None):
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(data)

    def _allowed(self) -> bool:
        if self.headers.get("Metadata-Flavor") != "Google" or self.headers.get("X-Forwarded-For"):
            self._reply(403, "Missing required header: Metadata-Flavor: Google\n", "text/html")
            return False
        return True

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("", "/"):
            # google-auth's GCE probe: any answer with the flavor header means "on GCE".
            self._reply(200, "computeMetadata/\n")
            return
        if not self._allowed():
            return
        if not url.path.startswith(PREFIX) and url.path != PREFIX.rstrip("/"):
            self._reply(404, "Not Found\n", "text/html")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        relative = url.path[len(PREFIX):]
        recursive = query.get("recursive", "").lower() == "true"
        if query.get("wait_for_change", "").lower() == "true":
            timeout = min(float(query.get("timeout_sec", DEFAULT_WAIT_SECONDS)), MAX_WAIT_SECONDS)
            value = self.server.wait_for_change(
                relative, lambda v: _render(v, recursive)[0], query.get("last_etag"), timeout
            )
        else:
            value = self.server.lookup(relative)
        if value is None:
            self._reply(404, "Not Found\n", "text/html")
            return
        body, content_type = _render(value, recursive)
        self._reply(200, body, content_type, etag=_etag(body))

    def do_PUT(self):
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        parts = path[len(PREFIX):].strip("/").split("/") if path.startswith(PREFIX) else []
        if len(parts) != 4 or parts[:2] != ["instance", "guest-attributes"]:
            self._reply(404, "Guest attributes are written at instance/guest-attributes/<namespace>/<key>\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length).decode()
        self.server.put_guest_attribute(parts[2], parts[3], value)
        self._reply(200, "")


class MetadataServer:
    """Serves one HostMetadata on ``ip`` at an ephemeral port, one thread per connection."""

    def __init__(self, ip: str, metadata: HostMetadata):
        self.metadata = metadata
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((ip, 0))
        self._socket.listen(64)
        self.ip = ip
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"metadata-{ip}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                connection, client = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection, client), daemon=True).start()

    def _serve(self, connection: socket.socket, client) -> None:
        try:
            _MetadataHandler(connection, client, self.metadata)
        except (OSError, ValueError) as error:
            LOG.debug("metadata connection from %s ended: %s", client, error)
        finally:
            connection.close()

    def close(self) -> None:
        self.metadata.close()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._socket.close()
        self._thread.join(timeout=5)
