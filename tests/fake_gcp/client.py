"""The unmodified google-cloud-tpu client, pointed at an emulator."""

from __future__ import annotations

import grpc
from google.api_core.future.polling import DEFAULT_POLLING
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import tpu_v2


def make_tpu_client(endpoint: str) -> tpu_v2.TpuClient:
    """A TpuClient on an insecure channel with anonymous credentials (no metadata probe)."""
    channel = grpc.insecure_channel(endpoint)
    transport = tpu_v2.services.tpu.transports.TpuGrpcTransport(channel=channel, credentials=AnonymousCredentials())
    return tpu_v2.TpuClient(transport=transport)


def polling(timeout: float) -> Retry:
    """Fast polling for ``operation.result(polling=...)`` (the default starts at 1 s)."""
    return DEFAULT_POLLING.with_timeout(timeout).with_delay(initial=0.02, maximum=0.2, multiplier=1.5)
