"""Planning a request: validation before anything is provisioned."""

import importlib
import json
import sys
import threading

import cloudpickle

import pytest

from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError, UnknownRegionError, UnknownTpuTypeError
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig
from fray_tpu.planning import job_environment, pickle_callable, plan_job

CONFIG = TpuClusterConfig(emulate=True)


def request(fn=print, **kw):
    env = kw.pop("environment", EnvironmentConfig(workspace="."))
    return JobRequest(name="job", entrypoint=Entrypoint.from_callable(fn), environment=env, **kw)


def test_tpu_plan_has_one_task_per_host_of_every_slice():
    plan = plan_job(request(resources=ResourceConfig.with_tpu("v5litepod-16", slice_count=2)), CONFIG)
    assert plan.is_tpu and plan.replicas == 2 and plan.hosts_per_slice == 4
    assert plan.task_names[5] == "slice-1/worker-1"
    assert plan.capacity == "spot" and plan.zones
    assert "FRAY_CLUSTER_SPEC" not in plan.env  # added per attempt, by fray_tpu.multislice


def test_must_not_be_preempted_means_on_demand():
    resources = ResourceConfig.with_tpu("v4-8", preemptible=False)
    assert plan_job(request(resources=resources), CONFIG).capacity == "on-demand"


def test_cpu_plan():
    plan = plan_job(request(resources=ResourceConfig(replicas=3)), CONFIG)
    assert not plan.is_tpu and plan.task_names == ["replica-0", "replica-1", "replica-2"]


def test_unpicklable_closure_names_the_variable():
    lock = threading.Lock()

    def uses_lock():
        with lock:
            pass

    with pytest.raises(ConfigError, match="captured variable 'lock'"):
        pickle_callable(uses_lock, (), {})


def test_unpicklable_argument_is_named():
    with pytest.raises(ConfigError, match="keyword argument 'handle'"):
        pickle_callable(print, (), {"handle": threading.Lock()})


def _import_from(directory, name):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text("def hello():\n    return 'hello from ' + __name__\n")
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))


def test_modules_in_the_workspace_or_installed_stay_by_reference_others_go_by_value(tmp_path):
    """Issue 15 point 9: unpickled where the module is not importable, a by-reference pickle fails
    and a by-value one runs."""
    workspace = tmp_path / "workspace"
    inside = _import_from(workspace, "fray_planning_inside")
    # Below the workspace, but not importable by this name from it: the hosts' sys.path has the
    # workspace, not its subdirectories.
    outside = _import_from(workspace / "scripts", "fray_planning_outside")
    pickled_inside = pickle_callable(inside.hello, (), {}, workspace)
    pickled_outside = pickle_callable(outside.hello, (), {}, workspace)
    pickled_installed = pickle_callable(json.dumps, (), {}, workspace)
    for name in ("fray_planning_inside", "fray_planning_outside"):
        del sys.modules[name]  # as on a host without these directories on sys.path

    with pytest.raises(ModuleNotFoundError, match="fray_planning_inside"):
        cloudpickle.loads(pickled_inside)
    fn, _, _ = cloudpickle.loads(pickled_outside)
    assert fn() == "hello from fray_planning_outside"
    assert cloudpickle.loads(pickled_installed)[0] is json.dumps
    assert "fray_planning_outside" not in cloudpickle.list_registry_pickle_by_value()


def test_env_values_must_be_strings():
    with pytest.raises(ConfigError, match=r"BATCH=32 is a int.*str\(32\)"):
        job_environment({"BATCH": 32})
    assert job_environment({"A": "1", "GONE": None}) == {"A": "1"}


def test_docker_image_is_refused_with_the_alternative():
    env = EnvironmentConfig(docker_image="ghcr.io/x/y:1")
    with pytest.raises(ConfigError, match="docker_image.*not supported.*workspace"):
        plan_job(request(environment=env, resources=ResourceConfig.with_tpu("v4-8")), CONFIG)


def test_unknown_type_and_region_fail_before_provisioning():
    with pytest.raises(UnknownTpuTypeError, match="v5litepod-16"):
        plan_job(request(resources=ResourceConfig.with_tpu("v5e-16")), CONFIG)
    with pytest.raises(UnknownRegionError, match="europe-west4"):
        plan_job(request(resources=ResourceConfig.with_tpu("v5litepod-16", regions=["eu-west4"])), CONFIG)
