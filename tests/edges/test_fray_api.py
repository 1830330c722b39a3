"""Every rule of the Fray contract (../shared/fray-api.md), in each field spelling S2..S5."""

from __future__ import annotations

import contextvars
import dataclasses
import os
import subprocess
import sys
import textwrap
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import pytest

from fray_tpu import backend, fray_api
from fray_tpu.errors import ConfigError, DeadlineExceeded, UnknownTpuTypeError
from fray_tpu.fray_api import (
    BinaryEntrypoint,
    CallableEntrypoint,
    Cluster,
    CpuConfig,
    Entrypoint,
    EnvironmentConfig,
    GpuConfig,
    JobId,
    JobInfo,
    JobRequest,
    JobStatus,
    NormalizedEntrypoint,
    ResourceConfig,
    TaskStatus,
    TpuConfig,
    TpuTopologyInfo,
    create_environment,
    entrypoint_parts,
    find_marin_fray_base,
    get_tpu_topology,
    normalize_entrypoint,
    resolved_environment,
    slice_count_of,
    tpu_type_of,
    validate_request,
    wait_delays,
)


def test_standalone_here():
    # The dev venv has no Marin fray; the module's own definitions are in use.
    assert fray_api.USING_MARIN_FRAY is False


# ---- device configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TpuConfig(type="v5litepod-16"),
        TpuConfig(variant="v5litepod-16", kind="tpu"),
        TpuConfig(variant="v5litepod-16"),
        TpuConfig("v5litepod-16"),
    ],
)
def test_tpu_config_every_spelling(config):
    assert config.variant == config.type == "v5litepod-16"
    assert config.kind == "tpu"
    assert config.chip_count() == 16  # one slice
    assert config.vm_count() == 4
    assert tpu_type_of(config) == "v5litepod-16"


def test_tpu_config_variant_wins_and_topology():
    assert TpuConfig(variant="v4-8", type="v4-16").variant == "v4-8"
    assert TpuConfig(type="v4-8", topology="2x2x1").topology == "2x2x1"
    assert TpuConfig("v4-8", "2x2x1").topology == "2x2x1"  # S2 positional (type, topology)


def test_tpu_config_errors():
    with pytest.raises(ValueError, match="slice type"):
        TpuConfig()
    with pytest.raises(ValueError, match="kind must be 'tpu'"):
        TpuConfig(variant="v4-8", kind="gpu")
    with pytest.raises(UnknownTpuTypeError, match="v5litepod-16"):
        TpuConfig(type="v5e-16").chip_count()


def test_cpu_and_gpu_configs():
    assert CpuConfig() == CpuConfig(kind="cpu", variant="cpu")
    assert CpuConfig().chip_count() == 0
    assert tpu_type_of(CpuConfig()) is None
    for gpu in (GpuConfig(type="H100", count=2), GpuConfig(variant="H100", kind="gpu", count=2), GpuConfig("H100", 2)):
        assert (gpu.variant, gpu.type, gpu.kind, gpu.count, gpu.chip_count()) == ("H100", "H100", "gpu", 2, 2)
        assert tpu_type_of(gpu) is None
    assert GpuConfig().variant == "auto"


# ---- ResourceConfig -------------------------------------------------------------------------


def test_resource_config_defaults():
    r = ResourceConfig()
    assert (r.cpu, r.ram, r.disk, r.replicas, r.preemptible, r.regions) == (1, "128m", "1g", 1, True, None)
    assert r.device == CpuConfig()
    assert r.chip_count() == 0
    r.replicas = 2  # mutable, like Marin's
    assert r.replicas == 2


def test_resource_builders():
    r = ResourceConfig.with_tpu("v5p-64", slice_count=2, preemptible=False, regions=["us-central1"])
    assert tpu_type_of(r.device) == "v5p-64"
    assert r.replicas == 2 and r.preemptible is False and r.regions == ["us-central1"]
    assert r.chip_count() == 32 * 2  # chips of one slice x slices
    assert slice_count_of(r) == 2
    g = ResourceConfig.with_gpu("A100", count=4, cpu=8)
    assert g.device.variant == "A100" and g.chip_count() == 4 and g.cpu == 8
    assert ResourceConfig.with_gpu().device.variant == "auto"
    c = ResourceConfig.with_cpu(cpu=4, ram="1g")
    assert c.device == CpuConfig() and c.cpu == 4 and c.ram == "1g"


# ---- environments ---------------------------------------------------------------------------


