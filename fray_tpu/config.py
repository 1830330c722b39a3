"""Configuration of the TPU backend: ``TpuClusterConfig``, its spec string, its environment.

A config comes from a spec string (what ``FRAY_CLUSTER_SPEC`` holds, and what every job launched
by the backend receives, so code inside a job reaches the same backend)::

    tpu?project=my-proj&zone=us-central2-b&capacity=spot&emulate=false

or from environment variables (``TpuClusterConfig.from_env``). Spec keys and variables:

==================  ===========================  =============================================
spec key            environment variable         meaning (default)
==================  ===========================  =============================================
project             FRAY_TPU_PROJECT             GCP project id; required unless emulate=true
                    (else GOOGLE_CLOUD_PROJECT)
zones (zone)        FRAY_TPU_ZONES               comma list; zones the backend may use (all the
                                                 table's, confirmed by ListAcceleratorTypes)
regions (region)    FRAY_TPU_REGIONS             comma list; regions the backend may use (all)
capacity            FRAY_TPU_CAPACITY            spot | preemptible | on-demand | reserved (spot)
queued              FRAY_TPU_QUEUED              create queued resources, not nodes (false)
reservation         FRAY_TPU_RESERVATION         reservation name for capacity=reserved (none)
network             FRAY_TPU_NETWORK             VPC network (the project's default)
subnetwork          FRAY_TPU_SUBNETWORK          subnetwork (the network's default)
external_ips        FRAY_TPU_EXTERNAL_IPS        give workers external IPs (true with
                                                 connect=external, else false)
connect             FRAY_TPU_CONNECT             how the controller reaches the agents: internal
                                                 (it runs in the VPC and dials the workers'
                                                 internal addresses) | external (the workers get
                                                 external IPs and it dials those) (internal)
network_tag         FRAY_TPU_NETWORK_TAG         network tag every node carries, for the firewall
                                                 rules of README "Ports and firewall" (fray-tpu)
service_account     FRAY_TPU_SERVICE_ACCOUNT     service account email of the VMs (default)
staging_bucket      FRAY_TPU_STAGING_BUCKET      Cloud Storage bucket the host bundle is staged in;
                                                 required for TPU jobs unless emulate=true
host_python         FRAY_TPU_HOST_PYTHON         the VMs' python3 version, e.g. 3.10 (from the
                                                 runtime version: 3.8 for tpu-vm-*, else 3.10)
runtime_versions    FRAY_TPU_RUNTIME_VERSIONS    per-generation overrides ``v5e:ver,v6e:ver``
labels              FRAY_TPU_LABELS              extra resource labels ``team:ml,cost:x``
emulate             FRAY_TPU_EMULATE             use the local Cloud TPU emulator (false)
emulator_endpoint   FRAY_TPU_EMULATOR_ENDPOINT   host:port of a running emulator (start one)
state_dir           FRAY_TPU_STATE_DIR           job journal directory
                                                 ($XDG_STATE_HOME/fray-tpu or ~/.local/state/fray-tpu)
agent_port          FRAY_TPU_AGENT_PORT          port of the agent on each VM (8477)
api_timeout         FRAY_TPU_API_TIMEOUT         timeout of one Cloud TPU API call (30s)
api_retry_seconds   FRAY_TPU_API_RETRY_SECONDS   one round of retries of a failing API call; a
                                                 listing still failing after it keeps the last
                                                 observation and tries again (60s)
create_deadline     FRAY_TPU_CREATE_DEADLINE     create call (queued: PROVISIONING) to node
                                                 READY with endpoints (15m)
boot_deadline       FRAY_TPU_BOOT_DEADLINE       node READY to every agent answering (15m)
poll_interval       FRAY_TPU_POLL_INTERVAL       between observations of slices (5s)
capacity_deadline   FRAY_TPU_CAPACITY_DEADLINE   waiting for capacity: rounds over the zones, and
                                                 a queued resource in WAITING_FOR_RESOURCES (its
                                                 queueing policy expires it then too) (4h)
lease_period        FRAY_TPU_LEASE_PERIOD        agents stop work after this long without the
                                                 controller (60s)
delete_deadline     FRAY_TPU_DELETE_DEADLINE     delete call to resource gone (10m)
liveness_deadline   FRAY_TPU_LIVENESS_DEADLINE   a host of a running gang that answers nothing
                                                 (no event, no lease renewal) this long is lost:
                                                 the gang restarts as after a preemption (30s)
tls_leaf_validity   FRAY_TPU_TLS_LEAF_VALIDITY   validity of the certificates agents serve; each
                                                 makes a new one for new connections with a third
                                                 of it left, open channels untouched (720h)
keep_warm           FRAY_TPU_KEEP_WARM           how long a finished job's healthy slices stay
                                                 warm for the next job of the same shape; 0
                                                 turns the warm pool off (5m)
python_version      FRAY_TPU_PYTHON_VERSION      Python of the jobs' environments on the hosts,
                                                 ``3.12`` or ``3.12.1`` (the controller's major.minor,
                                                 so that the pickled callable loads)
index_url           FRAY_TPU_INDEX_URL           package index the hosts install from, a PEP 503
                                                 simple index such as an Artifact Registry PyPI
                                                 remote (uv's default, PyPI)
==================  ===========================  =============================================

Booleans accept true/false/1/0/yes/no/on/off; durations a number of seconds or a number with
``ms``, ``s``, ``m``, ``h``. In a spec an empty value means the default. ``from_spec(spec,
environ)`` takes keys the spec omits from the environment; ``to_spec`` writes every key, so the
spec a job receives does not depend on the job's environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

from fray_tpu import topology
from fray_tpu.contract import ACTOR_PORTS, DEFAULT_AGENT_PORT
from fray_tpu.errors import ConfigError, UnknownRegionError
from fray_tpu.naming import validate_extra_labels

SPEC_PREFIX = "tpu"
ENV_PREFIX = "FRAY_TPU_"
CAPACITY_CLASSES = ("spot", "preemptible", "on-demand", "reserved")
CONNECT_MODES = ("internal", "external")
DEFAULT_NETWORK_TAG = "fray-tpu"
# GCE network tags: RFC 1035 labels, lower case, at most 63 characters.
NETWORK_TAG_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_CAPACITY_ALIASES = {"on_demand": "on-demand", "ondemand": "on-demand", "standard": "on-demand"}
# Ski rental: an idle slice kept for as long as a cold start takes (create + boot + agent: 2-5
# minutes on Cloud TPU for the usual slices) wastes at most one cold start's worth, and saves a
# whole cold start whenever the next job of the shape comes within that time (RL relaunches,
# pipeline steps).
DEFAULT_KEEP_WARM_SECONDS = 300.0
# The project id used against the emulator when the config names none (it accepts any).
EMULATED_PROJECT = "fray-tpu-emulated"

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_DURATION = re.compile(r"^(?P<number>(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?)\s*(?P<unit>ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z0-9]+$")
_REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
_ENDPOINT = re.compile(r"^[^\s:/]+:\d{1,5}$")
_PYTHON_VERSION = re.compile(r"^3\.\d{1,2}(\.\d{1,3})?$")
_INDEX_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")

# Google Cloud regions (public list), to name the closest real region for a misspelt one.
GCP_REGIONS = (
    "africa-south1",
    "asia-east1",
    "asia-east2",
    "asia-northeast1",
    "asia-northeast2",
    "asia-northeast3",
    "asia-south1",
    "asia-south2",
    "asia-southeast1",
    "asia-southeast2",
    "australia-southeast1",
    "australia-southeast2",
    "europe-central2",
    "europe-north1",
    "europe-north2",
    "europe-southwest1",
    "europe-west1",
    "europe-west2",
    "europe-west3",
    "europe-west4",
    "europe-west6",
    "europe-west8",
    "europe-west9",
    "europe-west10",
    "europe-west12",
    "me-central1",
    "me-central2",
    "me-west1",
    "northamerica-northeast1",
    "northamerica-northeast2",
    "northamerica-south1",
    "southamerica-east1",
    "southamerica-west1",
    "us-central1",
    "us-central2",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-south1",
    "us-west1",
    "us-west2",
    "us-west3",
    "us-west4",
)


@dataclass
class TpuClusterConfig:
    """Everything the TPU backend needs to know besides the job itself. Durations are seconds."""

    project: str | None = None
    zones: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    capacity: str = "spot"
    queued: bool = False
    reservation: str | None = None
    network: str | None = None
    subnetwork: str | None = None
    # None: as ``connect`` needs (true for external); always a bool after construction.
    external_ips: bool | None = None
    connect: str = "internal"
    network_tag: str = DEFAULT_NETWORK_TAG
    service_account: str | None = None
    staging_bucket: str | None = None
    host_python: str | None = None
    runtime_versions: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    emulate: bool = False
    emulator_endpoint: str | None = None
    state_dir: str | None = None
    agent_port: int = DEFAULT_AGENT_PORT
    api_timeout: float = 30.0
    api_retry_seconds: float = 60.0
    create_deadline: float = 15 * 60.0
    boot_deadline: float = 15 * 60.0
    poll_interval: float = 5.0
    capacity_deadline: float = 4 * 3600.0  # Marin waits up to 4 h for queued capacity
    lease_period: float = 60.0
    delete_deadline: float = 10 * 60.0
    liveness_deadline: float = 30.0  # Ray notices a dead node after ~30 s, Iris after 50 s
    tls_leaf_validity: float = 30 * 86400.0
    keep_warm: float = DEFAULT_KEEP_WARM_SECONDS
    python_version: str | None = None
    index_url: str | None = None

    def __post_init__(self) -> None:
        self.zones = [z.strip().lower() for z in self.zones if z.strip()]
        self.regions = [r.strip().lower() for r in self.regions if r.strip()]
        self.capacity = _CAPACITY_ALIASES.get(self.capacity.strip().lower(), self.capacity.strip().lower())
        self.connect = self.connect.strip().lower()
        self._validate()

    # ---- derived values ------------------------------------------------------------------

    def capacity_for(self, preemptible: bool) -> str:
        """The capacity class of one job: ``ResourceConfig.preemptible=False`` ("must not be
        preempted") turns spot/preemptible into on-demand; reserved stays reserved."""
        if not preemptible and self.capacity in ("spot", "preemptible"):
            return "on-demand"
        return self.capacity

    def runtime_version_for(self, tpu_type: str | topology.TpuTopology) -> str:
        """The runtime version for a type name or an already looked-up ``TpuTopology``."""
        t = tpu_type if isinstance(tpu_type, topology.TpuTopology) else topology.get_tpu_topology(tpu_type)
        return self.runtime_versions.get(t.generation, t.runtime_version)

    def job_python_version(self) -> str:
        """The Python the jobs' environments use: as configured, else the controller's major.minor."""
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    # ---- spec strings and the environment ------------------------------------------------

    @classmethod
    def from_spec(cls, spec: str, environ: Mapping[str, str] | None = None) -> TpuClusterConfig:
        """Parse ``tpu?key=value&...``; with ``environ``, keys the spec omits come from it."""
        prefix, _, query = spec.strip().partition("?")
        if prefix.strip().lower() != SPEC_PREFIX:
            raise ConfigError(f"TPU cluster spec {spec!r} must start with '{SPEC_PREFIX}?' (e.g. 'tpu?project=p&zone=us-central2-b')")
        values: dict[str, str] = {}
        for raw_key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            key = _canonical_key(raw_key, f"in the spec {spec!r}")
            if key in values and key not in _LIST_FIELDS:
                raise ConfigError(f"Spec key {key!r} is given twice in {spec!r}; give it once")
            values[key] = f"{values[key]},{value}" if key in values and value else value
        base = _env_values(environ) if environ is not None else {}
        return cls._from_strings({**base, **values}, source=f"spec {spec!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TpuClusterConfig:
        """Build from ``FRAY_TPU_*`` variables (see the module docstring)."""
        env = os.environ if environ is None else environ
        return cls._from_strings(_env_values(env), source="environment (FRAY_TPU_* variables)")

    def to_spec(self) -> str:
        """The spec string of this config; ``from_spec(c.to_spec()) == c``."""
        parts = []
        for f in dataclasses.fields(self):
            parts.append(f"{f.name}={quote(_format(getattr(self, f.name)), safe=',:@')}")
        return f"{SPEC_PREFIX}?" + "&".join(parts)

    @classmethod
    def _from_strings(cls, values: Mapping[str, str], source: str) -> TpuClusterConfig:
        kwargs: dict[str, Any] = {}
        for key, text in values.items():
            if text.strip() == "":
                continue  # empty means the default
            kwargs[key] = _parse_value(key, text.strip(), source)
        return cls(**kwargs)

    # ---- validation ----------------------------------------------------------------------

    def _validate(self) -> None:
        if self.host_python is not None and not re.fullmatch(r"3\.\d{1,2}", self.host_python):
            raise ConfigError(f"host_python={self.host_python!r} is not a Python version like 3.10")
        if self.staging_bucket is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]",
                                                                self.staging_bucket.removeprefix("gs://")):
            raise ConfigError(f"staging_bucket={self.staging_bucket!r} is not a Cloud Storage bucket name")
        if self.capacity not in CAPACITY_CLASSES:
            raise ConfigError(
                f"Unknown capacity {self.capacity!r}{_nearest_hint(self.capacity, CAPACITY_CLASSES)}; "
                f"valid: {', '.join(CAPACITY_CLASSES)}"
            )
        if self.connect not in CONNECT_MODES:
            raise ConfigError(
                f"Unknown connect={self.connect!r}{_nearest_hint(self.connect, CONNECT_MODES)}; valid: "
                f"{', '.join(CONNECT_MODES)} (internal: the controller runs in the workers' VPC; external: "
                "the workers get external IPs and the controller dials those)"
            )
        if self.external_ips is None:
            self.external_ips = self.connect == "external"
        elif self.connect == "external" and not self.external_ips:
            raise ConfigError(
                "connect=external dials the workers' external IPs, but external_ips=false creates them "
                "without any: drop external_ips (connect=external implies it) or use connect=internal"
            )
        if not NETWORK_TAG_PATTERN.match(self.network_tag):
            raise ConfigError(
                f"network_tag={self.network_tag!r} is not a GCE network tag: 1-63 characters of lower-case "
                "letters, digits and '-', starting with a letter and not ending with '-' (e.g. fray-tpu)"
            )
        if self.queued and self.capacity == "preemptible":
            raise ConfigError("Queued resources have no 'preemptible' tier: use capacity=spot (or on-demand, reserved) with queued=true")
        if self.reservation and self.capacity != "reserved":
            raise ConfigError(f"reservation={self.reservation!r} needs capacity=reserved (got capacity={self.capacity!r})")
        for zone in self.zones:
            if not _ZONE.match(zone):
                hint = " It is a region: put it in regions=" if _REGION.match(zone) else ""
                raise ConfigError(f"Zone {zone!r} is not a zone name like 'us-central2-b'.{hint}")
        for region in self.regions:
            if not _REGION.match(region):
                hint = " It is a zone: put it in zones=" if _ZONE.match(region) else ""
                raise ConfigError(f"Region {region!r} is not a region name like 'us-central2'.{hint}")
        for generation in self.runtime_versions:
            if generation not in topology.RUNTIME_VERSIONS:
                raise ConfigError(
                    f"runtime_versions names generation {generation!r}{_nearest_hint(generation, topology.RUNTIME_VERSIONS)}; "
                    f"valid: {', '.join(topology.RUNTIME_VERSIONS)}"
                )
        self.labels = validate_extra_labels(self.labels)
        if not 0 < self.agent_port < 65536:
            raise ConfigError(f"agent_port must be in 1..65535, got {self.agent_port}")
        if self.agent_port in ACTOR_PORTS:
            raise ConfigError(f"agent_port={self.agent_port} is one of the ports TPU hosts' actor servers listen on "
                              f"({ACTOR_PORTS[0]}-{ACTOR_PORTS[-1]}): choose another (the default is {DEFAULT_AGENT_PORT})")
        if self.keep_warm < 0:
            raise ConfigError(f"keep_warm must be 0 (no warm pool) or a positive duration, got {self.keep_warm!r}")
        for name in _DURATION_FIELDS:
            if name != "keep_warm" and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive duration, got {getattr(self, name)!r}")
        if self.emulator_endpoint is not None:
            if not self.emulate:
                raise ConfigError(f"emulator_endpoint={self.emulator_endpoint!r} is set but emulate=false: add emulate=true")
            if not _ENDPOINT.match(self.emulator_endpoint):
                raise ConfigError(f"emulator_endpoint must be host:port, got {self.emulator_endpoint!r}")
        if self.python_version is not None and not _PYTHON_VERSION.match(self.python_version):
            raise ConfigError(f"python_version={self.python_version!r} is not a Python version such as 3.12 or 3.12.1")
        if self.index_url is not None and not _INDEX_URL.match(self.index_url):
            raise ConfigError(
                f"index_url={self.index_url!r} is not an http(s) URL of a simple package index, such as "
                f"https://us-python.pkg.dev/my-project/pypi-remote/simple/"
            )
        if self.project is not None and (not self.project or re.search(r"[\s/]", self.project)):
            raise ConfigError(f"project {self.project!r} is not a GCP project id")
        if not self.emulate and not self.project:
            raise ConfigError(
                "Production mode (emulate=false) needs a GCP project: add project=<id> to the spec "
                "(FRAY_CLUSTER_SPEC='tpu?project=my-project&zone=us-central2-b') or set FRAY_TPU_PROJECT "
                "(or GOOGLE_CLOUD_PROJECT); for a local run on the emulator use emulate=true"
            )


