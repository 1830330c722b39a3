"""The process an attempt runs as: `python -m fray_tpu.worker.runner PAYLOAD_FILE`.

`python -m fray_tpu.worker.runner --spare` starts one before its attempt exists (the agent keeps
one per host, so that a job's start costs no interpreter start): it imports nothing of any job
(no JAX: JAX reads its variables when imported) and waits on stdin for one JSON line naming the
attempt's environment, working directory and payload file; it takes them as its own (the whole
`os.environ` replaced, `sys.path` as a runner started there with the attempt's PYTHONPATH
would have it) and goes on as below.

Imports every module named in `FRAY_TPU_RUNNER_PRELOAD` (comma-separated; the emulator's JAX
cluster plugin, for instance), then unpickles `(callable, args, kwargs)` from the payload file
and calls it. Exit status 0 on success; on an exception the traceback goes to stderr and the
status is 1 (`SystemExit` keeps its own code); a traceback too long for the job's error message
(which carries only the end of stderr) is followed by a short one. `-m` puts the working
directory (the workspace bundle, when there is one) first on sys.path.
"""

from __future__ import annotations

import importlib
import json
import os
import site
import sys
import traceback

from fray_tpu.contract import BACKEND_ENV, CLUSTER_SPEC_ENV, CONTROLLER_PYTHON_ENV, is_tpu_spec
from fray_tpu.contract import RUNNER_SPARE_ARG as SPARE_ARG
from fray_tpu.contract import RUNNER_SPARE_CLOUDPICKLE_ENV as SPARE_CLOUDPICKLE_ENV
from fray_tpu.contract import RUNNER_GO_BYTE as GO_BYTE
from fray_tpu.contract import RUNNER_HOLD_ENV as HOLD_ENV
from fray_tpu.contract import RUNNER_PRELOAD_ENV as PRELOAD_ENV
from fray_tpu.contract import RUNNER_TASK_MAIN_ENV as TASK_MAIN_ENV
# A message longer than this (or with more lines) would push the exception's type out of the
# stderr tail the agent reports (8 KiB): the short traceback keeps this much of it.
SHORT_MESSAGE_CHARS = 1500
SHORT_MESSAGE_LINES = 20
SHORT_TRACEBACK_FRAMES = 8
# The interpreter-startup hook (`fray_tpu_backend.pth`) that a spare runner, started before the
# attempt's FRAY_BACKEND / FRAY_CLUSTER_SPEC existed, runs once it has them.
BACKEND_HOOK_PTH = "fray_tpu_backend.pth"


def preload() -> None:
    for name in filter(None, (part.strip() for part in os.environ.get(PRELOAD_ENV, "").split(","))):
        importlib.import_module(name)


def receive_attempt() -> str | None:
    """A spare runner: block until the agent hands it an attempt, then become that attempt's
    process; returns the payload file (None: the agent discarded the spare)."""
    header = sys.stdin.buffer.readline()
    if not header.strip():
        return None
    attempt = json.loads(header)
    env, cwd = attempt["env"], attempt["cwd"]
    os.chdir(cwd)
    sys.path[:] = import_path(sys.path, os.environ.get("PYTHONPATH", ""), cwd, env.get("PYTHONPATH", ""))
    os.environ.clear()
    os.environ.update(env)
    sys.argv[1:] = [attempt["payload"]]
    backend_hook()
    return attempt["payload"]


def import_path(path: list[str], started_with: str, cwd: str, wanted: str) -> list[str]:
    """The ``sys.path`` a runner started in ``cwd`` with PYTHONPATH ``wanted`` would have, from
    the ``path`` of one started with PYTHONPATH ``started_with``: the same interpreter and site,
    so only the first entry (the directory, as ``-m`` puts it) and the PYTHONPATH entries after it
    differ (no directory first under PYTHONSAFEPATH). Absolute and without duplicates, as
    ``site`` leaves it."""
    def entries(value: str) -> list[str]:
        return [os.path.abspath(entry) for entry in value.split(os.pathsep) if entry]

    safe = getattr(sys.flags, "safe_path", False)
    started = set(entries(started_with))
    rest = path if safe else path[1:]
    while rest and rest[0] in started:
        rest = rest[1:]
    return list(dict.fromkeys([*([] if safe else [os.path.abspath(cwd)]), *entries(wanted), *rest]))