def test_environment_exactly_one_of_workspace_or_image():
    with pytest.raises(ValueError, match="not both"):
        EnvironmentConfig(workspace="/w", docker_image="img")
    with pytest.raises(ValueError, match="workspace or docker_image"):
        EnvironmentConfig()
    e = EnvironmentConfig(docker_image="img")
    assert (e.pip_packages, e.env_vars, e.extras) == ([], {}, [])


def test_create_environment_rules(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    e = create_environment(env_vars={"TOKENIZERS_PARALLELISM": "true", "MINE": "1", "GONE": None}, extras=("tpu",))
    assert e.workspace == str(tmp_path) and e.docker_image is None
    assert e.env_vars == {
        "HF_DATASETS_TRUST_REMOTE_CODE": "1",
        "TOKENIZERS_PARALLELISM": "true",  # the user's value wins
        "HF_TOKEN": "hf-secret",  # forwarded
        "MINE": "1",
    }
    assert e.extras == ["tpu"] and e.pip_packages == []
    monkeypatch.setenv("WANDB_API_KEY", "wb")
    assert create_environment().env_vars["WANDB_API_KEY"] == "wb"
    image = create_environment(docker_image="gcr.io/x/y", pip_packages=["numpy"])
    assert image.workspace is None and image.pip_packages == ["numpy"]


def test_environment_create_is_create_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert EnvironmentConfig.create(env_vars={"A": "b"}) == create_environment(env_vars={"A": "b"})


def test_resolved_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    request = JobRequest(name="j", entrypoint=Entrypoint.from_binary("true", []))
    assert resolved_environment(request).workspace == str(tmp_path)
    mine = EnvironmentConfig(docker_image="img")
    assert resolved_environment(dataclasses.replace(request, environment=mine)) is mine


# ---- entrypoints ----------------------------------------------------------------------------


def train(config, *, epochs=1):
    return config, epochs


def test_entrypoint_s2_callable_and_binary():
    ep = Entrypoint(callable=train, function_args={"epochs": 3})
    assert ep.callable_entrypoint == CallableEntrypoint(train, (), {"epochs": 3})
    assert normalize_entrypoint(ep) == NormalizedEntrypoint(kind="callable", callable=train, kwargs={"epochs": 3})
    b = Entrypoint(binary="python", args=["-m", "json.tool"])
    assert b.binary_entrypoint == BinaryEntrypoint("python", ["-m", "json.tool"])
    assert entrypoint_parts(b) == ("binary", "python", ("-m", "json.tool"), {})
    assert dataclasses.replace(ep) == ep  # re-running validation on a filled entrypoint is fine


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "neither"),
        ({"binary": "python", "callable": train}, "both"),
        ({"callable_entrypoint": CallableEntrypoint(train), "binary_entrypoint": BinaryEntrypoint("x", [])}, "both"),
        ({"callable": train, "args": ["x"]}, "args only go with binary"),
        ({"binary": "python", "function_args": {}}, "function_args only go with callable"),
        ({"callable": train, "function_args": [1]}, "must be a dict"),
    ],
)
def test_entrypoint_s2_rules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Entrypoint(**kwargs)


def test_entrypoint_s4_builders():
    ep = Entrypoint.from_callable(train, args=["cfg"], kwargs={"epochs": 2})
    assert ep.callable_entrypoint == CallableEntrypoint(callable=train, args=["cfg"], kwargs={"epochs": 2})
    assert ep.binary_entrypoint is None
    assert entrypoint_parts(ep) == ("callable", train, ("cfg",), {"epochs": 2})
    assert Entrypoint.from_callable(train).callable_entrypoint.kwargs == {}
    b = Entrypoint.from_binary("python", ["-m", "json.tool", "--help"])
    assert b.binary_entrypoint == BinaryEntrypoint(command="python", args=["-m", "json.tool", "--help"])
    assert normalize_entrypoint(b).command_args == ("-m", "json.tool", "--help")


def test_closures_and_lambdas_are_accepted():
    captured = {"x": 1}
    ep = Entrypoint.from_callable(lambda: captured["x"])
    kind, fn, args, kwargs = entrypoint_parts(ep)
    assert kind == "callable" and fn(*args, **kwargs) == 1


def test_normalize_rejects_nothing_to_run():
    with pytest.raises(ConfigError, match="from_callable"):
        normalize_entrypoint(types.SimpleNamespace())


# ---- requests and statuses ------------------------------------------------------------------


