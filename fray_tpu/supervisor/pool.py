"""The controller's warm pool: healthy slices of finished jobs, cleaned and kept for
``keep_warm`` for the next job of the same shape (decisions in ``warm_policy``).

Warm slices stay owned. The pool holds each under a secret of its own (in memory only), so
the finished job's secret stops working the moment its slice goes warm, and the next job's
secret works only once that job's first Prepare hands the slice over to it: a slice never accepts
two holders' secrets, and a dead controller's warm slices are unreachable by anyone — their lease lapses and
they delete themselves like any slice. While a slice is warm the pool renews its agents' lease,
watches it with the same signals as a running slice (the node's state, agents answering), and
deletes it on expiry, on loss, and at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from fray_tpu import channel, tls
from fray_tpu.config import TpuClusterConfig
from fray_tpu.provisioner import ReadySlice, SliceProvisioner
from fray_tpu.state.journal import Journal, ResourceState, WarmPeriod
from fray_tpu.supervisor.attempt import in_parallel
from fray_tpu.supervisor.gang import LEASE_RENEWAL_THREADS
from fray_tpu.supervisor.warm_policy import (
    SliceHealth,
    SliceShape,
    WarmSlice,
    choose,
    expired,
    idle_seconds,
    keep_reason,
    next_expiry_in,
)

log = logging.getLogger(__name__)
POOL_HOLDER = "warm-pool"
POOL_JOB_ID = "warm-pool"  # the journal's job id of a slice the pool holds between jobs


def host_certificates(ready: ReadySlice, clients: Sequence[channel.AgentClient]) -> dict[str, bytes]:
    """Each host's address -> the certificate its client pins (the one its agent published at boot)."""
    by_address = {client.address.rsplit(":", 1)[0]: client.pinned_cert_pem for client in clients}
    return {ip: by_address[ready.dial_address(ip)] for ip in ready.endpoints}


@dataclass
class PooledSlice:
    ready: ReadySlice
    warm: WarmSlice
    journal: Journal
    # Dialled with the pool's secret, each pinned to the certificate its host published when the
    # slice booted: whoever holds the slice next pins those same certificates.
    clients: list[channel.AgentClient]
    env_key: Hashable | None = None  # the environment its last job prepared on every host

    def close(self) -> None:
        for client in self.clients:
            client.close()


@dataclass(frozen=True)
class TakenSlice:
    ready: ReadySlice
    clients: list[channel.AgentClient]  # connected, presenting the pool's secret until handed over
    env_key: Hashable | None  # the environment its last job prepared on every host (None: unknown)

    def certificates(self) -> dict[str, bytes]:
        return host_certificates(self.ready, self.clients)


