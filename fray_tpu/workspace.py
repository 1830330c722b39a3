"""Pack a job's workspace directory into a deterministic, content-addressed archive (controller side).

The archive is a gzip'd tar whose bytes depend only on the packed paths, their contents, their
executable bits and relative symlink targets: entries are sorted, owners, mtimes and modes are
normalised, and the gzip header carries no name or time. Its sha256 is the bundle's identity, so
each host receives a workspace once and caches it by digest.

Left out: whatever `.gitignore` files (and `.git/info/exclude`) exclude, including those of the
workspace's ancestors up to the root of the git work tree it is in, version-control
directories, virtual environments (any directory holding `pyvenv.cfg`), tool caches and
compiled Python files. Symlinks are kept when relative and inside the tree, skipped otherwise.

A workspace that is a uv project with a lockfile is checked before anything is provisioned
(``check_workspace_lock``): a stale lock is the job's error, not every host's.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fray_tpu.errors import ConfigError, EnvironmentBuildError
from fray_tpu.gitignore import IgnoreMatcher, IgnoreRule, parse_gitignore
from fray_tpu.uv_command import INDEX_VARS, REDIRECTING_VARS, find_uv, is_locked_workspace, run_streaming, uv_message

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
ARCHIVE_SUFFIX = ".tar.gz"
# 1980-01-01: a fixed, tool-friendly timestamp for every entry.
NORMALISED_MTIME = 315532800
SKIPPED_DIR_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
        "node_modules",
    }
)
SKIPPED_FILE_SUFFIXES = (".pyc", ".pyo")
# Bump when the archive layout or the skip rules change, so old cache entries stop matching.
FORMAT_VERSION = 1
# Archives kept in the packing cache; older ones are removed after each new pack.
CACHE_KEEP_ARCHIVES = 16
# A file modified this recently may change again within the filesystem's mtime granularity
# without its signature changing, so such a tree is never served from the signature cache.
RACY_MTIME_SECONDS = 2.0
# How far up from the workspace to look for the git work tree that contains it.
MAX_REPOSITORY_DEPTH = 64
_GZIP_LEVEL = 1
LOCK_CHECK_TIMEOUT_SECONDS = 300.0


class WorkspaceTooLargeError(ConfigError):
    """The workspace exceeds the bundle size limit."""


class WorkspaceError(ConfigError):
    """The workspace directory cannot be packed as given."""


@dataclass(frozen=True)
class WorkspaceBundle:
    """A packed workspace: ``path`` holds the archive, ``digest`` is its sha256 (hex)."""

    digest: str
    path: Path
    size: int
    file_count: int
    skipped_symlinks: tuple[str, ...] = ()
    from_cache: bool = False


@dataclass(frozen=True)
class _Entry:
    relpath: str
    kind: str  # "dir", "file" or "symlink"
    size: int = 0
    mtime_ns: int = 0
    executable: bool = False
    link_target: str = ""


@dataclass
class _Scan:
    entries: list[_Entry] = field(default_factory=list)
    skipped_symlinks: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    """Where packed archives are kept between launches: ``$FRAY_TPU_CACHE_DIR/workspaces``, else
    under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    explicit = os.environ.get("FRAY_TPU_CACHE_DIR")
    if explicit:
        return Path(explicit) / "workspaces"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fray-tpu" / "workspaces"


def _read_ignore_file(path: Path, base: str, outer: str = "") -> list[IgnoreRule]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return parse_gitignore(text, base, outer)


def _symlink_inside(root: Path, link_dir: Path, target: str) -> bool:
    if os.path.isabs(target):
        return False
    resolved = os.path.normpath(os.path.join(link_dir, target))
    return resolved == str(root) or resolved.startswith(str(root) + os.sep)


def _is_environment(directory: str) -> bool:
    """A virtual environment (venv, virtualenv, uv) or a conda environment."""
    return os.path.exists(os.path.join(directory, "pyvenv.cfg")) or os.path.isdir(os.path.join(directory, "conda-meta"))


def _enclosing_repository_rules(root: Path) -> IgnoreMatcher:
    """The ignore rules that apply to ``root`` from the git work tree it lies in: the repository's
    `.git/info/exclude` and the `.gitignore` files of ``root``'s ancestors inside the work tree."""
    ancestors: list[Path] = []
    directory = root
    for _ in range(MAX_REPOSITORY_DEPTH):
        ancestors.append(directory)
        if (directory / ".git").exists() or directory.parent == directory:
            break
        directory = directory.parent
    if not (ancestors[-1] / ".git").exists():
        ancestors = [root]
    matcher = IgnoreMatcher()
    for ancestor in reversed(ancestors):
        outer = root.relative_to(ancestor).as_posix() if ancestor != root else ""
        if ancestor is ancestors[-1]:
            exclude = ancestor / ".git" / "info" / "exclude"
            matcher = matcher.extended(_read_ignore_file(exclude, "", outer))
        if ancestor != root:
            matcher = matcher.extended(_read_ignore_file(ancestor / ".gitignore", "", outer))
    return matcher


