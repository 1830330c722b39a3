"""Authenticates every call by the per-job secret BEFORE any handler runs.

A rejected call gets a handler that only aborts with UNAUTHENTICATED: its request bytes are
never parsed, unpickled, written or executed. The secret itself is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

from fray_tpu.contract import AUTH_METADATA_KEY
BEARER = "Bearer "
LOG = logging.getLogger("fray_tpu.worker.auth")


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, BEARER + secret),)


class SecretInterceptor(grpc.ServerInterceptor):
    def __init__(self, secret_sha256_hex: str):
        self._expected = bytes.fromhex(secret_sha256_hex)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY and isinstance(value, str) and value.startswith(BEARER):
                presented = hashlib.sha256(value[len(BEARER):].encode()).digest()
                return hmac.compare_digest(presented, self._expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        if self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        LOG.warning("rejected %s: missing or wrong job secret", handler_call_details.method)
        return _rejecting(handler)


def _reject(request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong job secret")


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    # Same shape as the real method, but no deserializer (the bytes stay opaque) and no behaviour.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_reject)
    return grpc.unary_unary_rpc_method_handler(_reject)
