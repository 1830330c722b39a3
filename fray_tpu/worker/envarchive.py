"""Job environments shared through the staging bucket (agent side): one archive per environment
content digest and host platform, ``gs://BUCKET/fray-tpu/envs/<digest>-<platform>.tar``.

A host that needs an environment it does not have looks for its archive before building it: it
downloads the archive, checks its SHA-256 against the one its uploader recorded in the object's
metadata (``sha256``), unpacks it and makes it this host's (the interpreter of this host, its own
paths). A host that built an environment uploads it with ``ifGenerationMatch=0``: of several
hosts racing, one creates the object and the others get 412 and keep what they built, so no
upload replaces another. An archive that fails its check is refused; the host builds instead
and replaces that very generation (``ifGenerationMatch=<it>``), so one bad object costs one
build, not one per host and job.

Environments are made with ``uv venv --relocatable``: scripts find their interpreter relative to
themselves. What stays host-specific is left out of the archive and made again on unpacking:
``bin/python`` (a link to the base interpreter) with ``pyvenv.cfg``, and the ``.pth`` naming the
agent's runtime directory.

The VM reaches Cloud Storage with its service account's token from the metadata server, as the
startup-script fetches the host bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fray_tpu.errors import FrayTpuError
from fray_tpu.worker.metadata import MetadataClient

OBJECT_PREFIX = "fray-tpu/envs"
MANIFEST_NAME = "fray-tpu-env.json"
SHA256_METADATA = "sha256"
STORAGE_TIMEOUT_SECONDS = 120.0
STORAGE_ATTEMPTS = 4
TOKEN_PATH = "instance/service-accounts/default/token"
UNPACK_TIMEOUT_SECONDS = 600.0
_CHUNK = 1 << 20
_DOWNLOAD_CHUNK = 8 << 20  # one buffer, reused: hundreds of MB without an allocation per chunk


class StorageError(FrayTpuError):
    pass


def host_platform() -> str:
    """What a built environment's binaries depend on besides Python: machine and C library,
    e.g. ``x86_64-glibc2.35``."""
    libc, version = platform.libc_ver()
    return f"{platform.machine()}-{libc or 'libc'}{version}"


@dataclass(frozen=True)
class EnvBucket:
    """Where a gang's hosts share environments, and this host's part: the ``builder`` builds at
    once when the archive is missing; the others wait up to ``wait_seconds`` for it to appear
    (or for the builder's failure report) and build themselves only then."""

    endpoint: str  # the Cloud Storage JSON API root
    bucket: str
    builder: bool = True
    wait_seconds: float = 0.0
    attempt_id: str = ""

    def object_name(self, digest: str) -> str:
        return f"{OBJECT_PREFIX}/{digest}-{host_platform()}.tar"

    def failure_name(self, digest: str) -> str:
        """Where this attempt's builder reports a build that failed (the waiters fail with it)."""
        return f"{self.object_name(digest)}.failed-{self.attempt_id}"

    def url(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"


class MetadataToken:
    """The VM's service-account access token, fetched again a minute before it expires."""

    def __init__(self, client: MetadataClient | None = None):
        self._client = client or MetadataClient()
        self._token = ""
        self._expires = 0.0

    def __call__(self) -> str:
        if time.monotonic() >= self._expires:
            value = self._client.get(TOKEN_PATH)
            if value is None:
                raise StorageError("the metadata server has no service-account token for this VM")
            answer = json.loads(value.text)
            self._token = answer["access_token"]
            self._expires = time.monotonic() + max(0.0, float(answer.get("expires_in", 300)) - 60)
        return self._token


class BucketObjects:
    """The few Cloud Storage JSON API calls environments need; transient failures (5xx, 429,
    connection errors) are retried, refusals are not."""

    def __init__(self, endpoint: str, bucket: str, token: Callable[[], str]):
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self._token = token

    def _object_url(self, name: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}"

    def _call(self, what: str, send: Callable[[], object]):
        last: Exception | None = None
        for attempt in range(STORAGE_ATTEMPTS):
            if attempt:
                time.sleep(min(2.0 ** attempt, 10.0))
            try:
                return send()
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code != 429:
                    raise
                last = error
            except OSError as error:
                last = error
        raise StorageError(f"Cloud Storage {what} failed {STORAGE_ATTEMPTS} times: {last}")

    def _open(self, request: urllib.request.Request):
        request.add_header("Authorization", f"Bearer {self._token()}")
        return urllib.request.urlopen(request, timeout=STORAGE_TIMEOUT_SECONDS)

    def _get(self, name: str, query: str, parse: Callable[[bytes], object]):
        """GET the object (its resource, or with ``?alt=media`` its data) parsed; None when there is none."""
        def send():
            with self._open(urllib.request.Request(self._object_url(name) + query)) as response:
                return parse(response.read())
        try:
            return self._call(f"GET {name}", send)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise StorageError(f"Cloud Storage refused reading gs://{self.bucket}/{name}: HTTP {error.code}") from None

    def stat(self, name: str) -> dict | None:
        """The object's resource, or None when there is none."""
        return self._get(name, "", json.loads)

    def download(self, name: str, generation: str, dest: Path) -> str:
        """Write that generation of the object to ``dest``; returns its SHA-256. None-such
        (replaced meanwhile) raises StorageError."""
        def send():
            digest = hashlib.sha256()
            query = urllib.parse.urlencode({"alt": "media", "generation": generation})
            buffer = bytearray(_DOWNLOAD_CHUNK)
            view = memoryview(buffer)
            with self._open(urllib.request.Request(f"{self._object_url(name)}?{query}")) as response, \
                    open(dest, "wb", buffering=0) as out:
                while count := response.readinto(buffer):
                    digest.update(view[:count])
                    out.write(view[:count])
            return digest.hexdigest()
        try:
            return self._call(f"download of {name}", send)
        except urllib.error.HTTPError as error:
            raise StorageError(f"Cloud Storage refused downloading gs://{self.bucket}/{name} (generation "
                               f"{generation}): HTTP {error.code}") from None

    def upload(self, name: str, path: Path, metadata: dict[str, str], if_generation_match: str) -> dict | None:
        """A resumable upload of ``path`` that only succeeds if the object's generation is
        ``if_generation_match`` ("0": there is none); None when that precondition failed (412)."""
        size = path.stat().st_size

        def send():
            query = urllib.parse.urlencode({"uploadType": "resumable", "name": name,
                                            "ifGenerationMatch": if_generation_match})
            start = urllib.request.Request(
                f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?{query}", method="POST",
                data=json.dumps({"name": name, "metadata": metadata}).encode(),
                headers={"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Length": str(size)})
            with self._open(start) as response:
                session = response.headers["Location"]
            with open(path, "rb") as data:
                put = urllib.request.Request(session, method="PUT", data=data, headers={
                    "Content-Length": str(size), "Content-Type": "application/x-tar",
                    "Content-Range": f"bytes 0-{size - 1}/{size}" if size else "bytes */0"})
                with urllib.request.urlopen(put, timeout=STORAGE_TIMEOUT_SECONDS) as response:
                    return json.loads(response.read())
        try:
            return self._call(f"upload of {name}", send)
        except urllib.error.HTTPError as error:
            if error.code == 412:
                return None
            raise StorageError(f"Cloud Storage refused uploading gs://{self.bucket}/{name}: HTTP {error.code} "
                               f"{error.read()[:200].decode(errors='replace')}") from None

    def put_text(self, name: str, text: str) -> None:
        """A small create-only object (a failure report); an existing one is left as it is."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name, "ifGenerationMatch": "0"})
        request = urllib.request.Request(f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?{query}",
                                         method="POST", data=text.encode(), headers={"Content-Type": "text/plain"})

        def send():
            with self._open(request) as response:
                response.read()
        try:
            self._call(f"upload of {name}", send)
        except urllib.error.HTTPError as error:
            if error.code != 412:
                raise StorageError(f"Cloud Storage refused uploading gs://{self.bucket}/{name}: "
                                   f"HTTP {error.code}") from None

    def read_text(self, name: str) -> str | None:
        return self._get(name, "?alt=media", lambda data: data.decode(errors="replace"))

def _host_specific(relative: str, excluded_files: tuple[str, ...]) -> bool:
    parts = relative.split("/")
    if parts[0] == "bin" and len(parts) == 2 and parts[1].startswith("python"):
        return True  # links to this host's interpreter, made again on unpacking
    return relative == "pyvenv.cfg" or parts[-1] in excluded_files


def pack(env_dir: Path, dest: Path, manifest: dict, *, excluded_files: tuple[str, ...]) -> str:
    """Archive ``env_dir`` (sorted, without owners or times) with ``manifest`` first; returns
    the archive's SHA-256.

    Uncompressed: unpacking a gzipped JAX environment (160 MB packed, 530 MB unpacked) costs
    several CPU-seconds of inflating per host, more than fetching the 530 MB from Cloud Storage
    takes a TPU VM; a plain tar unpacks at the disk's speed."""
    with open(dest, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST_NAME)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for path in sorted(env_dir.rglob("*")):
                relative = path.relative_to(env_dir).as_posix()
                if _host_specific(relative, excluded_files) or "__pycache__" in path.parts:
                    continue
                info = tar.gettarinfo(str(path), arcname=relative)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif info.isdir() or info.issym():
                    tar.addfile(info)
    return sha256_of(dest)


def unpack(archive: Path, dest: Path) -> dict:
    """Unpack a verified archive into ``dest`` (which must not exist); returns its manifest.

    GNU tar does it where there is one (every TPU image; several times faster than tarfile on
    an environment of a few thousand files), refusing absolute and ``..`` member names by
    default; elsewhere tarfile with the same refusals."""
    dest.mkdir(parents=True)
    with tarfile.open(archive, mode="r:") as tar:
        first = tar.next()
        if first is None or first.name != MANIFEST_NAME:
            raise StorageError(f"{archive} is not an environment archive: its first member is not {MANIFEST_NAME}")
        manifest = json.loads(tar.extractfile(first).read())
    tar_binary = shutil.which("tar")
    if tar_binary is not None:
        result = subprocess.run([tar_binary, "-xf", str(archive), "-C", str(dest), "--no-same-owner",
                                 "--exclude", MANIFEST_NAME], capture_output=True, text=True,
                                timeout=UNPACK_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise StorageError(f"tar could not unpack {archive}: {result.stderr.strip()[-400:]}")
        return manifest
    with tarfile.open(archive, mode="r:") as tar:
        members = [m for m in tar.getmembers() if m.name != MANIFEST_NAME]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python 3.10 before 3.10.12: the same checks by hand
            root = dest.resolve()
            for member in members:
                target = (dest / member.name).resolve()
                link = (target.parent / member.linkname).resolve() if member.issym() else target
                if not (target.is_relative_to(root) and link.is_relative_to(root)) or member.islnk() \
                        or not (member.isfile() or member.isdir() or member.issym()):
                    raise StorageError(f"{archive}: member {member.name!r} would leave the environment")
            tar.extractall(dest, members=members)
    return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

