"""Content-addressed cache of workspace bundles on a host (agent side).

Layout under ``root``: ``blobs/<digest>.tar.gz`` (verified uploads), ``extracted/<digest>/``
(each bundle unpacked once), ``tmp/`` (uploads and extractions in progress). Everything becomes
visible by an atomic rename, so a crash never leaves a half-written bundle that looks complete.
Extraction refuses archive members that would land outside the bundle directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import threading
import time
import uuid
from pathlib import Path

from fray_tpu.errors import FrayTpuError
from fray_tpu.worker.keylocks import KeyLocks

BLOB_SUFFIX = ".tar.gz"
DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3
DEFAULT_CACHE_BUDGET_BYTES = 20 * 1024**3
# Bundles used this recently are never evicted: an attempt may still be running in them.
DEFAULT_PROTECT_RECENT_SECONDS = 24 * 3600
EXTRACT_LOCK_TIMEOUT_SECONDS = 600.0
_DIGEST = re.compile(r"[0-9a-f]{64}")


class BundleError(FrayTpuError):
    """A bundle upload or extraction that cannot be accepted."""


class BundleDigestMismatch(BundleError):
    """The uploaded bytes do not hash to the digest they were announced with."""


class UnsafeBundleError(BundleError):
    """An archive member would be written outside the bundle directory."""


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise BundleError(f"bundle digest {digest!r} is not a lowercase hex sha256 (64 characters)")
    return digest


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _check_members(members: list[tarfile.TarInfo], digest: str) -> None:
    for member in members:
        name = member.name
        parts = Path(name).parts
        if os.path.isabs(name) or name.startswith("/") or ".." in parts:
            raise UnsafeBundleError(f"bundle {digest} member {name!r} points outside the bundle; refusing to extract")
        if member.islnk() or not (member.isfile() or member.isdir() or member.issym()):
            raise UnsafeBundleError(
                f"bundle {digest} member {name!r} is not a file, directory or symlink; refusing to extract"
            )
        if member.issym():
            target = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
            if os.path.isabs(member.linkname) or target == ".." or target.startswith("../"):
                raise UnsafeBundleError(
                    f"bundle {digest} symlink {name!r} -> {member.linkname!r} points outside the bundle; "
                    f"refusing to extract"
                )


class BundleUpload:
    """One upload in progress: ``write`` chunks, then ``commit`` (verify + publish) or ``abort``."""

    def __init__(self, store: BundleStore, digest: str, temp_path: Path, max_bytes: int) -> None:
        self.digest = digest
        self._store = store
        self._temp_path = temp_path
        self._max_bytes = max_bytes
        self._file = open(temp_path, "wb")
        self._sha256 = hashlib.sha256()
        self.bytes_written = 0

    def write(self, chunk: bytes) -> None:
        if self._file.closed:
            raise BundleError(f"upload of bundle {self.digest} is already finished")
        if self.bytes_written + len(chunk) > self._max_bytes:
            self.abort()
            raise BundleError(
                f"upload of bundle {self.digest} exceeds the host's {self._max_bytes} byte bundle limit; "
                f"make the workspace smaller (exclude data with .gitignore)"
            )
        self._file.write(chunk)
        self._sha256.update(chunk)
        self.bytes_written += len(chunk)

    def commit(self) -> Path:
        """Verify the sha256 and publish the bundle; returns the blob path."""
        if self._file.closed:
            raise BundleError(f"upload of bundle {self.digest} is already finished")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        actual = self._sha256.hexdigest()
        if actual != self.digest:
            self._temp_path.unlink(missing_ok=True)
            raise BundleDigestMismatch(
                f"uploaded bundle hashes to sha256 {actual}, but was announced as {self.digest} "
                f"({self.bytes_written} bytes received); the upload was corrupted or truncated: upload it again"
            )
        blob = self._store.blob_path(self.digest)
        os.replace(self._temp_path, blob)
        self._store._committed(self.digest, self.bytes_written)
        return blob

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._temp_path.unlink(missing_ok=True)


class BundleStore:
    """The host's bundle cache. Thread-safe; uploads of the same digest may race harmlessly."""

    def __init__(
        self,
        root: Path,
        *,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        protect_recent_seconds: float = DEFAULT_PROTECT_RECENT_SECONDS,
    ) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._extracted = self.root / "extracted"
        self._tmp = self.root / "tmp"
        self._locks_dir = self.root / "locks"
        for directory in (self._blobs, self._extracted, self._tmp, self._locks_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._max_bundle_bytes = max_bundle_bytes
        self._budget_bytes = budget_bytes
        self._protect_recent_seconds = protect_recent_seconds
        self._lock = threading.Lock()
        self._digest_locks = KeyLocks(self._locks_dir, "extracting bundle")
        self._counters = {
            "uploads": 0,
            "upload_bytes": 0,
            "hits": 0,
            "misses": 0,
            "extractions": 0,
            "extraction_hits": 0,
            "evictions": 0,
        }

    def blob_path(self, digest: str) -> Path:
        return self._blobs / f"{_check_digest(digest)}{BLOB_SUFFIX}"

    def has(self, digest: str) -> bool:
        """Whether the bundle is here (then the controller skips the upload)."""
        present = self.blob_path(digest).exists() or (self._extracted / digest).is_dir()
        self._count("hits" if present else "misses")
        if present:
            self._touch(digest)
        return present

    def begin_upload(self, digest: str) -> BundleUpload:
        _check_digest(digest)
        temp_path = self._tmp / f"{digest}.{uuid.uuid4().hex}.part"
        return BundleUpload(self, digest, temp_path, self._max_bundle_bytes)

    def extracted(self, digest: str) -> Path:
        """The bundle unpacked into its own directory, extracting it on first use only."""
        target = self._extracted / _check_digest(digest)
        if target.is_dir():
            self._count("extraction_hits")
            self._touch(digest)
            return target
        with self._digest_locks.exclusive(digest, EXTRACT_LOCK_TIMEOUT_SECONDS):
            if target.is_dir():
                self._count("extraction_hits")
                return target
            blob = self.blob_path(digest)
            if not blob.exists():
                raise BundleError(f"bundle {digest} is not on this host; upload it before starting the attempt")
            staging = self._tmp / f"extract-{digest}-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                with tarfile.open(blob, "r:*") as tar:
                    members = tar.getmembers()
                    _check_members(members, digest)
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(staging, members=members, filter="data")
                    else:
                        tar.extractall(staging, members=members)
                os.rename(staging, target)
            except (tarfile.TarError, EOFError, OSError) as error:
                shutil.rmtree(staging, ignore_errors=True)
                if isinstance(error, getattr(tarfile, "FilterError", ())):
                    raise UnsafeBundleError(f"bundle {digest} is unsafe to extract: {error}") from error
                raise BundleError(f"bundle {digest} could not be extracted: {error}") from error
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._count("extractions")
            self._touch(digest)
            return target

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def evict(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove least recently used bundles until the cache fits its budget; returns their digests.

        Never removes ``keep`` nor anything used within ``protect_recent_seconds``.
        """
        usage: list[tuple[float, str, int]] = []
        for blob in self._blobs.glob(f"*{BLOB_SUFFIX}"):
            digest = blob.name[: -len(BLOB_SUFFIX)]
            if not _DIGEST.fullmatch(digest):
                continue
            size = blob.stat().st_size + _tree_size(self._extracted / digest)
            usage.append((blob.stat().st_mtime, digest, size))
        total = sum(size for _, _, size in usage)
        now = time.time()
        evicted: list[str] = []
        for last_used, digest, size in sorted(usage):
            if total <= self._budget_bytes:
                break
            if digest in keep or now - last_used < self._protect_recent_seconds:
                continue
            with self._digest_locks.exclusive(digest, EXTRACT_LOCK_TIMEOUT_SECONDS):
                shutil.rmtree(self._extracted / digest, ignore_errors=True)
                self.blob_path(digest).unlink(missing_ok=True)
            total -= size
            evicted.append(digest)
        if evicted:
            self._count("evictions", len(evicted))
        return evicted

    def _committed(self, digest: str, size: int) -> None:
        self._count("uploads")
        self._count("upload_bytes", size)
        self.evict(keep=frozenset({digest}))

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def _touch(self, digest: str) -> None:
        """Record a use: the blob's mtime is the LRU clock."""
        try:
            os.utime(self.blob_path(digest))
        except FileNotFoundError:
            pass
