"""Bad input rejected at ``launch`` (or earlier) with the bad value and the fix, before anything is
provisioned (issue 5, item 7).

tests/test_tpu_cluster.py covers an unknown type, zero replicas, a misspelt region, a name with
spaces, a lock captured by the callable, an int env value and docker_image. This module covers
the rest: a real region (or a config zone) without the requested generation, near-miss type
sizes, an unpicklable argument named by position and keyword, production mode without a project,
and production mode without credentials (in a child process with a counting metadata server, so
"no network probe" is observed, not assumed).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError, UnknownRegionError, UnknownTpuTypeError
from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig

CHILD_TIMEOUT = 120.0


def greet() -> None:
    print("hello")


def takes_anything(*args, **kwargs) -> None:
    print(args, kwargs)


def request(workspace: Path, **overrides) -> JobRequest:
    fields = dict(
        name="bad-input",
        entrypoint=Entrypoint.from_callable(greet),
        resources=ResourceConfig.with_tpu("v5litepod-4"),
        environment=EnvironmentConfig.create(workspace=str(workspace)),
    )
    fields.update(overrides)
    return JobRequest(**fields)


@pytest.fixture(scope="module")
def cluster(emulator_process):
    c = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint, poll_interval=0.2,
                                    keep_warm=0))
    yield c
    c.shutdown(timeout=60)


@pytest.fixture
def workspace(tmp_path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


def assert_rejected_before_provisioning(cluster: TpuCluster, fake_gcp, job_request: JobRequest,
                                        error_type: type[Exception], fragments: list[str]) -> str:
    jobs_before = len(cluster.list_jobs())
    with pytest.raises(error_type) as raised:
        cluster.launch(job_request)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert len(cluster.list_jobs()) == jobs_before, "a rejected request was recorded as a job"
    counters = fake_gcp.control.counters()
    assert counters.get("CreateNode", 0) == 0 and counters.get("CreateQueuedResource", 0) == 0, counters
    return message


# -- at launch, on the emulator -----------------------------------------------------------------------


@pytest.mark.parametrize("tpu_type, region, offered_in", [
    ("v4-8", "europe-west4", "us-central2"),
    ("v5p-8", "europe-west4", "us-central1"),
    ("v5litepod-4", "us-central2", "europe-west4"),
])
def test_a_real_region_without_the_generation_names_the_regions_that_offer_it(
        cluster, fake_gcp, workspace, tpu_type, region, offered_in):
    assert_rejected_before_provisioning(
        cluster, fake_gcp, request(workspace, resources=ResourceConfig.with_tpu(tpu_type, regions=[region])),
        UnknownRegionError, [repr(region), tpu_type, offered_in])


def test_a_config_limited_to_zones_without_the_generation_rejects_the_job(emulator_process, fake_gcp, workspace):
    v4_only = TpuCluster(TpuClusterConfig(emulate=True, emulator_endpoint=emulator_process.endpoint,
                                          zones=["us-central2-b"], poll_interval=0.2))
    try:
        assert_rejected_before_provisioning(v4_only, fake_gcp, request(workspace), UnknownRegionError,
                                            ["us-central2-b", "v5litepod-4", "europe-west4"])
    finally:
        v4_only.shutdown(timeout=60)


@pytest.mark.parametrize("tpu_type, suggestion", [
    ("v4-9", "'v4-8'"),
    ("v5litepod-3", "'v5litepod-4'"),
    ("v5litepod-512", "'v5litepod-256'"),
])
def test_a_type_with_an_impossible_size_suggests_the_nearest_real_ones(cluster, fake_gcp, workspace, tpu_type,
                                                                       suggestion):
    assert_rejected_before_provisioning(
        cluster, fake_gcp, request(workspace, resources=ResourceConfig.with_tpu(tpu_type)),
        UnknownTpuTypeError, [repr(tpu_type), "Did you mean", suggestion, "v5litepod-N"])


def test_an_unpicklable_argument_is_named_by_position_and_by_keyword(cluster, fake_gcp, workspace, tmp_path):
    with open(tmp_path / "open-file.txt", "w") as open_file:
        positional = assert_rejected_before_provisioning(
            cluster, fake_gcp,
            request(workspace, entrypoint=Entrypoint.from_callable(takes_anything, args=["fine", open_file])),
            ConfigError, ["positional argument 1", "TextIOWrapper", "cannot be pickled", "inside the function"])
        keyword = assert_rejected_before_provisioning(
            cluster, fake_gcp,
            request(workspace, entrypoint=Entrypoint.from_callable(takes_anything, kwargs={"log_file": open_file})),
            ConfigError, ["keyword argument 'log_file'", "TextIOWrapper"])
    assert positional != keyword


@pytest.mark.parametrize("value", [3.5, True, ["a", "b"]])
def test_every_non_string_env_value_is_named_with_its_fix(cluster, fake_gcp, workspace, value):
    job_request = request(workspace, environment=EnvironmentConfig.create(workspace=str(workspace),
                                                                          env_vars={"SETTING": value}))
    assert_rejected_before_provisioning(cluster, fake_gcp, job_request, ConfigError,
                                        [f"SETTING={value!r}", type(value).__name__, f"str({value!r})"])


@pytest.mark.parametrize("env_vars, fragments", [
    ({"SETTING": "a\0b"}, ["SETTING='a\\x00b'", "NUL byte", "remove it"]),
    ({"SET\0TING": "ab"}, ["'SET\\x00TING'", "NUL bytes"]),
])
def test_a_nul_byte_in_an_env_var_is_named_at_launch(cluster, fake_gcp, workspace, env_vars, fragments):
    """Issue 15 point 7: a NUL byte in a name or a value cannot reach any process: rejected at
    launch, naming the variable, instead of failing every host as a bad host."""
    job_request = request(workspace, environment=EnvironmentConfig.create(workspace=str(workspace),
                                                                          env_vars=env_vars))
    assert_rejected_before_provisioning(cluster, fake_gcp, job_request, ConfigError, fragments)


def test_a_nul_byte_in_a_binary_argument_is_named_at_launch(cluster, fake_gcp, workspace):
    job_request = request(workspace, entrypoint=Entrypoint.from_binary("echo", ["fine", "a\0b"]))
    assert_rejected_before_provisioning(cluster, fake_gcp, job_request, ConfigError,
                                        ["argument 1", "'a\\x00b'", "NUL byte"])


# -- production mode: a project and credentials -----------------------------------------------------------


def test_production_mode_without_a_project_says_how_to_set_one():
    for build in (lambda: TpuClusterConfig(emulate=False),
                  lambda: TpuClusterConfig.from_spec("tpu?emulate=false&zone=us-central2-b", environ={}),
                  lambda: TpuClusterConfig.from_env({"FRAY_TPU_ZONES": "us-central2-b"})):
        with pytest.raises(ConfigError) as raised:
            build()
        message = str(raised.value)
        for fragment in ("emulate=false", "project=", "FRAY_TPU_PROJECT", "GOOGLE_CLOUD_PROJECT", "emulate=true"):
            assert fragment in message, f"{fragment!r} missing from: {message}"


class CountingMetadata:
    """A loopback stand-in for the GCE metadata server that counts every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True, name="counting-metadata").start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


