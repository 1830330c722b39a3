"""Price table (defaults, overrides, errors) and job chip-hour accounting on hand-computed examples."""

import pytest

from fray_tpu.config import CAPACITY_CLASSES
from fray_tpu.costs import GENERATIONS, JobCost, PriceTable, SliceInterval, job_cost
from fray_tpu.errors import ConfigError

H = 3600.0


def interval(
    slice_id=0,
    attempt=0,
    chips=16,
    generation="v5e",
    capacity="spot",
    provisioned_at=0.0,
    ready_at=None,
    running_from=None,
    running_until=None,
    released_at=None,
    preempted=False,
):
    return SliceInterval(
        slice_id=slice_id,
        attempt=attempt,
        chips=chips,
        generation=generation,
        capacity=capacity,
        provisioned_at=provisioned_at,
        ready_at=ready_at,
        running_from=running_from,
        running_until=running_until,
        released_at=released_at,
        preempted=preempted,
    )


def assert_buckets_add_up(cost: JobCost) -> None:
    parts = cost.chip_hours_running + cost.chip_hours_lost_preemption + cost.chip_hours_boot + cost.chip_hours_idle
    assert parts == pytest.approx(cost.chip_hours_provisioned)


# ---- price table ---------------------------------------------------------------------------


def test_default_table_prices_every_generation_and_class():
    table = PriceTable.default()
    for generation in GENERATIONS:
        for capacity in CAPACITY_CLASSES:
            assert table.price(generation, capacity) > 0
        on_demand = table.price(generation, "on-demand")
        assert table.price(generation, "spot") < on_demand
        assert table.price(generation, "reserved") < on_demand
    assert table.price("v5e", "on-demand") == 1.20
    assert table.price("v6e", "reserved") == 1.89


def test_mapping_override_merges_over_defaults():
    table = PriceTable.from_mapping({"v5e": {"spot": 0.6}, "v6e": {"on_demand": 3}})
    assert table.price("v5e", "spot") == 0.6
    assert table.price("v6e", "on-demand") == 3.0
    assert table.price("v5e", "on-demand") == PriceTable.default().price("v5e", "on-demand")
    assert PriceTable.default().price("v5e", "spot") == 0.48  # the defaults are untouched


def test_env_override_merges_over_defaults():
    table = PriceTable.from_env({"FRAY_TPU_PRICES": '{"v5p": {"reserved": 2.5}}'})
    assert table.price("v5p", "reserved") == 2.5
    assert table.price("v5p", "spot") == PriceTable.default().price("v5p", "spot")
    assert PriceTable.from_env({}).to_dict() == PriceTable.default().to_dict()


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"v7": {"spot": 1.0}}, ["'v7'", "valid generations", "v5e"]),
        ({"v5litepod": {"spot": 1.0}}, ["'v5litepod'", "v5e is the generation"]),
        ({"v5e": {"spott": 1.0}}, ["'spott'", "did you mean 'spot'", "valid classes"]),
        ({"v5e": {"spot": -1}}, ["v5e.spot", "non-negative", "-1"]),
        ({"v5e": {"spot": "cheap"}}, ["v5e.spot", "'cheap'"]),
        ({"v5e": 0.6}, ["'v5e'", "capacity class"]),
    ],
)
def test_bad_overrides_name_the_value_and_the_fix(overrides, words):
    with pytest.raises(ConfigError) as info:
        PriceTable.from_mapping(overrides)
    for word in words:
        assert word in str(info.value)


def test_bad_env_json_names_the_variable():
    with pytest.raises(ConfigError, match="FRAY_TPU_PRICES is not valid JSON"):
        PriceTable.from_env({"FRAY_TPU_PRICES": "{v5e: spot}"})


def test_price_lookup_of_unknown_names_raises():
    with pytest.raises(ConfigError, match="Unknown TPU generation 'v9'"):
        PriceTable.default().price("v9", "spot")
    with pytest.raises(ConfigError, match="Unknown capacity class 'free'"):
        PriceTable.default().price("v5e", "free")


