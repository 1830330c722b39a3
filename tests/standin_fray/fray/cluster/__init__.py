"""Marin's resolution rules for ``current_cluster()`` (no plugin registry)."""

import os
from contextvars import ContextVar
from urllib.parse import parse_qs, urlparse

from fray.cluster.base import Cluster, JobId
from fray.cluster.local_cluster import LocalCluster

_cluster_context: ContextVar = ContextVar("fray_cluster", default=None)


def set_current_cluster(cluster: Cluster) -> None:
    _cluster_context.set(cluster)


def current_cluster() -> Cluster:
    cluster = _cluster_context.get()
    if cluster is not None:
        return cluster
    spec = os.environ.get("FRAY_CLUSTER_SPEC")
    if spec is not None:
        cluster = create_cluster(spec)
        set_current_cluster(cluster)
        return cluster
    cluster = LocalCluster()
    set_current_cluster(cluster)
    return cluster


def create_cluster(cluster_spec: str) -> Cluster:
    query_params = parse_qs(urlparse(cluster_spec).query)
    if cluster_spec.startswith("local"):
        return LocalCluster.from_spec(query_params)
    raise ValueError(f"Unknown cluster spec: {cluster_spec}")


__all__ = ["Cluster", "JobId", "LocalCluster", "create_cluster", "current_cluster", "set_current_cluster"]
