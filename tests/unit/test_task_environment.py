"""The per-task environment and the gang layout, computed in one place (fray_tpu.multislice)."""

import pytest

from fray_tpu.contract import EMULATOR_JAX_PLUGIN
from fray_tpu.multislice import (
    gang_environments,
    gang_layout,
    megascale_environment,
    place_tasks,
    replica_environments,
    replica_layout,
)

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


def test_cluster_spec_is_added_at_attempt_time_and_wins():
    """FRAY_CLUSTER_SPEC comes from the controller when the attempt's env is built, over any stale copy."""
    envs = gang_environments(TWO_SLICES, {"FRAY_CLUSTER_SPEC": "tpu?old=1"}, cluster_spec="tpu?emulator_endpoint=x")
    assert {e["FRAY_CLUSTER_SPEC"] for e in envs} == {"tpu?emulator_endpoint=x"}
    assert "FRAY_CLUSTER_SPEC" not in gang_environments(TWO_SLICES, {})[0]


def test_emulated_hosts_run_jax_on_the_cpu_with_the_plugin_unless_the_user_chose():
    """Emulated hosts get JAX on the CPU with gloo and the emulator's cluster plugin preloaded."""
    [env] = gang_environments([["127.0.0.1"]], {}, emulated=True)
    assert (env["JAX_PLATFORMS"], env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"]) == ("cpu", "gloo")
    assert env["FRAY_TPU_RUNNER_PRELOAD"] == EMULATOR_JAX_PLUGIN
    [chosen] = gang_environments([["127.0.0.1"]], {"JAX_PLATFORMS": "cpu,tpu"}, emulated=True)
    assert chosen["JAX_PLATFORMS"] == "cpu,tpu"
    [real] = gang_environments([["10.0.0.1"]], {})
    assert "JAX_PLATFORMS" not in real and "FRAY_TPU_RUNNER_PRELOAD" not in real


def test_every_task_is_told_the_controllers_python_when_given():
    """The controller's Python version reaches every task (the runner names a cross-version
    unpickle with it); nothing is set when the caller does not give one."""
    envs = gang_environments(TWO_SLICES, {"FRAY_TPU_CONTROLLER_PYTHON": "2.7"}, controller_python="3.11")
    assert {e["FRAY_TPU_CONTROLLER_PYTHON"] for e in envs} == {"3.11"}
    assert "FRAY_TPU_CONTROLLER_PYTHON" not in gang_environments(TWO_SLICES, {})[0]


@pytest.mark.parametrize("replicas", [1, 2, 5])
def test_cpu_replicas_see_their_index_and_the_spec(replicas):
    """Each CPU replica sees its index, the count, JAX on the CPU and the cluster spec."""
    envs = replica_environments(replicas, {"A": "1"}, cluster_spec="local")
    assert [e["FRAY_REPLICA_ID"] for e in envs] == [str(i) for i in range(replicas)]
    assert all(e["FRAY_REPLICA_COUNT"] == str(replicas) and e["JAX_PLATFORMS"] == "cpu" and e["A"] == "1"
               and e["FRAY_CLUSTER_SPEC"] == "local" for e in envs)


@pytest.mark.parametrize(("slices", "hosts"), [(s, h) for s in range(1, 5) for h in (1, 2, 4, 8, 16)])
def test_layout_placements_and_environments_agree(slices, hosts):
    """The gang layout (labels, slots), the placements and the env agree for every shape: slice-major."""
    ips = [[f"10.{s}.0.{w}" for w in range(hosts)] for s in range(slices)]
    layout = gang_layout(slices, hosts)
    placements = place_tasks(ips)
    envs = gang_environments(ips, {})
    assert [t.index for t in layout] == list(range(slices * hosts))
    for task, placement, env in zip(layout, placements, envs, strict=True):
        assert (task.slice_id, task.worker_id, task.index) == (placement.slice_id, placement.worker_id,
                                                               placement.task_index)
        assert task.label == f"slice-{task.slice_id}/worker-{task.worker_id}"
        assert (env["FRAY_SLICE_ID"], env["FRAY_WORKER_ID"], env["FRAY_TASK_INDEX"]) == (
            str(task.slice_id), str(task.worker_id), str(task.index))
        assert placement.ip == ips[task.slice_id][task.worker_id]


def test_replica_layout_names_replicas():
    """A CPU job's tasks are replica-i, each its own slice."""
    assert [(t.index, t.slice_id, t.worker_id, t.label) for t in replica_layout(2)] == [
        (0, 0, 0, "replica-0"), (1, 1, 0, "replica-1")]