def test_job_request_defaults_and_name_rule():
    r = JobRequest(name="train_lm", entrypoint=Entrypoint.from_binary("true", []))
    assert r.resources == ResourceConfig() and r.environment is None
    assert (r.max_retries_failure, r.max_retries_preemption) == (0, 100)
    with pytest.raises(ValueError, match="must not contain spaces.*'train_lm'"):
        JobRequest(name="train lm", entrypoint=r.entrypoint)
    # Names are not unique: two requests with one name are both valid.
    assert JobRequest(name="train_lm", entrypoint=r.entrypoint).name == r.name


def test_job_status_is_a_str_enum():
    assert JobStatus.SUCCEEDED == "succeeded" and "pending" == JobStatus.PENDING
    assert [s.value for s in JobStatus] == ["pending", "running", "succeeded", "failed", "stopped"]
    assert all(JobStatus.finished(s) for s in ("succeeded", "failed", "stopped"))
    assert not any(JobStatus.finished(s) for s in (JobStatus.PENDING, "running"))


def test_task_status_and_job_info():
    assert TaskStatus(JobStatus.RUNNING).error_message is None
    info = JobInfo(job_id=JobId("j-1"), status=JobStatus.SUCCEEDED, tasks=[TaskStatus("succeeded")], name="n")
    assert info.error_message is None and info.job_id == "j-1" and isinstance(info.job_id, str)


def test_tpu_topology_info():
    assert get_tpu_topology("v5litepod-16") == TpuTopologyInfo("v5litepod-16", 16, 4, 4, 4)
    assert [f.name for f in dataclasses.fields(TpuTopologyInfo)] == [
        "name",
        "chip_count",
        "host_count",
        "vm_count",
        "chips_per_vm",
    ]
    with pytest.raises(ValueError, match="v5litepod-16"):
        get_tpu_topology("v5e-16")


def test_validate_request():
    ok = JobRequest(name="j", entrypoint=Entrypoint.from_callable(train), resources=ResourceConfig.with_tpu("v4-8"))
    validate_request(ok)
    with pytest.raises(UnknownTpuTypeError, match="v5litepod-16"):
        validate_request(dataclasses.replace(ok, resources=ResourceConfig(device=TpuConfig(type="v5e-16"))))
    with pytest.raises(ConfigError, match="replicas"):
        validate_request(dataclasses.replace(ok, resources=ResourceConfig.with_tpu("v4-8", slice_count=0)))
    with pytest.raises(ConfigError, match="max_retries_failure"):
        validate_request(dataclasses.replace(ok, max_retries_failure=-1))
    with pytest.raises(ConfigError, match=r"\['us-central2'\]"):
        validate_request(dataclasses.replace(ok, resources=ResourceConfig.with_tpu("v4-8", regions="us-central2")))


# ---- normalisers on other generations of the types (duck typing) ----------------------------


def test_tpu_type_of_marin_shaped_objects():
    @dataclass(frozen=True)
    class TpuConfig:  # noqa: F811 - Marin S2: `type` only
        type: str
        topology: str | None = None

    @dataclass(frozen=True)
    class Device:  # Marin S5: variant + kind
        variant: str
        kind: str = "tpu"

    @dataclass(frozen=True)
    class CpuConfig:  # noqa: F811 - Marin S4: `type="cpu"`
        type: str = "cpu"

    assert tpu_type_of(TpuConfig(type="v4-8")) == "v4-8"
    assert tpu_type_of(Device("v6e-8")) == "v6e-8"
    assert tpu_type_of(CpuConfig()) is None
    with pytest.raises(ConfigError, match="names no slice type"):
        tpu_type_of(TpuConfig(type="tpu"))
    with pytest.raises(ConfigError, match="Unrecognised device"):
        tpu_type_of(object())


def test_normalize_marin_shaped_entrypoints():
    s2 = types.SimpleNamespace(binary=None, args=[], callable=train, function_args={"epochs": 5})
    assert entrypoint_parts(s2) == ("callable", train, (), {"epochs": 5})
    s4 = types.SimpleNamespace(
        callable_entrypoint=None, binary_entrypoint=types.SimpleNamespace(command="ls", args=["-l"])
    )
    assert entrypoint_parts(s4) == ("binary", "ls", ("-l",), {})


def test_slice_count_of_later_marin_resources():
    @dataclass
    class LaterResources:  # replicas counted per VM, recognised by device_alternatives
        device: object = field(default_factory=lambda: TpuConfig(variant="v5litepod-16"))
        replicas: int = 8
        device_alternatives: list | None = None

    assert slice_count_of(LaterResources()) == 2
    assert slice_count_of(ResourceConfig.with_tpu("v5litepod-16", slice_count=8)) == 8


