"""The dry-run plan: shapes, zone order, capacity, prices, rendering, and the errors a real job raises."""

import json

import pytest

from fray_tpu.config import TpuClusterConfig
from fray_tpu.costs import PriceTable
from fray_tpu.errors import ConfigError, UnknownRegionError, UnknownTpuTypeError
from fray_tpu.ops.plan_report import plan_report
from fray_tpu.topology import GENERATION_ZONES

EMULATED = TpuClusterConfig(emulate=True)


def test_two_v5e_16_slices_on_spot():
    plan = plan_report("v5litepod-16", 2, None, "spot", EMULATED, PriceTable.default())
    assert (plan.tpu_type, plan.generation, plan.topology) == ("v5litepod-16", "v5e", "4x4")
    assert (plan.vms_per_slice, plan.chips_per_vm, plan.chips_per_slice) == (4, 4, 16)
    assert (plan.total_vms, plan.total_chips) == (8, 32)
    assert plan.runtime_version == "v2-alpha-tpuv5-lite"
    assert plan.capacity == "spot"
    assert plan.zones == GENERATION_ZONES["v5e"]
    assert plan.usd_per_chip_hour == 0.48
    assert plan.hourly_usd == pytest.approx(32 * 0.48)
    assert plan.peak_bf16_pflops == pytest.approx(32 * 197 / 1000)


def test_v4_names_count_cores():
    plan = plan_report("v4-32", 1, None, "on-demand", EMULATED, PriceTable.default())
    assert (plan.chips_per_slice, plan.vms_per_slice, plan.total_chips) == (16, 4, 16)
    assert plan.hourly_usd == pytest.approx(16 * 3.22)


def test_regions_and_config_narrow_and_order_the_zones():
    config = TpuClusterConfig(emulate=True, regions=["us-east5", "europe-west4"])
    plan = plan_report("v6e-8", 1, None, "spot", config, PriceTable.default())
    assert plan.zones == ("us-east5-b", "us-east5-a", "europe-west4-a")
    narrowed = plan_report("v6e-8", 1, ["europe-west4"], "spot", config, PriceTable.default())
    assert narrowed.zones == ("europe-west4-a",)


def test_capacity_defaults_to_the_config_and_non_preemptible_means_on_demand():
    config = TpuClusterConfig(emulate=True, capacity="preemptible")
    assert plan_report("v5p-8", 1, None, None, config, PriceTable.default()).capacity == "preemptible"
    strict = plan_report("v5p-8", 1, None, None, config, PriceTable.default(), preemptible=False)
    assert strict.capacity == "on-demand"
    assert strict.usd_per_chip_hour == PriceTable.default().price("v5p", "on-demand")


def test_capacity_aliases_and_reservations():
    reserved = TpuClusterConfig(emulate=True, capacity="reserved", reservation="my-res")
    assert plan_report("v6e-4", 1, None, "on_demand", reserved, PriceTable.default()).capacity == "on-demand"
    assert plan_report("v6e-4", 1, None, "reserved", reserved, PriceTable.default()).usd_per_chip_hour == 1.89


def test_runtime_version_override_and_price_override():
    config = TpuClusterConfig(emulate=True, runtime_versions={"v5e": "my-image"})
    prices = PriceTable.from_mapping({"v5e": {"spot": 0.5}})
    plan = plan_report("v5litepod-4", 3, None, "spot", config, prices)
    assert plan.runtime_version == "my-image"
    assert plan.hourly_usd == pytest.approx(12 * 0.5)


def test_to_dict_is_json_and_text_is_aligned():
    plan = plan_report("v5litepod-16", 2, ["us-west4"], "spot", EMULATED, PriceTable.default())
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["zones"] == ["us-west4-a"]
    assert d["hourly_usd"] == 15.36
    assert d["total_vms"] == 8
    text = plan.render_text()
    lines = text.splitlines()
    assert lines[0].startswith("TPU type ") and "v5litepod-16 (v5e, topology 4x4)" in lines[0]
    column = lines[0].index("v5litepod-16")
    for line in lines[:-1]:  # every value starts in the same column, after the label and 2+ spaces
        assert line[column - 2 : column] == "  " and line[column] != " "
    assert "$15.36/hour for 2 slices ($0.48 per chip-hour)" in text
    v4 = plan_report("v4-8", 1, None, "spot", EMULATED, PriceTable.default()).render_text()
    assert "$3.69/hour for 1 slice ($0.9215 per chip-hour)" in v4
    assert "us-west4-a" in text
    assert "nothing was created" in lines[-1]


@pytest.mark.parametrize(
    "args, error, words",
    [
        (("v5e-16", 1, None, "spot"), UnknownTpuTypeError, ["v5litepod-16"]),
        (("v5litepod-16", 1, ["eu-west4"], "spot"), UnknownRegionError, ["europe-west4"]),
        (("v5litepod-16", 1, ["asia-east1"], "spot"), UnknownRegionError, ["no v5e"]),
        (("v5litepod-16", 1, None, "spotty"), ConfigError, ["'spotty'", "spot"]),
        (("v5litepod-16", 0, None, "spot"), ConfigError, ["slice_count", "0"]),
    ],
)
def test_bad_input_raises_the_config_errors(args, error, words):
    with pytest.raises(error) as info:
        plan_report(*args, EMULATED, PriceTable.default())
    for word in words:
        assert word in str(info.value)


def test_multislice_of_single_host_slices_is_warned_about_in_the_plan():
    """Two v5litepod-8 (one VM each) get the warning with its reason; multi-host slices do not."""
    single = plan_report("v5litepod-8", 2, None, "spot", EMULATED, PriceTable.default())
    assert "WARNING: several single-host slices" in single.render_text()
    assert "WARNING" not in plan_report("v5litepod-16", 2, None, "spot", EMULATED, PriceTable.default()).placement
    assert "WARNING" not in plan_report("v5litepod-8", 1, None, "spot", EMULATED, PriceTable.default()).placement
