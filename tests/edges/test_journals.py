"""The state directory seen across controllers: one journal each, one read-only view of all."""

import time

import pytest

from fray_tpu.state.journal import Journal, JobRow
from fray_tpu.state.journals import JournalSet, controller_dir, journal_dirs


def row(job_id: str, created: float) -> JobRow:
    return JobRow(job_id=job_id, name=job_id, status="running", error_message=None, phase="running",
                  created=created, updated=created, finished=None, controller_id="c", kind="tpu",
                  tpu_type="v4-8", slice_count=1, task_names=["slice-0/worker-0"],
                  task_statuses=[("running", None)], counters={}, attempt=1, attempt_id=None, plan_blob=b"")


def test_set_reads_every_controller_and_knows_which_is_alive(tmp_path):
    first = Journal(controller_dir(tmp_path, "first"), controller_id="first")
    second = Journal(controller_dir(tmp_path, "second"), controller_id="second")
    now = time.time()
    first.add_job(row("old-job", now - 10))
    second.add_job(row("new-job", now))
    first.append_output("old-job", ["hello"])
    assert len(journal_dirs(tmp_path)) == 2

    view = JournalSet(tmp_path)
    try:
        assert [r.job_id for r in view.jobs()] == ["new-job", "old-job"]
        assert view.output("old-job") == (["hello"], 1)
        assert view.controller_alive("old-job") and view.controller_alive("new-job")
        with pytest.raises(KeyError, match="records 2 job"):
            view.job("no-such-job")
        first.close()
        assert not view.controller_alive("old-job") and view.controller_alive("new-job")
    finally:
        view.close()
        second.close()