# ---- the Cluster ABC ------------------------------------------------------------------------


class ScriptedCluster(Cluster):
    """Jobs finish after a given number of polls with a given status."""

    def __init__(self, scripts: dict[str, tuple[int, str]]):
        self.scripts = scripts
        self.polls = dict.fromkeys(scripts, 0)

    def launch(self, request):
        raise NotImplementedError

    def poll(self, job_id):
        if job_id not in self.scripts:
            raise KeyError(job_id)
        self.polls[job_id] += 1
        polls_needed, final = self.scripts[job_id]
        status = final if self.polls[job_id] >= polls_needed else JobStatus.RUNNING
        error = None if status == JobStatus.SUCCEEDED or status == JobStatus.RUNNING else f"{job_id} broke"
        return JobInfo(job_id=job_id, status=JobStatus(status), tasks=[], name=f"name-{job_id}", error_message=error)

    def monitor(self, job_id):
        return self.wait(job_id)

    def terminate(self, job_id):
        raise NotImplementedError

    def list_jobs(self):
        return [self.poll(j) for j in self.scripts]


def test_cluster_is_abstract():
    with pytest.raises(TypeError):
        Cluster()  # type: ignore[abstract]
    assert {"launch", "poll", "monitor", "terminate", "list_jobs"} <= Cluster.__abstractmethods__
    with ScriptedCluster({}).connect() as connected:
        assert isinstance(connected, Cluster)


def test_wait_delays_double_to_ten_seconds():
    delays = wait_delays()
    assert [next(delays) for _ in range(10)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]


def test_wait_single_job():
    cluster = ScriptedCluster({"a": (2, "succeeded"), "b": (1, "failed")})
    info = cluster.wait(JobId("a"))
    assert info.status == JobStatus.SUCCEEDED and info.job_id == "a"
    assert cluster.wait("b").status == "failed"  # no raise by default
    with pytest.raises(RuntimeError, match="b .*failed.*b broke"):
        cluster.wait("b", raise_on_failure=True)
    with pytest.raises(KeyError):
        cluster.wait("nope")


def test_wait_list_waits_for_all_then_raises_once_naming_every_failure():
    cluster = ScriptedCluster({"ok": (3, "succeeded"), "bad": (1, "failed"), "halted": (2, "stopped")})
    with pytest.raises(RuntimeError) as excinfo:
        cluster.wait(["ok", "bad", "halted"], raise_on_failure=True)
    message = str(excinfo.value)
    assert "2 of 3" in message and "bad" in message and "halted" in message and "ok (" not in message
    assert cluster.polls["ok"] >= 3  # the successful job was waited for to the end
    results = ScriptedCluster({"x": (1, "succeeded"), "y": (2, "failed")}).wait(["x", "y"])
    assert [r.status for r in results] == ["succeeded", "failed"]


def test_wait_timeout_names_unfinished_jobs():
    cluster = ScriptedCluster({"slow": (10**9, "succeeded")})
    with pytest.raises(DeadlineExceeded, match="slow"):
        cluster.wait("slow", timeout=0.15)


# ---- backend selection ----------------------------------------------------------------------


@pytest.fixture
def fresh_context(monkeypatch):
    """Run in a copy of the context so set_current_cluster does not leak between tests."""
    monkeypatch.delenv("FRAY_CLUSTER_SPEC", raising=False)
    monkeypatch.delenv("FRAY_BACKEND", raising=False)
    return contextvars.copy_context().run


@pytest.fixture
def fake_tpu_cluster_module(monkeypatch):
    module = types.ModuleType("fray_tpu.cluster")

    class TpuCluster:
        def __init__(self, spec):
            self.spec = spec

        @classmethod
        def from_spec(cls, spec):
            return cls(spec)

    module.TpuCluster = TpuCluster
    monkeypatch.setitem(sys.modules, "fray_tpu.cluster", module)
    return module


def test_set_current_cluster_wins(fresh_context, monkeypatch):
    monkeypatch.setenv("FRAY_CLUSTER_SPEC", "bogus?x=1")
    mine = ScriptedCluster({})

    def body():
        backend.set_current_cluster(mine)
        return backend.current_cluster()

    assert fresh_context(body) is mine


