"""``fray-tpu doctor``: what can be checked before a first real job, without creating anything.

Each check has a status (ok, warn, fail, skip), what was found, and the fix when it is not ok:
credentials (which, whose, accepted by the API), the TPU API reachable and enabled, each zone
offering the requested types and their runtime versions, the controller's position against the
``external_ips`` setting, and what delivering fray-tpu to the VMs needs. It only lists and reads
(ListLocations, ListAcceleratorTypes, ListRuntimeVersions, the controller's metadata server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from google.api_core import exceptions as api_exceptions
from google.cloud import tpu_v2

from fray_tpu import topology
from fray_tpu.cloud_errors import CreateAction, classify_call_error
from fray_tpu.config import TpuClusterConfig, resolve_zones

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_PAGE = 1000


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    found: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def render(self) -> str:
        return f"[{self.status:4}] {self.name}: {self.found}" + (f"\n       fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class ControllerPosition:
    """Where the controller runs, from its metadata server (None: not on GCE, or not looked up)."""

    zone: str | None
    network: str | None


def describe_credentials(credentials) -> str:
    """Which credentials, and whose, without printing any secret."""
    email = getattr(credentials, "service_account_email", None)
    kind = type(credentials).__module__.rsplit(".", 1)[-1] + "." + type(credentials).__name__
    if email and email != "default":
        return f"{kind} for {email}"
    account = getattr(credentials, "account", None)
    return f"{kind}" + (f" for {account}" if account else "")


def _api_failure(error: api_exceptions.GoogleAPICallError) -> tuple[str, str]:
    verdict = classify_call_error(error)
    return f"{verdict.reason}: {verdict.message}", verdict.fix


def run_checks(
    config: TpuClusterConfig,
    client: tpu_v2.TpuClient,
    project: str,
    tpu_types: Sequence[str],
    *,
    credentials_found: str,
    position: Callable[[], ControllerPosition | None],
) -> list[Check]:
    """Every check, in order; a check whose premise failed is ``skip`` and says why."""
    checks: list[Check] = []
    timeout = config.api_timeout

    def call(method, **request):
        return method(request=request, timeout=timeout, retry=None)

    try:
        call(client.list_locations, name=f"projects/{project}")
        credentials_ok, api_ok = True, True
        checks.append(Check("credentials", OK, f"{credentials_found}; accepted by the Cloud TPU API"))
        checks.append(Check("Cloud TPU API", OK, f"reachable and enabled for project {project}"))
    except api_exceptions.Unauthenticated as error:
        found, fix = _api_failure(error)
        credentials_ok, api_ok = False, False
        checks.append(Check("credentials", FAIL, f"{credentials_found}; refused: {found}", fix))
        checks.append(Check("Cloud TPU API", SKIP, "not checked: the credentials were refused"))
    except api_exceptions.GoogleAPICallError as error:
        found, fix = _api_failure(error)
        credentials_ok, api_ok = True, False
        checks.append(Check("credentials", OK, f"{credentials_found}; accepted"))
        checks.append(Check("Cloud TPU API", FAIL, f"project {project}: {found}", fix))
    if not api_ok:
        checks.append(Check("zones", SKIP, "not checked: the Cloud TPU API cannot be used"
                            if credentials_ok else "not checked: the credentials were refused"))
    elif not tpu_types:
        checks.append(Check("zones", SKIP, "no TPU type given", "pass --type TYPE to check which zones offer it"))
    else:
        for tpu_type in tpu_types:
            checks.extend(_zone_checks(config, client, project, tpu_type, call))
    checks.append(_position_check(config, position))
    checks.append(_delivery_check(config))
    return checks


def _zone_checks(config, client, project, tpu_type, call) -> list[Check]:
    shape = topology.get_tpu_topology(tpu_type)
    runtime = config.runtime_version_for(shape)
    checks = []
    for zone in resolve_zones(tpu_type, None, config):
        parent = f"projects/{project}/locations/{zone}"
        name = f"zone {zone} offers {tpu_type} with {runtime}"
        try:
            types = [t.type_ for t in call(client.list_accelerator_types, parent=parent, page_size=_PAGE).accelerator_types]
            versions = [v.version for v in call(client.list_runtime_versions, parent=parent, page_size=_PAGE).runtime_versions]
        except api_exceptions.GoogleAPICallError as error:
            found, fix = _api_failure(error)
            verdict = classify_call_error(error)
            status = FAIL if verdict.action in (CreateAction.SKIP_ZONE, CreateAction.FATAL) else WARN
            checks.append(Check(name, status, found, fix))
            continue
        if tpu_type not in types:
            checks.append(Check(name, FAIL, f"{zone} does not offer {tpu_type} (it offers {len(types)} other types)",
                                f"remove {zone} from the zones, or pick a type it offers"))
        elif runtime not in versions:
            checks.append(Check(name, FAIL, f"{zone} has no runtime version {runtime}",
                                f"set runtime_versions={shape.generation}:<one of {', '.join(sorted(versions)[:5])}, ...>"))
        else:
            checks.append(Check(name, OK, "offered"))
    return checks


def _position_check(config: TpuClusterConfig, position: Callable[[], ControllerPosition | None]) -> Check:
    name = "controller position"
    if config.emulate:
        return Check(name, OK, "emulated hosts listen on loopback: this machine reaches them")
    where = position()
    if config.connect == "external":
        found = (f"connect=external: the controller dials the workers' external IPs (open TCP {config.agent_port} "
                 f"to the tag {config.network_tag} from this machine's address)")
        return Check(name, OK, found + (f" (controller on GCE in {where.zone})" if where and where.zone else ""))
    if where is None:
        return Check(name, FAIL, "connect=internal dials the workers' internal addresses, and this controller is not on GCE",
                     "run the controller on a GCE VM in the workers' VPC, or set connect=external")
    wanted = config.network or "default"
    network = (where.network or "").rsplit("/", 1)[-1]
    if network and network != wanted.rsplit("/", 1)[-1]:
        return Check(name, FAIL, f"controller in network {network}, workers in {wanted}",
                     f"run the controller in network {wanted}, or set network={network}")
    return Check(name, OK, f"controller on GCE in {where.zone}, network {network or 'unknown'}; workers reached inside the VPC")


def _delivery_check(config: TpuClusterConfig) -> Check:
    name = "host bundle delivery"
    if config.emulate:
        return Check(name, OK, "emulated hosts import fray-tpu from this installation")
    if config.external_ips:
        return Check(name, OK, "workers have external IPs: pip reaches the package index to install fray-tpu")
    return Check(name, WARN, "workers have no external IPs: installing fray-tpu at boot needs a route to the package "
                 "index (Cloud NAT on the subnet) or a wheel on storage they reach (Private Google Access)",
                 "add Cloud NAT to the subnet, or set external_ips=true")


def metadata_position(timeout: float = 2.0) -> ControllerPosition | None:
    """This machine's zone and network from its metadata server; None when there is none. Not
    probed at all when NO_GCE_CHECK=true and GCE_METADATA_HOST is unset (tests, laptops)."""
    from fray_tpu.worker import metadata as md

    if not os.environ.get("GCE_METADATA_HOST") and os.environ.get("NO_GCE_CHECK", "").lower() == "true":
        return None
    client = md.MetadataClient(timeout=timeout, attempts=1)
    try:
        zone = client.get(md.ZONE_PATH)
        network = client.get(md.INTERFACE_NETWORK_PATH)
    except md.MetadataError:
        return None
    if zone is None:
        return None
    return ControllerPosition(zone.text.strip().rsplit("/", 1)[-1], network.text.strip() if network else None)