_FIELDS = {f.name: f for f in dataclasses.fields(TpuClusterConfig)}
_LIST_FIELDS = ("zones", "regions")
_MAP_FIELDS = ("runtime_versions", "labels")
_BOOL_FIELDS = ("queued", "external_ips", "emulate")
_DURATION_FIELDS = (
    "api_timeout",
    "api_retry_seconds",
    "create_deadline",
    "boot_deadline",
    "poll_interval",
    "capacity_deadline",
    "lease_period",
    "delete_deadline",
    "liveness_deadline",
    "tls_leaf_validity",
    "keep_warm",
)
_KEY_ALIASES = {"zone": "zones", "region": "regions"}


def _canonical_key(raw_key: str, where: str) -> str:
    key = raw_key.strip().lower().replace("-", "_")
    key = _KEY_ALIASES.get(key, key)
    if key not in _FIELDS:
        valid = sorted([*_FIELDS, *_KEY_ALIASES])
        raise ConfigError(f"Unknown key {raw_key!r} {where}{_nearest_hint(key, valid)}. Valid keys: {', '.join(valid)}")
    return key


def _env_values(environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    project_fallback = environ.get("GOOGLE_CLOUD_PROJECT", "")
    if project_fallback.strip():
        values["project"] = project_fallback
    for name in (*_FIELDS, *_KEY_ALIASES):
        text = environ.get(ENV_PREFIX + name.upper(), "")
        if text.strip():
            values[_KEY_ALIASES.get(name, name)] = text
    return values


def _parse_value(key: str, text: str, source: str) -> Any:
    where = f"{key}={text!r} in the {source}"
    if key in _LIST_FIELDS:
        return [item.strip() for item in text.split(",") if item.strip()]
    if key in _MAP_FIELDS:
        return _parse_map(text, where)
    if key in _BOOL_FIELDS:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"Bad boolean {where}: use true or false")
    if key in _DURATION_FIELDS:
        match = _DURATION.match(text.lower())
        if not match:
            raise ConfigError(f"Bad duration {where}: use seconds (30) or a number with ms/s/m/h (90s, 15m, 4h)")
        return float(match.group("number")) * _UNIT_SECONDS[match.group("unit")]
    if key == "agent_port":
        if not text.isdigit():
            raise ConfigError(f"Bad number {where}: use a port number such as {DEFAULT_AGENT_PORT}")
        return int(text)
    return text


