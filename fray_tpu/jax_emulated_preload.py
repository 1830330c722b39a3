"""Preloaded by the attempt runner on emulated hosts: registers the emulator's JAX cluster
plugin when (and only if) the job imports JAX's cluster detection, so jobs that never touch
JAX do not pay for importing it."""

import importlib

from fray_tpu.post_import import when_imported

when_imported("jax._src.clusters", lambda _: importlib.import_module("fray_tpu.jax_emulated_cluster"))
