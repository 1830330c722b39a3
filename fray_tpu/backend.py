"""Backend selection, in one place: which cluster ``current_cluster()`` returns.

Order (as Marin's fray resolves it): the cluster set in this context, else ``FRAY_CLUSTER_SPEC``,
else ``FRAY_BACKEND``, else a local cluster. A ``tpu`` spec builds fray-tpu's ``TpuCluster``;
``local`` runs subprocesses here; other prefixes go to Marin's fray when it is present.

The interpreter-startup hook (``fray_tpu_backend.pth`` → ``fray_tpu.backend_hook``) uses the
same rules to teach Marin's ``fray.cluster.create_cluster`` the ``tpu`` spec. Marin's fray is
recognised by shape (``fray_api.is_marin_fray_base``), never by the bare name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from fray_tpu.contract import BACKEND_ENV, CLUSTER_SPEC_ENV, TPU_SPEC_PREFIX, is_tpu_spec, spec_prefix  # noqa: F401 - re-exported
from fray_tpu.fray_api import USING_MARIN_FRAY

LOCAL_SPEC_PREFIX = "local"

_current_cluster: ContextVar[Any] = ContextVar("fray_tpu_current_cluster", default=None)


def selected_spec(environ: Mapping[str, str] | None = None) -> str:
    """The spec the environment selects (``FRAY_CLUSTER_SPEC``, else ``FRAY_BACKEND``), or ""."""
    environ = os.environ if environ is None else environ
    return environ.get(CLUSTER_SPEC_ENV, "").strip() or environ.get(BACKEND_ENV, "").strip()


def set_current_cluster(cluster: Any) -> None:
    """Make ``cluster`` what ``current_cluster()`` returns in this context (and in Marin's fray)."""
    _current_cluster.set(cluster)
    if USING_MARIN_FRAY:
        marin_cluster_module = importlib.import_module("fray.cluster")
        marin_setter = getattr(marin_cluster_module, "set_current_cluster", None)
        if marin_setter is not None:
            marin_setter(cluster)


def current_cluster() -> Any:
    """The cluster set in this context, else one from ``FRAY_CLUSTER_SPEC``, else from
    ``FRAY_BACKEND`` (e.g. ``tpu``), else a local one. The result is remembered in the context."""
    cluster = _current_cluster.get()
    if cluster is not None:
        return cluster
    spec = selected_spec()
    cluster = create_cluster(spec) if spec else local_cluster_class()()
    set_current_cluster(cluster)
    return cluster


def create_tpu_cluster(spec: str) -> Any:
    from fray_tpu.cluster import TpuCluster

    return TpuCluster.from_spec(spec)


def create_cluster(spec: str) -> Any:
    """A cluster from a spec string ``prefix?key=value&...``."""
    prefix = spec_prefix(spec)
    if prefix == TPU_SPEC_PREFIX:
        return create_tpu_cluster(spec)
    if USING_MARIN_FRAY:
        return importlib.import_module("fray.cluster").create_cluster(spec)
    if prefix == LOCAL_SPEC_PREFIX:
        local_cluster = local_cluster_class()
        return local_cluster.from_spec(spec) if hasattr(local_cluster, "from_spec") else local_cluster()
    raise ValueError(
        f"Unknown cluster spec {spec!r}: the prefix {prefix!r} is not a backend here. "
        f"Use 'tpu?project=...&zone=...' for Cloud TPU or 'local' for local subprocesses."
    )


def local_cluster_class() -> type:
    """Marin's ``LocalCluster`` when Marin's fray is present, else fray-tpu's."""
    if USING_MARIN_FRAY:
        return importlib.import_module("fray.cluster").LocalCluster
    from fray_tpu.local_runner import LocalCluster

    return LocalCluster
