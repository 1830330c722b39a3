"""Fetching one Cloud Storage object on a VM with the VM's own service-account token (from the
metadata server), hashing it on the way; and the startup-script's install of the host bundle.

Standard library only (and Python 3.8+), and runnable as a script: the startup-script runs this
file's source with the image's ``python3`` before anything of fray-tpu is on the VM (``python3 -c
SOURCE install ...``, :func:`install`: one interpreter for the interpreter, bundle and deps
phases), and the agent imports it to fetch uv. Nothing fetched is unpacked or run before its
SHA-256 matches the pinned one.
"""

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse

TOKEN_TIMEOUT_SECONDS = 30
DOWNLOAD_TIMEOUT_SECONDS = 120
PUBLISH_TIMEOUT_SECONDS = 10
PUBLISH_ATTEMPTS = 4
UNPACK_TIMEOUT_SECONDS = 300
# A large window: each read hashes and writes what the socket had.
READ_BYTES = 4 << 20
# How long a missing object is waited for, asked for again after a pause that doubles up to a
# tenth of a second: the object lands when the controller's upload ends, and every pause past
# that moment is boot time lost (a 404 costs Cloud Storage next to nothing).
MISSING_WAIT_SECONDS = 60.0
MISSING_FIRST_PAUSE_SECONDS = 0.02
MISSING_MAX_PAUSE_SECONDS = 0.1
# Refusals no retry heals: a wrong token, no access.
_FINAL_HTTP = (401, 403)
LOG_PREFIX = "[fray-tpu-bootstrap]"
INSTALLED_MARKER = ".installed"
# install()'s exit code for a failure it reports itself (its last stdout line names the phase).
EXIT_REPORTED = 3


class FetchError(Exception):
    pass


class _HttpStatus(Exception):
    def __init__(self, code: int, body: bytes):
        super().__init__(f"HTTP {code}")
        self.code = code
        self.body = body


def _open(method: str, url: str, headers: dict, timeout: float, body: bytes = None):
    """(connection, response) of a 200 answer; raises _HttpStatus for any other."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.netloc, timeout=timeout)
    try:
        connection.request(method, parts.path + ("?" + parts.query if parts.query else ""), body=body,
                           headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise _HttpStatus(response.status, response.read(300))
    except BaseException:
        connection.close()
        raise
    return connection, response


def metadata_host() -> str:
    return os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"


def _token() -> str:
    url = f"http://{metadata_host()}/computeMetadata/v1/instance/service-accounts/default/token"
    try:
        connection, response = _open("GET", url, {"Metadata-Flavor": "Google"}, TOKEN_TIMEOUT_SECONDS)
    except _HttpStatus as error:
        raise OSError(f"the metadata server answered HTTP {error.code} for the VM's access token") from None
    try:
        return json.loads(response.read())["access_token"]
    finally:
        connection.close()


def _receive(response, dest: str) -> str:
    """Write the body to ``dest``, hashing it on the way; returns its SHA-256."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(READ_BYTES))
    with open(dest, "wb") as out:
        while True:
            count = response.readinto(view)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])
            out.write(view[:count])


def fetch(endpoint: str, url: str, dest: str, attempts: int, missing_wait: float = MISSING_WAIT_SECONDS) -> str:
    """Download ``url`` (gs://bucket/object) from the JSON API at ``endpoint`` to ``dest``;
    returns the SHA-256 of what was written. Failures are retried
    ``attempts`` times with backoff, except final refusals; an object not there yet (the
    controller uploads while the slice is created) is asked for again, quickly, for up to
    ``missing_wait`` seconds."""
    bucket, name = url[len("gs://"):].split("/", 1)
    media = f"{endpoint.rstrip('/')}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    missing_until = time.monotonic() + missing_wait
    missing_pause = MISSING_FIRST_PAUSE_SECONDS
    failures = 0
    token = None  # an hour's token, asked for again only after a failure
    while True:
        try:
            token = token or _token()
            connection, response = _open("GET", media, {"Authorization": f"Bearer {token}"}, DOWNLOAD_TIMEOUT_SECONDS)
            try:
                return _receive(response, dest)
            finally:
                connection.close()
        except _HttpStatus as error:
            last = f"HTTP {error.code} from Cloud Storage for {url}: {error.body[:200].decode(errors='replace')}"
            if error.code == 404 and time.monotonic() < missing_until:
                time.sleep(missing_pause)
                missing_pause = min(missing_pause * 2, MISSING_MAX_PAUSE_SECONDS)
                continue
            if error.code == 404:
                raise FetchError(f"{last} (still missing after {missing_wait:.0f}s)") from None
            if error.code in _FINAL_HTTP:
                raise FetchError(last) from None
        except Exception as error:  # noqa: BLE001 - any network or disk failure is retried, then reported
            last = f"{type(error).__name__}: {error}"
        token = None
        failures += 1
        if failures >= attempts:
            raise FetchError(last)
        time.sleep(min(2 ** (failures - 1), 20))


class _Failed(Exception):
    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase


