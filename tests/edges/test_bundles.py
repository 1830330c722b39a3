"""The host's bundle cache: verified uploads, extract-once, path-traversal refusal, eviction."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from fray_tpu.worker.bundles import BundleDigestMismatch, BundleError, BundleStore, UnsafeBundleError
from fray_tpu.workspace import pack_workspace


def _packed(tmp_path: Path, files: dict[str, str]) -> tuple[str, bytes]:
    root = tmp_path / f"ws-{len(list(tmp_path.iterdir()))}"
    for relpath, content in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    bundle = pack_workspace(root, cache_dir=tmp_path / "pack-cache")
    return bundle.digest, bundle.path.read_bytes()


def _upload(store: BundleStore, digest: str, data: bytes, chunk: int = 1000) -> Path:
    upload = store.begin_upload(digest)
    for start in range(0, len(data), chunk):
        upload.write(data[start : start + chunk])
    return upload.commit()


def _evil_archive(add) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add(tar)
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def _add_file(tar: tarfile.TarFile, name: str, content: bytes = b"pwned") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def test_upload_commit_then_extract_once(tmp_path: Path) -> None:
    digest, data = _packed(tmp_path, {"main.py": "print(1)\n", "pkg/mod.py": "X = 2\n"})
    store = BundleStore(tmp_path / "store")
    assert store.has(digest) is False

    _upload(store, digest, data)
    assert store.has(digest) is True

    first = store.extracted(digest)
    assert (first / "pkg" / "mod.py").read_text() == "X = 2\n"
    (first / "marker").write_text("still the same directory")
    second = store.extracted(digest)
    assert second == first and (second / "marker").exists()
    assert store.stats() == {
        "uploads": 1,
        "upload_bytes": len(data),
        "hits": 1,
        "misses": 1,
        "extractions": 1,
        "extraction_hits": 1,
        "evictions": 0,
    }


def test_a_fresh_store_on_the_same_root_finds_earlier_bundles(tmp_path: Path) -> None:
    digest, data = _packed(tmp_path, {"a.py": "A = 1\n"})
    _upload(BundleStore(tmp_path / "store"), digest, data)
    restarted = BundleStore(tmp_path / "store")
    assert restarted.has(digest)
    assert (restarted.extracted(digest) / "a.py").exists()


def test_digest_mismatch_names_both_and_publishes_nothing(tmp_path: Path) -> None:
    digest, data = _packed(tmp_path, {"a.py": "A = 1\n"})
    store = BundleStore(tmp_path / "store")
    upload = store.begin_upload(digest)
    upload.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleDigestMismatch) as caught:
        upload.commit()
    actual = hashlib.sha256(data[:-1] + bytes([data[-1] ^ 1])).hexdigest()
    assert digest in str(caught.value) and actual in str(caught.value)
    assert store.has(digest) is False
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_aborted_upload_leaves_nothing(tmp_path: Path) -> None:
    digest, data = _packed(tmp_path, {"a.py": "A = 1\n"})
    store = BundleStore(tmp_path / "store")
    upload = store.begin_upload(digest)
    upload.write(data[:10])
    upload.abort()
    assert store.has(digest) is False
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    with pytest.raises(BundleError, match="not on this host"):
        store.extracted(digest)


def test_bad_digest_and_oversized_upload_are_refused(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", max_bundle_bytes=100)
    with pytest.raises(BundleError, match="not a lowercase hex sha256"):
        store.begin_upload("../../etc/passwd")
    upload = store.begin_upload("0" * 64)
    with pytest.raises(BundleError, match="100 byte bundle limit"):
        upload.write(b"x" * 101)


@pytest.mark.parametrize(
    "add",
    [
        lambda tar: _add_file(tar, "../escape.txt"),
        lambda tar: _add_file(tar, "/tmp/absolute-escape.txt"),
        lambda tar: _add_file(tar, "ok/../../escape.txt"),
    ],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
def test_path_traversal_is_refused(tmp_path: Path, add) -> None:
    digest, data = _evil_archive(add)
    store = BundleStore(tmp_path / "store")
    _upload(store, digest, data)
    with pytest.raises(UnsafeBundleError, match="outside the bundle"):
        store.extracted(digest)
    assert not (tmp_path / "store" / "escape.txt").exists()
    assert not (tmp_path / "store" / "extracted" / "escape.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert list((tmp_path / "store" / "extracted").iterdir()) == []


def test_symlink_escape_and_hardlinks_are_refused(tmp_path: Path) -> None:
    def symlink_out(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../outside"
        tar.addfile(info)

    def hardlink(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("hard")
        info.type = tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)

    store = BundleStore(tmp_path / "store")
    for add in (symlink_out, hardlink):
        digest, data = _evil_archive(add)
        _upload(store, digest, data)
        with pytest.raises(UnsafeBundleError, match="refusing to extract"):
            store.extracted(digest)


def test_concurrent_extractions_extract_once(tmp_path: Path) -> None:
    digest, data = _packed(tmp_path, {f"m{i}.py": f"V = {i}\n" for i in range(50)})
    store = BundleStore(tmp_path / "store")
    _upload(store, digest, data)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(store.extracted(digest))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 4 and len(set(results)) == 1
    assert store.stats()["extractions"] == 1
    assert store.stats()["extraction_hits"] == 3


def test_least_recently_used_bundles_are_evicted_beyond_the_budget(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store", budget_bytes=1, protect_recent_seconds=60)
    old_digest, old_data = _packed(tmp_path, {"old.py": "OLD = 1\n"})
    _upload(store, old_digest, old_data)
    store.extracted(old_digest)
    # Pretend the old bundle was last used two minutes ago.
    past = time.time() - 120
    os.utime(store.blob_path(old_digest), (past, past))

    new_digest, new_data = _packed(tmp_path, {"new.py": "NEW = 1\n"})
    _upload(store, new_digest, new_data)  # over budget: the old, idle bundle goes
    assert store.has(old_digest) is False
    assert store.has(new_digest) is True
    assert store.stats()["evictions"] == 1
