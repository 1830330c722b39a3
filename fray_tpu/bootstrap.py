"""The startup-script every TPU VM runs at boot (as root, on every worker, in no order).

It installs fray-tpu at the controller's exact version when the VM's interpreter lacks it (from
the package index, or a wheel URL), writes the agent's settings to an env file in the state
directory, and runs ``python -m fray_tpu.worker`` under a restart-on-crash loop with bounded
exponential backoff. The agent ends the loop for good by exiting with :data:`AGENT_EXIT_STOP`
(after it deleted its own node, say). Every line the script itself prints starts with
:data:`LOG_PREFIX`, so its lines stand out in the serial console and in emulator host logs.

The same script boots emulator hosts, where fray-tpu is already importable and the install step
is skipped. Emulated hosts share one filesystem, so there the state directory lives in the host's
own directory (``FRAY_TPU_HOST_DIR``); ``FRAY_TPU_AGENT_STATE_DIR`` overrides it anywhere. (It is
not ``FRAY_TPU_STATE_DIR``: that one is the controller's journal directory, which emulated hosts
inherit from the controller's environment.)
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

# AGENT_STATE_DIR_ENV overrides the state directory (the bootstrap's lock and env file, and the
# agent's state: fray_tpu.worker.settings reads the same variable).
from fray_tpu.contract import AGENT_STATE_DIR_ENV, VERSION
from fray_tpu.errors import ConfigError

# The agent exits with this code to stop the restart loop for good (EX_TEMPFAIL's number, unused
# by Python itself: an uncaught exception exits 1, a signal 128+N).
AGENT_EXIT_STOP = 75
LOG_PREFIX = "[fray-tpu-bootstrap]"
# On an emulated host (FRAY_TPU_EMULATED_HOST=1): the state directory inside FRAY_TPU_HOST_DIR.
EMULATED_STATE_SUBDIR = "fray-tpu-agent"
ENV_FILE_NAME = "agent.env"
# An agent run at least this long resets the restart backoff to its first step.
HEALTHY_RUN_SECONDS = 60
PIP_SOCKET_TIMEOUT_SECONDS = 60
# fray-tpu's requires-python floor: an older interpreter is reported instead of a pip failure.
MIN_PYTHON = (3, 11)
APT_LOCK_TIMEOUT_SECONDS = 300

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def fray_tpu_version() -> str:
    """The version of fray-tpu running here: what the controller asks every VM to run."""
    return VERSION


@dataclass(frozen=True)
class BootstrapSpec:
    """What the startup-script installs and runs."""

    fray_tpu_version: str
    wheel_url: str | None = None
    python: str = "python3"
    agent_module: str = "fray_tpu.worker"
    agent_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    state_dir: str = "/var/lib/fray-tpu"
    restart_backoff_max: int = 30
    install_attempts: int = 5
    install_backoff_seconds: int = 5

    def __post_init__(self) -> None:
        if not self.fray_tpu_version.strip():
            raise ConfigError("BootstrapSpec.fray_tpu_version is empty; pass fray_tpu_version() of the controller")
        if not _MODULE.fullmatch(self.agent_module):
            raise ConfigError(f"BootstrapSpec.agent_module {self.agent_module!r} is not a dotted module name")
        bad_keys = [key for key in self.env if not _ENV_KEY.fullmatch(key)]
        if bad_keys:
            raise ConfigError(f"BootstrapSpec.env has invalid variable names {bad_keys}; use [A-Za-z_][A-Za-z0-9_]*")
        for name in ("restart_backoff_max", "install_attempts", "install_backoff_seconds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"BootstrapSpec.{name} must be at least 1, got {getattr(self, name)}")
        if not self.state_dir or not self.python:
            raise ConfigError("BootstrapSpec.state_dir and BootstrapSpec.python must not be empty")


_TEMPLATE = r"""#!/usr/bin/env bash
# fray-tpu startup script (fray-tpu __VERSION_COMMENT__): install fray-tpu if needed, write the
# agent's settings, run the agent under a restart-on-crash loop. Rendered by fray_tpu.bootstrap.
set -u

FRAY_TPU_VERSION=__VERSION__
PYTHON=__PYTHON__
AGENT_MODULE=__AGENT_MODULE__
AGENT_ARGS=(__AGENT_ARGS__)
WHEEL_URL=__WHEEL_URL__
DEFAULT_STATE_DIR=__STATE_DIR__
AGENT_EXIT_STOP=__AGENT_EXIT_STOP__
RESTART_BACKOFF_MAX=__RESTART_BACKOFF_MAX__
INSTALL_ATTEMPTS=__INSTALL_ATTEMPTS__
INSTALL_BACKOFF=__INSTALL_BACKOFF__

