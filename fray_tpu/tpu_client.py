"""The one place a Cloud TPU API client is built: by the controller's provisioner and by the
agent on every VM (to delete its own node when the lease lapses), so the agent needs nothing
else of the controller."""

from __future__ import annotations

import google.auth
import grpc
from google.auth import credentials as auth_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud import tpu_v2
from google.cloud.tpu_v2.services.tpu.transports import TpuGrpcTransport

from fray_tpu.errors import CredentialsError

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def make_tpu_client(*, emulator_endpoint: str | None, credentials=None) -> tpu_v2.TpuClient:
    """The one place a TPU API client is built.

    With ``emulator_endpoint`` (``host:port``): an insecure gRPC channel and anonymous credentials.
    Otherwise ``credentials`` or google-auth's application-default chain.
    """
    if emulator_endpoint:
        target = emulator_endpoint.removeprefix("http://").removeprefix("grpc://")
        transport = TpuGrpcTransport(
            host=target,
            channel=grpc.insecure_channel(target),
            credentials=auth_credentials.AnonymousCredentials(),
        )
        return tpu_v2.TpuClient(transport=transport)
    if credentials is None:
        try:
            credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        except auth_exceptions.DefaultCredentialsError as error:
            raise CredentialsError(
                "No Google credentials found for the Cloud TPU API. Provide them with one of: "
                "`gcloud auth application-default login`; GOOGLE_APPLICATION_CREDENTIALS=<path to a "
                "service-account key file>; or run on a GCP VM whose service account has the TPU Admin "
                f"role. (google-auth said: {error})"
            ) from error
    return tpu_v2.TpuClient(credentials=credentials)