NO_CREDENTIALS_CHILD = textwrap.dedent("""
    import json, sys
    from fray_tpu.cluster import TpuCluster
    from fray_tpu.config import TpuClusterConfig
    from fray_tpu.errors import CredentialsError
    from fray_tpu.fray_api import Entrypoint, EnvironmentConfig, JobRequest, ResourceConfig
    from fray_tpu.provisioner import make_tpu_client

    outcomes = {}
    try:
        make_tpu_client(emulator_endpoint=None)
        outcomes["make_tpu_client"] = "no error"
    except CredentialsError as error:
        outcomes["make_tpu_client"] = str(error)
    cluster = TpuCluster(TpuClusterConfig(emulate=False, project="my-project", state_dir=sys.argv[1]))
    try:
        cluster.launch(JobRequest(name="no-credentials", entrypoint=Entrypoint.from_callable(print),
                                  resources=ResourceConfig.with_tpu("v5litepod-4"),
                                  environment=EnvironmentConfig.create(workspace=sys.argv[2])))
        outcomes["launch"] = "no error"
    except CredentialsError as error:
        outcomes["launch"] = str(error)
    outcomes["jobs"] = len(cluster.list_jobs())
    cluster.shutdown(timeout=10)
    print(json.dumps(outcomes))
""")


def test_production_mode_without_credentials_says_how_to_provide_them_without_a_network_probe(
        tmp_path, workspace, netguard_log):
    metadata = CountingMetadata()
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GOOGLE_CLOUD_PROJECT")}
    env.update({
        "HOME": str(home),  # no ~/.config/gcloud application-default credentials
        "CLOUDSDK_CONFIG": str(home / "gcloud"),
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": metadata.address,
        "GCE_METADATA_IP": metadata.address,
    })
    violations_before = netguard_log.read_text() if netguard_log.exists() else ""
    try:
        child = subprocess.run([sys.executable, "-c", NO_CREDENTIALS_CHILD, str(tmp_path / "state"), str(workspace)],
                               env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    finally:
        metadata.close()
    assert child.returncode == 0, child.stderr
    outcomes = json.loads(child.stdout.strip().splitlines()[-1])
    for where in ("make_tpu_client", "launch"):
        message = outcomes[where]
        for fragment in ("No Google credentials", "gcloud auth application-default login",
                         "GOOGLE_APPLICATION_CREDENTIALS"):
            assert fragment in message, f"{where}: {fragment!r} missing from: {message}"
    assert outcomes["jobs"] == 0, "a job was recorded although it could not be provisioned"
    assert metadata.requests == [], f"the metadata server was probed: {metadata.requests}"
    violations_after = netguard_log.read_text() if netguard_log.exists() else ""
    assert violations_after == violations_before, f"non-loopback traffic: {violations_after[len(violations_before):]}"