class WarmPool:
    def __init__(self, config: TpuClusterConfig, provisioner: SliceProvisioner,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._provisioner = provisioner
        self._clock = clock
        self._secret = tls.make_secret()
        self._slices: dict[str, PooledSlice] = {}
        self._lock = threading.Lock()
        self._open = True
        self._wake = threading.Event()
        self._deletions: list[threading.Thread] = []
        self._thread: threading.Thread | None = None

    # -- a finished job's slices come in ---------------------------------------------------------

    def offer(self, ready: ReadySlice, shape: SliceShape, clients: list[channel.AgentClient],
              journal: Journal, lost_in_last_attempt: bool, chips: int, released_by: str,
              env_key: Hashable | None = None) -> str | None:
        """Keep the slice warm (returns None) or say why not (the caller deletes it). ``clients``:
        the job's connections to the slice's agents (the pool's from now on; their connections
        are reused, so a large slice costs no new TLS handshakes, and each keeps pinning the
        certificate its host published when the slice booted). The agents are handed over to
        the pool's secret here: cleaned, and deaf to the job's secret. ``env_key``: the job
        environment the job's last Prepare found or built on every host (kept on the hosts)."""
        if sorted(c.address.rsplit(":", 1)[0] for c in clients) != sorted(map(ready.dial_address, ready.endpoints)):
            for client in clients:
                client.close()
            return "the job never connected to all of its agents"
        # Before asking the agents, what the job and the cloud know (all hosts assumed answering).
        hosts = len(ready.endpoints)
        health = SliceHealth(lost_in_last_attempt, self._lost(ready), agents_answered=hosts, hosts=hosts,
                             any_preempted_flag=False)
        reason = keep_reason(health, self.config.keep_warm, self._open)
        if reason is None:
            health = self._hand_over_to_pool(ready, clients, health)
            reason = keep_reason(health, self.config.keep_warm, self._open)
        if reason is not None:
            for client in clients:
                client.close()
            return reason
        for client in clients:
            client.use_secret(self._secret)
        pooled = PooledSlice(ready, WarmSlice(ready.spec.name, ready.zone, shape, self._clock()), journal,
                             clients, env_key)
        with self._lock:
            if not self._open:
                pooled.close()
                return "the controller is shutting down"
            # The pool holds it from now on: its idle time is the pool's, not the job's.
            journal.update_resource(ready.spec.name, ready.zone, job_id=POOL_JOB_ID, state=ResourceState.WARM)
            journal.open_warm_period(WarmPeriod(ready.spec.name, ready.zone, time.time(), None, shape.tpu_type, chips,
                                                shape.capacity, released_by))
            self._slices[ready.spec.name] = pooled
            self._ensure_thread()
        self._wake.set()
        log.info("slice %s in %s is warm for %.0fs", ready.spec.name, ready.zone, self.config.keep_warm)
        return None

    def _hand_over_to_pool(self, ready: ReadySlice, clients: list[channel.AgentClient],
                           health: SliceHealth) -> SliceHealth:
        answered, preempted = [], []

        def hand_over(client: channel.AgentClient) -> None:
            try:
                if client.describe(retries=1).preempted:
                    log.info("slice %s not kept warm: %s reports preempted", ready.spec.name, client.address)
                    preempted.append(client.address)
                    return
                client.hand_over(self._secret, POOL_HOLDER)
                answered.append(client.address)
            except channel.ChannelError as error:
                log.info("slice %s not kept warm: %s", ready.spec.name, error)

        in_parallel(hand_over, clients)
        return SliceHealth(health.lost_in_last_attempt, health.node_lost, len(answered), health.hosts, bool(preempted))

    # -- a new job takes warm slices --------------------------------------------------------------

    def take(self, shape: SliceShape, zones: Sequence[str], count: int, journal: Journal, holder: str
             ) -> list[TakenSlice]:
        """Up to ``count`` warm slices of ``shape`` in one of ``zones``, out of the pool: no other
        job can take them any more, and the pool no longer renews their leases (the taker does).
        Their agents still accept only the pool's secret, which their clients present: the
        taker's first Prepare hands each host over to the job (``AgentClient.prepare(hand_over=)``),
        which a preempted or busy host refuses; the taker then deletes the slice and takes or
        creates another (``SliceKeeper.refused``)."""
        with self._lock:
            candidates = [p.warm for p in self._slices.values() if p.journal is journal]
            chosen = [self._slices.pop(w.name) for w in choose(candidates, shape, zones, count)]
        now = time.time()
        for pooled in chosen:
            pooled.journal.close_warm_period(pooled.ready.spec.name, pooled.ready.zone, now)
            log.info("slice %s taken warm by %s after %.1fs idle", pooled.ready.spec.name, holder,
                     idle_seconds(pooled.warm, self._clock()))
        return [TakenSlice(p.ready, p.clients, p.env_key) for p in chosen]

    # -- what `fray-tpu slices` and tests see ---------------------------------------------------------

    def warm_slices(self) -> list[dict]:
        now = self._clock()
        with self._lock:
            return [{"name": p.ready.spec.name, "zone": p.ready.zone, "tpu_type": p.warm.shape.tpu_type,
                     "idle_seconds": idle_seconds(p.warm, now),
                     "expires_in_seconds": max(0.0, self.config.keep_warm - idle_seconds(p.warm, now))}
                    for p in self._slices.values()]

    # -- upkeep ------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._upkeep, daemon=True, name="warm-pool")
            self._thread.start()

    def _upkeep(self) -> None:
        """Renew leases, drop lost slices, delete expired ones, until the pool is empty or closed."""
        interval = min(self.config.lease_period, self.config.liveness_deadline) / 3
        while True:
            with self._lock:
                if not self._open or not self._slices:
                    self._thread = None
                    return
                pooled = list(self._slices.values())
            now = self._clock()
            silent = self._renew(pooled)
            for p in pooled:
                if expired(p.warm, now, self.config.keep_warm):
                    self._evict(p, f"idle for {self.config.keep_warm:.0f}s (keep_warm)")
                elif self._lost(p.ready):
                    self._evict(p, "the cloud reports it lost")
                elif p.ready.spec.name in silent:
                    self._evict(p, "an agent stopped answering")
            with self._lock:
                wait = next_expiry_in([p.warm for p in self._slices.values()], self._clock(), self.config.keep_warm)
            self._wake.wait(interval if wait is None else min(interval, wait))
            self._wake.clear()

    def _renew(self, pooled: Sequence[PooledSlice]) -> set[str]:
        """Renew every warm agent's lease at once; returns the slices with an agent that did not answer."""
        silent: set[str] = set()

        def renew(pair: tuple[PooledSlice, channel.AgentClient]) -> None:
            try:
                pair[1].renew_lease(self.config.lease_period, timeout=self.config.liveness_deadline / 3)
            except Exception as error:  # noqa: BLE001 - a closed channel (taken, shut down) or a dead host
                log.info("warm slice %s: %s", pair[0].ready.spec.name, error)
                silent.add(pair[0].ready.spec.name)

        in_parallel(renew, [(p, c) for p in pooled for c in p.clients], max_threads=LEASE_RENEWAL_THREADS)
        return silent

    def _evict(self, pooled: PooledSlice, why: str) -> None:
        with self._lock:
            if self._slices.get(pooled.ready.spec.name) is not pooled:
                return  # taken meanwhile
            del self._slices[pooled.ready.spec.name]
        self._delete(pooled, why)

    def _delete(self, pooled: PooledSlice, why: str) -> None:
        pooled.close()
        thread = threading.Thread(target=self._delete_now, args=(pooled, why), daemon=True,
                                  name=f"delete-warm-{pooled.ready.spec.name}")
        thread.start()
        with self._lock:
            self._deletions = [t for t in self._deletions if t.is_alive()] + [thread]

    def _delete_now(self, pooled: PooledSlice, why: str) -> None:
        ready = pooled.ready
        log.info("deleting warm slice %s in %s: %s", ready.spec.name, ready.zone, why)
        try:
            pooled.journal.update_resource(ready.spec.name, ready.zone, state=ResourceState.DELETING)
            self._provisioner.delete(ready.spec.name, ready.zone, deadline=time.monotonic() + self.config.delete_deadline,
                                     queued=ready.spec.queued)
            pooled.journal.update_resource(ready.spec.name, ready.zone, state=ResourceState.DELETED,
                                           deleted_at=time.time())
            pooled.journal.close_warm_period(ready.spec.name, ready.zone, time.time())
        except Exception as error:  # noqa: BLE001 - reported; gc finds it by label
            log.error("could not delete warm slice %s in %s: %s (`fray-tpu gc` will find it)", ready.spec.name,
                      ready.zone, error)

    def _lost(self, ready: ReadySlice) -> bool:
        try:
            observed = self._provisioner.observe(ready.zone).get(ready.spec.name)
        except Exception as error:  # noqa: BLE001 - an API outage is no verdict: the agents decide
            log.info("observing %s: %s", ready.spec.name, error)
            return False
        return observed is None or observed.lost

    def close(self, timeout: float) -> None:
        """Delete every warm slice (verified) and refuse new ones: the exit policy."""
        with self._lock:
            self._open = False
            pooled = list(self._slices.values())
            self._slices.clear()
        self._wake.set()
        for p in pooled:
            self._delete(p, "the controller is shutting down")
        deadline = time.monotonic() + timeout
        with self._lock:
            deletions = list(self._deletions)
        for thread in deletions:
            thread.join(max(0.0, deadline - time.monotonic()))
