"""The second lane's tests: fray-tpu against Marin's own marin-fray (Python >= 3.12).

The main lane has no marin-fray, so it does not collect them (they are neither run nor reported
as skipped there); the second lane (``./dev test-marin``, part of ``./dev test``) sets
``FRAY_TPU_REQUIRE_MARIN=1``, and then a missing marin-fray is an error, not a silent pass.
"""

import os

from fray_tpu import client_api

if not client_api.USING_MARIN_FRAY:
    if os.environ.get("FRAY_TPU_REQUIRE_MARIN") == "1":
        raise RuntimeError("the marin lane needs Marin's marin-fray importable (pip install -e '.[marin]' on Python >= 3.12)")
    collect_ignore_glob = ["test_*.py"]
