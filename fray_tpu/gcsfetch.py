"""Fetching one Cloud Storage object on a VM with the VM's own service-account token (from the
metadata server), hashing it on the way.

Standard library only, and runnable as a script: the startup-script runs this file's source with
the image's ``python3`` before anything of fray-tpu is on the VM (``python3 -c SOURCE ENDPOINT
gs://BUCKET/OBJECT DEST ATTEMPTS`` prints the SHA-256), and the agent imports it to fetch uv.
Verifying the hash is the caller's: nothing fetched runs before it matches the pinned one.
"""

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

TOKEN_TIMEOUT_SECONDS = 30
DOWNLOAD_TIMEOUT_SECONDS = 120
CHUNK_BYTES = 1 << 20
# How long a missing object is waited for, asked for again after a pause that doubles.
MISSING_WAIT_SECONDS = 60.0
MISSING_FIRST_PAUSE_SECONDS = 0.05
MISSING_MAX_PAUSE_SECONDS = 0.5
# Refusals no retry heals: a wrong token, no access.
_FINAL_HTTP = (401, 403)


class FetchError(Exception):
    pass


def _token(metadata_host: str) -> str:
    request = urllib.request.Request(
        f"http://{metadata_host}/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=TOKEN_TIMEOUT_SECONDS) as response:
        return json.loads(response.read())["access_token"]


def fetch(endpoint: str, url: str, dest: str, attempts: int, missing_wait: float = MISSING_WAIT_SECONDS) -> str:
    """Download ``url`` (gs://bucket/object) from the JSON API at ``endpoint`` to ``dest``;
    returns the SHA-256 of what was written. Failures are retried ``attempts`` times with backoff,
    except final refusals; an object not there yet (the controller uploads while the slice is
    created) is asked for again, quickly, for up to ``missing_wait`` seconds."""
    bucket, name = url[len("gs://"):].split("/", 1)
    metadata_host = os.environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
    media = f"{endpoint.rstrip('/')}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    missing_until = time.monotonic() + missing_wait
    missing_pause = MISSING_FIRST_PAUSE_SECONDS
    failures = 0
    while True:
        try:
            request = urllib.request.Request(media, headers={"Authorization": f"Bearer {_token(metadata_host)}"})
            digest = hashlib.sha256()
            with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response, \
                    open(dest, "wb") as out:
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code} from Cloud Storage for {url}: {error.read()[:200].decode(errors='replace')}"
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
        failures += 1
        if failures >= attempts:
            raise FetchError(last)
        time.sleep(min(2 ** (failures - 1), 20))


def main(argv: list) -> int:
    endpoint, url, dest, attempts = argv
    try:
        print(fetch(endpoint, url, dest, int(attempts)))
    except FetchError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
