"""The agent's pure pieces: event ring, line batching, exit classification, lease, TLS material."""

from __future__ import annotations

import threading

import grpc

from fray_tpu import tls
from fray_tpu.channel import Classification, EventsLost, LogBatch, to_event
from fray_tpu.proto import worker_pb2
from fray_tpu.worker.attempt import MAX_LINE_BYTES, TAIL_LINE_BYTES, LineSplitter, shortened_tail
from fray_tpu.worker.classify import classify_exit, find_bad_host_line
from fray_tpu.worker.events import EventLog
from fray_tpu.worker.lease import Lease


def log_event(text: bytes) -> worker_pb2.AttemptEvent:
    return worker_pb2.AttemptEvent(log=worker_pb2.LogBatch(stream=worker_pb2.STDOUT, data=text, line_count=1))


def test_event_ring_numbers_events_and_replays_from_any_retained_seq():
    log = EventLog()
    for i in range(5):
        log.append(log_event(b"line %d" % i))
    log.append(worker_pb2.AttemptEvent(exit=worker_pb2.Exit(code=0)), final=True)
    assert log.last_seq == 6
    assert [e.seq for e in log.follow(3, lambda: True)] == [3, 4, 5, 6]


def test_event_ring_drops_the_oldest_and_tells_a_late_reader_what_it_lost():
    log = EventLog(max_events=3)
    for i in range(10):
        log.append(log_event(b"line %d" % i))
    log.append(worker_pb2.AttemptEvent(exit=worker_pb2.Exit(code=0)), final=True)
    events = [to_event(e) for e in log.follow(1, lambda: True)]
    assert events[0] == EventsLost(requested_from_seq=1, first_available_seq=9)
    assert [e.lines for e in events[1:3]] == [["line 8"], ["line 9"]]


def test_a_live_reader_wakes_for_new_events_and_ends_at_the_final_one():
    log = EventLog()
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(e.seq for e in log.follow(1, lambda: True)))
    reader.start()
    log.append(log_event(b"a"))
    log.append(worker_pb2.AttemptEvent(exit=worker_pb2.Exit(code=0)), final=True)
    reader.join(5)
    assert not reader.is_alive() and seen == [1, 2]


def test_line_splitter_batches_whole_lines_and_keeps_partial_ones():
    splitter = LineSplitter()
    assert splitter.feed(b"par", 1.0) is None
    assert splitter.feed(b"tial\nsecond\nthi", 2.0) == (b"partial\nsecond", 2, 1.0)
    assert splitter.feed(b"rd\n", 3.0) == (b"third", 1, 2.0)
    assert splitter.feed(b"\n\n", 4.0) == (b"\n", 2, 4.0)
    assert splitter.feed(b"no newline at exit", 5.0) is None
    assert splitter.flush() == (b"no newline at exit", 1, 5.0)
    assert splitter.flush() is None


