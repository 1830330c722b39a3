"""A job's channel secret: made once per job, kept as a journal secret (mode 0600, outside the
database) so a restarted controller can talk to the same agents. Node metadata carries only
its hash.

The channel's TLS identity is not the job's: every agent makes its own key on its VM and
publishes its certificate as a guest attribute, which the gang pins per host when it connects
(``fray_tpu.hostboot``)."""

from __future__ import annotations

from dataclasses import dataclass

from fray_tpu import tls
from fray_tpu.state.journal import Journal

SECRET_NAME = "channel-secret"


@dataclass(frozen=True)
class JobCredentials:
    secret: str

    @classmethod
    def make(cls) -> JobCredentials:
        return cls(tls.make_secret())

    def store(self, journal: Journal, job_id: str) -> None:
        journal.store_secret(job_id, SECRET_NAME, self.secret.encode())

    @classmethod
    def load(cls, journal: Journal, job_id: str) -> JobCredentials:
        return cls(journal.load_secret(job_id, SECRET_NAME).decode())
