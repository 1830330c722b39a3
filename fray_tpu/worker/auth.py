"""Authenticates every call by the per-job secret BEFORE any handler runs.

A rejected call gets a handler that only aborts with UNAUTHENTICATED: its request bytes are
never parsed, unpickled, written or executed. The secret itself is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

import grpc

from fray_tpu.contract import AUTH_METADATA_KEY
BEARER = "Bearer "
LOG = logging.getLogger("fray_tpu.worker.auth")


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, BEARER + secret),)


def valid_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class SecretInterceptor(grpc.ServerInterceptor):
    """Accepts exactly one secret at a time. ``replace`` (a warm slice handed to its next holder)
    swaps it and writes the new hash to ``persist_path`` (mode 0600), so an agent restarted on
    the same VM keeps refusing the previous holder's secret instead of falling back to the one
    in the node's metadata."""

    def __init__(self, secret_sha256_hex: str, persist_path: Path | None = None):
        self._persist_path = persist_path
        if persist_path is not None and persist_path.exists():
            secret_sha256_hex = persist_path.read_text().strip()
        self._expected = bytes.fromhex(secret_sha256_hex)
        self._lock = threading.Lock()

    def replace(self, new_secret_sha256_hex: str) -> None:
        if not valid_sha256_hex(new_secret_sha256_hex):
            raise ValueError("the new secret must be given as 64 lower-case hex digits of its SHA-256")
        with self._lock:
            if self._persist_path is not None:
                staged = self._persist_path.with_suffix(".new")
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(new_secret_sha256_hex)
                os.replace(staged, self._persist_path)
            self._expected = bytes.fromhex(new_secret_sha256_hex)

    def accepts(self, secret_sha256_hex: str) -> bool:
        """Whether the secret of this hash is the one accepted now."""
        try:
            return hmac.compare_digest(bytes.fromhex(secret_sha256_hex), self._expected)
        except ValueError:
            return False

    def _authorized(self, metadata) -> bool:
        expected = self._expected
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY and isinstance(value, str) and value.startswith(BEARER):
                presented = hashlib.sha256(value[len(BEARER):].encode()).digest()
                return hmac.compare_digest(presented, expected)
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
