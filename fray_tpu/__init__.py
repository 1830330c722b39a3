"""fray-tpu: run Fray jobs directly on Cloud TPU slices."""

__version__ = "0.1.0"
