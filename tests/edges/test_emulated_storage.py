"""The emulated Cloud Storage holds what Google's would: generation preconditions answered 412
``conditionNotMet`` (at the start of a resumable session and again when its bytes complete it),
downloads of a replaced generation refused, objects that outlive the server on its root."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from fray_tpu.emulator.storage import EMULATED_BUCKET, StorageServer
from fray_tpu.worker.envarchive import BucketObjects, StorageError

NAME = "fray-tpu/envs/example.tar"


def _objects(storage: StorageServer) -> BucketObjects:
    return BucketObjects(storage.endpoint, EMULATED_BUCKET, lambda: "token")


def _file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_create_only_uploads_create_once_and_then_get_412(storage, tmp_path):
    """ifGenerationMatch=0 creates the object; a second create-only upload is refused and the
    object keeps its first bytes and metadata; matching the current generation replaces it."""
    objects = _objects(storage)
    first = objects.upload(NAME, _file(tmp_path, "a", b"first"), {"sha256": "a"}, "0")
    assert first is not None and first["metadata"] == {"sha256": "a"}
    assert objects.upload(NAME, _file(tmp_path, "b", b"second"), {"sha256": "b"}, "0") is None
    assert storage.counters["precondition_failures"] == 1
    assert objects.stat(NAME)["generation"] == first["generation"]
    replaced = objects.upload(NAME, _file(tmp_path, "c", b"third"), {"sha256": "c"}, first["generation"])
    assert replaced is not None and replaced["generation"] != first["generation"]
    assert objects.upload(NAME, _file(tmp_path, "d", b"late"), {}, first["generation"]) is None


def test_the_412_has_googles_shape(storage):
    """The error body a GCS client parses: code 412, reason conditionNotMet."""
    _objects(storage).put_text(NAME, "exists")
    query = urllib.parse.urlencode({"uploadType": "media", "name": NAME, "ifGenerationMatch": "0"})
    request = urllib.request.Request(f"{storage.endpoint}/upload/storage/v1/b/{EMULATED_BUCKET}/o?{query}",
                                     data=b"again", method="POST", headers={"Authorization": "Bearer t"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 412
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == 412 and error["errors"][0]["reason"] == "conditionNotMet"


def test_a_session_started_before_another_upload_completed_is_refused_when_it_completes(storage, tmp_path):
    """Two resumable sessions both start create-only; the first to send its bytes wins, the other
    gets 412 at its end: the precondition holds at completion, not only at the start."""
    def start() -> str:
        query = urllib.parse.urlencode({"uploadType": "resumable", "name": NAME, "ifGenerationMatch": "0"})
        request = urllib.request.Request(f"{storage.endpoint}/upload/storage/v1/b/{EMULATED_BUCKET}/o?{query}",
                                         data=b"{}", method="POST", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Location"]

    first, second = start(), start()
    with urllib.request.urlopen(urllib.request.Request(first, data=b"one", method="PUT"), timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(second, data=b"two", method="PUT"), timeout=10)
    assert refused.value.code == 412
    generation = _objects(storage).stat(NAME)["generation"]
    assert _objects(storage).download(NAME, generation, tmp_path / "out") and (tmp_path / "out").read_bytes() == b"one"


def test_a_replaced_generation_is_no_longer_served(storage, tmp_path):
    """A download naming the generation it read the metadata of gets 404 once that generation
    is replaced (no versioning), so a host never unpacks bytes other than the ones it checked."""
    objects = _objects(storage)
    old = objects.upload(NAME, _file(tmp_path, "a", b"old"), {}, "0")["generation"]
    objects.upload(NAME, _file(tmp_path, "b", b"new"), {}, old)
    with pytest.raises(StorageError, match="HTTP 404"):
        objects.download(NAME, old, tmp_path / "out")


def test_objects_outlive_the_server_on_its_root(tmp_path):
    """A server started again on the same root serves the same objects, generations and
    metadata: the demo's bucket persists between runs like a real bucket."""
    root = tmp_path / "bucket"
    server = StorageServer("127.0.0.1", root)
    server.start()
    try:
        created = _objects(server).upload(NAME, _file(tmp_path, "a", b"kept"), {"sha256": "k"}, "0")
    finally:
        server.close()
    again = StorageServer("127.0.0.1", root)
    again.start()
    try:
        objects = _objects(again)
        assert objects.stat(NAME) == created
        objects.download(NAME, created["generation"], tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b"kept"
        assert objects.upload(NAME, _file(tmp_path, "b", b"x"), {}, "0") is None
    finally:
        again.close()


def _delete(storage: StorageServer, name: str, **query: str) -> int:
    url = f"{storage.endpoint}/storage/v1/b/{EMULATED_BUCKET}/o/{urllib.parse.quote(name, safe='')}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, method="DELETE", headers={"Authorization": "Bearer t"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_deleted_object_is_gone_and_a_stale_generation_cannot_delete(storage, tmp_path):
    """objects.delete: 412 for a generation that is not the live one, 204 and then 404 for the
    object, also after a restart on the same root."""
    objects = _objects(storage)
    generation = objects.upload(NAME, _file(tmp_path, "a", b"data"), {}, "0")["generation"]
    assert _delete(storage, NAME, ifGenerationMatch="1") == 412 and objects.stat(NAME) is not None
    assert _delete(storage, NAME, ifGenerationMatch=generation) == 204
    assert objects.stat(NAME) is None and _delete(storage, NAME) == 404
    again = StorageServer("127.0.0.1", storage.root)
    again.start()
    try:
        assert _objects(again).stat(NAME) is None
    finally:
        again.close()
