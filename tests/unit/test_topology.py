"""The TPU slice table: shapes per tpu-facts.md and helpful errors for names that do not exist."""

import math

import pytest

from fray_tpu.errors import ConfigError, UnknownTpuTypeError
from fray_tpu.topology import (
    GENERATION_ZONES,
    TpuTopology,
    all_tpu_types,
    generation_of,
    get_tpu_topology,
    suggest_tpu_types,
)


@pytest.mark.parametrize(
    "name, chips, vms, chips_per_vm, topology",
    [
        ("v4-8", 4, 1, 4, "2x2x1"),
        ("v4-16", 8, 2, 4, "2x2x2"),
        ("v4-32", 16, 4, 4, "2x2x4"),
        ("v4-128", 64, 16, 4, "4x4x4"),
        ("v4-4096", 2048, 512, 4, "8x16x16"),
        ("v5litepod-1", 1, 1, 1, "1x1"),
        ("v5litepod-4", 4, 1, 4, "2x2"),
        ("v5litepod-8", 8, 1, 8, "2x4"),
        ("v5litepod-16", 16, 4, 4, "4x4"),
        ("v5litepod-256", 256, 64, 4, "16x16"),
        ("v5p-8", 4, 1, 4, "2x2x1"),
        ("v5p-64", 32, 8, 4, "2x4x4"),
        ("v5p-12288", 6144, 1536, 4, "16x16x24"),
        ("v6e-1", 1, 1, 1, "1x1"),
        ("v6e-8", 8, 1, 8, "2x4"),
        ("v6e-16", 16, 4, 4, "4x4"),
        ("v6e-256", 256, 64, 4, "16x16"),
    ],
)
def test_known_shapes(name, chips, vms, chips_per_vm, topology):
    t = get_tpu_topology(name)
    assert (t.chip_count, t.vm_count, t.chips_per_vm, t.topology) == (chips, vms, chips_per_vm, topology)


def test_every_family_and_size_is_present():
    names = set(all_tpu_types())
    assert {f"v4-{2**k}" for k in range(3, 13)} <= names
    assert {f"v5litepod-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)} <= names
    assert {f"v6e-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)} <= names
    assert {"v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-384", "v5p-12288"} <= names
    assert "v5litepod-2" not in names and "v4-4" not in names


@pytest.mark.parametrize("name", all_tpu_types())
def test_every_entry_is_consistent(name):
    t = get_tpu_topology(name)
    assert isinstance(t, TpuTopology) and t.name == name
    assert t.vm_count * t.chips_per_vm == t.chip_count
    assert math.prod(int(d) for d in t.topology.split("x")) == t.chip_count
    number = int(name.rsplit("-", 1)[1])
    if t.generation in ("v4", "v5p"):
        assert t.cores == number == 2 * t.chip_count and t.vm_count == number // 8
    else:
        assert t.cores == number == t.chip_count
        assert t.vm_count == (1 if number <= 8 else number // 4)
    assert t.zones == GENERATION_ZONES[t.generation] and t.zones
    assert t.runtime_version and t.peak_bf16_tflops_per_chip > 0


def test_generation_attributes():
    assert get_tpu_topology("v4-8").runtime_version == "tpu-ubuntu2204-base"
    assert get_tpu_topology("v5litepod-16").runtime_version == "v2-alpha-tpuv5-lite"
    assert get_tpu_topology("v5p-8").runtime_version == "v2-alpha-tpuv5"
    assert get_tpu_topology("v6e-4").runtime_version == "v2-alpha-tpuv6e"
    assert get_tpu_topology("v6e-4").peak_bf16_tflops == 4 * 918.0
    assert [generation_of(n) for n in ("v4-8", "v5litepod-1", "v5p-16", "v6e-256")] == ["v4", "v5e", "v5p", "v6e"]
    assert "us-central2-b" in GENERATION_ZONES["v4"]
    assert {"europe-west4-b", "us-west4-a"} <= set(GENERATION_ZONES["v5e"])


def test_multi_host_flag():
    assert not get_tpu_topology("v5litepod-8").multi_host
    assert get_tpu_topology("v5litepod-16").multi_host


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("v5e-16", ["v5litepod-16"]),
        ("v5e-4", ["v5litepod-4"]),
        ("v6e-3", ["v6e-1", "v6e-4"]),
        ("v4-6", ["v4-8"]),
        ("v5litpod-16", ["v5litepod-16"]),
        ("V4-8", ["v4-8"]),
        ("v5p-100", ["v5p-64", "v5p-128"]),
        ("v4-99999", ["v4-4096"]),
    ],
)
def test_unknown_type_suggests_nearest(bad, expected):
    assert suggest_tpu_types(bad) == expected
    with pytest.raises(UnknownTpuTypeError) as excinfo:
        get_tpu_topology(bad)
    message = str(excinfo.value)
    assert repr(bad) in message
    for suggestion in expected:
        assert suggestion in message


def test_unknown_type_without_suggestion_still_explains():
    with pytest.raises(ConfigError, match="Unknown TPU type 'banana'.*v5litepod-N"):
        get_tpu_topology("banana")
    with pytest.raises(UnknownTpuTypeError):
        generation_of("v5e-16")
