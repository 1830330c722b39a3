"""Which resources gc deletes (pure decision)."""

from fray_tpu import naming
from fray_tpu.ops.gc import find_orphans, live_job_labels
from fray_tpu.provisioner import SliceObservation


def obs(name, job, state="READY", queued_state=None):
    labels = {naming.LABEL_MANAGED: naming.MANAGED_VALUE, naming.LABEL_JOB: naming.label_value(job)}
    return SliceObservation(name=name, zone="us-west4-a", resource_name=f"projects/p/locations/us-west4-a/nodes/{name}",
                            state=state, health=None, endpoints=(), labels=labels, error=None, queued_state=queued_state)


def test_resources_of_running_jobs_are_kept():
    live = live_job_labels(["Job_With.Odd-Chars-1"])
    assert find_orphans([obs("a", "Job_With.Odd-Chars-1")], live) == []


def test_resources_of_finished_or_unknown_jobs_are_orphans():
    orphans = find_orphans([obs("a", "done-job"), obs("b", "")], live_job_labels(["other"]))
    assert [o.observation.name for o in orphans] == ["a", "b"]
    assert "not running" in orphans[0].reason


def test_failed_and_suspended_queued_resources_are_orphans_even_for_live_jobs():
    live = live_job_labels(["live"])
    orphans = find_orphans([obs("f", "live", "CREATE_FAILED", "FAILED"), obs("s", "live", "CREATING", "SUSPENDED"),
                            obs("w", "live", "CREATING", "WAITING_FOR_RESOURCES")], live)
    assert sorted(o.observation.name for o in orphans) == ["f", "s"]
    assert all(o.queued for o in orphans)


def test_queued_resource_granted_after_give_up_is_an_orphan():
    orphans = find_orphans([obs("late", "gave-up", "READY", "ACTIVE")], live_job_labels([]))
    assert len(orphans) == 1 and "granted after its job ended" in orphans[0].reason


def test_preempted_node_of_live_job_is_an_orphan():
    orphans = find_orphans([obs("p", "live", "PREEMPTED")], live_job_labels(["live"]))
    assert len(orphans) == 1 and "PREEMPTED" in orphans[0].reason
