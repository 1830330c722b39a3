"""The controller's reading of the VMs' bootstrap reports (pure): configuration error, bad host,
still booting, all serving."""

from __future__ import annotations

from fray_tpu.bootreport import judge_boot, parse_host_report, phase_timings, pinned_certificates

CERT = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"


def host(slice_id: int, worker: int, phases: str, failed: str = "", serving: bool = False):
    attributes = {"boot-phases": phases, "boot-failed": failed}
    if serving:
        attributes.update({"agent-serving": "1700000005000", "tls-cert": CERT})
    return parse_host_report(slice_id, worker, attributes)


BOOTED = "started=1700000000000 interpreter=1700000000100 bundle=1700000001000 deps=1700000003000 service=1700000003100"


def test_a_failure_on_every_host_is_a_configuration_error_naming_host_phase_and_reason():
    """Every host failed: one message with the first host, its phase and reason, and a count."""
    reports = [host(s, w, "started=1700000000000", "interpreter: no python3 on this image") for s in (0, 1)
               for w in range(2)]
    verdict = judge_boot(reports, expected_hosts=4)
    assert verdict.config_error == ("bootstrap failed on every host: slice-0/worker-0 in phase interpreter: "
                                    "no python3 on this image (and the same on 3 other hosts)")
    assert verdict.bad_hosts == {} and not verdict.all_serving


def test_a_failure_where_other_hosts_got_through_the_phase_is_a_bad_host():
    """One host fails 'deps' while the others are past it: that slice has a bad host."""
    reports = [host(0, 0, BOOTED, serving=True), host(0, 1, "started=1700000000000 interpreter=1700000000100 "
                                                           "bundle=1700000001000", "deps: disk full"),
               host(1, 0, BOOTED, serving=True), host(1, 1, BOOTED, serving=True)]
    verdict = judge_boot(reports, expected_hosts=4)
    assert verdict.config_error is None
    assert verdict.bad_hosts == {0: "slice-0/worker-1: bootstrap failed in phase deps: disk full"}


def test_a_failure_while_the_others_are_still_before_that_phase_waits_for_them():
    """No host got past the failed phase yet and some have not failed: no verdict yet."""
    reports = [host(0, 0, "started=1700000000000", "interpreter: no python3"), host(0, 1, "started=1700000000000")]
    verdict = judge_boot(reports, expected_hosts=2)
    assert verdict.config_error is None and verdict.bad_hosts == {} and not verdict.all_serving


def test_all_serving_needs_every_expected_host_and_timings_are_the_slowest_hosts():
    """A host that has not reported yet keeps the boot going; timings are per phase, worst host."""
    reports = [host(0, 0, BOOTED, serving=True)]
    assert not judge_boot(reports, expected_hosts=2).all_serving
    reports.append(host(0, 1, BOOTED.replace("deps=1700000003000", "deps=1700000004000"), serving=True))
    assert judge_boot(reports, expected_hosts=2).all_serving
    assert phase_timings(reports) == ("started +0.0s, interpreter +0.1s, bundle +1.0s, deps +4.0s, service +3.1s, "
                                      "serving +5.0s")


def test_each_endpoint_is_pinned_to_the_certificate_published_for_its_address():
    """The API may list endpoints out of worker order: certificates pair by the address each
    agent published, and an endpoint no agent claims is named."""
    reports = [parse_host_report(0, worker, {"boot-phases": "started=1", "agent-serving": "5",
                                             "tls-cert": f"cert-{worker}", "agent-address": f"10.0.0.{worker}"})
               for worker in range(2)]
    assert pinned_certificates(reports, ["10.0.0.1", "10.0.0.0"]) == [b"cert-1", b"cert-0"]
    missing = pinned_certificates(reports, ["10.0.0.0", "10.0.0.9"])
    assert isinstance(missing, str) and "10.0.0.9" in missing and "10.0.0.0, 10.0.0.1" in missing