def _parse_map(text: str, where: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"Bad entry {item!r} in {where}: write key:value pairs separated by commas")
        result[key.strip()] = value.strip()
    return result


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def _nearest_hint(value: str, choices: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Zone resolution
# --------------------------------------------------------------------------------------------


def resolve_zones(tpu_type: str, regions: Sequence[str] | None, config: TpuClusterConfig | None = None) -> list[str]:
    """The zones to try for ``tpu_type``, in preference order, before anything is provisioned.

    ``regions`` (from ``ResourceConfig.regions``) and the config's zones/regions may name regions
    (``us-central2``) or zones (``us-central2-b``). Each list keeps the zones offering the type's
    generation, in its own order (within a region, the table's order); the request narrows the
    config. A name that is no real region or zone raises UnknownRegionError naming the closest
    real one; a list of real names offering nothing for the generation raises naming the regions
    that do offer it. (A real region without the generation is skipped when others in the same
    list offer it: Marin passes one region list to jobs of several generations.)
    """
    generation = topology.generation_of(tpu_type)
    allowed = list(topology.GENERATION_ZONES[generation])
    if config is not None and (config.zones or config.regions):
        allowed = _zones_for(tpu_type, [*config.zones, *config.regions], "the cluster config")
    if regions:
        if isinstance(regions, str):
            regions = [regions]
        requested = _zones_for(tpu_type, list(regions), "ResourceConfig.regions")
        narrowed = [zone for zone in requested if zone in allowed]
        if not narrowed:
            raise UnknownRegionError(
                f"ResourceConfig.regions {list(regions)} resolve to {requested} for {tpu_type}, but the cluster "
                f"config allows only {allowed}: widen the config's zones/regions or change the request"
            )
        allowed = narrowed
    return allowed


# Abbreviations people write for the first word of a region name.
_AREA_ALIASES = {
    "eu": "europe",
    "euro": "europe",
    "na": "northamerica",
    "sa": "southamerica",
    "ap": "asia",
    "as": "asia",
    "au": "australia",
    "aus": "australia",
    "af": "africa",
}


def _zones_for(tpu_type: str, entries: list[str], source: str) -> list[str]:
    generation = topology.generation_of(tpu_type)
    offered = topology.GENERATION_ZONES[generation]
    zones: list[str] = []
    for entry in entries:
        name = str(entry).strip().lower()
        if not _is_real_location(name):
            raise UnknownRegionError(_unknown_location_message(name, entry, tpu_type, generation, source))
        zones.extend(z for z in offered if (z == name or topology.region_of(z) == name) and z not in zones)
    if not zones:
        raise UnknownRegionError(
            f"{', '.join(repr(e) for e in entries)} in {source} {'offers' if len(entries) == 1 else 'offer'} no "
            f"{generation} TPUs. {_offering(tpu_type, generation)}."
        )
    return zones


def _all_table_zones() -> set[str]:
    return {z for zones in topology.GENERATION_ZONES.values() for z in zones}


def configured_zones(config: TpuClusterConfig) -> list[str]:
    """Every zone the config's zones and regions name, for any generation (every zone fray-tpu
    knows when it names none), sorted."""
    known = _all_table_zones()
    chosen = set(config.zones) | {z for z in known if topology.region_of(z) in config.regions}
    return sorted(chosen or known)


def _is_real_location(name: str) -> bool:
    if name in GCP_REGIONS or name in _all_table_zones():
        return True
    return bool(_ZONE.match(name)) and topology.region_of(name) in GCP_REGIONS


def _offering(tpu_type: str, generation: str) -> str:
    zones = topology.GENERATION_ZONES[generation]
    regions = sorted({topology.region_of(z) for z in zones})
    return f"{generation} ({tpu_type}) is offered in regions {', '.join(regions)} (zones {', '.join(zones)})"


def closest_real_location(name: str) -> str | None:
    """The real region (or zone) nearest a misspelt one: ``eu-west4`` → ``europe-west4``."""
    area, sep, rest = name.partition("-")
    expanded = f"{_AREA_ALIASES.get(area, area)}{sep}{rest}"
    candidates = sorted({*GCP_REGIONS, *_all_table_zones()})
    if expanded in candidates:
        return expanded
    close = difflib.get_close_matches(expanded, candidates, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown_location_message(name: str, entry: str, tpu_type: str, generation: str, source: str) -> str:
    closest = closest_real_location(name)
    hint = f" Did you mean {closest!r}?" if closest else ""
    return f"Unknown region or zone {entry!r} in {source}.{hint} {_offering(tpu_type, generation)}."
