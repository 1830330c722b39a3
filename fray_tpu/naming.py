"""Names and labels of the Cloud resources fray-tpu creates, and the ids of jobs and controllers.

GCP rules (tpu-facts.md): resource names match ``^[a-z]([a-z0-9-]*[a-z0-9])?$`` and have at most
63 characters; label keys match ``^[a-z][a-z0-9_-]{0,62}$`` and values ``^[a-z0-9_-]{0,63}$``; a
resource carries at most 64 labels. Every resource fray-tpu creates carries the ``fray-tpu-*``
labels below, which is how ``gc`` finds what a dead controller left behind.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
from collections.abc import Mapping
from datetime import datetime, timezone

UTC = timezone.utc  # datetime.UTC is 3.11+; the agent runs on the images' 3.10

from fray_tpu.errors import ConfigError

NAME_PATTERN = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")
MAX_NAME_LENGTH = 63
LABEL_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_PATTERN = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_LABELS = 64

RESERVED_LABEL_PREFIX = "fray-tpu-"
LABEL_MANAGED = "fray-tpu-managed"
LABEL_JOB = "fray-tpu-job"
LABEL_ATTEMPT = "fray-tpu-attempt"
LABEL_CONTROLLER = "fray-tpu-controller"
LABEL_SLICE = "fray-tpu-slice"
MANAGED_VALUE = "true"
MANAGED_LABELS = (LABEL_MANAGED, LABEL_JOB, LABEL_ATTEMPT, LABEL_CONTROLLER, LABEL_SLICE)

SLICE_NAME_PREFIX = "fray-"
_JOB_HASH_LENGTH = 10  # 40 bits of the job id: distinct slices even when job names collide


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def sanitize(text: str, allowed: str = "a-z0-9", replacement: str = "-") -> str:
    """Lower-case ``text``, runs of other characters become one ``replacement``, trimmed."""
    cleaned = re.sub(f"[^{allowed}]+", replacement, str(text).lower())
    return cleaned.strip("-_")


def slice_name(job_name: str, job_id: str, attempt: int, slice_index: int) -> str:
    """A valid, unique node name for one slice of one attempt: ``fray-<name>-<hash>-<attempt>-<slice>``.

    The readable part is the sanitised job name, cut to fit; the hash of the job id keeps names
    distinct when job names collide or are cut.
    """
    _require_index("attempt", attempt)
    _require_index("slice_index", slice_index)
    tail = f"-{short_hash(job_id, _JOB_HASH_LENGTH)}-{attempt}-{slice_index}"
    room = MAX_NAME_LENGTH - len(SLICE_NAME_PREFIX) - len(tail)
    readable = sanitize(job_name)[:room].strip("-") or "job"
    return f"{SLICE_NAME_PREFIX}{readable}{tail}"


def label_value(text: str) -> str:
    """``text`` itself when it is a valid label value; otherwise a sanitised prefix plus a hash of
    the original, so distinct inputs keep distinct values."""
    original = str(text)
    if LABEL_VALUE_PATTERN.match(original):
        return original
    cleaned = sanitize(original, allowed="a-z0-9_-", replacement="_")
    return f"{cleaned[:54]}-{short_hash(original)}"


def resource_labels(
    job_id: str,
    attempt: int,
    controller_id: str,
    slice_index: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The labels of one slice: the user's validated extra labels plus fray-tpu's own."""
    _require_index("attempt", attempt)
    _require_index("slice_index", slice_index)
    labels = validate_extra_labels(extra or {})
    labels.update(
        {
            LABEL_MANAGED: MANAGED_VALUE,
            LABEL_JOB: label_value(job_id),
            LABEL_ATTEMPT: str(attempt),
            LABEL_CONTROLLER: label_value(controller_id),
            LABEL_SLICE: str(slice_index),
        }
    )
    return labels


def validate_extra_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """User labels checked against GCP's rules; the ``fray-tpu-`` prefix is reserved."""
    room = MAX_LABELS - len(MANAGED_LABELS)
    if len(labels) > room:
        raise ConfigError(f"{len(labels)} extra labels given; at most {room} fit beside fray-tpu's own {len(MANAGED_LABELS)}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_PATTERN.match(key):
            suggestion = sanitize(str(key), allowed="a-z0-9_-", replacement="_")
            raise ConfigError(
                f"Label key {key!r} is invalid: keys start with a lower-case letter and hold at most 63 of "
                f"a-z 0-9 _ - (try {suggestion!r})"
            )
        if key.startswith(RESERVED_LABEL_PREFIX):
            raise ConfigError(f"Label key {key!r} uses the prefix {RESERVED_LABEL_PREFIX!r}, reserved for fray-tpu; rename it")
        text = "" if value is None else str(value)
        if not LABEL_VALUE_PATTERN.match(text):
            raise ConfigError(
                f"Label {key}={text!r} has an invalid value: values hold at most 63 of a-z 0-9 _ - "
                f"(try {label_value(text)!r})"
            )
        checked[key] = text
    return checked


def new_job_id(name: str, now: datetime | None = None) -> str:
    """A unique, readable job id: ``<name>-<UTC yyyymmdd-hhmmss>-<8 random hex>``.

    It is also a valid label value (lower case, at most 63 characters).
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    readable = sanitize(name)[:30].strip("-") or "job"
    return f"{readable}-{moment:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


def new_controller_id(hostname: str | None = None) -> str:
    """An id for one controller process: ``<host>-<8 random hex>``, a valid label value."""
    host = sanitize(hostname if hostname is not None else socket.gethostname())[:40].strip("-") or "controller"
    return f"{host}-{secrets.token_hex(4)}"


def _require_index(what: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
