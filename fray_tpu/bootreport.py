"""What the VMs' bootstrap published, and what the controller does about it. Pure.

Every VM publishes its boot phases and failures as guest attributes (``fray_tpu.bootstrap``); the
controller reads them for a whole slice with one ``GetGuestAttributes`` call per poll. A failure
on every host is a configuration error (the same image, bundle and settings fail everywhere:
replacing slices would only burn TPU hours); a failure on some hosts while others got past the
same phase is a bad host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fray_tpu.contract import (
    GUEST_AGENT_ADDRESS,
    GUEST_AGENT_SERVING,
    GUEST_BOOT_FAILED,
    GUEST_BOOT_PHASES,
    GUEST_SELF_DELETE_REFUSED,
    GUEST_TLS_CERT,
)

BOOT_PHASES = ("started", "interpreter", "bundle", "deps", "service", "serving")


@dataclass(frozen=True)
class HostBootReport:
    slice_id: int
    worker: int
    phases: tuple[tuple[str, int], ...]  # (phase, epoch ms) in order; "serving" last once serving
    failure: str | None  # "phase: reason"
    cert_pem: str | None
    self_delete_refused: str | None = None
    address: str | None = None  # where the agent serves

    @property
    def host(self) -> str:
        return f"slice-{self.slice_id}/worker-{self.worker}"

    @property
    def serving(self) -> bool:
        return self.cert_pem is not None and any(name == "serving" for name, _ in self.phases)

    @property
    def failed_phase(self) -> str | None:
        return self.failure.split(":", 1)[0].strip() if self.failure else None

    def reached(self, phase: str) -> bool:
        names = [name for name, _ in self.phases]
        if phase not in BOOT_PHASES:
            return False
        later = BOOT_PHASES[BOOT_PHASES.index(phase):]
        return any(name in later for name in names) and self.failed_phase != phase


def parse_host_report(slice_id: int, worker: int, attributes: Mapping[str, str]) -> HostBootReport:
    """One VM's guest attributes (namespace ``fray-tpu``, key → value) as a report."""
    phases: list[tuple[str, int]] = []
    for item in (attributes.get(GUEST_BOOT_PHASES) or "").split():
        name, _, stamp = item.partition("=")
        if stamp.isdigit():
            phases.append((name, int(stamp)))
    serving = (attributes.get(GUEST_AGENT_SERVING) or "").strip()
    if serving.isdigit() and attributes.get(GUEST_TLS_CERT):
        phases.append(("serving", int(serving)))
    failure = (attributes.get(GUEST_BOOT_FAILED) or "").strip() or None
    return HostBootReport(slice_id, worker, tuple(phases), failure, attributes.get(GUEST_TLS_CERT) or None,
                          (attributes.get(GUEST_SELF_DELETE_REFUSED) or "").strip() or None,
                          (attributes.get(GUEST_AGENT_ADDRESS) or "").strip() or None)


@dataclass(frozen=True)
class BootVerdict:
    config_error: str | None  # every host failed: fail the job with this message
    bad_hosts: dict[int, str]  # slice id -> why (some hosts failed where others got through)
    all_serving: bool


def judge_boot(reports: Sequence[HostBootReport], expected_hosts: int) -> BootVerdict:
    """Decide from every host's report (``expected_hosts`` counts hosts not yet reporting too)."""
    failed = [r for r in reports if r.failure]
    serving = [r for r in reports if r.serving and not r.failure]
    if not failed:
        return BootVerdict(None, {}, len(serving) == expected_hosts)
    if len(failed) == expected_hosts:
        first = min(failed, key=lambda r: (r.slice_id, r.worker))
        others = len(failed) - 1
        more = f" (and the same on {others} other host{'s' if others != 1 else ''})" if others else ""
        return BootVerdict(f"bootstrap failed on every host: {first.host} in phase {first.failure}{more}",
                           {}, False)
    bad: dict[int, str] = {}
    for report in failed:
        if any(other.reached(report.failed_phase or "") for other in reports if not other.failure):
            bad.setdefault(report.slice_id, f"{report.host}: bootstrap failed in phase {report.failure}")
    return BootVerdict(None, bad, False)


def pinned_certificates(reports: Sequence[HostBootReport], endpoints: Sequence[str]) -> list[bytes] | str:
    """Each endpoint's certificate, from the agent that published that address (the API's
    endpoint order need not be the guest attributes' worker order); or why one is missing."""
    by_address = {r.address: r.cert_pem.encode() for r in reports if r.serving and r.address}
    missing = [ip for ip in endpoints if ip not in by_address]
    if missing:
        return (f"no agent published a certificate for {', '.join(missing)} "
                f"(agents serve at {', '.join(sorted(by_address)) or 'no address'})")
    return [by_address[ip] for ip in endpoints]


def phase_timings(reports: Sequence[HostBootReport]) -> str:
    """``started +0.0s, interpreter +0.1s, ...``: per phase, the slowest host's time since its start."""
    worst: dict[str, float] = {}
    for report in reports:
        if not report.phases:
            continue
        start = report.phases[0][1]
        for name, stamp in report.phases:
            worst[name] = max(worst.get(name, 0.0), (stamp - start) / 1000)
    return ", ".join(f"{name} +{worst[name]:.1f}s" for name in BOOT_PHASES if name in worst)