log() { printf '%s %s\n' __LOG_PREFIX__ "$*"; }
prefixed() { local line; while IFS= read -r line || [ -n "$line" ]; do log "$line"; done; }

fray_tpu_ready() {
  "$PYTHON" -c 'import sys, fray_tpu; sys.exit(fray_tpu.__version__ != sys.argv[1])' "$FRAY_TPU_VERSION" >/dev/null 2>&1
}

ensure_pip() {
  "$PYTHON" -m pip --version >/dev/null 2>&1 && return 0
  log "pip is missing for $PYTHON; trying ensurepip"
  "$PYTHON" -m ensurepip --upgrade 2>&1 | prefixed
  "$PYTHON" -m pip --version >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    log "ensurepip did not provide pip; installing python3-pip with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=__APT_LOCK_TIMEOUT__ update 2>&1 | prefixed
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=__APT_LOCK_TIMEOUT__ install -y python3-pip 2>&1 | prefixed
  fi
  "$PYTHON" -m pip --version >/dev/null 2>&1
}

install_fray_tpu() {
  local target="fray-tpu==$FRAY_TPU_VERSION"
  [ -n "$WHEEL_URL" ] && target=$WHEEL_URL
  ensure_pip || log "no pip for $PYTHON; the install below will fail"
  local attempt=1 delay=$INSTALL_BACKOFF status
  while :; do
    log "installing $target with $PYTHON -m pip (attempt $attempt of $INSTALL_ATTEMPTS)"
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --no-input \
      --disable-pip-version-check --timeout __PIP_TIMEOUT__ --retries 3 "$target" 2>&1 | prefixed
    status=${PIPESTATUS[0]}
    if [ "$status" -eq 0 ] && fray_tpu_ready; then
      log "installed fray-tpu $FRAY_TPU_VERSION"
      return 0
    fi
    if [ "$status" -eq 0 ]; then
      log "pip succeeded but $PYTHON still cannot import fray_tpu $FRAY_TPU_VERSION (wrong wheel version or interpreter?)"
    else
      log "pip exited with code $status"
    fi
    if [ "$attempt" -ge "$INSTALL_ATTEMPTS" ]; then
      log "giving up installing $target after $attempt attempts; the agent will not start on this VM"
      return 1
    fi
    log "retrying the install in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

if fray_tpu_ready; then
  log "fray-tpu $FRAY_TPU_VERSION is already importable by $PYTHON; skipping installation"
else
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (__MIN_PYTHON_TUPLE__))' >/dev/null 2>&1; then
    log "$PYTHON is missing or older than Python __MIN_PYTHON__ ($("$PYTHON" --version 2>&1)); fray-tpu needs __MIN_PYTHON__+: set the interpreter (BootstrapSpec.python) to one the VM image has, e.g. python3.11"
    exit 1
  fi
  install_fray_tpu || exit 1
fi

# Emulated hosts share one filesystem: each keeps its state in its own host directory.
if [ -n "${__AGENT_STATE_DIR_ENV__:-}" ]; then
  STATE_DIR=$__AGENT_STATE_DIR_ENV__
elif [ "${FRAY_TPU_EMULATED_HOST:-}" = 1 ]; then
  STATE_DIR=${FRAY_TPU_HOST_DIR:-$PWD}/__EMULATED_STATE_SUBDIR__
else
  STATE_DIR=$DEFAULT_STATE_DIR
fi
if ! mkdir -p "$STATE_DIR" 2>/dev/null || [ ! -w "$STATE_DIR" ]; then
  log "cannot write the state directory $STATE_DIR (not root?); using $PWD/fray-tpu-state instead"
  STATE_DIR=$PWD/fray-tpu-state
  mkdir -p "$STATE_DIR" || { log "cannot create $STATE_DIR either; giving up"; exit 1; }
fi
STATE_DIR=$(cd "$STATE_DIR" && pwd)

exec 9>"$STATE_DIR/bootstrap.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
  log "another fray-tpu bootstrap is already running the agent for $STATE_DIR; exiting"
  exit 0
fi