# ---- accounting ----------------------------------------------------------------------------


def test_closed_slice_boot_run_idle():
    # 16 v5e chips: created at 0, user code 600 s → 4200 s, deleted at 4500 s.
    cost = job_cost(
        [interval(ready_at=300, running_from=600, running_until=4200, released_at=4500)],
        now=10_000,
        prices=PriceTable.default(),
    )
    assert cost.chip_hours_provisioned == pytest.approx(16 * 4500 / H)  # 20
    assert cost.chip_hours_boot == pytest.approx(16 * 600 / H)
    assert cost.chip_hours_running == pytest.approx(16.0)
    assert cost.chip_hours_idle == pytest.approx(16 * 300 / H)
    assert cost.chip_hours_lost_preemption == 0
    assert cost.estimated_usd == pytest.approx(20 * 0.48)
    assert cost.by_capacity == {"spot": pytest.approx(9.6)}
    assert_buckets_add_up(cost)


def test_open_interval_counts_up_to_now():
    # 4 on-demand v6e chips, still running at now = 3960 s.
    slices = [interval(chips=4, generation="v6e", capacity="on-demand", running_from=360)]
    cost = job_cost(slices, now=3960, prices=PriceTable.default())
    assert cost.chip_hours_provisioned == pytest.approx(4.4)
    assert cost.chip_hours_boot == pytest.approx(0.4)
    assert cost.chip_hours_running == pytest.approx(4.0)
    assert cost.chip_hours_idle == pytest.approx(0.0)
    assert cost.estimated_usd == pytest.approx(4.4 * 2.70)
    later = job_cost(slices, now=3960 + H, prices=PriceTable.default())
    assert later.chip_hours_running == pytest.approx(8.0)


def test_never_ran_slice_is_all_boot():
    cost = job_cost([interval(chips=8, released_at=900)], now=5000, prices=PriceTable.default())
    assert cost.chip_hours_boot == pytest.approx(8 * 900 / H)
    assert cost.chip_hours_running == 0
    assert_buckets_add_up(cost)


def test_preempted_attempt_then_replacement():
    # 8 v5p chips on spot. Slice 0 boots 1800 s, runs 1 h, is preempted, deleted 300 s later.
    # Slice 1 replaces it: boots 1800 s, runs 2 h, finishes, deleted 300 s later.
    slices = [
        interval(chips=8, generation="v5p", running_from=1800, running_until=5400, released_at=5700, preempted=True),
        interval(
            slice_id=1,
            attempt=1,
            chips=8,
            generation="v5p",
            provisioned_at=5700,
            running_from=7500,
            running_until=14_700,
            released_at=15_000,
        ),
    ]
    cost = job_cost(slices, now=20_000, prices=PriceTable.default())
    assert cost.chip_hours_provisioned == pytest.approx(8 * 15_000 / H)
    assert cost.chip_hours_lost_preemption == pytest.approx(8 * 5400 / H)  # 12: boot + run of slice 0
    assert cost.chip_hours_boot == pytest.approx(4.0)  # slice 1's boot only
    assert cost.chip_hours_running == pytest.approx(16.0)
    assert cost.chip_hours_idle == pytest.approx(8 * 600 / H)
    assert cost.estimated_usd == pytest.approx(8 * 15_000 / H * 1.68)
    assert_buckets_add_up(cost)


def test_slice_kept_across_attempts_is_billed_once():
    # One slice, held 0 → 500 s; attempt 0 runs 100 → 200 (user code failed), attempt 1 runs 300 → 400.
    slices = [
        interval(chips=36, running_from=100, running_until=200),
        interval(attempt=1, chips=36, running_from=300, running_until=400, released_at=500),
    ]
    cost = job_cost(slices, now=600, prices=PriceTable.default())
    assert cost.chip_hours_provisioned == pytest.approx(36 * 500 / H)
    assert cost.chip_hours_running == pytest.approx(36 * 200 / H)
    assert cost.chip_hours_boot == pytest.approx(36 * 200 / H)  # before attempt 0, between attempts
    assert cost.chip_hours_idle == pytest.approx(36 * 100 / H)
    assert_buckets_add_up(cost)


