"""Job-environment benchmark: the same job environment built on the 4 hosts of a v5litepod-16,
with uv (the agent's code, ``PythonEnvStore``) and with pip (``python -m venv`` + ``pip
install``, what the agent did before), cold and cached, from one loopback index, in one run.

The environment is the demo's (jax and jaxlib at the controller's versions, with numpy, scipy,
ml_dtypes and opt_einsum, plus cloudpickle), on the controller's Python. As on an emulated
slice, the 4 hosts are 4 directories of this machine, each with its own caches, building at
the same time (they share this machine's cores, as the emulator's hosts do).

- ``cold``: hosts that never built anything (empty uv / pip cache, no environment);
- ``cached``: the same hosts building the environment again after it was deleted, their
  download caches warm (what a new environment costs a host that built one before);
- ``reused`` (uv only): the environment is still there (every later attempt and job on the host);
- ``bucket_gang`` (uv): 4 fresh hosts as one gang sharing a staging bucket (the emulator's
  Cloud Storage, on loopback): worker 0 builds and uploads the archive, the others wait for it
  and download it;
- ``bucket_download`` (uv): 4 more fresh hosts (a later job on new VMs) download the archive the
  gang uploaded, build nothing.

Each metric line gives the slowest host's seconds (the gang waits for it) and the median; the
summary line gives ``pip / uv`` ratios for cold and cached, and ``uv cold / bucket_download``.

    .venv/bin/python bench/pyenv.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import emit, rounded

from fray_tpu.contract import PYTHON_DOWNLOADS_ENV
from fray_tpu.emulator.storage import EMULATED_BUCKET, StorageServer
from fray_tpu.package_index import LoopbackIndex, cache_dir, fill_wheelhouse, pinned_like_this_interpreter
from fray_tpu.worker.envarchive import EnvBucket
from fray_tpu.worker.pyenv import RUNNER_REQUIREMENTS, EnvRequest, PythonEnvStore, UvSettings

HOSTS = 4  # a v5litepod-16
PACKAGES = tuple(pinned_like_this_interpreter("jax", "jaxlib"))
PIP_TIMEOUT_SECONDS = 1800.0


def uv_build(host: Path, index_url: str) -> float:
    store = PythonEnvStore(host / "agent", UvSettings.from_environ())
    started = time.monotonic()
    store.ensure(EnvRequest(pip_packages=PACKAGES, index_url=index_url), lambda line: None)
    return time.monotonic() - started


def bucket_builds(storage: StorageServer):
    """A build on one host of a gang sharing ``storage``: worker-0 is the builder."""
    def build(host: Path, index_url: str) -> float:
        store = PythonEnvStore(host / "agent", UvSettings.from_environ(), storage_token=lambda: "bench-token")
        bucket = EnvBucket(storage.endpoint, EMULATED_BUCKET, builder=host.name.endswith("-0"), wait_seconds=600,
                           attempt_id="bench")
        started = time.monotonic()
        env = store.ensure(EnvRequest(pip_packages=PACKAGES, index_url=index_url), lambda line: None, bucket)
        if env.source not in ("built", "bucket"):
            raise RuntimeError(f"{host.name} got its environment from {env.source!r}, expected a build or a download")
        return time.monotonic() - started
    return build


def uv_forget_env(host: Path) -> None:
    shutil.rmtree(host / "agent" / "envs")


def pip_build(host: Path, index_url: str) -> float:
    env_dir = host / "pip-env"
    shutil.rmtree(env_dir, ignore_errors=True)
    # Only the loopback index: no pip.conf, find-links or constraints of this machine.
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    environ.update({"PIP_CONFIG_FILE": os.devnull, "PIP_CACHE_DIR": str(host / "pip-cache"),
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300, env=environ)
    result = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--progress-bar",
                             "off", "--index-url", index_url, *PACKAGES, *RUNNER_REQUIREMENTS],
                            capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS, env=environ)
    if result.returncode != 0:
        raise RuntimeError(f"pip install failed on {host.name}: {result.stderr[-2000:]}")
    return time.monotonic() - started


def on_all_hosts(build, hosts: list[Path], index_url: str) -> list[float]:
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(pool.map(lambda host: build(host, index_url), hosts))


def report(tool: str, phase: str, seconds: list[float]) -> float:
    slowest = max(seconds)
    emit({"metric": f"{tool}_{phase}", "hosts": len(seconds), "slowest_s": rounded(slowest, 2),
          "median_s": rounded(statistics.median(seconds), 2)})
    return slowest


def main() -> int:
    wheelhouse = fill_wheelhouse(cache_dir() / "demo", [*PACKAGES, *pinned_like_this_interpreter("cloudpickle")])
    root = Path(tempfile.mkdtemp(prefix="fray-tpu-bench-pyenv-"))
    hosts = [root / f"worker-{i}" for i in range(HOSTS)]
    for host in hosts:
        host.mkdir()
    os.environ.setdefault(PYTHON_DOWNLOADS_ENV, "never")
    try:
        with LoopbackIndex(wheelhouse) as index:
            slowest = {
                ("uv", "cold"): report("uv", "cold", on_all_hosts(uv_build, hosts, index.url)),
                ("uv", "reused"): report("uv", "reused", on_all_hosts(uv_build, hosts, index.url)),
            }
            for host in hosts:
                uv_forget_env(host)
            slowest["uv", "cached"] = report("uv", "cached", on_all_hosts(uv_build, hosts, index.url))
            storage = StorageServer("127.0.0.1", root / "bucket")
            storage.start()
            try:
                gang = [root / f"gang-worker-{i}" for i in range(HOSTS)]
                later = [root / f"later-worker-{i}" for i in range(HOSTS)]
                slowest["uv", "bucket_gang"] = report("uv", "bucket_gang", on_all_hosts(
                    bucket_builds(storage), gang, index.url))
                slowest["uv", "bucket_download"] = report("uv", "bucket_download", on_all_hosts(
                    bucket_builds(storage), later, index.url))
            finally:
                storage.close()
            slowest["pip", "cold"] = report("pip", "cold", on_all_hosts(pip_build, hosts, index.url))
            slowest["pip", "cached"] = report("pip", "cached", on_all_hosts(pip_build, hosts, index.url))
        emit({"metric": "pyenv_summary", "packages": list(PACKAGES), "hosts": HOSTS,
              "uv_reused_s": rounded(slowest["uv", "reused"], 3),
              "pip_over_uv_cold": rounded(slowest["pip", "cold"] / slowest["uv", "cold"], 2),
              "pip_over_uv_cached": rounded(slowest["pip", "cached"] / slowest["uv", "cached"], 2),
              "uv_cold_over_bucket_download": rounded(slowest["uv", "cold"] / slowest["uv", "bucket_download"], 2),
              "uv_cold_over_bucket_gang": rounded(slowest["uv", "cold"] / slowest["uv", "bucket_gang"], 2)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
