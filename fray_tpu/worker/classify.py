"""Exit classification hints: which stderr lines mean the host, not the user's code, is broken."""

from __future__ import annotations

import re

from fray_tpu.proto import worker_pb2

# Seen when a TPU is dirty, held by another process, or missing (tpu-facts.md; marin #5258).
BAD_HOST_SIGNATURES = (
    "Couldn't open iommu group",
    "open(/dev/vfio",
    "Failed to initialize TPU system",
    "TPU initialization failed",
    "No accelerator found",
    "Device or resource busy",
)
_BAD_HOST_PATTERN = re.compile("|".join(re.escape(s) for s in BAD_HOST_SIGNATURES).encode())


def find_bad_host_line(data: bytes) -> str | None:
    """The first line of `data` (whole lines) that carries a bad-host signature, if any."""
    match = _BAD_HOST_PATTERN.search(data)
    if match is None:
        return None
    start = data.rfind(b"\n", 0, match.start()) + 1
    end = data.find(b"\n", match.end())
    return data[start : end if end >= 0 else len(data)].decode("utf-8", errors="replace").strip()


def classify_exit(*, returncode: int, cancel_reason: str | None, preempted: bool,
                  bad_host_line: str | None) -> tuple[int, str]:
    """(Classification, reason) of an attempt that ended with `returncode` (negative: signal)."""
    if cancel_reason is not None:
        return worker_pb2.CANCELLED, cancel_reason
    if returncode == 0:
        return worker_pb2.OK, ""
    if preempted:
        return worker_pb2.PREEMPTED, "the metadata server reports the VM as preempted"
    if bad_host_line is not None:
        return worker_pb2.BAD_HOST, f"bad-host signature in stderr: {bad_host_line[:500]}"
    if returncode < 0:
        return worker_pb2.USER_FAILURE, f"killed by signal {-returncode}"
    return worker_pb2.USER_FAILURE, f"exit code {returncode}"