def test_price_override_changes_the_estimate_only():
    slices = [interval(running_from=600, running_until=4200, released_at=4500)]
    default = job_cost(slices, now=5000, prices=PriceTable.default())
    cheaper = job_cost(slices, now=5000, prices=PriceTable.from_mapping({"v5e": {"spot": 0.6}}))
    assert cheaper.estimated_usd == pytest.approx(20 * 0.6)
    assert cheaper.chip_hours_provisioned == default.chip_hours_provisioned


def test_cost_by_capacity_class():
    slices = [
        interval(chips=4, capacity="spot", released_at=H),
        interval(slice_id=1, chips=4, capacity="on-demand", released_at=H),
    ]
    cost = job_cost(slices, now=H, prices=PriceTable.default())
    assert cost.by_capacity == {"spot": pytest.approx(4 * 0.48), "on-demand": pytest.approx(4 * 1.20)}
    assert cost.estimated_usd == pytest.approx(4 * 0.48 + 4 * 1.20)


def test_no_intervals_cost_nothing():
    cost = job_cost([], now=100, prices=PriceTable.default())
    assert cost.to_dict()["estimated_usd"] == 0
    assert cost.chip_hours_provisioned == 0


def test_to_dict_rounds():
    cost = job_cost([interval(chips=1, running_from=1, released_at=10)], now=10, prices=PriceTable.default())
    d = cost.to_dict()
    assert d["chip_hours_provisioned"] == 0.0028  # 10 chip-seconds
    assert d["chip_hours_running"] == 0.0025  # 9 chip-seconds
    assert d["estimated_usd"] == 0.0
    assert set(d) == {
        "chip_hours_provisioned",
        "chip_hours_running",
        "chip_hours_lost_preemption",
        "chip_hours_boot",
        "chip_hours_idle",
        "estimated_usd",
        "by_capacity",
        "started_warm",
    }


def test_one_slice_id_with_two_shapes_is_rejected():
    with pytest.raises(ValueError, match="Slice 3"):
        job_cost([interval(slice_id=3, chips=4), interval(slice_id=3, chips=8)], now=10, prices=PriceTable.default())


def test_the_journal_record_round_trips_and_reads_old_rows():
    """JobAccount writes the journal's extra column in the shape it always had, and reads it back."""
    from fray_tpu.costs import AttemptAccount, JobAccount

    account = JobAccount("v5e", "spot", [AttemptAccount(1, 10.0, ["s-0"], ended=20.0, outcome="preempted",
                                                        lost=["s-0"]), AttemptAccount(2, 30.0, ["s-1"])])
    extra = account.to_extra()
    assert extra == {"generation": "v5e", "capacity": "spot", "attempts": [
        {"attempt": 1, "started": 10.0, "slices": ["s-0"], "ended": 20.0, "outcome": "preempted", "lost": ["s-0"]},
        {"attempt": 2, "started": 30.0, "slices": ["s-1"]}]}
    assert JobAccount.from_extra(extra) == account
    assert JobAccount.from_extra(extra).open_attempt().attempt == 2
    assert JobAccount.from_extra({}) == JobAccount()


def test_slice_rate_and_usd():
    """A slice's chips and price come from the topology and the price table; unknown types have none."""
    from fray_tpu.costs import slice_rate, usd_for

    prices = PriceTable.default()
    chips, price = slice_rate("v5litepod-16", "on-demand", prices)
    assert chips == 16 and price == prices.price("v5e", "on-demand")
    assert slice_rate("v9-unknown", "on-demand", prices) == (0, None)
    assert slice_rate(None, "spot", prices) == (0, None)
    assert usd_for(16, 1.5, 1800.0) == pytest.approx(12.0)
