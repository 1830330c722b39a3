"""Job environments end to end on the Cloud TPU emulator: the gang's first host builds the job's
environment with uv from the loopback index and shares it through the staging bucket, the other
hosts and later jobs (on fresh VMs) download it, a tampered archive is refused, and an
environment that cannot be built fails the job at once with uv's words (issue 11). The ``fake_gcp`` fixture fails any test that
leaves a node or queued resource alive.

The job's Python here is the controller's (the default: a pickled callable only loads on the
major.minor that pickled it); tests/edges/test_pyenv.py covers a Python other than the agent's.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import cloudpickle
import pytest
from fake_gcp.host_jobs import write_json
from package_fixtures import LOCKED_SIX, NEWEST_SIX, PYPROJECT, lock_workspace, uv_workspace
from test_tpu_cluster import JOB_TIMEOUT, finish, read_json_files, tpu_request

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.emulator.storage import EMULATED_BUCKET
from fray_tpu.fray_api import EnvironmentConfig, JobStatus

cloudpickle.register_pickle_by_value(sys.modules[__name__])

HOSTS = 4  # one v5litepod-16


def report_environment_second_time(out_dir: str) -> None:
    """Task 0 fails the first attempt (so the gang runs twice); then each task reports what its
    environment holds."""
    import six

    marker = Path(out_dir) / "tried"
    if os.environ["FRAY_TASK_INDEX"] == "0" and not marker.exists():
        marker.write_text("")
        raise SystemExit(1)

    write_json(Path(out_dir) / f"host-{os.environ['FRAY_TASK_INDEX']}.json",
               {"python": sys.executable, "six": six.__version__, "prefix": sys.prefix,
                "version": "%d.%d" % sys.version_info[:2]})


def never_runs() -> None:
    raise SystemExit("the environment was supposed to fail before the job ran")


@pytest.fixture
def env_cluster(emulator_process, package_index):
    c = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                                    lease_period=30.0, index_url=package_index.url,
                                    keep_warm=0))  # shut down after the leak check: no warm slice may outlive a test
    yield c
    c.shutdown(timeout=120)


def _locked_workspace(tmp_path: Path, index_url: str) -> Path:
    """A workspace locked for the controller's Python (the job's default), six held back."""
    workspace = uv_workspace(tmp_path)
    lock_workspace(workspace, index_url, f"six=={LOCKED_SIX}", python="%d.%d" % sys.version_info[:2])
    return workspace


def _request(name: str, fn, args, workspace: Path, **environment):
    """A one-slice request; a budget of 3 failures shows that an environment failure spends none."""
    request = tpu_request(name, fn, args, str(workspace), max_retries_failure=3)
    request.environment = EnvironmentConfig.create(workspace=str(workspace), **environment)
    return request


def _environment_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Python environment" in r.getMessage()]


def test_every_host_builds_the_locked_environment_and_the_next_attempt_reuses_it(
        env_cluster, fake_gcp, package_index, tmp_path, out_dir, caplog):
    """Four hosts run the job in a uv environment with six at the locked 1.16.0 (the index's
    newest is 1.17.0). The first attempt fails on purpose; the progress lines say the environment
    was built on four hosts for it and reused on the same four hosts for the second attempt."""
    workspace = _locked_workspace(tmp_path, package_index.url)
    with caplog.at_level(logging.INFO, logger="fray_tpu"):
        info = finish(env_cluster, env_cluster.launch(_request("locked-env", report_environment_second_time,
                                                               [str(out_dir)], workspace)))
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    assert env_cluster.job_counters(info.job_id).attempts == 2
    reports = read_json_files(out_dir, "host-*.json")
    assert len(reports) == HOSTS
    assert {r["six"] for r in reports.values()} == {LOCKED_SIX} != {NEWEST_SIX}
    assert all(r["prefix"] != sys.prefix and "pyenvs" in r["prefix"] for r in reports.values())
    lines = _environment_lines(caplog)
    assert len(lines) == 2, lines
    # One builder per gang: worker 0 builds and uploads, the other hosts download its archive.
    assert "built with uv on worker 0" in lines[0] and f"downloaded from the bucket on {HOSTS - 1} hosts" in lines[0]
    assert "uploaded gs://" in lines[0] and "reused" not in lines[0], lines
    assert f"reused from the host's own cache on {HOSTS} hosts" in lines[1] and "built" not in lines[1], lines


def report_packages(out_dir: str) -> None:
    import six

    write_json(Path(out_dir) / f"host-{os.environ['FRAY_TASK_INDEX']}.json",
               {"six": six.__version__, "prefix": sys.prefix})


def _archive_name(line: str) -> str:
    """The environment archive the builder's note names (gs://BUCKET/NAME)."""
    match = re.search(r"uploaded gs://([^/]+)/(\S+\.tar)", line)
    assert match, line
    return match.group(2)


