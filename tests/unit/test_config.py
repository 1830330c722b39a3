"""TpuClusterConfig from spec strings and the environment, its validation, and zone resolution."""

import sys

import pytest

from fray_tpu.config import (
    CAPACITY_CLASSES,
    TpuClusterConfig,
    closest_real_location,
    resolve_zones,
)
from fray_tpu.errors import ConfigError, UnknownRegionError, UnknownTpuTypeError
from fray_tpu.topology import get_tpu_topology


def test_spec_parsing():
    c = TpuClusterConfig.from_spec(
        "tpu?project=my-proj&zone=us-central2-b&zone=europe-west4-b&capacity=spot&queued=true"
        "&network=net&subnetwork=sub&external_ips=yes&service_account=sa@p.iam.gserviceaccount.com"
        "&runtime_versions=v5e:custom-v5e&labels=team:ml,cost:research&agent_port=9000"
        "&api_timeout=90s&create_deadline=20m&capacity_deadline=2h&poll_interval=500ms&lease_period=45"
    )
    assert c.project == "my-proj"
    assert c.zones == ["us-central2-b", "europe-west4-b"]
    assert (c.capacity, c.queued, c.external_ips, c.emulate) == ("spot", True, True, False)
    assert (c.network, c.subnetwork, c.service_account) == ("net", "sub", "sa@p.iam.gserviceaccount.com")
    assert c.runtime_versions == {"v5e": "custom-v5e"}
    assert c.labels == {"team": "ml", "cost": "research"}
    assert c.agent_port == 9000
    assert (c.api_timeout, c.create_deadline, c.capacity_deadline, c.poll_interval, c.lease_period) == (
        90.0,
        1200.0,
        7200.0,
        0.5,
        45.0,
    )


def test_defaults_are_documented_values():
    c = TpuClusterConfig(emulate=True)
    assert (c.capacity, c.queued, c.external_ips, c.agent_port) == ("spot", False, False, 8477)
    assert c.api_timeout == 30 and c.poll_interval == 5 and c.capacity_deadline == 4 * 3600
    assert all(getattr(c, name) > 0 for name in ("create_deadline", "boot_deadline", "lease_period", "delete_deadline"))


def test_round_trip_through_to_spec():
    original = TpuClusterConfig.from_spec(
        "tpu?project=p&regions=us-central2,europe-west4&capacity=reserved&reservation=res-1&queued=true"
        "&labels=team:ml&runtime_versions=v4:a,v6e:b&emulate=true&emulator_endpoint=127.0.0.1:4567"
        "&state_dir=/tmp/x y&api_timeout=2.5&boot_deadline=1h&python_version=3.12"
        "&index_url=https://us-python.pkg.dev/p/pypi-remote/simple/"
    )
    assert original.index_url == "https://us-python.pkg.dev/p/pypi-remote/simple/"
    spec = original.to_spec()
    assert spec.startswith("tpu?")
    assert TpuClusterConfig.from_spec(spec) == original
    minimal = TpuClusterConfig(emulate=True)
    assert TpuClusterConfig.from_spec(minimal.to_spec()) == minimal
    for seconds in (1e-05, 0.1234567, 1234567.0):
        fractional = TpuClusterConfig(emulate=True, poll_interval=seconds)
        assert TpuClusterConfig.from_spec(fractional.to_spec()) == fractional


def test_spec_keys_win_over_environment_and_spec_is_self_contained():
    env = {"FRAY_TPU_PROJECT": "env-proj", "FRAY_TPU_CAPACITY": "on-demand", "FRAY_TPU_EXTERNAL_IPS": "true"}
    c = TpuClusterConfig.from_spec("tpu?capacity=spot", environ=env)
    assert (c.project, c.capacity, c.external_ips) == ("env-proj", "spot", True)
    # A job's spec carries every key, so the job's own environment cannot change it.
    assert TpuClusterConfig.from_spec(c.to_spec(), environ={"FRAY_TPU_EXTERNAL_IPS": "false"}) == c


