"""Stand-in for Marin's late-2025 ``fray.job`` package: re-exports its context module."""

from fray.job.context import create_job_ctx, fray_default_job_ctx, get_default_job_ctx

__all__ = ["create_job_ctx", "fray_default_job_ctx", "get_default_job_ctx"]