ENV_FILE=$STATE_DIR/__ENV_FILE_NAME__
(
  umask 077
  {
    printf '__AGENT_STATE_DIR_ENV__=%q\n' "$STATE_DIR"
    printf '%s\n' __ENV_LINES__
  } >"$ENV_FILE.tmp" && mv -f "$ENV_FILE.tmp" "$ENV_FILE"
) || { log "cannot write the agent settings to $ENV_FILE; giving up"; exit 1; }
log "wrote the agent settings to $ENV_FILE"
set -a
. "$ENV_FILE"
set +a
export PYTHONUNBUFFERED=1

child=""
stopping=0
on_signal() {
  log "received $1; stopping the agent and not restarting it"
  stopping=1
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP

run=0
delay=1
while :; do
  run=$((run + 1))
  log "starting the agent (run $run): $PYTHON -m $AGENT_MODULE ${AGENT_ARGS[*]+${AGENT_ARGS[*]}}"
  started=$SECONDS
  FRAY_TPU_AGENT_RUN=$run "$PYTHON" -m "$AGENT_MODULE" ${AGENT_ARGS[@]+"${AGENT_ARGS[@]}"} &
  child=$!
  wait "$child"
  code=$?
  # A trapped signal interrupts `wait`; wait again for the agent's own exit status.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
  done
  child=""
  ran=$((SECONDS - started))
  how="code $code"
  [ "$code" -gt 128 ] && how="code $code (signal $((code - 128)))"
  if [ "$stopping" -eq 1 ]; then
    log "agent exited with $how after ${ran}s; stopped by signal, not restarting"
    exit 0
  fi
  if [ "$code" -eq "$AGENT_EXIT_STOP" ]; then
    log "agent exited with $how (stop for good) after ${ran}s; not restarting"
    exit 0
  fi
  [ "$ran" -ge __HEALTHY_RUN__ ] && delay=1
  log "agent exited with $how after ${ran}s; restarting in ${delay}s"
  sleep "$delay" &
  child=$!
  wait "$child"
  child=""
  if [ "$stopping" -eq 1 ]; then
    exit 0
  fi
  delay=$((delay * 2))
  [ "$delay" -gt "$RESTART_BACKOFF_MAX" ] && delay=$RESTART_BACKOFF_MAX
done
"""


def render_startup_script(spec: BootstrapSpec) -> str:
    """The bash startup-script for ``spec``; every value in it is shell-quoted."""
    q = shlex.quote
    env_lines = [f"{key}={q(value)}" for key, value in spec.env.items()]
    env_lines.append(f"FRAY_TPU_VERSION={q(spec.fray_tpu_version)}")
    replacements = {
        "__VERSION_COMMENT__": spec.fray_tpu_version.replace("\n", " "),
        "__VERSION__": q(spec.fray_tpu_version),
        "__PYTHON__": q(spec.python),
        "__AGENT_MODULE__": q(spec.agent_module),
        "__AGENT_ARGS__": " ".join(q(arg) for arg in spec.agent_args),
        "__WHEEL_URL__": q(spec.wheel_url or ""),
        "__STATE_DIR__": q(spec.state_dir),
        "__AGENT_EXIT_STOP__": str(AGENT_EXIT_STOP),
        "__RESTART_BACKOFF_MAX__": str(int(spec.restart_backoff_max)),
        "__INSTALL_ATTEMPTS__": str(int(spec.install_attempts)),
        "__INSTALL_BACKOFF__": str(int(spec.install_backoff_seconds)),
        "__LOG_PREFIX__": q(LOG_PREFIX),
        "__APT_LOCK_TIMEOUT__": str(APT_LOCK_TIMEOUT_SECONDS),
        "__PIP_TIMEOUT__": str(PIP_SOCKET_TIMEOUT_SECONDS),
        "__ENV_FILE_NAME__": q(ENV_FILE_NAME),
        "__ENV_LINES__": " ".join(q(line) for line in env_lines),
        "__HEALTHY_RUN__": str(HEALTHY_RUN_SECONDS),
        "__MIN_PYTHON_TUPLE__": ", ".join(str(part) for part in MIN_PYTHON),
        "__MIN_PYTHON__": ".".join(str(part) for part in MIN_PYTHON),
        "__AGENT_STATE_DIR_ENV__": AGENT_STATE_DIR_ENV,
        "__EMULATED_STATE_SUBDIR__": EMULATED_STATE_SUBDIR,
    }
    pattern = re.compile("|".join(re.escape(token) for token in sorted(replacements, key=len, reverse=True)))
    return pattern.sub(lambda match: replacements[match.group(0)], _TEMPLATE)
