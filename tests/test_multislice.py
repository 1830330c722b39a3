import pytest

from fray_tpu.multislice import gang_environments, megascale_environment, place_tasks

TWO_SLICES = [["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"]]


def test_task_indices_match_jax_process_ids():
    placements = place_tasks(TWO_SLICES)
    assert [p.task_index for p in placements] == list(range(8))
    # JAX: process_id = worker_index + slice_id * workers_per_slice
    assert all(p.task_index == p.worker_id + p.slice_id * 4 for p in placements)
    assert placements[5].ip == "10.0.1.2"


def test_single_slice_gets_no_megascale():
    envs = gang_environments([["10.0.0.1", "10.0.0.2"]], {"FOO": "1"})
    assert all(not any(k.startswith("MEGASCALE_") for k in env) for env in envs)
    assert envs[1]["FRAY_WORKER_ID"] == "1" and envs[1]["FRAY_TASK_COUNT"] == "2"
    assert envs[0]["FOO"] == "1"


def test_multislice_env_every_host():
    envs = gang_environments(TWO_SLICES, {})
    for i, env in enumerate(envs):
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "10.0.0.1:8081"
        assert env["MEGASCALE_NUM_SLICES"] == "2"
        assert env["MEGASCALE_SLICE_ID"] == str(i // 4)
        assert env["MEGASCALE_PORT"] == "8081"
        assert env["FRAY_TASK_INDEX"] == str(i)
        assert env["FRAY_REPLICA_ID"] == str(i // 4)
        assert env["JAX_COORDINATOR_PORT"] == "8476"
        assert env["FRAY_JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:8476"
        assert env["PYTHONUNBUFFERED"] == "1"


def test_recomputed_from_scratch_each_attempt():
    """A preempted slice 0 means a new coordinator; stale user-provided values never survive."""
    stale = {"MEGASCALE_COORDINATOR_ADDRESS": "10.9.9.9:8081", "MEGASCALE_SLICE_ID": "7"}
    replaced = [["10.0.2.1", "10.0.2.2", "10.0.2.3", "10.0.2.4"], TWO_SLICES[1]]
    envs = gang_environments(replaced, stale)
    assert {e["MEGASCALE_COORDINATOR_ADDRESS"] for e in envs} == {"10.0.2.1:8081"}
    assert envs[4]["MEGASCALE_SLICE_ID"] == "1"
    single = gang_environments([TWO_SLICES[0]], stale)
    assert "MEGASCALE_COORDINATOR_ADDRESS" not in single[0]


def test_user_jax_port_wins():
    envs = gang_environments(TWO_SLICES, {"JAX_COORDINATOR_PORT": "9000"})
    assert envs[3]["JAX_COORDINATOR_PORT"] == "9000"
    assert envs[3]["FRAY_JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:9000"


def test_megascale_only_for_several_slices():
    assert megascale_environment(1, 0, "1.2.3.4") == {}
    assert megascale_environment(3, 2, "1.2.3.4")["MEGASCALE_SLICE_ID"] == "2"


@pytest.mark.parametrize("bad", [[], [[]], [["a", "b"], ["c"]]])
def test_uneven_or_empty_gangs_are_rejected(bad):
    with pytest.raises(ValueError):
        place_tasks(bad)
