"""The part of Marin's ``fray.cluster.base`` that fray-tpu detects and subclasses."""

from abc import ABC, abstractmethod
from typing import NewType

JobId = NewType("JobId", str)


class Cluster(ABC):
    @abstractmethod
    def launch(self, request) -> JobId: ...

    @abstractmethod
    def poll(self, job_id: JobId): ...

    @abstractmethod
    def monitor(self, job_id: JobId): ...

    @abstractmethod
    def terminate(self, job_id: JobId) -> None: ...

    @abstractmethod
    def list_jobs(self) -> list: ...
