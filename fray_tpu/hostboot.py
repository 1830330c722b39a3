"""The controller's half of booting VMs: stage the host bundle, render the startup-script, and
watch the bootstrap through guest attributes until every agent serves (or the boot fails).

One :class:`HostBootstrapper` per controller process and cloud: the bundle of a (Python,
platform) is built and uploaded once, whatever the number of jobs and slices.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import google.auth
import google.auth.transport.requests

from fray_tpu.bootreport import HostBootReport, judge_boot, parse_host_report, phase_timings
from fray_tpu.bootstrap import BootstrapSpec, fray_tpu_version, render_startup_script
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError, FrayTpuError
from fray_tpu.hostbundle import (
    DEFAULT_PLATFORM,
    BundleStorage,
    HostTarget,
    build_host_bundle,
    check_host_python,
    runtime_python,
)

log = logging.getLogger(__name__)
EMULATED_TOKEN = "emulated-token"
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


class BootstrapFailed(ConfigError):
    """Every host's bootstrap failed: the image, bundle or settings are wrong, not a host."""


@dataclass
class BootResult:
    reports: list[HostBootReport]  # every host's, once every agent serves
    dead: dict[int, str]  # slice id -> why its hosts never served (bad host, deadline)
    lost: dict[int, str] = field(default_factory=dict)  # slice id -> why: lost (preempted) while booting


class HostBootstrapper:
    def __init__(self, config: TpuClusterConfig, emulator_endpoint: str | None):
        self._config = config
        self._emulated = bool(emulator_endpoint)
        self._emulator_endpoint = emulator_endpoint
        self._lock = threading.Lock()
        self._scripts: dict[str, str] = {}
        self._staging: tuple[str, str] | None = None
        self._credentials = None

    def _token(self) -> str:
        if self._emulated:
            return EMULATED_TOKEN
        if self._credentials is None:
            self._credentials, _ = google.auth.default(scopes=[STORAGE_SCOPE])
        if not self._credentials.valid:
            self._credentials.refresh(google.auth.transport.requests.Request())
        return self._credentials.token

    def _storage(self) -> BundleStorage:
        if self._emulated:
            from fray_tpu.emulator import EmulatorControl
            from fray_tpu.emulator.storage import EMULATED_BUCKET

            with EmulatorControl(self._emulator_endpoint) as control:
                endpoint = control.storage_endpoint()
            return BundleStorage(self._config.staging_bucket or EMULATED_BUCKET, endpoint=endpoint, token=self._token)
        if not self._config.staging_bucket:
            raise ConfigError("TPU jobs need a Cloud Storage bucket to stage the host bundle in: set staging_bucket "
                              "(FRAY_TPU_STAGING_BUCKET) to a bucket the controller can write and the VMs' service "
                              "account can read (the VMs reach it over Private Google Access)")
        return BundleStorage(self._config.staging_bucket.removeprefix("gs://"), token=self._token)

    def staging(self) -> tuple[str, str]:
        """The staging bucket's API root (as the VMs reach it) and name."""
        with self._lock:
            if self._staging is None:
                storage = self._storage()
                self._staging = (storage.endpoint, storage.bucket)
            return self._staging

    def startup_script(self, runtime_version: str) -> str:
        """The startup-script for ``runtime_version``: builds and stages its bundle on first use."""
        python = self._config.host_python or runtime_python(runtime_version)
        check_host_python(runtime_version, python)
        with self._lock:
            if python not in self._scripts:
                started = time.monotonic()
                bundle = build_host_bundle(HostTarget(python, DEFAULT_PLATFORM))
                storage = self._storage()
                url = storage.stage(bundle)
                log.info("host bundle %s for Python %s staged at %s in %.1fs", bundle.sha256[:12], python, url,
                         time.monotonic() - started)
                self._scripts[python] = render_startup_script(BootstrapSpec(
                    fray_tpu_version=fray_tpu_version(), bundle_url=url, bundle_sha256=bundle.sha256,
                    bundle_python=python, bundle_platform=bundle.target.platform, storage_endpoint=storage.endpoint,
                ))
            return self._scripts[python]


_BOOTSTRAPPERS: dict[tuple, HostBootstrapper] = {}
_BOOTSTRAPPERS_LOCK = threading.Lock()


def bootstrapper_for(config: TpuClusterConfig, emulator_endpoint: str | None) -> HostBootstrapper:
    """The process's bootstrapper for this cloud (bundles are built and staged once per process)."""
    key = (emulator_endpoint, config.project, config.staging_bucket, config.host_python)
    with _BOOTSTRAPPERS_LOCK:
        if key not in _BOOTSTRAPPERS:
            _BOOTSTRAPPERS[key] = HostBootstrapper(config, emulator_endpoint)
        return _BOOTSTRAPPERS[key]


def read_reports(read: Callable[[int], list[dict[str, str]]], slices: Sequence[int]) -> list[HostBootReport]:
    """Every host's report; ``read(slice_id)`` is one GetGuestAttributes call for that slice."""
    reports = []
    for slice_id in slices:
        for worker, attributes in enumerate(read(slice_id)):
            reports.append(parse_host_report(slice_id, worker, attributes))
    return reports


def watch_boot(read: Callable[[int], list[dict[str, str]]], hosts_per_slice: dict[int, int], *, deadline: float,
               poll_interval: float, stop: threading.Event, progress: Callable[[str], None],
               lost: Callable[[], dict[int, str]] = dict) -> BootResult:
    """Poll every slice's guest attributes until every agent serves, a boot fails, a slice is
    ``lost`` (a lost VM publishes nothing more: waiting for it would last until ``deadline``), or
    ``deadline``.

    Raises :class:`BootstrapFailed` when every host failed. A slice that fails on some hosts
    (or never finishes) is returned in ``dead``.
    """
    expected = sum(hosts_per_slice.values())
    while True:
        gone = lost()
        if gone:
            return BootResult([], {}, gone)
        try:
            reports = read_reports(read, sorted(hosts_per_slice))
        except FrayTpuError as error:
            log.info("reading guest attributes failed: %s", error)
            reports = []
        verdict = judge_boot(reports, expected)
        if verdict.config_error:
            raise BootstrapFailed(verdict.config_error)
        if verdict.all_serving:
            for slice_id in sorted(hosts_per_slice):
                line = phase_timings([r for r in reports if r.slice_id == slice_id])
                progress(f"slice-{slice_id}: bootstrap phases (slowest host): {line}")
            return BootResult(reports, {})
        if verdict.bad_hosts:
            return BootResult([], verdict.bad_hosts)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            behind = [r for r in reports if not r.serving]
            last = {f"{r.host}": (r.phases[-1][0] if r.phases else "nothing published") for r in behind}
            dead = {r.slice_id: f"no agent serving after boot_deadline; last phase per host: {last}" for r in behind}
            missing = [s for s, n in hosts_per_slice.items() if sum(r.slice_id == s for r in reports) < n]
            dead.update({s: "no agent serving after boot_deadline; some hosts published nothing" for s in missing})
            return BootResult([], dead)
        if stop.wait(min(poll_interval, remaining)):
            return BootResult([], {})
