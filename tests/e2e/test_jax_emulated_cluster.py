"""The emulator's JAX plugin forms one distributed group from fray-tpu's task variables."""

import os
import socket
import subprocess
import sys
import textwrap

from fray_tpu.multislice import gang_environments

PROGRAM = textwrap.dedent(
    """
    import fray_tpu.jax_emulated_cluster  # what the runner preloads on emulated hosts
    import jax
    from jax.experimental import multihost_utils
    import jax.numpy as jnp
    jax.distributed.initialize()
    total = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1])).sum()
    print(jax.process_index(), jax.process_count(), int(total), flush=True)
    jax.distributed.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unchanged_initialize_joins_all_hosts_of_two_slices():
    port = free_port()
    envs = gang_environments([["127.0.0.1", "127.0.0.1"], ["127.0.0.1", "127.0.0.1"]], {"JAX_COORDINATOR_PORT": str(port)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROGRAM],
            env={**os.environ, **env, "FRAY_TPU_EMULATED_HOST": "1", "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    # Gloo prints its own connection lines on stdout; keep ours.
    lines = sorted(line for out, _ in outputs for line in out.splitlines() if not line.startswith("[Gloo]"))
    # process ids 0..3, count 4, and the collective saw every process: 1+2+3+4.
    assert lines == [f"{i} 4 10" for i in range(4)]
