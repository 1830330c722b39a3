"""The startup-script every TPU VM runs at boot (as root, on every worker, in no order).

It finds the image's ``python3``, which (one interpreter, ``fray_tpu.gcsfetch.install``) fetches
the host bundle (``fray_tpu.hostbundle``) from Cloud Storage with the VM's own service-account
token, verifies its SHA-256 against the hash the controller pinned here, and unpacks it (its
dependencies are installed already, with their bytecode, for this Python and platform; no
package index is ever asked). The script then writes the agent's settings (among them where
uv's own object is and its pinned hash: the agent fetches it in the background once it serves,
``fray_tpu.worker.uvfetch``), starts the agent as its own service and exits 0. On a VM with
systemd the service is a unit (restart on crash, the whole control group stopped at shutdown, the agent's
stop-for-good exit code :data:`AGENT_EXIT_STOP` honoured, output to its own log); without
systemd (the emulator's images) a detached runner does the same. A reboot runs the script again;
an installed bundle is reused, not fetched again.

Every phase and every failure is published as a guest attribute under ``fray-tpu/``
(``contract.GUEST_BOOT_PHASES``, ``contract.GUEST_BOOT_FAILED``), which the controller reads through the TPU API's
``GetGuestAttributes``; every line the script prints starts with :data:`LOG_PREFIX`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass, field

# AGENT_STATE_DIR_ENV overrides the state directory (the env file and the agent's state:
# fray_tpu.worker.settings reads the same variable).
from fray_tpu import gcsfetch
from fray_tpu.contract import (
    AGENT_LOG_NAME,
    AGENT_SERVING_MARKER,
    AGENT_STATE_DIR_ENV,
    EMULATED_STATE_SUBDIR,
    EMULATOR_INHERITED_ENV,
    GUEST_AGENT_EXIT,
    GUEST_BOOT_FAILED,
    GUEST_BOOT_PHASES,
    GUEST_NAMESPACE,
    HOST_RUN_DIR_ENV,
    STORAGE_ENDPOINT_ENV,
    UV_ENV,
    UV_SHA256_ENV,
    UV_URL_ENV,
    VERSION,
)
from fray_tpu.errors import ConfigError

# The agent exits with this code to stop its service for good (EX_TEMPFAIL's number, unused by
# Python itself: an uncaught exception exits 1, a signal 128+N).
AGENT_EXIT_STOP = 75
LOG_PREFIX = gcsfetch.LOG_PREFIX
ENV_FILE_NAME = "agent.env"
# An agent run at least this long resets the restart backoff to its first step.
HEALTHY_RUN_SECONDS = 60
DOWNLOAD_ATTEMPTS = 5

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fray_tpu_version() -> str:
    """The version of fray-tpu running here: what the controller asks every VM to run."""
    return VERSION


@dataclass(frozen=True)
class BootstrapSpec:
    """What the startup-script fetches, verifies and runs."""

    fray_tpu_version: str
    bundle_url: str  # gs://bucket/object
    bundle_sha256: str
    uv_url: str  # gs://bucket/object: uv's binary
    uv_sha256: str
    bundle_python: str = "3.10"
    bundle_platform: str = ""
    storage_endpoint: str = "https://storage.googleapis.com"
    python: str = "python3"
    agent_module: str = "fray_tpu.worker"
    agent_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    state_dir: str = "/var/lib/fray-tpu"
    run_dir: str = "/run/fray-tpu"  # a tmpfs: the unpacked bundle
    restart_backoff_max: int = 30

    def __post_init__(self) -> None:
        if not self.fray_tpu_version.strip():
            raise ConfigError("BootstrapSpec.fray_tpu_version is empty; pass fray_tpu_version() of the controller")
        if not _MODULE.fullmatch(self.agent_module):
            raise ConfigError(f"BootstrapSpec.agent_module {self.agent_module!r} is not a dotted module name")
        bad_keys = [key for key in self.env if not _ENV_KEY.fullmatch(key)]
        if bad_keys:
            raise ConfigError(f"BootstrapSpec.env has invalid variable names {bad_keys}; use [A-Za-z_][A-Za-z0-9_]*")
        for name in ("bundle", "uv"):
            url, sha256 = getattr(self, f"{name}_url"), getattr(self, f"{name}_sha256")
            if not url.startswith("gs://") or url.count("/") < 3:
                raise ConfigError(f"BootstrapSpec.{name}_url {url!r} is not gs://bucket/object")
            if not _SHA256.fullmatch(sha256):
                raise ConfigError(f"BootstrapSpec.{name}_sha256 {sha256!r} is not a lowercase hex SHA-256")
        if self.restart_backoff_max < 1:
            raise ConfigError(f"BootstrapSpec.restart_backoff_max must be at least 1, got {self.restart_backoff_max}")
        if not self.state_dir or not self.run_dir or not self.python:
            raise ConfigError("BootstrapSpec.state_dir, run_dir and python must not be empty")


_TEMPLATE = r"""#!/bin/bash
# fray-tpu startup script (fray-tpu __VERSION_COMMENT__): fetch and verify the host bundle, install
# it, start the agent as a service, exit. Rendered by fray_tpu.bootstrap.
set -u

