"""Cloud Storage at the wire, the part host bundles and job environments travel through: the JSON
API's media and resumable uploads (with custom metadata), object metadata, media download and
deletion, generation preconditions, bearer-token auth and buckets that must exist.

The controller uploads a bundle once; every VM downloads it over Private Google Access (here:
the storage server's loopback address). Hosts upload the job environments they built with
``ifGenerationMatch=0`` (create only): as on Google, a precondition that does not hold is 412
``conditionNotMet`` and leaves the object as it was, checked when a resumable session starts and
again when its bytes complete it. A media download may name a ``generation``; one that is not the
object's current generation is 404, as on a bucket without versioning.

Objects live on disk under ``root`` (one data file per generation and its resource as JSON), so
a server started again on the same root serves the same bucket: the demo's emulated bucket
persists between runs like a real one.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import queue
import re
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

EMULATED_BUCKET = "fray-tpu-emulated-staging"
_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/(.+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
_BUCKET = re.compile(r"^/storage/v1/b/([^/]+)$")
_CHUNK = 4 << 20
_HASH_QUEUE_CHUNKS = 4
PRECONDITION_FAILED = "At least one of the pre-conditions you specified did not hold."


def _error(code: int, message: str, reason: str = "") -> bytes:
    detail = {"message": message, **({"reason": reason, "domain": "global"} if reason else {})}
    return json.dumps({"error": {"code": code, "message": message, "errors": [detail]}}).encode()


def _digest_chunks(md5: "hashlib._Hash", chunks: "queue.Queue[bytes | None]") -> None:
    while (chunk := chunks.get()) is not None:
        md5.update(chunk)


class PreconditionFailed(Exception):
    pass


class StorageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, root: Path, buckets: tuple[str, ...] = (EMULATED_BUCKET,)):
        super().__init__((host, 0), _Handler)
        self.root = Path(root)
        self._objects_dir = self.root / "objects"
        self._objects_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], dict] = {}
        self.sessions: dict[str, dict] = {}
        self.buckets = set(buckets)
        self.counters = {"uploads": 0, "downloads": 0, "bytes_downloaded": 0, "precondition_failures": 0}
        self._load()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="emulated-storage")

    def _load(self) -> None:
        """The objects a previous server on this root stored (each complete: its resource is
        written after its data)."""
        for resource_file in self._objects_dir.glob("*.json"):
            try:
                entry = json.loads(resource_file.read_text())
            except (OSError, ValueError):
                continue
            path = Path(entry["path"])
            if path.exists():
                resource = entry["resource"]
                self.objects[(resource["bucket"], resource["name"])] = {"resource": resource, "path": path}

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def _check(self, bucket: str, name: str, if_generation_match: str | None) -> None:
        """Called with the lock held."""
        if if_generation_match is None:
            return
        current = self.objects.get((bucket, name))
        generation = current["resource"]["generation"] if current else "0"
        if generation != str(if_generation_match):
            self.counters["precondition_failures"] += 1
            raise PreconditionFailed(PRECONDITION_FAILED)

    def put_file(self, bucket: str, name: str, data_file: Path, *, metadata: dict[str, str] | None = None,
                 if_generation_match: str | None = None, md5: "hashlib._Hash | None" = None) -> dict:
        """Make ``data_file`` (moved, not copied) the object's new generation; ``md5``: its
        digest, when it was taken while the file was written."""
        key = hashlib.sha256(f"{bucket}/{name}".encode()).hexdigest()
        if md5 is None:
            md5 = hashlib.md5()
            with open(data_file, "rb") as f:
                while chunk := f.read(_CHUNK):
                    md5.update(chunk)
        size = data_file.stat().st_size
        with self.lock:
            try:
                self._check(bucket, name, if_generation_match)
            except PreconditionFailed:
                data_file.unlink(missing_ok=True)
                raise
            generation = str(time.time_ns())
            path = self._objects_dir / f"{key}.{generation}"
            os.replace(data_file, path)
            resource = {
                "kind": "storage#object", "bucket": bucket, "name": name, "size": str(size),
                "md5Hash": base64.b64encode(md5.digest()).decode(), "generation": generation, "metageneration": "1",
                "id": f"{bucket}/{name}/{generation}", "contentType": "application/octet-stream",
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            }
            if metadata:
                resource["metadata"] = dict(metadata)
            previous = self.objects.get((bucket, name))
            self.objects[(bucket, name)] = {"resource": resource, "path": path}
            record = self._objects_dir / f"{key}.json"
            temporary = record.with_suffix(".json.tmp")
            temporary.write_text(json.dumps({"resource": resource, "path": str(path)}))
            os.replace(temporary, record)
            self.counters["uploads"] += 1
        if previous is not None:
            # A download of the old generation that already opened it reads on; new ones get 404.
            previous["path"].unlink(missing_ok=True)
        return resource

    def delete_object(self, bucket: str, name: str, if_generation_match: str | None = None) -> bool:
        """Delete the object's live generation (``objects.delete``); False when there is none."""
        key = hashlib.sha256(f"{bucket}/{name}".encode()).hexdigest()
        with self.lock:
            if (bucket, name) not in self.objects:
                return False
            self._check(bucket, name, if_generation_match)
            entry = self.objects.pop((bucket, name))
            (self._objects_dir / f"{key}.json").unlink(missing_ok=True)
        entry["path"].unlink(missing_ok=True)
        return True


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StorageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
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

    def _precondition_failed(self) -> None:
        self._reply(412, _error(412, PRECONDITION_FAILED, "conditionNotMet"))

    def _body_to_file(self, length: int) -> tuple[Path, "hashlib._Hash"]:
        """The request body in a file of its own, and its MD5, taken by a thread of its own while
        the body arrives (MD5 runs outside the GIL): the object is complete about when its last
        byte is written, as on Google, not one MD5 pass later."""
        md5 = hashlib.md5()
        chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=_HASH_QUEUE_CHUNKS)
        hasher = threading.Thread(target=_digest_chunks, args=(md5, chunks), daemon=True, name="upload-md5")
        hasher.start()
        try:
            with tempfile.NamedTemporaryFile(dir=self.server.root / "objects", delete=False, suffix=".upload") as f:
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    chunks.put(chunk)
                    f.write(chunk)
                    remaining -= len(chunk)
        finally:
            chunks.put(None)
            hasher.join()
        return Path(f.name), md5

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
            if entry is not None and query.get("generation") not in (None, entry["resource"]["generation"]):
                entry = None
            handle = None
            if entry is not None and query.get("alt") == "media":
                handle = open(entry["path"], "rb")  # noqa: SIM115 - closed below, after sending
        if entry is None:
            return self._reply(404, _error(404, f"No such object: {bucket}/{name}"))
        if handle is None:
            return self._reply(200, json.dumps(entry["resource"]).encode())
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("x-goog-generation", entry["resource"]["generation"])
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(handle)  # in the kernel: 256 VMs' downloads do not hold the GIL
        with self.server.lock:
            self.server.counters["downloads"] += 1
            self.server.counters["bytes_downloaded"] += size

    def do_DELETE(self):  # noqa: N802 - http.server's naming
        path, query = self._parsed()
        if not self._authorized():
            return
        match = _OBJECT.match(path)
        if not match:
            return self._reply(404, _error(404, f"Not Found: {path}"))
        bucket, name = (urllib.parse.unquote(part) for part in match.groups())
        if bucket not in self.server.buckets:
            return self._reply(404, _error(404, f"The specified bucket does not exist: {bucket}"))
        try:
            deleted = self.server.delete_object(bucket, name, query.get("ifGenerationMatch"))
        except PreconditionFailed:
            return self._precondition_failed()
        if not deleted:
            return self._reply(404, _error(404, f"No such object: {bucket}/{name}"))
        self._reply(204, b"")

    def do_POST(self):  # noqa: N802 - http.server's naming
        path, query = self._parsed()
        length = int(self.headers.get("Content-Length") or 0)
        if not self._authorized():
            self.rfile.read(length)
            return
        match = _UPLOAD.match(path)
        kind = query.get("uploadType")
        if not match or kind not in ("media", "resumable"):
            self.rfile.read(length)
            return self._reply(400, _error(400, "only uploadType=media and uploadType=resumable uploads are emulated"))
        bucket = urllib.parse.unquote(match.group(1))
        if bucket not in self.server.buckets:
            self.rfile.read(length)
            return self._reply(404, _error(404, f"The specified bucket does not exist: {bucket}"))
        condition = query.get("ifGenerationMatch")
        if kind == "media":
            if not query.get("name"):
                self.rfile.read(length)
                return self._reply(400, _error(400, "a media upload needs a name"))
            data_file, md5 = self._body_to_file(length)
            try:
                resource = self.server.put_file(bucket, query["name"], data_file, if_generation_match=condition,
                                                md5=md5)
            except PreconditionFailed:
                return self._precondition_failed()
            return self._reply(200, json.dumps(resource).encode())
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self._reply(400, _error(400, "the resumable upload's metadata is not JSON"))
        name = query.get("name") or body.get("name")
        if not name:
            return self._reply(400, _error(400, "a resumable upload needs a name"))
        with self.server.lock:
            try:
                self.server._check(bucket, name, condition)
            except PreconditionFailed:
                return self._precondition_failed()
            upload_id = uuid.uuid4().hex
            self.server.sessions[upload_id] = {"bucket": bucket, "name": name, "condition": condition,
                                               "metadata": body.get("metadata") or {}}
        location = f"{self.server.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
        self._reply(200, b"", headers={"Location": location})

    def do_PUT(self):  # noqa: N802 - http.server's naming
        """A resumable session's bytes, all in one request (``Content-Range: bytes 0-N/N+1``)."""
        path, query = self._parsed()
        length = int(self.headers.get("Content-Length") or 0)
        with self.server.lock:
            session = self.server.sessions.get(query.get("upload_id", ""))
        if not _UPLOAD.match(path) or session is None:
            self.rfile.read(length)
            return self._reply(404, _error(404, "No such upload session"))
        data_file, md5 = self._body_to_file(length)
        with self.server.lock:
            self.server.sessions.pop(query["upload_id"], None)
        try:
            resource = self.server.put_file(session["bucket"], session["name"], data_file, metadata=session["metadata"],
                                            if_generation_match=session["condition"], md5=md5)
        except PreconditionFailed:
            return self._precondition_failed()
        self._reply(200, json.dumps(resource).encode())
