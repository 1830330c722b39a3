"""Error types shared across layers. Each message a user sees names the bad value and the fix."""

from __future__ import annotations


class FrayTpuError(Exception):
    """Base of every error fray-tpu raises on purpose."""


class ConfigError(FrayTpuError, ValueError):
    """Bad user input (request, spec string, environment), detected before anything is provisioned."""


class UnknownTpuTypeError(ConfigError):
    """A TPU type that is not in the topology table."""


class UnknownRegionError(ConfigError):
    """A region or zone that offers nothing for the requested TPU generation."""


class CredentialsError(FrayTpuError):
    """No usable Google credentials in production mode."""


class ProvisioningError(FrayTpuError):
    """A slice could not be created or did not become ready."""


class CreateRejectedError(ProvisioningError):
    """Google refused a create in a way no retry heals (permission, API disabled, bad request, or
    every zone skipped): the job fails now; the message has the API's words and the fix."""


class NoUsableZoneError(CreateRejectedError):
    """Every candidate zone was skipped (forbidden, type not offered there): the message lists
    each zone with its reason."""


class CapacityUnavailableError(ProvisioningError):
    """Every candidate zone is out of capacity (stockout) or quota."""


class DeadlineExceeded(FrayTpuError, TimeoutError):
    """A wait ran past its deadline; the message says what was waited for."""


class EnvironmentBuildError(FrayTpuError):
    """uv could not build (or check) the job's environment; the message carries uv's own words."""
