"""Regenerate the committed gRPC code from `protos/` (needs grpcio-tools, a dev dependency).

    python -m fray_tpu.proto.generate            # rewrite fray_tpu/proto/*_pb2*.py(i)
    python -m fray_tpu.proto.generate --out DIR  # write the tree under DIR instead
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = ("fray_tpu/proto/worker.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(proto_file: str) -> list[str]:
    """Paths (relative to the output root) that protoc writes for one proto file."""
    stem = proto_file.removesuffix(".proto")
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every proto file into `out_root`; returns the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto_file in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(PROTO_ROOT / proto_file),
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed (exit {status}) for {PROTO_ROOT / proto_file}")
        written.extend(out_root / name for name in generated_files(proto_file))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
