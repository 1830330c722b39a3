"""``fray-tpu``: the operator's command line.

Subcommands: ``demo`` (the README's main job: a multislice JAX program on the emulated TPU
cloud) and ``emulator`` (serve a Cloud TPU emulator until stopped). Exit codes: 0 success,
1 the job or check failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _demo(args: argparse.Namespace) -> int:
    program = EXAMPLES / "multislice_jax.py"
    if not program.exists():
        print(f"fray-tpu demo runs {program}, which ships with the source checkout only", file=sys.stderr)
        return 2
    namespace = runpy.run_path(str(program))
    return namespace["main"]()


def _emulator(args: argparse.Namespace) -> int:
    from fray_tpu.emulator.__main__ import main as emulator_main

    return emulator_main(args.emulator_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fray-tpu", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a multislice JAX job on the emulated TPU cloud").set_defaults(run=_demo)
    emulator = commands.add_parser("emulator", help="serve a Cloud TPU emulator (arguments as python -m fray_tpu.emulator)")
    emulator.add_argument("emulator_args", nargs=argparse.REMAINDER)
    emulator.set_defaults(run=_emulator)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
