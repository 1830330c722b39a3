"""Placement rules (pure): one zone per gang, hosts in the order of their own worker numbers."""

from __future__ import annotations

import pytest

from fray_tpu.placement import WorkerOrderMismatch, group_zone_order, placement_note, worker_order


def test_held_slices_pin_the_group_to_their_zone():
    """Missing slices join the held ones' zone; with none held every allowed zone is tried."""
    allowed = ["us-east5-b", "us-east5-a"]
    assert group_zone_order(allowed, []) == allowed
    assert group_zone_order(allowed, ["us-east5-a", "us-east5-a"]) == ["us-east5-a"]
    assert group_zone_order(allowed, ["us-east5-a", "us-east5-b"]) == allowed  # split: cannot pin
    assert "one zone" in placement_note(2) and "one zone" not in placement_note(1)


def test_endpoints_out_of_order_are_put_in_worker_order():
    """Endpoint i's agent reports worker number reported[i]; the result lists endpoints by worker."""
    assert worker_order(["a", "b", "c"], [0, 1, 2]) == [0, 1, 2]
    assert worker_order(["a", "b", "c"], [2, 0, 1]) == [1, 2, 0]


@pytest.mark.parametrize("reported", [[0, 0, 1], [1, 2, 3], [0, 1]])
def test_worker_numbers_that_do_not_fit_refuse_the_gang(reported):
    """Duplicates, gaps or a count mismatch refuse the gang, naming each endpoint's answer."""
    with pytest.raises(WorkerOrderMismatch, match="refusing to start a gang") as raised:
        worker_order(["a", "b", "c"], reported)
    assert "a says" in str(raised.value)


def test_multislice_of_single_host_slices_is_warned_about_in_the_plan():
    """Two v5litepod-8 (one VM each) get the warning with its reason; multi-host slices do not."""
    from fray_tpu.config import TpuClusterConfig
    from fray_tpu.costs import PriceTable
    from fray_tpu.plan_report import plan_report

    config = TpuClusterConfig(emulate=True)
    single = plan_report("v5litepod-8", 2, None, "spot", config, PriceTable.default())
    assert "WARNING: several single-host slices" in single.render_text()
    assert "WARNING" not in plan_report("v5litepod-16", 2, None, "spot", config, PriceTable.default()).placement
    assert "WARNING" not in plan_report("v5litepod-8", 1, None, "spot", config, PriceTable.default()).placement