class _Phases:
    """The boot's phases so far (``name=epoch_ms ...``), published as one guest attribute."""

    def __init__(self, so_far: str, attribute: str):
        self.text = so_far
        self._url = f"http://{metadata_host()}/computeMetadata/v1/instance/guest-attributes/{attribute}"

    def reached(self, name: str, detail: str) -> None:
        self.text = f"{self.text} {name}={int(time.time() * 1000)}".strip()
        for attempt in range(PUBLISH_ATTEMPTS):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            try:
                connection, _ = _open("PUT", self._url, {"Metadata-Flavor": "Google"}, PUBLISH_TIMEOUT_SECONDS,
                                      self.text.encode())
                connection.close()
                break
            except (OSError, _HttpStatus, http.client.HTTPException):
                continue
        else:
            _log("could not publish guest attribute " + self._url.split("/guest-attributes/", 1)[1])
        _log(f"phase {name}: {detail}")


def _log(line: str) -> None:
    print(f"{LOG_PREFIX} {line}", file=sys.stderr, flush=True)


def _unpack(archive: str, directory: str) -> None:
    """Unpack the verified archive into ``directory``, then mark and move it into place: a
    half-unpacked bundle is never taken for an installed one. (GNU tar reads the file just
    written from the page cache with less CPU than a pipe from this process would take.)"""
    partial = directory + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    code = subprocess.run(["tar", "-x", "-C", partial, "-f", archive], timeout=UNPACK_TIMEOUT_SECONDS).returncode
    if code != 0:
        raise _Failed("deps", f"cannot unpack {archive} into {partial}: tar exited with code {code} (its error is "
                              "above on the serial console)")
    open(os.path.join(partial, INSTALLED_MARKER), "wb").close()
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def install(endpoint: str, url: str, sha256: str, archive: str, directory: str, bundle_python: str,
            bundle_platform: str, attempts: int, phases: "_Phases") -> None:
    """The bootstrap's interpreter, bundle and deps phases: the bundle installed in ``directory``
    (reused when it is; unpacked again from the verified ``archive`` kept from an earlier boot;
    else fetched to it, verified, kept, and unpacked)."""
    python = "%d.%d" % sys.version_info[:2]
    phases.reached("interpreter", f"{sys.executable} is Python {python}")
    if os.path.exists(os.path.join(directory, INSTALLED_MARKER)):
        phases.reached("bundle", f"installed already in {directory} (not fetched again)")
        phases.reached("deps", "installed already")
        return
    if os.path.exists(archive):
        phases.reached("bundle", f"kept from an earlier boot in {archive} (verified then; not fetched again)")
    else:
        # Fetched whole and verified before a single member is unpacked.
        partial = archive + ".partial"
        try:
            got = fetch(endpoint, url, partial, attempts)
        except (FetchError, OSError) as error:
            raise _Failed("bundle", f"cannot fetch {url} from {endpoint}: {error}") from None
        if got != sha256:
            os.unlink(partial)
            raise _Failed("bundle", f"SHA-256 mismatch for {url}: expected {sha256} (pinned by the controller), got "
                                    f"{got}; the object was changed after it was staged, refusing to run it")
        try:
            os.replace(partial, archive)
        except OSError as error:
            raise _Failed("bundle", f"cannot keep the verified bundle in {archive}: {error}") from None
        phases.reached("bundle", f"fetched {url}, SHA-256 verified")
    # The controller installed the dependencies for this Python and platform (uv --target): they
    # load only on that interpreter version.
    if python != bundle_python:
        raise _Failed("deps", f"the bundle's compiled dependencies (grpcio, protobuf, cryptography) are for Python "
                              f"{bundle_python} on {bundle_platform}; this VM's python3 is {python}: set "
                              f"host_python={python}, or use a runtime whose image has Python {bundle_python} "
                              f"(tpu-ubuntu2204-base)")
    try:
        _unpack(archive, directory)
    except OSError as error:
        raise _Failed("deps", f"cannot unpack {archive} into {directory}: {error}") from None
    phases.reached("deps", f"unpacked into {directory}")


def main(argv: list) -> int:
    """``install ENDPOINT URL SHA256 ARCHIVE DIRECTORY BUNDLE_PYTHON BUNDLE_PLATFORM ATTEMPTS
    PHASES_ATTRIBUTE PHASES_SO_FAR``: prints the phases reached; a failure prints ``PHASE<TAB>WHY``
    and exits :data:`EXIT_REPORTED`."""
    (command, endpoint, url, sha256, archive, directory, bundle_python, bundle_platform, attempts, attribute,
     so_far) = argv
    if command != "install":
        print(f"interpreter\tunknown command {command!r}")
        return EXIT_REPORTED
    phases = _Phases(so_far, attribute)
    try:
        install(endpoint, url, sha256, archive, directory, bundle_python, bundle_platform, int(attempts), phases)
    except _Failed as failure:
        print(f"{failure.phase}\t{failure}")
        return EXIT_REPORTED
    print(phases.text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