def _scan(root: Path) -> _Scan:
    scan = _Scan()
    base_matcher = _enclosing_repository_rules(root)
    # Explicit stack instead of recursion: deep trees must not hit the recursion limit.
    stack: list[tuple[Path, str, IgnoreMatcher]] = [(root, "", base_matcher)]
    while stack:
        directory, relbase, inherited = stack.pop()
        matcher = inherited.extended(_read_ignore_file(directory / ".gitignore", relbase))
        try:
            children = sorted(os.scandir(directory), key=lambda item: item.name)
        except PermissionError as error:
            raise WorkspaceError(
                f"cannot read workspace directory {directory}: {error}; fix its permissions or "
                f"exclude it with a .gitignore entry"
            ) from error
        subdirs: list[tuple[Path, str, IgnoreMatcher]] = []
        for child in children:
            relpath = f"{relbase}/{child.name}" if relbase else child.name
            if child.is_symlink():
                if matcher.ignored(relpath, is_dir=False):
                    continue
                target = os.readlink(child.path)
                if _symlink_inside(root, directory, target):
                    scan.entries.append(_Entry(relpath, "symlink", link_target=target))
                else:
                    scan.skipped_symlinks.append(f"{relpath} -> {target}")
                continue
            if child.is_dir(follow_symlinks=False):
                if child.name in SKIPPED_DIR_NAMES or _is_environment(child.path):
                    continue
                if matcher.ignored(relpath, is_dir=True):
                    continue
                scan.entries.append(_Entry(relpath, "dir"))
                subdirs.append((Path(child.path), relpath, matcher))
                continue
            if not child.is_file(follow_symlinks=False):
                continue  # sockets, fifos, devices: never part of a workspace
            if child.name.endswith(SKIPPED_FILE_SUFFIXES) or matcher.ignored(relpath, is_dir=False):
                continue
            info = child.stat(follow_symlinks=False)
            scan.entries.append(
                _Entry(
                    relpath,
                    "file",
                    size=info.st_size,
                    mtime_ns=info.st_mtime_ns,
                    executable=bool(info.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)),
                )
            )
        stack.extend(reversed(subdirs))
    scan.entries.sort(key=lambda entry: entry.relpath)
    return scan


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _too_large_message(root: Path, entries: list[_Entry], total: int, max_bytes: int) -> str:
    by_top: dict[str, int] = {}
    for entry in entries:
        if entry.kind == "file":
            top, _, rest = entry.relpath.partition("/")
            key = f"{top}/" if rest else top
            by_top[key] = by_top.get(key, 0) + entry.size
    largest_top = sorted(by_top.items(), key=lambda item: (-item[1], item[0]))[:5]
    files = sorted((e for e in entries if e.kind == "file"), key=lambda e: (-e.size, e.relpath))[:5]
    return (
        f"workspace {root} is {_human(total)} after exclusions, over the {_human(max_bytes)} bundle "
        f"limit. Largest top-level entries: "
        + ", ".join(f"{name} ({_human(size)})" for name, size in largest_top)
        + ". Largest files: "
        + ", ".join(f"{e.relpath} ({_human(e.size)})" for e in files)
        + f". Exclude data, checkpoints and build outputs with a .gitignore entry in {root} "
        f"(for example `{largest_top[0][0]}`), move them out of the workspace, or raise the limit."
    )


def _signature(root: Path, scan: _Scan) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, "root": str(root)}).encode())
    for entry in scan.entries:
        digest.update(
            json.dumps(
                [entry.relpath, entry.kind, entry.size, entry.mtime_ns, entry.executable, entry.link_target]
            ).encode()
        )
        digest.update(b"\n")
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._sink.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.relpath)
    info.mtime = NORMALISED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link_target
        info.mode = 0o777
    else:
        info.type = tarfile.REGTYPE
        info.size = entry.size
        info.mode = 0o755 if entry.executable else 0o644
    return info


def _write_archive(root: Path, entries: list[_Entry], out) -> tuple[str, int]:
    hashing = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in entries:
                info = _tarinfo(entry)
                if entry.kind != "file":
                    tar.addfile(info)
                    continue
                path = root / entry.relpath
                with open(path, "rb") as source:
                    try:
                        tar.addfile(info, source)
                    except OSError as error:
                        raise WorkspaceError(
                            f"{path} changed while the workspace was being packed ({error}); "
                            f"pack again once writers to the workspace are done"
                        ) from error
                if os.stat(path).st_size != entry.size:
                    raise WorkspaceError(
                        f"{path} changed size while the workspace was being packed; pack again once "
                        f"writers to the workspace are done, or exclude it with a .gitignore entry"
                    )
    return hashing.sha256.hexdigest(), hashing.size


