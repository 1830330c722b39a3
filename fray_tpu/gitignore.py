"""The `.gitignore` pattern language (gitignore(5)), for deciding what a workspace bundle leaves out.

Supported: comments and blank lines, escaped leading `#`/`!` and trailing spaces, negation `!`,
directory-only patterns `dir/`, anchored patterns (a `/` at the start or in the middle), `*`, `?`,
bracket classes, and `**` as a leading, middle or trailing path segment. Deeper `.gitignore`
files override shallower ones; within a file the last matching pattern wins. Re-including a file
below an excluded directory is impossible, as in git, because walkers prune excluded directories.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class IgnoreRule:
    """One pattern line, compiled; ``base`` is the directory (relative, posix, '' for the root)
    holding the `.gitignore` it came from. A `.gitignore` ABOVE the walk root has ``outer``: the
    walk root's path relative to that file's directory."""

    pattern: str
    base: str
    negated: bool
    dir_only: bool
    regex: re.Pattern[str]
    outer: str = ""

    def matches(self, relpath: str, is_dir: bool) -> bool:
        """Whether this rule matches ``relpath`` (posix, relative to the walk root)."""
        if self.dir_only and not is_dir:
            return False
        if self.outer:
            relpath = f"{self.outer}/{relpath}"
        elif self.base:
            if not relpath.startswith(self.base + "/"):
                return False
            relpath = relpath[len(self.base) + 1 :]
        return self.regex.fullmatch(relpath) is not None


def _strip_trailing_spaces(line: str) -> str:
    end = len(line)
    while end > 0 and line[end - 1] == " ":
        if end >= 2 and line[end - 2] == "\\":
            # An escaped space stays (without its backslash).
            return line[: end - 2] + " "
        end -= 1
    return line[:end]


def _bracket(pattern: str, start: int) -> tuple[str, int] | None:
    """Translate the bracket class opening at ``pattern[start]``; None when it never closes."""
    i = start + 1
    if i < len(pattern) and pattern[i] in "!^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    if i >= len(pattern):
        return None
    body = pattern[start + 1 : i]
    negated = body[:1] in ("!", "^")
    if negated:
        body = body[1:]
    escaped = body.replace("\\", "\\\\").replace("[", "\\[")
    # A class never matches the path separator.
    return f"(?!/)[{'^' if negated else ''}{escaped}]", i + 1


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "\\" and i + 1 < len(segment):
            out.append(re.escape(segment[i + 1]))
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            translated = _bracket(segment, i)
            if translated is None:
                out.append(re.escape(char))
                i += 1
            else:
                out.append(translated[0])
                i = translated[1]
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    segments = pattern.split("/")
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Trailing `/**`: everything inside; leading or middle `**/`: zero or more directories.
            out.append(".*" if last else "(?:[^/]*/)*")
            continue
        out.append(_segment_regex(segment))
        if not last:
            out.append("/")
    return re.compile("".join(out), re.DOTALL)


def parse_gitignore(text: str, base: str = "", outer: str = "") -> list[IgnoreRule]:
    """Compile the patterns of one `.gitignore` file located in directory ``base`` (or, with
    ``outer``, in an ancestor of the walk root; see :class:`IgnoreRule`)."""
    rules: list[IgnoreRule] = []
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        line = _strip_trailing_spaces(line)
        negated = line.startswith("!")
        if negated:
            line = line[1:]
        elif line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        dir_only = line.endswith("/") and not line.endswith("\\/")
        line = line.rstrip("/") if dir_only else line
        if not line:
            continue
        anchored = "/" in line
        body = line.lstrip("/") if anchored else "**/" + line
        if not body:
            continue
        rules.append(IgnoreRule(raw.strip(), base, negated, dir_only, _pattern_regex(body), outer))
    return rules


@dataclass(frozen=True)
class IgnoreMatcher:
    """The rules in force for a directory: its ancestors' files first, its own last."""

    rules: tuple[IgnoreRule, ...] = ()

    def extended(self, rules: list[IgnoreRule]) -> IgnoreMatcher:
        return IgnoreMatcher(self.rules + tuple(rules)) if rules else self

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        verdict = False
        for rule in self.rules:
            if rule.matches(relpath, is_dir):
                verdict = not rule.negated
        return verdict