def test_cluster_spec_tpu_dispatches_to_tpu_cluster(fresh_context, monkeypatch, fake_tpu_cluster_module):
    monkeypatch.setenv("FRAY_CLUSTER_SPEC", "tpu?emulate=true&zone=us-central2-b")

    def body():
        first = backend.current_cluster()
        return first, backend.current_cluster()

    first, second = fresh_context(body)
    assert isinstance(first, fake_tpu_cluster_module.TpuCluster)
    assert first.spec == "tpu?emulate=true&zone=us-central2-b"
    assert second is first  # remembered in the context


def test_fray_backend_tpu_dispatches(fresh_context, monkeypatch, fake_tpu_cluster_module):
    monkeypatch.setenv("FRAY_BACKEND", "tpu")
    cluster = fresh_context(backend.current_cluster)
    assert isinstance(cluster, fake_tpu_cluster_module.TpuCluster) and cluster.spec == "tpu"


def test_unknown_spec_prefix_is_a_value_error(fresh_context, monkeypatch):
    with pytest.raises(ValueError, match="'bogus'.*tpu\\?project"):
        backend.create_cluster("bogus?x=1")
    monkeypatch.setenv("FRAY_CLUSTER_SPEC", "ray?namespace=x")
    with pytest.raises(ValueError, match="ray"):
        fresh_context(backend.current_cluster)


def test_tpu_prefix_imports_fray_tpu_cluster(monkeypatch):
    # With no fray_tpu.cluster importable, the tpu prefix fails on exactly that import.
    monkeypatch.setitem(sys.modules, "fray_tpu.cluster", None)
    with pytest.raises(ImportError, match="fray_tpu.cluster"):
        backend.create_cluster("tpu?emulate=true")


# ---- detecting Marin's fray by shape --------------------------------------------------------


def _importer(modules: dict[str, object]):
    def import_module(name):
        value = modules.get(name)
        if isinstance(value, BaseException):
            raise value
        if value is None:
            raise ModuleNotFoundError(name)
        return value

    return import_module


def _base_with(cluster_class):
    return types.SimpleNamespace(Cluster=cluster_class)


def test_detection_rejects_wrong_shapes():
    class Concrete:
        def launch(self):
            return None

    class AbstractWithoutLaunch(ABC):
        @abstractmethod
        def scan(self): ...

    assert find_marin_fray_base(_importer({})) is None
    assert find_marin_fray_base(_importer({"fray.cluster.base": RuntimeError("web scanner init")})) is None
    assert find_marin_fray_base(_importer({"fray.cluster.base": types.SimpleNamespace()})) is None
    assert find_marin_fray_base(_importer({"fray.cluster.base": _base_with(Concrete)})) is None
    assert find_marin_fray_base(_importer({"fray.cluster.base": _base_with(AbstractWithoutLaunch)})) is None
    good = _base_with(Cluster)
    assert find_marin_fray_base(_importer({"fray.cluster.base": good})) is good


def _run_with_fake_fray(tmp_path, files: dict[str, str], code: str) -> str:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_marin_types_are_reexported_when_present(tmp_path):
    base = """
        from abc import ABC, abstractmethod
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class TpuConfig:
            type: str
            topology: str | None = None
        class Cluster(ABC):
            @abstractmethod
            def launch(self, request): ...
            @abstractmethod
            def connect(self): ...
    """
    init = """
        SET = []
        def set_current_cluster(cluster):
            SET.append(cluster)
    """
    out = _run_with_fake_fray(
        tmp_path,
        {"fray/__init__.py": "", "fray/cluster/__init__.py": init, "fray/cluster/base.py": base},
        """
        import fray.cluster, fray.cluster.base as marin
        from fray_tpu import fray_api as f
        assert f.USING_MARIN_FRAY
        assert f.TpuConfig is marin.TpuConfig
        assert issubclass(f.Cluster, marin.Cluster)
        assert f.tpu_type_of(marin.TpuConfig(type="v4-8")) == "v4-8"
        assert f.JobRequest.__module__ == "fray_tpu.fray_api"  # absent from this Marin: ours
        from fray_tpu import backend
        backend.set_current_cluster("c")
        assert fray.cluster.SET == ["c"]
        print("ok")
        """,
    )
    assert out == "ok"


def test_unrelated_fray_package_does_not_break_us(tmp_path):
    out = _run_with_fake_fray(
        tmp_path,
        {"fray/__init__.py": "raise RuntimeError('an unrelated web-security tool')\n"},
        """
        from fray_tpu import fray_api as f
        print(f.USING_MARIN_FRAY, f.TpuConfig.__module__)
        """,
    )
    assert out == "False fray_tpu.fray_api"