def _prune_cache(cache_dir: Path) -> None:
    """Keep the newest archives and records. Other processes pack into the same cache at the
    same time: their temporary files (dot-names) are theirs, and any file may vanish meanwhile."""
    for pattern, keep in ((f"*{ARCHIVE_SUFFIX}", CACHE_KEEP_ARCHIVES), ("*.json", 4 * CACHE_KEEP_ARCHIVES)):
        ages = []
        for path in cache_dir.glob(pattern):
            if path.name.startswith("."):
                continue
            try:
                ages.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        for _, stale in sorted(ages, reverse=True)[keep:]:
            stale.unlink(missing_ok=True)


def _cached(cache_dir: Path, signature: str) -> WorkspaceBundle | None:
    record_path = cache_dir / f"{signature}.json"
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    archive = cache_dir / f"{record['digest']}{ARCHIVE_SUFFIX}"
    try:
        if archive.stat().st_size != record["size"]:
            return None
    except FileNotFoundError:
        return None
    os.utime(archive)  # keeps recently used archives out of the pruning
    return WorkspaceBundle(
        digest=record["digest"],
        path=archive,
        size=record["size"],
        file_count=record["file_count"],
        skipped_symlinks=tuple(record.get("skipped_symlinks", ())),
        from_cache=True,
    )


def pack_workspace(root: Path, *, cache_dir: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> WorkspaceBundle:
    """Pack ``root`` into ``cache_dir`` (default: :func:`default_cache_dir`) and return the bundle.

    An unchanged tree (same paths, sizes and mtimes) is answered from the cache without reading
    file contents. Raises :class:`WorkspaceTooLargeError` naming the largest entries when the
    files to pack add up to more than ``max_bytes``.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise WorkspaceError(f"workspace {root} is not a directory; set EnvironmentConfig.workspace to a directory")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    scan = _scan(root)
    total = sum(entry.size for entry in scan.entries)
    if total > max_bytes:
        raise WorkspaceTooLargeError(_too_large_message(root, scan.entries, total, max_bytes))

    signature = _signature(root, scan)
    cached = _cached(cache_dir, signature)
    if cached is not None:
        return cached

    newest_mtime = max((entry.mtime_ns for entry in scan.entries), default=0) / 1e9
    fd, temp_name = tempfile.mkstemp(prefix=".packing-", suffix=ARCHIVE_SUFFIX, dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size = _write_archive(root, scan.entries, out)
        archive = cache_dir / f"{digest}{ARCHIVE_SUFFIX}"
        os.replace(temp_name, archive)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    file_count = sum(1 for entry in scan.entries if entry.kind != "dir")
    bundle = WorkspaceBundle(
        digest=digest,
        path=archive,
        size=size,
        file_count=file_count,
        skipped_symlinks=tuple(scan.skipped_symlinks),
    )
    if time.time() - newest_mtime > RACY_MTIME_SECONDS:
        record = {
            "digest": digest,
            "size": size,
            "file_count": file_count,
            "skipped_symlinks": list(scan.skipped_symlinks),
        }
        # Unique per thread too: two jobs of one controller may pack the same tree at once.
        record_tmp = cache_dir / f".{signature}.json.{os.getpid()}.{threading.get_ident()}"
        record_tmp.write_text(json.dumps(record))
        os.replace(record_tmp, cache_dir / f"{signature}.json")
    _prune_cache(cache_dir)
    return bundle


def check_workspace_lock(workspace: Path | None, uv: str | None = None, *,
                         timeout: float = LOCK_CHECK_TIMEOUT_SECONDS) -> None:
    """Before anything is provisioned: a workspace with ``pyproject.toml`` and ``uv.lock`` must
    have a lock that matches its pyproject (``uv lock --check`` with the workspace's own index
    settings, where the lock was made). Raises with uv's message."""
    if not is_locked_workspace(workspace):
        return
    command = [uv or find_uv(), "lock", "--check"]
    env = {key: value for key, value in os.environ.items() if key not in (*INDEX_VARS, *REDIRECTING_VARS)}
    env["UV_NO_PROGRESS"] = "1"
    code, tail = run_streaming(command, cwd=Path(workspace), env=env, timeout=timeout, log=lambda line: None)
    if code != 0:
        raise EnvironmentBuildError(
            f"the workspace's uv.lock does not match its pyproject.toml ({workspace}): run `uv lock` there and "
            f"launch again. uv lock --check said:\n{uv_message(tail)}"
        )
