"""The import graph of fray_tpu: no cycles (lazy imports inside functions included), the wire
contract imports nothing, and the VM side (worker/, emulator/) imports no controller module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fray_tpu"
# What the VM side may import beyond itself: the contract and small shared leaves.
VM_SIDE_MAY_IMPORT = ("fray_tpu.contract", "fray_tpu.errors", "fray_tpu.tls", "fray_tpu.topology",
                      "fray_tpu.tpu_client", "fray_tpu.proto", "fray_tpu.uv_command", "fray_tpu.gcsfetch")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST):
    """Every fray_tpu module named by an import, at any depth, outside ``if TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fray_tpu"):
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("fray_tpu"))
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    return {name: {resolve(n) for n in _imported_names(ast.parse(path.read_text()))} - {name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No strongly connected component of more than one module, lazy imports counted."""
    assert _cycles(import_graph()) == []


def test_the_cycle_check_can_fail():
    """The checker finds a cycle when there is one."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_wire_contract_imports_nothing_of_fray_tpu():
    """contract.py ships to every VM and into the runner: standard library only."""
    assert import_graph()["fray_tpu.contract"] == set()


def test_the_vm_side_imports_no_controller_module():
    """worker/ and emulator/ import only themselves, the contract and the shared leaves."""
    bad = {}
    for name, imports in import_graph().items():
        if name.startswith(("fray_tpu.worker", "fray_tpu.emulator")):
            outside = {i for i in imports if not i.startswith(("fray_tpu.worker", "fray_tpu.emulator", *VM_SIDE_MAY_IMPORT))
                       and i != "fray_tpu"}
            if outside:
                bad[name] = sorted(outside)
    assert bad == {}


def test_the_vocabulary_does_not_build_clusters():
    """fray_api.py describes Fray's types; choosing and building a cluster is backend.py's."""
    assert not import_graph()["fray_tpu.fray_api"] & {"fray_tpu.cluster", "fray_tpu.local_runner", "fray_tpu.backend"}


PURE_MODULES = ("fray_tpu.decisions", "fray_tpu.multislice", "fray_tpu.planning", "fray_tpu.costs",
                "fray_tpu.attempt_events", "fray_tpu.supervisor.phases", "fray_tpu.supervisor.capacity",
                "fray_tpu.supervisor.watch", "fray_tpu.supervisor.takeover", "fray_tpu.placement")


def test_the_pure_layers_load_no_edge():
    """Importing every pure policy loads no gRPC, no cloud client and no edge or shell module."""
    import subprocess
    import sys

    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE_MODULES) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') or m in "
            "('fray_tpu.channel', 'fray_tpu.provisioner', 'fray_tpu.cluster', 'fray_tpu.state.journal')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
