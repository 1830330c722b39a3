"""fray-tpu: run Fray jobs directly on Cloud TPU slices.

``fray_tpu.current_cluster()`` resolves like Marin's ``fray.cluster.current_cluster()``
(context, ``FRAY_CLUSTER_SPEC``, ``FRAY_BACKEND``, local) for code without Marin's fray.
"""

__version__ = "0.1.0"


def current_cluster():
    from fray_tpu.fray_api import current_cluster as resolve

    return resolve()


def __getattr__(name: str):
    # The cluster pulls in gRPC and the TPU client: import it only when asked for.
    if name == "TpuCluster":
        from fray_tpu.cluster import TpuCluster

        return TpuCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
