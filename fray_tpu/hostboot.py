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
from concurrent.futures import Future, ThreadPoolExecutor
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
# How often a slice's creation checks again that the staged objects are still in the bucket (a
# lifecycle rule or a cleanup may delete them while a controller runs for weeks): in the
# background, so a deleted object is uploaded again while the new slice's VMs wait for it.
STAGED_RECHECK_SECONDS = 60.0


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
        self._uploads: dict[str, Future] = {}
        self._checked: dict[str, float] = {}  # Python -> when its objects were last found or staged
        self._staged_objects: dict[str, tuple[BundleStorage, tuple]] = {}  # Python -> (bucket, its objects)
        # Not daemon threads: a controller process that exits right after a launch finishes the upload.
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="host-bundle-upload")
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
        """The startup-script for ``runtime_version``: builds its bundle on first use and stages
        it in the background (the VMs wait for what is not uploaded yet, ``gcsfetch``): creating
        a slice takes longer than the upload, which thus costs a launch no time. Later calls
        check again, at most every ``STAGED_RECHECK_SECONDS`` and in the background too, that
        the objects are still there."""
        python = self._config.host_python or runtime_python(runtime_version)
        check_host_python(runtime_version, python)
        with self._lock:
            if python not in self._scripts:
                bundle = build_host_bundle(HostTarget(python, DEFAULT_PLATFORM))
                storage = self._storage()
                missing = [staged for staged in (bundle, bundle.uv) if storage.missing(staged)]
                self._checked[python] = time.monotonic()
                if missing:
                    with _BOOTSTRAPPERS_LOCK:
                        _STAGING_FAILURES.pop((id(self), python), None)
                    self._uploads[python] = self._uploader.submit(self._upload, python, storage, missing)
                self._scripts[python] = render_startup_script(BootstrapSpec(
                    fray_tpu_version=fray_tpu_version(), bundle_url=storage.url(bundle), bundle_sha256=bundle.sha256,
                    uv_url=storage.url(bundle.uv), uv_sha256=bundle.uv.sha256,
                    bundle_python=python, bundle_platform=bundle.target.platform, storage_endpoint=storage.endpoint,
                ))
                self._staged_objects[python] = (storage, (bundle, bundle.uv))
            elif time.monotonic() - self._checked[python] > STAGED_RECHECK_SECONDS and self._upload_idle(python):
                self._checked[python] = time.monotonic()
                self._uploads[python] = self._uploader.submit(self._restage, python, *self._staged_objects[python])
            return self._scripts[python]

    def _upload_idle(self, python: str) -> bool:
        upload = self._uploads.get(python)
        return upload is None or upload.done()

    def _restage(self, python: str, storage: BundleStorage, objects: tuple) -> None:
        """Upload again what is no longer in the bucket (on the uploader's thread)."""
        try:
            missing = [staged for staged in objects if storage.missing(staged)]
        except FrayTpuError as error:  # the next slice's creation checks again
            log.warning("could not check the staged host bundle for Python %s: %s", python, error)
            return
        if missing:
            log.warning("the staged host bundle for Python %s is no longer all in gs://%s (%s missing): staging it "
                        "again", python, storage.bucket, ", ".join(storage.url(staged) for staged in missing))
            self._upload(python, storage, missing)

    def _upload(self, python: str, storage: BundleStorage, missing: list) -> None:
        started = time.monotonic()
        try:
            # One after the other, the bundle first: the VMs need it first (uv only once the agent serves).
            urls = []
            for staged in missing:
                urls.append(storage.upload(staged))
                log.debug("staged %s after %.2fs", urls[-1], time.monotonic() - started)
        except FrayTpuError as error:
            reason = f"staging the host bundle for Python {python} in gs://{storage.bucket} failed: {error}"
            log.error("%s", reason)
            with self._lock:
                self._scripts.pop(python, None)  # the next launch stages again
                self._staged_objects.pop(python, None)
            with _BOOTSTRAPPERS_LOCK:
                _STAGING_FAILURES[(id(self), python)] = reason
            raise
        log.info("host bundle for Python %s staged at %s in %.1fs", python, ", ".join(urls), time.monotonic() - started)

    def wait_staged(self, timeout: float) -> None:
        """Until every upload started so far has ended (raising its error, if it failed)."""
        with self._lock:
            uploads = list(self._uploads.values())
        for upload in uploads:
            upload.result(timeout=timeout)


_BOOTSTRAPPERS: dict[tuple, HostBootstrapper] = {}
_BOOTSTRAPPERS_LOCK = threading.Lock()
# Why a background upload failed, per (bootstrapper, Python), until the next upload of the same:
# the VMs of every slice booting meanwhile wait for that object in vain.
_STAGING_FAILURES: dict[tuple[int, str], str] = {}


def staging_failure() -> str | None:
    """A background upload's failure in this process, if one is standing."""
    with _BOOTSTRAPPERS_LOCK:
        return next(iter(_STAGING_FAILURES.values()), None)


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

    Raises :class:`BootstrapFailed` when every host failed, or when staging the host bundle
    failed (the hosts wait for it in vain). A slice that fails on some hosts (or never finishes)
    is returned in ``dead``.
    """
    expected = sum(hosts_per_slice.values())
    while True:
        gone = lost()
        if gone:
            return BootResult([], {}, gone)
        failed_upload = staging_failure()
        if failed_upload:
            raise BootstrapFailed(failed_upload)
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