FRAY_TPU_VERSION=__VERSION__
PYTHON=__PYTHON__
AGENT_MODULE=__AGENT_MODULE__
AGENT_ARGS=(__AGENT_ARGS__)
BUNDLE_URL=__BUNDLE_URL__
BUNDLE_SHA256=__BUNDLE_SHA256__
UV_URL=__UV_URL__
UV_SHA256=__UV_SHA256__
BUNDLE_PYTHON=__BUNDLE_PYTHON__
BUNDLE_PLATFORM=__BUNDLE_PLATFORM__
STORAGE_ENDPOINT=__STORAGE_ENDPOINT__
DEFAULT_STATE_DIR=__STATE_DIR__
DEFAULT_RUN_DIR=__RUN_DIR__
AGENT_EXIT_STOP=__AGENT_EXIT_STOP__
RESTART_BACKOFF_MAX=__RESTART_BACKOFF_MAX__
METADATA=${GCE_METADATA_HOST:-metadata.google.internal}

log() { printf '%s %s\n' __LOG_PREFIX__ "$*"; }
publish() {
  curl -sf -m 10 --retry 3 -X PUT -H 'Metadata-Flavor: Google' --data-binary "$2" \
    "http://$METADATA/computeMetadata/v1/instance/guest-attributes/__NAMESPACE__/$1" >/dev/null \
    || log "could not publish guest attribute $1"
}
# Milliseconds since the epoch from bash's own clock (bash 5+), else from date(1).
now_ms() {
  if [ -n "${EPOCHREALTIME:-}" ]; then local t=${EPOCHREALTIME/[.,]/}; printf '%s' "${t:0:13}"; else date +%s%3N; fi
}
PHASES=""
phase() { PHASES="${PHASES:+$PHASES }$1=$(now_ms)"; publish __ATTR_PHASES__ "$PHASES"; log "phase $1${2:+: $2}"; }
fail() { publish __ATTR_FAILED__ "$1: $2"; log "FAILED in phase $1: $2"; exit 1; }

publish __ATTR_FAILED__ ""
phase started

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  fail interpreter "no $PYTHON on this image (PATH=$PATH); fray-tpu's agent needs Python 3.10+: use runtime_version=tpu-ubuntu2204-base (or v2-alpha-tpuv5-lite / v2-alpha-tpuv6e), whose images ship Python 3.10"
fi

if [ -n "${__AGENT_STATE_DIR_ENV__:-}" ]; then
  STATE_DIR=$__AGENT_STATE_DIR_ENV__
elif [ "${FRAY_TPU_EMULATED_HOST:-}" = 1 ]; then
  # Emulated hosts share one filesystem: each keeps its state in its own host directory.
  STATE_DIR=${FRAY_TPU_HOST_DIR:-$PWD}/__EMULATED_STATE_SUBDIR__
else
  STATE_DIR=$DEFAULT_STATE_DIR
fi
# The unpacked bundle lives in RUN_DIR, a tmpfs (/run: thousands of small files are created in
# memory, not on the boot disk, in a fraction of the time), the verified archive on disk: a reboot
# empties /run and unpacks the kept archive again, without fetching it.
if [ -n "${__RUN_DIR_ENV__:-}" ]; then
  RUN_DIR=$__RUN_DIR_ENV__
elif [ "${FRAY_TPU_EMULATED_HOST:-}" = 1 ]; then
  RUN_DIR=$STATE_DIR/run
else
  RUN_DIR=$DEFAULT_RUN_DIR
fi
mkdir -p "$STATE_DIR/bundles" "$RUN_DIR/bundles" \
  || fail bundle "cannot create the state directory $STATE_DIR and the runtime directory $RUN_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
RUN_DIR=$(cd "$RUN_DIR" && pwd)
ARCHIVE=$STATE_DIR/bundles/$BUNDLE_SHA256.tar
BUNDLE_DIR=$RUN_DIR/bundles/$BUNDLE_SHA256
SITE=$BUNDLE_DIR/site
# uv's binary: the agent fetches it here (verified, then renamed) in the background.
UV=$STATE_DIR/tools/$UV_SHA256/uv

