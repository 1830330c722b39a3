"""The wire contract: every name both sides of the wire agree on, in one import-free module.

The controller, the agent on every VM, the runner an attempt runs as, and the emulator all
import this module (and nothing of each other for names); it imports only the standard library,
so it ships to every VM and costs the runner nothing at start-up.
"""

from __future__ import annotations

import enum

# The controller asks every VM to run the same version (the bootstrap installs it, the agent
# reports it); fray_tpu.__version__ is this value.
VERSION = "0.1.0"

# -- node metadata -----------------------------------------------------------------------
# Attributes Google sets on every TPU VM.
ATTR_ACCELERATOR_TYPE = "accelerator-type"
ATTR_WORKER_NUMBER = "agent-worker-number"
ATTR_WORKER_ENDPOINTS = "worker-network-endpoints"
ATTR_TPU_ENV = "tpu-env"
# Attributes the fray-tpu controller writes into the node's metadata.
ATTR_STARTUP_SCRIPT = "startup-script"
ATTR_SECRET_SHA256 = "fray-tpu-secret-sha256"
ATTR_NODE = "fray-tpu-node"
ATTR_API_ENDPOINT = "fray-tpu-api-endpoint"
ATTR_AGENT_PORT = "fray-tpu-agent-port"
ATTR_LEASE_SECONDS = "fray-tpu-lease-seconds"
# The lease's first term, from the agent's start to the controller's first renewal: as long as
# the controller waits for a gang to boot (its boot deadline), because it renews a slice's agents
# only once every slice of the gang serves.
ATTR_FIRST_LEASE_SECONDS = "fray-tpu-first-lease-seconds"
ATTR_TLS_LEAF_SECONDS = "fray-tpu-tls-leaf-seconds"
ATTR_SELF_DELETE = "fray-tpu-self-delete"
ATTR_JOB = "fray-tpu-job"
ATTR_CONTROLLER = "fray-tpu-controller"

# -- guest attributes ---------------------------------------------------------------------
# What a VM publishes under instance/guest-attributes/GUEST_NAMESPACE/ (only the VM itself can
# write there); the controller reads every worker's with one GetGuestAttributes per slice.
GUEST_NAMESPACE = "fray-tpu"
# Published by the startup-script (fray_tpu.bootstrap):
GUEST_BOOT_PHASES = "boot-phases"  # "name=epoch_ms name=epoch_ms ..." in order
GUEST_BOOT_FAILED = "boot-failed"  # "phase: reason"
GUEST_AGENT_EXIT = "agent-exit"  # the last agent exit: "code N: log tail"
# Published by the agent (fray_tpu.worker.identity):
GUEST_TLS_CERT = "tls-cert"  # its certificate, made on the VM, which the controller pins
GUEST_AGENT_SERVING = "agent-serving"  # epoch milliseconds when this run began serving
# The address the agent serves on: the controller pins each endpoint to the certificate of the
# agent at that address (the API may list endpoints out of worker order).
GUEST_AGENT_ADDRESS = "agent-address"
GUEST_SELF_DELETE_REFUSED = "self-delete-refused"  # why the TPU API refused the lease self-delete

# -- the task channel --------------------------------------------------------------------
DEFAULT_AGENT_PORT = 8477
# Where a TPU host's actor servers listen, the first port free (normally one server per host: the
# attempt's): fixed, so that with connect=external a firewall rule can open them, beside the agent
# port, to the driver, which dials the VMs' external IPs.
ACTOR_PORTS = (8478, 8479, 8480, 8481)
AUTH_METADATA_KEY = "authorization"
# Trailing metadata of a failed Prepare: whose fault it is.
FAILURE_KIND_KEY = "fray-tpu-failure-kind"


# PrepareResponse.env_digest of an attempt that runs on the agent's own interpreter.
BASE_ENV_DIGEST = "base"
# PrepareResponse.env_source: where the host got the job environment this time.
ENV_SOURCE_BASE = "base"  # the agent's own interpreter
ENV_SOURCE_LOCAL = "local"  # already on the host (an earlier attempt or job built or fetched it)
ENV_SOURCE_BUCKET = "bucket"  # downloaded from the staging bucket, built by another host
ENV_SOURCE_BUILT = "built"  # built here with uv


