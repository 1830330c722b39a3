"""fray-tpu: run Fray jobs directly on Cloud TPU slices.

``fray_tpu.current_cluster()`` resolves like Marin's ``fray.cluster.current_cluster()``
(context, ``FRAY_CLUSTER_SPEC``, ``FRAY_BACKEND``, local) for code without Marin's fray.
"""

from fray_tpu.contract import VERSION as __version__


def current_cluster():
    from fray_tpu.backend import current_cluster as resolve

    return resolve()


def __getattr__(name: str):
    # The cluster pulls in gRPC and the TPU client: import it only when asked for.
    if name == "TpuCluster":
        from fray_tpu.cluster import TpuCluster

        return TpuCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