if [ "${__INHERITED_ENV__:-}" = 1 ] && "$PYTHON" -c 'import sys, fray_tpu; sys.exit(fray_tpu.__version__ != sys.argv[1])' "$FRAY_TPU_VERSION" 2>/dev/null; then
  # The emulator's inherit-controller image (edge tests only): the controller's own interpreter.
  SITE=""
  UV=$(command -v uv || true)
  UV_URL=""
  phase interpreter "the emulator's own $PYTHON"
  phase bundle "not used: the inherit-controller image runs the emulator's own fray-tpu"
  phase deps "inherited"
else
  # One interpreter for the interpreter, bundle and deps phases (fray_tpu.gcsfetch.install): it
  # publishes each, and answers the phases so far, or the failed phase and why.
  GOT=$("$PYTHON" -c "$FETCH_PY" install "$STORAGE_ENDPOINT" "$BUNDLE_URL" "$BUNDLE_SHA256" "$ARCHIVE" \
    "$BUNDLE_DIR" "$BUNDLE_PYTHON" "$BUNDLE_PLATFORM" __DOWNLOAD_ATTEMPTS__ __NAMESPACE__/__ATTR_PHASES__ "$PHASES")
  CODE=$?
  if [ "$CODE" = __EXIT_REPORTED__ ]; then
    fail "${GOT%%$'\t'*}" "${GOT#*$'\t'}"
  elif [ "$CODE" != 0 ]; then
    fail interpreter "$PYTHON could not run fray-tpu's installer (exit code $CODE; its error is above on the serial console): fray-tpu's agent needs Python 3.10+: use runtime_version=tpu-ubuntu2204-base, whose image ships Python 3.10"
  fi
  PHASES=$GOT
fi

ENV_FILE=$STATE_DIR/__ENV_FILE_NAME__
(
  umask 077
  {
    printf '__AGENT_STATE_DIR_ENV__=%q\n' "$STATE_DIR"
    [ -n "$SITE" ] && printf 'PYTHONPATH=%q\n' "$SITE"
    printf '__AGENT_UV_ENV__=%q\n' "$UV"
    if [ -n "$UV_URL" ]; then
      printf '__UV_URL_ENV__=%q\n__UV_SHA256_ENV__=%q\n__STORAGE_ENDPOINT_ENV__=%q\n' "$UV_URL" "$UV_SHA256" "$STORAGE_ENDPOINT"
    fi
    printf 'PYTHONUNBUFFERED=1\n'
    printf 'GCE_METADATA_HOST=%q\n' "$METADATA"
    printf '%s\n' __ENV_LINES__
  } >"$ENV_FILE.tmp" && mv -f "$ENV_FILE.tmp" "$ENV_FILE"
) || fail service "cannot write the agent settings to $ENV_FILE"

# What runs after every agent exit (systemd's ExecStopPost, or the runner below): publish it, and
# when the agent never served in this run, publish a boot failure with the tail of its log.
cat >"$STATE_DIR/agent-exited.sh" <<EXITED
#!/bin/bash
code=\${1:-\${EXIT_STATUS:-?}}
tail_lines=\$(grep -v '^\s*\$' "$STATE_DIR/__AGENT_LOG__" 2>/dev/null | tail -n 3 | tr '\n' ' ' | cut -c1-1500)
put() { curl -sf -m 10 --retry 3 -X PUT -H 'Metadata-Flavor: Google' --data-binary "\$2" "http://$METADATA/computeMetadata/v1/instance/guest-attributes/__NAMESPACE__/\$1" >/dev/null; }
put __ATTR_AGENT_EXIT__ "code \$code: \$tail_lines"
if [ ! -f "$STATE_DIR/__SERVING__" ] && [ "\$code" != "$AGENT_EXIT_STOP" ]; then
  put __ATTR_FAILED__ "agent: exited with code \$code before serving: \$tail_lines"
fi
EXITED
AGENT_CMD=("$(command -v "$PYTHON")" -m "$AGENT_MODULE" ${AGENT_ARGS[@]+"${AGENT_ARGS[@]}"})

if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  {
    printf '[Unit]\nDescription=fray-tpu agent\nAfter=network-online.target\n\n[Service]\n'
    printf 'EnvironmentFile=%s\n' "$ENV_FILE"
    printf 'ExecStartPre=/bin/rm -f %s\n' "$STATE_DIR/__SERVING__"
    printf 'ExecStart=%s\n' "${AGENT_CMD[*]}"
    printf 'ExecStopPost=/bin/bash %s\n' "$STATE_DIR/agent-exited.sh"
    printf 'Restart=on-failure\nRestartSec=2\nRestartPreventExitStatus=%s\nKillMode=control-group\n' "$AGENT_EXIT_STOP"
    printf 'StandardOutput=append:%s\nStandardError=append:%s\n\n' "$STATE_DIR/__AGENT_LOG__" "$STATE_DIR/__AGENT_LOG__"
    printf '[Install]\nWantedBy=multi-user.target\n'
  } >/etc/systemd/system/fray-tpu-agent.service || fail service "cannot write the systemd unit"
  systemctl daemon-reload && systemctl enable fray-tpu-agent.service >/dev/null 2>&1 \
    && systemctl restart fray-tpu-agent.service || fail service "systemctl could not start fray-tpu-agent.service"
  phase service "systemd unit fray-tpu-agent.service started; its log: $STATE_DIR/__AGENT_LOG__"
  exit 0
