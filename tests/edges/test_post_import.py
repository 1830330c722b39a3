"""Post-import hooks fire after the module executes, once, and at once for loaded modules."""

import subprocess
import sys
import textwrap


def test_hook_fires_after_first_import_only():
    code = textwrap.dedent(
        """
        import sys
        from fray_tpu.post_import import when_imported
        seen = []
        when_imported("json.decoder", lambda m: seen.append(hasattr(m, "JSONDecoder")))
        assert "json.decoder" not in sys.modules and seen == []
        import json.decoder
        import json.decoder
        when_imported("json.decoder", lambda m: seen.append("again"))
        print(seen)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, 'again']"


def test_emulated_jax_plugin_loads_only_with_jax():
    code = textwrap.dedent(
        """
        import sys
        import fray_tpu.jax_emulated_preload
        assert "jax" not in sys.modules and "fray_tpu.jax_emulated_cluster" not in sys.modules
        import jax
        from jax._src import clusters
        print(any(c.__name__ == "FrayEmulatedTpuCluster" for c in clusters.ClusterEnv._cluster_types))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