def test_an_endless_line_is_cut_instead_of_growing_without_bound():
    splitter = LineSplitter()
    chunk = b"x" * (MAX_LINE_BYTES // 4)
    results = [splitter.feed(chunk, 0.0) for _ in range(4)]
    assert results[:3] == [None, None, None]
    assert results[3][1] == 1 and len(results[3][0]) == MAX_LINE_BYTES


def test_the_stderr_tail_keeps_the_start_and_end_of_a_huge_line_and_the_lines_before_it():
    huge = b"KeyError: 'the start" + b"k" * (1 << 20) + b"the end'"
    tail = shortened_tail(b"older\n" * 10_000 + b"  File \"x.py\", line 2, in fails\n" + huge, 8 << 10)
    lines = tail.split(b"\n")
    assert lines[-2] == b'  File "x.py", line 2, in fails'
    assert lines[-1].startswith(b"KeyError: 'the start") and lines[-1].endswith(b"the end'")
    assert b"bytes cut" in lines[-1] and len(lines[-1]) <= TAIL_LINE_BYTES
    assert 8 << 10 <= len(tail) < (8 << 10) + 16
    assert shortened_tail(b"a\nb", 100) == b"a\nb"


def test_log_batch_becomes_a_list_of_lines():
    message = worker_pb2.AttemptEvent(seq=7, log=worker_pb2.LogBatch(
        stream=worker_pb2.STDERR, timestamp=12.5, data="a\n\nü".encode(), line_count=3))
    assert to_event(message) == LogBatch(stream="stderr", lines=["a", "", "ü"], timestamp=12.5, seq=7)


def test_bad_host_signatures_are_found_in_whole_lines():
    data = b"ok\nE0101 tpu.cc] Couldn't open iommu group /dev/vfio/0\nmore"
    assert find_bad_host_line(data) == "E0101 tpu.cc] Couldn't open iommu group /dev/vfio/0"
    assert find_bad_host_line(b"ValueError: my own bug") is None


def test_classification_order_cancel_then_success_then_preemption_then_bad_host():
    bad = "No accelerator found"
    assert classify_exit(returncode=-15, cancel_reason="cancelled", preempted=True, bad_host_line=bad)[0] \
        == worker_pb2.CANCELLED
    assert classify_exit(returncode=0, cancel_reason=None, preempted=True, bad_host_line=bad)[0] == worker_pb2.OK
    assert classify_exit(returncode=1, cancel_reason=None, preempted=True, bad_host_line=bad)[0] \
        == worker_pb2.PREEMPTED
    assert classify_exit(returncode=1, cancel_reason=None, preempted=False, bad_host_line=bad)[0] \
        == worker_pb2.BAD_HOST
    assert classify_exit(returncode=-9, cancel_reason=None, preempted=False, bad_host_line=None) \
        == (worker_pb2.USER_FAILURE, "killed by signal 9")
    assert Classification.BAD_HOST == "BAD_HOST"


def test_lease_fires_once_when_not_renewed_and_renewal_revives_it():
    fired = threading.Event()
    lease = Lease(0.2, fired.set)
    lease.start()
    try:
        assert lease.remaining() > 0
        assert fired.wait(5)
        assert lease.expired
        assert lease.renew(30) == 30 and not lease.expired and lease.remaining() > 29
    finally:
        lease.stop()


def test_job_tls_material_is_a_p256_authority_whose_leaves_name_the_agent():
    """The pinned root is a P-256 CA valid at most MAX_VALIDITY; the leaves it signs name the
    agent, have keys of their own and the requested validity."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    material = tls.make_job_tls()
    root = x509.load_pem_x509_certificate(material.cert_pem)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.not_valid_after_utc - root.not_valid_before_utc <= tls.MAX_VALIDITY + tls.CLOCK_SKEW
    leaf_material = tls.issue_leaf(material, datetime.timedelta(days=2), now=1_000_000.0)
    leaf = x509.load_pem_x509_certificate(leaf_material.cert_pem)
    leaf.verify_directly_issued_by(root)
    assert leaf.public_key() != root.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [tls.AGENT_TLS_NAME]
    assert leaf.not_valid_after_utc.timestamp() == 1_000_000.0 + 2 * 86400
    assert isinstance(tls.server_credentials(material.cert_pem, material.key_pem), grpc.ServerCredentials)
    assert tls.secret_sha256("s") == "043a718774c572bd8a25adbeb1bfcd5c0256ae11cecf9f9c3f925d0e52beaf89"


def test_a_leaf_is_renewed_once_a_third_of_its_validity_is_left():
    """leaf_due: not before two thirds of the validity have passed, always after."""
    assert not tls.leaf_due(issued_at=0.0, expires_at=30.0, now=19.9)
    assert tls.leaf_due(issued_at=0.0, expires_at=30.0, now=20.0)
    assert tls.leaf_due(issued_at=0.0, expires_at=30.0, now=31.0)


def test_rotating_leaf_renews_on_the_injected_clock():
    """A server's leaf stays until due, then the next handshake gets a new one valid from then;
    a day-31 connection of a job on 30-day leaves meets a leaf issued on day 20, never an
    expired one."""
    import datetime

    from cryptography import x509

    day = 86400.0
    now = [0.0]
    leaf = tls.RotatingLeaf(tls.make_job_tls(), datetime.timedelta(days=30), clock=lambda: now[0])
    first = leaf.leaf
    now[0] = 19 * day
    assert leaf.renewed() is None and leaf.leaf == first
    now[0] = 20 * day
    second = leaf.renewed()
    assert second is not None and second != first and leaf.renewals == 1
    now[0] = 31 * day
    assert leaf.renewed() is None
    expires = x509.load_pem_x509_certificate(leaf.leaf.cert_pem).not_valid_after_utc.timestamp()
    assert expires == 50 * day > now[0]


def test_a_payload_from_another_python_is_explained_and_one_from_this_python_is_not():
    """The runner names both versions and the fix when the controller's Python differs from the
    host's; with the same version (or none given) the original error stands."""
    import sys

    from fray_tpu.worker.runner import unpickle_error

    here = "%d.%d" % sys.version_info[:2]
    cause = TypeError("code() argument 13 must be str, not int")
    explained = unpickle_error(cause, "2.7")
    assert explained is not None
    message = str(explained)
    assert "pickled by Python 2.7" in message and f"runs Python {here}" in message
    assert "module of the job's workspace" in message and "code() argument 13" in message
    assert unpickle_error(cause, here) is None and unpickle_error(cause, None) is None


def test_an_agents_identity_is_made_once_private_and_kept_across_restarts(tmp_path):
    """The agent's key is made on the VM, readable only by its owner, and the same on the next
    start (a reboot), so the certificate the controller pinned stays valid."""
    import stat

    from fray_tpu.worker.identity import KEY_FILE, host_tls

    first = host_tls(tmp_path)
    assert b"PRIVATE KEY" in first.key_pem and b"CERTIFICATE" in first.cert_pem
    assert stat.S_IMODE((tmp_path / "tls" / KEY_FILE).stat().st_mode) == 0o600
    assert host_tls(tmp_path) == first


def test_a_spare_runner_serves_only_attempts_whose_startup_variables_match():
    """The variables the interpreter reads while starting decide; PYTHONPATH and the job's own
    variables (FRAY_*, MEGASCALE_*, JAX_*) do not, since the spare applies them itself."""
    from fray_tpu.worker.spare import startup_view

    spare_env = {"PATH": "/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "PYTHONPATH": "/agent", "HOME": "/root"}
    job_env = {**spare_env, "PYTHONPATH": "/workspace:/agent", "FRAY_TASK_INDEX": "3", "MEGASCALE_SLICE_ID": "1",
               "JAX_PLATFORMS": "cpu", "PATH": "/env/bin:/bin"}
    assert startup_view(job_env) == startup_view(spare_env)
    for name, value in [("PYTHONHASHSEED", "0"), ("LD_PRELOAD", "/lib/x.so"), ("LC_ALL", "C"), ("LANG", "en_US.UTF-8"),
                        ("MALLOC_ARENA_MAX", "2"), ("TZ", "UTC"), ("HOME", "/home/job"),
                        ("SETUPTOOLS_USE_DISTUTILS", "stdlib"), ("COVERAGE_PROCESS_START", "/ws/.coveragerc")]:
        assert startup_view({**job_env, name: value}) != startup_view(spare_env), name


def test_a_spare_runner_takes_the_import_path_a_runner_started_for_the_attempt_would_have():
    """The directory first, then the attempt's PYTHONPATH entries (absolute, in order), then the
    interpreter's own path; the spare's own PYTHONPATH entries are dropped, duplicates kept once."""
    from fray_tpu.worker.runner import import_path

    spare_path = ["/state/spare", "/agent/site", "/agent/extra", "/usr/lib/python311.zip", "/usr/lib/python3.11",
                  "/env/site-packages"]
    assert import_path(spare_path, "/agent/site:/agent/extra", "/ws", "/ws:/job/lib::/env/site-packages") == [
        "/ws", "/job/lib", "/env/site-packages", "/usr/lib/python311.zip", "/usr/lib/python3.11"]
    assert import_path(spare_path[:1] + spare_path[3:], "", "/attempts/a1", "") == [
        "/attempts/a1", "/usr/lib/python311.zip", "/usr/lib/python3.11", "/env/site-packages"]


def test_a_leases_first_term_lasts_until_the_controller_can_first_renew_it():
    """The first term (the controller's boot deadline) outlasts the period; renewals then run
    for the period only."""
    lease = Lease(0.2, lambda: None, first_period_seconds=30)
    assert lease.remaining() > 29
    assert lease.renew() == 0.2 and lease.remaining() <= 0.2
