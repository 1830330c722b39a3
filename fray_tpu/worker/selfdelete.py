"""The agent deletes its own node when the controller's lease lapses (no driver, no bill)."""

from __future__ import annotations

import logging
import time

from fray_tpu.worker.settings import AgentSettings

LOG = logging.getLogger("fray_tpu.worker.selfdelete")
DELETE_TIMEOUT_SECONDS = 30.0
DELETE_ATTEMPTS = 5


def delete_own_node(settings: AgentSettings) -> bool:
    """Asks the TPU API to delete this node; True once deleted or already gone. Idempotent."""
    if not settings.node_name.startswith("projects/"):
        LOG.error("cannot delete this node: metadata %r is not a full node name (projects/P/locations/Z/nodes/N)",
                  settings.node_name)
        return False
    from google.api_core import exceptions

    from fray_tpu.tpu_client import make_tpu_client

    retryable = (exceptions.ServiceUnavailable, exceptions.DeadlineExceeded, exceptions.TooManyRequests,
                 exceptions.InternalServerError, exceptions.Aborted)
    client = make_tpu_client(emulator_endpoint=settings.api_endpoint)
    for attempt in range(DELETE_ATTEMPTS):
        try:
            client.delete_node(name=settings.node_name, timeout=DELETE_TIMEOUT_SECONDS)
            LOG.warning("asked the TPU API to delete this node %s", settings.node_name)
            return True
        except exceptions.NotFound:
            return True
        except retryable as error:
            LOG.warning("deleting node %s failed (try %d/%d): %s", settings.node_name, attempt + 1,
                        DELETE_ATTEMPTS, error)
            time.sleep(min(2.0 ** attempt, 30.0))
        except exceptions.GoogleAPICallError as error:
            LOG.error("the TPU API refused to delete node %s: %s", settings.node_name, error)
            _publish_refusal(f"the TPU API refused to delete {settings.node_name}: {error} (the VM's service "
                             f"account needs tpu.nodes.delete, e.g. roles/tpu.admin, for lease self-delete)")
            return False
    LOG.error("gave up deleting node %s after %d tries", settings.node_name, DELETE_ATTEMPTS)
    return False


def _publish_refusal(reason: str) -> None:
    """Publish the refusal as a guest attribute: `fray-tpu slices` shows it (the node keeps billing)."""
    from fray_tpu.worker import metadata as md
    from fray_tpu.worker.identity import publish_self_delete_refused

    try:
        publish_self_delete_refused(md.MetadataClient(), reason)
    except md.MetadataError as error:
        LOG.error("could not publish the self-delete refusal: %s", error)