fi

# No systemd: a detached runner with the unit's semantics (restart on crash with backoff, stop
# for good on exit code $AGENT_EXIT_STOP, log to the agent's own file).
cat >"$STATE_DIR/agent-runner.sh" <<RUNNER
#!/bin/bash
set -a; . "$ENV_FILE"; set +a
exec 9>"$STATE_DIR/agent-runner.lock"
flock -n 9 || exit 0
child=""
trap '[ -n "\$child" ] && kill -TERM "\$child" 2>/dev/null; exit 0' TERM INT HUP
run=0; delay=1
while :; do
  run=\$((run + 1)); started=\$SECONDS
  rm -f "$STATE_DIR/__SERVING__"
  FRAY_TPU_AGENT_RUN=\$run $(printf '%q ' "${AGENT_CMD[@]}") >>"$STATE_DIR/__AGENT_LOG__" 2>&1 &
  child=\$!; wait "\$child"; code=\$?; child=""
  /bin/bash "$STATE_DIR/agent-exited.sh" "\$code"
  [ "\$code" -eq $AGENT_EXIT_STOP ] && exit 0
  [ \$((SECONDS - started)) -ge __HEALTHY_RUN__ ] && delay=1
  sleep "\$delay"
  delay=\$((delay * 2)); [ "\$delay" -gt $RESTART_BACKOFF_MAX ] && delay=$RESTART_BACKOFF_MAX
done
RUNNER
setsid /bin/bash "$STATE_DIR/agent-runner.sh" </dev/null >/dev/null 2>&1 &
phase service "agent runner started (no systemd); its log: $STATE_DIR/__AGENT_LOG__"
exit 0
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
        "__BUNDLE_URL__": q(spec.bundle_url),
        "__BUNDLE_SHA256__": q(spec.bundle_sha256),
        "__UV_URL__": q(spec.uv_url),
        "__UV_SHA256__": q(spec.uv_sha256),
        "__UV_URL_ENV__": UV_URL_ENV,
        "__UV_SHA256_ENV__": UV_SHA256_ENV,
        "__STORAGE_ENDPOINT_ENV__": STORAGE_ENDPOINT_ENV,
        "__BUNDLE_PYTHON__": q(spec.bundle_python),
        "__BUNDLE_PLATFORM__": q(spec.bundle_platform),
        "__STORAGE_ENDPOINT__": q(spec.storage_endpoint),
        "__STATE_DIR__": q(spec.state_dir),
        "__RUN_DIR__": q(spec.run_dir),
        "__RUN_DIR_ENV__": HOST_RUN_DIR_ENV,
        "__AGENT_EXIT_STOP__": str(AGENT_EXIT_STOP),
        "__RESTART_BACKOFF_MAX__": str(int(spec.restart_backoff_max)),
        "__LOG_PREFIX__": q(LOG_PREFIX),
        "__ENV_FILE_NAME__": q(ENV_FILE_NAME),
        "__ENV_LINES__": " ".join(q(line) for line in env_lines),
        "__HEALTHY_RUN__": str(HEALTHY_RUN_SECONDS),
        "__AGENT_STATE_DIR_ENV__": AGENT_STATE_DIR_ENV,
        "__AGENT_UV_ENV__": UV_ENV,
        "__INHERITED_ENV__": EMULATOR_INHERITED_ENV,
        "__EMULATED_STATE_SUBDIR__": EMULATED_STATE_SUBDIR,
        "__NAMESPACE__": GUEST_NAMESPACE,
        "__ATTR_PHASES__": GUEST_BOOT_PHASES,
        "__ATTR_FAILED__": GUEST_BOOT_FAILED,
        "__ATTR_AGENT_EXIT__": GUEST_AGENT_EXIT,
        "__AGENT_LOG__": AGENT_LOG_NAME,
        "__SERVING__": AGENT_SERVING_MARKER,
        "__DOWNLOAD_ATTEMPTS__": str(DOWNLOAD_ATTEMPTS),
        "__EXIT_REPORTED__": str(gcsfetch.EXIT_REPORTED),
    }
    pattern = re.compile("|".join(re.escape(token) for token in sorted(replacements, key=len, reverse=True)))
    script = pattern.sub(lambda match: replacements[match.group(0)], _TEMPLATE)
    prelude = f"FETCH_PY={q(Path(gcsfetch.__file__).read_text())}\n"
    return script.replace("set -u\n", "set -u\n" + prelude, 1)
