"""`python -m fray_tpu.worker`: read settings from metadata, serve the task channel, until stopped."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from fray_tpu.worker import cleanup
from fray_tpu.worker import metadata as md
from fray_tpu.worker.agent import Agent, make_server
from fray_tpu.worker.identity import publish_serving
from fray_tpu.worker.settings import load_settings

LOG = logging.getLogger("fray_tpu.worker")
SHUTDOWN_GRACE_SECONDS = 10.0


def _configure_logging(prefix: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fray_tpu.worker", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where bundles, environments and attempt records live")
    parser.add_argument("--boot-timeout", type=float, default=120.0,
                        help="seconds to wait for the metadata server at boot")
    args = parser.parse_args(argv)
    _configure_logging("fray-tpu-agent")
    client = md.MetadataClient()
    try:
        settings = load_settings(client, state_dir=args.state_dir, boot_timeout=args.boot_timeout)
    except md.MetadataError as error:
        LOG.error("cannot start: %s", error)
        return 1
    _configure_logging(f"fray-tpu-agent w{settings.worker_number} {settings.ip}")

    if not cleanup.become_child_subreaper():
        LOG.warning("cannot become child subreaper: processes that leave an attempt's group and "
                    "environment are found only by cgroup")
    agent = Agent(settings)
    watcher = md.PreemptionWatcher(client, agent.mark_preempted)
    try:
        server = make_server(agent, settings)
    except RuntimeError as error:
        LOG.error("cannot start: %s", error)
        return 1
    server.start()
    try:
        publish_serving(client, settings.state_dir, settings.tls_cert_pem, settings.ip)
    except md.MetadataError as error:
        LOG.error("cannot start: %s", error)
        server.stop(grace=0)
        return 1
    agent.uv.start()  # if __main__ did not
    agent.lease.start()
    watcher.start()
    LOG.info("serving on %s:%d (node %s, %s, job %s, lease %.0fs, self-delete %s)", settings.ip, settings.port,
             settings.node_name or "?", settings.accelerator_type or "?", settings.job or "?",
             settings.lease_seconds, settings.self_delete)

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    while not stopping.wait(3600):
        pass
    LOG.info("stopping: cancelling the current attempt")
    agent.stop(SHUTDOWN_GRACE_SECONDS, reason="the agent is shutting down")
    server.stop(grace=2).wait(5)
    return 0
