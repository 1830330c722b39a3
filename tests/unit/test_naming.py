"""Resource names and labels are valid for GCP and unique per job, attempt and slice."""

from datetime import UTC, datetime

import pytest

from fray_tpu.errors import ConfigError
from fray_tpu.naming import (
    LABEL_ATTEMPT,
    LABEL_CONTROLLER,
    LABEL_JOB,
    LABEL_KEY_PATTERN,
    LABEL_MANAGED,
    LABEL_SLICE,
    LABEL_VALUE_PATTERN,
    MANAGED_LABELS,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    label_value,
    new_controller_id,
    new_job_id,
    resource_labels,
    slice_name,
    validate_extra_labels,
)

ODD_JOB_NAMES = ["train_lm", "Train LM!!", "x" * 200, "123", "---", "", "ünïcödé/job", "a" * 63, "UPPER-case_Mixed"]


@pytest.mark.parametrize("job_name", ODD_JOB_NAMES)
def test_slice_names_are_valid(job_name):
    for attempt, slice_index in [(0, 0), (7, 3), (123456, 4095)]:
        name = slice_name(job_name, "train-lm-20261127-095501-ab12cd", attempt, slice_index)
        assert NAME_PATTERN.match(name), name
        assert len(name) <= MAX_NAME_LENGTH


def test_slice_names_are_unique_per_job_attempt_and_slice():
    job_ids = [new_job_id("train_lm") for _ in range(20)]  # Marin launches many jobs with one name
    names = {slice_name("train_lm", job_id, attempt, s) for job_id in job_ids for attempt in range(3) for s in range(4)}
    assert len(names) == 20 * 3 * 4
    # Long names that agree on their first 63 characters still differ.
    long_a, long_b = "a" * 100 + "1", "a" * 100 + "2"
    assert slice_name(long_a, "id-1", 0, 0) != slice_name(long_b, "id-2", 0, 0)


def test_slice_name_is_readable_and_deterministic():
    name = slice_name("Train LM", "job-1", 2, 1)
    assert name.startswith("fray-train-lm-") and name.endswith("-2-1")
    assert slice_name("Train LM", "job-1", 2, 1) == name


def test_slice_name_rejects_negative_indices():
    with pytest.raises(ValueError, match="attempt"):
        slice_name("j", "id", -1, 0)
    with pytest.raises(ValueError, match="slice_index"):
        resource_labels("id", 0, "c", -2)


def test_resource_labels():
    labels = resource_labels("train-lm-20261127-095501-ab12cd", 3, "host-1a2b3c4d", 1, extra={"team": "ml"})
    assert labels == {
        "team": "ml",
        LABEL_MANAGED: "true",
        LABEL_JOB: "train-lm-20261127-095501-ab12cd",
        LABEL_ATTEMPT: "3",
        LABEL_CONTROLLER: "host-1a2b3c4d",
        LABEL_SLICE: "1",
    }
    assert set(MANAGED_LABELS) == {"fray-tpu-managed", "fray-tpu-job", "fray-tpu-attempt", "fray-tpu-controller", "fray-tpu-slice"}
    for key, value in labels.items():
        assert LABEL_KEY_PATTERN.match(key) and LABEL_VALUE_PATTERN.match(value)


def test_label_values_are_sanitised_deterministically_and_distinctly():
    assert label_value("ok_value-1") == "ok_value-1"
    odd = ["Job With Spaces", "x" * 100, "x" * 100 + "y", "JOB", "job"]
    values = [label_value(v) for v in odd]
    assert all(LABEL_VALUE_PATTERN.match(v) for v in values)
    assert len(set(values)) == len(odd)
    assert label_value("Job With Spaces") == label_value("Job With Spaces")
    assert resource_labels("Weird Id", 0, "C", 0)[LABEL_JOB] == label_value("Weird Id")


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"Team": "ml"}, "Label key 'Team' is invalid.*'team'"),
        ({"1team": "ml"}, "Label key '1team'"),
        ({"k" * 64: "v"}, "is invalid"),
        ({"team": "ML"}, "team='ML' has an invalid value.*try"),
        ({"team": "v" * 64}, "invalid value"),
        ({"fray-tpu-job": "x"}, "reserved for fray-tpu"),
        ({f"k{i}": "v" for i in range(60)}, "at most 59"),
    ],
)
def test_bad_extra_labels_are_explained(labels, match):
    with pytest.raises(ConfigError, match=match):
        validate_extra_labels(labels)


def test_good_extra_labels_pass():
    assert validate_extra_labels({"team": "ml", "cost-center": "", "a_b": "1-2"}) == {"team": "ml", "cost-center": "", "a_b": "1-2"}


def test_new_job_id_is_readable_unique_and_a_label_value():
    moment = datetime(2026, 11, 27, 9, 55, 1, tzinfo=UTC)
    job_id = new_job_id("Train LM", now=moment)
    assert job_id.startswith("train-lm-20261127-095501-") and len(job_id.rsplit("-", 1)[1]) == 8
    assert len({new_job_id("train_lm", now=moment) for _ in range(200)}) == 200
    for name in ODD_JOB_NAMES:
        assert LABEL_VALUE_PATTERN.match(new_job_id(name)) and isinstance(new_job_id(name), str)
    assert new_job_id("").startswith("job-")


def test_new_controller_id():
    ids = {new_controller_id("My.Host_Name") for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith("my-host-name-") and LABEL_VALUE_PATTERN.match(i) for i in ids)
    assert LABEL_VALUE_PATTERN.match(new_controller_id())
