"""Create-error classification (pure): status, ErrorInfo.reason and QuotaFailure decide; the
create limiter on a fake clock."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as api_exceptions
from google.rpc import code_pb2, error_details_pb2

from fray_tpu.cloud_errors import CreateAction, CreateRateLimiter, classify, classify_call_error


def info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="googleapis.com")


def quota(quota_id: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(quota_id=quota_id)])


@pytest.mark.parametrize(
    ("code", "message", "details", "capacity", "on_operation", "action"),
    [
        (code_pb2.RESOURCE_EXHAUSTED, "There is no more capacity in the zone", [], "spot", True, CreateAction.NEXT_ZONE),
        (code_pb2.FAILED_PRECONDITION, "Insufficient reserved capacity", [], "reserved", True, CreateAction.NEXT_ZONE),
        (code_pb2.FAILED_PRECONDITION, "Constraint constraints/compute.vmExternalIpAccess violated for project 1.", [],
         "spot", True, CreateAction.FATAL),
        (code_pb2.INTERNAL, "An internal error has occurred", [], "spot", True, CreateAction.NEXT_ZONE),
        (code_pb2.INTERNAL, "An internal error has occurred", [], "on-demand", True, CreateAction.FATAL),
        (code_pb2.INVALID_ARGUMENT, "Operation not supported while in state PREEMPTED", [], "spot", True,
         CreateAction.NEXT_ZONE),
        (code_pb2.RESOURCE_EXHAUSTED, "Quota exceeded", [info("RESOURCE_QUOTA_EXCEEDED"),
                                                          quota("TPUV4PodPerProjectPerZoneForTPUAPI")], "", False,
         CreateAction.NEXT_ZONE),
        (code_pb2.RESOURCE_EXHAUSTED, "Quota exceeded", [quota("TPUV4PodPerProjectPerRegionForTPUAPI")], "", False,
         CreateAction.SKIP_REGION),
        (code_pb2.RESOURCE_EXHAUSTED, "Quota exceeded for quota metric", [info("RATE_LIMIT_EXCEEDED")], "", False,
         CreateAction.RATE_LIMITED),
        (code_pb2.RESOURCE_EXHAUSTED, "Quota exceeded", [quota("CreateNodeRequestsPerMinutePerProject")], "", False,
         CreateAction.RATE_LIMITED),
        (code_pb2.RESOURCE_EXHAUSTED, "slow down", [], "", False, CreateAction.RATE_LIMITED),
        (code_pb2.PERMISSION_DENIED, "Location violates constraint", [info("LOCATION_POLICY_VIOLATED")], "", False,
         CreateAction.SKIP_ZONE),
        (code_pb2.PERMISSION_DENIED, "Location us-x1-a is not found or access is unauthorized", [], "", False,
         CreateAction.SKIP_ZONE),
        (code_pb2.PERMISSION_DENIED, "API disabled", [info("SERVICE_DISABLED")], "", False, CreateAction.FATAL),
        (code_pb2.PERMISSION_DENIED, "Permission 'tpu.nodes.create' denied", [], "", False, CreateAction.FATAL),
        (code_pb2.UNAUTHENTICATED, "invalid credentials", [], "", False, CreateAction.FATAL),
        (code_pb2.INVALID_ARGUMENT, "Accelerator configuration x could not be found in the zonal accelerator "
         "configurations", [], "", False, CreateAction.SKIP_ZONE),
        (code_pb2.INVALID_ARGUMENT, "Invalid label value", [], "", False, CreateAction.FATAL),
        (code_pb2.UNAVAILABLE, "try again", [], "", False, CreateAction.TRANSIENT),
    ],
)
def test_each_answer_gets_its_action(code, message, details, capacity, on_operation, action):
    """Every shape of create error in tpu-facts.md maps to the action that can fix it."""
    verdict = classify(code, message, details, capacity=capacity, on_operation=on_operation)
    assert verdict.action is action, verdict
    assert verdict.message == message


def test_api_core_exceptions_are_classified_by_their_decoded_details():
    """A google-api-core exception carries its details; its gRPC status decides the code."""
    error = api_exceptions.PermissionDenied("Location forbidden", details=[info("LOCATION_POLICY_VIOLATED")])
    assert classify_call_error(error).action is CreateAction.SKIP_ZONE
    fatal = api_exceptions.PermissionDenied("Permission 'tpu.nodes.create' denied")
    assert "roles/tpu.admin" in classify_call_error(fatal).fix


def test_create_rate_limiter_spaces_creates_beyond_its_burst():
    """The limiter lets a burst through, then spaces creates at its rate (fake clock)."""
    now = [0.0]
    limiter = CreateRateLimiter(per_minute=60, clock=lambda: now[0])
    waits = [limiter.reserve() for _ in range(12)]
    assert waits[:10] == [0.0] * 10  # burst: 10 s worth
    assert waits[10:] == pytest.approx([1.0, 2.0])
    now[0] = 60.0
    assert limiter.reserve() == 0.0
