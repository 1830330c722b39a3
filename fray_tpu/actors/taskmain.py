"""What a job's callable runs inside: ``current_client()`` of the same controller, and the
job's own exception reported back so ``JobHandle.wait()`` can re-raise it.

Marin's Ray backend does the same for its tasks (``FRAY_BACKEND`` set, the entrypoint run
inside ``set_current_client``). Threads the user starts do not inherit the context variable;
``FRAY_BACKEND=tpu`` plus the resolution hook (``fray_tpu.backend_hook``) covers them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)
REPORT_TIMEOUT = 10.0


def run_task(fn: Any, args: tuple, kwargs: dict) -> None:
    """The runner calls this (``RUNNER_TASK_MAIN_ENV``) instead of ``fn(*args, **kwargs)``."""
    from fray_tpu import backend_hook
    from fray_tpu.actors import link as links
    from fray_tpu.actors.rpc import pack_exception
    from fray_tpu.client import TpuClient
    from fray_tpu.client_api import set_current_client

    os.environ["FRAY_BACKEND"] = "tpu"
    backend_hook.install_client_hook()
    with set_current_client(TpuClient.attach()):
        try:
            fn(*args, **kwargs)
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                _report(links, pack_exception(RuntimeError(f"the job called sys.exit({exit_.code!r})")))
            raise
        except BaseException as error:
            _report(links, pack_exception(error))
            raise


def _report(links, packed: tuple[bytes, str]) -> None:
    token = links.own_submission()
    if token is None:
        return
    try:
        links.process_link().call("report_failure", token, *packed, timeout=REPORT_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - the job still fails; wait() falls back to its error message
        log.warning("could not report the job's exception to the controller: %s", error)
