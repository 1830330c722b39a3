"""``LocalCluster``: Fray's local backend, CPU replicas as subprocesses of this machine.

The same supervisor and attempt machinery as ``TpuCluster`` (logs, status, terminate, retry
budgets); a TPU request is rejected with a pointer to ``tpu?emulate=true``. Local processes do
not outlive their controller, so its journal is private to the instance: any number of local
clusters run side by side, in one process or many.
"""

from __future__ import annotations

import shutil
import tempfile

from fray_tpu.cluster import TpuCluster
from fray_tpu.config import TpuClusterConfig
from fray_tpu.errors import ConfigError
from fray_tpu.fray_api import JobId, tpu_type_of


class LocalCluster(TpuCluster):
    def __init__(self) -> None:
        super().__init__(TpuClusterConfig(emulate=True, state_dir=tempfile.mkdtemp(prefix="fray-tpu-local-")))

    @classmethod
    def from_spec(cls, spec: str = "local") -> LocalCluster:
        return cls()

    def launch(self, request) -> JobId:
        tpu_type = tpu_type_of(request.resources.device)
        if tpu_type is not None:
            raise ConfigError(
                f"LocalCluster runs CPU jobs only, but the request asks for {tpu_type}: use "
                f"FRAY_CLUSTER_SPEC='tpu?emulate=true' to run TPU jobs on the local emulator"
            )
        return super().launch(request)

    def _cluster_spec(self) -> str:
        return "local"

    def shutdown(self, timeout: float = 600.0) -> None:
        super().shutdown(timeout)
        shutil.rmtree(self.state_dir, ignore_errors=True)
