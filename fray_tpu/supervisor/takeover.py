"""What a controller taking over a dead controller's job does with each resource the journal
lists for it (pure).

Every live resource is either adopted or deleted, never left to its lease (a half-created node
has no agent yet, and a queued resource waiting in line has no VM at all): the newest live
resource of a slice is adopted when it was READY with endpoints; everything else that may still
exist — a node or queued resource caught half-created, one being deleted, one a later resource
of the same slice superseded — is deleted before the job goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fray_tpu.state import ResourceState

if TYPE_CHECKING:
    from fray_tpu.state.journal import ResourceRow


@dataclass(frozen=True)
class Takeover:
    adopt: dict[int, ResourceRow]  # slice id -> the ready resource the job resumes on
    delete: tuple[ResourceRow, ...]  # live resources nobody will use: deleted before going on


def sort_journaled(rows: Sequence[ResourceRow]) -> Takeover:
    """``rows``: the job's journaled resources, oldest first (``Journal.resources``)."""
    live = [row for row in rows if ResourceState(row.state).live]
    newest: dict[int, ResourceRow] = {}
    for row in live:
        newest[row.slice_id] = row
    adopt = {slice_id: row for slice_id, row in newest.items()
             if row.state == ResourceState.READY and row.endpoints}
    adopted = {id(row) for row in adopt.values()}
    return Takeover(adopt, tuple(row for row in live if id(row) not in adopted))
