"""The gang: one agent client per host of every slice, and what the supervisor asks of them —
connect (hosts in their agents' worker order), upload the workspace, prepare, cancel, renew
leases (the running attempt is ``fray_tpu.supervisor.gang_run``).
Every answer from a host is a sign of life for the liveness deadline."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from fray_tpu import channel
from fray_tpu.bootreport import pinned_certificates
from fray_tpu.config import TpuClusterConfig
from fray_tpu.contract import PrepareFailureKind
from fray_tpu.decisions import PrepareProblem, TaskOutcome, prepare_outcome
from fray_tpu.errors import FrayTpuError
from fray_tpu.hostboot import watch_boot
from fray_tpu.placement import WorkerOrderMismatch, worker_order
from fray_tpu.provisioner import ReadySlice, SliceProvisioner
from fray_tpu.supervisor.attempt import CALL_THREADS, in_parallel
from fray_tpu.supervisor.credentials import JobCredentials
from fray_tpu.supervisor.gang_run import Liveness, cancel_everywhere, observe_slices
from fray_tpu.supervisor.job import JobStopped
from fray_tpu.supervisor.watch import lost_slices

log = logging.getLogger(__name__)
# Renewals are short calls (timeout: the renewal interval): 64 threads renew 256 hosts in 4
# rounds instead of starting 256 threads every interval; a frozen host delays only the few
# hosts that share its thread, by one timeout each.
LEASE_RENEWAL_THREADS = 64
# A slice whose every agent answered this recently (the last attempt's events, a hand-over) is
# up: forming the gang again does not ask each agent once more.
RECENT_ANSWER_SECONDS = 2.0


def classify_prepare_error(error: channel.ChannelError) -> PrepareProblem:
    if isinstance(error, channel.PrepareFailed):
        # Only the job's environment is the job's fault; any other refusal is the machine's.
        return PrepareProblem.ENVIRONMENT if error.kind == PrepareFailureKind.ENVIRONMENT else PrepareProblem.HOST
    if isinstance(error, channel.AgentUnreachable):
        return PrepareProblem.UNREACHABLE
    return PrepareProblem.CHANNEL


def not_handed_over(error: channel.ChannelError) -> bool:
    """Whether a hand-over Prepare failed before the host was the job's: refused (preempted,
    busy), unreachable, or deaf to the pool's secret."""
    if isinstance(error, channel.PrepareFailed):
        return error.kind == PrepareFailureKind.HAND_OVER
    return isinstance(error, (channel.AgentUnreachable, channel.AgentAuthError))


STOP_CHECK_SECONDS = 0.2  # how often waiting for agents looks at the job's stop request


@dataclass(frozen=True)
class Connected:
    """What connecting found, each slice id -> why: slices whose agents never answered or do not
    report one worker number each (``dead``), slices the cloud reported lost meanwhile (``lost``,
    a preemption); and slices whose endpoints the API listed out of worker order (slice id ->
    endpoint indexes in worker order)."""

    dead: dict[int, str]
    lost: dict[int, str]
    reordered: dict[int, list[int]]


