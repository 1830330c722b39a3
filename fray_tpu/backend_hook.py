"""Make Marin's ``fray.cluster.current_cluster()`` return a TpuCluster, with no import in user code.

Fray has no plugin registry: its ``create_cluster(spec)`` dispatches on the spec's prefix and
rejects unknown ones. ``fray_tpu_backend.pth`` (installed into site-packages) calls
``install()`` at interpreter start when ``FRAY_BACKEND=tpu`` or ``FRAY_CLUSTER_SPEC=tpu?...``
is set, and does nothing otherwise. ``install()``:

- turns ``FRAY_BACKEND=tpu`` into ``FRAY_CLUSTER_SPEC=tpu`` when no spec is set, so Fray's own
  resolution order (context variable, then the spec) stays as it is;
- wraps ``fray.cluster.create_cluster`` when that module is first imported, so a ``tpu`` spec
  builds a ``TpuCluster`` and every other spec goes to Fray unchanged;
- wraps Marin's 2026 ``fray.current_client.current_client`` so that, with ``FRAY_BACKEND=tpu``
  and no explicitly set client, it returns a ``fray_tpu.client.TpuClient``.

Marin's fray is recognised by shape (``fray.cluster.base.Cluster`` is an ABC with ``launch``),
never by the bare name: an unrelated package named ``fray`` is left alone.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

# Only the contract and the post-import hook at interpreter start (every task process pays
# for what is imported here); the rest once Marin's fray is actually imported.
from fray_tpu.contract import BACKEND_ENV, CLUSTER_SPEC_ENV, TPU_SPEC_PREFIX, is_tpu_spec
from fray_tpu.post_import import when_imported

_TARGET_MODULE = "fray.cluster"
_CLIENT_MODULE = "fray.current_client"
# The late-2025 fray.job: get_default_job_ctx() calls create_job_ctx of its own module.
_JOB_CONTEXT_MODULES = ("fray.job.context", "fray.job")


def install() -> None:
    if is_tpu_spec(os.environ.get(BACKEND_ENV, "")) and not os.environ.get(CLUSTER_SPEC_ENV):
        os.environ[CLUSTER_SPEC_ENV] = TPU_SPEC_PREFIX
    when_imported(_TARGET_MODULE, patch_fray_cluster)
    install_client_hook()


def install_client_hook() -> None:
    """Make Marin's 2026 ``fray.current_client.current_client()`` return fray-tpu's client when
    ``FRAY_BACKEND=tpu`` and no client was set explicitly (in every thread: the process's client
    is not a context variable). Other backends resolve as before."""
    when_imported(_CLIENT_MODULE, patch_fray_current_client)
    for module in _JOB_CONTEXT_MODULES:
        when_imported(module, _patch_job_context)


def _patch_job_context(module: ModuleType) -> None:
    from fray_tpu.job_context import patch_marin_job_context  # gRPC and friends: only when fray.job is used

    patch_marin_job_context(module)


def patch_fray_current_client(module: ModuleType) -> None:
    fray_current_client = getattr(module, "current_client", None)
    if not callable(fray_current_client) or not hasattr(module, "set_current_client") \
            or getattr(fray_current_client, "_fray_tpu_hooked", False):
        return
    explicit = getattr(module, "_current_client_var", None)

    def current_client():
        chosen = explicit.get() if explicit is not None else None
        if chosen is None and os.environ.get("FRAY_BACKEND") == "tpu":
            from fray_tpu.client import default_client

            return default_client()
        return chosen if chosen is not None else fray_current_client()

    current_client._fray_tpu_hooked = True
    current_client.__doc__ = fray_current_client.__doc__
    module.current_client = current_client


def looks_like_marin_fray(module: ModuleType) -> bool:
    from fray_tpu.fray_api import is_marin_fray_base

    return is_marin_fray_base(sys.modules.get("fray.cluster.base")) and callable(getattr(module, "create_cluster", None))


def patch_fray_cluster(module: ModuleType) -> None:
    if not looks_like_marin_fray(module) or getattr(module.create_cluster, "_fray_tpu_hooked", False):
        return
    fray_create_cluster = module.create_cluster

    def create_cluster(cluster_spec: str):
        if is_tpu_spec(cluster_spec):
            from fray_tpu.backend import create_tpu_cluster

            return create_tpu_cluster(cluster_spec)
        return fray_create_cluster(cluster_spec)

    create_cluster._fray_tpu_hooked = True
    create_cluster.__doc__ = fray_create_cluster.__doc__
    module.create_cluster = create_cluster
