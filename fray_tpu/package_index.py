"""A package index on loopback: a directory of wheels served as a PEP 503 simple index over HTTP.

What the demo, the tests and the benchmarks give the hosts as ``index_url`` (on real VMs an
Artifact Registry PyPI remote plays this part). The wheelhouse is filled once with ``pip
download`` from the real registry and kept, so later runs download nothing.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from fray_tpu.errors import FrayTpuError

DOWNLOAD_TIMEOUT_SECONDS = 1800.0
_STAMP = ".fray-tpu-wheelhouse.json"
_DIST_SUFFIXES = (".whl", ".tar.gz", ".zip")


def cache_dir() -> Path:
    """Where wheelhouses are kept between runs (``$XDG_CACHE_HOME/fray-tpu/wheelhouse``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fray-tpu" / "wheelhouse"


def pinned_like_this_interpreter(*names: str) -> list[str]:
    """``name==version`` of each package as installed here: a job pickled here loads with them."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


class WheelhouseError(FrayTpuError):
    """pip could not download the wheelhouse; the message carries pip's output."""


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_of(filename: str) -> str | None:
    """The normalised project name of a distribution file, or None if it is not one."""
    if filename.endswith(".whl"):
        return normalise(filename.split("-", 1)[0])
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            return normalise(filename[: -len(suffix)].rsplit("-", 1)[0])
    return None


def fill_wheelhouse(directory: Path, requirements: Sequence[str], *, python_version: str | None = None,
                    timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> Path:
    """Download ``requirements`` and their dependencies as wheels into ``directory``, once: a
    second call with the same requirements and Python finds the stamp and downloads nothing.
    Each requirement is downloaded separately so that several versions of one package can sit
    side by side (an index offers more than one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    want = {"python": version, "requirements": sorted(requirements)}
    stamp = directory / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return directory
    for requirement in requirements:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                   "--python-version", version, "--dest", str(directory), requirement]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise WheelhouseError(f"pip download {requirement} took longer than {timeout:.0f}s") from error
        if result.returncode != 0:
            raise WheelhouseError(f"pip download {requirement} failed (exit {result.returncode}):\n"
                                  f"{result.stderr.strip()[-4000:]}")
    stamp.write_text(json.dumps(want))
    return directory


class LoopbackIndex:
    """Serves ``wheelhouse`` at ``http://127.0.0.1:PORT/simple/`` until closed (a context manager)."""

    def __init__(self, wheelhouse: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.wheelhouse = Path(wheelhouse)
        self._hashes: dict[str, str] = {}
        self._hash_lock = threading.Lock()
        self.requests = 0
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
                index.requests += 1
                index._answer(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802 - uv asks for a wheel's size before fetching it
                index._answer(self, body=False)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-index", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/simple/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LoopbackIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _files(self) -> dict[str, list[str]]:
        projects: dict[str, list[str]] = {}
        for path in sorted(self.wheelhouse.iterdir()):
            project = project_of(path.name)
            if project is not None and path.is_file():
                projects.setdefault(project, []).append(path.name)
        return projects

    def _sha256(self, filename: str) -> str:
        with self._hash_lock:
            if filename not in self._hashes:
                digest = hashlib.sha256()
                with open(self.wheelhouse / filename, "rb") as file:
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
                self._hashes[filename] = digest.hexdigest()
            return self._hashes[filename]

    def _answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(request.path.split("?", 1)[0])
        parts = [part for part in path.split("/") if part]
        if parts[:1] == ["files"] and len(parts) == 2 and project_of(parts[1]) and "/" not in parts[1]:
            file = self.wheelhouse / parts[1]
            if not file.is_file():
                request.send_error(404)
                return
            request.send_response(200)
            request.send_header("Content-Type", "application/octet-stream")
            request.send_header("Content-Length", str(file.stat().st_size))
            request.end_headers()
            if not body:
                return
            with open(file, "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    request.wfile.write(block)
            return
        projects = self._files()
        if parts == ["simple"]:
            links = "".join(f'<a href="/simple/{name}/">{name}</a>\n' for name in sorted(projects))
        elif parts[:1] == ["simple"] and len(parts) == 2 and normalise(parts[1]) in projects:
            links = "".join(f'<a href="/files/{html.escape(f)}#sha256={self._sha256(f)}">{html.escape(f)}</a>\n'
                            for f in projects[normalise(parts[1])])
        else:
            request.send_error(404)
            return
        page = f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n".encode()
        request.send_response(200)
        request.send_header("Content-Type", "text/html")
        request.send_header("Content-Length", str(len(page)))
        request.end_headers()
        if body:
            request.wfile.write(page)
