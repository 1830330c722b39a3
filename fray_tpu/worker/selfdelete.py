"""The agent deletes its own node when the controller's lease lapses (no driver, no bill).

The call runs as the VM's service account. When the TPU API refuses it (the account lacks
``tpu.nodes.delete``: 403 PERMISSION_DENIED), the node would keep billing unseen; the agent
publishes why as the guest attribute ``fray-tpu/self-delete-refused``, which ``fray-tpu slices``
shows and ``fray-tpu gc`` acts on.
"""

from __future__ import annotations

import json
import logging
import time

from fray_tpu.worker import metadata as md
from fray_tpu.worker.settings import AgentSettings

LOG = logging.getLogger("fray_tpu.worker.selfdelete")
DELETE_TIMEOUT_SECONDS = 30.0
DELETE_ATTEMPTS = 5
SERVICE_ACCOUNT_PATH = "instance/service-accounts/default/email"
TOKEN_PATH = "instance/service-accounts/default/token"


def delete_own_node(settings: AgentSettings, metadata: md.MetadataClient | None = None) -> bool:
    """Asks the TPU API to delete this node; True once deleted or already gone. Idempotent."""
    if not settings.node_name.startswith("projects/"):
        LOG.error("cannot delete this node: metadata %r is not a full node name (projects/P/locations/Z/nodes/N)",
                  settings.node_name)
        return False
    from google.api_core import exceptions

    from fray_tpu.tpu_client import make_tpu_client

    metadata = metadata or md.MetadataClient()
    retryable = (exceptions.ServiceUnavailable, exceptions.DeadlineExceeded, exceptions.TooManyRequests,
                 exceptions.InternalServerError, exceptions.Aborted)
    client = make_tpu_client(emulator_endpoint=settings.api_endpoint)
    for attempt in range(DELETE_ATTEMPTS):
        try:
            client.delete_node(name=settings.node_name, timeout=DELETE_TIMEOUT_SECONDS,
                               metadata=_vm_credentials(settings, metadata))
            LOG.warning("asked the TPU API to delete this node %s", settings.node_name)
            return True
        except exceptions.NotFound:
            return True
        except retryable as error:
            LOG.warning("deleting node %s failed (try %d/%d): %s", settings.node_name, attempt + 1,
                        DELETE_ATTEMPTS, error)
            time.sleep(min(2.0 ** attempt, 30.0))
        except exceptions.GoogleAPICallError as error:
            reason = refusal_text(settings.node_name, error, _service_account(metadata))
            LOG.error("%s", reason)
            _publish_refusal(metadata, reason)
            return False
    LOG.error("gave up deleting node %s after %d tries", settings.node_name, DELETE_ATTEMPTS)
    return False


def refusal_text(node_name: str, error, service_account: str | None) -> str:
    """What ``fray-tpu slices`` shows: the API's code and message, and the fix when it is IAM."""
    code = getattr(error.grpc_status_code, "name", None) or str(error.code)
    text = f"self-delete refused: {code}: {error.message} (deleting {node_name})"
    if code == "PERMISSION_DENIED":
        who = f"service account {service_account}" if service_account else "the VMs' service account"
        text += (f"; grant roles/tpu.admin (or a role with tpu.nodes.delete) to {who} "
                 "(service_account= in the cluster config)")
    return text


def _vm_credentials(settings: AgentSettings, metadata: md.MetadataClient) -> tuple[tuple[str, str], ...]:
    """Against the emulator the client is anonymous; the call carries the VM's own token, as
    google-auth's GCE credentials do on a real VM (where the client finds them by itself)."""
    if not settings.api_endpoint:
        return ()
    try:
        token = metadata.get(TOKEN_PATH)
    except md.MetadataError as error:
        LOG.warning("no access token from the metadata server (%s); deleting anonymously", error)
        return ()
    if token is None:
        return ()
    return (("authorization", f"Bearer {json.loads(token.text)['access_token']}"),)


def _service_account(metadata: md.MetadataClient) -> str | None:
    try:
        value = metadata.get(SERVICE_ACCOUNT_PATH)
    except md.MetadataError:
        return None
    return value.text.strip() if value is not None and value.text.strip() else None


def _publish_refusal(metadata: md.MetadataClient, reason: str) -> None:
    """Publish the refusal as a guest attribute: `fray-tpu slices` shows it (the node keeps billing)."""
    from fray_tpu.worker.identity import publish_self_delete_refused

    try:
        publish_self_delete_refused(metadata, reason)
    except md.MetadataError as error:
        LOG.error("could not publish the self-delete refusal: %s", error)