class PrepareFailureKind(str, enum.Enum):
    """Why the agent refused to prepare an attempt. (Not ``enum.StrEnum``: the agent runs on
    the images' Python 3.10, which lacks it.)"""

    BAD_HOST = "bad-host"  # the machine is at fault: replace it
    # The job's Python environment cannot be built (an unresolvable requirement, a stale lock,
    # no such Python): the same on every host and every try, so not retried.
    ENVIRONMENT = "environment"
    CONTROLLER = "controller"  # the controller sent something this agent cannot run
    # A host taken warm refused to pass to the new holder (preempted, still busy): the job
    # takes or creates another slice instead, within the same attempt.
    HAND_OVER = "hand-over"

    def __str__(self) -> str:
        return self.value


# -- what every task sees (README "What every task sees") ---------------------------------
CLUSTER_SPEC_ENV = "FRAY_CLUSTER_SPEC"
BACKEND_ENV = "FRAY_BACKEND"
SLICE_ID_ENV = "FRAY_SLICE_ID"
SLICE_COUNT_ENV = "FRAY_SLICE_COUNT"
WORKER_ID_ENV = "FRAY_WORKER_ID"
WORKERS_PER_SLICE_ENV = "FRAY_WORKERS_PER_SLICE"
TASK_INDEX_ENV = "FRAY_TASK_INDEX"
TASK_COUNT_ENV = "FRAY_TASK_COUNT"
REPLICA_ID_ENV = "FRAY_REPLICA_ID"
REPLICA_COUNT_ENV = "FRAY_REPLICA_COUNT"
# slice 0 worker 0 at the JAX coordinator port; read by the emulator's JAX cluster plugin.
JAX_COORDINATOR_ADDRESS_ENV = "FRAY_JAX_COORDINATOR_ADDRESS"
JAX_COORDINATOR_PORT_ENV = "JAX_COORDINATOR_PORT"
# GCP's TPU firewall opens 8476, not the 8482 that jax >= 0.8.1 defaults to (jax #35905).
JAX_COORDINATOR_PORT = 8476
MEGASCALE_COORDINATOR_ADDRESS_ENV = "MEGASCALE_COORDINATOR_ADDRESS"
MEGASCALE_NUM_SLICES_ENV = "MEGASCALE_NUM_SLICES"
MEGASCALE_SLICE_ID_ENV = "MEGASCALE_SLICE_ID"
MEGASCALE_PORT_ENV = "MEGASCALE_PORT"
MEGASCALE_PORT = 8081
MEGASCALE_ENVS = (MEGASCALE_COORDINATOR_ADDRESS_ENV, MEGASCALE_NUM_SLICES_ENV, MEGASCALE_SLICE_ID_ENV,
                  MEGASCALE_PORT_ENV)
JAX_PLATFORMS_ENV = "JAX_PLATFORMS"
JAX_CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"
# Set by the agent for each attempt.
ATTEMPT_ID_ENV = "FRAY_TPU_ATTEMPT_ID"
JOB_ID_ENV = "FRAY_TPU_JOB_ID"
TASK_ID_ENV = "FRAY_TPU_TASK_ID"
AGENT_TASK_INDEX_ENV = "FRAY_TPU_TASK_INDEX"
WORKER_NUMBER_ENV = "FRAY_TPU_WORKER_NUMBER"
# Marks every process of an attempt, so cleanup finds what an attempt left behind.
ATTEMPT_TOKEN_ENV = "FRAY_TPU_ATTEMPT_TOKEN"

# -- the runner (python -m fray_tpu.worker.runner PAYLOAD_FILE) -----------------------------
RUNNER_MODULE = "fray_tpu.worker.runner"
# Modules the runner imports before the payload (comma-separated).
RUNNER_PRELOAD_ENV = "FRAY_TPU_RUNNER_PRELOAD"
# "1": the runner was started ahead of the gang and waits on stdin for RUNNER_GO_BYTE.
RUNNER_HOLD_ENV = "FRAY_TPU_RUNNER_HOLD"
RUNNER_GO_BYTE = b"g"
# `python -m fray_tpu.worker.runner --spare`: a runner started before its job exists (the agent
# keeps one per host for the next attempt). It reads one line of JSON from stdin, {"env", "cwd",
# "payload"}, takes that environment and directory as its own, then runs as a held runner.
RUNNER_SPARE_ARG = "--spare"
# "0": the spare leaves importing cloudpickle to a payload that needs it (one pickled by value
# names it). The agent starts a spare so for the retry of an attempt whose payload does not:
# that spare starts at the attempt's exit, and its start is what the retry waits for.
RUNNER_SPARE_CLOUDPICKLE_ENV = "FRAY_TPU_RUNNER_SPARE_CLOUDPICKLE"
# Variables the interpreter reads while it starts (locale, allocator, loader, Python's own
# flags): a spare runner serves only an attempt whose values of these equal its own.
# PYTHONPATH is not among them: the spare puts the attempt's entries on sys.path itself.
RUNNER_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "LC_")
# HOME: the user site directory; the last two are read by the .pth hooks of setuptools and
# coverage, which run while the interpreter starts.
RUNNER_STARTUP_ENV_NAMES = ("LANG", "LANGUAGE", "TZ", "HOME", "SETUPTOOLS_USE_DISTUTILS", "COVERAGE_PROCESS_START")
# "module:function": the runner calls the job's callable as function(fn, args, kwargs), so the
# Client API can run it inside its client context without the payload naming the shell.
RUNNER_TASK_MAIN_ENV = "FRAY_TPU_RUNNER_TASK_MAIN"
# The controller's Python ("3.11"): functions pickled by value carry code objects of that
# version, which the runner names when they do not load on the host's Python.
CONTROLLER_PYTHON_ENV = "FRAY_TPU_CONTROLLER_PYTHON"
# The emulator's JAX cluster plugin, preloaded on emulated hosts.
EMULATOR_JAX_PLUGIN = "fray_tpu.jax_emulated_preload"