def test_from_env():
    env = {
        "FRAY_TPU_PROJECT": "p",
        "FRAY_TPU_ZONES": "us-central2-b, us-west4-a",
        "FRAY_TPU_CAPACITY": "on_demand",
        "FRAY_TPU_QUEUED": "1",
        "FRAY_TPU_EMULATE": "off",
        "FRAY_TPU_LABELS": "team:ml",
        "FRAY_TPU_AGENT_PORT": "9100",
        "FRAY_TPU_DELETE_DEADLINE": "5m",
        "FRAY_TPU_NETGUARD": "1",  # other FRAY_TPU_* variables are not config and are ignored
        "FRAY_TPU_STATE_DIR": "",  # empty means unset
    }
    c = TpuClusterConfig.from_env(env)
    assert c.zones == ["us-central2-b", "us-west4-a"]
    assert (c.capacity, c.queued, c.emulate, c.agent_port, c.delete_deadline) == ("on-demand", True, False, 9100, 300.0)
    assert c.labels == {"team": "ml"} and c.state_dir is None
    assert TpuClusterConfig.from_env({"GOOGLE_CLOUD_PROJECT": "gp"}).project == "gp"
    assert TpuClusterConfig.from_env({"GOOGLE_CLOUD_PROJECT": "gp", "FRAY_TPU_PROJECT": "fp"}).project == "fp"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("tpu?projct=p", "Unknown key 'projct'.*did you mean 'project'.*Valid keys: .*agent_port"),
        ("tpu?emulate=maybe", "Bad boolean emulate='maybe'.*true or false"),
        ("tpu?emulate=true&agent_port=http", "Bad number agent_port='http'"),
        ("tpu?emulate=true&agent_port=70000", "agent_port must be in 1..65535"),
        ("tpu?emulate=true&agent_port=8479", "agent_port=8479 is one of the ports TPU hosts. actor servers listen on"),
        ("tpu?emulate=true&api_timeout=soon", "Bad duration api_timeout='soon'"),
        ("tpu?emulate=true&poll_interval=0", "poll_interval must be a positive duration"),
        ("tpu?emulate=true&capacity=spto", "Unknown capacity 'spto'.*did you mean 'spot'"),
        ("tpu?emulate=true&capacity=preemptible&queued=true", "no 'preemptible' tier"),
        ("tpu?emulate=true&reservation=r", "needs capacity=reserved"),
        ("tpu?emulate=true&zone=us-central2", "is a region: put it in regions="),
        ("tpu?emulate=true&region=us-central2-b", "is a zone: put it in zones="),
        ("tpu?emulate=true&runtime_versions=v5:x", "generation 'v5'"),
        ("tpu?emulate=true&runtime_versions=v5e", "key:value pairs"),
        ("tpu?emulate=true&labels=Team:ml", "Label key 'Team'"),
        ("tpu?emulate=true&labels=fray-tpu-job:x", "reserved"),
        ("tpu?emulator_endpoint=127.0.0.1:1", "emulate=false: add emulate=true"),
        ("tpu?emulate=true&emulator_endpoint=nowhere", "host:port"),
        ("tpu?emulate=true&emulate=false", "given twice"),
        ("local?x=1", "must start with 'tpu\\?'"),
        ("tpu?emulate=true&python_version=py3", "python_version='py3' is not a Python version such as 3.12"),
        ("tpu?emulate=true&index_url=pypi.org/simple", "index_url='pypi.org/simple' is not an http"),
    ],
)
def test_invalid_specs_are_explained(spec, match):
    with pytest.raises(ConfigError, match=match):
        TpuClusterConfig.from_spec(spec)


def test_the_jobs_python_defaults_to_the_controllers_and_index_url_comes_from_the_environment():
    assert TpuClusterConfig(emulate=True).job_python_version() == "%d.%d" % sys.version_info[:2]
    assert TpuClusterConfig(emulate=True, python_version="3.13").job_python_version() == "3.13"
    c = TpuClusterConfig.from_env({"FRAY_TPU_EMULATE": "1", "FRAY_TPU_INDEX_URL": "http://127.0.0.1:3141/simple/",
                                   "FRAY_TPU_PYTHON_VERSION": "3.12.1"})
    assert (c.index_url, c.python_version) == ("http://127.0.0.1:3141/simple/", "3.12.1")


def test_production_without_project_says_how_to_set_it():
    for build in (lambda: TpuClusterConfig.from_spec("tpu"), lambda: TpuClusterConfig.from_env({}), TpuClusterConfig):
        with pytest.raises(ConfigError, match="needs a GCP project.*project=.*FRAY_TPU_PROJECT.*emulate=true"):
            build()
    assert TpuClusterConfig.from_spec("tpu?emulate=true").project is None


def test_capacity_for_non_preemptible_jobs():
    assert CAPACITY_CLASSES == ("spot", "preemptible", "on-demand", "reserved")
    for capacity, preemptible, expected in [
        ("spot", True, "spot"),
        ("spot", False, "on-demand"),
        ("preemptible", False, "on-demand"),
        ("on-demand", True, "on-demand"),
        ("reserved", False, "reserved"),
    ]:
        assert TpuClusterConfig(emulate=True, capacity=capacity).capacity_for(preemptible) == expected