class Gang:
    """The agent clients of a job's slices, kept across attempts while the slice is."""

    def __init__(self, config: TpuClusterConfig, credentials: JobCredentials, progress: Callable[[str], None]):
        self.config = config
        self.credentials = credentials
        self.liveness = Liveness(config.liveness_deadline)
        self._progress = progress
        self._clients: dict[int, list[channel.AgentClient]] = {}
        self._lease_stop = threading.Event()
        # Set when new agents answer: their lease's first term (the boot deadline) ends at once.
        self._lease_due = threading.Event()

    def clients(self) -> list[channel.AgentClient]:
        """Every host's client in global task order (slice-major)."""
        return [c for s in sorted(self._clients) for c in self._clients[s]]

    def connect(self, slices: Sequence[ReadySlice], guest_attributes: Callable[[int], list[dict[str, str]]],
                stop: threading.Event, known_certs: Callable[[int], Mapping[str, bytes] | None],
                provisioner: SliceProvisioner) -> Connected:
        """Watch the new slices boot (their guest attributes, ``guest_attributes(slice_id)``),
        dial every agent pinned to the certificate it published, wait until each answers, and
        put each slice's hosts in the order of their agents' own worker numbers. A slice whose
        hosts' certificates are already known (``known_certs``: address -> PEM, a slice taken
        warm) is dialled pinned to those, without watching a boot. Raises
        ``hostboot.BootstrapFailed`` when the bootstrap failed on every host, ``JobStopped``
        when stopped meanwhile. Throughout, the slices are watched (every poll interval): a slice
        the cloud reports lost ends the wait at once (``lost``: the attempt is a preemption; the
        other slices' clients are kept for the next one), and so does a stop. A slice whose every
        agent answered within ``RECENT_ANSWER_SECONDS`` (a retry, a slice just handed over) is
        not waited for: it is up, and in worker order since it was first connected."""
        dead: dict[int, str] = {}
        deadline = time.monotonic() + self.config.boot_deadline
        for slice_id, ready in enumerate(slices):
            certs = known_certs(slice_id) if slice_id not in self._clients else None
            if certs is None:
                continue
            missing = [ip for ip in ready.endpoints if ip not in certs]
            if missing:
                dead[slice_id] = f"no certificate was pinned for {', '.join(missing)} when the slice booted"
                continue
            self._clients[slice_id] = [self._client(ready, ip, certs[ip]) for ip in ready.endpoints]
        if dead:
            return Connected(dead, {}, {})
        booting = {s: len(ready.endpoints) for s, ready in enumerate(slices) if s not in self._clients}
        if booting:
            boot = watch_boot(guest_attributes, booting, deadline=deadline, poll_interval=self.config.poll_interval,
                              stop=stop, progress=self._progress,
                              lost=lambda: self._lost(provisioner, slices, booting, "booted"))
            if stop.is_set():
                raise JobStopped
            if boot.lost:
                return Connected({}, boot.lost, {})
            if boot.dead:
                return Connected(boot.dead, {}, {})
            for slice_id in booting:
                endpoints = slices[slice_id].endpoints
                certs = pinned_certificates([r for r in boot.reports if r.slice_id == slice_id], endpoints)
                if isinstance(certs, str):
                    dead[slice_id] = certs
                    continue
                self._clients[slice_id] = [self._client(slices[slice_id], ip, cert) for ip, cert in zip(endpoints, certs)]
            if dead:
                return Connected(dead, {}, {})
        unconfirmed = {slice_id: clients for slice_id, clients in self._clients.items()
                       if not all(self.liveness.answered_within(c.address, RECENT_ANSWER_SECONDS) for c in clients)}
        if not unconfirmed:
            return Connected(dead, {}, {})
        give_up = {slice_id: threading.Event() for slice_id in unconfirmed}
        waiting = {slice_id: len(clients) for slice_id, clients in unconfirmed.items()}
        up = dict.fromkeys(unconfirmed, 0)
        reported: dict[channel.AgentClient, int] = {}
        lost: dict[int, str] = {}
        settled = threading.Condition()

        def wait_up(slice_id: int, client: channel.AgentClient) -> None:
            try:
                info = client.wait_until_up(deadline, give_up[slice_id])
                with settled:
                    up[slice_id] += 1
                    count = up[slice_id]
                    reported[client] = info.worker_number
                total = len(unconfirmed[slice_id])
                # A line per quarter of the slice, not per host (each is a journal write).
                if count == total or count % max(1, total // 4) == 0:
                    self._progress(f"slice-{slice_id}: booting, {count}/{total} agents up")
            except (channel.ChannelError, FrayTpuError) as error:
                with settled:
                    dead.setdefault(slice_id, str(error))
            finally:
                with settled:
                    waiting[slice_id] -= 1
                    settled.notify_all()

        def watch_slices(done: threading.Event) -> None:
            while not done.is_set():
                gone = self._lost(provisioner, slices, unconfirmed, "its agents started")
                if gone:
                    with settled:
                        lost.update(gone)
                        settled.notify_all()
                done.wait(self.config.poll_interval)

        for slice_id, clients in unconfirmed.items():
            for client in clients:
                threading.Thread(target=wait_up, args=(slice_id, client), daemon=True,
                                 name=f"wait-up-{client.address}").start()
        done = threading.Event()
        threading.Thread(target=watch_slices, args=(done,), daemon=True, name="watch-booting-slices").start()
        try:
            with settled:
                while not (stop.is_set() or lost) and any(waiting.values()):
                    settled.wait(STOP_CHECK_SECONDS)
                for event in give_up.values():
                    event.set()  # a stop or a lost slice (the attempt is a preemption) ends every wait
                if stop.is_set() or lost:
                    return Connected({}, dict(lost), {})
        finally:
            done.set()
        self._lease_due.set()
        reordered: dict[int, list[int]] = {}
        for slice_id, clients in unconfirmed.items():
            if slice_id in dead:
                continue
            try:
                order = worker_order(slices[slice_id].endpoints, [reported[c] for c in clients])
            except WorkerOrderMismatch as error:
                dead[slice_id] = str(error)
                continue
            if order != list(range(len(order))):
                self._progress(f"slice-{slice_id}: the API listed the endpoints out of worker order; "
                               "ordered by each agent's worker number")
                self._clients[slice_id] = [clients[i] for i in order]
                reordered[slice_id] = order
        return Connected(dead, {}, reordered)

    @staticmethod
    def _lost(provisioner: SliceProvisioner, slices: Sequence[ReadySlice], watched, while_: str) -> dict[int, str]:
        """The watched slices the cloud reports lost (an outage is no verdict), slice id -> why."""
        seen = observe_slices(provisioner, {s: slices[s] for s in watched})
        return {s: f"{slices[s].spec.name} was lost while {while_}" for s in lost_slices(seen)}

    def _client(self, ready: ReadySlice, ip: str, cert_pem: bytes) -> channel.AgentClient:
        """A client of the agent at internal address ``ip``, dialled where ``connect`` says."""
        return channel.AgentClient(f"{ready.dial_address(ip)}:{self.config.agent_port}", secret=self.credentials.secret,
                                   pinned_cert_pem=cert_pem)

    def upload(self, bundle, slice_of: Callable[[int], int]) -> dict[int, str]:
        """Upload the workspace bundle where it is missing; returns the slices that could not take it."""
        clients = self.clients()
        failed: dict[int, str] = {}

        def upload(index: int) -> None:
            try:
                clients[index].upload_bundle(bundle)
            except Exception as error:  # noqa: BLE001 - any failure means this host lacks the bundle
                failed[slice_of(index)] = f"{clients[index].address}: {error}"

        # No thread, and no call, for a host known to hold it (a retry, a warm slice's next job).
        in_parallel(upload, [i for i, client in enumerate(clients) if not client.holds_bundle(bundle.digest)])
        return failed

    def prepare(self, specs: Sequence[channel.AttemptSpec], hand_over: Collection[int] = (), holder: str = "",
                lost: Callable[[], set[int]] = set,
                ) -> tuple[dict[int, channel.PrepareResult], dict[int, tuple[TaskOutcome, str]], dict[int, str]]:
        """Prepare every host; the hosts of the ``hand_over`` slices (taken warm) are handed to
        ``holder`` and this job's secret by the same call. Returns what the prepared hosts
        answered, how each task whose host could not be prepared ended (by task index), and the
        ``hand_over`` slices whose hosts were not handed over, with why (slice id -> why).
        ``lost()`` (the cloud's word, asked once the calls are sent, while they travel) names
        ``hand_over`` slices it reports lost: not taken, and their calls not waited for (a VM
        gone may never answer)."""
        clients = self.clients()
        slice_of = [s for s in sorted(self._clients) for _ in self._clients[s]]
        prepared: dict[int, channel.PrepareResult] = {}
        problems: dict[int, tuple[TaskOutcome, str]] = {}
        refused: dict[int, str] = {}

        def prepare(index: int) -> channel.PrepareResult:
            return clients[index].prepare(specs[index], hand_over=(self.credentials.secret, holder)
                                          if slice_of[index] in hand_over else None)

        sent = [CALL_THREADS.submit(functools.partial(prepare, index)) for index in range(len(clients))]
        gone = lost() & set(hand_over)
        for slice_id in gone:
            refused[slice_id] = "the cloud reports it lost"
        for index, call in enumerate(sent):
            if slice_of[index] in gone:
                continue  # not waited for: its thread ends when the call does
            try:
                prepared[index] = call.result()
            except channel.ChannelError as error:
                if slice_of[index] in hand_over and not_handed_over(error):
                    refused.setdefault(slice_of[index], str(error))
                else:
                    problems[index] = (prepare_outcome(classify_prepare_error(error)), str(error))
        return prepared, problems, refused

    def cancel(self, attempt_id: str, skip: Collection[int] = ()) -> None:
        """Stop the attempt on every host but those of the ``skip`` slices (gone, or never
        handed over): an attempt its Prepare started, when the gang cannot go on."""
        cancel_everywhere(attempt_id, [c for s in sorted(self._clients) if s not in skip for c in self._clients[s]])

    def take_clients(self, slice_id: int) -> list[channel.AgentClient]:
        """The slice's connected clients, now the caller's (the warm pool's) to close."""
        return self._clients.pop(slice_id, [])

    def adopt(self, slice_id: int, clients: list[channel.AgentClient]) -> None:
        """Connected clients of a slice taken warm, presenting the pool's secret until the job's
        first Prepare hands the hosts over. Counted as answering now: the pool renewed their
        leases within its interval, and that Prepare, their next call, is the check (a host that
        does not answer it fails the hand-over, and the slice is replaced)."""
        self._clients[slice_id] = clients
        for client in clients:
            self.liveness.heard(client.address)

    def drop(self, slice_id: int) -> None:
        for client in self._clients.pop(slice_id, []):
            client.close()

    def start_leases(self, job_id: str) -> None:
        threading.Thread(target=self._renew_leases, daemon=True, name=f"lease-{job_id}").start()

    def stop_leases(self) -> None:
        self._lease_stop.set()
        self._lease_due.set()

    def _renew_leases(self) -> None:
        """Renew every agent's lease, each interval and at once when new agents answered (their
        first term, the boot deadline, ends then), in parallel so one frozen host delays no
        other; each answer is also a sign of life for the liveness deadline."""
        period = self.config.lease_period
        interval = min(period, self.config.liveness_deadline) / 3

        def renew(client: channel.AgentClient) -> None:
            try:
                client.renew_lease(period, timeout=interval)
                self.liveness.heard(client.address)
            except Exception as error:  # noqa: BLE001 - this loop must outlive any one host
                log.debug("lease renewal on %s: %s", client.address, error)

        while True:
            self._lease_due.wait(interval)
            self._lease_due.clear()
            if self._lease_stop.is_set():
                return
            in_parallel(renew, [c for clients in list(self._clients.values()) for c in clients],
                        max_threads=LEASE_RENEWAL_THREADS)