def _environment_lines_of_job(cluster, caplog, name: str, out_dir: Path, workspace, pip_packages: list[str]) -> list[str]:
    """Run ``report_packages`` with ``pip_packages`` to success; its environment progress lines."""
    out_dir.mkdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fray_tpu"):
        info = finish(cluster, cluster.launch(_request(name, report_packages, [str(out_dir)], Path(workspace),
                                                       pip_packages=pip_packages)))
    assert info.status == JobStatus.SUCCEEDED, info.error_message
    return _environment_lines(caplog)


def test_an_environment_one_job_built_is_downloaded_by_a_later_job_on_fresh_vms(
        env_cluster, fake_gcp, package_index, workspace, tmp_path, caplog):
    """The first job's worker 0 builds the environment and uploads it; the second job, on new
    VMs (no warm pool: keep_warm=0), downloads it on every host, builds nothing and asks the
    index nothing."""
    def run(name: str, out_dir: Path) -> list[str]:
        lines = _environment_lines_of_job(env_cluster, caplog, name, out_dir, workspace, ["six", "iniconfig"])
        assert {r["six"] for r in read_json_files(out_dir, "host-*.json").values()} == {NEWEST_SIX}
        return lines

    first = run("env-first", tmp_path / "first")
    assert len(first) == 1 and "built with uv on worker 0" in first[0], first
    index_requests = package_index.requests
    nodes_before = fake_gcp.control.counters().get("CreateNode", 0)
    second = run("env-second", tmp_path / "second")
    assert fake_gcp.control.counters().get("CreateNode", 0) == nodes_before + 1  # a fresh slice
    assert len(second) == 1 and f"downloaded from the bucket on {HOSTS} hosts" in second[0], second
    assert "built" not in second[0] and "reused" not in second[0], second
    assert package_index.requests == index_requests


def test_a_tampered_environment_archive_is_refused_and_rebuilt(env_cluster, fake_gcp, package_index, workspace,
                                                               tmp_path, caplog):
    """Someone overwrites the archive (keeping the recorded SHA-256): the next job's hosts refuse
    it, worker 0 builds again and replaces it, the others download the replacement; the job
    succeeds, and the line says what was refused."""
    def run(name: str, out_dir: Path) -> list[str]:
        return _environment_lines_of_job(env_cluster, caplog, name, out_dir, workspace, ["six", "tomli"])

    [first] = run("env-untampered", tmp_path / "first")
    name = _archive_name(first)
    storage = fake_gcp.control.storage_endpoint()
    resource = _storage_json(storage, name)
    _overwrite_object(storage, name, b"tampered", resource["metadata"])
    tampered = _storage_json(storage, name)["generation"]
    [second] = run("env-tampered", tmp_path / "second")
    assert "built with uv on worker 0" in second and f"downloaded from the bucket on {HOSTS - 1} hosts" in second
    assert "refused gs://" in second and "its uploader recorded" in second, second
    assert f"(generation {tampered})" in second
    replaced = _storage_json(storage, name)
    assert replaced["generation"] != tampered and replaced["size"] == resource["size"]  # a good archive again


def test_two_jobs_racing_to_upload_one_environment_leave_one_whole_archive(
        env_cluster, fake_gcp, package_index, workspace, tmp_path, caplog):
    """Two jobs launched together need the same new environment: each gang's worker 0 builds it
    and uploads create-only; exactly one upload creates the archive, the other is refused (412)
    and keeps its build; both jobs succeed and a third job downloads the archive on every host."""
    def launch(name: str) -> str:
        out_dir = tmp_path / name
        out_dir.mkdir()
        return env_cluster.launch(_request(name, report_packages, [str(out_dir)], Path(workspace),
                                           pip_packages=["six", "iniconfig", "tomli"]))

    with caplog.at_level(logging.INFO, logger="fray_tpu"):
        jobs = [launch("env-race-a"), launch("env-race-b")]
        infos = [finish(env_cluster, job) for job in jobs]
        assert [i.status for i in infos] == [JobStatus.SUCCEEDED] * 2, [i.error_message for i in infos]
        raced = _environment_lines(caplog)
        caplog.clear()
        third = finish(env_cluster, launch("env-race-c"))
    assert third.status == JobStatus.SUCCEEDED, third.error_message
    assert len(raced) == 2 and sum("uploaded gs://" in line for line in raced) == 1, raced
    # Either both built (one upload refused) or the slower gang's builder found the archive already.
    assert sum("another host put" in line for line in raced) + sum("built with uv" not in line for line in raced) == 1
    [after] = _environment_lines(caplog)
    assert f"downloaded from the bucket on {HOSTS} hosts" in after, after