def backend_hook() -> None:
    """What `fray_tpu_backend.pth` does at interpreter start, where that file is installed."""
    wanted = is_tpu_spec(os.environ.get(BACKEND_ENV, "")) or is_tpu_spec(os.environ.get(CLUSTER_SPEC_ENV, ""))
    if not wanted or "fray_tpu.backend_hook" in sys.modules:
        return
    site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    if any(os.path.exists(os.path.join(d, BACKEND_HOOK_PTH)) for d in site_dirs):
        importlib.import_module("fray_tpu.backend_hook").install()


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


def short_traceback(error: BaseException) -> str | None:
    """The exception's type, the start of its message and the last frames, when its message is
    too long for the end of stderr to show them; None when the full traceback already does."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the exception's type
        message = "<the message cannot be shown: its __str__ raised>"
    lines = message.split("\n")
    if len(message) <= SHORT_MESSAGE_CHARS and len(lines) <= SHORT_MESSAGE_LINES:
        return None
    start = "\n".join(lines[:SHORT_MESSAGE_LINES])[:SHORT_MESSAGE_CHARS]
    kind = type(error).__qualname__
    if type(error).__module__ not in ("builtins", "__main__"):
        kind = f"{type(error).__module__}.{kind}"
    frames = traceback.extract_tb(error.__traceback__)[-SHORT_TRACEBACK_FRAMES:]
    return "".join([
        f"fray-tpu: the traceback above, shortened (its message has {len(message)} characters):\n",
        "Traceback (most recent call last; its last frames):\n",
        *traceback.format_list(frames),
        f"{kind}: {start} ... [{len(message) - len(start)} more characters]\n",
    ])


def report_exception(error: BaseException) -> None:
    traceback.print_exception(type(error), error, error.__traceback__)
    short = short_traceback(error)
    if short is not None:
        sys.stderr.write(short)


def unpickle_error(error: Exception, controller_python: str | None) -> RuntimeError | None:
    """Why the payload does not load when the controller pickled it on another Python version
    (functions pickled by value carry that version's code objects); None otherwise."""
    here = "%d.%d" % sys.version_info[:2]
    if not controller_python or controller_python == here:
        return None
    return RuntimeError(
        f"cannot unpickle the job's callable: it was pickled by Python {controller_python} on the controller and "
        f"this host runs Python {here} ({sys.executable}); functions pickled by value do not cross Python "
        f"versions. Define the function in a module of the job's workspace (pickled by reference), or run the "
        f"controller on Python {here}. ({type(error).__name__}: {error})"
    )


def run_callable(payload_file: str) -> int:
    # cloudpickle's load is pickle's: a payload that needs cloudpickle (a function pickled by
    # value) imports it while loading, one pickled by reference never does (an interpreter
    # started for the attempt saves its import).
    import pickle

    with open(payload_file, "rb") as f:
        try:
            fn, args, kwargs = pickle.load(f)
        except Exception as error:
            explained = unpickle_error(error, os.environ.get(CONTROLLER_PYTHON_ENV))
            if explained is not None:
                raise explained from error
            raise
    if not wait_for_go():
        return 143
    task_main = os.environ.get(TASK_MAIN_ENV)
    if task_main:
        module, _, function = task_main.partition(":")
        getattr(importlib.import_module(module), function)(fn, args, kwargs)
    else:
        fn(*args, **kwargs)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m fray_tpu.worker.runner PAYLOAD_FILE | {SPARE_ARG}", file=sys.stderr)
        return 2
    payload = argv[0]
    if payload == SPARE_ARG:
        if os.environ.get(SPARE_CLOUDPICKLE_ENV) != "0":
            import cloudpickle  # noqa: F401 - loaded ahead, for payloads pickled by value
        # Loaded ahead too: standard modules that nearly every job imports (JAX does, and most
        # user code) and that read nothing of a job when imported, as a running Ray worker has them.
        import pathlib  # noqa: F401

        payload = receive_attempt()
        if payload is None:
            return 0
    try:
        preload()
        return run_callable(payload)
    except SystemExit:
        raise
    except BaseException as error:
        report_exception(error)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
