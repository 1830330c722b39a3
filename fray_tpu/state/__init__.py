"""Durable state: the journal of each controller (``journal``) and the state directory that
holds them all (``journals``: where it is, one journal per controller, adoption, the view
across every journal). ``ResourceState`` is here, free of SQLite, for the pure layers."""

from enum import StrEnum


class ResourceState(StrEnum):
    """A slice's life as the journal records it (recorded before it is created)."""

    CREATING = "creating"
    READY = "ready"
    WARM = "warm"  # its job ended; the controller's warm pool holds it for the next job
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"  # its create failed; acquire deleted whatever it made

    @property
    def live(self) -> bool:
        """Whether the resource may still exist (and cost money)."""
        return self not in DEAD_RESOURCE_STATES


RESOURCE_STATES = tuple(ResourceState)
DEAD_RESOURCE_STATES = (ResourceState.DELETED, ResourceState.FAILED)
