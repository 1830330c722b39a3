"""On takeover, every live journaled resource of a job is adopted or deleted, none left behind."""

from __future__ import annotations

from fray_tpu.state import ResourceState
from fray_tpu.state.journal import ResourceRow
from fray_tpu.supervisor.takeover import sort_journaled


def row(slice_id: int, attempt: int, state: ResourceState, endpoints=(), kind: str = "node") -> ResourceRow:
    return ResourceRow(job_id="j", attempt=attempt, slice_id=slice_id, name=f"fray-j-{attempt}-{slice_id}", zone="z",
                       kind=kind, state=str(state), endpoints=list(endpoints), created=float(attempt), ready_at=None,
                       deleted_at=None, tpu_type="v5litepod-4", chips=4)


def names(rows) -> list[str]:
    return [r.name for r in rows]


def test_ready_slices_are_adopted_and_half_created_ones_deleted():
    """A READY slice with endpoints is resumed on; a node and a queued resource still CREATING
    (the driver died while they were being created) are deleted."""
    ready = row(0, 1, ResourceState.READY, ["10.0.0.1"])
    half_node = row(1, 1, ResourceState.CREATING)
    half_queued = row(2, 1, ResourceState.CREATING, kind="queued")
    takeover = sort_journaled([ready, half_node, half_queued])
    assert takeover.adopt == {0: ready}
    assert names(takeover.delete) == names([half_node, half_queued])


def test_dead_rows_are_neither_adopted_nor_deleted():
    """Deleted and failed resources are gone already."""
    takeover = sort_journaled([row(0, 1, ResourceState.DELETED, ["10.0.0.1"]), row(0, 2, ResourceState.FAILED)])
    assert takeover.adopt == {} and takeover.delete == ()


def test_unfinished_deletions_are_seen_through():
    """A slice the dead controller was deleting is deleted again (deletes are idempotent)."""
    deleting = row(0, 1, ResourceState.DELETING, ["10.0.0.1"])
    assert sort_journaled([deleting]).delete == (deleting,)


def test_a_superseded_ready_slice_is_deleted_and_its_replacement_too_when_half_created():
    """Slice 0 of attempt 1 still READY in the journal, its replacement of attempt 2 CREATING:
    only the newest resource of a slice may be adopted, and a half-created one is not."""
    old, new = row(0, 1, ResourceState.READY, ["10.0.0.1"]), row(0, 2, ResourceState.CREATING)
    takeover = sort_journaled([old, new])
    assert takeover.adopt == {}
    assert names(takeover.delete) == names([old, new])


def test_a_ready_slice_without_endpoints_is_not_adopted():
    """Without endpoints there is no agent to dial: the slice is deleted and made again."""
    bare = row(0, 1, ResourceState.READY)
    assert sort_journaled([bare]).delete == (bare,)
