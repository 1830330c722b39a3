"""The committed generated code is exactly what the generator makes from `protos/`."""

from pathlib import Path

from fray_tpu.proto import generate

PACKAGE_ROOT = Path(generate.__file__).resolve().parents[2]


def test_committed_code_matches_protos(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "the generator wrote nothing"
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = PACKAGE_ROOT / relative
        assert committed.exists(), f"{relative} is not committed; run `python -m fray_tpu.proto.generate`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{relative} differs from what protos/ generate; run `python -m fray_tpu.proto.generate`"
        )


def test_worker_service_has_the_channel_methods():
    from fray_tpu.proto import worker_pb2

    service = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in service.methods} >= {
        "Describe", "Prepare", "Start", "Watch", "Cancel", "RenewLease", "UploadBundle", "HasBundle",
    }
