"""The process an attempt runs as: `python -m fray_tpu.worker.runner PAYLOAD_FILE`.

Imports every module named in `FRAY_TPU_RUNNER_PRELOAD` (comma-separated; the emulator's JAX
cluster plugin, for instance), then unpickles `(callable, args, kwargs)` from the payload file
and calls it. Exit status 0 on success; on an exception the traceback goes to stderr and the
status is 1 (`SystemExit` keeps its own code). `-m` puts the working directory (the workspace
bundle, when there is one) first on sys.path. `--binary CMD ARGS...` execs a binary instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

PRELOAD_ENV = "FRAY_TPU_RUNNER_PRELOAD"
# Mirrors fray_tpu.worker.attempt (not imported: the runner starts with as little as possible).
HOLD_ENV = "FRAY_TPU_RUNNER_HOLD"
GO_BYTE = b"g"


def preload() -> None:
    for name in filter(None, (part.strip() for part in os.environ.get(PRELOAD_ENV, "").split(","))):
        importlib.import_module(name)


def wait_for_go() -> bool:
    """A held runner (`FRAY_TPU_RUNNER_HOLD=1`) was started ahead of the gang: it blocks until
    the agent writes the go byte, then gives user code an empty stdin. False if told to stop."""
    if os.environ.pop(HOLD_ENV, None) != "1":
        return True
    go = sys.stdin.buffer.read(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return go == GO_BYTE


# The controller's Python ("3.11"): functions pickled by value carry code objects of that version.
CONTROLLER_PYTHON_ENV = "FRAY_TPU_CONTROLLER_PYTHON"


def run_callable(payload_file: str) -> int:
    import cloudpickle

    with open(payload_file, "rb") as f:
        try:
            fn, args, kwargs = cloudpickle.load(f)
        except Exception as error:
            here = "%d.%d" % sys.version_info[:2]
            there = os.environ.get(CONTROLLER_PYTHON_ENV)
            if there and there != here:
                raise RuntimeError(
                    f"cannot unpickle the job's callable: it was pickled by Python {there} on the controller and "
                    f"this host runs Python {here} ({sys.executable}); functions pickled by value do not cross "
                    f"Python versions. Define the function in a module of the job's workspace (pickled by "
                    f"reference), or run the controller on Python {here}. ({type(error).__name__}: {error})"
                ) from error
            raise
    if not wait_for_go():
        return 143
    fn(*args, **kwargs)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--binary":
        os.execvp(argv[1], argv[1:])
    if len(argv) != 1:
        print("usage: python -m fray_tpu.worker.runner PAYLOAD_FILE | --binary CMD [ARGS...]", file=sys.stderr)
        return 2
    try:
        preload()
        return run_callable(argv[0])
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
