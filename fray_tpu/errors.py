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


class CapacityUnavailableError(ProvisioningError):
    """Every candidate zone is out of capacity (stockout) or quota."""


class DeadlineExceeded(FrayTpuError, TimeoutError):
    """A wait ran past its deadline; the message says what was waited for."""


class EnvironmentBuildError(FrayTpuError):
    """uv could not build (or check) the job's environment; the message carries uv's own words."""
