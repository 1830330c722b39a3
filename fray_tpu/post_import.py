"""Run a callback right after a module is first imported (a post-import hook).

Used where fray-tpu must adjust another package without importing it eagerly: Marin's
``fray.cluster`` (teach it the ``tpu`` spec) and JAX's cluster detection (register the
emulator's plugin only if the job imports JAX at all).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``module_name`` has executed (now, if it already has)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    sys.meta_path.insert(0, _PostImportFinder(module_name, callback))


class _PostImportFinder:
    """A meta path finder (by shape: subclassing ``importlib.abc`` costs every task process
    milliseconds at interpreter start)."""

    def __init__(self, module_name: str, callback: Callable[[ModuleType], None]):
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        # Find the real spec with this finder out of the way, then wrap its loader; the hook
        # fires once, so it leaves the meta path for good.
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec
