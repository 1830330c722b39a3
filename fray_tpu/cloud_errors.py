"""What a Cloud TPU create error means, and what to do about it (pure; no I/O).

Google answers a create in two places: the POST itself (a gRPC status with ``ErrorInfo`` and
``QuotaFailure`` details, which google-api-core decodes into ``error.reason`` and
``error.details``) and, later, the create operation (a ``google.rpc.Status``). Each answer is
sorted by what can fix it (see ../shared/tpu-facts.md):

- ``NEXT_ZONE``: no capacity here (stockout, reservation short, spot code 13, preempted while
  creating, a per-zone resource quota). Charged to nobody; the next zone may have it.
- ``SKIP_REGION``: a per-region resource quota; every zone of the region is out.
- ``SKIP_ZONE``: this zone is not for this project or type (org policy, location not allowed,
  type not offered there). Retrying never heals it; say why and skip it.
- ``RATE_LIMITED``: a per-minute request limit. Wait and retry the same zone.
- ``TRANSIENT``: 5xx-like; retried in place by the caller's retry policy.
- ``FATAL``: nothing will fix it by retrying (permission, API disabled, credentials, a bad
  runtime version or label): fail the job now with the API's message and the fix.

The structured fields decide: status code, ``ErrorInfo.reason``, ``QuotaFailure`` quota ids. The
two answers Google gives without any detail (the zonal accelerator configuration message on 400
and the "preempted while creating" message on an operation's code 3) are recognised by the phrase
Google uses, because nothing else tells them apart from a bad request.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from google.api_core import exceptions as api_exceptions
from google.protobuf import any_pb2, message
from google.rpc import code_pb2, error_details_pb2

from fray_tpu.contract import (
    REASON_IAM_PERMISSION_DENIED,
    REASON_LOCATION_POLICY,
    REASON_QUOTA,
    REASON_RATE_LIMIT,
    REASON_SERVICE_DISABLED,
)

ZONAL_CONFIG_PHRASE = "could not be found in the zonal accelerator configurations"
PREEMPTED_WHILE_CREATING_PHRASE = "while in state PREEMPTED"
# An organization policy constraint refused the request ("Constraint constraints/compute.vmExternalIpAccess
# violated for project N ..."): GCE answers 412 conditionNotMet, FAILED_PRECONDITION in gRPC.
ORG_POLICY_PHRASE = "Constraint constraints/"


class CreateAction(enum.Enum):
    NEXT_ZONE = "next zone"
    SKIP_REGION = "skip region"
    SKIP_ZONE = "skip zone"
    RATE_LIMITED = "rate limited"
    TRANSIENT = "transient"
    FATAL = "fatal"


@dataclass(frozen=True)
class CreateVerdict:
    action: CreateAction
    reason: str  # short, for a zone list: "out of capacity", "forbidden by org policy", ...
    message: str  # the API's own message
    fix: str = ""

    def describe(self) -> str:
        return f"{self.reason}: {self.message}" + (f" ({self.fix})" if self.fix else "")


def _unpacked(details: Iterable[object]) -> list[message.Message]:
    """Decoded detail messages; ``Any`` values are unpacked into the types we know."""
    known = (error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure)
    result: list[message.Message] = []
    for detail in details:
        if isinstance(detail, any_pb2.Any):
            for kind in known:
                if detail.Is(kind.DESCRIPTOR):
                    value = kind()
                    detail.Unpack(value)
                    result.append(value)
        elif isinstance(detail, message.Message):
            result.append(detail)
    return result


def _reason(details: Sequence[message.Message]) -> str:
    for detail in details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return detail.reason
    return ""


def _quota_ids(details: Sequence[message.Message]) -> list[str]:
    ids: list[str] = []
    for detail in details:
        if isinstance(detail, error_details_pb2.QuotaFailure):
            ids.extend(v.quota_id or v.quota_metric or v.subject for v in detail.violations)
    return ids


def classify(code: int, message_text: str, details: Iterable[object] = (), *, capacity: str = "", on_operation: bool = False) -> CreateVerdict:
    """The verdict on one create error: ``code`` a google.rpc code, ``details`` decoded or packed
    detail messages, ``capacity`` the slice's capacity class (code 13 on spot is a stockout),
    ``on_operation`` whether it came on the create operation rather than the POST."""
    decoded = _unpacked(details)
    reason = _reason(decoded)
    quotas = _quota_ids(decoded)
    text = message_text or code_pb2.Code.Name(code)

    def verdict(action: CreateAction, why: str, fix: str = "") -> CreateVerdict:
        return CreateVerdict(action, why, text, fix)

    if code == code_pb2.RESOURCE_EXHAUSTED:
        if on_operation:
            return verdict(CreateAction.NEXT_ZONE, "out of capacity")
        if reason == REASON_RATE_LIMIT or any("PerMinute" in q for q in quotas) or (not quotas and reason != REASON_QUOTA):
            return verdict(CreateAction.RATE_LIMITED, "request rate limit")
        if any("PerRegion" in q for q in quotas):
            return verdict(CreateAction.SKIP_REGION, f"region quota {', '.join(quotas)} exhausted",
                           "ask for more quota or free some in this region")
        return verdict(CreateAction.NEXT_ZONE, f"zone quota {', '.join(quotas) or 'exhausted'}",
                       "ask for more quota or free some in this zone")
    if code == code_pb2.FAILED_PRECONDITION and ORG_POLICY_PHRASE in text:
        # An organization policy holds for the whole project (e.g. vmExternalIpAccess): no zone helps.
        return verdict(CreateAction.FATAL, "forbidden by an organization policy",
                       "have the policy changed, or change the request it forbids (external IPs: connect=internal "
                       "with the controller inside the VPC)")
    if code == code_pb2.FAILED_PRECONDITION and on_operation:
        return verdict(CreateAction.NEXT_ZONE, "out of reserved capacity")
    if code == code_pb2.INTERNAL and on_operation and capacity == "spot":
        return verdict(CreateAction.NEXT_ZONE, "out of spot capacity")
    if code == code_pb2.INVALID_ARGUMENT and on_operation and PREEMPTED_WHILE_CREATING_PHRASE in text:
        return verdict(CreateAction.NEXT_ZONE, "preempted while creating")
    if code == code_pb2.DEADLINE_EXCEEDED and on_operation:
        return verdict(CreateAction.NEXT_ZONE, "queued request expired without capacity")
    if code == code_pb2.ABORTED and on_operation:
        return verdict(CreateAction.NEXT_ZONE, "creation aborted")
    if code == code_pb2.PERMISSION_DENIED:
        if reason == REASON_LOCATION_POLICY:
            return verdict(CreateAction.SKIP_ZONE, "forbidden by the organization's location policy",
                           "remove the zone from the config or ask for the org policy to allow it")
        if reason == REASON_SERVICE_DISABLED:
            return verdict(CreateAction.FATAL, "the Cloud TPU API is not enabled",
                           "run `gcloud services enable tpu.googleapis.com --project PROJECT`")
        if reason == REASON_IAM_PERMISSION_DENIED or "tpu." in text:
            return verdict(CreateAction.FATAL, "permission denied",
                           "grant the caller the TPU Admin role (roles/tpu.admin) on the project")
        return verdict(CreateAction.SKIP_ZONE, "location not allowed for this project",
                       "remove the zone from the config or check the project's allowed locations")
    if code == code_pb2.NOT_FOUND:
        return verdict(CreateAction.SKIP_ZONE, "location not found", "remove the zone from the config")
    if code == code_pb2.INVALID_ARGUMENT and ZONAL_CONFIG_PHRASE in text:
        return verdict(CreateAction.SKIP_ZONE, "type not offered in this zone",
                       "`fray-tpu doctor` lists the zones that offer it")
    if code == code_pb2.UNAUTHENTICATED:
        return verdict(CreateAction.FATAL, "not authenticated",
                       "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")
    if code in (code_pb2.UNAVAILABLE, code_pb2.DEADLINE_EXCEEDED, code_pb2.INTERNAL) and not on_operation:
        return verdict(CreateAction.TRANSIENT, "transient API error")
    if code == code_pb2.INVALID_ARGUMENT:
        return verdict(CreateAction.FATAL, "invalid request", "fix the request (runtime version, labels, type)")
    return verdict(CreateAction.FATAL, f"create failed ({code_pb2.Code.Name(code) if code in code_pb2.Code.values() else code})")


def classify_call_error(error: api_exceptions.GoogleAPICallError, *, capacity: str = "") -> CreateVerdict:
    """The verdict on a create POST that failed (google-api-core exception with its details)."""
    code = error.grpc_status_code.value[0] if error.grpc_status_code is not None else code_pb2.UNKNOWN
    return classify(code, error.message, error.details or (), capacity=capacity)


class CreateRateLimiter:
    """One per controller and project: at most ``per_minute`` create calls in any 60 s, so many
    jobs retrying after a stockout cannot flood the API (Google's create limit is about 91/min).
    ``clock`` and ``wait`` are injected so tests need no sleeps."""

    def __init__(self, per_minute: float = 45.0, *, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError(f"create rate limit {per_minute!r} must be > 0 per minute")
        self._interval = 60.0 / per_minute
        self._burst = max(1.0, per_minute / 6)  # up to 10 s worth at once
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._updated = clock()

    def reserve(self) -> float:
        """Take one create slot; returns how long to wait before using it (0: now)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._updated) / self._interval)
            self._updated = now
            self._tokens -= 1
            return 0.0 if self._tokens >= 0 else -self._tokens * self._interval