def test_runtime_version():
    c = TpuClusterConfig(emulate=True, runtime_versions={"v5e": "mine"})
    assert c.runtime_version_for("v5litepod-16") == "mine"
    assert c.runtime_version_for("v4-8") == "tpu-ubuntu2204-base"
    assert c.runtime_version_for(get_tpu_topology("v5litepod-4")) == "mine"
    with pytest.raises(UnknownTpuTypeError):
        c.runtime_version_for("v5e-16")


# ---- zone resolution ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tpu_type, regions, expected",
    [
        ("v4-8", None, ["us-central2-b"]),
        ("v4-8", ["us-central2"], ["us-central2-b"]),
        ("v4-8", ["us-central2-b"], ["us-central2-b"]),
        ("v5litepod-16", ["europe-west4"], ["europe-west4-b"]),
        ("v6e-8", ["europe-west4"], ["europe-west4-a"]),
        ("v5p-8", ["us-east5", "us-central1-a"], ["us-east5-a", "us-central1-a"]),  # the request's order
        ("v5litepod-16", ["us-central2", "europe-west4"], ["europe-west4-b"]),  # real region without v5e skipped
        ("v5litepod-16", ["US-West4 "], ["us-west4-a"]),
    ],
)
def test_resolve_zones(tpu_type, regions, expected):
    assert resolve_zones(tpu_type, regions, TpuClusterConfig(emulate=True)) == expected


def test_resolve_zones_default_order_is_the_table_preference():
    zones = resolve_zones("v5litepod-16", None)
    assert zones[:2] == ["europe-west4-b", "us-west4-a"] and len(zones) == len(set(zones))


def test_misspelt_region_names_the_closest_real_one():
    with pytest.raises(UnknownRegionError, match="'eu-west4'.*Did you mean 'europe-west4'"):
        resolve_zones("v5litepod-16", ["eu-west4"])
    with pytest.raises(UnknownRegionError, match="Did you mean 'us-central2'"):
        resolve_zones("v4-8", ["us-centrl2"])
    assert closest_real_location("eu-west4") == "europe-west4"
    assert closest_real_location("us-cental1") == "us-central1"


def test_real_region_without_the_generation_names_regions_that_offer_it():
    with pytest.raises(UnknownRegionError, match="'us-central2'.*offers no v5e.*regions europe-west4, us-central1"):
        resolve_zones("v5litepod-16", ["us-central2"])
    with pytest.raises(UnknownRegionError, match="offers no v4.*us-central2"):
        resolve_zones("v4-8", ["asia-east1"])
    with pytest.raises(ConfigError):  # UnknownRegionError is a ConfigError
        resolve_zones("v5p-8", ["us-central1-f"])


def test_config_zones_narrow_per_generation():
    config = TpuClusterConfig(emulate=True, zones=["us-central2-b", "europe-west4-b"], regions=["us-east5"])
    assert resolve_zones("v4-8", None, config) == ["us-central2-b"]
    assert resolve_zones("v5litepod-4", None, config) == ["europe-west4-b"]
    assert resolve_zones("v5p-8", None, config) == ["us-east5-a"]
    assert resolve_zones("v5litepod-4", ["europe-west4"], config) == ["europe-west4-b"]
    with pytest.raises(UnknownRegionError, match="config allows only.*europe-west4-b"):
        resolve_zones("v5litepod-4", ["us-west4"], config)
    assert resolve_zones("v6e-8", None, config) == ["us-east5-b", "us-east5-a"]
    with pytest.raises(UnknownRegionError, match="the cluster config offer no v6e"):
        resolve_zones("v6e-8", None, TpuClusterConfig(emulate=True, zones=["us-central2-b", "us-west4-a"]))


def test_resolve_zones_rejects_unknown_types_first():
    with pytest.raises(UnknownTpuTypeError, match="v5litepod-16"):
        resolve_zones("v5e-16", ["europe-west4"])


def test_configured_zones_for_the_operator():
    """The zones a config names (zones, and the known zones of its regions); every known zone when none."""
    from fray_tpu.config import configured_zones

    config = TpuClusterConfig(emulate=True, zones=["us-west4-a"], regions=["us-central2"])
    assert configured_zones(config) == ["us-central2-b", "us-west4-a"]
    assert len(configured_zones(TpuClusterConfig(emulate=True))) > 5
