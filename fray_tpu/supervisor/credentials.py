"""A job's channel secret: made once per job, kept as a journal secret (mode 0600, outside the
database) so a restarted controller can talk to the same agents. Node metadata carries only
its hash.

The channel's TLS identity is not the job's: every agent makes its own key on its VM and
publishes its certificate as a guest attribute, which the gang pins per host when it connects
(``fray_tpu.hostboot``). A slice taken warm keeps the certificates pinned when it booted: they
are kept beside the secret, so a restarted controller pins the same ones.

Those files are written (and synced) beside the job's start, not before each step of it
(``BackgroundWrites``): the supervisor waits for them before the attempt starts, the first moment
a controller restarted after a crash would need them to reattach; before that, a job whose
controller died has nothing to reattach to, and its slices delete themselves when the lease lapses."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fray_tpu import tls
from fray_tpu.state.journal import Journal
from fray_tpu.supervisor.attempt import CALL_THREADS, Pending

SECRET_NAME = "channel-secret"
SLICE_CERTS_PREFIX = "tls-certs-of-"


class BackgroundWrites:
    """Journal writes made on the controller's kept call threads (no thread start each);
    ``wait`` for them (and their errors)."""

    def __init__(self) -> None:
        self._pending: list[Pending] = []

    def submit(self, write: Callable[..., None], *args: object) -> None:
        self._pending.append(CALL_THREADS.submit(lambda: write(*args)))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = []
        for write in pending:
            try:
                write.result()
            except BaseException as error:  # noqa: BLE001 - the first is raised once all are done
                errors.append(error)
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class JobCredentials:
    secret: str

    @classmethod
    def make(cls) -> JobCredentials:
        return cls(tls.make_secret())

    def store(self, journal: Journal, job_id: str) -> None:
        journal.store_secret(job_id, SECRET_NAME, self.secret.encode())

    @staticmethod
    def store_slice_certs(journal: Journal, job_id: str, slice_name: str, certs: Mapping[str, bytes]) -> None:
        """The per-host certificates (host address -> PEM) of a slice taken warm."""
        journal.store_secret(job_id, SLICE_CERTS_PREFIX + slice_name,
                             json.dumps({address: pem.decode() for address, pem in certs.items()}).encode())

    @staticmethod
    def load_slice_certs(journal: Journal, job_id: str, slice_name: str) -> dict[str, bytes] | None:
        """What ``store_slice_certs`` kept; None for a slice the job did not take warm."""
        try:
            stored = journal.load_secret(job_id, SLICE_CERTS_PREFIX + slice_name)
        except KeyError:
            return None
        return {address: pem.encode() for address, pem in json.loads(stored).items()}

    @classmethod
    def stored(cls, journal: Journal, job_id: str) -> JobCredentials | None:
        """The job's credentials; None when they were never written (the controller died
        before the job's first attempt started, which waits for them)."""
        try:
            return cls(journal.load_secret(job_id, SECRET_NAME).decode())
        except KeyError:
            return None
