"""Cloud Storage at the wire, the part host bundles travel through: the JSON API's media upload,
object metadata and media download, with bearer-token auth and buckets that must exist.

The controller uploads a bundle once; every VM downloads it over Private Google Access (here:
the storage server's loopback address). Objects live on disk under the emulator's root.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse
from pathlib import Path

EMULATED_BUCKET = "fray-tpu-emulated-staging"
_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
_BUCKET = re.compile(r"^/storage/v1/b/([^/]+)$")


def _error(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [{"message": message}]}}).encode()


class StorageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, root: Path, buckets: tuple[str, ...] = (EMULATED_BUCKET,)):
        super().__init__((host, 0), _Handler)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], dict] = {}
        self.buckets = set(buckets)
        self.counters = {"uploads": 0, "downloads": 0, "bytes_downloaded": 0}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="emulated-storage")

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def put(self, bucket: str, name: str, data: bytes) -> dict:
        digest = hashlib.sha256(f"{bucket}/{name}".encode()).hexdigest()
        path = self.root / digest
        path.write_bytes(data)
        with self.lock:
            generation = str(time.time_ns())
            resource = {
                "kind": "storage#object", "bucket": bucket, "name": name, "size": str(len(data)),
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(), "generation": generation,
                "id": f"{bucket}/{name}/{generation}", "contentType": "application/octet-stream",
            }
            self.objects[(bucket, name)] = {"resource": resource, "path": path}
            self.counters["uploads"] += 1
        return resource


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StorageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer ") and header[7:].strip():
            return True
        self._reply(401, _error(401, "Anonymous caller does not have storage.objects.get access; send a bearer token"))
        return False

    def _parsed(self) -> tuple[str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        return url.path, dict(urllib.parse.parse_qsl(url.query))

    def do_GET(self):  # noqa: N802 - http.server's naming
        path, query = self._parsed()
        if not self._authorized():
            return
        bucket_match = _BUCKET.match(path)
        if bucket_match:
            bucket = urllib.parse.unquote(bucket_match.group(1))
            if bucket not in self.server.buckets:
                return self._reply(404, _error(404, f"The specified bucket does not exist: {bucket}"))
            return self._reply(200, json.dumps({"kind": "storage#bucket", "name": bucket, "id": bucket}).encode())
        match = _OBJECT.match(path)
        if not match:
            return self._reply(404, _error(404, f"Not Found: {path}"))
        bucket, name = (urllib.parse.unquote(part) for part in match.groups())
        with self.server.lock:
            entry = self.server.objects.get((bucket, name))
        if entry is None:
            return self._reply(404, _error(404, f"No such object: {bucket}/{name}"))
        if query.get("alt") != "media":
            return self._reply(200, json.dumps(entry["resource"]).encode())
        size = entry["path"].stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.flush()
        with open(entry["path"], "rb") as f:
            self.connection.sendfile(f)  # in the kernel: 256 VMs' downloads do not hold the GIL
        with self.server.lock:
            self.server.counters["downloads"] += 1
            self.server.counters["bytes_downloaded"] += size

    def do_POST(self):  # noqa: N802 - http.server's naming
        path, query = self._parsed()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not self._authorized():
            return
        match = _UPLOAD.match(path)
        if not match or query.get("uploadType") != "media" or not query.get("name"):
            return self._reply(400, _error(400, "only uploadType=media uploads with a name are emulated"))
        bucket = urllib.parse.unquote(match.group(1))
        if bucket not in self.server.buckets:
            return self._reply(404, _error(404, f"The specified bucket does not exist: {bucket}"))
        resource = self.server.put(bucket, query["name"], body)
        self._reply(200, json.dumps(resource).encode())