# -- an (emulated) host ---------------------------------------------------------------------
EMULATED_HOST_ENV = "FRAY_TPU_EMULATED_HOST"
HOST_DIR_ENV = "FRAY_TPU_HOST_DIR"
HOST_IP_ENV = "FRAY_TPU_HOST_IP"
AGENT_STATE_DIR_ENV = "FRAY_TPU_AGENT_STATE_DIR"
# Where the bootstrap unpacks the host bundle: the VM's tmpfs (/run/fray-tpu), or an emulated
# host's own (emptied when it reboots).
HOST_RUN_DIR_ENV = "FRAY_TPU_HOST_RUN_DIR"
# How a host runs uv: its path (set by the bootstrap), extra directories
# searched for interpreters (the emulator's stand-ins for uv's downloads), "never" to forbid
# interpreter downloads.
UV_ENV = "FRAY_TPU_UV"
# Where a VM's agent fetches uv from when the bootstrap staged it (fray_tpu.worker.uvfetch): the
# gs:// object, its pinned SHA-256 and the Cloud Storage endpoint.
UV_URL_ENV = "FRAY_TPU_UV_URL"
UV_SHA256_ENV = "FRAY_TPU_UV_SHA256"
STORAGE_ENDPOINT_ENV = "FRAY_TPU_STORAGE_ENDPOINT"
PYTHON_DIRS_ENV = "FRAY_TPU_PYTHON_DIRS"
PYTHON_DOWNLOADS_ENV = "FRAY_TPU_PYTHON_DOWNLOADS"
# Set on the emulator's inherit-controller hosts (edge tests only): the startup-script may use
# the fray-tpu the host inherited from the emulator instead of the host bundle.
EMULATOR_INHERITED_ENV = "FRAY_TPU_EMULATOR_INHERITED"
# On an emulated host: the agent's state directory inside HOST_DIR_ENV (hosts share one disk).
EMULATED_STATE_SUBDIR = "fray-tpu-agent"
# In the agent's state directory: the agent service's own log, and the file its current run
# writes (its pid) once it serves, which the service's exit hook reads.
AGENT_LOG_NAME = "agent.log"
AGENT_SERVING_MARKER = "agent.serving"

# -- the Cloud TPU API's refusals -----------------------------------------------------------
# ErrorInfo reasons Google sends (googleapis.com domain): the emulator answers with them, the
# controller's cloud_errors sorts creates by them.
REASON_LOCATION_POLICY = "LOCATION_POLICY_VIOLATED"
REASON_SERVICE_DISABLED = "SERVICE_DISABLED"
REASON_IAM_PERMISSION_DENIED = "IAM_PERMISSION_DENIED"
REASON_RATE_LIMIT = "RATE_LIMIT_EXCEEDED"
REASON_QUOTA = "RESOURCE_QUOTA_EXCEEDED"
REASON_ACCESS_TOKEN = "ACCESS_TOKEN_TYPE_UNSUPPORTED"

# The backend a cluster spec (``FRAY_CLUSTER_SPEC``, ``prefix?key=value&...``) names. Here, not in
# ``backend``, because the interpreter-startup hook of every task process reads it and must stay cheap.
TPU_SPEC_PREFIX = "tpu"


def spec_prefix(spec: str) -> str:
    """The backend a spec string ``prefix?key=value&...`` names, lower-cased."""
    return spec.split("?", 1)[0].strip().lower()


def is_tpu_spec(spec: str) -> bool:
    return spec_prefix(spec) == TPU_SPEC_PREFIX
