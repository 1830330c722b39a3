"""JAX cluster detection for hosts of the emulated TPU cloud.

On a real TPU VM, JAX finds its peers through the metadata server and ``MEGASCALE_*``. An
emulated host has no TPU, so this ``ClusterEnv`` answers instead, from the variables fray-tpu
gives every task (see ``fray_tpu.multislice``); an unchanged ``jax.distributed.initialize()``
then forms one group of every host of every slice. Defining the class registers it; on emulated
hosts ``fray_tpu.jax_emulated_preload`` imports this module as soon as the job imports JAX.
"""

from __future__ import annotations

import os

from jax._src import clusters

from fray_tpu.contract import EMULATED_HOST_ENV as _EMULATED_HOST
from fray_tpu.contract import JAX_COORDINATOR_ADDRESS_ENV as _COORDINATOR
from fray_tpu.contract import TASK_COUNT_ENV as _TASK_COUNT
from fray_tpu.contract import TASK_INDEX_ENV as _TASK_INDEX

# Several CPU processes need a collectives backend to compute across hosts.
os.environ.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")


class FrayEmulatedTpuCluster(clusters.ClusterEnv):
    name: str = "fray_tpu_emulated"

    @classmethod
    def is_env_present(cls) -> bool:
        return os.environ.get(_EMULATED_HOST) == "1" and _COORDINATOR in os.environ

    @classmethod
    def get_coordinator_address(cls, timeout_secs: int | None, override_coordinator_port: str | None = None) -> str:
        host, port = os.environ[_COORDINATOR].rsplit(":", 1)
        return f"{host}:{override_coordinator_port or port}"

    @classmethod
    def get_process_count(cls) -> int:
        return int(os.environ[_TASK_COUNT])

    @classmethod
    def get_process_id(cls) -> int:
        return int(os.environ[_TASK_INDEX])

    @classmethod
    def get_local_process_id(cls) -> int | None:
        return 0