def _storage_json(endpoint: str, name: str) -> dict:
    url = f"{endpoint}/storage/v1/b/{EMULATED_BUCKET}/o/{urllib.parse.quote(name, safe='')}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer test"})) as response:
        return json.loads(response.read())


def _overwrite_object(endpoint: str, name: str, data: bytes, metadata: dict) -> None:
    """An upload over the object without any precondition, keeping the metadata it had."""
    query = urllib.parse.urlencode({"uploadType": "resumable", "name": name})
    start = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{EMULATED_BUCKET}/o?{query}", method="POST",
                                   data=json.dumps({"metadata": metadata}).encode(),
                                   headers={"Authorization": "Bearer test", "Content-Type": "application/json"})
    with urllib.request.urlopen(start) as response:
        session = response.headers["Location"]
    with urllib.request.urlopen(urllib.request.Request(session, method="PUT", data=data)) as response:
        response.read()


def _assert_failed_at_once(cluster: TpuCluster, info, *needles: str) -> None:
    assert info.status == JobStatus.FAILED
    assert "not retried" in info.error_message, info.error_message
    for needle in needles:
        assert needle in info.error_message, info.error_message
    assert cluster.job_counters(info.job_id).attempts == 1


def test_an_unresolvable_requirement_fails_the_job_at_once_with_the_resolvers_message(
        env_cluster, fake_gcp, workspace):
    info = finish(env_cluster, env_cluster.launch(_request("unresolvable", never_runs, [], Path(workspace),
                                                           pip_packages=["six==99.0"])))
    _assert_failed_at_once(env_cluster, info, "six==99.0", "unsatisfiable")


def test_a_lock_that_does_not_match_its_pyproject_fails_the_job_before_any_slice(
        env_cluster, fake_gcp, package_index, tmp_path):
    """The controller checks the lock before provisioning: no attempt, no slice, uv's words."""
    workspace = _locked_workspace(tmp_path, package_index.url)
    (workspace / "pyproject.toml").write_text(PYPROJECT.replace('dependencies = ["six"]',
                                                                'dependencies = ["six", "tomli"]'))
    info = finish(env_cluster, env_cluster.launch(_request("stale-lock", never_runs, [], workspace)))
    assert info.status == JobStatus.FAILED
    assert "uv.lock does not match its pyproject.toml" in info.error_message, info.error_message
    assert "needs to be updated" in info.error_message, info.error_message
    assert env_cluster.job_counters(info.job_id).attempts == 0
    assert fake_gcp.control.counters().get("CreateNode", 0) == 0  # nothing was provisioned


def test_a_python_version_that_cannot_be_found_fails_the_job_at_once(emulator_process, fake_gcp, package_index,
                                                                      workspace):
    cluster = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint,
                                          poll_interval=0.2, lease_period=30.0, index_url=package_index.url,
                                          python_version="3.15"))
    try:
        info = finish(cluster, cluster.launch(_request("no-such-python", never_runs, [], Path(workspace))))
        _assert_failed_at_once(cluster, info, "No interpreter found for Python 3.15")
    finally:
        cluster.shutdown(timeout=JOB_TIMEOUT)


def test_cloudpickle_of_the_controller_is_what_the_environment_gets():
    """The runner's requirement admits the controller's cloudpickle, so what it pickles loads."""
    from packaging.requirements import Requirement

    from fray_tpu.worker.pyenv import RUNNER_REQUIREMENTS

    [requirement] = [Requirement(r) for r in RUNNER_REQUIREMENTS if r.startswith("cloudpickle")]
    assert requirement.specifier.contains(importlib.metadata.version("cloudpickle"))
