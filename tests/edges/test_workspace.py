"""Workspace packing: gitignore rules, skip rules, determinism, size limit, symlinks, caching."""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from package_fixtures import PYPROJECT, lock_workspace, uv_workspace

from fray_tpu.errors import EnvironmentBuildError
from fray_tpu.gitignore import IgnoreMatcher, parse_gitignore
from fray_tpu.workspace import WorkspaceTooLargeError, check_workspace_lock, pack_workspace

PAST = time.time() - 3600


def _write(root: Path, relpath: str, content: str = "x") -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _age(root: Path) -> None:
    """Make every mtime old, so the tree is not 'racy' for the signature cache."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (PAST, PAST), follow_symlinks=False)


def _members(bundle) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle.path, "r:gz") as tar:
        return {member.name: member for member in tar.getmembers()}


@pytest.mark.parametrize(
    ("patterns", "path", "is_dir", "ignored"),
    [
        ("*.log", "a.log", False, True),
        ("*.log", "deep/er/a.log", False, True),
        ("*.log", "a.log.txt", False, False),
        ("build/", "build", True, True),
        ("build/", "build", False, False),  # directory-only pattern, plain file
        ("build/", "src/build", True, True),
        ("/build", "build", True, True),
        ("/build", "src/build", True, False),  # anchored to the .gitignore's directory
        ("doc/*.txt", "doc/a.txt", False, True),
        ("doc/*.txt", "doc/sub/a.txt", False, False),  # `*` does not cross `/`
        ("doc/*.txt", "x/doc/a.txt", False, False),  # a middle slash anchors too
        ("**/logs", "a/b/logs", True, True),
        ("**/logs", "logs", True, True),
        ("a/**/b", "a/b", False, True),
        ("a/**/b", "a/x/y/b", False, True),
        ("a/**", "a/x/y", False, True),
        ("a/**", "a", True, False),
        ("*.log\n!keep.log", "keep.log", False, False),
        ("*.log\n!keep.log", "drop.log", False, True),
        ("!keep.log\n*.log", "keep.log", False, True),  # last match wins
        ("file?.txt", "file1.txt", False, True),
        ("file?.txt", "file10.txt", False, False),
        ("data[0-9].bin", "data7.bin", False, True),
        ("data[!0-9].bin", "data7.bin", False, False),
        ("data[!0-9].bin", "datax.bin", False, True),
        ("# comment\n\n", "# comment", False, False),
        ("\\#hash", "#hash", False, True),
        ("\\!bang", "!bang", False, True),
        ("trail   ", "trail", False, True),
        ("*", ".hidden", False, True),
    ],
)
def test_gitignore_patterns(patterns: str, path: str, is_dir: bool, ignored: bool) -> None:
    matcher = IgnoreMatcher().extended(parse_gitignore(patterns))
    assert matcher.ignored(path, is_dir) is ignored


def test_nested_gitignore_overrides_and_is_scoped_to_its_directory() -> None:
    matcher = (
        IgnoreMatcher()
        .extended(parse_gitignore("*.csv\n"))
        .extended(parse_gitignore("!keep.csv\n/local.txt\n", base="sub"))
    )
    assert matcher.ignored("sub/keep.csv", False) is False
    assert matcher.ignored("keep.csv", False) is True
    assert matcher.ignored("sub/local.txt", False) is True
    assert matcher.ignored("local.txt", False) is False
    assert matcher.ignored("sub/deeper/local.txt", False) is False


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    _write(root, "main.py", "print('hi')\n")
    _write(root, "pkg/__init__.py", "")
    _write(root, "pkg/mod.py", "VALUE = 1\n")
    _write(root, ".gitignore", "*.log\ndata/\n/out\n!important.log\n")
    _write(root, "run.log")
    _write(root, "important.log")
    _write(root, "data/big.bin", "0" * 100)
    _write(root, "out/result.txt")
    _write(root, "pkg/out/kept.txt")  # `/out` is anchored: only the top-level one is excluded
    _write(root, "pkg/.gitignore", "secret.txt\n!run.log\n")
    _write(root, "pkg/secret.txt")
    _write(root, "pkg/run.log")  # re-included by the deeper .gitignore
    _write(root, ".git/HEAD", "ref: refs/heads/main\n")
    _write(root, ".git/info/exclude", "excluded_by_git_info.txt\n")
    _write(root, "excluded_by_git_info.txt")
    _write(root, "myenv/pyvenv.cfg", "home = /usr/bin\n")
    _write(root, "myenv/lib/site.py")
    _write(root, "pkg/__pycache__/mod.cpython-311.pyc")
    _write(root, "stray.pyc")
    _write(root, ".pytest_cache/v/cache")
    _write(root, ".mypy_cache/x.json")
    _write(root, "web/node_modules/left-pad/index.js")
    _write(root, "web/app.js")
    script = _write(root, "tools/run.sh", "#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    _age(root)
    return root


def test_pack_keeps_sources_and_skips_ignored_vcs_envs_and_caches(tree: Path, tmp_path: Path) -> None:
    bundle = pack_workspace(tree, cache_dir=tmp_path / "cache")
    files = {name for name, member in _members(bundle).items() if member.isfile()}
    assert files == {
        ".gitignore",
        "important.log",
        "main.py",
        "pkg/.gitignore",
        "pkg/__init__.py",
        "pkg/mod.py",
        "pkg/out/kept.txt",
        "pkg/run.log",
        "tools/run.sh",
        "web/app.js",
    }
    assert bundle.file_count == len(files)
    assert bundle.size == bundle.path.stat().st_size
    assert len(bundle.digest) == 64


def test_pack_normalises_metadata(tree: Path, tmp_path: Path) -> None:
    members = _members(pack_workspace(tree, cache_dir=tmp_path / "cache"))
    assert members["tools/run.sh"].mode == 0o755
    assert members["main.py"].mode == 0o644
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}
    assert len({m.mtime for m in members.values()}) == 1
    assert list(members) == sorted(members)


def test_same_tree_gives_same_digest_anywhere(tree: Path, tmp_path: Path) -> None:
    first = pack_workspace(tree, cache_dir=tmp_path / "cache-a")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, copy, symlinks=True)  # fresh mtimes, different root
    second = pack_workspace(copy, cache_dir=tmp_path / "cache-b")
    assert second.digest == first.digest
    assert second.path.read_bytes() == first.path.read_bytes()

    (copy / "pkg" / "mod.py").write_text("VALUE = 2\n")
    assert pack_workspace(copy, cache_dir=tmp_path / "cache-b").digest != first.digest
    (copy / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (copy / "main.py").chmod(0o755)
    assert pack_workspace(copy, cache_dir=tmp_path / "cache-b").digest != first.digest


def test_unchanged_tree_is_answered_from_the_cache(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = pack_workspace(tree, cache_dir=cache)
    again = pack_workspace(tree, cache_dir=cache)
    assert (first.from_cache, again.from_cache) == (False, True)
    assert again.digest == first.digest and again.path == first.path

    _write(tree, "pkg/new.py", "NEW = 1\n")
    changed = pack_workspace(tree, cache_dir=cache)
    assert changed.from_cache is False
    assert changed.digest != first.digest
    assert "pkg/new.py" in _members(changed)


def test_too_large_names_size_limit_largest_entries_and_fix(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    _write(root, "train.py", "print(1)\n")
    _write(root, "checkpoints/step1.bin", "0" * 5000)
    _write(root, "checkpoints/step2.bin", "0" * 4000)
    with pytest.raises(WorkspaceTooLargeError) as caught:
        pack_workspace(root, cache_dir=tmp_path / "cache", max_bytes=2048)
    message = str(caught.value)
    assert "8.8 KiB" in message  # the size (9009 bytes)
    assert "2.0 KiB" in message  # the limit
    assert "checkpoints/ (8.8 KiB)" in message
    assert "checkpoints/step1.bin" in message
    assert ".gitignore" in message

    _write(root, ".gitignore", "checkpoints/\n")
    assert pack_workspace(root, cache_dir=tmp_path / "cache", max_bytes=2048).file_count == 2


def test_symlinks_inside_are_kept_others_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    _write(root, "pkg/real.py", "A = 1\n")
    _write(tmp_path / "outside", "secret.txt")
    (root / "alias.py").symlink_to("pkg/real.py")
    (root / "pkg" / "up.py").symlink_to("../alias.py")
    (root / "abs.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    (root / "escape.txt").symlink_to("../outside/secret.txt")
    bundle = pack_workspace(root, cache_dir=tmp_path / "cache")
    members = _members(bundle)
    assert members["alias.py"].issym() and members["alias.py"].linkname == "pkg/real.py"
    assert members["pkg/up.py"].issym()
    assert "abs.txt" not in members and "escape.txt" not in members
    assert sorted(link.split(" ->")[0] for link in bundle.skipped_symlinks) == ["abs.txt", "escape.txt"]


def test_not_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        pack_workspace(tmp_path / "missing", cache_dir=tmp_path / "cache")


def test_gitignore_files_above_the_workspace_inside_its_repository_apply(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write(repo, ".git/HEAD", "ref: refs/heads/main\n")
    _write(repo, ".git/info/exclude", "*.scratch\n")
    _write(repo, ".gitignore", "*.ckpt\n/exp/local/\n/notes.txt\n")
    _write(repo, "exp/.gitignore", "!keep.ckpt\n")
    for relpath in ("exp/train.py", "exp/model.ckpt", "exp/keep.ckpt", "exp/local/x.py", "exp/notes.txt", "exp/a.scratch"):
        _write(repo, relpath)
    bundle = pack_workspace(repo / "exp", cache_dir=tmp_path / "cache")
    files = {name for name, member in _members(bundle).items() if member.isfile()}
    # `/notes.txt` is anchored to the repository root, so exp/notes.txt stays.
    assert files == {".gitignore", "train.py", "keep.ckpt", "notes.txt"}


def test_a_lock_that_does_not_match_its_pyproject_fails_the_check_with_uvs_words(package_index, tmp_path) -> None:
    """The controller's check, before anything is provisioned: no workspace and a current lock
    pass, a lock older than a dependency added to pyproject.toml fails with uv lock --check's message."""
    workspace = uv_workspace(tmp_path)
    lock_workspace(workspace, package_index.url)
    check_workspace_lock(workspace)
    check_workspace_lock(None)
    (workspace / "pyproject.toml").write_text(PYPROJECT.replace('dependencies = ["six"]', 'dependencies = ["six", "tomli"]'))
    with pytest.raises(EnvironmentBuildError, match=r"(?s)does not match its pyproject.toml.*run `uv lock`.*"
                                                    r"needs to be updated"):
        check_workspace_lock(workspace)


def test_concurrent_packs_of_one_workspace_in_one_process_all_get_a_whole_archive(tmp_path):
    """Jobs of one controller pack the same tree at once (16 launches in a burst): each pack gets
    an archive that exists and holds every file, and the cache ends with one archive and one record."""
    root = tmp_path / "ws"
    for i in range(40):
        _write(root, f"pkg/module_{i}.py", f"VALUE = {i}\n" * 50)
    _age(root)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=16) as pool:
        bundles = list(pool.map(lambda _: pack_workspace(root, cache_dir=cache), range(16)))
    assert len({bundle.digest for bundle in bundles}) == 1
    for bundle in bundles:
        assert bundle.path.exists() and bundle.file_count == 40
        assert len([m for m in _members(bundle).values() if m.isfile()]) == 40
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    assert len(list(cache.glob("*.json"))) == 1 and [p.name for p in cache.iterdir() if not p.name.endswith(".json")] \
        == [bundles[0].path.name]
