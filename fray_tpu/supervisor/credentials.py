"""A job's channel secret and TLS identity: made once per job, kept as journal secrets (mode
0600, outside the database) so a restarted controller can talk to the same agents."""

from __future__ import annotations

from dataclasses import dataclass

from fray_tpu import tls
from fray_tpu.state.journal import Journal

SECRET_NAME = "channel-secret"
TLS_CERT_NAME = "tls-cert"
TLS_KEY_NAME = "tls-key"
SLICE_CERT_PREFIX = "tls-cert-of-"


@dataclass(frozen=True)
class JobCredentials:
    secret: str
    tls_material: tls.TlsMaterial

    @classmethod
    def make(cls) -> JobCredentials:
        return cls(tls.make_secret(), tls.make_job_tls())

    def store(self, journal: Journal, job_id: str) -> None:
        journal.store_secret(job_id, SECRET_NAME, self.secret.encode())
        journal.store_secret(job_id, TLS_CERT_NAME, self.tls_material.cert_pem)
        journal.store_secret(job_id, TLS_KEY_NAME, self.tls_material.key_pem)

    def store_slice_cert(self, journal: Journal, job_id: str, slice_name: str, cert_pem: bytes) -> None:
        """The certificate of a slice taken warm (its agents keep the identity they booted with)."""
        journal.store_secret(job_id, SLICE_CERT_PREFIX + slice_name, cert_pem)

    @staticmethod
    def load_slice_cert(journal: Journal, job_id: str, slice_name: str) -> bytes | None:
        try:
            return journal.load_secret(job_id, SLICE_CERT_PREFIX + slice_name)
        except KeyError:
            return None

    @classmethod
    def load(cls, journal: Journal, job_id: str) -> JobCredentials:
        return cls(journal.load_secret(job_id, SECRET_NAME).decode(),
                   tls.TlsMaterial(cert_pem=journal.load_secret(job_id, TLS_CERT_NAME),
                                   key_pem=journal.load_secret(job_id, TLS_KEY_NAME)))
