"""FRAY_BACKEND=tpu / FRAY_CLUSTER_SPEC=tpu?... select TpuCluster in a fresh interpreter, through the
``fray_tpu_backend.pth`` hook, with no import of fray_tpu in the user's code.

Marin's fray cannot be installed here; ``tests/standin_fray`` has its module layout and its
``current_cluster()`` resolution rules. Each case runs a new interpreter (the hook acts at
interpreter start) and reads back a JSON report of what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STANDIN_FRAY = Path(__file__).parents[1] / "standin_fray"
HOOK_VARIABLES = ("FRAY_BACKEND", "FRAY_CLUSTER_SPEC")
INTERPRETER_TIMEOUT = 60.0

# Marin user code: only fray is imported.
MARIN_USER_CODE = """
import json, sys
from fray.cluster import current_cluster
import fray.cluster.base
cluster = current_cluster()
print(json.dumps({
    "class": f"{type(cluster).__module__}.{type(cluster).__qualname__}",
    "is_fray_cluster": isinstance(cluster, fray.cluster.base.Cluster),
    "emulate": getattr(getattr(cluster, "config", None), "emulate", None),
    "same_again": current_cluster() is cluster,
}))
"""

UNKNOWN_PREFIX_CODE = """
import json
from fray.cluster import current_cluster
try:
    current_cluster()
except ValueError as error:
    print(json.dumps({"raised": "ValueError", "message": str(error)}))
else:
    print(json.dumps({"raised": None}))
"""

FRAY_TPU_ONLY_CODE = """
import importlib.util, json
from fray_tpu.backend import current_cluster
cluster = current_cluster()
print(json.dumps({
    "class": f"{type(cluster).__module__}.{type(cluster).__qualname__}",
    "marin_fray_importable": importlib.util.find_spec("fray") is not None,
}))
"""


def run_fresh(code: str, *, env: dict[str, str], with_standin: bool = True) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in HOOK_VARIABLES and not k.startswith("FRAY_TPU_")}
    environ.update(env)
    paths = [str(STANDIN_FRAY)] if with_standin else []
    environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                            timeout=INTERPRETER_TIMEOUT, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hook_is_installed_in_site_packages():
    import sysconfig

    assert (Path(sysconfig.get_paths()["purelib"]) / "fray_tpu_backend.pth").is_file()


@pytest.mark.parametrize("env", [
    {"FRAY_BACKEND": "tpu", "FRAY_TPU_EMULATE": "true"},
    {"FRAY_CLUSTER_SPEC": "tpu?emulate=true"},
], ids=["FRAY_BACKEND", "FRAY_CLUSTER_SPEC"])
def test_marin_current_cluster_is_a_tpu_cluster(env):
    report = run_fresh(MARIN_USER_CODE, env=env)
    assert report == {
        "class": "fray_tpu.cluster.TpuCluster",
        "is_fray_cluster": True,
        "emulate": True,
        "same_again": True,
    }


def test_without_the_variables_marin_gets_its_local_cluster():
    report = run_fresh(MARIN_USER_CODE, env={})
    assert report["class"] == "fray.cluster.local_cluster.LocalCluster"
    assert report["is_fray_cluster"] is True


def test_unknown_prefix_still_raises_value_error():
    report = run_fresh(UNKNOWN_PREFIX_CODE, env={"FRAY_CLUSTER_SPEC": "nosuch?x=1"})
    assert report["raised"] == "ValueError"
    assert "nosuch" in report["message"]


def test_fray_tpu_current_cluster_works_without_marin_fray():
    report = run_fresh(FRAY_TPU_ONLY_CODE, env={"FRAY_BACKEND": "tpu", "FRAY_TPU_EMULATE": "true"},
                       with_standin=False)
    assert report == {"class": "fray_tpu.cluster.TpuCluster", "marin_fray_importable": False}
